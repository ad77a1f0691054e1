"""One self-contained HTML page for one comparison result: the typed ``RunResult`` (parity/results.py)
that ``parity.session.run_parity`` assembles, or its JSON form (a saved result, ``RunComparison.to_dict()``).

The markup is a Jinja2 template with its CSS and JS beside it (``templates/``), inlined at render
time: the page opens from a mail attachment or a CI artifact with no network. Autoescape escapes
every string from the result (stage names, paths, prompts are user input). Charts are data
(``<figure class="plot" data-chart=...>``) that the page's script draws; this module builds what
the template cannot say simply (anchors, heat-map cells, chart data, the tolerance rules used).
Both read the typed blocks by attribute (records, first divergence, summary, drift, own error,
end to end, modes, pairs, crashes, the run block); the JSON form is typed on entry, defensively:
a key an older engine did not write shows as a dash, and a block of the wrong type (a hand-edited
file) is dropped, as if absent, rather than refusing the page.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from parity.errors import ParityError
from parity.report.values import format_number, metric_value
from parity.results import Record, RunResult, Summary
from parity.stages import short_stage, stage_info, stage_order

__all__ = ["render_html", "write_html", "record_anchor"]

# Heat-map colour bins over log10(min_atol / atol). min_atol is the smallest atol that passes at the
# stage's rtol, so the ratio is <= 1 exactly when the stage passes: passing bins live below 0 and
# failing bins above, and a cell's colour says how many decades it sits from the tolerance edge.
# (css class, upper edge of log10 ratio, legend label); the colours are in report.css.
PASS_BINS = (("p0", -4.0, "\u2264 1e-4"), ("p1", -3.0, "1e-4 \u2013 1e-3"), ("p2", -2.0, "1e-3 \u2013 1e-2"),
             ("p3", -1.0, "1e-2 \u2013 0.1"), ("p4", 0.0, "0.1 \u2013 1"))
FAIL_BINS = (("f0", 1.0, "1 \u2013 10\u00d7"), ("f1", 2.0, "10 \u2013 100\u00d7"), ("f2", 3.0, "100 \u2013 1000\u00d7"),
             ("f3", math.inf, "> 1000\u00d7"))
SPECIAL_BINS = (("ex", "exact (zero error)"), ("nf", "non-finite (NaN/Inf)"), ("sh", "shape mismatch"),
                ("na", "no score (metrics absent)"), ("ms", "missing on one side"))

# Fields the first-divergence panel shows by name; anything else the engine adds (the non-finite
# details, say) is listed under them so new fields are never silently dropped.
_PANEL_KNOWN = set("step step_kind layer stage row reason passed max_abs max_rel rms_rel cosine mismatch_count numel "
                   "mismatch_pct worst_index worst_actual worst_expected min_atol min_rtol rtol atol "
                   "tolerance_reason shape".split())
# Run-block keys the metadata and prompt sections show by name; the rest is listed raw below them.
_RUN_SHOWN = set("checkpoint checkpoint_sha256 model backends prefill_ids decode_ids command tool_versions created "
                 "mode scenario template text tokenizer_ids model_ids vocab_folded warnings greedy".split())
# The versions a numerical difference most often traces back to come first in the versions table.
_TOOLS_FIRST = ("apache-tvm", "tvm", "torch", "numpy", "python", "rwkv-parity")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_IDS_SHOWN = 16  # a long prefill would otherwise print hundreds of token ids per caption
# Beyond this many steps one line per step is unreadable anyway: the rest are drawn thin and grey
# with one legend entry, and without per-point markers, which would dominate the page size.
_MAX_STEP_SERIES = 10
_SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")
_MAX_ROW_TITLES = 256  # per-bar tooltips cost ~100 bytes each; a very long prefill gets bars without them
_num = metric_value


def record_anchor(step: Any, stage: Any) -> str:
    """The element id of a record's table row: ``rec-<step>-<stage>`` made safe for ids and URLs."""
    return "rec-" + _ID_UNSAFE.sub("_", f"{step}-{stage}")


