"""The registry: publish, list, show, diff, promote, rollback, history, verify, keys, and registry
references in load_adapter and the generate / eval / export commands.

The run folders come from real training runs of the tiny random model (2 steps each, once per module);
variants of them (another note in run.json, suite scores for the gate) are copies with run.json edited.
"""

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lora_engine.registry as store
from lora_engine.cli import run_cli
from lora_engine.io.digest import sha256_file
from lora_engine.registry import Registry, RegistryError, resolve_ref
from lora_engine.registry.command import main
from lora_engine.registry.history import digest
from tests.test_train_support import chat_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(folder):
    """conftest's tiny model with its tokenizer: the base every run here trains."""
    return folder


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """Two completed training runs that differ in their learning rate."""
    from lora_engine.train.command import main as train

    d = tmp_path_factory.mktemp("runs")
    data = write_jsonl(d / "chat.jsonl", chat_records(24))
    out = []
    for lr in ("0.005", "0.001"):
        run = d / f"lr{lr}"
        rc = train(["--model", str(base), "--data", str(data), "--out", str(run), "--max-steps", "2", "--batch-size",
                    "4", "--r", "4", "--max-length", "96", "--lr", lr, "--no-general-eval", "--no-plot",
                    "--save-every", "0", "--eval-every", "0"])
        assert rc == 0
        out.append(run)
    return out


def variant(run: Path, dest: Path, **changes) -> Path:
    """A copy of a run folder whose run.json has `changes` merged in (eval changes merged one level down)."""
    shutil.copytree(run, dest)
    m = json.loads((dest / "run.json").read_text())
    for k, v in changes.items():
        m[k] = dict(m[k], **v) if isinstance(v, dict) and isinstance(m.get(k), dict) else v
    (dest / "run.json").write_text(json.dumps(m))
    return dest


def cli(*args, capsys=None):
    rc = run_cli(main, [str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return rc, out


def test_publish_list_show_promote_rollback_history(runs, reg_dir, capsys):
    rc, out = cli("publish", runs[0], "--name", "chat", "--note", "first", capsys=capsys)
    assert rc == 0 and out.out.strip() == "chat@v1"
    rc, out = cli("publish", runs[1], "--name", "chat", capsys=capsys)
    assert rc == 0 and out.out.strip() == "chat@v2"
    assert (reg_dir / "registry.db").is_file()

    rc, out = cli("list", capsys=capsys)
    assert rc == 0 and [line.split()[:3] for line in out.out.splitlines()[1:]] == [["chat", "1", "adapter"],
                                                                                  ["chat", "2", "adapter"]]
    rc, out = cli("promote", "chat@v1", "--stage", "production", "--reason", "baseline", capsys=capsys)
    assert rc == 0 and "chat@v1 now holds production (was none)" in out.out
    rc, out = cli("promote", "chat@v2", "--stage", "production", capsys=capsys)
    assert rc == 0 and "chat@v2 now holds production (was v1)" in out.out
    cli("promote", "chat@v2", "--stage", "staging", capsys=capsys)

    rc, out = cli("show", "chat@production", "--json", capsys=capsys)
    shown = json.loads(out.out)
    assert rc == 0 and shown["name"] == "chat" and shown["version"] == 2 and shown["stage"] == "production"
    assert set(shown["stages"]) == {"production", "staging"}
    files = shown["sha256"]
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "run.json", "config.json",
            "data_manifest.json", "metrics.jsonl"} == set(files)
    assert files["adapter/adapter_model.safetensors"] == sha256_file(runs[1] / "adapter/adapter_model.safetensors")
    lin = shown["lineage"]
    assert lin["parent"] == 1 and lin["run_dir"] == str(runs[1].resolve())
    assert lin["base_model"]["sha256"] and lin["data"]["sha256"]  # base and data hashes from run.json
    assert shown["eval"]["before"]["target"]["loss"] > 0

    rc, out = cli("diff", "chat@v1", "chat@v2", capsys=capsys)
    assert rc == 0 and "config.lr: 0.005 -> 0.001" in out.out and "eval.after.target.loss" in out.out
    assert "config.r" not in out.out  # only what differs

    rc, out = cli("rollback", "chat", "--stage", "production", "--reason", "bad answers", capsys=capsys)
    assert rc == 0 and "rolled back from v2 to v1" in out.out
    with Registry() as reg:
        assert reg.show("chat@production")["version"] == 1 and reg.show("chat@staging")["version"] == 2
        hist = reg.history("chat")
    assert [(e["action"], e["stage"], e["from"], e["to"], e["reason"]) for e in hist] == [
        ("promote", "production", None, 1, "baseline"), ("promote", "production", 1, 2, None),
        ("promote", "staging", None, 2, None), ("rollback", "production", 2, 1, "bad answers")]
    assert all(e["who"] and e["time"] and not e["signed"] for e in hist)
    rc, out = cli("history", "chat", capsys=capsys)
    assert rc == 0 and len(out.out.splitlines()) == 5 and "bad answers" in out.out
    rc, out = cli("verify", capsys=capsys)
    assert rc == 0 and out.out.startswith("ok: 2 versions, 12 files, 0 problems")


def test_stored_files_are_read_only(runs, reg_dir):
    with Registry() as reg:
        reg.publish(runs[0], "chat")
    stored = [p for d in ("objects", "versions") for p in (reg_dir / d).rglob("*") if p.is_file()]
    assert len(stored) == 12
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in stored)


