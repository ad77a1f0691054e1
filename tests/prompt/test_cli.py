"""``parity prompt`` as a user runs it: exit codes 0/1/2, JSON, Markdown, one-line errors."""

import json
import subprocess
import sys

import pytest

from parity.cli import main

from .conftest import FIXTURE, REPO, first_token_difference

MLC_WORLD = REPO / "fixtures" / "prompts" / "rwkv-world" / "mlc-chat-config.json"
MLC_CHATRWKV = REPO / "fixtures" / "prompts" / "chatrwkv-conv-template.json"


def run(capsys, *args):
    rc = main(["prompt", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_agree_exit_0(capsys):
    rc, out, err = run(capsys, "--text", "Hi! What is RWKV?", "--against", f"mlc:{MLC_CHATRWKV}")
    assert rc == 0, out + err
    assert out.splitlines()[-1] == "prompts agree (35 characters, 13 tokens)"
    assert "characters: the same" in out and "tokens: the same 13 World tokenizer ids" in out


def test_mlc_rwkv_world_end_to_end(capsys, tmp_path, official):
    """The public rwkv_world fields as an mlc-chat-config.json, checked through the command."""
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "What is RWKV?"}]), encoding="utf-8")
    rc, out, err = run(capsys, "--turns", turns, "--against", MLC_WORLD, "--json", tmp_path / "r.json",
                       "--markdown", tmp_path / "r.md")
    assert rc == 1, out + err
    ours = "User: Hi\n\nAssistant: Hello!\n\nUser: What is RWKV?\n\nAssistant:"
    system = ("User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in full details. "
              "Please feel free to ask any question and I will always answer it.")
    theirs = system + "User: Hi\n\nAssistant: Hello!\n\nUser: What is RWKV?\n\nAssistant: "
    result = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert (result["ours"]["text"], result["theirs"]["text"]) == (ours, theirs)
    assert result["passed"] is False and result["against"]["kind"] == "mlc" and result["against"]["guessed"] is True
    assert result["characters"]["index"] == len("User: ")  # "Hi" vs the canned "hi"
    t = first_token_difference(official, ours, theirs)
    assert result["tokens"]["index"] == t
    assert result["ours"]["ids"] == official.encode(ours) and result["theirs"]["ids"] == official.encode(theirs)
    assert out.splitlines()[-1] == f"PROMPTS DIFFER at character 6 (line 1, column 7), token {t}"
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert md.startswith("### ❌") and f"PROMPTS DIFFER at character 6 (line 1, column 7), token {t}" in md


def test_checkpoint_json_and_markdown_to_stdout(capsys, tmp_path):
    rc, out, err = run(capsys, "--text", "Hi! What is RWKV?", "--against", "text:User: Hi! What is RWKV?\n\nAssistant: ",
                       "--checkpoint", FIXTURE, "--greedy", 4, "--json", tmp_path / "r.json", "--markdown", "-")
    assert rc == 1
    assert out.startswith("### ❌") and "KL(ours ‖ theirs) of the next token" in out
    assert "PROMPTS DIFFER at character 35 (line 3, column 11)" in err and "vocab folded" in err
    model = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["model"]
    assert model["vocab_folded"] is True and model["greedy_steps"] == 4 and len(model["ours_top"]) == 5
    assert isinstance(model["kl_nats"], float) and model["kl_nats"] > 0


def test_quiet(capsys):
    rc, out, _ = run(capsys, "-q", "--text", "Hi", "--against", "text:User: Hi\n\nAssistant:")
    assert rc == 0 and out == "prompts agree (20 characters, 7 tokens)\n"


@pytest.mark.parametrize("args, message", [
    (["--text", "Hi", "--against", "ids:/no/such/file"], "cannot read ids file /no/such/file"),
    (["--text", "Hi", "--against", "text:x", "--greedy", "3"], "--greedy needs --checkpoint"),
    (["--text", "Hi", "--against", "builder:no_such_mod_q:f"], "cannot import"),
    (["--text", "Hi", "--against", "text:x", "--checkpoint", "/no/such.pth"], "/no/such.pth"),
])
def test_bad_input_exit_2(capsys, args, message):
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("parity: error:") and message in err


def test_subprocess_no_traceback(tmp_path):
    turns = tmp_path / "t.json"
    turns.write_text('[{"role": "assistant", "content": "x"}]', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "prompt", "--turns", str(turns), "--against", "text:x"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"parity: error: --turns file {turns}: the last message must be the user's (the prompt asks for the "
        "assistant's reply), got 'assistant'"]