def missing_anchor(m: dict) -> str:
    return "miss-" + _ID_UNSAFE.sub("_", f"{m.get('step')}-{m.get('stage')}")


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    from parity.report.verdict import crash_line

    env = jinja2.Environment(loader=jinja2.PackageLoader("parity.report", "templates"), autoescape=True,
                             extensions=["jinja2.ext.do"],
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.globals.update(fmt=fmt, dct=dct, lst=lst, present=present, summary_of=summary_of, mode_first=mode_first,
                       step_label=step_label, num=_num,
                       PASS_BINS=PASS_BINS, FAIL_BINS=FAIL_BINS,
                       SPECIAL_BINS=SPECIAL_BINS, MAX_IDS_SHOWN=MAX_IDS_SHOWN, missing_anchor=missing_anchor,
                       crash_line=crash_line)
    return env


def _asset(name: str) -> str:
    return resources.files("parity.report").joinpath("templates", name).read_text(encoding="utf-8")


def render_html(result: RunResult | dict, *, title: str | None = None) -> str:
    """The whole page as one string; no external resource is referenced.

    Takes the typed result or its JSON form, which is typed first (``_typed``)."""
    # Which comparison the records are: a bare comparison (parity diff without --checkpoint) or a
    # first-release result names none, and the page then says nothing of it (typed, it reads "propagated").
    mode = result.mode if isinstance(result, RunResult) else result.get("mode") if isinstance(result, dict) else None
    if isinstance(result, dict):
        result = _typed(result)
    elif not isinstance(result, RunResult):
        raise ParityError(
            f"a report needs the comparison result as a JSON object (dict), got {type(result).__name__}; "
            "pass the output of RunComparison.to_dict() or a saved result .json"
        )
    records, missing, steps = result.records, lst(result.missing, "missing"), lst(result.steps, "steps")
    first = present(result.first_divergence)
    ids = _record_ids(records)
    first_idx = next((i for i, rec in enumerate(records) if first and (rec.step, rec.stage)
                      == (first.step, first.stage)), None)
    actual, expected = dct(result.actual), dct(result.expected)
    run = result.run
    view = dict(
        r=result, mode=mode, run=run, records=records, missing=missing, steps=steps, first=first,
        ids=ids, first_idx=first_idx, repro=_repro_text(result),
        title=title if title is not None else
        f"rwkv-parity: {actual.get('backend', 'actual')} vs {expected.get('backend', 'expected')}",
        first_ids=next((s.get("ids") for s in steps if first and s.get("index") == first.step), None),
        extra_first=_extra_fields(first.to_dict()) if first else {},
        detail=_detail_charts(result, first=first, steps=steps) if first else None,
        growth=_growth(records, steps=steps, ids=ids, first_idx=first_idx),
        heatmap=_heatmap(records, missing=missing, steps=steps, ids=ids, first_idx=first_idx),
        rows=[_table_row(rec, anchor=ids[i], first=i == first_idx) for i, rec in enumerate(records)],
        greedy=_greedy(dct(run.greedy)),
        versions=_versions(run, expected=expected, actual=actual),
        rules=_tolerance_rules(records), drift_bars=_drift_bars(present(result.drift)),
        # The run block's other fields, listed raw in the order the result holds them.
        run_empty=present(run) is None,
        rest={k: v for k, v in run.to_dict().items() if k not in _RUN_SHOWN},
        css=_asset("report.css"), js=_asset("report.js"),
    )
    return _environment().get_template("report.html.j2").render(view)


def _typed(result: dict) -> RunResult:
    """The JSON form read back as a ``RunResult``, leniently: the page read a saved or hand-edited
    result defensively, so a typed block that is not a JSON object (or a list item that is not one)
    is dropped as if absent, and a mode that is not one counts as not run. A top-level list that is
    not a list, and a malformed field inside a block, are refused in one line (ParityError)."""
    records = result.get("records", [])
    if not isinstance(records, list):
        raise ParityError(f"result['records'] must be a list, got {type(records).__name__}; is this a comparison result?")
    # A hand-made or first-release result may lack its verdict; the page then says so ("no verdict").
    return RunResult.from_dict(_drop_malformed(RunResult, {"records": [], **result, "verdict": result.get("verdict")}))


def _drop_malformed(cls, d: dict) -> dict:
    out = dict(d)
    for name, kind in cls.NESTED.items():
        value = out.get(name)
        if value is None:
            continue
        if isinstance(kind, list):
            if not isinstance(value, list):
                if cls is RunResult:
                    raise ParityError(f"result[{name!r}] must be a list, got {type(value).__name__}; "
                                      "is this a comparison result?")
                out.pop(name)
                continue
            out[name] = [_drop_malformed(kind[0], v) for v in value if isinstance(v, dict)]
        elif isinstance(kind, set):
            (typ,) = kind
            if not isinstance(value, dict):
                out.pop(name)
                continue
            out[name] = {k: _drop_malformed(typ, v) if isinstance(v, dict) else None for k, v in value.items()
                         if isinstance(v, dict) or typ.NULLABLE}
        elif isinstance(value, dict):
            out[name] = _drop_malformed(kind, value)
        else:
            out.pop(name)
    return out


def present(block: Any) -> Any:
    """``block``, or None where the result holds none: absent, or read from an empty object (a
    first release's ``{}``), or made with no field set. The page shows a section only for these."""
    if block is None:
        return None
    keys = getattr(block, "_keys", None)
    if keys is not None:
        return block if keys else None
    empty = not block.extra and all(getattr(block, k) == v for k, v in block._defaults().items())
    return None if empty else block


def write_html(result: RunResult | dict, path: str | os.PathLike, *, title: str | None = None) -> Path:
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



def fmt(value: Any, digits: int = 3) -> str:
    """Display text for one value (unescaped; the template escapes); a dash when absent."""
    if value is None or isinstance(value, bool):
        return "\u2014" if value is None else "yes" if value else "no"
    if isinstance(value, float):
        return format_number(value, digits=digits)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(fmt(v, digits) for v in value) + ")"
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict) else str(value)


