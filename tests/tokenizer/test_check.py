import argparse
import io
import json

import pytest
from rich.console import Console

from parity.errors import ParityError
from parity.tokenizer import OfficialWorldTokenizer, WorldTokenizer, compare_tokenizers
from parity.tokenizer.check import MARK_CLOSE, MARK_OPEN
from parity.tokenizer.cli import add_tokenize_parser, cmd_tokenize

JAPANESE = "東京で日本語を勉強しています。"  # Kanji + kana: long kana tokens with non-token prefixes


def _expected_first_miss_divergence(official, text):
    """Where a first-miss encoder must part from the official one, from the official tables alone.

    It emits the same token as long as every proper prefix of the official token is a token too;
    the first official token with a non-token prefix is where it stops short.
    """
    idx2token = official.trie_tokenizer.idx2token
    tokens = set(idx2token.values())
    ids = official.encode(text)
    for pos, i in enumerate(ids):
        tok = idx2token[i]
        if any(tok[:k] not in tokens for k in range(1, len(tok))):
            return pos, sum(len(idx2token[j]) for j in ids[:pos])
    return None


def test_first_miss_mutant_is_caught_on_a_cjk_sentence(first_miss, official):
    expected = _expected_first_miss_divergence(official, JAPANESE)
    assert expected is not None and expected[0] > 0  # the sentence really exercises the bug mid-way
    pos, byte_offset = expected
    diff = compare_tokenizers(JAPANESE, ours=first_miss, theirs=official)
    assert not diff and not diff.equal
    assert diff.first_diff_token == pos
    assert diff.byte_offset == byte_offset
    assert diff.char_offset == len(JAPANESE.encode()[:byte_offset].decode("utf-8"))
    # The mutant's token there is a strict prefix of the official one: it stopped short.
    ours_tok = first_miss.decode_bytes([diff.ours_ids[pos]])
    theirs_tok = official.trie_tokenizer.idx2token[diff.theirs_ids[pos]]
    assert theirs_tok.startswith(ours_tok) and len(ours_tok) < len(theirs_tok)
    # The marked region starts where the divergence does and covers the official token.
    region = diff.snippet.split(MARK_OPEN, 1)[1].split(MARK_CLOSE, 1)[0]
    assert diff.snippet.split(MARK_OPEN, 1)[0] == JAPANESE[:diff.char_offset][-20:]
    assert region.encode().startswith(theirs_tok)
    assert diff.round_trip_ok  # the mutant's tokens are still real tokens


def test_equal_texts_pass_and_describe_says_so(world, official):
    diff = compare_tokenizers("Hello, 世界! 👩🏽‍💻", ours=world, theirs=official)
    assert diff and diff.equal and diff.round_trip_ok
    assert diff.first_diff_token is None and diff.snippet is None
    assert diff.describe().startswith(f"world and official agree on all {len(diff.ours_ids)} tokens")


def test_to_dict_is_json_safe_with_windows_and_token_strings(world, first_miss):
    text = "Hello there, the quick brown fox.\n\tend"
    diff = compare_tokenizers(text, ours=world, theirs=first_miss, context_tokens=2)
    d = json.loads(json.dumps(diff.to_dict(include_ids=True), allow_nan=False))
    k = d["first_diff_token"]
    assert d["ours_ids"][:k] == d["theirs_ids"][:k] and d["ours_ids"][k] != d["theirs_ids"][k]
    assert d["window_start"] == max(0, k - 2)
    assert d["ours_window"] == d["ours_ids"][d["window_start"]:k + 3]
    assert "".join(d["ours_window_tokens"]) == world.decode(d["ours_window"])
    assert d["ours_count"] == len(world.encode(text)) and not d["passed"]
    para = diff.describe()
    assert f"first differ at token {k}, byte offset {d['byte_offset']}" in para and "\n" not in para


def test_token_strings_show_split_characters_as_escaped_bytes(world):
    class ByteWise:  # a "tokenizer" that emits raw byte tokens (valid ids, different split)
        name = "bytewise"

        def encode(self, text):
            return [b + 1 for b in text.encode()]

    diff = compare_tokenizers("ab京", ours=world, theirs=ByteWise())
    assert diff.first_diff_token == 0 and diff.byte_offset == 0
    assert diff.theirs_window_tokens[2] == "\\xe4"
    assert diff.snippet == f"{MARK_OPEN}ab{MARK_CLOSE}京"  # ours has "ab" as one token; both split after it


