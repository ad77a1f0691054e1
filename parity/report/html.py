"""One self-contained HTML page for one comparison result (the dict from ``RunComparison.to_dict()``
plus what ``parity.session.run_parity`` adds: ``run``, ``repro``, ``modes``, ``comparisons``, ...).

The page must open from a mail attachment or a CI artifact with no network, so everything is inline:
CSS, a few lines of JS, charts as inline SVG, no fonts or images by URL. Every string that comes
from the result (stage names, paths, backend names, prompt text, metadata) goes through
``html.escape``: a checkpoint path or a prompt is user input and must not become markup.

Reports re-render offline from saved JSON, so this reads the result defensively: a key another
version of the engine did not write shows as a dash (or its section is left out) instead of
failing the render.

Page order follows the questions a reader asks: did it diverge, where first and how to rerun just
that, what the diverging tensor's error looks like, do the capture modes / backend pairs agree,
what was fed in (prompt, greedy continuations), how the error grows through the layers, then every
record (heat map, sortable table) and the run's metadata.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

from parity.errors import ParityError
from parity.report.values import format_number, metric_value
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

# Run-block keys the metadata and prompt sections show by name; the rest is listed raw below them.
_RUN_SHOWN = {
    "checkpoint", "checkpoint_sha256", "model", "backends", "prefill_ids", "decode_ids", "command",
    "tool_versions", "created", "mode", "scenario", "template", "text", "tokenizer_ids", "model_ids",
    "vocab_folded", "warnings", "greedy",
}
# The versions a numerical difference most often traces back to come first in the versions table.
_TOOLS_FIRST = ("apache-tvm", "tvm", "torch", "numpy", "python", "rwkv-parity")

_DASH = "\u2014"
_FS = ' class="fs"'  # the greedy table's first-token-divergence column
_ASC_FIRST = ' data-d="a"'
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_IDS_SHOWN = 16  # a long prefill would otherwise print hundreds of token ids per caption
# Beyond this many steps one line per step is unreadable anyway: the rest are drawn thin and grey
# with one legend entry, and without per-point markers, which would dominate the page size.
_MAX_STEP_SERIES = 10
_SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")
_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")
# Per-bar tooltips cost ~100 bytes each; a very long prefill gets bars without them.
_MAX_ROW_TITLES = 256

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:.2em 0 .4em}
code,pre,.mono,td.n{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.verdict{display:inline-block;padding:.3em .8em;border-radius:4px;color:#fff;font-weight:bold;font-size:1.1em}
.verdict.small{font-size:.95em;padding:.15em .6em}
.v-ok{background:#2e7d32}.v-bad{background:#c62828}.v-unk{background:#777}
.muted{color:#777}.warn{color:#b26a00}
table{border-collapse:collapse}
table.kv td,table.kv th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f6f6f6;font-weight:600}
table.kv tr.hl td{background:#fff3cd}
.panel{border:2px solid #c62828;border-radius:6px;padding:.6em 1em;margin:.8em 0;background:#fff5f5}
.panel.ok{border-color:#2e7d32;background:#f3fbf3}
.note{border-left:4px solid #1565c0;background:#eef4fb;padding:.4em .8em;margin:.6em 0}
.note.bad{border-color:#c62828;background:#fdecea}.note.warn{border-color:#b26a00;background:#fff6e5;color:inherit}
.cols{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.cols>div{flex:1 1 380px;min-width:0}
.mode{border:1px solid #ccc;border-radius:6px;padding:.5em .8em}.mode.primary{border:2px solid #1565c0}
pre.cmd{background:#f4f4f4;border:1px solid #ddd;border-radius:4px;padding:.5em .7em;white-space:pre-wrap;
word-break:break-all;margin:.2em 0}
pre.text{background:#fafafa;border:1px solid #ddd;padding:.5em .7em;white-space:pre-wrap;margin:.2em 0}
button.copy{font-size:11px;padding:1px 8px;cursor:pointer}
.ids{max-height:9em;overflow:auto;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.ids b{background:#fde7e7;font-weight:normal;outline:1px solid #f4a3a3}
.scroll{overflow-x:auto}
svg.chart{background:#fff;border:1px solid #eee;margin:.3em 0}
svg.chart text{font:11px system-ui,sans-serif;fill:#333}
svg.chart .ax{stroke:#444;stroke-width:1}svg.chart .grid{stroke:#eee;stroke-width:1}
svg.chart .tol{stroke:#c62828;stroke-width:1.2;stroke-dasharray:5 3}
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
table.rec th{position:sticky;top:0;background:#eee;padding:2px 6px;text-align:left;border-bottom:1px solid #bbb;
cursor:pointer;user-select:none;white-space:nowrap}
table.rec th::after{content:" \\2195";color:#aaa}
table.rec th[aria-sort=ascending]::after{content:" \\25b2";color:#1565c0}
table.rec th[aria-sort=descending]::after{content:" \\25bc";color:#1565c0}
table.rec td{padding:1px 6px;border-bottom:1px solid #eee;white-space:nowrap}
table.rec td.n{text-align:right}
table.tok td,table.tok th{text-align:center}table.tok tbody th{text-align:left}
table.tok td.d{background:#fde7e7;font-weight:bold}
table.tok td.fs,table.tok th.fs{outline:2px solid #c62828;outline-offset:-2px}
tr.bad{background:#fde7e7}tr.fd{background:#f8c4c4;font-weight:bold}
tr:target{outline:2px solid #1565c0;background:#e3f0ff}
/* a row a heat-map cell jumps to must land below the sticky header, not under it */
table.rec tbody tr{scroll-margin-top:3em}
details>summary{cursor:pointer;font-weight:600;margin:.3em 0}
"""
_CSS += "".join(f".{cls}{{background:{colour}}}" for cls, _, colour, _ in _PASS_BINS + _FAIL_BINS)
_CSS += "".join(f".{cls}{{background:{colour}}}" for cls, colour, _ in _SPECIAL_BINS)

