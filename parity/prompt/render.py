"""A ``PromptCheck`` as console lines and as a Markdown summary (a PR comment), like ``parity report``."""

from __future__ import annotations

from parity.prompt.check import PromptCheck, visible

_SHOWN_CHARS = 160  # a whole prompt is shown when it is this short; longer ones are cut in the middle


def _short(text: str) -> str:
    shown = visible(text)
    if len(shown) <= _SHOWN_CHARS:
        return shown
    half = _SHOWN_CHARS // 2
    return shown[:half] + f" …[{len(shown) - 2 * half} characters]… " + shown[-half:]


def _region(text: str) -> str:
    if not text:
        return "nothing"
    shown = visible(text)
    return f"{shown!r}" if len(shown) <= 24 else f"{len(text)} characters"


def _window(window, *, start: int, count: int) -> str:
    items = [f"{i}:{tok}" for i, tok in window]
    if start + len(window) >= count:
        items.append("␃")  # this side ends inside the window
    return f"[{start}] " + "  ".join(items)


def _top(top) -> list[str]:
    return [f"{i}" + (f" {tok}" if tok is not None else "") + f" ({p:.3f})" for i, p, tok in top]


def _kl(x: float) -> str:
    return f"{x:.3g}"


def describe_lines(check: PromptCheck) -> list[str]:
    """Everything but the verdict line, as plain lines for the console."""
    against = check.against
    lines = [
        f"ours:   {check.template} template, {len(check.messages)} message(s) -> {_short(check.ours_text)}  "
        f"[{len(check.ours_text)} characters, {len(check.ours_ids)} tokens]",
        f"theirs: {against['description']} -> "
        + (_short(check.theirs_text) if check.theirs_text is not None else "(ids only)")
        + f"  [{len(check.theirs_text) if check.theirs_text is not None else '-'} characters, {len(check.theirs_ids)} tokens]",
    ]
    c = check.chars
    if c is None:
        lines.append("characters: not compared (their ids do not decode to text)")
    elif c.equal:
        lines.append("characters: the same")
    else:
        lines += [
            f"characters: first difference at character {c.index} (line {c.line}, column {c.column}), "
            f"{c.where}: ours has {_region(c.ours_region)} there, theirs {_region(c.theirs_region)}",
            f"  ours:   {c.ours_snippet}",
            f"  theirs: {c.theirs_snippet}",
        ]
    t = check.tokens
    if t.equal:
        lines.append(f"tokens: the same {t.ours_count} World tokenizer ids")
    else:
        lines += [
            f"tokens: first difference at token {t.index} (it starts at character {t.char_index}); "
            f"ours has {t.ours_count} tokens, theirs {t.theirs_count}",
            f"  ours:   {_window(t.ours_window, start=t.window_start, count=t.ours_count)}",
            f"  theirs: {_window(t.theirs_window, start=t.window_start, count=t.theirs_count)}",
        ]
    lines += [f"note: {n}" for n in check.notes]
    m = check.model
    if m is not None:
        lines.append(f"model: the reference on {m.model} from {m.checkpoint}"
                     + (" (ids folded id % V: ids shown, not text)" if m.vocab_folded else ""))
        lines.append(f"  next token: KL(ours ‖ theirs) = {_kl(m.kl_nats)} nats; top-1 "
                     + ("the same" if m.same_top1 else "DIFFERS") + f": ours {_top(m.ours_top)[0]}, theirs {_top(m.theirs_top)[0]}")
        lines.append("  top-5 ours:   " + ", ".join(_top(m.ours_top)))
        lines.append("  top-5 theirs: " + ", ".join(_top(m.theirs_top)))
        n = m.greedy_steps if m.part_at is None else m.part_at + 1
        def cont(tokens, text):
            return f"{list(tokens[:n])}" + (f" {text!r}" if text is not None and m.part_at is None else "")
        if m.part_at is None:
            lines.append(f"  greedy: the same {m.greedy_steps} tokens from both prompts: {cont(m.ours_greedy, m.ours_greedy_text)}")
        else:
            lines.append(f"  greedy: the continuations part at token {m.part_at}: ours {cont(m.ours_greedy, None)}, "
                         f"theirs {cont(m.theirs_greedy, None)}")
    return lines


def _md_code(text: str) -> str:
    # A backtick would end the code span and a bare "|" the table cell; both are shown escaped.
    return "`" + text.replace("`", "\u02cb").replace("|", "\\|") + "`"


def markdown(check: PromptCheck) -> str:
    """A short Markdown summary: verdict, where the prompts part, what it does to the model."""
    head = "### ✅ rwkv-parity: prompts agree" if check.passed else "### ❌ rwkv-parity: the port's chat prompt differs"
    out = [head, "", check.verdict(), "",
           f"Against: {check.against['description']}; template `{check.template}`, {len(check.messages)} message(s).", ""]
    c, t = check.chars, check.tokens
    out += ["| | ours | theirs |", "|---|---|---|",
            f"| prompt | {_md_code(_short(check.ours_text))} | "
            + (_md_code(_short(check.theirs_text)) if check.theirs_text is not None else "(ids only)") + " |",
            f"| characters | {len(check.ours_text)} | {len(check.theirs_text) if check.theirs_text is not None else '-'} |",
            f"| tokens | {t.ours_count} | {t.theirs_count} |"]
    if c is not None and not c.equal:
        out.append(f"| first character difference: {c.index} (line {c.line}, col {c.column}), {c.where} | "
                   f"{_md_code(c.ours_snippet)} | {_md_code(c.theirs_snippet)} |")
    if not t.equal:
        out.append(f"| first token difference: {t.index} | "
                   f"{_md_code(_window(t.ours_window, start=t.window_start, count=t.ours_count))} | "
                   f"{_md_code(_window(t.theirs_window, start=t.window_start, count=t.theirs_count))} |")
    m = check.model
    if m is not None:
        out += [f"| next-token top-5 ({m.model}) | {_md_code(', '.join(_top(m.ours_top)))} | "
                f"{_md_code(', '.join(_top(m.theirs_top)))} |",
                f"| greedy continuation | {_md_code(str(list(m.ours_greedy)))} | {_md_code(str(list(m.theirs_greedy)))} |",
                "", f"KL(ours ‖ theirs) of the next token: {_kl(m.kl_nats)} nats; greedy continuations "
                + ("agree." if m.part_at is None else f"part at token {m.part_at}.")]
        out += [f"> {w}" for w in m.warnings]
    out += [""] + [f"- {n}" for n in check.notes]
    return "\n".join(out).rstrip() + "\n"
