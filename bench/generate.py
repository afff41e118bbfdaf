"""Decoding speed: models/generate.decode against transformers' generate, greedy, batch 1 and 16.

Both run the same weights (the embedded SmolLM2-135M-Instruct unless --model), in --dtype, on
different chat prompts (batch 16: 16 prompts of different lengths, left-padded by both). Each
decodes exactly --new-tokens tokens (no end-of-sequence stop), so the work is the same. First
the outputs are compared row by row (a difference is accepted only at a near-tie of the top two
logits, as in tests/test_model.py); then the two are timed in alternation, --repeats times each.
tokens/s = batch x new tokens / wall time of the call, prefill included.

    python bench/generate.py [--model NAME_OR_PATH] [--new-tokens 32] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_model, header_lines, machine, markdown_table  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write one sentence about the sea.",
             "How many legs has a spider?", "What is 12 times 12?", "Say hello in Spanish.",
             "Give me a word that rhymes with cat.", "Why is the sky blue? Answer briefly, in a single sentence.",
             "What do bees make?", "List three fruits.", "What is the opposite of hot?",
             "Who wrote Romeo and Juliet?", "What is water made of?", "Tell me a fun fact about octopuses, please.",
             "What day comes after Monday?", "Translate 'thank you' to French."]


def prompts(tok, n: int) -> list[list[int]]:
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
            for q in QUESTIONS[:n]]


def ours(model, batch, new_tokens):
    from lora_engine.models.generate import decode

    return decode(model, batch, new_tokens).tokens


def theirs(hf, batch, new_tokens, pad_id):
    W = max(map(len, batch))
    ids = torch.tensor([[pad_id] * (W - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=pad_id)
    return out[:, W:].tolist()


def check(hf, batch, got, ref) -> int:
    """Rows that differ; exits if one differs other than at a near-tie of transformers' top two logits."""
    differ = 0
    for p, g, r in zip(batch, got, ref):
        if g == r:
            continue
        differ += 1
        i = next(j for j, (a, b) in enumerate(zip(g, r)) if a != b)
        with torch.no_grad():
            top2 = hf(torch.tensor([p + r[:i]])).logits[0, -1].float().topk(2).values
        gap = float(top2[0] - top2[1])
        if gap > 1e-3:
            sys.exit(f"outputs differ at new token {i} (top-2 logit gap {gap:.2g}): {g} vs {r}")
        print(f"a row differs at new token {i}, a near-tie (top-2 logit gap {gap:.2g})")
    return differ


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.md"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import transformers as tf

    import lora_engine as le
    from lora_engine.sources.embedded import resolve_path

    folder = resolve_path(a.model)
    model = le.load_model(folder, dtype=a.dtype).eval()
    tok = le.load_tokenizer(folder)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, a.dtype)).eval()
    hf.generation_config.eos_token_id = None  # both decode every token: the same work
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    rows = []
    for b in map(int, a.batches.split(",")):
        batch = prompts(tok, b)
        differ = check(hf, batch, ours(model, batch, a.new_tokens), theirs(hf, batch, a.new_tokens, pad))
        print(f"batch {b}: {b - differ} of {b} rows equal transformers' greedy output. Starting benchmarks.")
        times = {"ours": [], "transformers": []}
        for _ in range(a.repeats):  # alternated, so that a neighbour's load falls on both alike
            for name in times:
                t = time.perf_counter()
                ours(model, batch, a.new_tokens) if name == "ours" else theirs(hf, batch, a.new_tokens, pad)
                times[name].append(time.perf_counter() - t)
        tps = {k: sorted(b * a.new_tokens / s for s in v) for k, v in times.items()}
        rows.append({"batch": b, "prompt tokens": f"{min(map(len, batch))}..{max(map(len, batch))}",
                     "ours tok/s": f"{statistics.median(tps['ours']):.1f} ({tps['ours'][0]:.1f}..{tps['ours'][-1]:.1f})",
                     "transformers tok/s": f"{statistics.median(tps['transformers']):.1f} "
                                           f"({tps['transformers'][0]:.1f}..{tps['transformers'][-1]:.1f})",
                     "ours / transformers": f"{statistics.median(tps['ours']) / statistics.median(tps['transformers']):.2f}x",
                     "rows equal": f"{b - differ}/{b}"})
        print(rows[-1])

    info = machine() | {"cpu_model": cpu_model(), "transformers": tf.__version__}
    with contextlib.suppress(OSError):  # the machine is shared: what else ran is part of the result
        info["load_average"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines = [f"# Decoding: models/generate.decode vs transformers' generate ({a.model})", "",
             f"- command: `python bench/generate.py --new-tokens {a.new_tokens} --repeats {a.repeats} "
             f"--dtype {a.dtype} --threads {a.threads}`", *header_lines(info),
             f"- greedy, {a.new_tokens} new tokens a row (no eos stop), {a.dtype}; tokens/s: median (min..max) "
             f"of {a.repeats} alternated calls, prefill included", "", *markdown_table(rows), ""]
    text = "\n".join(lines)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