# Filtering and sorting 600+ rows by hand is the main thing a reader does with the table; the copy
# button saves retyping the repro. Nothing else needs JS, and the page reads fine without it.
_JS = """
(function(){
var t=document.querySelector('table.rec');
if(t){var tb=t.tBodies[0],ths=t.tHead.rows[0].cells,all=Array.prototype.slice.call(tb.rows);
for(var k=0;k<all.length;k++)all[k]._i=k;
function key(td,num){var v=td.getAttribute('data-v');if(v===null)v=td.textContent.trim();
if(!num)return v.toLowerCase();if(v==='inf'||v==='nan')return Infinity;if(v==='-inf')return -Infinity;
var x=parseFloat(v);return isNaN(x)?null:x;}
function sortBy(i){var th=ths[i],num=th.getAttribute('data-t')==='n',cur=th.getAttribute('aria-sort');
var dir=cur?(cur==='descending'?1:-1):(th.getAttribute('data-d')==='a'||!num?1:-1);
for(var j=0;j<ths.length;j++)ths[j].removeAttribute('aria-sort');
th.setAttribute('aria-sort',dir<0?'descending':'ascending');
var rows=Array.prototype.slice.call(tb.rows).map(function(r){return [key(r.cells[i],num),r];});
rows.sort(function(a,b){var x=a[0],y=b[0];
if(x===null||y===null){if(x===y)return a[1]._i-b[1]._i;return x===null?1:-1;}
if(x<y)return -dir;if(x>y)return dir;return a[1]._i-b[1]._i;});
for(var n=0;n<rows.length;n++)tb.appendChild(rows[n][1]);}
for(var i=0;i<ths.length;i++)ths[i].addEventListener('click',sortBy.bind(null,i));
var q=document.getElementById('flt'),b=document.getElementById('fonly');
function f(){var s=q.value.toLowerCase(),o=b.checked;for(var i=0;i<all.length;i++){var r=all[i];
var d=(r.getAttribute('data-s')||'').toLowerCase();
r.style.display=((!s||d.indexOf(s)>=0)&&(!o||r.classList.contains('bad')))?'':'none';}}
q.addEventListener('input',f);b.addEventListener('change',f);
function reveal(){var r=location.hash&&document.getElementById(location.hash.slice(1));
if(r&&r.parentNode===tb&&r.style.display==='none'){q.value='';b.checked=false;f();r.scrollIntoView();}}
window.addEventListener('hashchange',reveal);}
var bs=document.querySelectorAll('button.copy');
for(var c=0;c<bs.length;c++)bs[c].addEventListener('click',function(){var btn=this,
el=document.getElementById(btn.getAttribute('data-for')),txt=el.textContent,
rg=document.createRange(),sel=window.getSelection();rg.selectNodeContents(el);sel.removeAllRanges();sel.addRange(rg);
function done(ok){btn.textContent=ok?'copied':'selected: press Ctrl+C';}
function fallback(){var ok=false;try{ok=document.execCommand('copy');}catch(e){}done(ok);}
if(navigator.clipboard&&navigator.clipboard.writeText)
{navigator.clipboard.writeText(txt).then(function(){done(true);},fallback);}
else fallback();});
})();
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
    first = _dict(result, "first_divergence") or None

    ids = _record_ids(records)
    first_idx = _first_record_index(records, first)
    page_title = title if title is not None else _default_title(result)

    body = [
        f"<h1>{_e(page_title)}</h1>",
        _headline(result, records=records, missing=missing, first=first),
        _first_divergence_panel(result, first=first, steps=steps, anchor=ids.get(first_idx)),
        _modes_section(result),
        _pairs_section(result),
        _known_differences_section(result),
        _prompt_section(result),
        _greedy_section(result),
        _growth_section(records, steps=steps, ids=ids, first_idx=first_idx),
        _heatmaps(records, missing=missing, steps=steps, ids=ids, first_idx=first_idx),
        _records_table(records, ids=ids, first_idx=first_idx),
        _missing_section(missing, unmatched=_list_of_dicts(result, "unmatched_steps")),
        _run_section(result),
        _policy_section(result, records=records),
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


_num = metric_value


def _fmt(value: Any, *, digits: int = 3) -> str:
    """Escaped display text for one metric value; a dash when absent."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value, digits=digits)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v, digits=digits) for v in value) + ")"
    if isinstance(value, dict):
        return _e(json.dumps(value, sort_keys=True, default=str))
    return _e(value)


def _fmt_plain(value: Any, *, digits: int = 3) -> str:
    # Tooltips are escaped once as a whole, so this must return unescaped text.
    return html.unescape(_fmt(value, digits=digits))


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


def _pow10(exponent: int) -> str:
    """``10⁻⁶``: tick labels in powers of ten, with Unicode superscripts so SVG needs no tspans."""
    if exponent == 0:
        return "1"
    if exponent == 1:
        return "10"
    return "10" + str(exponent).translate(_SUPERSCRIPT)


def _list_of_dicts(result: dict, key: str) -> list[dict]:
    value = result.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParityError(f"result[{key!r}] must be a list, got {type(value).__name__}; is this a comparison result?")
    return [item for item in value if isinstance(item, dict)]


def _dict(container: Any, key: str) -> dict:
    value = container.get(key) if isinstance(container, dict) else None
    return value if isinstance(value, dict) else {}


def _backend_name(value: Any) -> Any:
    """A pair's side as written by the session (a name) or as a describe() dict."""
    return value.get("backend") if isinstance(value, dict) else value


def _verdict_badge(verdict: Any, *, small: bool = False) -> str:
    cls = {"no divergence": "v-ok", "divergence": "v-bad"}.get(verdict, "v-unk")
    size = " small" if small else ""
    return f"<span class=\"verdict{size} {cls}\">{_e(verdict if verdict is not None else 'no verdict')}</span>"


def _code_block(text: str, *, block_id: str) -> str:
    """A command shown byte for byte (escaped, never reflowed into markup) with a copy button."""
    return (f"<pre class=\"cmd\" id=\"{block_id}\"><code>{_e(text)}</code></pre>"
            f"<button class=\"copy\" type=\"button\" data-for=\"{block_id}\">copy</button>")


def _id_list(ids: Any, *, against: Any = None) -> str:
    """Token ids, those that differ from ``against`` at the same position marked."""
    if not isinstance(ids, list):
        return "\u2014"
    other = against if isinstance(against, list) else None
    parts = []
    for i, value in enumerate(ids):
        text = _e(value)
        if other is not None and (i >= len(other) or other[i] != value):
            text = f"<b>{text}</b>"
        parts.append(text)
    return f"<div class=\"ids\">[{', '.join(parts)}]</div>"


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


