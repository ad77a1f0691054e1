import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.errors import ParityError
from parity.tokenizer import FirstMissTokenizer, WorldTokenizer, load_vocabulary, parse_vocabulary
from parity.tokenizer import world as world_mod
from parity.tokenizer.world import default_vocab_path

# -- ours == official ----------------------------------------------------------------------------


def test_corpus_covers_the_promised_scripts(corpus):
    ranges = {
        "latin-umlaut": "äöüß", "cyrillic": "Жж", "greek": "λΚ", "arabic": "م", "hebrew": "ש", "devanagari": "न",
        "han": "京", "kana": "しカ", "hangul": "한", "thai": "ส", "vietnamese": "ệ", "combining": "\u0301",
        "zwj": "\u200d", "skin-tone": "\U0001F3FD", "tab": "\t", "control": "\x1b",
    }
    missing = [name for name, chars in ranges.items() if not any(c in corpus for c in chars)]
    assert not missing
    assert 60 <= corpus.count("\n") <= 100 and len(corpus.encode()) < 20_000


def test_every_corpus_line_matches_official(world, official, corpus):
    lines = corpus.split("\n")  # not splitlines(): \x0b, \x0c, \x1c ... are inside lines on purpose
    bad = [(k, line) for k, line in enumerate(lines) if world.encode(line) != official.encode(line)]
    assert bad == []
    for line in lines:
        assert world.decode(world.encode(line)) == line


def test_whole_corpus_matches_official_and_round_trips(world, official, corpus):
    ids = world.encode(corpus)
    assert ids == official.encode(corpus)
    assert world.decode(ids) == corpus
    assert world.decode_bytes(ids) == corpus.encode("utf-8")
    assert len(ids) < len(corpus.encode("utf-8")) / 2  # multi-byte tokens are really being used


_WORLD = WorldTokenizer()


# Real vocabulary tokens glued together: the text where longest match has the most boundaries to
# get wrong (random code points mostly fall back to one character per token).
def _utf8_tokens() -> list[str]:
    out = []
    for tok in _WORLD.vocab.id_to_bytes.values():
        try:
            out.append(tok.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return sorted(out)


VOCAB_STRINGS = _utf8_tokens()
any_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)))
emoji = st.one_of(
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.sampled_from(["\u2764\ufe0f", "\u2600\ufe0f", "\U0001F3F3\ufe0f", "1\ufe0f\u20e3"]),
)
emoji_seq = st.one_of(
    st.tuples(emoji, st.sampled_from([chr(c) for c in range(0x1F3FB, 0x1F400)])).map("".join),  # skin tones
    st.lists(emoji, min_size=2, max_size=4).map("\u200d".join),  # ZWJ sequences
    st.tuples(*[st.characters(min_codepoint=0x1F1E6, max_codepoint=0x1F1FF)] * 2).map("".join),  # flags
)
combining = st.tuples(
    st.characters(min_codepoint=0x41, max_codepoint=0x7A),
    st.text(alphabet=st.characters(min_codepoint=0x300, max_codepoint=0x36F), min_size=1, max_size=3),
).map("".join)
mixed_piece = st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK ideographs
    st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),  # kana
    st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),  # hangul
    emoji, emoji_seq, combining,
    st.sampled_from(VOCAB_STRINGS),
    st.text(alphabet=string.ascii_letters + " \t\n", max_size=8),
)
mixed_text = st.lists(mixed_piece, max_size=20).map("".join)


def _assert_matches(world, official, text):
    ids = world.encode(text)
    assert ids == official.encode(text), f"ours != official on {text!r}"
    assert world.decode(ids) == text