def test_publishing_the_same_content_twice_returns_the_existing_version(runs, reg_dir, tmp_path, capsys):
    assert cli("publish", runs[0], "--name", "chat", capsys=capsys)[1].out.strip() == "chat@v1"
    rc, out = cli("publish", runs[0], "--name", "chat", capsys=capsys)
    assert rc == 0 and out.out.strip() == "chat@v1 (already published: the same files)"
    # A copy elsewhere is still the same content; under another name it is a first version.
    copy = shutil.copytree(runs[0], tmp_path / "copy")
    with Registry() as reg:
        assert reg.publish(copy, "chat") == dict(reg.publish(runs[0], "chat"), existing=True)
        assert reg.publish(copy, "other")["ref"] == "other@v1"
        assert [v["version"] for v in reg.list("chat")] == [1]


PUBLISHER = """
import sys, time
from lora_engine.registry import Registry
root, run, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
with Registry(root) as reg:
    print(reg.publish(run, "chat")["version"])
"""


def test_processes_publishing_at_once_get_distinct_versions(runs, reg_dir, tmp_path):
    """Four processes released at the same instant on a fresh registry (creating it, too): each gets
    its own version, and every version holds its own files."""
    copies = [variant(runs[i % 2], tmp_path / f"c{i}", note=f"copy {i}") for i in range(4)]
    start = time.time() + 3.0  # after the interpreters have started
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(reg_dir), str(c), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in copies]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
    assert sorted(int(r[0]) for r in results) == [1, 2, 3, 4]
    with Registry(reg_dir) as reg:
        for c, (printed, _) in zip(copies, results):
            run_json = reg.version_dir("chat", int(printed)) / "run.json"
            assert run_json.read_bytes() == (c / "run.json").read_bytes()
        assert reg.verify()["ok"]


def _writable(p: Path) -> Path:
    os.chmod(p, 0o644)
    return p


def test_verify_names_a_modified_a_deleted_and_an_added_file(runs, reg_dir, capsys):
    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.publish(runs[1], "chat")
        v1, v2 = reg.version_dir("chat", 1), reg.version_dir("chat", 2)
    # Modified: one byte of v1's weights (a hard link: its object changes with it).
    w = _writable(v1 / "adapter/adapter_model.safetensors")
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    (v2 / "adapter/adapter_config.json").unlink()  # deleted
    (v2 / "adapter/extra.bin").write_bytes(b"x")  # added
    rc, out = cli("verify", capsys=capsys)
    problems = [line for line in out.out.splitlines() if line.startswith("FAILED: /")]
    assert rc == 1 and out.out.splitlines()[-1].startswith("FAILED: 2 versions, 12 files, 4 problems")
    assert any(f"{w}: modified (sha256 " in p for p in problems)
    assert any("/objects/" in p and ": modified" in p for p in problems)
    assert f"FAILED: {v2 / 'adapter/adapter_config.json'}: missing" in problems
    assert f"FAILED: {v2 / 'adapter/extra.bin'}: added (not part of chat@v2)" in problems
    # One version only: v1's problems and not v2's.
    rc, out = cli("verify", "chat@v1", capsys=capsys)
    assert rc == 1 and "extra.bin" not in out.out and "adapter_model.safetensors: modified" in out.out
    # A stray file among the objects, and a version folder the database does not know.
    (reg_dir / "objects/zz").mkdir()
    (reg_dir / "objects/zz/junk").write_bytes(b"y")
    shutil.copytree(v1, v1.parent / "v9")
    rc, out = cli("verify", capsys=capsys)
    assert rc == 1 and "objects/zz/junk: added" in out.out and "chat/v9: added (no such version recorded)" in out.out


