"""A short Markdown summary of one comparison result, sized for a pull-request comment.

The HTML report is the full story; this is the paragraph a reviewer reads first: the verdict, where
the run first diverged and how badly, how to reproduce it, the few records furthest past their
tolerance, and a link to the HTML artifact (a placeholder by default, for CI to fill in).

Strings taken from the result (stage names, backend names, paths) are user input as far as a PR
comment is concerned: a stage called ``<img src=x onerror=...>`` or ``*[x](javascript:...)*`` must
show as text. Plain identifiers go in code spans, which Markdown renders literally; anything else
is backslash-escaped, with ``<``, ``>`` and ``&`` as entities so no renderer can read a tag.
Like the HTML report, this reads the result defensively: a missing key shows as a dash. It reads
the typed result (parity/results.py: ``RunResult`` and its blocks); given the JSON form, it types
it first, and a block of the wrong type is refused in one line.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any

from parity.errors import ParityError
from parity.explain.render import likely_cause_markdown
from parity.report.values import format_number, metric_value
from parity.results import Crash, Divergence, Record, RunResult

__all__ = ["render_markdown", "tolerance_ratio"]

HTML_LINK_PLACEHOLDER = "{HTML_REPORT_URL}"

# Characters that can start or end Markdown markup anywhere in a line. ``.``, ``-`` and ``+`` only
# matter at the start of a line, and untrusted text never starts one here.
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#!|~])")
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Safe verbatim inside a code span, also inside a table cell (no ``|``) and on one line.
_PLAIN_IDENT = re.compile(r"^[A-Za-z0-9_.:/+=,@ -]+$")


def tolerance_ratio(record: Record | dict) -> float | None:
    """How far a record is from its tolerance edge: ``min_atol / atol`` (> 1 fails), None if unknown.

    min_atol is the smallest atol that passes at the record's rtol, so the ratio ranks rtol-heavy
    and atol-heavy stages on one scale. Without it (older results), max_abs / atol is the fallback;
    it overstates stages that rtol covers. Non-finite and shape failures rank above everything.
    """
    if isinstance(record, Record):
        record = record.to_dict()
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


def render_markdown(result: RunResult | dict, *, html_link: str = HTML_LINK_PLACEHOLDER, top: int = 5) -> str:
    """The summary as Markdown (GitHub-flavoured: tables, fenced code), ending in a newline."""
    if isinstance(result, dict):
        if not isinstance(result.get("records", []), list):
            raise ParityError(f"result['records'] must be a list, got {type(result['records']).__name__}; "
                              "is this a comparison result?")
        # A hand-made or first-release result may lack its verdict: it follows from the records.
        verdict = result.get("verdict")
        result = RunResult.from_dict({"records": [], **result, "verdict": verdict})
    elif not isinstance(result, RunResult):
        raise ParityError(
            f"a Markdown summary needs the comparison result as a JSON object (dict), got {type(result).__name__}; "
            "pass the output of RunComparison.to_dict() or a saved result .json"
        )
    records = result.records
    first = result.first_divergence
    diverged = first is not None or result.verdict in ("divergence", "crashed", "timed out")

    parts = [_headline(result, diverged=diverged)]
    crash = _crashes(result)
    if crash:
        parts.append(crash)
    if first is not None:
        parts.append(_first_divergence(first, steps=[s for s in result.steps if isinstance(s, dict)]))
        explanation = result.explanation
        parts += [likely_cause_markdown(explanation)] if isinstance(explanation, dict) else []
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


def _passed(rec: Record | dict) -> bool:
    if isinstance(rec, Record):
        return bool(rec.passed) if rec.passed is not None else rec.reason is None
    if "passed" in rec:
        return bool(rec["passed"])
    return rec.get("reason") is None


def _list_of_dicts(result: RunResult, key: str) -> list[dict]:
    value = getattr(result, key, None)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParityError(f"result[{key!r}] must be a list, got {type(value).__name__}; is this a comparison result?")
    return [item for item in value if isinstance(item, dict)]


def _side(result: RunResult, key: str) -> dict:
    value = getattr(result, key, None)
    return value if isinstance(value, dict) else {}


def _step_label(step: Any, kind: Any) -> str:
    if kind == "prefill":
        return "prefill"
    if kind == "decode":
        return f"decode step {_fmt(step)}"
    return f"step {_fmt(step)}" + (f" ({_text(kind)})" if kind else "")


# ----------------------------------------------------------------------------- sections


def _headline(result: RunResult, *, diverged: bool) -> str:
    records = result.records
    verdict = result.verdict
    if verdict is None:
        verdict = "divergence" if diverged else ("no divergence" if records else "no verdict")
    mark = "\u274c" if diverged else ("\u2705" if verdict == "no divergence" else "\u2754")
    actual, expected = _side(result, "actual"), _side(result, "expected")
    summary = result.summary
    n_records = summary.records if summary.records is not None else len(records)
    n_failed = summary.failed if summary.failed is not None else sum(1 for r in records if not _passed(r))

    def who(side: dict, fallback: str) -> str:
        detail = ", ".join(_text(side[k]) for k in ("mode", "dtype") if side.get(k))
        return f"**{_text(side.get('backend', fallback))}**" + (f" ({detail})" if detail else "")

    lines = [
        f"### {mark} rwkv-parity: {_text(verdict)}",
        f"{who(actual, 'actual')} vs {who(expected, 'expected')}: {_fmt(n_records)} records compared, "
        f"{_fmt(n_failed)} failed; worst logits max abs {_fmt(summary.worst_logits_max_abs)}.",
    ]
    return "\n\n".join(lines)


def _first_divergence(first: Divergence, *, steps: list[dict]) -> str:
    step, kind, row = first.step, first.step_kind, first.row
    where = [_step_label(step, kind)]
    if first.layer is not None:
        where.append(f"layer {_fmt(first.layer)}")
    where.append(f"stage {_code(first.stage)}")
    if isinstance(row, int) and not isinstance(row, bool):
        ids = next((s.get("ids") for s in steps if s.get("index") == step), None)
        token = f" (token id {_fmt(ids[row])})" if isinstance(ids, list) and 0 <= row < len(ids) else ""
        where.append(f"token row {row}{token}")

    if first.reason == "shape":
        how = f"shape {_fmt(first.actual_shape)} vs expected {_fmt(first.shape)}"
    elif first.reason == "nonfinite":
        how = (f"non-finite values in {_text(first.nonfinite_side or '?')}, first at "
               f"{_fmt(first.first_nonfinite_index)}")
    else:
        pct = _num(first.mismatch_pct)
        how = (f"max abs {_fmt(first.max_abs)}, rms-rel {_fmt(first.rms_rel)}, "
               f"{_fmt(first.mismatch_count)}/{_fmt(first.numel)} elements"
               + (f" ({_fmt(pct)}%)" if pct is not None else "") + " out of tolerance, worst at "
               f"{_fmt(first.worst_index)} (actual {_fmt(first.worst_actual, digits=6)}, "
               f"expected {_fmt(first.worst_expected, digits=6)})")
    passes = (f"atol \u2265 {_fmt(first.min_atol)} (allowed {_fmt(first.atol)} at rtol "
              f"{_fmt(first.rtol)}), or rtol \u2265 {_fmt(first.min_rtol)}")
    return "\n".join([
        "**First divergence:** " + ", ".join(where),
        "",
        f"- **how far:** {how}",
        f"- **min atol that passes:** {passes}",
    ])


def _reproduce(result: RunResult) -> str | None:
    # The focused repro (just enough steps, the failing layer in isolation) when the run made one,
    # as the HTML report shows; else the command that produced the whole result.
    command = result.repro if isinstance(result.repro, str) else result.run.command
    if not isinstance(command, str) or not command.strip():
        # A `parity diff` result has no run block, but its two dump paths are the whole recipe.
        exp, act = _side(result, "expected").get("path"), _side(result, "actual").get("path")
        if not (isinstance(exp, str) and isinstance(act, str)):
            return None
        command = shlex.join(["parity", "diff", exp, act])
    # The fence keeps the command copy-pasteable byte for byte; escaping it would break the copy.
    return "Reproduce:\n\n" + _fence(command.strip(), info="sh")


def _model_checks(result: RunResult) -> str | None:
    """One line each for the optional model-level blocks a run may carry (absent: nothing)."""
    lines = []
    e2e, own, drift = result.end_to_end, result.own_error, result.drift
    if e2e is not None:
        lines.append(f"- End-to-end: KL mean {_fmt(e2e.kl_mean)} / max {_fmt(e2e.kl_max)} nats, top-1 "
                     f"agreement {_fmt(e2e.top1_agreement, digits=4)} ({_fmt(e2e.top1_flips)} flips), "
                     f"top-5 overlap {_fmt(e2e.top5_overlap, digits=4)} over {_fmt(e2e.rows)} rows")
    if own is not None:
        fd = own.first_divergence
        where = f"; first at {_step_label(fd.step, fd.step_kind)} {_code(fd.stage)}" if fd is not None else ""
        lines.append(f"- Error each stage adds ({_text(own.method or '?')}): {_text(own.verdict or '?')}, "
                     f"worst {_fmt(own.worst_ratio)}\u00d7 its tolerance at {_code(own.worst_stage)}{where}")
    if drift is not None:
        lines.append(f"- Drift through the layers: {_text(drift.status or '?')} (worst {_fmt(drift.worst_ratio)}"
                     f", envelope {_fmt(drift.envelope)})")
    return "\n".join(lines) if lines else None


def _warnings(result: RunResult) -> str | None:
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
    partial = [r for r in result.records if r.rows is not None]
    if partial:
        notes.append(f"- {len(partial)} records were compared on the token rows both sides hold only, e.g. "
                     f"{_code(partial[0].stage)} in step {_fmt(partial[0].step)}.")
    unmatched = _list_of_dicts(result, "unmatched_steps")
    if unmatched:
        listed = ", ".join(f"{_fmt(u.get('index'))} (only in {_text(u.get('present_in'))})" for u in unmatched[:5])
        more = f", and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        notes.append(f"- {len(unmatched)} steps were recorded on one side only: {listed}{more}.")
    return "\u26a0\ufe0f Not everything was compared:\n\n" + "\n".join(notes) if notes else None


# The last lines of a crashed backend's traceback shown in the summary (the HTML report has it all).
TRACEBACK_LINES = 25


def _crashes(result: RunResult) -> str | None:
    """Each backend that crashed or hung: its one line, and the end of its traceback."""
    from parity.report.verdict import crash_line

    blocks = []
    for c in result.crashes:
        text = f"\U0001f4a5 {_text(crash_line(c))}"
        tb = c.traceback
        if isinstance(tb, str) and tb.strip():
            lines = tb.rstrip().splitlines()
            shown = "\n".join(lines[-TRACEBACK_LINES:])
            more = f" (last {TRACEBACK_LINES} of {len(lines)} lines)" if len(lines) > TRACEBACK_LINES else ""
            text += f"\n\n<details><summary>traceback{more}</summary>\n\n{_fence(shown)}\n\n</details>"
        blocks.append(text)
    return "\n\n".join(blocks) if blocks else None


def _notes(result: RunResult) -> str | None:
    notes = _list_of_dicts(result, "notes")
    if not notes:
        return None
    lines = [f"- {_code(result.label(n.get('backend')))}: {_text(n.get('note'))}" for n in notes]
    return "Notes from the backends:\n\n" + "\n".join(lines)


def _comparisons(result: RunResult) -> str | None:
    comparisons = result.comparisons
    # One pair is the headline already; the list adds a line with more pairs, or a crashed backend.
    if not comparisons or (len(comparisons) < 2 and not result.crashes):
        return None
    lines = []
    for c in comparisons:
        fd = c.first_divergence
        where = f": first at {_step_label(fd.step, fd.step_kind)}, {_code(fd.stage)}" if fd is not None else ""
        # The session names each side by its backend spec (a string); a describe() dict also works.
        names = [n if isinstance(n, str) else n.get("backend", "?") if isinstance(n, dict) else "?"
                 for n in (c.actual, c.expected)]
        names = [result.label(n) if isinstance(n, str) else n for n in names]
        lines.append(f"- {_text(names[0])} vs {_text(names[1])}: {_text(c.verdict or '?')}{where}")
    odd = result.odd_one_out
    if isinstance(odd, dict) and odd.get("explanation"):
        lines.append("")
        lines.append(f"Odd one out: {_code(odd['backend']) if odd.get('backend') else 'none'} ({_text(odd['explanation'])})")
    return "Every pair:\n\n" + "\n".join(lines)


def _worst_table(records: list[Record], *, top: int) -> str:
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
        result_cell = "ok" if _passed(r) else f"**{_text(r.reason or 'fail')}**"
        rows.append(
            f"| {_step_label(r.step, r.step_kind)} | {_code(r.stage)} | {_fmt(r.row)} "
            f"| {result_cell} | {_fmt(r.max_abs)} | {_fmt(r.rms_rel)} | {_fmt(r.min_atol)} "
            f"| {_fmt(r.atol)} | {_fmt_ratio(ratio)} |"
        )
    return f"{title}\n\n{head}\n" + "\n".join(rows)
