"""A short Markdown summary of one comparison result, sized for a pull-request comment.

The HTML report is the full story; this is the paragraph a reviewer reads first: the verdict, where
the run first diverged and how badly, how to reproduce it, the few records furthest past their
tolerance, and a link to the HTML artifact (a placeholder by default, for CI to fill in).

Strings taken from the result (stage names, backend names, paths) are user input as far as a PR
comment is concerned: a stage called ``<img src=x onerror=...>`` or ``*[x](javascript:...)*`` must
show as text. Plain identifiers go in code spans, which Markdown renders literally; anything else
is backslash-escaped, with ``<``, ``>`` and ``&`` as entities so no renderer can read a tag.
Like the HTML report, this reads the result defensively: a missing key shows as a dash.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any

from parity.errors import ParityError
from parity.explain.render import likely_cause_markdown
from parity.report.values import format_number, metric_value

__all__ = ["render_markdown", "tolerance_ratio"]

HTML_LINK_PLACEHOLDER = "{HTML_REPORT_URL}"

# Characters that can start or end Markdown markup anywhere in a line. ``.``, ``-`` and ``+`` only
# matter at the start of a line, and untrusted text never starts one here.
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#!|~])")
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Safe verbatim inside a code span, also inside a table cell (no ``|``) and on one line.
_PLAIN_IDENT = re.compile(r"^[A-Za-z0-9_.:/+=,@ -]+$")


def tolerance_ratio(record: dict) -> float | None:
    """How far a record is from its tolerance edge: ``min_atol / atol`` (> 1 fails), None if unknown.

    min_atol is the smallest atol that passes at the record's rtol, so the ratio ranks rtol-heavy
    and atol-heavy stages on one scale. Without it (older results), max_abs / atol is the fallback;
    it overstates stages that rtol covers. Non-finite and shape failures rank above everything.
    """
    if not _passed(record) and record.get("reason") in ("nonfinite", "shape"):
        return math.inf
    atol = _num(record.get("atol"))
    err = _num(record.get("min_atol"))
    if err is None:
        err = _num(record.get("max_abs"))
    if err is None or atol is None or math.isnan(err) or math.isnan(atol):
        return None
    if err <= 0:
        return 0.0
    if atol <= 0:
        return math.inf
    return err / atol


def render_markdown(result: dict, *, html_link: str = HTML_LINK_PLACEHOLDER, top: int = 5) -> str:
    """The summary as Markdown (GitHub-flavoured: tables, fenced code), ending in a newline."""
    if not isinstance(result, dict):
        raise ParityError(
            f"a Markdown summary needs the comparison result as a JSON object (dict), got {type(result).__name__}; "
            "pass the output of RunComparison.to_dict() or a saved result .json"
        )
    records = _list_of_dicts(result, "records")
    first = result.get("first_divergence") if isinstance(result.get("first_divergence"), dict) else None
    diverged = first is not None or result.get("verdict") in ("divergence", "crashed", "timed out")

    parts = [_headline(result, records=records, diverged=diverged)]
    crash = _crashes(result)
    if crash:
        parts.append(crash)
    if first is not None:
        parts.append(_first_divergence(first, steps=_list_of_dicts(result, "steps")))
        parts += [likely_cause_markdown(result["explanation"])] if isinstance(result.get("explanation"), dict) else []
    elif diverged and not crash:
        parts.append("The verdict is divergence but the result names no first divergence; see the failing "
                     "records below.")
    parts += [p for p in (_reproduce(result), _model_checks(result), _warnings(result), _comparisons(result),
                          _notes(result)) if p]
    parts.append(_worst_table(records, top=top))
    parts.append(f"[Full HTML report]({_link_target(html_link)})")
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- escaping


def _text(value: Any) -> str:
    """Untrusted text as Markdown that renders to exactly that text: no markup, no HTML."""
    text = " ".join(str(value).split())  # a newline could end a table row or start a block
    text = _MD_PUNCT.sub(r"\\\1", text)
    return "".join(_HTML_ENTITIES.get(ch, ch) for ch in text)


def _code(value: Any) -> str:
    """A name in a code span when it is a plain identifier, else escaped text.

    Code spans are literal, but entities are too (``&lt;`` would show as typed), so anything with
    ``<``, ``&``, a backtick or a pipe is safer as escaped text than as code.
    """
    text = "" if value is None else str(value)
    if text and _PLAIN_IDENT.match(text) and text.strip() == text:
        return f"`{text}`"
    return _text(text) if text else "\u2014"


def _fence(text: str, *, info: str = "") -> str:
    """A fenced code block that ``text`` cannot close: the fence is longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _link_target(link: str) -> str:
    # A space or parenthesis would end the link destination early and leave the rest as text.
    return str(link).replace(" ", "%20").replace("(", "%28").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")