def lst(value: Any, key: str) -> list[dict]:
    """A list-of-objects field of the result (``steps``, ``missing``, ``notes``, ...): its objects; [] when absent."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParityError(f"result[{key!r}] must be a list, got {type(value).__name__}; is this a comparison result?")
    return [item for item in value if isinstance(item, dict)]


def dct(value: Any) -> dict:
    """An object-valued field (``policy``, ``odd_one_out``, a dump description, ...); {} when absent or not one."""
    return value if isinstance(value, dict) else {}


def summary_of(block: Any) -> Summary:
    """A mode's or a pair's summary; an empty one (every number a dash) where it holds none."""
    summary = None if block is None else block.summary
    return summary if summary is not None else Summary()


def mode_first(modes: dict, name: str) -> Any:
    """The first divergence of mode ``name`` in ``modes``; None where it did not run or found none."""
    mode = modes.get(name)
    return None if mode is None else present(mode.first_divergence)


def passed(rec: Record) -> bool:
    return bool(rec.passed) if rec.passed is not None else rec.reason is None


def step_label(step: Any, kind: Any) -> str:
    known = {"prefill": "prefill", "decode": f"decode step {step}"}
    return known.get(kind) or f"step {step}" + (f" ({kind})" if kind else "")


def _layer(rec: Record) -> int | None:
    layer = rec.layer
    return layer if type(layer) is int else stage_info(str("" if rec.stage is None else rec.stage)).layer


def _sort_key(step: Any) -> tuple[int, Any]:
    return (0, step) if isinstance(step, int) else (1, str(step))


def _record_ids(records: list[Record]) -> dict[int, str]:
    """Record index -> element id. Sanitising can map two stage names to one id, so later ones get a
    numeric suffix: an id must stay unique or the heat-map link lands on the wrong row."""
    seen, ids = set(), {}
    for i, rec in enumerate(records):
        base = anchor = record_anchor(rec.step, rec.stage)
        n = 2
        while anchor in seen:
            anchor, n = f"{base}-{n}", n + 1
        seen.add(anchor)
        ids[i] = anchor
    return ids


def _score(rec: Record) -> float | None:
    """log10 of how far the stage is from its tolerance edge (<= 0 passes); None when unknown."""
    atol, err = _num(rec.atol), _num(rec.min_atol)
    if err is None:
        # Older or partial results: max_abs/atol ignores rtol, so it overstates rtol-dominated stages.
        err = _num(rec.max_abs)
    if err is None or atol is None or math.isnan(err) or math.isnan(atol):
        return None
    if err <= 0:
        return -math.inf
    return math.inf if atol <= 0 else math.log10(err / atol)


def _cell_class(rec: Record) -> str:
    special = {"nonfinite": "nf", "shape": "sh"}.get(rec.reason) if isinstance(rec.reason, str) else None
    score = _score(rec)
    if special or score is None:
        return special or "na"
    # The colour must agree with the verdict even where rounding puts the score a hair across 0.
    if score == -math.inf or passed(rec):
        return "ex" if score == -math.inf else next((c for c, edge, _ in PASS_BINS if score <= edge), PASS_BINS[-1][0])
    return FAIL_BINS[0][0] if score <= 0 else next(c for c, edge, _ in FAIL_BINS if score <= edge)


def _extra_fields(rec: dict) -> dict:
    """Fields beyond the named ones that say something: the engine writes its non-finite details
    (as None or 0) on every record, and an ``actual_shape`` equal to ``shape``; those are noise.
    ``rec`` is a record's JSON form: the fields it holds, in order, whatever the engine added."""
    nonfinite = rec.get("reason") == "nonfinite"
    return {k: v for k, v in rec.items()
            if k not in _PANEL_KNOWN and v is not None and (nonfinite or "nonfinite" not in k)
            and not (k == "actual_shape" and v == rec.get("shape"))}


