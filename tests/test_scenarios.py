"""Chat templates, scenario files and their validation, vocabulary folding, and the CLI glue."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from parity.errors import ParityError
from parity.scenarios import (
    REPO_ROOT,
    SCENARIO_DIR,
    TEMPLATES,
    Scenario,
    add_text_args,
    apply_template,
    fit_ids,
    load_scenario,
    plan_from_args,
    resolve_checkpoint,
    run_keys,
    scenario_plan,
)
from parity.tokenizer import WorldTokenizer

FIXTURE = REPO_ROOT / "fixtures" / "rwkv5_2-L4-C128-H2.pth"


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer()


class _Config:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


class _Checkpoint:
    """Only ``config.vocab_size`` is read by plan_from_args; a real checkpoint costs a load."""

    def __init__(self, vocab_size: int):
        self.config = _Config(vocab_size)


def _write(tmp_path: Path, data, name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# -- templates -------------------------------------------------------------------------------------
def test_templates_frame_the_text():
    assert apply_template("raw", "  hi \n") == "  hi \n"
    assert apply_template("chatrwkv", "hi") == "User: hi\n\nAssistant:"
    assert apply_template("instruct", " sum 2+2 ") == "Instruction: sum 2+2\n\nResponse:"
    assert apply_template("question", "why?\n") == "Question: why?\n\nAnswer:"
    assert set(TEMPLATES) == {"chatrwkv", "raw", "instruct", "question"}


def test_chatrwkv_template_normalizes_like_chatrwkv():
    # strip, CRLF -> LF, newline runs collapsed: a blank line inside would end the user's turn early.
    assert apply_template("chatrwkv", "  a\r\n\r\n\nb  ") == "User: a\nb\n\nAssistant:"


def test_braces_in_text_survive():
    assert apply_template("question", "what is {text} or {0}?") == "Question: what is {text} or {0}?\n\nAnswer:"


def test_trailing_space_after_assistant_changes_tokenization(world):
    prompt = apply_template("chatrwkv", "Hi")
    assert not prompt.endswith(" ")
    plain, spaced = world.encode(prompt), world.encode(prompt + " ")
    # A lone space token, where the model would have produced " Word" as one token.
    assert spaced[-1] == world.encode(" ")[0] and spaced[:-1] == plain
    assert len(world.encode(" Hello")) == 1


def test_unknown_template_lists_known_ones():
    with pytest.raises(ParityError, match="unknown template 'chat'.*chatrwkv, raw, instruct, question"):
        apply_template("chat", "hi")


# -- folding ---------------------------------------------------------------------------------------
def test_fit_ids_is_modulo():
    assert fit_ids([1, 1023, 1024, 65529], 1024) == (1, 1023, 0, 1017)
    assert fit_ids([5, 65529], 65536) == (5, 65529)
    with pytest.raises(ParityError, match="positive"):
        fit_ids([1], 0)


def test_folding_is_flagged_with_a_warning(world):
    plan, info = scenario_plan(Scenario(name="t", text="Straße und Grüße"), tokenizer=world, vocab_size=1024)
    assert info["vocab_folded"] is True
    assert len(info["warnings"]) == 1 and "vocab folded" in info["warnings"][0] and "\n" not in info["warnings"][0]
    assert info["model_ids"] == [i % 1024 for i in info["tokenizer_ids"]]
    assert list(plan.prefill_ids) == info["model_ids"]
    assert max(info["tokenizer_ids"]) >= 1024


def test_real_vocabulary_is_not_folded(world):
    _, info = scenario_plan(Scenario(name="t", text="Straße und Grüße"), tokenizer=world, vocab_size=65536)
    assert info["vocab_folded"] is False and info["warnings"] == []
    assert info["model_ids"] == info["tokenizer_ids"] == world.encode("Straße und Grüße")


def test_ids_scenario_is_never_folded():
    plan, info = scenario_plan(Scenario(name="t", ids=(3, 1, 4), decode_steps=2), vocab_size=1024)
    assert plan.prefill_ids == (3, 1, 4) and len(plan.decode_ids) == 2
    assert info["text"] is None and info["tokenizer_ids"] is None and info["vocab_folded"] is False
    with pytest.raises(ParityError, match="token id 2000 is outside"):
        scenario_plan(Scenario(name="t", ids=(2000,)), vocab_size=1024)


# -- scenario files --------------------------------------------------------------------------------
def test_bundled_scenarios_load_and_plan(world):
    files = sorted(SCENARIO_DIR.glob("*.json"))
    assert [f.stem for f in files] == ["chat-hello", "multilingual", "ones"]
    loaded = {f.stem: load_scenario(f) for f in files}
    for s in loaded.values():
        assert s.checkpoint == FIXTURE and s.checkpoint.is_file()
        assert s.description
    chat, multi, ones = loaded["chat-hello"], loaded["multilingual"], loaded["ones"]
    assert chat.template == "chatrwkv" and chat.greedy_steps > 0
    assert multi.prompt_file == SCENARIO_DIR / "multilingual.txt"
    assert multi.text == multi.prompt_file.read_bytes().decode("utf-8") and "東京" in multi.text
    assert ones.ids == (1,) * 10
    _, info = scenario_plan(chat, tokenizer=world, vocab_size=1024)
    assert info["text"].startswith("User: ") and info["text"].endswith("\n\nAssistant:")
    assert info["vocab_folded"] is True


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "not valid JSON: .* line 1"),
        ("[1, 2]", "must hold a JSON object"),
        ({"text": "hi"}, "missing the 'name'"),
        ({"name": "x"}, "exactly one of 'text', 'prompt_file', 'ids' \\(got none\\)"),
        ({"name": "x", "text": "a", "ids": [1]}, "exactly one of .* \\(got text, ids\\)"),
        ({"name": "x", "text": "a", "temperature": 1}, "unknown field 'temperature'"),
        ({"name": "x", "text": "a", "template": "chat"}, "unknown template 'chat'"),
        ({"name": "x", "ids": [1, -2]}, "non-negative integers"),
        ({"name": "x", "ids": []}, "non-negative integers"),
        ({"name": "x", "ids": [1], "template": "chatrwkv"}, "takes no template"),
        ({"name": "x", "text": "a", "decode_steps": -1}, "'decode_steps' must be an integer >= 0"),
        ({"name": "x", "text": "a", "greedy_steps": True}, "'greedy_steps' must be an integer >= 0"),
        ({"name": "", "text": "a"}, "non-empty string 'name'"),
        ({"name": "x", "text": 3}, "'text' must be a string"),
        ({"name": "x", "prompt_file": "missing.txt"}, "cannot read .*missing.txt"),
        ({"name": "x", "text": "a", "checkpoint": 5}, "'checkpoint' must be a string"),
    ],
)
def test_bad_scenario_files_raise_one_line(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ParityError, match=message) as err:
        load_scenario(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_prompt_file_must_be_utf8(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ParityError, match="not valid UTF-8: byte 0xe9 at offset 3"):
        load_scenario(_write(tmp_path, {"name": "x", "prompt_file": "p.txt"}))


def test_missing_scenario_file(tmp_path):
    with pytest.raises(ParityError, match="cannot read scenario"):
        load_scenario(tmp_path / "nope.json")


def test_prompt_file_is_relative_to_the_scenario(tmp_path):
    sub = tmp_path / "deep"
    sub.mkdir()
    (sub / "p.txt").write_bytes(b"line one\r\nline two\n")
    s = load_scenario(_write(sub, {"name": "x", "prompt_file": "p.txt"}))
    assert s.text == "line one\r\nline two\n"  # raw: bytes kept, CRLF and final newline included


# -- CLI glue --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    # The run parser's existing flags, as parity/cli.py declares them, then ours.
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--ids", default="ones:10")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--decode-ids")
    add_text_args(p)
    return p


def test_default_run_is_ten_ones():
    plan, info = plan_from_args(_parser().parse_args([]), _Checkpoint(1024))
    assert plan.prefill_ids == (1,) * 10 and len(plan.decode_ids) == 4
    assert info["greedy_steps"] == 0 and info["vocab_folded"] is False


def test_text_with_template_and_greedy():
    args = _parser().parse_args(["--text", "hi", "--template", "chatrwkv", "--greedy", "3", "--decode-steps", "2"])
    plan, info = plan_from_args(args, _Checkpoint(65536))
    assert info["text"] == "User: hi\n\nAssistant:" and info["template"] == "chatrwkv"
    assert info["greedy_steps"] == 3 and len(plan.decode_ids) == 2
    keys = run_keys(info)
    assert set(keys) == {"scenario", "template", "text", "tokenizer_ids", "model_ids", "vocab_folded", "warnings"}
    json.dumps(keys, allow_nan=False)


def test_prompt_file_flag(tmp_path):
    (tmp_path / "p.txt").write_text("hello", encoding="utf-8")
    plan, info = plan_from_args(_parser().parse_args(["--prompt-file", str(tmp_path / "p.txt")]), _Checkpoint(65536))
    assert info["text"] == "hello" and info["template"] == "raw"


def test_scenario_values_apply_unless_a_flag_overrides():
    path = str(SCENARIO_DIR / "chat-hello.json")
    plan, info = plan_from_args(_parser().parse_args(["--scenario", path]), _Checkpoint(1024))
    assert info["greedy_steps"] == 8 and len(plan.decode_ids) == 4 and info["scenario"]["name"] == "chat-hello"
    plan, info = plan_from_args(
        _parser().parse_args(["--scenario", path, "--greedy", "2", "--decode-steps", "1", "--decode-ids", "7"]),
        _Checkpoint(1024),
    )
    assert info["greedy_steps"] == 2 and plan.decode_ids == (7,)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--text", "a", "--ids", "1,2"], "--ids cannot be combined"),
        (["--template", "chatrwkv"], "--template applies to"),
        (["--greedy", "-1"], "--greedy must be >= 0"),
        (["--decode-steps", "-1"], "--decode-steps must be >= 0"),
        (["--scenario", str(SCENARIO_DIR / "ones.json"), "--template", "chatrwkv"], "takes no template"),
    ],
)
def test_conflicting_flags(argv, message):
    with pytest.raises(ParityError, match=message):
        plan_from_args(_parser().parse_args(argv), _Checkpoint(1024))


def test_text_sources_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--text", "a", "--scenario", "s.json"])
    assert "not allowed with" in capsys.readouterr().err


def test_resolve_checkpoint(tmp_path):
    p = _parser()
    assert resolve_checkpoint(p.parse_args(["--checkpoint", "x.pth", "--scenario", "s.json"])) == Path("x.pth")
    assert resolve_checkpoint(p.parse_args(["--scenario", str(SCENARIO_DIR / "ones.json")])) == FIXTURE
    bare = _write(tmp_path, {"name": "x", "ids": [1]})
    with pytest.raises(ParityError, match="names no checkpoint"):
        resolve_checkpoint(p.parse_args(["--scenario", str(bare)]))
    with pytest.raises(ParityError, match="no checkpoint"):
        resolve_checkpoint(p.parse_args([]))