def _where(fd: dict) -> str:
    """``decode step 1, L2, <code>L2.att.wkv</code>, row 0``: one line for a first divergence."""
    parts = [_e(_step_label(fd.get("step"), fd.get("step_kind")))]
    if fd.get("layer") is not None:
        parts.append(f"L{_e(fd.get('layer'))}")
    parts.append(f"<code>{_e(fd.get('stage'))}</code>")
    if fd.get("row") is not None:
        parts.append(f"row {_e(fd.get('row'))}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- headline and panel


def _default_title(result: dict) -> str:
    actual, expected = _dict(result, "actual"), _dict(result, "expected")
    return f"rwkv-parity: {actual.get('backend', 'actual')} vs {expected.get('backend', 'expected')}"


def _side_line(label: str, side: Any) -> str:
    side = side if isinstance(side, dict) else {}
    return (
        f"<b>{label}</b> <code>{_e(side.get('backend', '?'))}</code> "
        f"<span class=\"muted\">mode</span> {_e(side.get('mode', '?'))} "
        f"<span class=\"muted\">dtype</span> {_e(side.get('dtype', '?'))}"
    )


def _repro_text(result: dict) -> tuple[str, str] | None:
    """(label, command) that reruns this comparison: the engine's narrowed ``repro`` when it wrote
    one, else the run's own command, else a ``parity diff`` of the two dumps."""
    repro = result.get("repro")
    if isinstance(repro, str) and repro.strip():
        return "Reproduce", repro.strip()
    command = _dict(result, "run").get("command")
    if isinstance(command, str) and command.strip():
        return "The command of this run", command.strip()
    exp, act = _dict(result, "expected").get("path"), _dict(result, "actual").get("path")
    if isinstance(exp, str) and isinstance(act, str):
        return "Re-compare the dumps", shlex.join(["parity", "diff", exp, act])
    return None


def _headline(result: dict, *, records: list[dict], missing: list[dict], first: dict | None) -> str:
    verdict = result.get("verdict")
    summary = _dict(result, "summary")
    n_records = summary.get("records", len(records))
    n_failed = summary.get("failed", sum(1 for r in records if not _passed(r)))
    mode = result.get("mode")
    mode_note = ""
    if mode in ("propagated", "isolated"):
        mode_note = f" <span class=\"muted\">from the {_e(mode)} comparison</span>"
    parts = [
        f"<section id=\"verdict\"><p>{_verdict_badge(verdict)}{mode_note}</p>",
        f"<p>{_side_line('actual', result.get('actual'))} &nbsp;vs&nbsp; "
        f"{_side_line('expected', result.get('expected'))}</p>",
        f"<p>{_fmt(n_records)} records compared, <b>{_fmt(n_failed)}</b> failed, "
        f"{len(missing)} stages missing on one side; worst logits max_abs "
        f"<code>{_fmt(summary.get('worst_logits_max_abs'), digits=4)}</code></p>",
    ]
    if missing and verdict == "no divergence":
        parts.append("<p class=\"warn\">Some stages exist on one side only and were not compared; "
                     "see <a href=\"#missing\">missing stages</a>.</p>")
    if _dict(result, "run").get("vocab_folded") is True:
        parts.append("<p class=\"note warn\"><b>Vocab folded:</b> the prompt's tokenizer ids did not fit the "
                     "model's vocabulary and were mapped id % V; see <a href=\"#prompt\">prompt</a>.</p>")
    repro = _repro_text(result)
    if first is None and repro is not None:
        # With a divergence the repro sits in the panel, next to what it reproduces.
        parts.append(f"<p>{_e(repro[0])}:</p>{_code_block(repro[1], block_id='repro')}")
    parts.append("</section>")
    return "\n".join(parts)


def _first_divergence_panel(result: dict, *, first: dict | None, steps: list[dict], anchor: str | None) -> str:
    if first is None:
        if result.get("verdict") == "divergence":
            return ("<section id=\"first-divergence\" class=\"panel\"><b>The verdict is divergence but the "
                    "result names no first divergence</b>; see the failing rows of the table.</section>")
        return ("<section id=\"first-divergence\" class=\"panel ok\">No stage exceeded its tolerance: there is "
                "no first divergence.</section>")

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
    repro = _repro_text(result)
    repro_html = ""
    if repro is not None:
        label = repro[0] + (" just this (an isolated run of this step and layer)"
                            if result.get("mode") == "isolated" and repro[0] == "Reproduce" else "")
        repro_html = f"<p><b>{_e(label)}:</b></p>{_code_block(repro[1], block_id='repro')}"
    return ("<section id=\"first-divergence\" class=\"panel\"><h2 style=\"margin-top:0\">First divergence</h2>"
            f"<div class=\"cols\"><div><table class=\"kv\">{table}</table>{repro_html}</div>"
            f"<div>{_detail_charts(result, first=first, ids=ids)}</div></div></section>")


# ----------------------------------------------------------------------------- SVG charts


class _Frame:
    """A plot area inside an SVG: data coordinates -> pixels (y grows upwards in data)."""

    def __init__(self, *, width: int, height: int, left: int, right: int, top: int, bottom: int,
                 x_range: tuple[float, float], y_range: tuple[float, float]):
        self.width, self.height = width, height
        self.x0, self.x1 = left, width - right
        self.y0, self.y1 = height - bottom, top  # pixel rows of the data range's bottom and top
        self.xr, self.yr = x_range, y_range

    def x(self, v: float) -> float:
        lo, hi = self.xr
        return self.x0 + (v - lo) / (hi - lo) * (self.x1 - self.x0)

    def y(self, v: float) -> float:
        lo, hi = self.yr
        v = min(max(v, lo), hi)
        return self.y0 - (v - lo) / (hi - lo) * (self.y0 - self.y1)

    def open(self, *, label: str) -> str:
        return (f"<svg class=\"chart\" width=\"{self.width}\" height=\"{self.height}\" "
                f"viewBox=\"0 0 {self.width} {self.height}\" role=\"img\" aria-label=\"{_e(label)}\">")

    def axes(self, *, x_label: str, y_label: str) -> str:
        mid_y = (self.y0 + self.y1) / 2
        return (f"<line class=\"ax\" x1=\"{self.x0}\" y1=\"{self.y0}\" x2=\"{self.x1}\" y2=\"{self.y0}\"/>"
                f"<line class=\"ax\" x1=\"{self.x0}\" y1=\"{self.y0}\" x2=\"{self.x0}\" y2=\"{self.y1}\"/>"
                f"<text x=\"{(self.x0 + self.x1) / 2:.1f}\" y=\"{self.height - 4}\" text-anchor=\"middle\">"
                f"{_e(x_label)}</text>"
                f"<text transform=\"translate(12 {mid_y:.1f}) rotate(-90)\" text-anchor=\"middle\">"
                f"{_e(y_label)}</text>")

    def y_decades(self) -> str:
        """Grid lines and 10ᵏ labels at integer log10 values of the y range."""
        lo, hi = int(math.floor(self.yr[0])), int(math.ceil(self.yr[1]))
        stride = max(1, math.ceil((hi - lo) / 8))
        out = []
        for k in range(lo, hi + 1, stride):
            y = self.y(k)
            out.append(f"<line class=\"grid\" x1=\"{self.x0}\" y1=\"{y:.1f}\" x2=\"{self.x1}\" y2=\"{y:.1f}\"/>"
                       f"<text x=\"{self.x0 - 4}\" y=\"{y + 4:.1f}\" text-anchor=\"end\">{_pow10(k)}</text>")
        return "".join(out)


def _log_range(values: list[float], *, include: tuple[float, ...] = ()) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)] + list(include)
    if not finite:
        return (-1.0, 0.0)
    lo, hi = math.floor(min(finite)), math.ceil(max(finite))
    return (float(lo), float(hi if hi > lo else lo + 1))


def _detail_charts(result: dict, *, first: dict, ids: Any) -> str:
    """The error histogram of the first diverging tensor and its per-row worst error: the panel's
    numbers say how bad the worst element is; these say whether it is one outlier or the whole
    tensor, and whether the error sits in one token row."""
    detail = _dict(result, "first_divergence_detail")
    if not detail:
        return ("<p class=\"muted\">No error histogram: the result carries no "
                "<code>first_divergence_detail</code> (a saved dump pair is needed to compute one).</p>")
    same = detail.get("stage") == first.get("stage") and detail.get("step") == first.get("step")
    step_label = _step_label(detail.get("step"), first.get("step_kind") if same else None)
    caption = f"<code>{_e(detail.get('stage'))}</code> at {_e(step_label)}"
    if not same:
        caption += " <span class=\"warn\">(not the stage named on the left)</span>"
    atol = _num(first.get("atol")) if same else None
    out = [f"<h3>Error histogram of {caption}</h3>"]
    hist = detail.get("histogram")
    out.append(_histogram_svg(hist, atol=atol) if isinstance(hist, dict)
               else "<p class=\"muted\">No histogram: every element is exact or non-finite, or the shapes differ.</p>")
    rows = detail.get("row_max_abs")
    if isinstance(rows, list) and rows:
        out.append("<h3>Worst |actual \u2212 expected| per token row</h3>")
        out.append(_rows_svg(rows, atol=atol, first_row=first.get("row") if same else None, ids=ids))
    return "\n".join(out)


