"""data/stream.py: a streamed --format text corpus makes the rows the in-memory path makes, in a seeded order, with
bounded buffers, the same held-out rows, and a checkpointed position from which a resume gives the same batches."""

import dataclasses
import json
import random

import pytest
import torch

from lora_engine.data import stream as st
from lora_engine.data.check import main as check_main
from lora_engine.data.formats import DataError, read_records
from lora_engine.data.pipeline import Batcher, examples_from_records, prepare, split
from lora_engine.data.prepare import DataSpec, prepare_data, read_data
from lora_engine.train import checkpoint
from lora_engine.train.config import TrainConfig
from lora_engine.train.loop import run
from tests.test_train_support import FakeTokenizer, save_tokenizer_files, tiny_lora_model, write_jsonl

TOK = FakeTokenizer()


def words(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(["alpha", "beta", "gamma", "delta", "eps"]) + str(rnd.randrange(50)) for _ in range(n))


def corpus(path, n: int = 60, seed: int = 1, empty_every: int = 11):
    """n JSONL documents of 0-30 words (every empty_every-th one empty)."""
    rnd = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, [{"text": "" if i % empty_every == 5 else words(rnd, rnd.randrange(1, 30))}
                              for i in range(n)])


def epochs_of(stream: st.TextStream, n: int = 1) -> list[list]:
    """The rows of a new stream's first n epochs (stream.epoch after next_row is the epoch of the row it gave)."""
    out: list[list] = [[] for _ in range(n)]
    while True:
        row = stream.next_row()
        if stream.epoch == n:
            return out
        out[stream.epoch].append(row)


def test_streaming_applies_to_format_text_files_and_folders_only(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    assert st.streams("c.jsonl", "text") and st.streams("c.txt", "text") and st.streams(str(tmp_path), "text")
    assert not st.streams("c.jsonl", "auto") and not st.streams("c.parquet", "text")
    assert not st.streams(str(tmp_path / "saved"), "text") and not st.streams(None, "text")
    assert not st.streams("c.jsonl", "text", stream=False) and not st.streams("c.jsonl", "text", objective="dpo")
    with pytest.raises(DataError, match=r"--stream reads --format text \(--objective sft\) from .txt or .jsonl files "
                                        r"or a folder of them; got --format chat --data c.jsonl: drop --stream"):
        st.streams("c.jsonl", "chat", stream=True)


@pytest.mark.parametrize("pack", [False, True])
def test_one_epoch_in_stream_order_is_what_prepare_makes(tmp_path, pack):
    path = corpus(tmp_path / "c.jsonl")
    p = prepare_data(DataSpec(data=str(path), format="text", pack=pack, max_length=64, shuffle_buffer=1), TOK)
    train, val = split(examples_from_records(read_records(path), TOK, "text"), 0.1, 0)
    assert p.val == prepare(val, 64, False, {})  # the same held-out documents, as the same rows
    # A buffer of one document keeps the file's order: the rows are prepare's, packed or not, truncation included.
    assert epochs_of(p.train)[0] == prepare(train, 64, pack, {})
    assert p.train.stats["truncated"] > 0 and p.train.stats["empty"] == 5
    assert p.files == [path]


def test_the_order_comes_from_the_seed_and_every_document_trains_once_an_epoch(tmp_path):
    folder = tmp_path / "corpus"
    for i in range(4):
        corpus(folder / f"part-{i}.jsonl", n=25, seed=i)
    held = prepare_data(DataSpec(data=str(folder), format="text", max_length=64, shuffle_buffer=7, seed=3), TOK)
    docs = [d for i, f in enumerate(st.corpus_files(folder)) for d in st.documents(f, i) if d.record]
    held_where = {r.where[0] for r in held.val}
    train_where = sorted(d.record.where for d in docs if d.record.where not in held_where)
    epochs = []
    for seed in (3, 3, 4):
        s = prepare_data(DataSpec(data=str(folder), format="text", max_length=64, shuffle_buffer=7, seed=seed), TOK).train
        epochs.append([[w for r in rows for w in r.where] for rows in epochs_of(s, 2)])
    assert epochs[0] == epochs[1]  # the same seed, the same stream
    assert epochs[0][0] != epochs[2][0] and epochs[0][0] != epochs[0][1]  # another seed, another epoch: reordered
    for order in epochs[0]:
        assert sorted(order) == train_where  # each training document once, no held-out one (--seed 3's)
    assert len(held.val) == round(0.1 * len(docs))


def test_packed_rows_keep_documents_apart(tmp_path):
    s = prepare_data(DataSpec(data=str(corpus(tmp_path / "c.jsonl")), format="text", pack=True, max_length=80,
                              shuffle_buffer=5), TOK).train
    (rows,) = epochs_of(s)
    assert any(len(r.where) > 1 for r in rows)
    for r in rows:
        assert len(r.input_ids) <= 80
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert len(starts) == len(r.where) and all(r.labels[i] == -100 for i in starts)
        assert [r.segment_ids[i] for i in starts] == list(range(len(r.where)))


def test_the_buffers_stay_bounded_whatever_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "HELD_OUT_WINDOW", 20)
    for n in (100, 1000):
        path = corpus(tmp_path / f"c{n}.jsonl", n=n)
        p = prepare_data(DataSpec(data=str(path), format="text", pack=True, max_length=64, shuffle_buffer=16), TOK)
        assert len(p.val) == 2 and p.stats["stream"]["window"] == 20
        batcher = st.StreamBatcher(p.train, 4, 0)
        batches = [batcher.next() for _ in range(3)]
        # Read so far: the buffer's 16 documents, those of the rows given out and of the row being packed; not the
        # corpus, whatever its size.
        assert len(p.train.buffer) == 15  # refilled to 16 before the next draw
        assert p.train.stats["documents"] == 15 + sum(len(b["where"]) for b in batches) + len(p.train.row) < 40