def test_a_database_edit_of_the_recorded_hashes_is_caught(runs, reg_dir):
    """Swapping a file together with its recorded sha256 leaves the content digest (and, with a key,
    the signed promotion) telling."""
    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.promote("chat@v1", "production")
    db = sqlite3.connect(reg_dir / "registry.db")
    with db:
        db.execute("UPDATE files SET sha256=? WHERE path='run.json'", ("0" * 64,))
    db.close()
    with Registry() as reg:
        problems = reg.verify()["problems"]
    assert any("the recorded file hashes do not match its content digest" in p for p in problems)


def test_loading_a_registry_reference_verifies_it(base, runs, reg_dir):
    from lora_engine import load_adapter, load_model

    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.promote("chat@v1", "production")
    path = resolve_ref("registry:chat@production")
    assert path == reg_dir / "versions/chat/v1/adapter" and (path / "adapter_model.safetensors").is_file()
    assert resolve_ref("registry:chat@v1") == path == resolve_ref("registry:chat@latest")
    model = load_model(base)
    load_adapter(model, "registry:chat@v1", verbose=False)
    want = load_model(base)
    load_adapter(want, runs[0] / "adapter", verbose=False)
    assert all((p == q).all() for p, q in zip(model.state_dict().values(), want.state_dict().values()))
    _writable(path / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["q_proj"]}')
    with pytest.raises(RegistryError, match=r"registry:chat@production \(chat@v1\) failed verification, so it was "
                                            r"not loaded: .*adapter_config.json: modified"):
        load_adapter(load_model(base), "registry:chat@production", verbose=False)
    for ref, msg in (("registry:chat@v7", r"chat@v7: no such version \(latest is v1\)"),
                     ("registry:nope@v1", r"nope: no such model in the registry .* \(known: chat\)"),
                     ("registry:chat@staging", r"chat@staging: no version holds staging; promote one"),
                     ("registry:chat", r"is not a registry reference; write NAME@vN"),
                     ("registry:chat@prod", r"'prod' is neither a version")):
        with pytest.raises(RegistryError, match=msg):
            resolve_ref(ref)


def test_registry_references_in_generate_eval_and_export(base, runs, reg_dir, tmp_path, capsys):
    from lora_engine.eval import main as eval_main
    from lora_engine.export import main as export_main
    from lora_engine.generate import main as generate_main

    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.promote("chat@v1", "production")
    ref = "registry:chat@production"
    generate_main(["--model", str(base), "--adapter", ref, "--prompt", "Hi", "--max-new-tokens", "3"])
    assert "loaded LoRA adapter" in capsys.readouterr().err  # generate's log lines go to stderr, text to stdout
    data = write_jsonl(tmp_path / "val.jsonl", chat_records(4))
    by_ref = eval_main(["--model", str(base), "--adapter", ref, "--data", str(data), "--no-general"])
    by_path = eval_main(["--model", str(base), "--adapter", str(runs[0] / "adapter"), "--data", str(data),
                         "--no-general"])
    assert by_ref["after"] == by_path["after"] and by_ref["after"] != by_ref["before"]
    out = export_main(["--model", str(base), "--adapter", "registry:chat@v1", "--out", str(tmp_path / "merged")])
    assert (Path(out) / "config.json").is_file()
    # A bad reference is one `error:` line naming --adapter, before any model loads.
    rc = run_cli(generate_main, ["--model", str(tmp_path / "nothing"), "--adapter", "registry:chat@v5", "--prompt", "x"])
    assert rc == 2 and "error: --adapter: chat@v5: no such version (latest is v1)" in capsys.readouterr().err


def test_a_published_merged_model_loads_by_reference(base, runs, reg_dir, tmp_path):
    """A run folder holding a merged export (--artifact) is a version of kind model; load_model takes its reference."""
    from lora_engine import load_model
    from lora_engine.export import main as export_main

    run = shutil.copytree(runs[0], tmp_path / "run")
    export_main(["--model", str(base), "--adapter", str(run / "adapter"), "--out", str(run / "merged")])
    with Registry() as reg:
        assert reg.publish(run, "merged", artifact="merged")["ref"] == "merged@v1"
        assert reg.show("merged@v1")["kind"] == "model"
    model = load_model("registry:merged@v1")
    want = load_model(run / "merged")
    assert all((p == q).all() for p, q in zip(model.state_dict().values(), want.state_dict().values()))