def _repro_text(result: RunResult) -> tuple[str, str] | None:
    """(label, command) that reruns this comparison: the engine's narrowed ``repro`` when it wrote
    one, else the run's own command, else a ``parity diff`` of the two dumps."""
    repro, command = result.repro, result.run.command
    if isinstance(repro, str) and repro.strip():
        narrowed = " just this (an isolated run of this step and layer)" if result.mode == "isolated" else ""
        return "Reproduce", repro.strip(), narrowed
    if isinstance(command, str) and command.strip():
        return "The command of this run", command.strip(), ""
    exp, act = dct(result.expected).get("path"), dct(result.actual).get("path")
    if isinstance(exp, str) and isinstance(act, str):
        return "Re-compare the dumps", shlex.join(["parity", "diff", exp, act]), ""
    return None


def _json_number(v: float | None) -> float | str | None:
    """Strict JSON for the page's charts: inf and nan as the strings report.js reads."""
    if v is None or math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")



def _detail_charts(result: RunResult, *, first: Record, steps: list[dict]) -> dict | None:
    """The error histogram of the first diverging tensor and its per-row worst error: the panel's
    numbers say how bad the worst element is; these say whether it is one outlier or the whole
    tensor, and whether the error sits in one token row."""
    detail = dct(result.first_divergence_detail)
    if not detail:
        return None
    same = detail.get("stage") == first.stage and detail.get("step") == first.step
    atol = _num(first.atol) if same else None
    log_atol = math.log10(atol) if atol is not None and atol > 0 else None
    out = {"stage": detail.get("stage"), "same": same,
           "where": step_label(detail.get("step"), first.step_kind if same else None)}
    hist = detail.get("histogram")
    if isinstance(hist, dict):
        edges = [_num(v) for v in hist.get("log10_edges") or []]
        counts = [c for c in hist.get("counts") or [] if isinstance(c, int) and not isinstance(c, bool)]
        exact, nonfinite = (hist.get(k) if isinstance(hist.get(k), int) else 0 for k in ("exact", "nonfinite"))
        if len(edges) != len(counts) + 1 or not counts or any(e is None or not math.isfinite(e) for e in edges):
            out["hist"] = "malformed"
        else:
            bars = []
            for a, b, count in zip(edges, edges[1:], counts):
                colour = ("#4a90c2" if log_atol is None else "#85c77f" if b <= log_atol
                          else "#d73027" if a >= log_atol else "#fdae61")
                bars.append({"a": a, "b": b, "count": count, "colour": colour,
                             "tip": f"{count} elements with |\u0394| in [{10 ** a:.3g}, {10 ** b:.3g})"})
            total = sum(counts) + exact + nonfinite
            out["hist"] = {"kind": "hist", "label": f"histogram of |actual - expected| over {total} elements",
                           "lo": edges[0], "hi": edges[-1], "bars": bars, "exact": exact, "nonfinite": nonfinite,
                           "top": max([*counts, exact, nonfinite, 1]), "log_atol": log_atol,
                           "atol_label": f"atol {atol:.3g}" if log_atol is not None else None,
                           "note": f"{total} elements: {exact} exact, {nonfinite} non-finite."}
    rows = detail.get("row_max_abs")
    if isinstance(rows, list) and rows:
        first_row = first.row if same else None
        ids = next((s.get("ids") for s in steps if s.get("index") == detail.get("step")), None)
        token_ids = ids if isinstance(ids, list) and len(ids) == len(rows) else None
        bars = []
        for i, v in enumerate(_num(v) for v in rows):
            if v is None or not math.isfinite(v):
                log, colour, text = "inf", "#5e3c99", "non-finite"
            else:  # an exact row has no bar on a log axis; its tick label still shows the row
                log, colour, text = (math.log10(v) if v > 0 else None), ("#d73027" if atol is not None and v > atol
                                                                          else "#85c77f"), f"{v:.3g}"
            token = f" (token id {token_ids[i]})" if token_ids is not None else ""
            bars.append({"log": log, "colour": "#7f0000" if i == first_row else colour,
                         "tip": f"row {i}{token}: max |\u0394| {text}" if len(rows) <= _MAX_ROW_TITLES else None})
        out["rows"] = {"kind": "rows", "label": f"worst error per token row, {len(rows)} rows", "bars": bars,
                       "log_atol": log_atol, "xlabel": "token row" + (
                           " (dark: the first divergence's row)" if first_row is not None else "")}
    return out


