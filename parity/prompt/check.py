"""Our chat prompt against a port's: the first difference in characters and in tokens.

No printing and no model here: ``compare_prompts`` returns a ``PromptCheck`` that the CLI (or a
test) renders; ``parity.prompt.effect`` adds what the difference does to the model.

Positions are 0-based indexes: ``CharDiff.index`` into the prompt text (Python characters, i.e.
code points), ``TokenDiff.index`` into the token lists. The differing region on each side runs
from the first difference to where the common suffix starts, so an insertion shows as an empty
region on one side (``⟦⟧``) and the inserted characters on the other (``⟦␠⟧``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from parity.errors import ParityError
from parity.tokenizer.check import MARK_CLOSE, MARK_OPEN

# Whitespace made visible, so a trailing space or a missing blank line can be seen in one line.
VISIBLE = {" ": "\u2420", "\n": "\u23ce", "\r": "\u240d", "\t": "\u21e5"}  # ␠ ⏎ ␍ ⇥
END_MARK = "\u2403"  # ␃ (end of text): shown where a prompt ends inside the context window


def visible(text: str) -> str:
    """``text`` on one line with whitespace and control characters made visible."""
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def first_difference(a, b) -> int | None:
    """Index of the first position where the sequences differ (the shorter's length if one is a prefix)."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def _common_suffix(a, b, *, start: int) -> int:
    n = 0
    limit = min(len(a), len(b)) - start
    while n < limit and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


@dataclass(frozen=True)
class CharDiff:
    """First character difference between our prompt text and theirs (None fields when equal)."""

    equal: bool
    index: int | None = None
    line: int | None = None  # 1-based line and column of ``index`` in OUR prompt
    column: int | None = None
    where: str | None = None  # which part of our prompt holds ``index`` (conversation.render_parts)
    ours_region: str | None = None  # the differing characters, raw
    theirs_region: str | None = None
    ours_snippet: str | None = None  # context + ⟦region⟧ + context, whitespace made visible
    theirs_snippet: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def char_diff(ours: str, theirs: str, *, before: int = 24, after: int = 12) -> CharDiff:
    k = first_difference(ours, theirs)
    if k is None:
        return CharDiff(equal=True)
    suffix = _common_suffix(ours, theirs, start=k)
    ours_end, theirs_end = len(ours) - suffix, len(theirs) - suffix

    def snippet(text: str, end: int) -> str:
        lead = max(0, k - before)
        region = text[k:end]
        if len(region) > 2 * after:  # a long region: its two ends say enough
            region = visible(region[:after]) + f"\u2026[{len(region) - 2 * after} more]\u2026" + visible(region[-after:])
        else:
            region = visible(region)
        tail = text[end:end + after]
        return ("\u2026" if lead else "") + visible(text[lead:k]) + MARK_OPEN + region + MARK_CLOSE + \
            visible(tail) + ("\u2026" if end + after < len(text) else END_MARK)

    return CharDiff(
        equal=False, index=k, line=ours.count("\n", 0, k) + 1, column=k - (ours.rfind("\n", 0, k) + 1) + 1,
        ours_region=ours[k:ours_end], theirs_region=theirs[k:theirs_end],
        ours_snippet=snippet(ours, ours_end), theirs_snippet=snippet(theirs, theirs_end),
    )


@dataclass(frozen=True)
class TokenDiff:
    """First token difference between our ids and theirs (World tokenizer ids)."""

    equal: bool
    ours_count: int
    theirs_count: int
    index: int | None = None
    char_index: int | None = None  # the character (of our text) where the differing token starts
    window_start: int | None = None  # token index of the first entry of the windows
    ours_window: tuple[tuple[int, str], ...] = ()  # (id, token text made visible)
    theirs_window: tuple[tuple[int, str], ...] = ()

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["ours_window"] = [list(t) for t in self.ours_window]
        d["theirs_window"] = [list(t) for t in self.theirs_window]
        return d


def token_text(tokenizer, token_id: int) -> str:
    try:
        # backslashreplace: a token may be a fragment of a UTF-8 character; show its raw bytes.
        return visible(tokenizer.decode_bytes([token_id]).decode("utf-8", errors="backslashreplace"))
    except ParityError:
        return f"<id {token_id} not in the vocabulary>"


def _char_at_byte(data: bytes, byte: int) -> int:
    """Index of the character holding byte ``byte`` of UTF-8 ``data`` (the character count at the end)."""
    if byte >= len(data):
        return sum(1 for b in data if b & 0xC0 != 0x80)
    # Every byte that is not 0b10xxxxxx starts a character.
    return sum(1 for b in data[: byte + 1] if b & 0xC0 != 0x80) - 1


def token_diff(*, ours_text: str, ours_ids, theirs_ids, tokenizer, context: int = 3) -> TokenDiff:
    ours_ids, theirs_ids = tuple(ours_ids), tuple(theirs_ids)
    t = first_difference(ours_ids, theirs_ids)
    if t is None:
        return TokenDiff(equal=True, ours_count=len(ours_ids), theirs_count=len(theirs_ids))
    byte = len(tokenizer.decode_bytes(ours_ids[:t]))  # the shared prefix: either side's bytes
    lo, hi = max(0, t - context), t + context + 1
    return TokenDiff(
        equal=False, ours_count=len(ours_ids), theirs_count=len(theirs_ids), index=t,
        char_index=_char_at_byte(ours_text.encode("utf-8"), byte), window_start=lo,
        ours_window=tuple((i, token_text(tokenizer, i)) for i in ours_ids[lo:hi]),
        theirs_window=tuple((i, token_text(tokenizer, i)) for i in theirs_ids[lo:hi]),
    )


@dataclass(frozen=True)
class PromptCheck:
    """Outcome of one check; truthy when the port's prompt is ours, in characters and in tokens."""

    template: str
    messages: tuple  # the conversation (``Message`` objects)
    against: dict  # ``TheirPrompt.to_dict()``
    ours_text: str
    ours_ids: tuple[int, ...]
    theirs_text: str | None  # None when their ids do not decode to UTF-8 text
    theirs_ids: tuple[int, ...]
    chars: CharDiff | None  # None when there is no text of theirs to compare
    tokens: TokenDiff
    notes: tuple[str, ...] = ()
    # What the difference does to the model, when asked for: a parity.prompt.effect.ModelEffect.
    # Not imported here, even for type checking: effect.py builds on this module, not the reverse.
    model: object | None = None

    @property
    def passed(self) -> bool:
        return self.tokens.equal and (self.chars is None or self.chars.equal)

    def __bool__(self) -> bool:
        return self.passed

    def verdict(self) -> str:
        if self.passed:
            return f"prompts agree ({len(self.ours_text)} characters, {len(self.ours_ids)} tokens)"
        where = []
        if self.chars is not None and not self.chars.equal:
            where.append(f"character {self.chars.index} (line {self.chars.line}, column {self.chars.column})")
        elif self.chars is not None:
            where.append("the same characters")
        if not self.tokens.equal:
            where.append(f"token {self.tokens.index}")
        return "PROMPTS DIFFER at " + ", ".join(where)

    def to_dict(self) -> dict:
        return {
            "kind": "prompt-check",
            "passed": self.passed,
            "verdict": self.verdict(),
            "template": self.template,
            "messages": [m.to_dict() for m in self.messages],
            "against": self.against,
            "ours": {"text": self.ours_text, "ids": list(self.ours_ids)},
            "theirs": {"text": self.theirs_text, "ids": list(self.theirs_ids)},
            "characters": self.chars.to_dict() if self.chars is not None else None,
            "tokens": self.tokens.to_dict(),
            "notes": list(self.notes),
            "model": self.model.to_dict() if self.model is not None else None,
        }


def compare_prompts(*, template: str, messages, theirs, tokenizer=None) -> PromptCheck:
    """Build our prompt for ``messages`` and compare it with ``theirs`` (a ``TheirPrompt``)."""
    from parity.prompt.conversation import CHATRWKV_TURN_END, part_at, render_parts

    if tokenizer is None:
        from parity.tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
    messages = tuple(messages)
    parts = render_parts(template, messages)
    ours_text = "".join(text for _, text in parts)
    ours_ids = tuple(tokenizer.encode(ours_text))
    notes: list[str] = []
    if theirs.ids is not None:
        theirs_ids = tuple(theirs.ids)
        try:
            theirs_text = tokenizer.decode(theirs_ids)
        except ParityError as exc:
            theirs_text = None
            notes.append(f"their ids do not decode to text with the World tokenizer ({exc}); only tokens are compared")
    else:
        theirs_text = theirs.text
        theirs_ids = tuple(tokenizer.encode(theirs_text))
    conv = theirs.conversation
    if conv is not None:
        if conv.system_prefix_token_ids:
            theirs_ids = conv.system_prefix_token_ids + theirs_ids
            notes.append(f"their system_prefix_token_ids {list(conv.system_prefix_token_ids)} are prepended to the ids")
        if template == "chatrwkv" and CHATRWKV_TURN_END not in conv.stop_str:
            notes.append(f"their stop_str {list(conv.stop_str)!r} lacks {CHATRWKV_TURN_END!r}, where a ChatRWKV turn ends: "
                         "the model would go on to write the next turn itself")
    if not theirs_ids:
        raise ParityError(f"their prompt ({theirs.description}) is empty")
    chars = char_diff(ours_text, theirs_text) if theirs_text is not None else None
    if chars is not None and not chars.equal:
        chars = dataclasses.replace(chars, where=part_at(parts, chars.index))
    tokens = token_diff(ours_text=ours_text, ours_ids=ours_ids, theirs_ids=theirs_ids, tokenizer=tokenizer)
    if chars is not None and chars.equal and not tokens.equal:
        notes.append("the same text, different ids: their tokenizer splits it differently from the World tokenizer "
                     "(`parity tokenize --against` checks a tokenizer)")
    return PromptCheck(template=template, messages=messages, against=theirs.to_dict(), ours_text=ours_text,
                       ours_ids=ours_ids, theirs_text=theirs_text, theirs_ids=theirs_ids, chars=chars, tokens=tokens,
                       notes=tuple(notes))