# ---- keys ---------------------------------------------------------------------------------------------
def test_key_signs_promotions_and_verify_catches_a_forged_entry(runs, reg_dir, tmp_path, capsys):
    key = tmp_path / "registry.key"
    rc, out = cli("keygen", key, capsys=capsys)
    assert rc == 0 and "key fingerprint" in out.out and stat.S_IMODE(key.stat().st_mode) == 0o600
    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.publish(runs[1], "chat")
    assert cli("promote", "chat@v1", "--stage", "production", "--key-file", key, capsys=capsys)[0] == 0
    assert cli("--key-file", key, "promote", "chat@v2", "--stage", "production", capsys=capsys)[0] == 0
    # Once signed, the registry refuses promotions without the key, and with another key.
    rc, out = cli("rollback", "chat", "--stage", "production", capsys=capsys)
    assert rc == 2 and "restricted to the holders of its key" in out.err
    other = tmp_path / "other.key"
    store.keygen(other)
    rc, out = cli("rollback", "chat", "--stage", "production", "--key-file", other, capsys=capsys)
    assert rc == 2 and "is not this registry's" in out.err
    rc, out = cli("verify", "--key-file", key, capsys=capsys)
    assert rc == 0 and "signatures checked with key" in out.out
    # The first keyed write adopted the key (entry 1), then the two promotions: all signed.
    rc, out = cli("history", capsys=capsys)
    assert out.out.count("True") == 3 and out.out.splitlines()[1].split()[3] == "sign"

    # A forger who can write the database but lacks the key: entry 3's reason rewritten, with its
    # digest recomputed so that the chain holds; and an entry appended without a signature.
    db = sqlite3.connect(reg_dir / "registry.db")
    with db:
        body = json.loads(db.execute("SELECT body FROM history WHERE id=3").fetchone()[0])
        body["reason"] = "approved by the board"
        db.execute("UPDATE history SET body=?, digest=? WHERE id=3", (json.dumps(body), digest(body)))
        last = db.execute("SELECT digest FROM history WHERE id=3").fetchone()[0]
        v1 = db.execute("SELECT content FROM versions WHERE version=1").fetchone()[0]
        forged = dict(body, id=4, action="rollback", prev=last, content=v1, **{"from": 2, "to": 1})
        db.execute("INSERT INTO history VALUES (4, ?, ?, NULL)", (json.dumps(forged), digest(forged)))
    db.close()
    rc, out = cli("verify", "--key-file", key, capsys=capsys)
    assert rc == 1
    assert "FAILED: history entry 3: the signature does not match (forged, or signed with another key)" in out.out
    assert "FAILED: history entry 4: unsigned (written without the key)" in out.out
    # Without the key the chain still holds (the forger recomputed it): verify says it could not check.
    rc, out = cli("verify", capsys=capsys)
    assert rc == 0 and "signatures not checked (no key given)" in out.out


def test_an_edited_or_removed_history_entry_breaks_the_chain(runs, reg_dir):
    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.publish(runs[1], "chat")
        for v in (1, 2, 1):
            reg.promote(f"chat@v{v}", "staging")
    db = sqlite3.connect(reg_dir / "registry.db")
    with db:
        body = db.execute("SELECT body FROM history WHERE id=1").fetchone()[0]
        db.execute("UPDATE history SET body=? WHERE id=1", (body.replace('"reason": null', '"reason": "ok"'),))
        db.execute("DELETE FROM history WHERE id=2")
    db.close()
    with Registry() as reg:
        problems = reg.verify()["problems"]
    assert problems == ["history entry 1: its digest does not match its content (edited)",
                        "history entry 3: does not follow entry 2 (an entry was removed, inserted or reordered)"]


def test_key_file_must_be_private(tmp_path, reg_dir, capsys):
    key = tmp_path / "k"
    store.keygen(key)
    os.chmod(key, 0o640)
    rc, out = cli("list", "--key-file", key, capsys=capsys)
    assert rc == 2 and f"key file {key} has mode 0640: others can read or write it; run chmod 600 {key}" in out.err
    short = tmp_path / "short"
    short.write_text("abc")
    os.chmod(short, 0o600)
    with pytest.raises(RegistryError, match="holds 3 bytes; a key needs at least 32"):
        store.read_key(short)
    with pytest.raises(RegistryError, match="exists; a key is never overwritten"):
        store.keygen(key)
    with pytest.raises(RegistryError, match="does not exist; make one with"):
        store.read_key(tmp_path / "missing")


