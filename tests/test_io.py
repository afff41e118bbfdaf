"""lora_engine.io: the streaming atomic writer, the streaming safetensors writer, and the strict
checkpoint loader with its per-tensor hook (on a small module, no model needed)."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_engine.io import atomic
from lora_engine.io.safetensors import (
    CheckpointError,
    StoredTensor,
    float_dtype,
    load_checkpoint,
    save_tensors,
    write_safetensors,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# ---- atomic_file -----------------------------------------------------------------------------------
def test_atomic_file_streams_chunks(tmp_path):
    with atomic.atomic_file(tmp_path / "out.bin") as f:
        for i in range(4):
            f.write(bytes([i]) * 1000)
        assert not (tmp_path / "out.bin").exists()  # only the temporary exists until the block ends
    assert (tmp_path / "out.bin").read_bytes() == b"".join(bytes([i]) * 1000 for i in range(4))
    assert _leftovers(tmp_path) == ["out.bin"]


def test_exception_mid_write_leaves_no_file_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"), atomic.atomic_file(tmp_path / "new.bin") as f:
        f.write(b"half of it")
        raise RuntimeError("disk on fire")
    assert _leftovers(tmp_path) == []


def test_exception_mid_write_keeps_the_old_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_file(tmp_path / "model.bin") as f:
        f.write(b"new, but interrupted")
        raise KeyboardInterrupt
    assert (tmp_path / "model.bin").read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["model.bin"]


def test_copy_file_is_atomic_and_gives_the_usual_mode(tmp_path):
    src = tmp_path / "src.json"
    src.write_text("{}")
    src.chmod(0o600)
    atomic.copy_file(src, tmp_path / "sub" / "dst.json")
    dst = tmp_path / "sub" / "dst.json"
    assert dst.read_text() == "{}" and dst.stat().st_mode & 0o777 != 0o600


# ---- write_safetensors -----------------------------------------------------------------------------
def _mixed():
    g = torch.Generator().manual_seed(0)
    return {
        "b.bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "a.f32": torch.randn(7, generator=g),
        "c.u8": torch.arange(5, dtype=torch.uint8),  # odd byte count before wider tensors would misalign them
        "d.bool": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5, dtype=torch.float64),
        "f.empty": torch.empty(0, 4, dtype=torch.float16),
        "g.i64": torch.tensor([-1, 2**40]),
    }


def test_written_file_reads_back_in_safetensors(tmp_path):
    tensors = _mixed()
    n = save_tensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    back = load_file(tmp_path / "t.safetensors")
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert n == sum(t.numel() * t.element_size() for t in tensors.values())
    header_len = int.from_bytes((tmp_path / "t.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "t.safetensors").read_bytes()[8:8 + header_len])
    assert header["__metadata__"] == {"format": "pt"} and header_len % 8 == 0
    for k, info in header.items():  # each tensor starts aligned to its item size
        if k != "__metadata__":
            assert info["data_offsets"][0] % tensors[k].element_size() == 0, k


def test_writer_makes_each_tensor_only_when_it_writes_it(tmp_path):
    made = []

    def get(name):
        assert made == sorted(made) and name not in made  # one at a time, in order, once each
        made.append(name)
        return torch.full((4,), float(len(made)))

    layout = {f"t{i}": (torch.float32, (4,)) for i in range(5)}
    write_safetensors(tmp_path / "s.safetensors", layout, get)
    assert made == sorted(layout)
    assert torch.equal(load_file(tmp_path / "s.safetensors")["t3"], torch.full((4,), 4.0))


def test_writer_rejects_a_tensor_that_breaks_its_layout_and_leaves_nothing(tmp_path):
    layout = {"a": (torch.float32, (2, 2)), "b": (torch.float32, (3,))}
    with pytest.raises(ValueError, match=r"write_safetensors: b is torch.float32 \(4,\), the layout says "
                                         r"torch.float32 \(3,\)"):
        write_safetensors(tmp_path / "x.safetensors", layout, lambda name: torch.zeros(layout[name][1] if name == "a"
                                                                                      else (4,)))
    assert _leftovers(tmp_path) == []


def test_float_dtype():
    assert float_dtype("bfloat16") is torch.bfloat16 and float_dtype("torch.float16") is torch.float16
    assert float_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="dtype 'int8' is not a floating-point torch dtype"):
        float_dtype("int8")
    with pytest.raises(ValueError, match="dtype 'add' is not a floating-point"):
        float_dtype("add")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, got 'float64'"):
        float_dtype("float64", choices=(torch.float32, torch.bfloat16))


# ---- load_checkpoint and its hook ------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2, bias=False)


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    ref = Tiny()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    return tmp_path


def _expected(m):
    return dict(m.state_dict(keep_vars=True))


def test_plain_load_reads_every_tensor_in_place(folder):
    m = Tiny()
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    load_checkpoint(folder, _expected(m))
    ref = load_file(folder / "model.safetensors")
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k]) and v.data_ptr() == ptrs[k], k  # read into the preallocated storage


def test_a_hook_claims_some_tensors(folder):
    m = Tiny()
    seen, claimed = [], {}

    def hook(t: StoredTensor) -> bool:
        seen.append(t.name)
        if t.name.startswith("a."):
            claimed[t.name] = t.read() * 2  # read, convert, keep: the default read is skipped
            return True
        return False

    before = m.a.weight.detach().clone()
    load_checkpoint(folder, _expected(m), hook)
    ref = load_file(folder / "model.safetensors")
    assert seen == ["a.bias", "a.weight", "b.weight"]
    assert torch.equal(claimed["a.weight"], 2 * ref["a.weight"])
    assert torch.equal(m.a.weight, before)  # claimed: not read into the parameter
    assert torch.equal(m.b.weight, ref["b.weight"])


def test_a_hook_may_claim_tensors_the_module_does_not_expect(folder):
    save_file({**load_file(folder / "model.safetensors"), "a.weight.scale": torch.ones(1)}, folder / "model.safetensors")
    m = Tiny()
    with pytest.raises(CheckpointError, match=r"unexpected tensor a\.weight\.scale in model\.safetensors"):
        load_checkpoint(folder, _expected(m))
    load_checkpoint(folder, _expected(m), lambda t: t.name == "a.weight.scale")


def test_strictness_holds_through_the_hook_path(folder):
    sd = load_file(folder / "model.safetensors")
    del sd["a.bias"]
    sd["b.weight"] = torch.zeros(2, 5)
    sd["c.weight"] = torch.zeros(1)
    save_file(sd, folder / "model.safetensors")
    seen = []

    def hook(t):
        seen.append(t.name)
        return False

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder, _expected(Tiny()), hook, what="the tiny model")
    msg = str(e.value)
    assert f"checkpoint {folder} does not match the tiny model" in msg
    assert "wrong shape for b.weight in model.safetensors: expected (2, 3), got (2, 5)" in msg
    assert "unexpected tensor c.weight in model.safetensors" in msg
    assert "1 tensors missing from model.safetensors: a.bias" in msg
    assert "b.weight" not in seen  # a wrong-shaped expected tensor never reaches the hook


def test_meta_placeholders_are_shape_checked_and_reported_missing(folder):
    sd = load_file(folder / "model.safetensors")
    sd["b.weight"] = torch.zeros(2, 5)
    save_file(sd, folder / "model.safetensors")
    m = Tiny()
    expected = _expected(m)
    expected["b.weight"] = torch.empty(2, 3, device="meta")
    expected["z.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder, expected, lambda t: t.name in ("b.weight", "z.weight"))
    assert "wrong shape for b.weight" in str(e.value) and "1 tensors missing from model.safetensors: z.weight" in str(e.value)


def test_an_unclaimed_meta_tensor_is_a_hook_bug(folder):
    expected = _expected(Tiny())
    expected["b.weight"] = torch.empty(2, 3, device="meta")
    with pytest.raises(RuntimeError, match="b.weight is expected on the meta device .* the hook did not claim it"):
        load_checkpoint(folder, expected)


def test_a_hook_that_raises_checkpoint_error_joins_the_report(folder):
    def hook(t):
        if t.name == "a.weight":
            raise CheckpointError(f"{t.file.name}: {t.name} is stored as {t.dtype}, the hook wants int8")
        return False

    sd = load_file(folder / "model.safetensors")
    sd["c.weight"] = torch.zeros(1)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder, _expected(Tiny()), hook, finish=lambda: ["finish found this too"])
    msg = str(e.value)
    assert "model.safetensors: a.weight is stored as torch.float32, the hook wants int8" in msg
    assert "unexpected tensor c.weight" in msg and "finish found this too" in msg  # the walk went on


def test_a_hook_that_raises_anything_else_propagates_naming_the_tensor(folder):
    def hook(t):
        if t.name == "b.weight":
            raise ZeroDivisionError("bad math")
        return False

    with pytest.raises(ZeroDivisionError, match="bad math") as e:
        load_checkpoint(folder, _expected(Tiny()), hook)
    assert any("while loading tensor b.weight from" in n for n in e.value.__notes__)


def test_skip_and_sharded_index(folder):
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file({"a.weight": sd["a.weight"], "a.bias": sd["a.bias"]}, folder / "one.safetensors")
    save_file({"b.weight": sd["b.weight"], "x.rotary_emb.inv_freq": torch.ones(2)}, folder / "two.safetensors")
    index = {"weight_map": {"a.weight": "one.safetensors", "a.bias": "one.safetensors",
                            "b.weight": "two.safetensors", "x.rotary_emb.inv_freq": "two.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    m = Tiny()
    expected = _expected(m)
    expected.pop("b.weight")
    load_checkpoint(folder, expected, skip={"b.weight"})  # ignored suffixes and skipped names pass unread
    assert torch.equal(m.a.weight, sd["a.weight"])


# ---- what a writer may replace, interrupted swaps, leftovers, a full disk ---------------------------
def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_folder_is_replaced_only_when_it_holds_what_the_writer_writes(tmp_path):
    owned = atomic.Owned("a widget folder", ("widget.json", "part-*.bin"), marker="widget.json")
    target = tmp_path / "w"
    for content in ({"widget.json": "1", "part-1.bin": "a", "part-2.bin": "b"}, {"widget.json": "2"}):
        with atomic.atomic_dir(target, owned) as tmp:
            for name, text in content.items():
                (tmp / name).write_text(text)
    assert _leftovers(target) == ["widget.json"] and _leftovers(tmp_path) == ["w"]
    (target / "notes.txt").write_text("mine")
    (target / "sub").mkdir()
    ran = []
    with pytest.raises(atomic.OutputError, match=r"w holds notes.txt, sub/: it is not a widget folder this command "
                                                 r"writes, so it is not replaced; choose another output path, or "
                                                 r"remove it yourself"), atomic.atomic_dir(target, owned):
        ran.append(True)
    assert not ran and _leftovers(target) == ["notes.txt", "sub", "widget.json"]  # refused before any work
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "part-1.bin").write_text("a")
    with pytest.raises(atomic.OutputError, match="other holds no widget.json"):
        atomic.check_dir_replaceable(tmp_path / "other", owned)
    (tmp_path / "file").write_text("x")
    with pytest.raises(atomic.OutputError, match="file is a file: it is not a widget folder"):
        atomic.check_dir_replaceable(tmp_path / "file", owned)


def test_without_owned_a_folder_is_replaced_only_by_one_with_at_least_its_entries(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_config.json").write_text("old")
    (target / "notes.txt").write_text("mine")
    refused = pytest.raises(atomic.OutputError, match="adapter holds notes.txt, which this write does not")
    with refused, atomic.atomic_dir(target) as tmp:
        (tmp / "adapter_config.json").write_text("new")
    assert (target / "adapter_config.json").read_text() == "old" and _leftovers(tmp_path) == ["adapter"]
    (target / "notes.txt").unlink()
    with atomic.atomic_dir(target) as tmp:
        (tmp / "adapter_config.json").write_text("new")
    assert (target / "adapter_config.json").read_text() == "new" and _leftovers(tmp_path) == ["adapter"]


def test_a_file_is_replaced_only_when_the_check_recognises_it(tmp_path):
    gguf = atomic.starts_with(b"GGUF")
    (tmp_path / "run.json").write_text("{}")
    refused = pytest.raises(atomic.OutputError, match="run.json exists and its content is not that: it is not a GGUF")
    with refused, atomic.atomic_file(tmp_path / "run.json", gguf, "a GGUF file") as f:
        f.write(b"GGUF new")
    assert (tmp_path / "run.json").read_text() == "{}" and _leftovers(tmp_path) == ["run.json"]
    (tmp_path / "m.gguf").write_bytes(b"GGUF old")
    with atomic.atomic_file(tmp_path / "m.gguf", gguf, "a GGUF file") as f:
        f.write(b"GGUF new")
    assert (tmp_path / "m.gguf").read_bytes() == b"GGUF new"
    with pytest.raises(atomic.OutputError, match="is a folder: it is not a GGUF file"):
        atomic.check_file_replaceable(tmp_path, gguf, "a GGUF file")


SWAP_KILLED = """
import os, sys
from pathlib import Path
from lora_engine.io import atomic
calls = [0]
real = os.rename
def rename(a, b):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os._exit(9)  # killed between two steps of the swap
    real(a, b)