def _histogram_svg(hist: dict, *, atol: float | None) -> str:
    edges = [_num(v) for v in hist.get("log10_edges") or []]
    counts = [c for c in hist.get("counts") or [] if isinstance(c, int) and not isinstance(c, bool)]
    exact = hist.get("exact") if isinstance(hist.get("exact"), int) else 0
    nonfinite = hist.get("nonfinite") if isinstance(hist.get("nonfinite"), int) else 0
    if len(edges) != len(counts) + 1 or not counts or any(e is None or not math.isfinite(e) for e in edges):
        return "<p class=\"muted\">The histogram in this result is malformed; not drawn.</p>"
    lo, hi = edges[0], edges[-1]
    # Exact and non-finite elements get their own bars beside the log axis, where they cannot sit.
    bin_w = (hi - lo) / len(counts)
    x_lo = lo - (2 * bin_w if exact else 0)
    x_hi = hi + (2 * bin_w if nonfinite else 0)
    top = max([*counts, exact, nonfinite, 1])
    f = _Frame(width=460, height=230, left=52, right=12, top=18, bottom=44, x_range=(x_lo, x_hi), y_range=(0, top))
    total = sum(counts) + exact + nonfinite
    out = [f.open(label=f"histogram of |actual - expected| over {total} elements")]
    log_atol = math.log10(atol) if atol is not None and atol > 0 else None

    def bar(x_from: float, x_to: float, count: int, colour: str, tip: str) -> str:
        x, w = f.x(x_from) + 1, max(f.x(x_to) - f.x(x_from) - 2, 1)
        y = f.y(count)
        label = ""
        if count and w >= 14:
            label = (f"<text x=\"{x + w / 2:.1f}\" y=\"{y - 3:.1f}\" text-anchor=\"middle\" font-size=\"9\">"
                     f"{count}</text>")
        return (f"<rect x=\"{x:.1f}\" y=\"{y:.1f}\" width=\"{w:.1f}\" height=\"{f.y0 - y:.1f}\" fill=\"{colour}\">"
                f"<title>{_e(tip)}</title></rect>{label}")

    for k in range(int(math.ceil(lo)), int(math.floor(hi)) + 1):
        x = f.x(k)
        out.append(f"<line class=\"grid\" x1=\"{x:.1f}\" y1=\"{f.y0}\" x2=\"{x:.1f}\" y2=\"{f.y1}\"/>"
                   f"<text x=\"{x:.1f}\" y=\"{f.y0 + 14}\" text-anchor=\"middle\">{_pow10(k)}</text>")
    for i, count in enumerate(counts):
        a, b = edges[i], edges[i + 1]
        if log_atol is None:
            colour = "#4a90c2"
        elif b <= log_atol:
            colour = "#85c77f"
        elif a >= log_atol:
            colour = "#d73027"
        else:
            colour = "#fdae61"
        out.append(bar(a, b, count, colour, f"{count} elements with |\u0394| in [{10 ** a:.3g}, {10 ** b:.3g})"))
    if exact:
        out.append(bar(x_lo, x_lo + bin_w, exact, "#bbbbbb", f"{exact} elements exactly equal"))
        out.append(f"<text x=\"{f.x(x_lo + bin_w / 2):.1f}\" y=\"{f.y0 + 14}\" text-anchor=\"middle\">0</text>")
    if nonfinite:
        out.append(bar(x_hi - bin_w, x_hi, nonfinite, "#5e3c99", f"{nonfinite} elements non-finite (NaN/Inf)"))
        out.append(f"<text x=\"{f.x(x_hi - bin_w / 2):.1f}\" y=\"{f.y0 + 14}\" text-anchor=\"middle\">NaN</text>")
    if log_atol is not None and lo <= log_atol <= hi:
        x = f.x(log_atol)
        out.append(f"<line class=\"tol\" x1=\"{x:.1f}\" y1=\"{f.y0}\" x2=\"{x:.1f}\" y2=\"{f.y1 - 8}\"/>"
                   f"<text x=\"{x + 3:.1f}\" y=\"{f.y1 - 6}\" fill=\"#c62828\">atol {atol:.3g}</text>")
    out.append(f"<text x=\"{f.x0 - 4}\" y=\"{f.y1 + 4}\" text-anchor=\"end\">{top}</text>"
               f"<text x=\"{f.x0 - 4}\" y=\"{f.y0 + 4}\" text-anchor=\"end\">0</text>")
    out.append(f.axes(x_label="|actual \u2212 expected| (log scale)", y_label="elements"))
    out.append("</svg>")
    note = f"{total} elements: {exact} exact, {nonfinite} non-finite."
    if log_atol is not None:
        note += " Green bins lie below atol, red ones above it (an element's own bound also has an rtol term)."
    return "".join(out) + f"<p class=\"muted\">{_e(note)}</p>"


