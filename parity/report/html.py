"""One self-contained HTML page for one comparison result (the dict from ``RunComparison.to_dict()``
plus the CLI's ``run`` block).

The page must open from a mail attachment or a CI artifact with no network, so everything is inline:
CSS, a few lines of JS, no fonts or images by URL. Every string that comes from the result (stage
names, paths, backend names, metadata) goes through ``html.escape``: a checkpoint path is user input
and must not become markup.

Reports re-render offline from saved JSON, so this reads the result defensively: a key another
version of the engine did not write shows as a dash instead of failing the render.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from parity.errors import ParityError
from parity.stages import short_stage, stage_info, stage_order

__all__ = ["render_html", "write_html", "record_anchor"]

# Heat-map colour bins over log10(min_atol / atol). min_atol is the smallest atol that passes at the
# stage's rtol, so the ratio is <= 1 exactly when the stage passes: passing bins live below 0 and
# failing bins above, and a cell's colour says how many decades it sits from the tolerance edge.
_PASS_BINS = (  # (css class, upper edge of log10 ratio, colour, legend label)
    ("p0", -4.0, "#dcefd6", "\u2264 1e-4"),
    ("p1", -3.0, "#b5dea9", "1e-4 \u2013 1e-3"),
    ("p2", -2.0, "#85c77f", "1e-3 \u2013 1e-2"),
    ("p3", -1.0, "#c5df78", "1e-2 \u2013 0.1"),
    ("p4", 0.0, "#ffe066", "0.1 \u2013 1"),
)
_FAIL_BINS = (
    ("f0", 1.0, "#fdae61", "1 \u2013 10\u00d7"),
    ("f1", 2.0, "#f46d43", "10 \u2013 100\u00d7"),
    ("f2", 3.0, "#d73027", "100 \u2013 1000\u00d7"),
    ("f3", math.inf, "#7f0000", "> 1000\u00d7"),
)
_SPECIAL_BINS = (
    ("ex", "#f4f4f4", "exact (zero error)"),
    ("nf", "#5e3c99", "non-finite (NaN/Inf)"),
    ("sh", "#555555", "shape mismatch"),
    ("na", "#bbbbbb", "no score (metrics absent)"),
    ("ms", "#ffffff", "missing on one side"),
)

# Fields the first-divergence panel shows by name; anything else the engine adds (the non-finite
# details, say) is listed under them so new fields are never silently dropped.
_PANEL_KNOWN = {
    "step", "step_kind", "layer", "stage", "row", "reason", "passed", "max_abs", "max_rel", "rms_rel",
    "cosine", "mismatch_count", "numel", "mismatch_pct", "worst_index", "worst_actual",
    "worst_expected", "min_atol", "min_rtol", "rtol", "atol", "tolerance_reason", "shape",
}

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_IDS_SHOWN = 16  # a long prefill would otherwise print hundreds of token ids per caption

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
code,.mono,td.n{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.verdict{display:inline-block;padding:.3em .8em;border-radius:4px;color:#fff;font-weight:bold;font-size:1.1em}
.v-ok{background:#2e7d32}.v-bad{background:#c62828}.v-unk{background:#777}
.muted{color:#777}.warn{color:#b26a00}
table{border-collapse:collapse}
table.kv td,table.kv th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f6f6f6;font-weight:600}
.panel{border:2px solid #c62828;border-radius:6px;padding:.6em 1em;margin:.8em 0;background:#fff5f5}
.panel.ok{border-color:#2e7d32;background:#f3fbf3}
table.hm{margin:.3em 0 1em}
table.hm td{width:15px;height:15px;padding:0;border:1px solid #fff}
table.hm td a{display:block;width:15px;height:15px;text-decoration:none;color:#fff;font-size:10px;
text-align:center;line-height:15px}
table.hm th{font-weight:normal;font-size:11px;padding:0 4px 0 0;text-align:right;white-space:nowrap}
table.hm thead th{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;padding:4px 0;height:auto}
table.hm td.x{outline:2px solid #000;outline-offset:-2px}
table.hm td.fd{outline:3px solid #000;outline-offset:-1px}
table.hm td.ms{border:1px dashed #999}
.sw{display:inline-block;width:14px;height:14px;vertical-align:middle;border:1px solid #ccc;margin:0 3px 0 10px}
table.rec{font-size:12px}
table.rec th{position:sticky;top:0;background:#eee;padding:2px 6px;text-align:left;border-bottom:1px solid #bbb}
table.rec td{padding:1px 6px;border-bottom:1px solid #eee;white-space:nowrap}
table.rec td.n{text-align:right}
tr.bad{background:#fde7e7}tr.fd{background:#f8c4c4;font-weight:bold}
tr:target{outline:2px solid #1565c0;background:#e3f0ff}
/* a row a heat-map cell jumps to must land below the sticky header, not under it */
table.rec tbody tr{scroll-margin-top:3em}
details>summary{cursor:pointer;font-weight:600;margin:.3em 0}
"""
_CSS += "".join(f".{cls}{{background:{colour}}}" for cls, _, colour, _ in _PASS_BINS + _FAIL_BINS)
_CSS += "".join(f".{cls}{{background:{colour}}}" for cls, colour, _ in _SPECIAL_BINS)