def test_unknown_ids_on_their_side_do_not_break_the_report(world):
    class Broken:
        def encode(self, text):
            return [10**9]

    diff = compare_tokenizers("x", ours=world, theirs=Broken())
    assert diff.theirs_name == "Broken" and diff.first_diff_token == 0
    assert diff.theirs_window_tokens == ("<id 1000000000 not in vocabulary>",)


def test_round_trip_failure_is_reported(world):
    class DropsLast(WorldTokenizer):
        name = "drops-last"

        def encode_bytes(self, data):
            return super().encode_bytes(data)[:-1]

    dropper = DropsLast(vocabulary=world.vocab)
    diff = compare_tokenizers("abc 東京", ours=dropper, theirs=dropper)
    assert diff.equal and not diff.round_trip_ok and not diff
    assert diff.round_trip_first_bad_char == len("abc 東")
    assert "round trip FAILS" in diff.describe()


def test_official_adapter_never_evals_a_hostile_vocab(tmp_path):
    marker = tmp_path / "pwned"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(f"1 'a' 1\n2 __import__('pathlib').Path({str(marker)!r}).touch() 1\n", encoding="utf-8")
    with pytest.raises(ParityError, match=r"vocab.txt:2:"):
        OfficialWorldTokenizer(vocab)
    assert not marker.exists()


def test_unencodable_text_is_a_parity_error(world, official):
    with pytest.raises(ParityError, match="lone surrogate"):
        compare_tokenizers("ok \udcff", ours=world, theirs=official)


# -- the tokenize subcommand -------------------------------------------------------------------
def _run(argv):
    parser = argparse.ArgumentParser()
    add_tokenize_parser(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    code = cmd_tokenize(parser.parse_args(["tokenize", *argv]), Console(file=out, width=200, highlight=False))
    return code, out.getvalue()


def test_cli_exit_0_when_equal(official):
    code, out = _run(["--text", JAPANESE])
    assert code == 0 and "tokenizers agree" in out


def test_cli_exit_1_against_the_mutant_and_json(tmp_path):
    code, out = _run(["--text", JAPANESE, "--against", "first-miss", "--json", str(tmp_path / "r.json"), "--quiet"])
    assert code == 1
    assert out.strip().splitlines() == [out.strip()] and out.startswith("TOKENIZERS DIFFER at token")
    d = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert d["theirs"] == "first-miss" and d["first_diff_token"] is not None and len(d["ours_ids"]) == d["ours_count"]


def test_cli_file_input_and_file_errors(tmp_path, official):
    good = tmp_path / "good.txt"
    good.write_bytes("line one\r\nzweite Zeile äöü\n".encode())
    assert _run(["--file", str(good)])[0] == 0
    with pytest.raises(ParityError, match="cannot read --file .*missing.txt"):
        _run(["--file", str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\xff")
    with pytest.raises(ParityError, match=r"not valid UTF-8: byte 0xff at offset 2"):
        _run(["--file", str(bad)])


def test_cli_needs_exactly_one_source():
    with pytest.raises(SystemExit):
        _run([])
    with pytest.raises(SystemExit):
        _run(["--text", "a", "--file", "b"])


def test_tokenize_against_any_other_tokenizer(tmp_path):
    """--against module:attribute (here a .py file): another port's tokenizer gets the same check."""
    import subprocess
    import sys

    (tmp_path / "other_port.py").write_text(
        "from parity.tokenizer.mutants import FirstMissTokenizer\n"
        "def make():\n"
        "    return FirstMissTokenizer()\n"
    )
    spec = f"{tmp_path / 'other_port.py'}:make"
    run = lambda text: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "parity.cli", "tokenize", "--text", text, "--against", spec, "-q"],
        capture_output=True, text=True,
    )
    same, differs = run("the cat"), run("東京で日本語を勉強しています。")
    assert same.returncode == 0 and "tokenizers agree" in same.stdout
    assert differs.returncode == 1 and "TOKENIZERS DIFFER at token 9 (byte 27)" in differs.stdout
    bad = subprocess.run([sys.executable, "-m", "parity.cli", "tokenize", "--text", "x", "--against", f"{tmp_path}/nope.py:make"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