def _growth_key(rec: Record) -> tuple[int, str]:
    layer = _layer(rec)  # ln_out and logits, the "head", come after every layer
    return (layer, f"L{layer}") if layer is not None else (-1, "emb") if rec.stage == "emb" else (1 << 30, "head")


def _growth(records: list[Record], *, steps: list[dict], ids: dict[int, str], first_idx: int | None) -> list[dict]:
    """Two charts (worst max_abs, worst min_atol/atol), one series per step, one point per layer:
    the worst record of each layer (log10; +inf for non-finite, -inf for exact)."""
    positions = dict(sorted(_growth_key(rec) for rec in records))
    worst: tuple[dict, dict] = ({}, {})
    for i, rec in enumerate(records):
        key = _growth_key(rec)[0]
        nonfinite, err = rec.reason == "nonfinite", _num(rec.max_abs)
        if nonfinite or (err is not None and not math.isfinite(err)):
            log_abs: float | None = math.inf
        else:
            log_abs = None if err is None else math.log10(err) if err > 0 else -math.inf
        for table, value in zip(worst, (log_abs, math.inf if nonfinite else _score(rec))):
            slot = table.setdefault(rec.step, {})
            if value is not None and (key not in slot or value > slot[key][0]):
                slot[key] = (value, i)
    kinds = {s.get("index"): s.get("kind") for s in steps}
    charts = []
    for title, table, y_label, tolerance in (
        ("worst max_abs per layer", worst[0], "worst max |\u0394|", False),
        ("worst min_atol / atol per layer (\u2264 1 passes)", worst[1], "worst min_atol / atol", True),
    ):
        plotted = sorted((s for s in table if table[s]), key=_sort_key)
        if not plotted:
            continue
        keys = list(positions)
        series, legend = [], []
        for n, step in enumerate(plotted):
            own, label = n < _MAX_STEP_SERIES, "prefill" if kinds.get(step) == "prefill" else f"step {step}"
            colour = _SERIES_COLOURS[n % len(_SERIES_COLOURS)] if own else "#bbbbbb"
            points = []
            for x, key in enumerate(keys):
                if key in table[step]:
                    value, i = table[step][key]
                    what = "non-finite" if value == math.inf else "exact" if value == -math.inf else f"{10 ** value:.3g}"
                    points.append({"x": x, "v": _json_number(value), "href": ids[i], "first": i == first_idx,
                                   "tip": f"{label} \u00b7 {positions[key]}: {what} at {records[i].stage}"})
            series.append({"colour": colour, "own": own, "points": points})
            if own:
                legend.append((colour, label))
        if len(plotted) > _MAX_STEP_SERIES:
            legend.append(("#bbbbbb", f"{len(plotted) - _MAX_STEP_SERIES} more steps"))
        charts.append({"title": title, "data": {
            "kind": "growth", "label": y_label + " by layer, one line per step", "positions": list(positions.values()),
            "series": series, "legend": legend, "tolerance": tolerance, "ylabel": y_label}})
    return charts



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
        anchor_rank = float(canonical[col]) if col in canonical else anchor_rank
        keys[col] = (anchor_rank if col in canonical else anchor_rank + 0.5, seen)
    return sorted(first_seen, key=keys.__getitem__)