def test_txt_files_are_paragraphs_and_folders_are_walked_in_sorted_order(tmp_path):
    folder = tmp_path / "books"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "two.txt").write_text("Second book,\nfirst paragraph.\n\n\n  \nIts second one.\n")
    (folder / "a.txt").write_bytes("\ufeffFirst book.\r\n".encode())
    (folder / ".hidden.txt").write_text("an editor's file\n")
    (folder / "notes.md").write_text("not a corpus file\n")
    files = st.corpus_files(folder)
    assert files == [folder / "a.txt", folder / "b" / "two.txt"]
    docs = [(d.record.data["text"], d.record.where, d.address) for i, f in enumerate(files) for d in st.documents(f, i)]
    assert docs == [("First book.", f"{files[0]}:1", (0, 0, 1)),
                    ("Second book,\nfirst paragraph.", f"{files[1]}:1", (1, 0, 1)),
                    ("Its second one.", f"{files[1]}:6", (1, 35, 6))]
    # A document re-read from its address (as a resume does) is the same document.
    assert next(st.documents(files[1], 1, 35, 6)).record.data["text"] == "Its second one."


@pytest.mark.parametrize("body, match", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"c.jsonl:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
    (b'{"text": "ok"}\n{oops\n', r"c.jsonl:2: invalid JSON \(Expecting property name .*\); each line must be one JSON"),
    (b'{"text": "ok"}\n["a"]\n', r"c.jsonl:2: expected a JSON object, got list"),
    (b'{"body": "ok"}\n', r"c.jsonl:1: missing field 'text' for format text \(has \['body'\]\)"),
    (b'{"text": 3}\n', r"c.jsonl:1: field 'text' must be a string, got int"),
    (b'{"text": ""}\n', r"c.jsonl: no document with text \(every \"text\" is empty\)"),
])
def test_a_bad_corpus_names_the_file_and_line(tmp_path, body, match):
    (tmp_path / "c.jsonl").write_bytes(body)
    with pytest.raises(DataError, match=match):
        prepare_data(DataSpec(data=str(tmp_path / "c.jsonl"), format="text"), TOK)


