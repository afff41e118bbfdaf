"""--registry DIR in generate, eval, export and train (registry references read from DIR, not from
$LORA_ENGINE_REGISTRY), and the error of train --resume with a registry reference."""

import json
import shutil
from pathlib import Path

import lora_engine.registry as store
from lora_engine.cli import run_cli
from lora_engine.registry import Registry
from tests.test_registry import base, runs  # noqa: F401  (module fixtures: a tiny model and two trained runs)
from tests.test_train_support import chat_records, write_jsonl

TRAIN = ["--max-steps", "1", "--batch-size", "4", "--r", "4", "--max-length", "96", "--no-general-eval",
         "--no-plot", "--save-every", "0", "--eval-every", "0"]


def published(runs, tmp_path, monkeypatch) -> Path:  # noqa: F811
    """A registry in tmp_path/reg holding chat@v1 (in production); $LORA_ENGINE_REGISTRY names an empty folder."""
    d = tmp_path / "reg"
    with Registry(d) as reg:
        reg.publish(runs[0], "chat")
        reg.promote("chat@v1", "production")
    monkeypatch.setenv(store.ROOT_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    return d


def test_registry_flag_in_generate_eval_and_export(base, runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    from lora_engine.eval import main as eval_main
    from lora_engine.export import main as export_main
    from lora_engine.generate import main as generate_main

    d = published(runs, tmp_path, monkeypatch)
    ref = "registry:chat@production"
    rc = run_cli(generate_main, ["--model", str(base), "--adapter", ref, "--prompt", "x"])
    assert rc == 2 and f"error: --adapter: no registry at {tmp_path / 'elsewhere'}" in capsys.readouterr().err
    generate_main(["--model", str(base), "--adapter", ref, "--registry", str(d), "--prompt", "Hi",
                   "--max-new-tokens", "2"])
    assert "loaded LoRA adapter" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "val.jsonl", chat_records(4))
    by_ref = eval_main(["--model", str(base), "--adapter", ref, "--registry", str(d), "--data", str(data),
                        "--no-general"])
    by_path = eval_main(["--model", str(base), "--adapter", str(runs[0] / "adapter"), "--data", str(data),
                         "--no-general"])
    assert by_ref["after"] == by_path["after"]
    out = export_main(["--model", str(base), "--adapter", "registry:chat@v1", "--registry", str(d),
                       "--out", str(tmp_path / "merged")])
    assert (Path(out) / "config.json").is_file()


def test_train_from_a_published_model_keeps_the_reference(base, runs, tmp_path, monkeypatch):  # noqa: F811
    from lora_engine.export import main as export_main
    from lora_engine.train.command import main as train

    d = published(runs, tmp_path, monkeypatch)
    run = shutil.copytree(runs[0], tmp_path / "run")
    export_main(["--model", str(base), "--adapter", str(run / "adapter"), "--out", str(run / "merged")])
    with Registry(d) as reg:
        reg.publish(run, "merged", artifact="merged")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    out = tmp_path / "again"
    assert train(["--model", "registry:merged@v1", "--registry", str(d), "--data", str(data), "--out", str(out),
                  *TRAIN]) == 0
    m = json.loads((out / "run.json").read_text())
    assert m["config"]["model"] == "registry:merged@v1" and m["status"] == "completed"
    assert m["base_model"]["sha256"] and all(str(d) in p for p in m["base_model"]["sha256"])  # the weights hashed are the registry's copy


def test_train_resume_from_a_registry_reference_says_what_is_missing(base, runs, tmp_path, monkeypatch,  # noqa: F811
                                                                      capsys):
    from lora_engine.train.command import main as train

    d = published(runs, tmp_path, monkeypatch)
    rc = train(["--resume", "registry:chat@v1", "--registry", str(d)])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("error: --resume registry:chat@v1: a published version holds the adapter (or model), config.json, "
            "run.json, metrics.jsonl and the data manifest, not a checkpoint (optimizer, scheduler and RNG state, "
            "data position), so training cannot continue from it; resume from the run it was published from, "
            f"--resume {runs[0].resolve()}, if that folder still exists") in err
    rc = train(["--resume", "registry:chat@v7", "--registry", str(d)])
    assert rc == 2 and "cannot continue from it (chat@v7: no such version (latest is v1))" in capsys.readouterr().err