def _heatmap(records: list[Record], *, missing: list[dict], steps: list[dict], ids: dict[int, str],
             first_idx: int | None) -> dict:
    """One map per step: rows are layers, columns stages, one column set for the whole run so every
    step's map lines up with the others."""
    columns: dict[str, None] = {}
    cells: dict[Any, dict[tuple[int | None, str], dict]] = {}
    failed: dict[Any, int] = {}
    for i, rec in enumerate(records):
        stage, step, ok = str("" if rec.stage is None else rec.stage), rec.step, passed(rec)
        col = columns.setdefault(short_stage(stage)) or short_stage(stage)
        classes = [_cell_class(rec)] + ([] if ok else ["x"]) + (["fd"] if i == first_idx else [])
        failed[step] = failed.get(step, 0) + (not ok)
        tip = (f"{stage} \u00b7 step {step}\n{'pass' if ok else 'FAIL: ' + str(rec.reason)}\n"
               f"max_abs {fmt(rec.max_abs)}  rms_rel {fmt(rec.rms_rel)}\n"
               f"min_atol {fmt(rec.min_atol)}  atol {fmt(rec.atol)}  rtol {fmt(rec.rtol)}")
        cells.setdefault(step, {})[(_layer(rec), col)] = {"cls": " ".join(classes), "href": ids[i], "tip": tip,
                                                         "mark": i == first_idx}
    for m in missing:
        stage = str(m.get("stage", ""))
        col = columns.setdefault(short_stage(stage)) or short_stage(stage)
        cells.setdefault(m.get("step"), {}).setdefault((stage_info(stage).layer, col), {
            "cls": "ms", "href": missing_anchor(m), "mark": False,
            "tip": f"{stage} \u00b7 step {m.get('step')}\nmissing in {m.get('missing_in')}"})
    order, cols = sorted(cells, key=_sort_key), _column_order(list(columns))
    kinds = {s.get("index"): s for s in steps}
    maps = []
    for step in order:
        layers = sorted({layer for layer, _ in cells[step]}, key=lambda v: -1 if v is None else v)
        info = kinds.get(step, {})
        maps.append({"step": step, "label": step_label(step, info.get("kind")), "failed": failed.get(step, 0),
                     "ids": info.get("ids") if isinstance(info.get("ids"), list) else None,
                     # Many decode steps would make a very long page; open the ones a reader needs first.
                     "open": len(order) <= 6 or failed.get(step, 0) or step == order[0],
                     "rows": [("emb/head" if layer is None else f"L{layer}",
                               [cells[step].get((layer, c)) for c in cols])
                              for layer in layers]})
    return {"columns": cols, "maps": maps}


def _table_row(rec: Record, *, anchor: str, first: bool) -> dict:
    ok, score = passed(rec), _score(rec)
    ratio = None if score is None else 10 ** score if math.isfinite(score) else (0.0 if score < 0 else math.inf)
    count, numel, pct = rec.mismatch_count, rec.numel, _num(rec.mismatch_pct)
    mismatch = "\u2014" if count is None and numel is None else f"{fmt(count)} / {fmt(numel)}" + (
        f" ({fmt(pct)}%)" if pct is not None else "")
    shape = rec.shape
    extra = {} if ok else _extra_fields(rec.to_dict())  # the tooltip of a failing row only
    return {
        "id": anchor, "cls": "" if ok else "bad" + (" fd" if first else ""), "rec": rec, "ok": ok,
        "reason": rec.reason or "fail", "mismatch": mismatch, "pct": pct, "ratio": ratio,
        "tip": "; ".join(f"{k}={fmt(v)}" for k, v in extra.items()) if extra and not ok else None,
        "shape": ("\u00d7".join(str(s) for s in shape) or "scalar") if isinstance(shape, (list, tuple)) else fmt(shape),
    }