atomic.os.rename = rename
atomic.shutil.rmtree = lambda p: os._exit(9)  # killed before the old folder is deleted
with atomic.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "v").write_text("new")
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_kill_anywhere_in_a_folder_swap_leaves_the_old_or_the_new_folder(tmp_path, kill_at):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "v").write_text("old")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", SWAP_KILLED, str(target), str(kill_at)], env=env)
    assert proc.returncode == 9
    atomic.recover_dir(target)  # what a reader does first; the next write does it too
    assert (target / "v").read_text() == ("old" if kill_at <= 2 else "new")
    assert _leftovers(tmp_path) == ["ckpt"]  # the aside folders and the dead writer's temporary are gone
    with atomic.atomic_dir(target) as tmp:
        (tmp / "v").write_text("newer")
    assert (target / "v").read_text() == "newer" and _leftovers(tmp_path) == ["ckpt"]


def test_leftovers_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".m.gguf.lora_engine-{dead}-abc_123x.tmp"
    stale_dir = tmp_path / f".out.lora_engine-{dead}-k2j4h5g6.tmp"
    running = tmp_path / f".m.gguf.lora_engine-{live}-zzzzzzzz.tmp"
    stale_file.write_bytes(b"half a model")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    running.write_bytes(b"being written")
    for mine in (".m.gguf.tmp", ".notes.old.tmp", "m.gguf.lora_engine-1-x.tmp"):
        (tmp_path / mine).write_text("a user's file")
    atomic.write_bytes(tmp_path / "m.gguf", b"GGUF")  # a write cleans its own target's leftovers
    assert not stale_file.exists() and stale_dir.exists() and running.exists()
    assert atomic.clean_temporaries(tmp_path) == [stale_dir]
    assert _leftovers(tmp_path) == [f".m.gguf.lora_engine-{live}-zzzzzzzz.tmp", ".m.gguf.tmp", ".notes.old.tmp",
                                    "m.gguf", "m.gguf.lora_engine-1-x.tmp"]


