"""Tokenizer parity: encode one text with two tokenizers and say where they first disagree.

Either side is anything with ``encode(str) -> list[int]``; ``ours`` must also be a
``WorldTokenizer`` (or offer ``decode_bytes`` and ``decode``), because token strings, byte
offsets and the round trip are all read through our vocabulary. No printing here: the result is
a ``TokenizerDiff`` that the CLI (or a test) renders.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.errors import ParityError
from parity.tokenizer.world import default_vocab_path, load_vocabulary

MARK_OPEN, MARK_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: rare in real text, unlike [] or «»


@functools.lru_cache(maxsize=4)
def _load_official(path: str, mtime_ns: int):
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    except ImportError:
        raise ParityError("the official tokenizer needs the 'rwkv' package: `pip install rwkv==0.8.32`") from None
    return TRIE_TOKENIZER(path)


class OfficialWorldTokenizer:
    """Adapter around the official ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` (imported lazily)."""

    name = "official"

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        # TRIE_TOKENIZER eval()s every line of the file; our parser rejects anything that is not
        # a plain literal, so run it first and never hand the official loader a hostile file.
        load_vocabulary(path)
        # The official object itself (idx2token, token2idx) for tests that want an independent
        # view of the vocabulary; cached and shared between adapters, so read it, don't mutate it.
        self.trie_tokenizer = _load_official(str(path.resolve()), path.stat().st_mtime_ns)

    def __repr__(self) -> str:
        return "OfficialWorldTokenizer()"

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.trie_tokenizer.encode(text))
        except UnicodeEncodeError as exc:
            raise ParityError(f"text has a lone surrogate at character {exc.start}; it cannot be UTF-8 encoded") from None

    def decode_bytes(self, ids) -> bytes:
        return self.trie_tokenizer.decodeBytes(list(ids))


def _name(tok) -> str:
    return getattr(tok, "name", None) or type(tok).__name__


@dataclass(frozen=True)
class TokenizerDiff:
    """Outcome of one comparison; truthy when the ids agree and our round trip holds.

    Offsets: ``first_diff_token`` indexes both id lists; ``byte_offset`` is where that token
    starts in the text's UTF-8 bytes; ``char_offset`` is the character holding that byte (tokens
    can start mid-character). The marked region in ``snippet`` runs from there to the first byte
    where both tokenizations have a token boundary again.
    """

    ours_name: str
    theirs_name: str
    text_chars: int
    text_bytes: int
    ours_ids: tuple[int, ...] = field(repr=False)
    theirs_ids: tuple[int, ...] = field(repr=False)
    equal: bool
    round_trip_ok: bool
    round_trip_first_bad_char: int | None = None  # first char where decode(encode(text)) differs
    first_diff_token: int | None = None
    byte_offset: int | None = None
    region_end_byte: int | None = None
    char_offset: int | None = None
    snippet: str | None = None
    window_start: int | None = None  # token index of the first entry in the windows below
    ours_window: tuple[int, ...] = ()
    theirs_window: tuple[int, ...] = ()
    ours_window_tokens: tuple[str, ...] = ()
    theirs_window_tokens: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.equal and self.round_trip_ok

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self, *, include_ids: bool = False) -> dict[str, Any]:
        """JSON-safe (plain str/int/bool/None/list); the full id lists only when asked for."""
        out: dict[str, Any] = {
            "passed": self.passed,
            "equal": self.equal,
            "round_trip_ok": self.round_trip_ok,
            "round_trip_first_bad_char": self.round_trip_first_bad_char,
            "ours": self.ours_name,
            "theirs": self.theirs_name,
            "text_chars": self.text_chars,
            "text_bytes": self.text_bytes,
            "ours_count": len(self.ours_ids),
            "theirs_count": len(self.theirs_ids),
            "first_diff_token": self.first_diff_token,
            "byte_offset": self.byte_offset,
            "region_end_byte": self.region_end_byte,
            "char_offset": self.char_offset,
            "snippet": self.snippet,
            "window_start": self.window_start,
            "ours_window": list(self.ours_window),
            "theirs_window": list(self.theirs_window),
            "ours_window_tokens": list(self.ours_window_tokens),
            "theirs_window_tokens": list(self.theirs_window_tokens),
        }
        if include_ids:
            out["ours_ids"] = list(self.ours_ids)
            out["theirs_ids"] = list(self.theirs_ids)
        return out

    def describe(self) -> str:
        """One paragraph: agreement, or where and how the two tokenizations part."""
        ours, theirs = self.ours_name, self.theirs_name
        if self.equal:
            text = f"{ours} and {theirs} agree on all {len(self.ours_ids)} tokens of {self.text_chars} characters ({self.text_bytes} bytes)"
        else:
            def side(name, ids, toks):
                pairs = ", ".join(f"{i}:{t!r}" for i, t in zip(ids, toks))
                return f"{name} [{pairs}]"

            text = (
                f"{ours} ({len(self.ours_ids)} tokens) and {theirs} ({len(self.theirs_ids)} tokens) first differ at token "
                f"{self.first_diff_token}, byte offset {self.byte_offset} (character {self.char_offset}), in "
                f"{self.snippet!r}; tokens from index {self.window_start}: "
                f"{side(ours, self.ours_window, self.ours_window_tokens)} vs "
                f"{side(theirs, self.theirs_window, self.theirs_window_tokens)}"
            )
        if self.round_trip_ok:
            return text + f"; {ours} round trip decode(encode(text)) == text holds."
        return text + f"; {ours} round trip FAILS: decode(encode(text)) first differs from the text at character {self.round_trip_first_bad_char}."


def _token_strings(ours, ids) -> tuple[str, ...]:
    out = []
    for i in ids:
        try:
            # backslashreplace: a token may be a fragment of a character, show its raw bytes.
            out.append(ours.decode_bytes([i]).decode("utf-8", errors="backslashreplace"))
        except ParityError:
            out.append(f"<id {i} not in vocabulary>")
    return tuple(out)


def _token_ends(ours, ids, *, start_byte: int) -> list[int] | None:
    """Cumulative byte ends of ``ids`` starting at ``start_byte``; None when an id is unknown to us."""
    ends, pos = [], start_byte
    for i in ids:
        try:
            pos += len(ours.decode_bytes([i]))
        except ParityError:
            return None
        ends.append(pos)
    return ends


def _char_index(data: bytes, byte: int) -> int:
    """Index of the character that holds byte ``byte`` (len(text) at the end of the data)."""
    # In valid UTF-8 every byte that is not 0b10xxxxxx starts a character.
    return sum(1 for b in data[: byte + 1] if b & 0xC0 != 0x80) - (1 if byte < len(data) else 0)


def _first_mismatch(a: str, b: str) -> int | None:
    if a == b:
        return None
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_tokenizers(text: str, *, ours, theirs, context_chars: int = 20, context_tokens: int = 3) -> TokenizerDiff:
    """Encode ``text`` with both; report the first differing token and our round trip."""
    ours_ids = tuple(int(i) for i in ours.encode(text))  # ours first: it rejects unencodable text cleanly
    theirs_ids = tuple(int(i) for i in theirs.encode(text))
    data = text.encode("utf-8")
    round_trip = ours.decode(ours_ids, errors="replace")
    base = dict(
        ours_name=_name(ours), theirs_name=_name(theirs), text_chars=len(text), text_bytes=len(data),
        ours_ids=ours_ids, theirs_ids=theirs_ids, round_trip_ok=round_trip == text,
        round_trip_first_bad_char=_first_mismatch(round_trip, text),
    )
    first = next((k for k, (a, b) in enumerate(zip(ours_ids, theirs_ids)) if a != b), None)
    if first is None and len(ours_ids) != len(theirs_ids):
        first = min(len(ours_ids), len(theirs_ids))
    if first is None:
        return TokenizerDiff(equal=True, **base)

    byte_offset = len(ours.decode_bytes(ours_ids[:first]))  # the shared prefix, so either side's bytes
    ours_ends = _token_ends(ours, ours_ids[first:], start_byte=byte_offset) or []
    theirs_ends = _token_ends(ours, theirs_ids[first:], start_byte=byte_offset)
    if theirs_ends is None:  # their ids are not ours: mark just our differing token
        region_end = ours_ends[0] if ours_ends else len(data)
    else:
        common = set(ours_ends) & set(theirs_ends)
        region_end = min(common) if common else max(ours_ends + theirs_ends + [byte_offset])
    region_end = min(region_end, len(data))

    char_start = _char_index(data, byte_offset)
    char_end = max(_char_index(data, region_end - 1) + 1, char_start) if region_end > byte_offset else char_start
    snippet = (
        text[max(0, char_start - context_chars):char_start] + MARK_OPEN + text[char_start:char_end]
        + MARK_CLOSE + text[char_end:char_end + context_chars]
    )
    lo, hi = max(0, first - context_tokens), first + context_tokens + 1
    return TokenizerDiff(
        equal=False, first_diff_token=first, byte_offset=byte_offset, region_end_byte=region_end,
        char_offset=char_start, snippet=snippet, window_start=lo,
        ours_window=ours_ids[lo:hi], theirs_window=theirs_ids[lo:hi],
        ours_window_tokens=_token_strings(ours, ours_ids[lo:hi]),
        theirs_window_tokens=_token_strings(ours, theirs_ids[lo:hi]),
        **base,
    )
