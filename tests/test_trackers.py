"""--report-to: names, the missing-package error, TensorBoard read back with tensorboard's own reader."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

from lora_engine.cli import CliError
from lora_engine.train import trackers
from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig


@pytest.mark.parametrize("value, want", [("none", ()), ("tensorboard", ("tensorboard",)),
                                         ("TensorBoard, wandb,tensorboard", ("tensorboard", "wandb")),
                                         ("mlflow,wandb", ("mlflow", "wandb"))])
def test_report_to_values(value, want):
    assert trackers.parse_report_to(value) == want
    assert TrainConfig(report_to=value).report_to == (",".join(want) or "none")


@pytest.mark.parametrize("value", ["comet", "", "none,wandb", "tensorboard,,x"])
def test_report_to_refuses_unknown_trackers(value):
    with pytest.raises(ValueError, match=r"--report-to must be none or a comma-separated list of tensorboard, "
                                         r"mlflow, wandb, got"):
        TrainConfig(report_to=value)


def test_metric_names_are_the_dashboards():
    row = {"step": 3, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens": 100, "targets": 40, "tokens_per_s": 50.0,
           "epoch": 1, "skipped": False, "target_tokens_seen": 120, "val_loss": math.log(7.0),
           "val_reward_accuracy": 0.75, "rewards/chosen": 0.25}
    assert trackers.train_metrics(row) == {
        "train/loss": 2.0, "train/learning_rate": 1e-3, "train/grad_norm": 0.5, "train/tokens_per_second": 50.0,
        "train/epoch": 1.0, "train/target_tokens_seen": 120.0, "eval/loss": math.log(7.0),
        "eval/perplexity": pytest.approx(7.0), "eval/reward_accuracy": 0.75, "train/rewards/chosen": 0.25}
    ev = {"target": {"loss": 1.0, "ppl": 2.7}, "general": {"loss": 3.0, "ppl": 20.0},
          "preference": {"loss": 0.6, "reward_accuracy": 0.5}, "suite": {"general": {"score": 1.0}}}
    assert trackers.eval_metrics(ev) == {"eval/loss": 1.0, "eval/perplexity": 2.7, "eval/general_loss": 3.0,
                                         "eval/general_perplexity": 20.0, "eval/preference_loss": 0.6,
                                         "eval/preference_reward_accuracy": 0.5}


@pytest.mark.parametrize("backend", ["mlflow", "wandb", "tensorboard"])
def test_a_missing_backend_is_one_line_naming_the_package(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # import raises ImportError, as when not installed
    with pytest.raises(CliError, match=rf"--report-to {backend}: the {backend} package is not installed .*"
                                       rf"pip install {backend}"):
        trackers.require(backend)


def test_a_missing_backend_stops_the_run_before_it_starts(monkeypatch, folder, data, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--report-to", "wandb,tensorboard"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install wandb" in err
    assert not out.exists()
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--report-to", "wandb", "--dry-run"])
    assert rc == 2 and not out.exists()


class _Recorder:
    """A backend that records the calls it gets (the fan-out and the ranks are ours to test)."""

    def __init__(self, out, run_name):
        self.calls = [("init", Path(out).name, run_name)]

    def log(self, metrics, step):
        self.calls.append(("log", dict(metrics), step))

    def log_config(self, config):
        self.calls.append(("config", config["r"]))

    def log_artifact(self, path):
        self.calls.append(("artifact", path.name))

    def close(self):
        self.calls.append(("close",))


def test_only_rank_0_reports(monkeypatch, tmp_path):
    made = []
    monkeypatch.setitem(trackers._CLASSES, "wandb", lambda *a: made.append(_Recorder(*a)) or made[-1])
    for main_rank in (False, True):
        r = types.SimpleNamespace(cfg=TrainConfig(report_to="wandb", r=4), out=tmp_path / "run",
                                  dist=types.SimpleNamespace(main=main_rank),
                                  manifest={"status": "completed", "eval": {"before": {"target": {"loss": 1.0}},
                                                                            "after": {"target": {"loss": 0.5}}}})
        with trackers.opened(r) as tr:
            tr.log({"train/loss": 1.0}, 1)
            (tmp_path / "run").mkdir(exist_ok=True)
            (tmp_path / "run" / "run.json").write_text("{}")
            trackers.report_end(tr, r, 1)
    assert len(made) == 1  # rank 0 only
    assert made[0].calls == [("init", "run", "run"), ("config", 4), ("log", {"eval/loss": 1.0}, 0),
                             ("log", {"train/loss": 1.0}, 1), ("log", {"eval/loss": 0.5}, 1), ("artifact", "run.json"),
                             ("close",)]


def test_tensorboard_events_hold_the_run_metrics(folder, data, tmp_path):
    pytest.importorskip("tensorboard", reason="a test extra (pyproject's test list); pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "4", "--batch-size",
               "4", "--r", "4", "--max-length", "96", "--eval-every", "2", "--no-general-eval", "--no-plot",
               "--report-to", "tensorboard"])
    assert rc == 0
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = ea.Tags()["scalars"]
    for name in ("train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "train/tokens_per_second",
                 "eval/loss", "eval/perplexity"):
        assert name in scalars, name
    loss = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert loss == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
    lr = {e.step: e.value for e in ea.Scalars("train/learning_rate")}
    assert lr == {r["step"]: pytest.approx(r["lr"], rel=1e-6) for r in rows}
    ev = {e.step: e.value for e in ea.Scalars("eval/loss")}
    run = json.loads((out / "run.json").read_text())
    assert ev[0] == pytest.approx(run["eval"]["before"]["target"]["loss"], rel=1e-6)
    assert ev[4] == pytest.approx(run["eval"]["after"]["target"]["loss"], rel=1e-6)
    assert ev[2] == pytest.approx(rows[1]["val_loss"], rel=1e-6)
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()  # the text plugin's record
    assert json.loads(text.strip("`\n")) == json.loads((out / "config.json").read_text())


def test_mlflow_run_holds_the_metrics_config_and_files(folder, data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="a test extra (pyproject's test list); pip install mlflow-skinny")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # sqlite:/// needs sqlalchemy, not in mlflow-skinny
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "configs-test")
    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "3", "--batch-size",
               "4", "--r", "4", "--max-length", "96", "--eval-every", "0", "--no-general-eval", "--no-plot",
               "--report-to", "mlflow"])
    assert rc == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("configs-test").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert loss == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
    after = json.loads((out / "run.json").read_text())["eval"]["after"]["target"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/perplexity")] == [
        (0, pytest.approx(json.loads((out / "run.json").read_text())["eval"]["before"]["target"]["ppl"])),
        (3, pytest.approx(after["ppl"]))]
    assert run.data.params["r"] == "4" and run.data.params["report_to"] == "mlflow"
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "run.json", "config.yaml", "metrics.jsonl"} <= files
