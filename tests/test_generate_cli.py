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


# ---- --stop: the text ends where a stop string appears, cut before it -----------------------------


def test_cli_stop_cuts_the_text_before_the_first_stop_string(embedded_dir, pair, capsys):
    model, tok = pair
    args = ["--model", NAME, "--prompt", "The sky is", "--max-new-tokens", "12"]
    main(args)
    greedy = capsys.readouterr().out[:-1]
    word = greedy.split()[2]  # a word well inside the text, so the cut means something
    cut = greedy[:greedy.index(word)]
    assert cut and len(cut) < len(greedy) - len(word)
    main(args + ["--stop", "no such text", "--stop", word])  # the flag once per stop string
    assert capsys.readouterr().out == cut + "\n"
    main(args + ["--stop", f"{word},no such text"])  # a comma is part of the stop string, not a separator
    assert capsys.readouterr().out == greedy + "\n"  # split at the comma, `word` would have cut it
    assert generate(model, tok, "The sky is", max_new_tokens=12, stop=word) == cut  # one string is one stop


def test_stop_ends_decoding_and_streams_nothing_of_the_stop_string(pair):
    model, tok = pair
    full = generate(model, tok, "The sky is", max_new_tokens=12)
    word = full.split()[1]
    pieces = []
    text = generate(model, tok, "The sky is", max_new_tokens=12, stop=[word], stream=pieces.append)
    assert text == full[:full.index(word)] and "".join(pieces) == text
    assert all(word not in "".join(pieces[:i + 1])[-len(word):] for i in range(len(pieces)))


def test_streamed_text_holds_back_what_may_start_a_stop_string():
    from lora_engine.generate import _before_stop

    stop = ("###", "\n\nUser:")
    assert _before_stop("one ## two", stop, hold=True) == "one ## two"  # "##" mid-text is not an ending
    assert _before_stop("one ##", stop, hold=True) == "one "  # it may still become "###"
    assert _before_stop("one\n\nUs", stop, hold=True) == "one"
    assert _before_stop("one ### two", stop, hold=True) == _before_stop("one ### two", stop) == "one "
    assert _before_stop("a\n\nUser: b ###", stop) == "a"  # the first stop string in the text wins


def test_stop_flags_and_values_are_checked(tmp_path, capsys, pair):
    model, tok = pair
    with pytest.raises(SystemExit) as e:  # checked before the model loads
        main(["--model", str(tmp_path / "none"), "--prompt", "x", "--stop", ""])
    assert e.value.code == 2 and "--stop is empty; give the text that ends the generation" in capsys.readouterr().err
    for bad in ("", 3):
        with pytest.raises(ValueError, match="generate: a stop string must be non-empty text, got"):
            generate(model, tok, "x", max_new_tokens=1, stop=["ok", bad])


def test_stop_strings_from_a_config_file(tmp_path, capsys):
    from lora_engine.cli import ConfigError, parse
    from lora_engine.generate import GenerateConfig

    good = tmp_path / "good.toml"
    good.write_text('stop = ["###", "a, b"]\n')
    assert parse(GenerateConfig, ["--prompt", "x", "--config", str(good)])[0].stop == ("###", "a, b")
    assert parse(GenerateConfig, ["--prompt", "x", "--config", str(good), "--stop", "END"])[0].stop == ("END",)
    assert parse(GenerateConfig, ["--prompt", "x"])[0].stop == ()
    bad = tmp_path / "bad.toml"
    bad.write_text('stop = "###"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: stop must be a list of str, got '###'"):
        parse(GenerateConfig, ["--prompt", "x", "--config", str(bad)])