def _greedy(greedy: dict) -> dict | None:
    """The token table: one row per backend (tokens differing from the yardstick's marked), then
    the yardstick's top-2 margins and each pair's teacher-forced logit drift, one column per step."""
    if not greedy:
        return None
    backends = {k: v for k, v in dct(greedy.get("backends")).items() if isinstance(v, dict)}
    yard = greedy.get("yardstick")
    yard_tokens = backends.get(str(yard), {}).get("tokens")
    split = dct(greedy.get("first_token_divergence")).get("step")
    n_steps = max([len(b["tokens"]) for b in backends.values() if isinstance(b.get("tokens"), list)] or [0])

    def cells(values: Any, *, diff: Any = None, number: bool = False) -> list[tuple[str, str]]:
        values = (values if isinstance(values, list) else [])[:n_steps]
        values += [None] * (n_steps - len(values))
        diff = diff if isinstance(diff, list) else []
        return [(fmt(_num(v), 2) if number else "" if v is None else str(v),
                 " ".join(c for c, on in (("d", i < len(diff) and v is not None and v != diff[i]), ("fs", i == split)) if on))
                for i, v in enumerate(values)]

    rows = [(name, name == yard, cells(b.get("tokens"), diff=None if name == yard else yard_tokens))
            for name, b in backends.items()]
    extra = []
    if isinstance(greedy.get("margins"), list):
        extra.append((f"{yard} top-2 margin", cells(greedy["margins"], number=True)))
    for c in lst(greedy.get("comparisons"), "comparisons"):
        if isinstance(c.get("teacher_forced_max_abs"), list):
            extra.append((f"|\u0394logits| {c.get('actual')} vs {c.get('expected')}",
                          cells(c["teacher_forced_max_abs"], number=True)))
    return {"g": greedy, "backends": backends, "n_steps": n_steps, "split": split, "rows": rows, "extra": extra,
            "ftd": dct(greedy.get("first_token_divergence"))}


def _versions(run, *, expected: dict, actual: dict) -> dict | None:
    sources = [(name, dct(versions)) for name, versions in
               (("this run", run.tool_versions), ("expected dump", expected.get("tool_versions")),
                ("actual dump", actual.get("tool_versions"))) if dct(versions)]
    seen = list(dict.fromkeys(t for _, versions in sources for t in versions))
    rows = []
    for tool in sorted(seen, key=lambda t: _TOOLS_FIRST.index(t) if t in _TOOLS_FIRST else len(_TOOLS_FIRST)):
        values = [versions.get(tool) for _, versions in sources]
        # A dump made with another version than its partner is the first suspect for a small drift.
        rows.append((tool, values, len({str(v) for v in values if v is not None}) > 1))
    return {"names": [name for name, _ in sources], "rows": rows} if sources else None


def _tolerance_rules(records: list[Record]) -> list[tuple]:
    """One line per tolerance rule, not per record: with a scale term every record's effective atol
    differs, and a row per record would repeat the same reason hundreds of times."""
    used: dict[tuple, list] = {}
    for rec in records:
        key = (fmt(rec.rtol, 6), fmt(rec.atol_base, 6), fmt(rec.scale, 6),
               "" if rec.tolerance_reason is None else str(rec.tolerance_reason))
        atol = _num(rec.atol)
        entry = used.setdefault(key, [0, rec.stage, math.inf, -math.inf])
        entry[0] += 1
        if atol is not None and not math.isnan(atol):
            entry[2], entry[3] = min(entry[2], atol), max(entry[3], atol)
    return [(*key, "\u2014" if lo > hi else fmt(lo, 4) + ("" if lo == hi else f" \u2013 {fmt(hi, 4)}"), n, stage)
            for key, (n, stage, lo, hi) in used.items()]


def _drift_bars(drift) -> list[tuple]:
    """(layer, ratio, bar width in px) of the drift card's by-layer growth, scaled to the largest."""
    points = [(b.get("layer"), _num(b.get("ratio"))) for b in lst(None if drift is None else drift.by_layer, "by_layer")]
    top = max([v for _, v in points if v is not None and math.isfinite(v)] + [1e-30])
    return [(layer, fmt(v), 0 if v is None or math.isnan(v) else 120 if v == math.inf else round(120 * max(v, 0) / top))
            for layer, v in points]
