"""Evaluation: the forgetting comparison, the general-English slice, and the eval command line."""

import json
import math

import pytest
import torch

from lora_engine.data.embedded import chatterbot_split, general_text
from lora_engine.data.formats import DataError
from lora_engine.eval import main
from lora_engine.train.evaluate import compare, evaluate, format_table, general_rows, run_eval
from tests.test_train_support import (
    FakeTokenizer,
    chat_records,
    tiny_lora_model,
    tiny_model_folder,
    write_jsonl,
)


def _res(target_ppl, general_ppl):
    return {"target": {"loss": math.log(target_ppl), "ppl": target_ppl, "tokens": 10},
            "general": {"loss": math.log(general_ppl), "ppl": general_ppl, "tokens": 10}}


def test_compare_warns_past_the_threshold():
    ok = compare(_res(20.0, 10.0), _res(5.0, 10.4), threshold=0.05)
    assert ok["warning"] is None and ok["change"]["target"] == pytest.approx(-0.75)
    bad = compare(_res(20.0, 10.0), _res(5.0, 11.0), threshold=0.05)
    assert bad["change"]["general"] == pytest.approx(0.10)
    assert "general-English perplexity rose by +10.0% (threshold 5%)" in bad["warning"]
    table = format_table(bad)
    assert "target-task ppl" in table and "-75.0%" in table and "WARNING" in table


def test_general_slice_is_fixed_prose():
    a, b = general_text(), general_text()
    assert a == b and len(a) == 8 and all(len(x) > 2000 for x in a)
    assert not any(ch.isdigit() for x in a for ch in x[:200])  # verse numbers removed
    rows = general_rows(FakeTokenizer(), tokens=64)
    assert [len(r.input_ids) for r in rows] == [64] * 8 and rows[0].labels == rows[0].input_ids


def test_embedded_held_out_split_is_disjoint_and_fixed():
    train, val = chatterbot_split()
    assert 30 <= len(val) <= 120 and len(train) > 15 * len(val)
    assert not {r.where for r in train} & {r.where for r in val}
    key = lambda r: json.dumps(r.data, sort_keys=True)
    assert not {key(r) for r in train} & {key(r) for r in val}  # no held-out conversation seen in training
    assert [r.where for r in chatterbot_split()[1]] == [r.where for r in val]


def test_run_eval_matches_the_loss_of_the_whole_set(tmp_path):
    model = tiny_lora_model(tiny_model_folder(tmp_path / "m"))
    rows = general_rows(FakeTokenizer(), tokens=40)
    got = run_eval(model, FakeTokenizer(), rows[:5], None, batch_size=2)["target"]
    with torch.no_grad():
        ids = torch.tensor([r.input_ids for r in rows[:5]])
        want = float(model.loss(ids, ids))
    assert got["loss"] == pytest.approx(want, rel=1e-5) and got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    with pytest.raises(ValueError, match="no target token"):
        evaluate(model, [])


def test_eval_cli_base_and_adapter(folder, tmp_path, capsys):
    from lora_engine.lora.adapter import save_adapter

    save_adapter(tiny_lora_model(folder), tmp_path / "adapter")
    data = write_jsonl(tmp_path / "val.jsonl", chat_records(6))
    cmp = main(["--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                "--general-tokens", "32", "--forgetting-threshold", "0.5"])
    out = capsys.readouterr().out
    assert set(cmp["before"]) == {"target", "general"} and cmp["before"] != cmp["after"]
    assert "general English ppl" in out and "target-task loss" in out
    with pytest.raises(DataError, match=r"nope.jsonl does not exist"):
        main(["--model", str(folder), "--data", str(tmp_path / "nope.jsonl")])