def _rows_svg(rows: list, *, atol: float | None, first_row: Any, ids: Any) -> str:
    values = [_num(v) for v in rows]
    logs = [math.log10(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    include = (math.log10(atol),) if atol is not None and atol > 0 else ()
    y_lo, y_hi = _log_range(logs, include=include)
    n = len(values)
    f = _Frame(width=460, height=180, left=52, right=12, top=12, bottom=40, x_range=(0, n), y_range=(y_lo, y_hi))
    out = [f.open(label=f"worst error per token row, {n} rows"), f.y_decades()]
    titled = n <= _MAX_ROW_TITLES
    token_ids = ids if isinstance(ids, list) and len(ids) == n else None
    for i, v in enumerate(values):
        x, w = f.x(i) + (1 if n <= 64 else 0), max(f.x(i + 1) - f.x(i) - (2 if n <= 64 else 0), 0.5)
        if v is None or math.isnan(v) or math.isinf(v):
            y, colour, text = f.y1, "#5e3c99", "non-finite"
        elif v <= 0:
            continue  # an exact row has no bar on a log axis; its tick label still shows the row
        else:
            y = f.y(math.log10(v))
            failing = atol is not None and v > atol
            colour, text = ("#d73027" if failing else "#85c77f"), f"{v:.3g}"
        if i == first_row:
            colour = "#7f0000"
        title = ""
        if titled:
            token = f" (token id {token_ids[i]})" if token_ids is not None else ""
            tip = f"row {i}{token}: max |\u0394| {text}"
            title = f"<title>{_e(tip)}</title>"
        out.append(f"<rect x=\"{x:.1f}\" y=\"{y:.1f}\" width=\"{w:.1f}\" height=\"{f.y0 - y:.1f}\" "
                   f"fill=\"{colour}\">{title}</rect>")
    stride = max(1, math.ceil(n / 16))
    for i in range(0, n, stride):
        out.append(f"<text x=\"{f.x(i + 0.5):.1f}\" y=\"{f.y0 + 13}\" text-anchor=\"middle\">{i}</text>")
    if include:
        y = f.y(include[0])
        out.append(f"<line class=\"tol\" x1=\"{f.x0}\" y1=\"{y:.1f}\" x2=\"{f.x1}\" y2=\"{y:.1f}\"/>"
                   f"<text x=\"{f.x1 - 2}\" y=\"{y - 3:.1f}\" text-anchor=\"end\" fill=\"#c62828\">atol</text>")
    out.append(f.axes(x_label="token row" + (" (dark: the first divergence's row)" if first_row is not None else ""),
                      y_label="max |\u0394|"))
    out.append("</svg>")
    return "".join(out)


def _growth_positions(records: list[dict]) -> dict[int, str]:
    """x positions of the error-growth plot: the embedding, each layer, then the head."""
    positions: dict[int, str] = {}
    for rec in records:
        key, label = _growth_key(rec)
        positions[key] = label
    return dict(sorted(positions.items()))


def _growth_key(rec: dict) -> tuple[int, str]:
    layer = _layer(rec)
    if layer is not None:
        return layer, f"L{layer}"
    if rec.get("stage") == "emb":
        return -1, "emb"
    return 1 << 30, "head"  # ln_out, logits: after every layer


def _growth_section(records: list[dict], *, steps: list[dict], ids: dict[int, str], first_idx: int | None) -> str:
    if not records:
        return ""
    positions = _growth_positions(records)
    # Per step and position, the record with the worst value of each metric (log10; +inf for
    # non-finite, -inf for exact). Steps are keyed as the records write them.
    worst_abs: dict[Any, dict[int, tuple[float, int]]] = {}
    worst_tol: dict[Any, dict[int, tuple[float, int]]] = {}
    for i, rec in enumerate(records):
        step = rec.get("step")
        key, _ = _growth_key(rec)
        nonfinite = rec.get("reason") == "nonfinite"
        err = _num(rec.get("max_abs"))
        if nonfinite or (err is not None and (math.isnan(err) or math.isinf(err))):
            log_abs: float | None = math.inf
        elif err is None:
            log_abs = None
        else:
            log_abs = math.log10(err) if err > 0 else -math.inf
        score = math.inf if nonfinite else _score(rec)
        for table, value in ((worst_abs, log_abs), (worst_tol, score)):
            if value is None:
                continue
            slot = table.setdefault(step, {})
            if key not in slot or value > slot[key][0]:
                slot[key] = (value, i)
    if not worst_abs and not worst_tol:
        return ""
    kinds = {s.get("index"): s.get("kind") for s in steps}
    order = sorted(set(worst_abs) | set(worst_tol), key=_sort_key)
    labels = {s: ("prefill" if kinds.get(s) == "prefill" else f"step {s}") for s in order}
    charts = []
    for title, table, y_label, tolerance in (
        ("worst max_abs per layer", worst_abs, "worst max |\u0394|", False),
        ("worst min_atol / atol per layer (\u2264 1 passes)", worst_tol, "worst min_atol / atol", True),
    ):
        if table:
            charts.append(f"<div><h3>{_e(title)}</h3>"
                          + _growth_svg(table, positions=positions, order=order, labels=labels, records=records,
                                        ids=ids, first_idx=first_idx, y_label=y_label, tolerance=tolerance)
                          + "</div>")
    return ("<section id=\"growth\"><h2>Error growth across layers</h2><p class=\"muted\">One line per step: the "
            "worst record of each layer (its att, ffn and state stages), from the embedding to the head. A "
            "line that climbs layer after layer is error compounding; a jump at one layer is where it is "
            "made. Hover a point for its stage, click it for its table row.</p>"
            f"<div class=\"cols\">{''.join(charts)}</div></section>")


def _growth_svg(table: dict, *, positions: dict[int, str], order: list, labels: dict, records: list[dict],
                ids: dict[int, str], first_idx: int | None, y_label: str, tolerance: bool) -> str:
    keys = list(positions)
    values = [v for slot in table.values() for v, _ in slot.values()]
    y_lo, y_hi = _log_range(values, include=(0.0,) if tolerance else ())
    f = _Frame(width=470, height=250, left=52, right=100, top=14, bottom=40,
               x_range=(-0.5, len(keys) - 0.5), y_range=(y_lo, y_hi))
    out = [f.open(label=y_label + " by layer, one line per step"), f.y_decades()]
    for x_index, key in enumerate(keys):
        out.append(f"<text x=\"{f.x(x_index):.1f}\" y=\"{f.y0 + 14}\" text-anchor=\"middle\">"
                   f"{_e(positions[key])}</text>")
    if tolerance:
        y = f.y(0.0)
        out.append(f"<line class=\"tol\" x1=\"{f.x0}\" y1=\"{y:.1f}\" x2=\"{f.x1}\" y2=\"{y:.1f}\"/>"
                   f"<text x=\"{f.x1 - 2}\" y=\"{y - 3:.1f}\" text-anchor=\"end\" fill=\"#c62828\">tolerance</text>")
    x_of = {key: i for i, key in enumerate(keys)}
    plotted = [s for s in order if s in table]
    legend = []
    for n, step in enumerate(plotted):
        own = n < _MAX_STEP_SERIES
        colour = _SERIES_COLOURS[n % len(_SERIES_COLOURS)] if own else "#bbbbbb"
        slot = table[step]
        path, gap = [], True
        for key in keys:
            if key not in slot:
                gap = True
                continue
            path.append(f"{'M' if gap else 'L'}{f.x(x_of[key]):.1f} {f.y(slot[key][0]):.1f}")
            gap = False
        width = 2 if own else 1
        out.append(f"<path d=\"{' '.join(path)}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"{width}\"/>")
        if own:
            for key in keys:
                if key not in slot:
                    continue
                value, i = slot[key]
                rec = records[i]
                cx, cy = f.x(x_of[key]), f.y(value)
                what = ("non-finite" if value == math.inf else "exact" if value == -math.inf
                        else f"{10 ** value:.3g}")
                tip = f"{labels[step]} \u00b7 {positions[key]}: {what} at {rec.get('stage')}"
                # The first divergence gets a big black-ringed marker; exact (zero) points are hollow.
                is_first = i == first_idx
                fill = "#fff" if value == -math.inf else colour
                marker = (f"<circle cx=\"{cx:.1f}\" cy=\"{cy:.1f}\" r=\"{6 if is_first else 3}\" fill=\"{fill}\" "
                          f"stroke=\"{'#000' if is_first else colour}\" stroke-width=\"{2 if is_first else 1}\">"
                          f"<title>{_e(tip)}</title></circle>")
                out.append(f"<a href=\"#{ids[i]}\">{marker}</a>")
            legend.append((colour, labels[step]))
    if len(plotted) > _MAX_STEP_SERIES:
        legend.append(("#bbbbbb", f"{len(plotted) - _MAX_STEP_SERIES} more steps"))
    for n, (colour, label) in enumerate(legend):
        y = f.y1 + 6 + 15 * n
        out.append(f"<line x1=\"{f.x1 + 10}\" y1=\"{y:.1f}\" x2=\"{f.x1 + 28}\" y2=\"{y:.1f}\" stroke=\"{colour}\" "
                   f"stroke-width=\"2\"/><text x=\"{f.x1 + 32}\" y=\"{y + 4:.1f}\">{_e(label)}</text>")
    out.append(f.axes(x_label="layer", y_label=y_label + " (log)"))
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------- modes, pairs, known


def _modes_section(result: dict) -> str:
    modes = result.get("modes")
    if not isinstance(modes, dict) or not modes:
        return ""
    primary = result.get("mode")
    about = {
        "propagated": "each backend runs on its own outputs, so a stage's error includes everything upstream",
        "isolated": "every compiled layer and step runs on the yardstick's inputs, so a stage shows only the "
                    "error it adds itself",
    }
    cols = []
    for name in ("propagated", "isolated"):
        m = modes.get(name)
        marker = " \u2014 the verdict above" if name == primary else ""
        head = f"<h3>{_e(name)}{marker}</h3>"
        blurb = f"<p class=\"muted\">{_e(about[name])}.</p>"
        if not isinstance(m, dict):
            cols.append(f"<div class=\"mode\">{head}{blurb}<p class=\"muted\">Not run: no backend in this run "
                        "has per-layer entry points to run in isolation.</p></div>")
            continue
        summary = _dict(m, "summary")
        fd = _dict(m, "first_divergence")
        rows = [
            ("verdict", _verdict_badge(m.get("verdict"), small=True)),
            ("records / failed", f"{_fmt(summary.get('records'))} / <b>{_fmt(summary.get('failed'))}</b>"),
            ("worst logits max_abs", f"<code>{_fmt(summary.get('worst_logits_max_abs'), digits=4)}</code>"),
            ("first divergence", _where(fd) if fd else "none"),
        ]
        if fd:
            rows += [
                ("max_abs", f"<code>{_fmt(fd.get('max_abs'), digits=4)}</code>"),
                ("would pass with", f"atol \u2265 <code>{_fmt(fd.get('min_atol'), digits=4)}</code> "
                                    f"(used {_fmt(fd.get('atol'), digits=4)})"),
            ]
        table = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
        cls = "mode primary" if name == primary else "mode"
        cols.append(f"<div class=\"{cls}\">{head}{blurb}<table class=\"kv\">{table}</table></div>")

    prop = _dict(_dict(modes, "propagated"), "first_divergence")
    iso = _dict(_dict(modes, "isolated"), "first_divergence")
    if primary == "isolated":
        note = ("The verdict at the top is the <b>isolated</b> one, because it names the stage whose own error is "
                "out of tolerance; a propagated first divergence can be the downstream effect of small errors "
                "made earlier.")
    else:
        note = "The verdict at the top is the <b>propagated</b> one: there is no isolated comparison to prefer."
    if prop and iso:
        if (prop.get("step"), prop.get("stage")) == (iso.get("step"), iso.get("stage")):
            note += " Both modes first fail at the same stage: the error is made there."
        else:
            note += (f" They differ: propagated first fails at {_where(prop)}, isolated at {_where(iso)}; the "
                     "isolated stage is where an error is made.")
    elif prop and not iso and isinstance(modes.get("isolated"), dict):
        note += (" Propagated fails but isolated does not: no single stage is out of tolerance on its own, so "
                 "small per-stage errors compound (a tolerance question, not one wrong stage).")
    return (f"<section id=\"modes\"><h2>Capture modes side by side</h2><div class=\"cols\">{''.join(cols)}</div>"
            f"<p class=\"note\">{note}</p></section>")


def _pairs_section(result: dict) -> str:
    comparisons = _list_of_dicts(result, "comparisons")
    if not comparisons:
        return ""
    shown = (_dict(result, "expected").get("backend"), _dict(result, "actual").get("backend"))
    same_mode = result.get("mode") != "isolated"  # an isolated top level is none of these pairs
    rows = []
    for c in comparisons:
        pair = (_backend_name(c.get("expected")), _backend_name(c.get("actual")))
        summary = _dict(c, "summary")
        fd = _dict(c, "first_divergence")
        mark = " <span class=\"muted\">(detailed below)</span>" if same_mode and pair == shown else ""
        cls = " class=\"bad\"" if c.get("verdict") == "divergence" else ""
        rows.append(
            f"<tr{cls}><td><code>{_e(pair[0])}</code></td><td><code>{_e(pair[1])}</code>{mark}</td>"
            f"<td>{_verdict_badge(c.get('verdict'), small=True)}</td>"
            f"<td class=\"n\">{_fmt(summary.get('records'))}</td>"
            f"<td class=\"n\">{_fmt(summary.get('failed'))}</td>"
            f"<td class=\"n\">{_fmt(summary.get('worst_logits_max_abs'), digits=4)}</td>"
            f"<td>{_where(fd) if fd else _DASH}</td></tr>"
        )
    head = ("<tr><th>yardstick</th><th>compared</th><th>verdict</th><th>records</th><th>failed</th>"
            "<th>worst logits max_abs</th><th>first divergence</th></tr>")
    odd = _dict(result, "odd_one_out")
    odd_html = ""
    if odd:
        suspect = odd.get("backend")
        if suspect is not None:
            odd_html = (f"<p class=\"note bad\"><b>Odd one out: <code>{_e(suspect)}</code></b> \u2014 "
                        f"{_e(odd.get('explanation'))}</p>")
        else:
            agree = all(c.get("verdict") == "no divergence" for c in comparisons)
            cls = "note" if agree else "note warn"
            odd_html = f"<p class=\"{cls}\"><b>No odd one out</b> \u2014 {_e(odd.get('explanation'))}</p>"
    return ("<section id=\"pairs\"><h2>Every pair of backends</h2><p class=\"muted\">Each pair compared with the "
            "earlier-listed backend as the yardstick; with three or more, the ones that agree tell which one "
            f"is wrong.</p>{odd_html}<table class=\"kv\"><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
            "</section>")


def _known_differences_section(result: dict) -> str:
    known = _list_of_dicts(result, "known_differences")
    if not known:
        return ""
    rows = "".join(
        f"<tr><td><code>{_e(k.get('backend'))}</code></td><td><code>{_e(k.get('name'))}</code></td>"
        f"<td>{'<b>applies</b>' if k.get('applies') else 'no effect here'}</td><td>{_e(k.get('detail'))}</td></tr>"
        for k in known
    )
    return ("<section id=\"known\"><h2>Known differences</h2><p class=\"muted\">Named, legitimate differences of a "
            "backend's math, listed with every verdict so they are neither mistaken for nor hidden as a porting "
            "bug.</p><table class=\"kv\"><thead><tr><th>backend</th><th>difference</th><th>in this run</th>"
            f"<th>detail</th></tr></thead><tbody>{rows}</tbody></table></section>")


# ----------------------------------------------------------------------------- text runs


def _prompt_section(result: dict) -> str:
    run = _dict(result, "run")
    scenario = run.get("scenario")
    if not (scenario or run.get("text") is not None or run.get("tokenizer_ids") or run.get("greedy")):
        return ""  # an ids-only run: the ids are in the run metadata and the heat-map captions
    rows = []
    if isinstance(scenario, dict):
        text = f"<b>{_e(scenario.get('name'))}</b>"
        if scenario.get("description"):
            text += f" \u2014 {_e(scenario.get('description'))}"
        if scenario.get("source"):
            text += f" <span class=\"muted\">({_e(scenario.get('source'))})</span>"
        rows.append(("scenario", text))
    elif scenario:
        rows.append(("scenario", _e(scenario)))
    if run.get("template") is not None:
        rows.append(("template", f"<code>{_e(run.get('template'))}</code>"))
    if run.get("text") is not None:
        rows.append(("text", f"<pre class=\"text\">{_e(run.get('text'))}</pre>"))
    tok, model = run.get("tokenizer_ids"), run.get("model_ids")
    folded = run.get("vocab_folded") is True
    if tok is not None:
        rows.append((f"tokenizer ids ({len(tok) if isinstance(tok, list) else '?'})", _id_list(tok)))
    if model is not None:
        label = f"model ids ({len(model) if isinstance(model, list) else '?'})"
        note = ""
        if folded:
            note = "<p class=\"warn\">folded: the marked ids differ from the tokenizer's</p>"
        elif tok is not None and tok == model:
            note = "<p class=\"muted\">the same as the tokenizer ids (not folded)</p>"
        rows.append((label, _id_list(model, against=tok if folded else None) + note))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    banner = ""
    if folded:
        banner = ("<p class=\"note warn\"><b>Vocab folded:</b> the tokenizer gave ids the model's vocabulary does "
                  "not have, so they were mapped id % V. The backends were compared on the model ids, which no "
                  "longer spell the text above; a verdict here says nothing about this text on a real model.</p>")
    warnings = run.get("warnings")
    warn_html = ""
    if isinstance(warnings, list) and warnings:
        warn_html = "<ul>" + "".join(f"<li class=\"warn\">{_e(w)}</li>" for w in warnings) + "</ul>"
    return f"<section id=\"prompt\"><h2>Prompt</h2>{banner}<table class=\"kv\">{table}</table>{warn_html}</section>"


def _greedy_section(result: dict) -> str:
    greedy = _dict(_dict(result, "run"), "greedy")
    if not greedy:
        return ""
    backends = _dict(greedy, "backends")
    yard = greedy.get("yardstick")
    yard_tokens = _dict(backends, str(yard)).get("tokens") if yard is not None else None
    yard_tokens = yard_tokens if isinstance(yard_tokens, list) else None
    ftd = _dict(greedy, "first_token_divergence")
    split = ftd.get("step") if ftd else None
    n_steps = max([len(b.get("tokens")) for b in backends.values()
                   if isinstance(b, dict) and isinstance(b.get("tokens"), list)] or [0])

    def step_cells(values: list, *, fmt, diff: list | None = None) -> str:
        cells = []
        for i in range(n_steps):
            v = values[i] if i < len(values) else None
            classes = []
            if diff is not None and i < len(diff) and v is not None and v != diff[i]:
                classes.append("d")
            if i == split:
                classes.append("fs")
            cls = f" class=\"{' '.join(classes)}\"" if classes else ""
            cells.append(f"<td{cls}>{fmt(v)}</td>")
        return "".join(cells)

    head = ("<tr><th>step</th>" + "".join(f"<th{_FS if i == split else ''}>{i}</th>" for i in range(n_steps))
            + "</tr>")
    rows = []
    for name, entry in backends.items():
        if not isinstance(entry, dict):
            continue
        tokens = entry.get("tokens") if isinstance(entry.get("tokens"), list) else []
        label = f"<code>{_e(name)}</code>" + (" <span class=\"muted\">(yardstick)</span>" if name == yard else "")
        rows.append(f"<tr><th>{label}</th>"
                    + step_cells(tokens, fmt=_e, diff=None if name == yard else yard_tokens) + "</tr>")
    margins = greedy.get("margins")
    if isinstance(margins, list):
        rows.append(f"<tr><th class=\"muted\">{_e(yard)} top-2 margin</th>"
                    + step_cells(margins, fmt=lambda v: _fmt(_num(v), digits=2)) + "</tr>")
    for c in _list_of_dicts(greedy, "comparisons"):
        drift = c.get("teacher_forced_max_abs")
        if isinstance(drift, list):
            rows.append(f"<tr><th class=\"muted\">|\u0394logits| {_e(c.get('actual'))} vs {_e(c.get('expected'))}</th>"
                        + step_cells(drift, fmt=lambda v: _fmt(_num(v), digits=2)) + "</tr>")
    token_table = (f"<div class=\"scroll\"><table class=\"kv tok\"><thead>{head}</thead><tbody>{''.join(rows)}"
                   "</tbody></table></div>")

    texts = []
    for name, entry in backends.items():
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("text"), str):
            body = f"<pre class=\"text\">{_e(entry['text'])}</pre>"
        elif entry.get("text_error"):
            body = f"<span class=\"warn\">not decoded: {_e(entry['text_error'])}</span>"
        elif greedy.get("vocab_folded"):
            body = "<span class=\"muted\">not decoded: the ids are folded, so they do not spell tokenizer text</span>"
        else:
            body = "<span class=\"muted\">not decoded: no tokenizer (an ids-only prompt)</span>"
        texts.append(f"<tr><th><code>{_e(name)}</code></th><td>{body}</td></tr>")

    if ftd:
        tone = "note warn" if ftd.get("near_tie") else "note bad"
        verdict = (f"<div class=\"{tone}\"><b>First token divergence at step {_e(ftd.get('step'))}</b>: "
                   f"<code>{_e(ftd.get('expected'))}</code> chose <b>{_e(ftd.get('expected_token'))}</b>, "
                   f"<code>{_e(ftd.get('actual'))}</code> chose <b>{_e(ftd.get('actual_token'))}</b> "
                   f"({'a near-tie' if ftd.get('near_tie') else 'a real divergence'}).<br>"
                   f"{_e(ftd.get('explanation'))}<br><span class=\"muted\">top-2 margin {_fmt(_num(ftd.get('margin')))}"
                   f" ({_e(ftd.get('expected'))}), {_fmt(_num(ftd.get('actual_margin')))} ({_e(ftd.get('actual'))}); "
                   f"logit drift {_fmt(_num(ftd.get('logit_drift')))}, flip threshold "
                   f"{_fmt(_num(greedy.get('flip_atol')))}</span></div>")
    else:
        verdict = (f"<p class=\"note\"><b>No token divergence:</b> every backend chose the same "
                   f"{_e(n_steps)} tokens.</p>")
    warnings = greedy.get("warnings")
    warn_html = ""
    if isinstance(warnings, list) and warnings:
        warn_html = "<ul>" + "".join(f"<li class=\"warn\">{_e(w)}</li>" for w in warnings) + "</ul>"
    return ("<section id=\"greedy\"><h2>Greedy continuation</h2><p class=\"muted\">Each backend decodes "
            f"{_e(greedy.get('steps', n_steps))} tokens feeding back its own argmax (step 0 is the token chosen "
            "after the prompt). Tokens that differ from the yardstick's are marked; the |\u0394logits| rows are "
            "the other backend re-run on the yardstick's tokens, so equal tokens cannot hide drifting logits.</p>"
            f"{verdict}{token_table}<h3 style=\"margin-top:.6em\">Continuations as text</h3>"
            f"<table class=\"kv\"><tbody>{''.join(texts)}</tbody>"
            f"</table>{warn_html}</section>")


# ----------------------------------------------------------------------------- heat map and table


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
        return "<section id=\"heatmap\"><h2>Heat map</h2><p class=\"muted\">No records were compared.</p></section>"

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
    out = ["<section id=\"heatmap\"><h2>Heat map</h2>", _legend()]
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
    out.append("</section>")
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


# (header, data-t: "n" sorts numerically, data-d: "a" sorts ascending on the first click). Error
# columns sort largest first: the reader is looking for the worst records.
_TABLE_COLUMNS = (
    ("step", "n", "a"), ("stage", "s", ""), ("row", "n", "a"), ("result", "s", ""), ("shape", "s", ""),
    ("max_abs", "n", ""), ("max_rel", "n", ""), ("rms_rel", "n", ""), ("cosine", "n", "a"),
    ("mismatched", "n", ""), ("worst index", "s", ""), ("worst actual", "n", ""), ("worst expected", "n", ""),
    ("min_atol", "n", ""), ("min_rtol", "n", ""), ("min_atol / atol", "n", ""), ("rtol / atol", "n", ""),
)


def _sort_value(value: float | None) -> str:
    return "" if value is None else f" data-v=\"{value:g}\""


def _records_table(records: list[dict], *, ids: dict[int, str], first_idx: int | None) -> str:
    if not records:
        return "<section id=\"records\"><h2>Records</h2><p class=\"muted\">No records.</p></section>"
    head = "<tr>" + "".join(
        f"<th data-t=\"{t}\"{_ASC_FIRST if d else ''}>{_e(name)}</th>" for name, t, d in _TABLE_COLUMNS
    ) + "</tr>"
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
        score = _score(rec)
        ratio = None if score is None else 10 ** score if math.isfinite(score) else (0.0 if score < 0 else math.inf)
        pct = _num(rec.get("mismatch_pct"))
        rows.append(
            f"<tr id=\"{ids[i]}\"{class_attr} data-s=\"{_e(stage)}\">"
            f"<td class=\"n\">{_e(rec.get('step'))}</td><td>{_e(stage)}</td><td class=\"n\">{_fmt(rec.get('row'))}</td>"
            f"<td>{result_cell}</td><td>{_fmt_shape(rec.get('shape'))}</td>"
            + "".join(f"<td class=\"n\">{_fmt(rec.get(k))}</td>" for k in ("max_abs", "max_rel", "rms_rel", "cosine"))
            # Sorted by the percentage, not by the count the cell starts with: tensors differ in size.
            + f"<td class=\"n\"{_sort_value(pct)}>{_fmt_mismatch(rec)}</td>"
            f"<td>{_fmt(rec.get('worst_index'))}</td>"
            # The worst values need more digits than the errors, or both print as the same number.
            + "".join(f"<td class=\"n\">{_fmt(rec.get(k), digits=7)}</td>" for k in ("worst_actual", "worst_expected"))
            + "".join(f"<td class=\"n\">{_fmt(rec.get(k))}</td>" for k in ("min_atol", "min_rtol"))
            + f"<td class=\"n\">{_fmt(ratio)}</td>"
            + f"<td class=\"n\">{_fmt(rec.get('rtol'))} / {_fmt(rec.get('atol'))}</td></tr>"
        )
    controls = ("<p><label>filter stages <input id=\"flt\" type=\"search\" placeholder=\"e.g. att.wkv\"></label> "
                "<label><input id=\"fonly\" type=\"checkbox\"> failing only</label> "
                "<span class=\"muted\">\u2014 click a column header to sort (again to reverse)</span></p>")
    return (f"<section id=\"records\"><h2>Records</h2>{controls}<table class=\"rec\"><thead>{head}</thead>"
            f"<tbody>\n" + "\n".join(rows) + "\n</tbody></table></section>")


def _missing_section(missing: list[dict], *, unmatched: list[dict]) -> str:
    unmatched_html = ""
    if unmatched:
        items = "".join(f"<li>step {_e(u.get('index'))}: only in {_e(u.get('present_in'))}</li>" for u in unmatched)
        unmatched_html = f"<p class=\"warn\">Steps recorded on one side only (not compared):</p><ul>{items}</ul>"
    if not missing:
        return ("<section id=\"missing\"><h2>Missing stages</h2><p class=\"muted\">None: every stage exists on "
                f"both sides.</p>{unmatched_html}</section>")
    seen: set[str] = set()
    rows = []
    for m in missing:
        anchor = _missing_anchor(m)
        id_attr = "" if anchor in seen else f" id=\"{anchor}\""
        seen.add(anchor)
        rows.append(f"<tr{id_attr}><td>{_e(m.get('step'))}</td><td><code>{_e(m.get('stage'))}</code></td>"
                    f"<td>{_e(m.get('missing_in'))}</td></tr>")
    return ("<section id=\"missing\"><h2>Missing stages</h2><p class=\"muted\">Present on one side only; not "
            "compared.</p><table class=\"kv\"><thead><tr><th>step</th><th>stage</th><th>missing in</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{unmatched_html}</section>")


# ----------------------------------------------------------------------------- run metadata


def _run_section(result: dict) -> str:
    run = _dict(result, "run")
    expected, actual = _dict(result, "expected"), _dict(result, "actual")
    if not run and not expected and not actual:
        return "<section id=\"run\"><h2>Run</h2><p class=\"muted\">No run metadata recorded.</p></section>"

    def pair(key: str) -> str:
        a, b = expected.get(key), actual.get(key)
        if a == b:
            return _fmt(a)
        return f"{_fmt(a)} <span class=\"muted\">(expected)</span> / {_fmt(b)} <span class=\"muted\">(actual)</span>"

    rows: list[tuple[str, str]] = []
    backends = run.get("backends")
    if isinstance(backends, list):
        rows.append(("backends", ", ".join(f"<code>{_e(b)}</code>" for b in backends)
                     + " <span class=\"muted\">(the first is the yardstick)</span>"))
    rows.append(("compared", f"<code>{_e(actual.get('backend', '?'))}</code> against "
                             f"<code>{_e(expected.get('backend', '?'))}</code>"))
    rows.append(("dtype", pair("dtype")))
    capture = pair("mode")
    if run.get("mode") is not None or result.get("mode") is not None:
        capture += (f" <span class=\"muted\">\u2014 run mode</span> {_e(run.get('mode', _DASH))}"
                    f"<span class=\"muted\">, this comparison</span> {_e(result.get('mode', _DASH))}")
    rows.append(("capture modes", capture))
    ck_path = (run.get("checkpoint") or _dict(expected, "checkpoint").get("path")
               or _dict(actual, "checkpoint").get("path"))
    sha = run.get("checkpoint_sha256") or _dict(expected, "checkpoint").get("sha256")
    rows.append(("checkpoint", f"<span class=\"mono\">{_fmt(ck_path)}</span>"))
    rows.append(("checkpoint sha256", f"<span class=\"mono\">{_fmt(sha)}</span>"))
    side_shas = {_dict(s, "checkpoint").get("sha256") for s in (expected, actual)} - {None}
    if len(side_shas) > 1:
        rows.append(("", "<span class=\"warn\">the two dumps were made from different checkpoints</span>"))
    model = run.get("model")
    if isinstance(model, dict):
        rows.append(("model", ", ".join(f"{_e(k)} <b>{_fmt(v)}</b>" for k, v in model.items())))
    for label, side in (("target", "target"), ("library", "library")):
        values = {name: _dict(s, "extra").get(side) for name, s in (("expected", expected), ("actual", actual))}
        if any(v is not None for v in values.values()):
            rows.append((label, " / ".join(f"{_fmt(v)} <span class=\"muted\">({n})</span>"
                                           for n, v in values.items() if v is not None)))
    for key in ("prefill_ids", "decode_ids"):
        if key in run:
            value = run[key]
            label = key.replace("_", " ") + (f" ({len(value)})" if isinstance(value, list) else "")
            rows.append((label, _id_list(value) if isinstance(value, list) else _fmt(value)))
    if run.get("created") is not None:
        rows.append(("created", _fmt(run.get("created"))))
    if isinstance(run.get("command"), str):
        rows.append(("command", _code_block(run["command"], block_id="run-command")))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)

    parts = [f"<section id=\"run\"><h2>Run metadata</h2><table class=\"kv\"><tbody>{table}</tbody></table>",
             _versions_table(run, expected=expected, actual=actual)]
    keys = list(dict.fromkeys(["backend", "mode", "dtype", "path", *expected, *actual]))
    side_rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_fmt(expected.get(k))}</td><td>{_fmt(actual.get(k))}</td></tr>" for k in keys
    )
    parts.append("<details><summary>Everything each dump records about itself</summary><table class=\"kv\"><thead>"
                 f"<tr><th></th><th>expected</th><th>actual</th></tr></thead><tbody>{side_rows}</tbody></table>"
                 "</details>")
    rest = {k: v for k, v in run.items() if k not in _RUN_SHOWN}
    if rest:
        rest_rows = []
        for key, value in rest.items():
            if isinstance(value, dict):
                inner = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in value.items())
                cell = f"<table class=\"kv\"><tbody>{inner}</tbody></table>" if inner else "\u2014"
            else:
                cell = f"<span class=\"mono\">{_fmt(value)}</span>"
            rest_rows.append(f"<tr><th>{_e(key)}</th><td>{cell}</td></tr>")
        parts.append(f"<details><summary>Other run fields</summary><table class=\"kv\"><tbody>{''.join(rest_rows)}"
                     "</tbody></table></details>")
    parts.append("</section>")
    return "\n".join(parts)