# ---- the gate -----------------------------------------------------------------------------------------
def test_gate_refuses_a_general_regression_and_force_is_recorded(runs, reg_dir, tmp_path, capsys):
    suite = lambda b, a: {"before": {"suite": {"general": {"score": b}}}, "after": {"suite": {"general": {"score": a}}}}
    fine = variant(runs[0], tmp_path / "fine", eval=suite(60.0, 58.5))
    worse = variant(runs[1], tmp_path / "worse", eval=suite(60.0, 57.0))
    with Registry() as reg:
        reg.publish(fine, "chat")
        reg.publish(worse, "chat")
    assert cli("promote", "chat@v1", "--stage", "production", capsys=capsys)[0] == 0  # 1.5 points: within 2
    rc, out = cli("promote", "chat@v2", "--stage", "production", capsys=capsys)
    assert rc == 2 and ("error: chat@v2: the general suite fell 3.0 points (60.0 -> 57.0), more than "
                        "--max-regression 2; retrain, or pass --force") in out.err
    assert cli("promote", "chat@v2", "--stage", "staging", "--max-regression", "3.5", capsys=capsys)[0] == 0
    rc, out = cli("promote", "chat@v2", "--stage", "production", "--force", "--reason", "hotfix", capsys=capsys)
    assert rc == 0 and "FORCED past the gate" in out.out
    with Registry() as reg:
        last = reg.history()[-1]
    assert last["forced"] and last["gate"]["drop"] == 3.0 and "more than --max-regression 2" in last["gate"]["message"]


# ---- command-line errors ---------------------------------------------------------------------------
def test_cli_errors_are_one_line(runs, reg_dir, tmp_path, capsys):
    rc, out = cli("list", capsys=capsys)
    assert rc == 2 and out.err.startswith(f"error: no registry at {reg_dir} (no registry.db)")
    assert not reg_dir.exists()  # reading does not create one
    cases = [
        (["publish", tmp_path, "--name", "chat"], "no run.json, so it is not a training run folder"),
        (["publish", runs[0], "--name", "bad name"], "name 'bad name': use letters, digits"),
        (["publish", runs[0], "--name", "chat", "--artifact", "nope"], "is neither an adapter folder"),
    ]
    interrupted = variant(runs[0], tmp_path / "interrupted", status="interrupted")
    cases.append((["publish", interrupted, "--name", "chat"], "the run's status is 'interrupted'; only completed"))
    for args, msg in cases:
        rc, out = cli(*args, capsys=capsys)
        assert rc == 2 and out.err.startswith("error: ") and msg in out.err and len(out.err.splitlines()) == 1, out.err
    cli("publish", runs[0], "--name", "chat", capsys=capsys)
    for args, msg in [
        (["show", "chat"], "'chat' is not a registry reference; write NAME@vN or NAME@STAGE"),
        (["show", "chat@v3"], "chat@v3: no such version (latest is v1)"),
        (["promote", "chat@production", "--stage", "staging"], "chat@production: no version holds production"),
        (["rollback", "chat", "--stage", "production"], "chat: production holds no version; there is nothing"),
        (["list", "ghost"], "ghost: no such model in the registry"),
        (["verify", "ghost@v1"], "ghost: no such model"),
    ]:
        rc, out = cli(*args, capsys=capsys)
        assert rc == 2 and out.err.startswith("error: ") and msg in out.err and len(out.err.splitlines()) == 1, out.err
    cli("promote", "chat@v1", "--stage", "production", capsys=capsys)
    rc, out = cli("promote", "chat@v1", "--stage", "production", capsys=capsys)
    assert rc == 2 and "chat@v1 already holds production" in out.err
    rc, out = cli("rollback", "chat", "--stage", "production", capsys=capsys)
    assert rc == 2 and "chat: production has held only v1; there is nothing to roll back to" in out.err
    with pytest.raises(SystemExit):
        main(["promote", "chat@v1", "--stage", "prod"])  # argparse's choices
    assert "invalid choice: 'prod'" in capsys.readouterr().err


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(store.ROOT_ENV, str(tmp_path / "a"))
    assert store.default_root() == tmp_path / "a"
    monkeypatch.delenv(store.ROOT_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert store.default_root() == tmp_path / "xdg/lora_engine/registry"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.default_root() == tmp_path / "home/.local/share/lora_engine/registry"


def test_the_command_runs_as_a_module(runs, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{store.ROOT_ENV: str(tmp_path / "r")})
    env.pop(store.KEY_ENV, None)
    run = lambda *a: subprocess.run([sys.executable, "-m", "lora_engine.registry", *map(str, a)], env=env,
                                    capture_output=True, text=True, timeout=120)
    p = run("publish", runs[0], "--name", "chat")
    assert p.returncode == 0 and p.stdout.strip() == "chat@v1", p.stderr
    p = run("show", "chat@v2")
    assert p.returncode == 2 and p.stderr.strip() == "error: chat@v2: no such version (latest is v1)"
