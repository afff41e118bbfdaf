"""The registry against a writer without the key, a hostile run folder, a crash mid-publish and damaged rows.

Each test is one defect of the registry as it was before it became a package: a history that could be
deleted or re-signed unnoticed, stage references loaded from unsigned tables, a gate reading an unhashed
record, symbolic links followed into world-readable objects, an interrupted publish reported as
tampering, and damaged rows ending in tracebacks.
"""

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_engine.registry as store
from lora_engine.cli import run_cli
from lora_engine.io.digest import sha256_file
from lora_engine.registry import Registry, RegistryError, resolve_ref
from lora_engine.registry.command import main
from lora_engine.registry.history import digest
from tests.test_registry import ROOT, base, runs, variant  # noqa: F401  (module fixtures: two trained runs)


@pytest.fixture
def key(tmp_path):
    k = tmp_path / "registry.key"
    store.keygen(k)
    return k


def cli(capsys, *args):
    rc = run_cli(main, [str(a) for a in args])
    return rc, capsys.readouterr()


def sql(reg_dir: Path, *statements):
    db = sqlite3.connect(reg_dir / "registry.db")
    with db:
        for s in statements:
            db.execute(*s) if isinstance(s, tuple) else db.execute(s)
    db.close()


def keyed(runs, key):  # noqa: F811
    """chat@v1 and chat@v2 published; v1 promoted to production with the key, then v2 to staging."""
    with Registry(key_file=key) as reg:
        reg.publish(runs[0], "chat")
        reg.publish(runs[1], "chat")
        reg.promote("chat@v1", "production")
        reg.promote("chat@v2", "staging")


# ---- the history with a key ---------------------------------------------------------------------------
def test_deleting_the_whole_history_is_caught_with_the_key(runs, reg_dir, key, capsys):  # noqa: F811
    keyed(runs, key)
    sql(reg_dir, "DELETE FROM history")
    # Without the key nothing can tell (there is nothing left to check), so the forger's promotion goes in...
    assert cli(capsys, "promote", "chat@v2", "--stage", "production")[0] == 0
    # ...but whoever holds the key sees it, and refuses to build on it or to load from it.
    rc, out = cli(capsys, "verify", "--key-file", key)
    assert rc == 1 and "history: no entry adopts key" in out.out and "the history was deleted" in out.out
    rc, out = cli(capsys, "promote", "chat@v1", "--stage", "staging", "--key-file", key)
    assert rc == 2 and "the history does not verify, so it takes no new entry" in out.err
    with Registry(key_file=key) as reg, pytest.raises(RegistryError, match="history does not verify, so no stage "
                                                                           "is trusted"):
        reg.resolve("registry:chat@production")


@pytest.mark.parametrize("entry", [1, 2])
def test_a_cleared_signature_is_caught_even_before_any_other_signed_entry(runs, reg_dir, key, capsys,  # noqa: F811
                                                                          entry):
    keyed(runs, key)
    sql(reg_dir, ("UPDATE history SET signature=NULL WHERE id=?", (entry,)))
    rc, out = cli(capsys, "verify", "--key-file", key)
    assert rc == 1 and f"FAILED: history entry {entry}: unsigned (written without the key)" in out.out


def test_an_entry_rewritten_with_its_digest_recomputed_and_unsigned_is_caught(runs, reg_dir, key,  # noqa: F811
                                                                              capsys):
    keyed(runs, key)
    db = sqlite3.connect(reg_dir / "registry.db")
    body = json.loads(db.execute("SELECT body FROM history WHERE id=3").fetchone()[0])
    db.close()
    body["reason"] = "approved"
    sql(reg_dir, ("UPDATE history SET body=?, digest=?, signature=NULL WHERE id=3", (json.dumps(body), digest(body))))
    rc, out = cli(capsys, "verify", "--key-file", key)
    assert rc == 1 and "history entry 3: unsigned" in out.out
    rc, out = cli(capsys, "rollback", "chat", "--stage", "production", "--key-file", key)
    assert rc == 2 and "history entry 3: unsigned" in out.err


def test_the_key_is_not_an_editable_flag(runs, reg_dir, key, capsys):  # noqa: F811
    """The old registry kept "this registry has a key" in the meta table: deleting that row let anyone
    promote unsigned. Now the adoption is the signed first entry of the history."""
    keyed(runs, key)
    sql(reg_dir, "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)", "DELETE FROM meta")
    rc, out = cli(capsys, "promote", "chat@v2", "--stage", "production")
    assert rc == 2 and "restricted to the holders of its key" in out.err