def _versions_table(run: dict, *, expected: dict, actual: dict) -> str:
    sources = [(name, _dict(block, "tool_versions")) for name, block in
               (("this run", run), ("expected dump", expected), ("actual dump", actual))]
    sources = [(name, versions) for name, versions in sources if versions]
    if not sources:
        return "<p class=\"muted\">No tool versions recorded.</p>"
    seen = list(dict.fromkeys(t for _, versions in sources for t in versions))
    rank = {t: (_TOOLS_FIRST.index(t) if t in _TOOLS_FIRST else len(_TOOLS_FIRST), i) for i, t in enumerate(seen)}
    tools = sorted(seen, key=rank.__getitem__)
    head = "<tr><th>tool</th>" + "".join(f"<th>{_e(name)}</th>" for name, _ in sources) + "</tr>"
    rows = []
    for tool in tools:
        values = [versions.get(tool) for _, versions in sources]
        # A dump made with another version than its partner is the first suspect for a small drift.
        differs = len({str(v) for v in values if v is not None}) > 1
        cls = " class=\"hl\"" if differs else ""
        rows.append(f"<tr{cls}><th>{_e(tool)}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>")
    return (f"<h3>Tool versions</h3><table class=\"kv\"><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")


def _tolerance_text(tol: Any) -> str:
    if not isinstance(tol, dict):
        return _fmt(tol)
    text = f"rtol {_fmt(tol.get('rtol'))}, atol {_fmt(tol.get('atol'))}"
    if _num(tol.get("scale")):
        text += f", scale {_fmt(tol.get('scale'))}"
    if tol.get("reason"):
        text += " \u2014 " + _e(tol["reason"])
    return text