def test_refusals(tmp_path):
    path = str(corpus(tmp_path / "c.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder holding no .txt or .jsonl file; --format text streams those"):
        read_data(DataSpec(data=str(tmp_path / "empty"), format="text"))
    with pytest.raises(DataError, match=r"data file .*nope.txt does not exist"):
        read_data(DataSpec(data=str(tmp_path / "nope.txt"), format="text"))
    with pytest.raises(DataError, match=r"--dedup compares every record .* deduplicate it beforehand, or pass "
                                        r"--no-stream"):
        prepare_data(DataSpec(data=path, format="text", dedup=True), TOK)
    with pytest.raises(DataError, match=r"--shuffle-buffer must be at least 1 document, got 0"):
        prepare_data(DataSpec(data=path, format="text", shuffle_buffer=0), TOK)
    with pytest.raises(ValueError, match=r"--shuffle-buffer must be"):
        TrainConfig(shuffle_buffer=0)
    with pytest.raises(DataError, match=r"give --max-steps \(not 0\), or --no-stream"):
        _ = st.StreamBatcher(prepare_data(DataSpec(data=path, format="text"), TOK).train, 2, 0).batches_per_epoch
    files = st.corpus_files(path)
    everything = frozenset(d.address for d in st.documents(files[0], 0))
    with pytest.raises(DataError, match=r"no training document in .*c.jsonl: every one is empty, held out, or left "
                                        r"without a target token"):
        st.TextStream(files, TOK, 64, False, 0, held_out=everything).next_row()
    # --no-stream: the in-memory path as before
    assert isinstance(prepare_data(DataSpec(data=path, format="text", stream=False), TOK).train, list)


def test_val_data_is_read_whole_and_nothing_is_held_out(tmp_path):
    path = corpus(tmp_path / "c.jsonl", n=30)
    (tmp_path / "val.txt").write_text("one paragraph\n\nand another\n")
    p = prepare_data(DataSpec(data=str(path), format="text", val_data=str(tmp_path / "val.txt"), shuffle_buffer=1,
                              max_length=64), TOK)
    assert [r.where for r in p.val] == [[f"{tmp_path / 'val.txt'}:1"], [f"{tmp_path / 'val.txt'}:3"]]
    assert len(epochs_of(p.train)[0]) == 30 - 3  # every non-empty document trains
    assert p.files == [path, tmp_path / "val.txt"]


def _save_and_load(tmp_path, data_state: dict) -> dict:
    """data_state through a real checkpoint (state.pt read back with weights_only=True)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = checkpoint.save_checkpoint(tmp_path / "run", 1, model, opt, sched, {"step": 1}, data_state)
    return checkpoint.load_checkpoint(path, model, opt, sched)["data"]


@pytest.mark.parametrize("pack, taken", [(True, 3), (True, 11), (False, 14)])
def test_resume_mid_corpus_gives_the_same_next_batches(tmp_path, pack, taken):
    """Resumed from a checkpoint mid-epoch (11 batches: a packed row half full, the buffer holding documents read
    long ago) and across the epoch's end (14 unpacked batches of 4 rows, 49 training documents)."""
    spec = DataSpec(data=str(corpus(tmp_path / "c.jsonl")), format="text", pack=pack, max_length=64,
                    shuffle_buffer=8, seed=5)
    first = st.StreamBatcher(prepare_data(spec, TOK).train, 4, 0)
    for _ in range(taken):
        first.next()
    saved = _save_and_load(tmp_path, first.state_dict())
    resumed = st.StreamBatcher(prepare_data(spec, TOK).train, 4, 0)
    resumed.load_state_dict(saved)
    for _ in range(8):
        a, b = first.next(), resumed.next()
        assert a["where"] == b["where"] and resumed.epoch == first.epoch
        for k in ("input_ids", "labels", "position_ids", "segment_ids"):
            assert (k in a) == (k in b) and (k not in a or torch.equal(a[k], b[k])), k


def test_resume_refuses_another_corpus_or_the_other_kind_of_checkpoint(tmp_path):
    path = corpus(tmp_path / "c.jsonl")
    spec = DataSpec(data=str(path), format="text", shuffle_buffer=8)
    b = st.StreamBatcher(prepare_data(spec, TOK).train, 4, 0)
    b.next()
    saved = b.state_dict()
    with pytest.raises(DataError, match=r"the checkpoint was made streaming its text corpus \(--format text\), this "
                                        r"run reads its data in memory"):
        Batcher(prepare(examples_from_records(read_records(path), TOK, "text"), 64), 4, 0, 0).load_state_dict(saved)
    in_memory = Batcher(prepare(examples_from_records(read_records(path), TOK, "text"), 64), 4, 0, 0).state_dict()
    with pytest.raises(DataError, match=r"the checkpoint was made reading its data in memory, this run streams"):
        b.load_state_dict(in_memory)
    with pytest.raises(DataError, match=r"streamed another corpus or cut it otherwise \(seed: 0 then, 1 now\)"):
        st.StreamBatcher(prepare_data(DataSpec(data=str(path), format="text", seed=1), TOK).train, 4, 0) \
            .load_state_dict(saved)
    with path.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(DataError, match=r"streamed another corpus or cut it otherwise \(files: "):
        st.StreamBatcher(prepare_data(spec, TOK).train, 4, 0).load_state_dict(saved)


def _cfg(out, data, **kw):
    base = dict(model="unused", data=str(data), format="text", out=str(out) if out else None, max_steps=6, batch_size=2, grad_accum=2,
                lr=5e-3, warmup_steps=2, r=4, max_length=48, pack=True, shuffle_buffer=6, save_every=2,
                general_eval=False, eval_batch_size=8, plot=False)
    return TrainConfig(**{**base, **kw})


def test_a_streamed_run_resumes_mid_corpus_with_the_same_losses(folder, tmp_path):
    """Through the loop, its checkpoint and --resume: the losses after the resume are the straight run's."""
    data = tmp_path / "corpus"
    for i in range(3):
        corpus(data / f"{i}.jsonl", n=30, seed=i)
    (data / "notes.txt").write_text("A paragraph of prose,\nwrapped.\n\nAnother one.\n")
    quiet = lambda *a: None  # noqa: E731
    lines = []
    torch.manual_seed(0)
    straight = run(_cfg(tmp_path / "straight", data), tokenizer=TOK, model=tiny_lora_model(folder), log=lines.append)
    assert straight["status"] == "completed" and any("data: streaming 4 file(s)" in x for x in lines)
    torch.manual_seed(0)
    m = run(_cfg(tmp_path / "split", data, stop_after=3), tokenizer=TOK, model=tiny_lora_model(folder), log=quiet)
    assert m["status"] == "interrupted"
    torch.manual_seed(1)  # another LoRA initialisation: everything must come from the checkpoint
    m = run(_cfg(None, data, resume=str(tmp_path / "split")), {"resume"}, tokenizer=TOK, model=tiny_lora_model(folder),
            log=quiet)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("straight", "split")]
    assert m["status"] == "completed" and len(losses[0]) == 6 and losses[1] == losses[0]
    assert straight["eval"]["after"]["target"]["loss"] == m["eval"]["after"]["target"]["loss"]