def test_sign_adopts_the_key_for_a_history_that_predates_it(runs, reg_dir, key, capsys):  # noqa: F811
    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.promote("chat@v1", "production")
    rc, out = cli(capsys, "verify", "--key-file", key)
    assert rc == 1 and "it predates the key" in out.out and "registry sign" in out.out
    rc, out = cli(capsys, "promote", "chat@v1", "--stage", "staging", "--key-file", key)
    assert rc == 2 and "no entry adopts key" in out.err
    rc, out = cli(capsys, "--key-file", key, "sign", "--reason", "the key arrives")
    assert rc == 0 and "history entry 2: the registry adopts key" in out.out
    assert cli(capsys, "verify", "--key-file", key)[0] == 0
    rc, out = cli(capsys, "sign", "--key-file", key)
    assert rc == 2 and "already adopts key" in out.err
    rc, out = cli(capsys, "sign")
    assert rc == 2 and "registry sign needs the key" in out.err
    assert cli(capsys, "promote", "chat@v1", "--stage", "staging")[0] == 2  # without the key: refused now


# ---- stage references and the gate -----------------------------------------------------------------
def swap_adapter(reg_dir: Path, src: Path, name="chat", version=1):
    """What a writer without the key can do to a version: replace its adapter weights with another file and
    rewrite every recorded hash (the file's, and the version's content digest) to match."""
    reg = Registry(reg_dir)
    files = reg.files(name, version)
    reg.close()
    new = sha256_file(src)
    files["adapter/adapter_model.safetensors"] = new
    obj = reg_dir / "objects" / new[:2] / new
    obj.parent.mkdir(exist_ok=True)
    shutil.copyfile(src, obj)
    target = reg_dir / f"versions/{name}/v{version}/adapter/adapter_model.safetensors"
    target.unlink()
    shutil.copyfile(src, target)
    sql(reg_dir, ("UPDATE files SET sha256=? WHERE name=? AND version=? AND path='adapter/adapter_model.safetensors'",
                  (new, name, version)),
        ("UPDATE versions SET content=? WHERE name=? AND version=?", (store.content_digest(files), name, version)))


def test_a_swapped_adapter_with_rewritten_hashes_does_not_load_by_stage(runs, reg_dir, key, tmp_path):  # noqa: F811
    keyed(runs, key)
    assert resolve_ref("registry:chat@production") == reg_dir / "versions/chat/v1/adapter"
    swap_adapter(reg_dir, runs[1] / "adapter/adapter_model.safetensors")
    # The files match the tables now; the promotion's signed content digest does not.
    with pytest.raises(RegistryError, match=r"chat@production: the registry's history does not verify.*"
                                            r"chat@v1's content is not what was promoted"):
        resolve_ref("registry:chat@production")
    with pytest.raises(RegistryError, match="content is not what was promoted"), Registry(key_file=key) as reg:
        reg.resolve("registry:chat@v1")


def test_the_gate_reads_the_evaluation_inside_the_hashed_content(runs, reg_dir, tmp_path, capsys):  # noqa: F811
    suite = {"before": {"suite": {"general": {"score": 60.0}}}, "after": {"suite": {"general": {"score": 50.0}}}}
    worse = variant(runs[0], tmp_path / "worse", eval=suite)
    with Registry() as reg:
        reg.publish(worse, "chat")
    # The unhashed record edited to hide the regression: the gate does not read it.
    db = sqlite3.connect(reg_dir / "registry.db")
    record = json.loads(db.execute("SELECT record FROM versions").fetchone()[0])
    db.close()
    record["eval"]["after"]["suite"]["general"]["score"] = 60.0
    sql(reg_dir, ("UPDATE versions SET record=?", (json.dumps(record),)))
    rc, out = cli(capsys, "promote", "chat@v1", "--stage", "production")
    assert rc == 2 and "the general suite fell 10.0 points" in out.err
    rc, out = cli(capsys, "show", "chat@v1", "--json")
    assert json.loads(out.out)["eval"]["after"]["suite"]["general"]["score"] == 50.0


# ---- publish ----------------------------------------------------------------------------------------
def test_publish_refuses_a_symbolic_link_instead_of_following_it(runs, reg_dir, tmp_path):  # noqa: F811
    secret = tmp_path / "secret"
    secret.write_text("private key material")
    os.chmod(secret, 0o600)
    run = shutil.copytree(runs[0], tmp_path / "run")
    (run / "adapter/notes.txt").symlink_to(secret)
    with Registry() as reg:
        with pytest.raises(RegistryError, match=rf"adapter/notes.txt is a symbolic link \(to {secret}\); publish "
                                                "stores regular files only and never follows a link"):
            reg.publish(run, "chat")
        assert reg.list() == []
    (run / "adapter/notes.txt").unlink()
    (run / "run.json").rename(run / "real.json")
    (run / "run.json").symlink_to(run / "real.json")
    with Registry() as reg, pytest.raises(RegistryError, match="run.json is a symbolic link"):
        reg.publish(run, "chat")
    stored = [p for p in (reg_dir / "objects").rglob("*") if p.is_file()]
    assert not any(p.read_bytes() == b"private key material" for p in stored)