@pytest.mark.parametrize("error, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374"), "unexpected pos 4480"),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "file write failed"),
])
def test_a_full_or_read_only_disk_is_one_error_naming_the_path(tmp_path, error, message):
    refused = pytest.raises(atomic.OutputError, match=f"cannot write {tmp_path / 'ckpt'}: .*{message}.*free "
                                                      "space, or choose another output path")
    with refused, atomic.atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "state.pt").write_bytes(b"half")
        raise error
    with pytest.raises(atomic.OutputError, match=f"cannot write {tmp_path / 'f.bin'}: .*{message}"), \
            atomic.atomic_file(tmp_path / "f.bin") as f:
        f.write(b"half")
        raise error
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="a bug"), atomic.atomic_file(tmp_path / "f.bin"):
        raise RuntimeError("a bug, not the disk")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, which fails every write with ENOSPC")
def test_a_real_enospc_from_the_kernel(tmp_path):
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as f:
        f.write(b"x")
        f.flush()
    msg = atomic.disk_error(info.value, Path("/dev/full"))
    assert msg is not None and "no space left on the device" in str(msg)


# ---- hostile headers: CheckpointError naming the file and the tensor ------------------------------
def _raw_safetensors(path, header: dict, data: bytes = b"\0" * 64):
    import json
    import struct

    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, r"data_offsets must be \[begin, end\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, r"data_offsets must be \[begin, end\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"data_offsets must be \[begin, end\]"),
    ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"F32 \(3,\) needs 12 bytes, data_offsets give 8"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "dtype 'Q4' is not one of"),
    ([1, 2], "expected an object with dtype, shape and data_offsets"),
])
def test_malformed_header_entries(tmp_path, entry, match):
    from lora_engine.io.safetensors import CheckpointError, read_safetensors_header

    path = _raw_safetensors(tmp_path / "m.safetensors", {"w": entry})
    with pytest.raises(CheckpointError, match=rf"m.safetensors: corrupted entry for tensor 'w': {match}"):
        read_safetensors_header(path)


def test_overlapping_tensors_are_refused(tmp_path):
    from lora_engine.io.safetensors import CheckpointError, read_safetensors_header

    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = _raw_safetensors(tmp_path / "o.safetensors", header)
    with pytest.raises(CheckpointError, match=r"o.safetensors: tensors 'a' and 'b' overlap"):
        read_safetensors_header(path)
