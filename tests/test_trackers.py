"""--report-to: names, the missing-package error, and each backend's record read back with its own library: TensorBoard's
event reader, MlflowClient, W&B's offline run file (its protobuf records), trackio's local store."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
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
                                         ("mlflow,wandb", ("mlflow", "wandb")), ("trackio", ("trackio",))])
def test_report_to_values(value, want):
    assert trackers.parse_report_to(value) == want
    assert TrainConfig(report_to=value).report_to == (",".join(want) or "none")


@pytest.mark.parametrize("value", ["comet", "", "none,wandb", "tensorboard,,x"])
def test_report_to_refuses_unknown_trackers(value):
    with pytest.raises(ValueError, match=r"--report-to must be none or a comma-separated list of tensorboard, "
                                         r"mlflow, wandb, trackio, got"):
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


@pytest.mark.parametrize("backend", ["mlflow", "wandb", "tensorboard", "trackio"])
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


@pytest.mark.parametrize("where", ["flag", "env"])
def test_mlflow_run_holds_the_metrics_config_and_files(folder, data, tmp_path, monkeypatch, where):
    """On a sqlite:/// store (no server), from --mlflow-tracking-uri (over a $MLFLOW_TRACKING_URI that points
    elsewhere) or from the environment alone."""
    pytest.importorskip("mlflow", reason="a test extra (pyproject's test list); pip install mlflow-skinny")
    pytest.importorskip("sqlalchemy", reason="a test extra: mlflow-skinny's sqlite store; pip install sqlalchemy")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    decoy = tmp_path / "decoy.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy}" if where == "flag" else uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "configs-test")
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps the run's files under ./mlruns (MLflow's default artifact root)
    out = tmp_path / "run"
    flag = ["--mlflow-tracking-uri", uri] if where == "flag" else []
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "3", "--batch-size",
               "4", "--r", "4", "--max-length", "96", "--eval-every", "0", "--no-general-eval",
               "--report-to", "mlflow", *flag])
    assert rc == 0 and not decoy.exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("configs-test").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["lora_engine.run_dir"] == str(out.resolve())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("train/grad_norm", "grad_norm"),
                      ("train/tokens_per_second", "tokens_per_s")):
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert got == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in rows}, name
    assert {"train/epoch", "train/target_tokens_seen"} <= set(run.data.metrics)
    manifest = json.loads((out / "run.json").read_text())
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/perplexity")] == [
        (0, pytest.approx(manifest["eval"]["before"]["target"]["ppl"])),
        (3, pytest.approx(manifest["eval"]["after"]["target"]["ppl"]))]
    config = json.loads((out / "config.json").read_text())
    assert run.data.params == {k: str(v)[:500] for k, v in config.items()}  # the resolved config, every field
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "run.json", "config.yaml", "metrics.jsonl"} <= files
    if (out / "loss.png").is_file():  # matplotlib installed: the plot goes too
        assert "loss.png" in files
    assert (tmp_path / "mlruns").is_dir()
    local = Path(client.download_artifacts(run.info.run_id, "run.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == manifest


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file (run-<id>.wandb): LevelDB's log format as wandb writes it, a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last);
    a block's tail shorter than a chunk header is padding. wandb 0.31 ships no Python reader of its own."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(chunk)
            chunk = b""
    return out


def test_wandb_offline_run_holds_the_metrics_config_and_files(folder, data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="a test extra (pyproject's test list); pip install wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written under --out/wandb only
    monkeypatch.setenv("WANDB_PROJECT", "stream-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "3", "--batch-size",
               "4", "--r", "4", "--max-length", "96", "--eval-every", "0", "--no-general-eval", "--no-plot",
               "--report-to", "wandb"])
    assert rc == 0
    # run.finish() returns before wandb's service has written the whole file; a process ends with this teardown
    # (atexit), the test process does it here.
    wandb.teardown()
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, files, names = {}, {}, set(), []
    for raw in _wandb_records(run_file):
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "files":
            files |= {f.path for f in r.files.files}
        elif kind == "run":
            names.append((r.run.project, r.run.display_name))
    assert names[0] == ("stream-test", "run")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == {
        r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
    assert {s: h["train/learning_rate"] for s, h in history.items() if "train/learning_rate" in h} == {
        r["step"]: pytest.approx(r["lr"], rel=1e-6) for r in rows}
    run = json.loads((out / "run.json").read_text())
    assert history[0]["eval/loss"] == pytest.approx(run["eval"]["before"]["target"]["loss"], rel=1e-6)
    assert history[3]["eval/perplexity"] == pytest.approx(run["eval"]["after"]["target"]["ppl"], rel=1e-6)
    assert config["r"] == 4 and config["report_to"] == "wandb"
    assert {"run.json", "config.yaml", "metrics.jsonl"} <= files
    assert {p.name for p in run_file.parent.glob("files/*")} >= {"run.json", "config.yaml", "metrics.jsonl"}


_TRACKIO_READ = """
import json, sqlite3, sys
from trackio.sqlite_storage import SQLiteStorage
project = sys.argv[1]
(run,) = SQLiteStorage.get_runs(project)
with sqlite3.connect(SQLiteStorage.get_project_db_path(project)) as db:
    artifacts = sorted(name for (name,) in db.execute("select name from artifacts"))
print(json.dumps({"run": run, "logs": SQLiteStorage.get_logs(project, run), "artifacts": artifacts,
                  "config": SQLiteStorage.get_run_config(project, run)}))
"""


def test_trackio_local_store_holds_the_metrics_config_and_files(folder, data, tmp_path):
    """In subprocesses: trackio reads $TRACKIO_DIR once, as it is imported."""
    pytest.importorskip("trackio", reason="a test extra (pyproject's test list); pip install trackio")
    root = Path(__file__).resolve().parent.parent
    # Local store under tmp_path, and nothing that would send the run elsewhere (a Space, a server, the hub).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKIO_", "HF_"))}
    env.update(TRACKIO_DIR=str(tmp_path / "trackio"), TRACKIO_PROJECT="stream-test", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "lora_engine.train", "--model", str(folder), "--data", str(data), "--out",
                        str(out), "--max-steps", "3", "--batch-size", "4", "--r", "4", "--max-length", "96",
                        "--eval-every", "0", "--no-general-eval", "--no-plot", "--report-to", "trackio"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-c", _TRACKIO_READ, "stream-test"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["run"] == "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = got["logs"]
    assert {g["step"]: g["train/loss"] for g in logs if "train/loss" in g} == {
        r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
    run = json.loads((out / "run.json").read_text())
    evals = {g["step"]: g["eval/loss"] for g in logs if "eval/loss" in g}
    assert evals == {0: pytest.approx(run["eval"]["before"]["target"]["loss"], rel=1e-6),
                     3: pytest.approx(run["eval"]["after"]["target"]["loss"], rel=1e-6)}
    assert got["config"]["r"] == 4 and got["config"]["report_to"] == "trackio"
    assert {"run.json", "config.yaml", "metrics.jsonl"} <= {a.rsplit("-", 1)[-1] for a in got["artifacts"]}