def test_publish_refuses_a_run_json_of_the_wrong_shape(runs, reg_dir, tmp_path):  # noqa: F811
    run = variant(runs[0], tmp_path / "run", data=[1, 2])
    with Registry() as reg, pytest.raises(RegistryError, match=r"run.json: data is list, expected an object"):
        reg.publish(run, "chat")


def test_publish_keeps_the_sources_restrictive_modes(runs, reg_dir, tmp_path):  # noqa: F811
    run = shutil.copytree(runs[0], tmp_path / "run")
    os.chmod(run / "adapter/adapter_model.safetensors", 0o600)
    os.chmod(run / "run.json", 0o640)
    with Registry() as reg:
        reg.publish(run, "chat")
        v = reg.version_dir("chat", 1)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(v / "adapter/adapter_model.safetensors") == 0o400
    assert mode(v / "run.json") == 0o440 and mode(v / "data_manifest.json") == 0o440
    assert mode(v / "adapter/adapter_config.json") == 0o444 & ~os.umask(os.umask(0))


CRASH = """
import os, sys
from lora_engine.registry import Registry, objects
root, run, where = sys.argv[1:4]
if where == "materialise":  # killed while linking the version's files, before the commit
    real = os.link
    def link(a, b):
        if "versions" in str(b) and ".tmp" in str(b):
            os._exit(9)
        return real(a, b)
    os.link = link
else:  # killed after the commit, before the folder has its name
    objects.finish = lambda *a: os._exit(9)
Registry(root).publish(run, "chat")
"""


@pytest.mark.parametrize("where", ["materialise", "finish"])
def test_a_crash_mid_publish_is_not_reported_as_tampering(runs, reg_dir, tmp_path, capsys, where):  # noqa: F811
    with Registry() as reg:
        reg.publish(runs[0], "chat")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", CRASH, str(reg_dir), str(runs[1]), where], env=env, timeout=120,
                       capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    assert list((reg_dir / "versions/chat").glob(".v2.tmp"))  # the crash left its pending folder
    rc, out = cli(capsys, "verify")
    assert rc == 0, out.out
    if where == "materialise":
        assert "removed, left by an interrupted publish of chat@v2" in out.out
        assert out.out.splitlines()[-1].startswith("ok: 1 versions")
        assert Registry().publish(runs[1], "chat")["ref"] == "chat@v2"  # the publish can simply be run again
    else:
        assert "chat@v2: an interrupted publish had recorded it; its folder is now in place" in out.out
        assert out.out.splitlines()[-1].startswith("ok: 2 versions")
    assert resolve_ref("registry:chat@v2") == reg_dir / "versions/chat/v2/adapter"
    assert not list((reg_dir / "versions/chat").glob(".v*.tmp"))


def test_a_recorded_version_left_under_its_pending_name_still_resolves(runs, reg_dir):  # noqa: F811
    with Registry() as reg:
        reg.publish(runs[0], "chat")
    os.rename(reg_dir / "versions/chat/v1", reg_dir / "versions/chat/.v1.tmp")  # as a crash after the commit leaves it
    assert resolve_ref("registry:chat@v1") == reg_dir / "versions/chat/v1/adapter"


# ---- damaged rows -------------------------------------------------------------------------------------
@pytest.mark.parametrize("statements, msg", [
    (["UPDATE versions SET version='three'"], r"table versions, row 1: version is 'three', expected int"),
    (["UPDATE versions SET record='{not json'"], r"table versions, row 1 \(chat@v1\): record is not valid JSON"),
    (["UPDATE versions SET record='[1, 2]'"], r"record is a JSON list, expected an object"),
    (["UPDATE versions SET kind=7"], r"row 1 \(chat@v1\): kind is '7', expected one of adapter, model"),
    (["UPDATE versions SET kind=x'07'"], r"row 1 \(chat@v1\): kind is b'\\x07', expected str"),
    (["UPDATE files SET path='../../../etc/passwd' WHERE path='run.json'"],
     r"table files, row \d+: path '../../../etc/passwd' is not a plain relative path"),
    (["UPDATE files SET sha256=x'00' WHERE path='run.json'"],
     r"table files, row \d+: sha256 is b'\\x00', expected str"),
    (["CREATE TABLE v2 AS SELECT name, version, kind, content, created, note, parent FROM versions",
      "DROP TABLE versions", "ALTER TABLE v2 RENAME TO versions"], r"has no column 'record' \(the table was altered\)"),
    (["ALTER TABLE files RENAME COLUMN name TO n"], r"table files: the database cannot be read \(no such column: name\)"),
])
def test_a_damaged_row_is_one_error_naming_it(runs, reg_dir, capsys, statements, msg):  # noqa: F811
    with Registry() as reg:
        reg.publish(runs[0], "chat")
    sql(reg_dir, *statements)
    with pytest.raises(RegistryError, match=msg):
        resolve_ref("registry:chat@v1")
    rc, out = cli(capsys, "show", "chat@v1")
    assert rc == 2 and out.err.startswith("error: ") and len(out.err.splitlines()) == 1, out.err


