"""Generation on the embedded model: the command line end to end, seeded sampling, streaming."""

import pytest

from lora_engine import load_model, load_tokenizer
from lora_engine.cli import CliError, run_cli
from lora_engine.generate import generate, main
from tests import embedded_fixture

embedded_home = embedded_fixture.embedded_home
embedded_gguf = embedded_fixture.embedded_gguf
embedded_dir = embedded_fixture.embedded_dir
NAME = embedded_fixture.EMBEDDED_NAME


@pytest.fixture(scope="module")
def pair(embedded_dir):
    return load_model(embedded_dir), load_tokenizer(embedded_dir)


def test_cli_answers_in_chat_mode(embedded_dir, capsys):
    main(["--model", NAME, "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "10"])
    out = capsys.readouterr().out
    assert "Paris" in out, out


def test_cli_sampling_with_a_seed_is_the_library_call(embedded_dir, pair, capsys):
    model, tok = pair
    args = ["--model", NAME, "--prompt", "Once upon a time", "--max-new-tokens", "4",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]
    main(args)
    out = capsys.readouterr().out
    expected = generate(model, tok, "Once upon a time", max_new_tokens=4, temperature=1.0, top_p=0.9, seed=7)
    assert out == expected + "\n"


def test_seeded_sampling_reproduces_and_seeds_differ(pair):
    model, tok = pair
    kw = dict(max_new_tokens=4, temperature=2.0, top_p=1.0)
    runs = {s: generate(model, tok, "My favourite food is", seed=s, **kw) for s in (1, 2)}
    assert generate(model, tok, "My favourite food is", seed=2, **kw) == runs[2]
    assert runs[1] != runs[2]  # at temperature 2 two 4-token samples (vocabulary 49k) agreeing is ~impossible


def test_stream_pieces_add_up_to_the_result(pair):
    model, tok = pair
    pieces = []
    text = generate(model, tok, [{"role": "user", "content": "Say hi"}], max_new_tokens=4, chat=True,
                    stream=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1  # streamed piece by piece


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(CliError, match="--model: model path .*none.* does not exist"):
        main(["--model", str(tmp_path / "none"), "--prompt", "x"])
    with pytest.raises(SystemExit):  # checked before the model loads
        main(["--model", NAME, "--prompt", "x", "--top-p", "1.5", "--temperature", "1"])
    assert "--top-p must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_cli_top_k_one_is_greedy(embedded_dir, capsys):
    args = ["--model", NAME, "--prompt", "The sky is", "--max-new-tokens", "6"]
    main(args)
    greedy = capsys.readouterr().out
    main(args + ["--temperature", "3", "--top-k", "1", "--seed", "0"])
    assert capsys.readouterr().out == greedy


def test_an_empty_prompt_is_one_error_line_before_the_model_loads(tmp_path, capsys):
    for chat in ([], ["--chat"]):
        assert run_cli(main, ["--model", str(tmp_path / "none"), "--prompt", "", *chat]) == 2
        assert capsys.readouterr().err == ("error: --prompt is empty; give the text to continue "
                                           "(with --chat, the user's message)\n")


@pytest.mark.parametrize("flag, value, message", [
    ("--max-new-tokens", "0", "--max-new-tokens must be a whole number in 1..131072, got 0"),
    ("--max-new-tokens", "1000000", "--max-new-tokens must be a whole number in 1..131072, got 1000000"),
    ("--temperature", "-1", "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    ("--temperature", "nan", "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-p", "nan", "--top-p must be in (0, 1], got nan"),
    ("--top-k", "-3", "--top-k must be a whole number >= 0 (0 = no limit), got -3"),
])
def test_numeric_flags_are_checked_before_the_model_loads(tmp_path, capsys, flag, value, message):
    # --model names nothing: had the check not come first, the error would be the missing model.
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "none"), "--prompt", "x", flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err