# ----------------------------------------------------------------------------- values


_num = metric_value


def _fmt(value: Any, *, digits: int = 3) -> str:
    """Display text (already safe for Markdown) for one metric; a dash when absent."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    number = _num(value)
    if number is not None:
        return format_number(number, digits=digits)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits=digits) for v in value) + "]"
    return _text(value)


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "\u2014"
    return "inf" if math.isinf(ratio) else f"{ratio:.3g}\u00d7"


def _passed(rec: dict) -> bool:
    if "passed" in rec:
        return bool(rec["passed"])
    return rec.get("reason") is None


def _list_of_dicts(result: dict, key: str) -> list[dict]:
    value = result.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParityError(f"result[{key!r}] must be a list, got {type(value).__name__}; is this a comparison result?")
    return [item for item in value if isinstance(item, dict)]


def _side(result: dict, key: str) -> dict:
    value = result.get(key)
    return value if isinstance(value, dict) else {}


def _step_label(step: Any, kind: Any) -> str:
    if kind == "prefill":
        return "prefill"
    if kind == "decode":
        return f"decode step {_fmt(step)}"
    return f"step {_fmt(step)}" + (f" ({_text(kind)})" if kind else "")


# ----------------------------------------------------------------------------- sections


def _headline(result: dict, *, records: list[dict], diverged: bool) -> str:
    verdict = result.get("verdict")
    if verdict is None:
        verdict = "divergence" if diverged else ("no divergence" if records else "no verdict")
    mark = "\u274c" if diverged else ("\u2705" if verdict == "no divergence" else "\u2754")
    actual, expected = _side(result, "actual"), _side(result, "expected")
    summary = _side(result, "summary")
    n_records = summary.get("records", len(records))
    n_failed = summary.get("failed", sum(1 for r in records if not _passed(r)))

    def who(side: dict, fallback: str) -> str:
        detail = ", ".join(_text(side[k]) for k in ("mode", "dtype") if side.get(k))
        return f"**{_text(side.get('backend', fallback))}**" + (f" ({detail})" if detail else "")

    lines = [
        f"### {mark} rwkv-parity: {_text(verdict)}",
        f"{who(actual, 'actual')} vs {who(expected, 'expected')}: {_fmt(n_records)} records compared, "
        f"{_fmt(n_failed)} failed; worst logits max abs {_fmt(summary.get('worst_logits_max_abs'))}.",
    ]
    return "\n\n".join(lines)


def _first_divergence(first: dict, *, steps: list[dict]) -> str:
    step, kind, row = first.get("step"), first.get("step_kind"), first.get("row")
    where = [_step_label(step, kind)]
    if first.get("layer") is not None:
        where.append(f"layer {_fmt(first.get('layer'))}")
    where.append(f"stage {_code(first.get('stage'))}")
    if isinstance(row, int) and not isinstance(row, bool):
        ids = next((s.get("ids") for s in steps if s.get("index") == step), None)
        token = f" (token id {_fmt(ids[row])})" if isinstance(ids, list) and 0 <= row < len(ids) else ""
        where.append(f"token row {row}{token}")

    reason = first.get("reason")
    if reason == "shape":
        how = f"shape {_fmt(first.get('actual_shape'))} vs expected {_fmt(first.get('shape'))}"
    elif reason == "nonfinite":
        how = (f"non-finite values in {_text(first.get('nonfinite_side') or '?')}, first at "
               f"{_fmt(first.get('first_nonfinite_index'))}")
    else:
        pct = _num(first.get("mismatch_pct"))
        how = (f"max abs {_fmt(first.get('max_abs'))}, rms-rel {_fmt(first.get('rms_rel'))}, "
               f"{_fmt(first.get('mismatch_count'))}/{_fmt(first.get('numel'))} elements"
               + (f" ({_fmt(pct)}%)" if pct is not None else "") + " out of tolerance, worst at "
               f"{_fmt(first.get('worst_index'))} (actual {_fmt(first.get('worst_actual'), digits=6)}, "
               f"expected {_fmt(first.get('worst_expected'), digits=6)})")
    passes = (f"atol \u2265 {_fmt(first.get('min_atol'))} (allowed {_fmt(first.get('atol'))} at rtol "
              f"{_fmt(first.get('rtol'))}), or rtol \u2265 {_fmt(first.get('min_rtol'))}")
    return "\n".join([
        "**First divergence:** " + ", ".join(where),
        "",
        f"- **how far:** {how}",
        f"- **min atol that passes:** {passes}",
    ])


def _reproduce(result: dict) -> str | None:
    run = _side(result, "run")
    # The focused repro (just enough steps, the failing layer in isolation) when the run made one,
    # as the HTML report shows; else the command that produced the whole result.
    command = result.get("repro") if isinstance(result.get("repro"), str) else run.get("command")
    if not isinstance(command, str) or not command.strip():
        # A `parity diff` result has no run block, but its two dump paths are the whole recipe.
        exp, act = _side(result, "expected").get("path"), _side(result, "actual").get("path")
        if not (isinstance(exp, str) and isinstance(act, str)):
            return None
        command = shlex.join(["parity", "diff", exp, act])
    # The fence keeps the command copy-pasteable byte for byte; escaping it would break the copy.
    return "Reproduce:\n\n" + _fence(command.strip(), info="sh")


def _model_checks(result: dict) -> str | None:
    """One line each for the optional model-level blocks a run may carry (absent: nothing)."""
    lines = []
    e2e, own, drift = (_side(result, k) for k in ("end_to_end", "own_error", "drift"))
    if e2e:
        lines.append(f"- End-to-end: KL mean {_fmt(e2e.get('kl_mean'))} / max {_fmt(e2e.get('kl_max'))} nats, top-1 "
                     f"agreement {_fmt(e2e.get('top1_agreement'), digits=4)} ({_fmt(e2e.get('top1_flips'))} flips), "
                     f"top-5 overlap {_fmt(e2e.get('top5_overlap'), digits=4)} over {_fmt(e2e.get('rows'))} rows")
    if own:
        fd = _side(own, "first_divergence")
        where = f"; first at {_step_label(fd.get('step'), fd.get('step_kind'))} {_code(fd.get('stage'))}" if fd else ""
        lines.append(f"- Error each stage adds ({_text(own.get('method') or '?')}): {_text(own.get('verdict') or '?')}, "
                     f"worst {_fmt(own.get('worst_ratio'))}\u00d7 its tolerance at {_code(own.get('worst_stage'))}{where}")
    if drift:
        lines.append(f"- Drift through the layers: {_text(drift.get('status') or '?')} (worst {_fmt(drift.get('worst_ratio'))}"
                     f", envelope {_fmt(drift.get('envelope'))})")
    return "\n".join(lines) if lines else None


def _warnings(result: dict) -> str | None:
    notes = []
    missing = _list_of_dicts(result, "missing")
    if missing:
        first = missing[0]
        notes.append(f"- {len(missing)} stage records exist on one side only and were not compared, e.g. "
                     f"{_code(first.get('stage'))} in step {_fmt(first.get('step'))} "
                     f"(missing in {_text(first.get('missing_in'))}).")
    not_comparable = _list_of_dicts(result, "not_comparable")
    if not_comparable:
        first = not_comparable[0]
        notes.append(f"- {len(not_comparable)} stage records share no token row between the sides and were not "
                     f"compared, e.g. {_code(first.get('stage'))} in step {_fmt(first.get('step'))}.")
    partial = [r for r in _list_of_dicts(result, "records") if r.get("rows") is not None]
    if partial:
        notes.append(f"- {len(partial)} records were compared on the token rows both sides hold only, e.g. "
                     f"{_code(partial[0].get('stage'))} in step {_fmt(partial[0].get('step'))}.")
    unmatched = _list_of_dicts(result, "unmatched_steps")
    if unmatched:
        listed = ", ".join(f"{_fmt(u.get('index'))} (only in {_text(u.get('present_in'))})" for u in unmatched[:5])
        more = f", and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        notes.append(f"- {len(unmatched)} steps were recorded on one side only: {listed}{more}.")
    return "\u26a0\ufe0f Not everything was compared:\n\n" + "\n".join(notes) if notes else None


# The last lines of a crashed backend's traceback shown in the summary (the HTML report has it all).
TRACEBACK_LINES = 25


def _crashes(result: dict) -> str | None:
    """Each backend that crashed or hung: its one line, and the end of its traceback."""
    from parity.report.verdict import crash_line

    blocks = []
    for c in _list_of_dicts(result, "crashes"):
        text = f"\U0001f4a5 {_text(crash_line(c))}"
        tb = c.get("traceback")
        if isinstance(tb, str) and tb.strip():
            lines = tb.rstrip().splitlines()
            shown = "\n".join(lines[-TRACEBACK_LINES:])
            more = f" (last {TRACEBACK_LINES} of {len(lines)} lines)" if len(lines) > TRACEBACK_LINES else ""
            text += f"\n\n<details><summary>traceback{more}</summary>\n\n{_fence(shown)}\n\n</details>"
        blocks.append(text)
    return "\n\n".join(blocks) if blocks else None


def _notes(result: dict) -> str | None:
    notes = _list_of_dicts(result, "notes")
    if not notes:
        return None
    labels = result.get("run", {}).get("backend_labels", {}) if isinstance(result.get("run"), dict) else {}
    lines = [f"- {_code(labels.get(n.get('backend'), n.get('backend')))}: {_text(n.get('note'))}" for n in notes]
    return "Notes from the backends:\n\n" + "\n".join(lines)


def _comparisons(result: dict) -> str | None:
    comparisons = _list_of_dicts(result, "comparisons")
    # One pair is the headline already; the list adds a line with more pairs, or a crashed backend.
    if not comparisons or (len(comparisons) < 2 and not _list_of_dicts(result, "crashes")):
        return None
    run = result.get("run") if isinstance(result.get("run"), dict) else {}
    labels = run.get("backend_labels") if isinstance(run.get("backend_labels"), dict) else {}
    lines = []
    for c in comparisons:
        fd = c.get("first_divergence") if isinstance(c.get("first_divergence"), dict) else None
        where = f": first at {_step_label(fd.get('step'), fd.get('step_kind'))}, {_code(fd.get('stage'))}" if fd else ""
        # The session names each side by its backend spec (a string); a describe() dict also works.
        names = [c.get(k) if isinstance(c.get(k), str) else _side(c, k).get("backend", "?") for k in ("actual", "expected")]
        names = [labels.get(n, n) if isinstance(n, str) else n for n in names]
        lines.append(f"- {_text(names[0])} vs {_text(names[1])}: {_text(c.get('verdict', '?'))}{where}")
    odd = result.get("odd_one_out")
    if isinstance(odd, dict) and odd.get("explanation"):
        lines.append("")
        lines.append(f"Odd one out: {_code(odd['backend']) if odd.get('backend') else 'none'} ({_text(odd['explanation'])})")
    return "Every pair:\n\n" + "\n".join(lines)


def _worst_table(records: list[dict], *, top: int) -> str:
    if not records:
        return "No records were compared."
    failing = [r for r in records if not _passed(r)]
    pool = failing or records
    # Unknown ratios rank last; ties keep execution order, so the earliest of equals comes first.
    scored = [(tolerance_ratio(r), r) for r in pool]
    scored.sort(key=lambda pair: math.inf if pair[0] is None else -pair[0])
    shown = scored[:max(top, 0)]
    if failing:
        title = f"**Worst failing records** ({len(failing)} in all), by min atol / atol:"
    else:
        title = "**Closest to their tolerance** (all pass), by min atol / atol:"
    head = ("| step | stage | row | result | max abs | rms-rel | min atol | atol | min atol / atol |\n"
            "|---|---|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for ratio, r in shown:
        result_cell = "ok" if _passed(r) else f"**{_text(r.get('reason') or 'fail')}**"
        rows.append(
            f"| {_step_label(r.get('step'), r.get('step_kind'))} | {_code(r.get('stage'))} | {_fmt(r.get('row'))} "
            f"| {result_cell} | {_fmt(r.get('max_abs'))} | {_fmt(r.get('rms_rel'))} | {_fmt(r.get('min_atol'))} "
            f"| {_fmt(r.get('atol'))} | {_fmt_ratio(ratio)} |"
        )
    return f"{title}\n\n{head}\n" + "\n".join(rows)
