"""data/prepare.py, the one data owner: the embedded default's rows as they always were, and the data check's
exit statuses."""

import hashlib
import json

import pytest

from lora_engine.data.check import main as check_main
from lora_engine.data.formats import DataError
from lora_engine.data.prepare import DataSpec, eval_rows, prepare_data
from lora_engine.train.config import TrainConfig
from tests.test_train_support import FakeTokenizer, chat_records, save_tokenizer_files, write_jsonl

# sha256 of the rows (input_ids, labels, position_ids, segment_ids, where) that training and evaluation built
# for the embedded default before data/prepare.py took over (lora_engine b09d63b): the default run's
# perplexities depend on these rows and their order.
ROWS_SHA256 = {
    "sft": "2eebd8df299f89a63a6204dad4a3391f78833e3f82d4114ae661590a57595365",
    "dpo": "4bf5db30dfab228c09cd55bc734ff6aaef5b6897fa4006dbda825cc904976d99",
    "eval": "f4a7dd896af2a535fa06ebc271422e5fdd2706bc234d092b8d4e5af20cbdca29",
}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=lambda r: r.__dict__).encode()).hexdigest()


def test_the_embedded_default_rows_are_those_of_before(embedded_dir):
    from lora_engine.models.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    for objective in ("sft", "dpo"):
        p = prepare_data(DataSpec.of(TrainConfig(objective=objective)), tok)
        assert _sha([p.train, p.val]) == ROWS_SHA256[objective], objective
    assert _sha(eval_rows(tok, None)) == ROWS_SHA256["eval"]


def test_the_spec_takes_the_data_flags_of_a_config_by_name():
    spec = DataSpec.of(TrainConfig(data="d.jsonl", val_split=0.2, max_length=64, objective="dpo", seed=3))
    assert spec == DataSpec(data="d.jsonl", val_split=0.2, max_length=64, objective="dpo", seed=3)
    with pytest.raises(DataError, match="--objective 'ppo' has no data preparation; one of sft, dpo, grpo"):
        prepare_data(DataSpec(objective="ppo"), FakeTokenizer())


def test_data_check_exits_1_when_nothing_is_usable_and_on_any_problem_with_strict(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    tok = save_tokenizer_files(tmp_path / "tok")
    good = write_jsonl(tmp_path / "good.jsonl", chat_records(3))
    dup = write_jsonl(tmp_path / "dup.jsonl", chat_records(3) + chat_records(1))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": " "}])
    run = lambda f, *a: check_main(["check", str(f), "--model", str(tok), "--max-length", "256", *a])  # noqa: E731
    assert run(good) == 0 and run(good, "--strict") == 0
    assert run(dup) == 0
    capsys.readouterr()
    assert run(dup, "--strict") == 1 and "problems (--strict)" in capsys.readouterr().err
    assert run(empty) == 1 and "nothing usable" in capsys.readouterr().err