def _policy_section(result: dict, *, records: list[dict]) -> str:
    policy = _dict(result, "policy")
    parts = ["<section id=\"policy\"><h2>Tolerance policy</h2>"]
    rows = [f"<tr><th>{_e(k)}</th><td>{_tolerance_text(v)}</td></tr>" for k, v in policy.items() if k != "overrides"]
    overrides = policy.get("overrides")
    # Older results wrote overrides as {pattern: tolerance}; the engine now writes a list, so
    # their priority order survives tools that sort keys.
    if isinstance(overrides, dict):
        overrides = [dict(tol, pattern=pattern) if isinstance(tol, dict) else {"pattern": pattern, "value": tol}
                     for pattern, tol in overrides.items()]
    if isinstance(overrides, list) and overrides:
        for tol in overrides:
            if isinstance(tol, dict):
                text = _tolerance_text(tol) if "value" not in tol else _fmt(tol["value"])
                rows.append(f"<tr><th>override <code>{_e(tol.get('pattern'))}</code></th><td>{text}</td></tr>")
    elif overrides is not None:
        rows.append(f"<tr><th>overrides</th><td>{_fmt(overrides) if overrides else 'none'}</td></tr>")
    if rows:
        parts.append(f"<table class=\"kv\"><tbody>{''.join(rows)}</tbody></table>")

    # One line per tolerance rule, not per record: with a scale term every record's effective atol
    # differs, and a row per record would repeat the same reason hundreds of times.
    used: dict[tuple, list] = {}
    for rec in records:
        key = (_fmt(rec.get("rtol"), digits=6), _fmt(rec.get("atol_base"), digits=6),
               _fmt(rec.get("scale"), digits=6), _e(rec.get("tolerance_reason")))
        atol = _num(rec.get("atol"))
        entry = used.setdefault(key, [0, rec.get("stage"), math.inf, -math.inf])
        entry[0] += 1
        if atol is not None and not math.isnan(atol):
            entry[2], entry[3] = min(entry[2], atol), max(entry[3], atol)
    if used:
        body = []
        for (r, base, scale, reason), (n, stage, lo, hi) in used.items():
            if lo > hi:
                span = "\u2014"
            else:
                span = _fmt(lo, digits=4) + ("" if lo == hi else f" \u2013 {_fmt(hi, digits=4)}")
            body.append(f"<tr><td>{r}</td><td>{base}</td><td>{scale}</td><td>{span}</td><td>{n}</td>"
                        f"<td><code>{_e(stage)}</code></td><td>{reason}</td></tr>")
        parts.append("<p>Tolerances applied (the effective atol of a record is atol + scale \u00d7 max|expected| "
                     "of that record):</p><table class=\"kv\"><thead><tr><th>rtol</th><th>atol</th><th>scale</th>"
                     "<th>effective atol</th><th>records</th><th>e.g.</th><th>reason</th></tr></thead>"
                     f"<tbody>{''.join(body)}</tbody></table>")
    parts.append("</section>")
    return "\n".join(parts)
