"""The library's folder writers replace only what they wrote: save_adapter, save_quantized (NF4) and
Tokenizer.save refuse a run folder or any folder holding a user's file, deleting nothing, and
rewrite their own output; an adapter a kill left half-swapped is put back by the next read.
(save_model's own refusals are in tests/test_export.py; the swap itself in tests/test_io.py.)"""

import os

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_adapter, load_model, save_adapter
from lora_engine.io.atomic import OutputError
from lora_engine.lora.adapter import read_adapter_config
from lora_engine.lora.layers import lora_layers
from lora_engine.models.tokenizer import load_tokenizer
from lora_engine.quant.checkpoint import save_quantized
from tests.conftest import make_run_folder


def listing(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def _lora(base):
    model = apply_lora(load_model(base, verbose=False), LoraConfig(r=2, lora_alpha=4), verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(std=0.2)
    return model


def _save_adapter(base, folder):
    save_adapter(_lora(base), folder)


def _save_nf4(base, folder):
    save_quantized(load_model(base, quantize="nf4", verbose=False), folder)


def _save_tokenizer(tok_folder, folder):
    load_tokenizer(tok_folder).save(folder)


# writer, the fixture it saves from, what the message calls its folder, the files it writes
WRITERS = {
    "adapter": (_save_adapter, "base", "an adapter folder", ["adapter_config.json", "adapter_model.safetensors"]),
    "nf4": (_save_nf4, "base", "an NF4 model folder", ["config.json", "model.safetensors"]),
    "tokenizer": (_save_tokenizer, "folder", "a tokenizer folder",
                  ["tokenizer.json", "tokenizer_config.json"]),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_run_folder_is_refused_and_nothing_is_deleted(writer, request, tmp_path):
    save, source, what, _ = WRITERS[writer]
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    make_run_folder(run)
    before = listing(run)
    with pytest.raises(OutputError, match=f"{run} holds adapter/, checkpoints/, .*metrics.jsonl.*: it is "
                                          f"not {what} this command writes, so it is not replaced"):
        save(request.getfixturevalue(source), run)
    assert listing(run) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]  # and no temporary was left beside it


@pytest.mark.parametrize("writer", WRITERS)
def test_an_earlier_output_with_a_users_file_is_refused_and_kept(writer, request, tmp_path):
    save, source, what, files = WRITERS[writer]
    out = tmp_path / "out"
    save(request.getfixturevalue(source), out)
    assert sorted(p.name for p in out.iterdir()) == files
    (out / "notes.txt").write_text("a user's file")
    before = listing(out)
    with pytest.raises(OutputError, match=f"{out} holds notes.txt: it is not {what}"):
        save(request.getfixturevalue(source), out)
    assert listing(out) == before


@pytest.mark.parametrize("writer", WRITERS)
def test_a_file_or_a_folder_without_the_marker_is_refused(writer, request, tmp_path):
    save, source, what, files = WRITERS[writer]
    (tmp_path / "f").write_text("mine")
    with pytest.raises(OutputError, match=f"{tmp_path / 'f'} is a file: it is not {what}"):
        save(request.getfixturevalue(source), tmp_path / "f")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / files[-1]).write_text("mine")  # a file of the right name, but not a folder this writer made
    with pytest.raises(OutputError, match=f"holds no {'tokenizer.json' if writer == 'tokenizer' else files[0]}"):
        save(request.getfixturevalue(source), partial)
    assert (partial / files[-1]).read_text() == "mine" and (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("writer", WRITERS)
def test_its_own_output_is_replaced_whole(writer, request, tmp_path):
    save, source, _, files = WRITERS[writer]
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine too
    save(request.getfixturevalue(source), out)
    first = listing(out)
    save(request.getfixturevalue(source), out)
    assert sorted(p.name for p in out.iterdir()) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if writer == "tokenizer":
        assert listing(out) == first


def test_a_tokenizer_saved_onto_its_own_folder_keeps_its_files(folder, tmp_path):
    """Saving onto the folder it was read from: read first, then swapped; the same bytes."""
    load_tokenizer(folder).save(tmp_path / "tok")
    before = listing(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    tok.save(tmp_path / "tok")
    assert listing(tmp_path / "tok") == before
    assert tok.encode("hello world") == load_tokenizer(folder).encode("hello world")
    with pytest.raises(OutputError, match="holds .*config.json.*model.safetensors"):
        load_tokenizer(folder).save(folder)  # a model folder is not a tokenizer folder


@pytest.mark.parametrize("left", ["new", "old"])
def test_loading_puts_back_an_adapter_a_kill_left_half_swapped(base, tmp_path, left):
    """A kill after the new folder was complete (-new) or after the old one was moved aside (-old) leaves no
    folder under its name; the next read puts it back and cleans up."""
    model = _lora(base)
    save_adapter(model, tmp_path / "adapter")
    os.rename(tmp_path / "adapter", tmp_path / f".adapter.lora_engine-{left}")
    assert read_adapter_config(tmp_path / "adapter")[0].r == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    os.rename(tmp_path / "adapter", tmp_path / f".adapter.lora_engine-{left}")
    again = load_adapter(load_model(base, verbose=False), tmp_path / "adapter", verbose=False)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
