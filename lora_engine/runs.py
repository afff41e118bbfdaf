"""`python -m lora_engine.runs list DIR`, and `le.runs`: the lineage of training runs.

Lineage itself (run.json: what each run hashes and records) is lora_engine/train/lineage.py; its
functions are named here too because `le.runs` has meant run lineage since before the package had
layers, and `le.runs` must be this module whatever was imported first (lora_engine/__init__.py).
"""

import sys

from lora_engine.cli import run_cli
from lora_engine.train.lineage import (
    MANIFEST,
    find_runs,
    format_runs,
    git_revision,
    hash_files,
    main,
    model_weight_files,
    new_manifest,
    read_manifest,
    write_manifest,
)

__all__ = ["MANIFEST", "find_runs", "format_runs", "git_revision", "hash_files", "main", "model_weight_files",
           "new_manifest", "read_manifest", "write_manifest"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