def test_a_streamed_run_needs_max_steps(folder, tmp_path):
    from lora_engine.cli import CliError

    with pytest.raises(CliError, match=r"--max-steps 0 trains --epochs, and a streamed corpus is not counted before "
                                       r"training: give --max-steps, or --no-stream"):
        run(_cfg(tmp_path / "r", corpus(tmp_path / "c.jsonl"), max_steps=0), tokenizer=TOK,
            model=tiny_lora_model(folder), log=lambda *a: None)


def test_data_check_streams_a_text_corpus(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    tok = save_tokenizer_files(tmp_path / "tok")
    data = tmp_path / "corpus"
    corpus(data / "a.jsonl", n=30)
    (data / "b.txt").write_text("A paragraph.\n\nAnother one, longer than the first.\n")
    run_check = lambda *a: check_main(["check", str(data), "--model", str(tok), "--format", "text", "--max-length",  # noqa: E731
                                       "64", *a])
    assert run_check() == 0
    out = capsys.readouterr().out
    assert f"corpus: {data} (2 file(s), streamed)" in out and "documents: 32  format: text  usable examples: 29" in out
    assert "empty fields: 3 documents" in out and "data quality (a sample: the first 29 documents)" in out
    assert "token-length histogram:" in out and "examples truncated" in out
    assert run_check("--strict") == 1  # the empty documents are problems
    with pytest.raises(DataError, match=r"--val compares every record with every validation record, in memory; a "
                                        r"streamed corpus \(--format text\) is checked alone: drop --val, or pass "
                                        r"--no-stream"):
        run_check("--val", str(data / "b.txt"))
    (data / "a.jsonl").write_text('{"text": ""}\n')
    (data / "b.txt").write_text("\n")
    assert run_check() == 1 and "nothing usable" in capsys.readouterr().err


def test_dry_run_describes_the_stream_without_reading_the_corpus(folder, tmp_path, capsys):
    from lora_engine.train.command import main

    data = corpus(tmp_path / "c.jsonl")
    out = tmp_path / "run"
    assert main(["--model", str(folder), "--data", str(data), "--format", "text", "--pack", "--out", str(out),
                 "--max-length", "64", "--r", "4", "--device", "cpu", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "data: streaming 1 file(s), 0.0 MiB of --format text through a shuffle buffer of 4096 documents, " \
           "truncated at 64 tokens, packed; 6 validation rows (held out of the first 55 documents)" in text
    assert "data quality of the first 55 documents: 0 exact duplicate" in text and not out.exists()


def test_split_documents_trains_every_token_of_a_long_document_once_an_epoch(tmp_path):
    """--split-documents: a document over --max-length becomes consecutive pieces of at most max_length tokens,
    which together are the whole tokenized document (truncation keeps only the first piece)."""
    rnd = random.Random(3)
    docs = [words(rnd, rnd.randrange(1, 120)) for _ in range(30)]
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": d} for d in docs])
    whole = {tuple(e.input_ids) for e in examples_from_records(read_records(path), TOK, "text")}
    for pack in (False, True):
        spec = DataSpec(data=str(path), format="text", pack=pack, max_length=48, shuffle_buffer=4, seed=2,
                        val_split=0.0, split_documents=True)
        data = prepare_data(spec, TOK)
        rows = epochs_of(data.train)[0]
        pieces = [tuple(t for t, s in zip(r.input_ids, r.segment_ids) if s == seg)
                  for r in rows for seg in dict.fromkeys(r.segment_ids)]
        assert max(map(len, pieces)) <= 48 and len(pieces) > len(docs)
        by_doc = {}
        for p in pieces:  # the pieces of one document: the one whose tokens start with it, consecutive
            by_doc.setdefault(next(d for d in whole if any(d[i:i + len(p)] == p for i in range(0, len(d), 48))),
                              []).append(p)
        assert sorted(sum(len(p) for p in v) for v in by_doc.values()) == sorted(map(len, whole))
        assert data.train.stats["split"] > 0 and data.train.stats["truncated"] == 0


@pytest.mark.parametrize("taken", [2, 7])
def test_resume_with_split_documents_gives_the_same_next_batches(tmp_path, taken):
    rnd = random.Random(4)
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": words(rnd, rnd.randrange(1, 100))} for _ in range(40)])
    spec = DataSpec(data=str(path), format="text", max_length=32, shuffle_buffer=3, seed=1, split_documents=True)
    first = st.StreamBatcher(prepare_data(spec, TOK).train, 2, 0)
    for _ in range(taken):
        first.next()
    saved = _save_and_load(tmp_path, first.state_dict())
    resumed = st.StreamBatcher(prepare_data(spec, TOK).train, 2, 0)
    resumed.load_state_dict(saved)
    for _ in range(10):
        a, b = first.next(), resumed.next()
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["where"] == b["where"]
    unsplit = st.StreamBatcher(prepare_data(dataclasses.replace(spec, split_documents=False), TOK).train, 2, 0)
    with pytest.raises(DataError, match="--split-documents"):
        unsplit.load_state_dict(saved)