CI = settings(max_examples=2000, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The long runs (marked slow) draw 4000 more each: 10,000 cost ~70 s apiece of CI's two cores.
LONG = settings(max_examples=4000, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CI
@given(text=any_text)
def test_matches_official_on_any_unicode(world, official, text):
    _assert_matches(world, official, text)


@CI
@given(text=mixed_text)
def test_matches_official_on_cjk_emoji_combining_and_vocab_tokens(world, official, text):
    _assert_matches(world, official, text)


@pytest.mark.slow
@LONG
@given(text=any_text)
def test_matches_official_on_any_unicode_long(world, official, text):
    _assert_matches(world, official, text)


@pytest.mark.slow
@LONG
@given(text=mixed_text)
def test_matches_official_on_mixed_text_long(world, official, text):
    _assert_matches(world, official, text)


def test_encodes_ten_thousand_short_strings_and_round_trips(world):
    # Speed is a benchmark's business, not a test's (a loaded CI machine would fail a timing); this
    # keeps the bulk case that a slow, quadratic encoder would also make visible as a hang.
    texts = [f"Item {k}: 价格 {k * 3.7:.2f} € — naïve café #{k % 97} 🙂" for k in range(10_000)]
    encoded = [world.encode(t) for t in texts]
    assert all(world.decode(ids) == t for ids, t in zip(encoded[::97], texts[::97]))


# -- greedy longest match, on a vocabulary small enough to reason about ----------------------------
def _vocab_file(tmp_path, lines: list[str], *, newline: str = "\n"):
    path = tmp_path / "vocab.txt"
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


TINY = ["1 'a' 1", "2 'b' 1", "3 'c' 1", "4 'abc' 3", "5 b'\\xe4' 1", "6 '\u00e4' 2", "7 ' ' 1"]


def test_longest_match_walks_past_prefixes_that_are_not_tokens(tmp_path):
    path = _vocab_file(tmp_path, TINY)
    # "ab" is not a token, yet "abc" must win over "a".
    assert WorldTokenizer(path).encode("abcab c") == [4, 1, 2, 7, 3]
    assert FirstMissTokenizer(path).encode("abcab c") == [1, 2, 3, 1, 2, 7, 3]


def test_crlf_vocab_file_parses_like_lf(tmp_path):
    path = _vocab_file(tmp_path, TINY, newline="\r\n")
    tok = WorldTokenizer(path)
    assert tok.decode_bytes([4, 6]) == "abcä".encode()
    assert tok.vocab_size == len(TINY)


def test_byte_that_starts_no_token_is_a_parity_error(tmp_path):
    tok = WorldTokenizer(_vocab_file(tmp_path, TINY))
    with pytest.raises(ParityError, match=r"byte 0x7a at offset 2"):
        tok.encode("abz")


# -- the vocabulary parser -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("8 'unterminated 12", "not a Python literal"),
        ("8 'abc' 4", "is 3 bytes but the line says 4"),
        ("8 '\u00e4' 1", "is 2 bytes but the line says 1"),
        ("8 123 3", "single str or bytes literal"),
        ("8 ('a', 'b') 2", "single str or bytes literal"),
        ("8 f'{1}' 1", "single str or bytes literal"),
        ("8 '\\ud800' 3", "lone surrogate"),
        ("x8 'q' 1", "non-negative integers"),
        ("8 'q' one", "non-negative integers"),
        ("8'q'1", "expected 'id literal byte_len'"),
        ("1 'z' 1", "id 1 appears twice"),
        ("8 'a' 1", "already has id 1"),
        ("8 '' 0", "empty token"),
    ],
)
def test_malformed_vocab_line_names_its_line_number(tmp_path, bad_line, message):
    text = "\n".join(TINY[:3] + [bad_line] + TINY[3:])
    with pytest.raises(ParityError, match=message) as info:
        parse_vocabulary(text, where="v.txt")
    assert str(info.value).startswith("v.txt:4:")


def test_import_payload_in_vocab_is_rejected_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"9 __import__('pathlib').Path({str(marker)!r}).write_text('x') 1"
    path = _vocab_file(tmp_path, TINY + [payload])
    with pytest.raises(ParityError, match=r"vocab.txt:8: .*single str or bytes literal"):
        WorldTokenizer(path)
    assert not marker.exists()


def test_missing_vocab_file_and_missing_rwkv_package(tmp_path, monkeypatch):
    with pytest.raises(ParityError, match="cannot read vocabulary"):
        load_vocabulary(tmp_path / "nope.txt")
    monkeypatch.setattr(world_mod, "_RWKV_PACKAGE", "rwkv_package_that_is_not_installed")
    with pytest.raises(ParityError, match="pass a vocabulary path or `pip install rwkv"):
        WorldTokenizer()


def test_shipped_vocabulary_facts(world):
    # docs/RWKV.md §5: ids 1..65529, ids 1-256 are the single bytes (byte value + 1).
    assert default_vocab_path().name == "rwkv_vocab_v20230424.txt"
    assert world.vocab_size == 65529
    assert sorted(world.vocab.id_to_bytes) == list(range(1, 65530))
    assert all(world.decode_bytes([b + 1]) == bytes([b]) for b in range(256))


# -- encode / decode errors ------------------------------------------------------------------------
def test_lone_surrogate_is_rejected_cleanly(world):
    with pytest.raises(ParityError, match=r"lone surrogate U\+D800 at character 2") as info:
        world.encode("ab\ud800cd")
    assert "\n" not in str(info.value)
    with pytest.raises(ParityError, match="use encode_bytes"):
        world.encode(b"abc")


def test_decode_of_invalid_utf8_strict_and_replace(world):
    e4, a = 0xE4 + 1, ord("a") + 1  # byte tokens: "\xe4" alone starts a 3-byte char and never finishes
    ids = [a, e4, a]
    assert world.decode_bytes(ids) == b"a\xe4a"
    with pytest.raises(ParityError, match=r"bad byte 0xe4 at byte offset 1 \(in token 1, id 229"):
        world.decode(ids)
    assert world.decode(ids, errors="replace") == "a\ufffda"
    # A character split over two tokens decodes fine once both halves are there.
    split = world.encode_bytes("京".encode()[:2]) + world.encode_bytes("京".encode()[2:])
    assert world.decode(split) == "京"
    with pytest.raises(ParityError, match="errors must be one of"):
        world.decode(ids, errors="ignore")


@pytest.mark.parametrize("bad_id", [0, 65530, -1, 10**9])
def test_ids_outside_the_vocabulary(world, bad_id):
    with pytest.raises(ParityError, match=rf"token id {bad_id} at position 1 is not in the vocabulary"):
        world.decode_bytes([5, bad_id, 6])
    with pytest.raises(ParityError, match="not in the vocabulary"):
        world.decode([bad_id])
