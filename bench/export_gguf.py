"""GGUF export of the embedded model (SmolLM2-135M-Instruct): time, size and perplexity per type, beside llama-quantize.

For each export type:
1. Validate: llama.cpp's quantizer (llama_model_quantize, what llama-quantize runs) turns our f32
   export into that type, and our f16 export too; our direct exports of the fp32 model and of the
   model rounded to f16 must hold the same tensors, types and bytes as the two.
2. Time our save_gguf (median and spread of --repeats runs), and its size.
3. Perplexity, evaluated by llama.cpp itself (llama-cpp-python, one thread, F32 KV cache) on
   general English (the King James Bible pieces the forgetting check uses), of our export and of
   llama-quantize's from our f16 file: the route llama.cpp users take (convert to f16, quantize).
   From the same f16 values our file is llama-quantize's byte for byte (step 1), so its perplexity
   is the same number.

    python bench/export_gguf.py [--repeats 3] [--types f32,f16,...] [--chars 6000]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine, markdown_table  # noqa: E402

TYPES = "f32,f16,bf16,q8_0,q6_k,q5_k_m,q5_k_s,q4_k_m,q4_k_s,q4_1,q4_0"


def llama_quantize(src: Path, dst: Path, gguf_type: str) -> float:
    import gguf
    import llama_cpp

    from lora_engine.sources.gguf_mix import FILE_TYPES

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 1
    params.ftype = int(gguf.LlamaFileType[FILE_TYPES[gguf_type][0]])
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {src} -> {gguf_type}")
    return time.perf_counter() - start


def perplexity(path: Path, texts: list[str]) -> float:
    """exp(mean next-token NLL) over `texts`, each evaluated alone, by llama.cpp."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=1, n_threads_batch=1, logits_all=True, flash_attn=False,
                          type_k=0, type_v=0, verbose=False)
    nll, count = 0.0, 0
    for text in texts:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:1024]
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)
        logz = np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1)) + scores.max(1)
        nll += float((logz - scores[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    llm.close()
    return math.exp(nll / count)


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def same_tensors(ours: Path, theirs: Path, t: str) -> str:
    """'n/n' when every tensor's type and bytes are equal; stops the bench otherwise."""
    a, b = tensors(ours), tensors(theirs)
    same = sum(a[n] == b.get(n) for n in a)
    if same != len(a) or len(a) != len(b):
        raise SystemExit(f"{t}: {same}/{len(a)} tensors equal llama-quantize's (types and bytes)")
    return f"{same}/{len(a)}"


def main() -> None:
    import llama_cpp
    import torch

    from lora_engine.data.embedded import general_text
    from lora_engine.deploy.gguf import save_gguf
    from lora_engine.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--chars", type=int, default=6000, help="characters of text for the perplexity")
    a = ap.parse_args()
    model = load_model("smollm2-135m-instruct", verbose=False)
    model16 = load_model("smollm2-135m-instruct", verbose=False)
    with torch.no_grad():
        for p in model16.parameters():
            p.copy_(p.half().float())
    n_params = sum(p.numel() for p in model.parameters())
    texts = general_text(n_chars=a.chars, pieces=4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = save_gguf(model, tmp / "f32.gguf", "f32", modelfile=False, verbose=False)
        f16 = save_gguf(model, tmp / "f16.gguf", "f16", modelfile=False, verbose=False)
        for t in a.types.split(","):
            path = tmp / f"smol.{t}.gguf"
            times = []
            for _ in range(a.repeats):
                start = time.perf_counter()
                save_gguf(model, path, t, modelfile=False, verbose=False)
                times.append(time.perf_counter() - start)
            row = {"type": t, "median s": statistics.median(times), "min s": min(times), "max s": max(times),
                   "size MB": path.stat().st_size / 1e6, "bits/param": path.stat().st_size * 8 / n_params}
            if t not in ("f32", "f16", "bf16"):  # validate against llama.cpp's quantizer from the same values
                llama_quantize(f32, tmp / "check.gguf", t)
                row["= llama-quantize (f32 in)"] = same_tensors(path, tmp / "check.gguf", t)
                row["llama-quantize s"] = llama_quantize(f16, tmp / "theirs.gguf", t)
                save_gguf(model16, tmp / "ours16.gguf", t, modelfile=False, verbose=False)
                row["= llama-quantize (f16 in)"] = same_tensors(tmp / "ours16.gguf", tmp / "theirs.gguf", t)
                row["ppl llama-quantize (f16 in)"] = perplexity(tmp / "theirs.gguf", texts)
            else:
                row["= llama-quantize (f32 in)"] = row["= llama-quantize (f16 in)"] = "-"
                row["llama-quantize s"] = float("nan")
                row["ppl llama-quantize (f16 in)"] = float("nan")
            row["ppl ours"] = perplexity(path, texts)
            rows.append(row)
            print(row, flush=True)
    info = machine()
    info["gguf"] = _dist_version("gguf")
    info["llama_cpp_python"] = llama_cpp.__version__
    lines = ["# GGUF export of the embedded model (SmolLM2-135M-Instruct, tied embeddings)", "",
             *header_lines(info), f"- repeats: {a.repeats}; perplexity text: {len(texts)} KJV pieces, "
             f"{sum(map(len, texts))} characters", "",
             "save_gguf from the fp32 weights (times, sizes, `ppl ours`), each type with llama-quantize's",
             "per-tensor mix. `= llama-quantize (f32 in)`: tensors whose type and bytes equal llama_model_quantize's",
             "from our f32 file; `(f16 in)`: our export of the weights rounded to f16 against llama_model_quantize",
             "from our f16 file, so `ppl llama-quantize (f16 in)` is also ours from the same f16 input. Perplexity",
             "by llama.cpp (one thread, F32 KV cache). SmolLM2's rows of 576 are not whole 256-blocks, so",
             "llama.cpp's K-quant mixes put Q5_0/Q5_1/Q8_0 there and K-quants only in ffn_down (rows of 1536).",
             "The embedded weights come from a Q4_1 GGUF file (already on Q4_1's grid): q4_1 loses almost",
             "nothing here, and Q5_0/Q5_1 (another grid) lose more than usual; the fp32 -> f16 step alone moves",
             "the perplexity in the third digit, which is all that separates the two ppl columns.", "",
             *markdown_table(rows, ".4g")]
    out = Path(__file__).resolve().parent / "results" / "export_gguf.md"
    out.write_text("\n".join(lines) + "\n")
    print(out)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