def test_a_damaged_history_entry_is_reported_by_verify_and_refused_by_promote(runs, reg_dir, capsys):  # noqa: F811
    with Registry() as reg:
        reg.publish(runs[0], "chat")
        reg.promote("chat@v1", "staging")
    sql(reg_dir, "UPDATE history SET body='{\"action\": \"promote\", \"name\": \"chat\", \"stage\": \"staging\", "
                 "\"to\": \"1\"}'")
    rc, out = cli(capsys, "verify")
    assert rc == 1 and "FAILED: history entry 1: 'to' is '1', expected a version number (edited)" in out.out
    rc, out = cli(capsys, "promote", "chat@v1", "--stage", "production")
    assert rc == 2 and "history entry 1: 'to' is '1'" in out.err and len(out.err.splitlines()) == 1


def test_a_file_that_is_not_a_database_is_one_error(tmp_path, capsys):
    d = tmp_path / "reg"
    d.mkdir()
    (d / "registry.db").write_bytes(b"this is not sqlite" * 100)
    rc, out = cli(capsys, "list", "--registry", d)
    assert rc == 2 and "registry.db: the registry's database cannot be read" in out.err


_VALUES = st.one_of(
    st.none(), st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(), st.text(max_size=20),
    st.binary(max_size=8),
    st.sampled_from(["{", "[]", "null", '"x"', "{}", "[" * 3000, '{"action": "promote"}', "../x", "a" * 64,
                     '{"action": "promote", "name": "chat", "stage": "staging", "to": 1}',
                     '{"action": "sign", "key": "00"}', '{"eval": [], "run_dir": 3}']),
    st.dictionaries(st.sampled_from(["action", "name", "stage", "to", "from", "id", "prev", "content", "eval"]),
                    st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=8)), max_size=6).map(json.dumps),
)
_COLUMNS = {"versions": ["name", "version", "kind", "content", "created", "note", "parent", "record"],
            "files": ["name", "version", "path", "sha256", "size"], "history": ["id", "body", "digest", "signature"]}


@pytest.fixture(scope="module")
def published(runs, tmp_path_factory):  # noqa: F811
    """A registry holding chat@v1 (in staging) and chat@v2."""
    d = tmp_path_factory.mktemp("published") / "reg"
    with Registry(d) as reg:
        reg.publish(runs[0], "chat")
        reg.publish(runs[1], "chat")
        reg.promote("chat@v1", "staging")
    return d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(table=st.sampled_from(sorted(_COLUMNS)), data=st.data(), drop=st.booleans())
def test_malformed_rows_raise_only_registry_errors(published, table, data, drop):
    """Any value in any column of any row (or a column gone): every operation either works or raises
    RegistryError; nothing else escapes."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "reg"
        shutil.copytree(published, d)
        column = data.draw(st.sampled_from(_COLUMNS[table]))
        db = sqlite3.connect(d / "registry.db")
        with db:  # the table without its constraints (a writer may recreate it so), then the damage
            db.execute(f"CREATE TABLE t AS SELECT * FROM {table}")
            db.execute(f"DROP TABLE {table}")
            db.execute(f"ALTER TABLE t RENAME TO {table}")
            if drop:
                db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
            else:
                rowid = data.draw(st.integers(1, 3))
                db.execute(f"UPDATE {table} SET {column}=? WHERE rowid=?", (data.draw(_VALUES), rowid))
        db.close()
        for op in (lambda r: r.list(), lambda r: r.history(), lambda r: r.verify(), lambda r: r.show("chat@v1"),
                   lambda r: r.show("chat@staging"), lambda r: r.diff("chat@v1", "chat@v2"),
                   lambda r: r.resolve("registry:chat@v2"), lambda r: r.promote("chat@v2", "production"),
                   lambda r: r.rollback("chat", "staging"), lambda r: r.verify("chat")):
            try:
                with Registry(d) as reg:
                    op(reg)
            except RegistryError:
                pass
