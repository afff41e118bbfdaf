"""bench/gpu_check.sh cannot rot while no GPU is lent: its dry run (every step on tiny shapes on this CPU) passes,
its summary names every README GPU claim with its status, and its step limits fit the device time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))

from gpu_claims import CLAIMS, claim_status  # noqa: E402


def _step_names() -> list[str]:
    return list(dict.fromkeys(n for n, _ in _step_limits()))


def _step_limits() -> list[tuple[str, str]]:
    """(step name, its limit variable) of every run_step call (a step run one way for a GPU, another for a
    dry run, appears twice)."""
    return re.findall(r'run_step ([\w-]+) "\$(T_[A-Z0-9_]+)"', SCRIPT.read_text())


def _limits() -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"\b(T_[A-Z0-9_]+)=(\d+)", SCRIPT.read_text())}


def test_step_limits_add_up_to_under_8_minutes():
    text = SCRIPT.read_text()
    limits = _limits()
    pairs = set(_step_limits())
    assert {v for _, v in pairs} == set(limits), f"every declared limit is used: {pairs}, {set(limits)}"
    assert len(pairs) == len(_step_names()) == len(limits), f"each step has its own limit: {sorted(pairs)}"
    assert sum(limits.values()) < 480, f"the step limits add up to {sum(limits.values())} s, over 8 minutes"
    stated = re.search(r"= (\d+) s, under 8 minutes", text)
    assert stated and int(stated.group(1)) == sum(limits.values()), "the header states the sum of the limits"


@pytest.mark.parametrize("rows, steps, dry, want", [
    ([], {}, False, "planned"),  # no GPU run yet
    ([{"claim": "kernels fused lora", "status": "dry-run"}], {"gpu-kernels": "ok"}, True, "planned"),
    ([{"claim": "kernels fused lora", "status": "measured"}], {"gpu-kernels": "TIMED OUT after 20s"}, False,
     "measured"),  # written before the limit stopped the step
    ([{"claim": "kernels fused lora", "status": "failed: OutOfMemoryError: x"}], {"gpu-kernels": "ok"}, False,
     "failed: OutOfMemoryError: x"),
    ([], {"gpu-kernels": "FAILED (exit 1)"}, False, "failed: step gpu-kernels FAILED (exit 1)"),
    ([], {"gpu-kernels": "ok"}, False, "failed: no row written"),
])
def test_claim_status(rows, steps, dry, want):
    assert claim_status("kernels fused lora", "gpu-kernels", steps, rows, dry) == want


def test_claim_status_of_a_step_with_its_own_tables():
    assert claim_status("kernel-bench", "kernel-bench", {"kernel-bench": "ok"}, [], False) == "measured"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    recorded = ROOT / "bench" / "results" / "gpu_check.md"
    before = recorded.read_bytes() if recorded.exists() else None
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    after = recorded.read_bytes() if recorded.exists() else None
    return p, (out / "gpu_check.md").read_text(), before == after


@pytest.mark.slow
def test_dry_run_runs_every_step(dry_run):
    p, summary, untouched = dry_run
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert untouched, "a dry run must not overwrite bench/results/gpu_check.md"
    for name in _step_names():
        assert re.search(rf"^\| {re.escape(name)} \| ok \| \d+s \|$", summary, re.M), f"step {name} did not pass"


@pytest.mark.slow
def test_dry_run_summary_names_every_claim(dry_run):
    _, summary, _ = dry_run
    table = summary.split("## Claims", 1)[1].split("## Rows", 1)[0]
    for claim, _, step in CLAIMS:
        lines = [line for line in table.splitlines() if line.startswith(f"| {claim} |")]
        assert len(lines) == 1, f"claim {claim!r} appears {len(lines)} times"
        status = lines[0].rstrip(" |").rsplit("| ", 1)[1]
        assert status in ("measured", "planned") or status.startswith("failed: "), status
        assert status == "planned", f"a dry run measures nothing, yet {claim!r} is {status!r}"
        assert f"| {step} |" in lines[0] and step in _step_names()
    # every step that writes rows wrote at least one, marked as a dry run
    for step in ("train-step", "context-4k", "context-24g", "gpu-kernels", "gpu-new-kernels"):
        assert f"- {step}: dry-run: " in summary, f"{step} wrote no row"


@pytest.mark.parametrize("cap, planned, want", [
    (131072, 131072, (131072, None)),  # the planned length fits: one probe
    (70000, 131072, (69632, 73728)),   # bisection to 4,096 tokens
    (0, 131072, (0, 4096)),            # nothing fits
])
def test_bisection_over_probes(tmp_path, cap, planned, want):
    from gpu_common import Rows
    from gpu_context import bisect

    probed = []

    def probe_at(n):
        probed.append(n)
        return n <= cap, 1.0, "" if n <= cap else "OOM"

    rows = Rows(str(tmp_path), "context-24g", dry_run=False)
    assert bisect(probe_at, planned, deadline=float("inf"), rows=rows) == want
    assert probed[0] == planned and all(n % 4096 == 0 for n in probed)
    assert len((tmp_path / "gpu_rows.jsonl").read_text().splitlines()) == len(probed)


def test_bisection_stops_at_the_deadline(tmp_path):
    from gpu_common import Rows
    from gpu_context import bisect

    probed = []
    rows = Rows(str(tmp_path), "context-24g", dry_run=False)
    lo, hi = bisect(lambda n: (probed.append(n), (False, 0.0, "OOM"))[1], 131072, deadline=0.0, rows=rows)
    assert probed == [131072] and (lo, hi) == (0, 131072), "the first probe always runs, no other past the deadline"


def test_the_readme_names_the_step_of_every_gpu_claim():
    readme = (ROOT / "README.md").read_text()
    for _, _, step in CLAIMS:
        assert step in readme, f"README.md names no step {step} of bench/gpu_check.sh"
    for figure in ("131,072 tokens in 21.2 GiB", "4,096 tokens in 5.64 GiB"):
        sentence = readme[readme.index(figure):][:200]
        assert "planned" in sentence and "step context-" in sentence, sentence


def test_relative_error_of_the_new_kernels_is_against_the_reference():
    import torch
    from gpu_new_kernels import rel_err

    got, want = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([1.0, 4.0]), torch.tensor([3.0])]
    assert rel_err(got, want) == 0.5 and rel_err(want, want) == 0.0