# Filtering 600+ rows by hand is the main thing a reader does with the table; nothing else needs JS.
_JS = """
(function(){var q=document.getElementById('flt'),b=document.getElementById('fonly');
if(!q)return;var rows=document.querySelectorAll('table.rec tbody tr');
function f(){var t=q.value.toLowerCase(),o=b.checked;for(var i=0;i<rows.length;i++){var r=rows[i];
var s=(r.getAttribute('data-s')||'').toLowerCase();
r.style.display=((!t||s.indexOf(t)>=0)&&(!o||r.classList.contains('bad')))?'':'none';}}
q.addEventListener('input',f);b.addEventListener('change',f);})();
"""


def record_anchor(step: Any, stage: Any) -> str:
    """The element id of a record's table row: ``rec-<step>-<stage>`` made safe for ids and URLs."""
    return "rec-" + _ID_UNSAFE.sub("_", f"{step}-{stage}")


def render_html(result: dict, *, title: str | None = None) -> str:
    """The whole page as one string; no external resource is referenced."""
    if not isinstance(result, dict):
        raise ParityError(
            f"a report needs the comparison result as a JSON object (dict), got {type(result).__name__}; "
            "pass the output of RunComparison.to_dict() or a saved result .json"
        )
    records = _list_of_dicts(result, "records")
    missing = _list_of_dicts(result, "missing")
    steps = _list_of_dicts(result, "steps")
    first = result.get("first_divergence") if isinstance(result.get("first_divergence"), dict) else None

    ids = _record_ids(records)
    first_idx = _first_record_index(records, first)
    page_title = title if title is not None else _default_title(result)

    body = [
        f"<h1>{_e(page_title)}</h1>",
        _headline(result, records=records, missing=missing),
        _first_divergence_panel(result, first=first, steps=steps, anchor=ids.get(first_idx)),
        _heatmaps(records, missing=missing, steps=steps, ids=ids, first_idx=first_idx),
        _records_table(records, ids=ids, first_idx=first_idx),
        _missing_section(missing),
        _sides_section(result),
        _policy_section(result, records=records),
        _run_section(result),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(page_title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + f"\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


def write_html(result: dict, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Render and write atomically (temp file in the same directory, then replace), so a reader or a
    CI artifact upload never sees half a report."""
    text = render_html(result, title=title)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        # mkstemp makes the file owner-only; a report is meant to be shared (CI artifacts, web dirs).
        os.chmod(tmp_name, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


# ----------------------------------------------------------------------------- value formatting


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    """A metric as a float; the engine writes inf/nan as strings so its JSON stays strict."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _fmt(value: Any, *, digits: int = 3) -> str:
    """Escaped display text for one metric value; a dash when absent."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v, digits=digits) for v in value) + ")"
    if isinstance(value, dict):
        return _e(json.dumps(value, sort_keys=True, default=str))
    return _e(value)


def _fmt_shape(shape: Any) -> str:
    if isinstance(shape, (list, tuple)):
        return "&times;".join(_e(s) for s in shape) if shape else "scalar"
    return _fmt(shape)


def _fmt_mismatch(rec: dict) -> str:
    count, numel, pct = rec.get("mismatch_count"), rec.get("numel"), rec.get("mismatch_pct")
    if count is None and numel is None:
        return "\u2014"
    text = f"{_fmt(count)} / {_fmt(numel)}"
    if _num(pct) is not None:
        text += f" ({_fmt(_num(pct), digits=3)}%)"
    return text


def _list_of_dicts(result: dict, key: str) -> list[dict]:
    value = result.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParityError(f"result[{key!r}] must be a list, got {type(value).__name__}; is this a comparison result?")
    return [item for item in value if isinstance(item, dict)]


# ----------------------------------------------------------------------------- record helpers


def _passed(rec: dict) -> bool:
    if "passed" in rec:
        return bool(rec["passed"])
    return rec.get("reason") is None


def _layer(rec: dict) -> int | None:
    layer = rec.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        return layer
    return stage_info(str(rec.get("stage", ""))).layer


def _record_ids(records: list[dict]) -> dict[int, str]:
    """Record index -> element id. Sanitising can map two stage names to one id, so later ones get a
    numeric suffix: an id must stay unique or the heat-map link lands on the wrong row."""
    seen: set[str] = set()
    ids: dict[int, str] = {}
    for i, rec in enumerate(records):
        base = record_anchor(rec.get("step"), rec.get("stage"))
        anchor, n = base, 2
        while anchor in seen:
            anchor, n = f"{base}-{n}", n + 1
        seen.add(anchor)
        ids[i] = anchor
    return ids


def _first_record_index(records: list[dict], first: dict | None) -> int | None:
    if first is None:
        return None
    for i, rec in enumerate(records):
        if rec.get("step") == first.get("step") and rec.get("stage") == first.get("stage"):
            return i
    return None


def _score(rec: dict) -> float | None:
    """log10 of how far the stage is from its tolerance edge (<= 0 passes); None when unknown."""
    atol = _num(rec.get("atol"))
    err = _num(rec.get("min_atol"))
    if err is None:
        # Older or partial results: max_abs/atol ignores rtol, so it overstates rtol-dominated stages.
        err = _num(rec.get("max_abs"))
    if err is None or atol is None or math.isnan(err) or math.isnan(atol):
        return None
    if err <= 0:
        return -math.inf
    if atol <= 0:
        return math.inf
    return math.log10(err / atol)


def _cell_class(rec: dict) -> str:
    reason = rec.get("reason")
    if reason == "nonfinite":
        return "nf"
    if reason == "shape":
        return "sh"
    score = _score(rec)
    if score is None:
        return "na"
    if score == -math.inf:
        return "ex"
    # The colour must agree with the verdict even where rounding puts the score a hair across 0.
    if _passed(rec):
        for cls, edge, _, _ in _PASS_BINS:
            if score <= edge:
                return cls
        return _PASS_BINS[-1][0]
    for cls, edge, _, _ in _FAIL_BINS:
        if score <= edge and score > 0:
            return cls
    return _FAIL_BINS[0][0] if score <= 0 else _FAIL_BINS[-1][0]


def _extra_fields(rec: dict) -> dict:
    """Fields beyond the named ones that say something: the engine writes its non-finite details
    (as None or 0) on every record, and an ``actual_shape`` equal to ``shape``; those are noise."""
    nonfinite = rec.get("reason") == "nonfinite"
    return {
        k: v for k, v in rec.items()
        if k not in _PANEL_KNOWN and v is not None
        and (nonfinite or "nonfinite" not in k)
        and not (k == "actual_shape" and v == rec.get("shape"))
    }


def _step_label(step: Any, kind: Any) -> str:
    if kind == "prefill":
        return "prefill"
    if kind == "decode":
        return f"decode step {step}"
    return f"step {step}" + (f" ({kind})" if kind else "")


# ----------------------------------------------------------------------------- page sections


def _default_title(result: dict) -> str:
    actual = result.get("actual") if isinstance(result.get("actual"), dict) else {}
    expected = result.get("expected") if isinstance(result.get("expected"), dict) else {}
    return f"rwkv-parity: {actual.get('backend', 'actual')} vs {expected.get('backend', 'expected')}"


def _side_line(label: str, side: Any) -> str:
    side = side if isinstance(side, dict) else {}
    return (
        f"<b>{label}</b> <code>{_e(side.get('backend', '?'))}</code> "
        f"<span class=\"muted\">mode</span> {_e(side.get('mode', '?'))} "
        f"<span class=\"muted\">dtype</span> {_e(side.get('dtype', '?'))}"
    )


def _headline(result: dict, *, records: list[dict], missing: list[dict]) -> str:
    verdict = result.get("verdict")
    cls = {"no divergence": "v-ok", "divergence": "v-bad"}.get(verdict, "v-unk")
    summary = result.get("summary") if isinstance(result.get("summary"), dict) else {}
    n_records = summary.get("records", len(records))
    n_failed = summary.get("failed", sum(1 for r in records if not _passed(r)))
    parts = [
        f"<p><span class=\"verdict {cls}\">{_e(verdict if verdict is not None else 'no verdict')}</span></p>",
        f"<p>{_side_line('actual', result.get('actual'))} &nbsp;vs&nbsp; "
        f"{_side_line('expected', result.get('expected'))}</p>",
        f"<p>{_fmt(n_records)} records compared, <b>{_fmt(n_failed)}</b> failed, "
        f"{len(missing)} stages missing on one side; worst logits max_abs "
        f"<code>{_fmt(summary.get('worst_logits_max_abs'), digits=4)}</code></p>",
    ]
    if missing and verdict == "no divergence":
        parts.append("<p class=\"warn\">Some stages exist on one side only and were not compared; "
                     "see <a href=\"#missing\">missing stages</a>.</p>")
    return "\n".join(parts)


def _first_divergence_panel(result: dict, *, first: dict | None, steps: list[dict], anchor: str | None) -> str:
    if first is None:
        if result.get("verdict") == "divergence":
            return ("<div class=\"panel\"><b>The verdict is divergence but the result names no first "
                    "divergence</b>; see the failing rows of the table.</div>")
        return "<div class=\"panel ok\">No stage exceeded its tolerance: there is no first divergence.</div>"

    step, kind = first.get("step"), first.get("step_kind")
    layer = first.get("layer")
    row = first.get("row")
    row_text = _fmt(row)
    ids = next((s.get("ids") for s in steps if s.get("index") == step), None)
    if isinstance(row, int) and isinstance(ids, list) and 0 <= row < len(ids):
        row_text += f" <span class=\"muted\">(token id {_e(ids[row])})</span>"
    elif row is None:
        row_text = "\u2014 <span class=\"muted\">(state stage, or no single row)</span>"

    stage_html = f"<code>{_e(first.get('stage'))}</code>"
    if anchor:
        stage_html = f"<a href=\"#{anchor}\">{stage_html}</a>"
    tol = f"rtol {_fmt(first.get('rtol'), digits=4)}, atol {_fmt(first.get('atol'), digits=4)}"
    if first.get("tolerance_reason"):
        tol += f" <span class=\"muted\">({_e(first.get('tolerance_reason'))})</span>"
    rows = [
        ("step", f"{_e(step)} \u2014 {_e(_step_label(step, kind))}"),
        ("layer", f"L{_e(layer)}" if layer is not None else "\u2014 <span class=\"muted\">(not in a layer)</span>"),
        ("stage", stage_html),
        ("token row", row_text),
        ("reason", f"<b>{_e(first.get('reason'))}</b>"),
        ("max_abs", f"<code>{_fmt(first.get('max_abs'), digits=6)}</code>"),
        ("rms_rel", f"<code>{_fmt(first.get('rms_rel'), digits=6)}</code>"),
        ("mismatched", _fmt_mismatch(first)),
        ("worst index", f"<code>{_fmt(first.get('worst_index'))}</code>: actual "
                        f"<code>{_fmt(first.get('worst_actual'), digits=8)}</code>, expected "
                        f"<code>{_fmt(first.get('worst_expected'), digits=8)}</code>"),
        ("would pass with", f"atol \u2265 <code>{_fmt(first.get('min_atol'), digits=4)}</code> at this rtol, or "
                            f"rtol \u2265 <code>{_fmt(first.get('min_rtol'), digits=4)}</code> at this atol"),
        ("tolerance used", tol),
    ]
    rows += [(str(k), _fmt(v, digits=6)) for k, v in _extra_fields(first).items()]
    table = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return ("<div class=\"panel\"><h2 style=\"margin-top:0\">First divergence</h2>"
            f"<table class=\"kv\">{table}</table></div>")


def _legend() -> str:
    swatches = [f"<span class=\"sw {cls}\"></span>{_e(label)}" for cls, _, _, label in _PASS_BINS + _FAIL_BINS]
    swatches += [f"<span class=\"sw {cls}\"></span>{_e(label)}" for cls, _, label in _SPECIAL_BINS]
    return (
        "<p class=\"muted\">Colour: <b>min_atol / atol</b> \u2014 the smallest atol that would pass at the "
        "stage's rtol, as a multiple of the atol used, so \u2264 1 passes (falls back to max_abs / atol "
        "when min_atol is absent). Failing cells have a black outline; the first divergence is marked "
        "&#9670;. Hover a cell for numbers, click it for its table row.</p>\n<p>"
        + " ".join(swatches) + "</p>"
    )


def _heatmaps(records: list[dict], *, missing: list[dict], steps: list[dict], ids: dict[int, str],
              first_idx: int | None) -> str:
    if not records and not missing:
        return "<h2>Heat map</h2><p class=\"muted\">No records were compared.</p>"

    # One column set for the whole run keeps every step's map aligned with the others.
    columns: dict[str, None] = {}
    cells: dict[Any, dict[tuple[int | None, str], str]] = {}
    failed_per_step: dict[Any, int] = {}
    for i, rec in enumerate(records):
        stage = str(rec.get("stage", ""))
        col = short_stage(stage)
        columns.setdefault(col)
        step = rec.get("step")
        classes = [_cell_class(rec)]
        if not _passed(rec):
            classes.append("x")
            failed_per_step[step] = failed_per_step.get(step, 0) + 1
        mark = ""
        if i == first_idx:
            classes.append("fd")
            mark = "&#9670;"
        tip = (f"{stage} \u00b7 step {step}\n{'pass' if _passed(rec) else 'FAIL: ' + str(rec.get('reason'))}\n"
               f"max_abs {_fmt_plain(rec.get('max_abs'))}  rms_rel {_fmt_plain(rec.get('rms_rel'))}\n"
               f"min_atol {_fmt_plain(rec.get('min_atol'))}  atol {_fmt_plain(rec.get('atol'))}  "
               f"rtol {_fmt_plain(rec.get('rtol'))}")
        cells.setdefault(step, {})[(_layer(rec), col)] = (
            f"<td class=\"{' '.join(classes)}\"><a href=\"#{ids[i]}\" title=\"{_e(tip)}\">{mark}</a></td>"
        )
    for m in missing:
        stage = str(m.get("stage", ""))
        col = short_stage(stage)
        columns.setdefault(col)
        key = (stage_info(stage).layer, col)
        step_cells = cells.setdefault(m.get("step"), {})
        if key not in step_cells:
            tip = f"{stage} \u00b7 step {m.get('step')}\nmissing in {m.get('missing_in')}"
            step_cells[key] = (f"<td class=\"ms\"><a href=\"#{_missing_anchor(m)}\" "
                               f"title=\"{_e(tip)}\"></a></td>")

    columns = _column_order(list(columns))
    step_kinds = {s.get("index"): s for s in steps}
    order = sorted(cells, key=_sort_key)
    # Many decode steps would make a very long page; open the ones a reader needs first.
    many = len(order) > 6
    header = "<tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"
    out = ["<h2>Heat map</h2>", _legend()]
    for step in order:
        step_cells = cells[step]
        layers = sorted({layer for layer, _ in step_cells}, key=lambda v: -1 if v is None else v)
        body = []
        for layer in layers:
            label = "emb/head" if layer is None else f"L{layer}"
            tds = "".join(step_cells.get((layer, c), "<td></td>") for c in columns)
            body.append(f"<tr><th>{_e(label)}</th>{tds}</tr>")
        info = step_kinds.get(step, {})
        n_failed = failed_per_step.get(step, 0)
        summary = (f"step {_e(step)} \u2014 {_e(_step_label(step, info.get('kind')))}"
                   f"{_ids_text(info.get('ids'))} \u2014 "
                   + (f"<span class=\"warn\">{n_failed} failing</span>" if n_failed else "all pass"))
        is_open = not many or n_failed or step == order[0]
        out.append(f"<details{' open' if is_open else ''}><summary>{summary}</summary>"
                   f"<table class=\"hm\"><thead>{header}</thead><tbody>{''.join(body)}</tbody></table></details>")
    return "\n".join(out)


def _column_order(first_seen: list[str]) -> list[str]:
    """Canonical execution order where the name is canonical, else first-seen order.

    Pure first-seen order breaks when a stage is absent from the first layer it could appear in (say
    ``att.g`` missing in L0 of step 0): it would then be placed after ``x_out``. A non-canonical name
    stays right after the column it followed when first seen.
    """
    canonical = {short_stage(name): rank for rank, name in enumerate(stage_order(n_layer=1))}
    keys: dict[str, tuple[float, int]] = {}
    anchor_rank = -1.0
    for seen, col in enumerate(first_seen):
        if col in canonical:
            anchor_rank = float(canonical[col])
            keys[col] = (anchor_rank, seen)
        else:
            keys[col] = (anchor_rank + 0.5, seen)
    return sorted(first_seen, key=keys.__getitem__)


def _fmt_plain(value: Any) -> str:
    # Tooltips are escaped once as a whole, so this must return unescaped text.
    return html.unescape(_fmt(value))


def _sort_key(step: Any) -> tuple[int, Any]:
    return (0, step) if isinstance(step, int) else (1, str(step))


def _ids_text(ids: Any) -> str:
    if not isinstance(ids, list):
        return ""
    shown = ", ".join(_e(i) for i in ids[:_MAX_IDS_SHOWN])
    more = f", \u2026 ({len(ids)} in all)" if len(ids) > _MAX_IDS_SHOWN else ""
    return f" <span class=\"muted\">ids [{shown}{more}]</span>"


def _missing_anchor(m: dict) -> str:
    return "miss-" + _ID_UNSAFE.sub("_", f"{m.get('step')}-{m.get('stage')}")


def _records_table(records: list[dict], *, ids: dict[int, str], first_idx: int | None) -> str:
    if not records:
        return "<h2>Records</h2><p class=\"muted\">No records.</p>"
    head = ("<tr><th>step</th><th>stage</th><th>row</th><th>result</th><th>shape</th><th>max_abs</th>"
            "<th>max_rel</th><th>rms_rel</th><th>cosine</th><th>mismatched</th><th>worst index</th>"
            "<th>worst actual</th><th>worst expected</th><th>min_atol</th><th>min_rtol</th>"
            "<th>rtol / atol</th></tr>")
    rows = []
    for i, rec in enumerate(records):
        passed = _passed(rec)
        cls = "" if passed else "bad" + (" fd" if i == first_idx else "")
        extra = _extra_fields(rec)
        result_cell = "ok" if passed else f"<b>{_e(rec.get('reason') or 'fail')}</b>"
        if extra and not passed:
            tip = "; ".join(f"{k}={_fmt_plain(v)}" for k, v in extra.items())
            result_cell = f"<span title=\"{_e(tip)}\">{result_cell}</span>"
        stage = rec.get("stage")
        class_attr = f' class="{cls}"' if cls else ""
        rows.append(
            f"<tr id=\"{ids[i]}\"{class_attr} data-s=\"{_e(stage)}\">"
            f"<td class=\"n\">{_e(rec.get('step'))}</td><td>{_e(stage)}</td><td class=\"n\">{_fmt(rec.get('row'))}</td>"
            f"<td>{result_cell}</td><td>{_fmt_shape(rec.get('shape'))}</td>"
            + "".join(f"<td class=\"n\">{_fmt(rec.get(k))}</td>" for k in ("max_abs", "max_rel", "rms_rel", "cosine"))
            + f"<td class=\"n\">{_fmt_mismatch(rec)}</td><td>{_fmt(rec.get('worst_index'))}</td>"
            # The worst values need more digits than the errors, or both print as the same number.
            + "".join(f"<td class=\"n\">{_fmt(rec.get(k), digits=7)}</td>" for k in ("worst_actual", "worst_expected"))
            + "".join(f"<td class=\"n\">{_fmt(rec.get(k))}</td>" for k in ("min_atol", "min_rtol"))
            + f"<td class=\"n\">{_fmt(rec.get('rtol'))} / {_fmt(rec.get('atol'))}</td></tr>"
        )
    controls = ("<p><label>filter stages <input id=\"flt\" type=\"search\" placeholder=\"e.g. att.wkv\"></label> "
                "<label><input id=\"fonly\" type=\"checkbox\"> failing only</label></p>")
    return (f"<h2>Records</h2>{controls}<table class=\"rec\"><thead>{head}</thead>"
            f"<tbody>\n" + "\n".join(rows) + "\n</tbody></table>")


def _missing_section(missing: list[dict]) -> str:
    if not missing:
        return "<h2 id=\"missing\">Missing stages</h2><p class=\"muted\">None: every stage exists on both sides.</p>"
    seen: set[str] = set()
    rows = []
    for m in missing:
        anchor = _missing_anchor(m)
        id_attr = "" if anchor in seen else f" id=\"{anchor}\""
        seen.add(anchor)
        rows.append(f"<tr{id_attr}><td>{_e(m.get('step'))}</td><td><code>{_e(m.get('stage'))}</code></td>"
                    f"<td>{_e(m.get('missing_in'))}</td></tr>")
    return ("<h2 id=\"missing\">Missing stages</h2><p class=\"muted\">Present on one side only; not compared.</p>"
            "<table class=\"kv\"><thead><tr><th>step</th><th>stage</th><th>missing in</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _sides_section(result: dict) -> str:
    expected = result.get("expected") if isinstance(result.get("expected"), dict) else {}
    actual = result.get("actual") if isinstance(result.get("actual"), dict) else {}
    keys = list(dict.fromkeys(["backend", "mode", "dtype", "path", *expected, *actual]))
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_fmt(expected.get(k))}</td><td>{_fmt(actual.get(k))}</td></tr>" for k in keys
    )
    return ("<h2>Backends</h2><table class=\"kv\"><thead><tr><th></th><th>expected</th><th>actual</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _policy_section(result: dict, *, records: list[dict]) -> str:
    policy = result.get("policy") if isinstance(result.get("policy"), dict) else {}
    parts = ["<h2>Tolerance policy</h2>"]
    rows = [f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in policy.items() if k != "overrides"]
    overrides = policy.get("overrides")
    if isinstance(overrides, dict) and overrides:
        for pattern, tol in overrides.items():
            if isinstance(tol, dict):
                text = f"rtol {_fmt(tol.get('rtol'))}, atol {_fmt(tol.get('atol'))}"
                if tol.get("reason"):
                    text += " \u2014 " + _e(tol["reason"])
            else:
                text = _fmt(tol)
            rows.append(f"<tr><th>override <code>{_e(pattern)}</code></th><td>{text}</td></tr>")
    elif overrides is not None:
        rows.append(f"<tr><th>overrides</th><td>{_fmt(overrides) if overrides else 'none'}</td></tr>")
    if rows:
        parts.append(f"<table class=\"kv\"><tbody>{''.join(rows)}</tbody></table>")

    # The distinct tolerances actually applied, so the table rows need not repeat each reason.
    used: dict[tuple[str, str, str], list] = {}
    for rec in records:
        key = (_fmt(rec.get("rtol"), digits=6), _fmt(rec.get("atol"), digits=6), _e(rec.get("tolerance_reason")))
        entry = used.setdefault(key, [0, rec.get("stage")])
        entry[0] += 1
    if used:
        body = "".join(
            f"<tr><td>{r}</td><td>{a}</td><td>{reason}</td><td>{n}</td><td><code>{_e(stage)}</code></td></tr>"
            for (r, a, reason), (n, stage) in used.items()
        )
        parts.append("<p>Tolerances applied:</p><table class=\"kv\"><thead><tr><th>rtol</th><th>atol</th>"
                     f"<th>reason</th><th>records</th><th>e.g.</th></tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(parts)


def _run_section(result: dict) -> str:
    run = result.get("run")
    if not isinstance(run, dict) or not run:
        return "<h2>Run</h2><p class=\"muted\">No run metadata recorded.</p>"
    rows = []
    for key, value in run.items():
        if isinstance(value, dict):
            inner = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in value.items())
            cell = f"<table class=\"kv\"><tbody>{inner}</tbody></table>" if inner else "\u2014"
        else:
            cell = f"<span class=\"mono\">{_fmt(value)}</span>"
        rows.append(f"<tr><th>{_e(key)}</th><td>{cell}</td></tr>")
    return f"<h2>Run</h2><table class=\"kv\"><tbody>{''.join(rows)}</tbody></table>"
