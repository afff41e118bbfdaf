"""registry --mlflow-register against the real MLflow on a sqlite:/// store in tmp_path (no server, no network):
the registered model, its versions, tags, the link to the training run and the stage aliases read back through
MlflowClient; an MLflow that refuses leaves our registry as it was, with one error line."""

from __future__ import annotations

import json
import sys

import pytest

from lora_engine.cli import CliError, run_cli
from lora_engine.registry import Registry
from lora_engine.registry.command import main
from tests.test_registry import variant
from tests.test_train_support import chat_records, write_jsonl

pytest.importorskip("mlflow", reason="a test extra (pyproject's test list); pip install mlflow-skinny")
pytest.importorskip("sqlalchemy", reason="a test extra: mlflow-skinny's sqlite store; pip install sqlalchemy alembic")


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One run reported to MLflow (sqlite store) and a copy of it with another note in run.json: (uri, runs)."""
    from lora_engine.train.command import main as train

    d = tmp_path_factory.mktemp("mlflow_runs")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    data = write_jsonl(d / "chat.jsonl", chat_records(24))
    run = d / "first"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)  # a sqlite store keeps the run's files under ./mlruns (MLflow's default artifact root)
        rc = train(["--model", str(folder), "--data", str(data), "--out", str(run), "--max-steps", "2", "--batch-size",
                    "4", "--r", "4", "--max-length", "96", "--no-general-eval", "--no-plot", "--save-every", "0",
                    "--eval-every", "0", "--report-to", "mlflow", "--mlflow-tracking-uri", uri])
    assert rc == 0
    return uri, [run, variant(run, d / "second", note="a copy")]


def cli(capsys, *args):
    rc = run_cli(main, [str(a) for a in args])
    return rc, capsys.readouterr()


def test_publish_registers_the_version_and_stages_move_the_alias(trained, reg_dir, capsys, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    _, runs = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a store of this test's own, not the training run's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment's URI, no flag
    rc, out = cli(capsys, "publish", runs[0], "--name", "chat", "--note", "first try", "--mlflow-register")
    assert rc == 0 and out.out.splitlines() == ["chat@v1", "MLflow: chat version 1"]
    c = MlflowClient(uri)
    mv = c.get_model_version("chat", "1")
    with Registry(reg_dir) as reg:
        shown = reg.show("chat@v1")
    assert mv.source == shown["path"] and mv.description == "first try"
    assert mv.tags == {"lora_engine.version": "chat@v1", "lora_engine.content_sha256": shown["content_sha256"],
                       "lora_engine.run_dir": str(runs[0].resolve()),
                       "lora_engine.data_sha256": shown["sha256"]["data_manifest.json"]}
    assert mv.run_id is None  # the training run logged to another store: nothing to link to here

    # publishing the same files again registers nothing new; another version, under --mlflow-model's name
    rc, out = cli(capsys, "publish", runs[0], "--name", "chat", "--mlflow-register")
    assert rc == 0 and out.out.splitlines() == ["chat@v1 (already published: the same files)", "MLflow: chat version 1"]
    rc, out = cli(capsys, "publish", runs[1], "--name", "chat", "--mlflow-register")
    assert rc == 0 and out.out.splitlines()[-1] == "MLflow: chat version 2"
    assert [v.version for v in c.search_model_versions("name = 'chat'")] in ([2, 1], [1, 2])

    rc, out = cli(capsys, "promote", "chat@v1", "--stage", "production", "--mlflow-register")
    assert rc == 0 and out.out.splitlines()[-1] == "MLflow: chat alias production -> version 1"
    cli(capsys, "promote", "chat@v2", "--stage", "production", "--mlflow-register")
    assert c.get_model_version_by_alias("chat", "production").tags["lora_engine.version"] == "chat@v2"
    rc, out = cli(capsys, "rollback", "chat", "--stage", "production", "--mlflow-register")
    assert rc == 0 and out.out.splitlines()[-1] == "MLflow: chat alias production -> version 1"
    assert c.get_model_version_by_alias("chat", "production").version == 1
    rc, _ = cli(capsys, "promote", "chat@v2", "--stage", "staging")  # not asked: MLflow untouched
    assert rc == 0 and "staging" not in c.get_registered_model("chat").aliases


def test_the_version_links_to_the_mlflow_run_that_trained_it(trained, reg_dir, capsys):
    from mlflow.tracking import MlflowClient

    uri, runs = trained
    rc, out = cli(capsys, "publish", runs[0], "--name", "chat", "--mlflow-register", "--mlflow-tracking-uri", uri,
                  "--mlflow-model", "chat-prod")
    assert rc == 0 and out.out.splitlines()[-1] == "MLflow: chat-prod version 1"
    c = MlflowClient(uri)
    mv = c.get_model_version("chat-prod", "1")
    run = c.get_run(mv.run_id)
    assert run.info.run_name == "first" and run.data.tags["lora_engine.run_dir"] == str(runs[0].resolve())


@pytest.mark.parametrize("bad", ["bogus://nowhere", "sqlite:///{blocked}/mlflow.db"])
def test_an_unusable_tracking_uri_stops_the_command_before_it_acts(trained, reg_dir, capsys, tmp_path, bad):
    _, runs = trained
    (tmp_path / "a-file").write_text("")  # a sqlite path under a file: its store cannot be made
    bad = bad.format(blocked=tmp_path / "a-file")
    rc, out = cli(capsys, "publish", runs[0], "--name", "chat", "--mlflow-register", "--mlflow-tracking-uri", bad)
    assert rc == 2 and out.out == "" and out.err.count("\n") == 1 and not (reg_dir / "registry.db").exists()
    assert out.err.startswith(f"error: --mlflow-tracking-uri {bad}: MLflow cannot use it (")
    assert out.err.rstrip().endswith("nothing was changed; give a sqlite:///path.db, file: or http(s):// URI")


def test_an_mlflow_failure_leaves_our_registry_as_it_was(trained, reg_dir, capsys, monkeypatch):
    """A server that refuses the connection (a closed local port; no retries, so the test is quick): MLflow fails
    only once it is used, after our publish or promotion is committed."""
    _, runs = trained
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = "http://127.0.0.1:9"
    rc, out = cli(capsys, "publish", runs[0], "--name", "chat", "--mlflow-register", "--mlflow-tracking-uri", uri)
    assert rc == 2 and out.out.strip() == "chat@v1" and out.err.count("\n") == 1
    assert out.err.startswith(f"error: chat@v1 is in the registry {reg_dir} (the source of truth, unchanged by "
                              f"this failure), but MLflow ({uri}) refused it: ")
    assert out.err.rstrip().endswith("fix the tracking URI and rerun the same command to register it")
    rc, out = cli(capsys, "verify")
    assert rc == 0 and out.out.splitlines()[-1].startswith("ok: 1 versions")
    rc, out = cli(capsys, "promote", "chat@v1", "--stage", "production", "--mlflow-register",
                  "--mlflow-tracking-uri", uri)
    assert rc == 2 and out.err.count("\n") == 1 and "chat@v1 is in the registry" in out.err
    rc, out = cli(capsys, "show", "chat@production", "--json")
    assert rc == 0 and json.loads(out.out)["version"] == 1  # the promotion stands


def test_without_mlflow_the_command_stops_before_it_acts(trained, reg_dir, capsys, monkeypatch):
    _, runs = trained
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import raises ImportError, as when not installed
    with pytest.raises(CliError, match=r"--mlflow-register: the mlflow package is not installed .*pip install "
                                        r"mlflow-skinny sqlalchemy alembic"):
        main(["publish", str(runs[0]), "--name", "chat", "--mlflow-register"])
    rc, out = cli(capsys, "publish", runs[0], "--name", "chat", "--mlflow-register")
    assert rc == 2 and out.err.count("\n") == 1 and out.out == ""
    assert not (reg_dir / "registry.db").exists()  # nothing published
