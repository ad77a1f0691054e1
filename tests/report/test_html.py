"""The HTML report renders offline from a result dict: escaped, self-contained, linked, well-formed."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from parity.errors import ParityError
from parity.report.html import record_anchor, render_html, write_html
from parity.stages import stage_info, stage_order

_VOID = {"meta", "input", "br", "hr", "img", "link", "col", "wbr", "source"}


def _record(*, step: int, stage: str, passed: bool = True, **fields) -> dict:
    info = stage_info(stage)
    rec = {
        "step": step, "step_kind": "prefill" if step == 0 else "decode", "stage": stage, "layer": info.layer,
        "row": None, "passed": passed, "reason": None if passed else "tolerance",
        "shape": [3, 8] if info.per_token else [8], "max_abs": 2e-7, "max_rel": 1e-6, "rms_rel": 3e-7,
        "cosine": 1.0, "mismatch_count": 0, "numel": 24, "mismatch_pct": 0.0, "worst_index": [1, 2],
        "worst_actual": 0.5000002, "worst_expected": 0.5, "min_atol": 1e-7, "min_rtol": 0.0,
        "rtol": 1.3e-6, "atol": 1e-5, "tolerance_reason": "torch.testing default for float32",
    }
    rec.update(fields)
    return rec


def _result(*, n_layer: int = 2, n_steps: int = 3, fail: tuple[int, str] | None = (1, "L1.att.wkv")) -> dict:
    """A synthetic comparison: every stage of every step, one failing at `fail` and after it."""
    order = stage_order(n_layer=n_layer)
    steps = [{"index": 0, "kind": "prefill", "ids": [11, 22, 33]}]
    steps += [{"index": i, "kind": "decode", "ids": [40 + i]} for i in range(1, n_steps)]
    records = []
    first = None
    for s in range(n_steps):
        for stage in order:
            if (s, stage) == (0, "L0.att.g"):
                continue  # listed under "missing" below, as the engine would
            failing = fail is not None and (s, order.index(stage)) >= (fail[0], order.index(fail[1]))
            if failing:
                rec = _record(step=s, stage=stage, passed=False, row=0, max_abs=3e-3, min_atol=2.9e-3,
                              mismatch_count=5, mismatch_pct=20.8)
                first = first or dict(rec)
            else:
                rec = _record(step=s, stage=stage)
            records.append(rec)
    return {
        "verdict": "divergence" if first else "no divergence",
        "first_divergence": first,
        "expected": {"backend": "torch-ref", "mode": "prefill+decode", "dtype": "float32", "path": "/d/ref"},
        "actual": {"backend": "tvm", "mode": "prefill+decode", "dtype": "float32", "path": "/d/tvm"},
        "policy": {"dtype": "float32", "overrides": {"logits": {"rtol": 1e-4, "atol": 1e-4, "reason": "head"}}},
        "steps": steps,
        "records": records,
        "missing": [{"step": 0, "stage": "L0.att.g", "missing_in": "actual"}],
        "summary": {"records": len(records), "failed": sum(not r["passed"] for r in records),
                    "worst_logits_max_abs": 3e-3},
        "run": {"checkpoint": "/m/rwkv.pth", "checkpoint_sha256": "ab" * 32, "model": {"n_layer": n_layer},
                "command": "rwkv-parity run", "tool_versions": {"numpy": "2.4"}, "created": "2025-01-01"},
    }


class _Collector(HTMLParser):
    """Records ids, links and table cells, and checks that every non-void tag is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.heat_hrefs: list[str] = []
        self.table_depth = 0
        self._in_heat = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if "href" in a:
            self.hrefs.append(a["href"])
            if self._in_heat:
                self.heat_hrefs.append(a["href"])
        if "src" in a:
            self.srcs.append(a["src"])
        if tag == "table" and "hm" in (a.get("class") or "").split():
            self._in_heat += 1
        elif tag == "table" and self._in_heat:
            self._in_heat += 1
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "table" and self._in_heat:
            self._in_heat -= 1


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    c.close()
    return c


def test_verdict_and_first_divergence_panel():
    page = render_html(_result())
    assert "verdict v-bad" in page and ">divergence</span>" in page
    panel = page[page.index("First divergence"):page.index("Heat map")]
    assert "L1.att.wkv" in panel
    assert "decode step 1" in panel
    assert "token id 41" in panel  # row 0 of decode step 1, whose id is 41
    assert "0.0029" in panel  # min_atol that would pass


def test_prefill_divergence_is_called_prefill():
    page = render_html(_result(fail=(0, "emb")))
    panel = page[page.index("First divergence"):page.index("Heat map")]
    assert "prefill" in panel and "decode step" not in panel
    assert "token id 11" in panel


def test_no_external_resources():
    page = render_html(_result())
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.IGNORECASE)
    assert refs, "expected in-page links"
    assert all(ref.startswith("#") for ref in refs), [r for r in refs if not r.startswith("#")]
    assert "http://" not in page and "https://" not in page
    assert "url(" not in page and "@import" not in page


def test_malicious_strings_are_escaped():
    evil = "<script>alert(1)</script>"
    result = _result()
    result["records"][3]["stage"] = "L0." + evil
    result["records"][3]["passed"] = False
    result["first_divergence"]["stage"] = evil
    result["actual"]["backend"] = evil
    result["expected"]["path"] = evil + ".pth"
    result["run"]["checkpoint"] = evil + ".pth"
    result["run"]["tool_versions"]["x"] = evil
    result["policy"]["overrides"][evil] = {"rtol": 1, "atol": 1, "reason": evil}
    result["missing"].append({"step": 0, "stage": evil, "missing_in": evil})
    result["steps"][0]["ids"] = [evil]
    page = render_html(result, title=evil)
    assert "<script>alert" not in page
    assert page.count("<script") == 1  # only the report's own inline script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.pth" in page
    assert not _parse(page).errors


def test_every_record_has_an_anchor_and_heat_cells_link_to_existing_ids():
    result = _result()
    c = _parse(render_html(result))
    ids = set(c.ids)
    assert len(ids) == len(c.ids), "duplicate ids"
    for rec in result["records"]:
        assert record_anchor(rec["step"], rec["stage"]) in ids
    rec_links = [h for h in c.heat_hrefs if h.startswith("#rec-")]
    assert len(rec_links) == len(result["records"])
    assert all(h.startswith("#") and h[1:] in ids for h in c.hrefs), [h for h in c.hrefs if h[1:] not in ids]
    assert "#miss-0-L0.att.g" in c.heat_hrefs


def test_anchor_sanitises_and_stays_unique():
    assert record_anchor(2, "state.L0.att_kv") == "rec-2-state.L0.att_kv"
    assert record_anchor(0, 'a b/"c"') == "rec-0-a_b__c_"
    result = _result(fail=None)
    result["records"][0]["stage"] = "x y"
    result["records"][1]["stage"] = "x_y"
    c = _parse(render_html(result))
    assert len(set(c.ids)) == len(c.ids)
    assert all(h[1:] in set(c.ids) for h in c.hrefs)


def test_failing_and_first_cells_are_marked():
    page = render_html(_result())
    first_anchor = record_anchor(1, "L1.att.wkv")
    cell = re.search(r'<td class="([^"]*)"><a href="#' + re.escape(first_anchor) + '"', page)
    assert cell and {"x", "fd"} <= set(cell.group(1).split())
    passing = re.search(r'<td class="([^"]*)"><a href="#' + re.escape(record_anchor(0, "emb")) + '"', page)
    assert passing and "x" not in passing.group(1).split() and passing.group(1).startswith("p")
    assert re.search(r'<tr id="' + re.escape(first_anchor) + '" class="bad fd"', page)
    assert "min_atol / atol" in page  # the legend says what the colour means


def test_no_divergence_renders_without_panel_error():
    result = _result(fail=None)
    page = render_html(result)
    assert "verdict v-ok" in page and ">no divergence</span>" in page
    assert "First divergence</h2>" not in page
    assert "no first divergence" in page
    assert 'class="bad' not in page
    assert "missing stages" in page  # a clean verdict with uncompared stages still warns


def test_well_formed_and_tables_balanced():
    page = render_html(_result())
    c = _parse(page)
    assert not c.errors
    assert c.stack == []
    assert page.count("<table") == page.count("</table>")
    assert page.count("<tr") == page.count("</tr>")


def test_inf_and_nan_strings_render():
    result = _result(fail=None)
    rec = result["records"][5]
    rec.update(passed=False, reason="nonfinite", max_abs="inf", rms_rel="nan", cosine="nan", min_atol="inf",
               worst_actual="-inf", first_nonfinite_index=[0, 3], nonfinite_side="actual")
    result["verdict"] = "divergence"
    result["first_divergence"] = dict(rec)
    result["summary"]["worst_logits_max_abs"] = "nan"
    page = render_html(result)
    anchor = record_anchor(rec["step"], rec["stage"])
    row = re.search(r'<tr id="' + re.escape(anchor) + r'".*?</tr>', page).group(0)
    assert ">inf<" in row and ">nan<" in row and ">-inf<" in row
    assert re.search(r'<td class="nf x fd"><a href="#' + re.escape(anchor) + '"', page)
    panel = page[page.index("First divergence"):page.index("Heat map")]
    assert "nonfinite_side" in panel and "(0, 3)" in panel
    assert not _parse(page).errors


@pytest.mark.parametrize("result", [
    {},
    {"verdict": "no divergence", "records": [], "missing": [], "steps": []},
    {"verdict": "divergence", "first_divergence": None, "records": []},
])
def test_empty_results_render(result):
    page = render_html(result)
    assert "No records" in page
    c = _parse(page)
    assert not c.errors and c.stack == []


def test_partial_records_render():
    # A record missing most metrics (an older engine, or a shape failure) still gets a cell and a row.
    result = {"verdict": "divergence", "records": [{"step": 0, "stage": "emb", "passed": False, "reason": "shape"}],
              "first_divergence": {"step": 0, "stage": "emb", "reason": "shape"}}
    page = render_html(result)
    assert '<td class="sh x fd">' in page
    assert record_anchor(0, "emb") in page


def test_output_size_for_a_realistic_run():
    result = _result(n_layer=4, n_steps=5)
    assert len(result["records"]) > 500
    page = render_html(result)
    assert len(page.encode()) < 600_000
    json.dumps(result, allow_nan=False)  # the synthetic input obeys the strict-JSON schema


def test_write_html_atomic_and_creates_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "report.html"
    out = write_html(_result(), target)
    assert out == target
    assert target.read_text(encoding="utf-8") == render_html(_result())
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_non_dict_result_is_a_parity_error():
    with pytest.raises(ParityError, match="JSON object"):
        render_html([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ParityError, match="records"):
        render_html({"records": "oops"})


def test_heat_map_columns_follow_execution_order_despite_missing_stage():
    # L0.att.g is missing in step 0, so att.g is first seen in L1, after L0's x_out.
    page = render_html(_result())
    header = re.search(r'<table class="hm"><thead>(.*?)</thead>', page).group(1)
    cols = re.findall(r"<th>([^<]+)</th>", header)
    assert cols.index("att.v") < cols.index("att.g") < cols.index("att.wkv")
    assert cols[0] == "emb" and cols.index("x_out") < cols.index("logits") < cols.index("att_kv")


def test_written_report_is_readable_by_others(tmp_path):
    target = write_html(_result(fail=None), tmp_path / "r.html")
    assert target.stat().st_mode & 0o777 == 0o644


def test_renders_what_the_compare_engine_produces():
    # Guards against drift between this renderer and the engine's to_dict() schema.
    np = pytest.importorskip("numpy")
    compare = pytest.importorskip("parity.compare")
    if not hasattr(compare, "compare_runs"):
        pytest.skip("compare engine not available")
    order = stage_order(n_layer=1)
    steps = [compare.StepInfo(index=0, kind="prefill", ids=[5, 6]), compare.StepInfo(index=1, kind="decode", ids=[7])]
    rng = np.random.default_rng(0)
    expected = {i: {s: rng.standard_normal((8,) if s.startswith("state.") else (t, 8)).astype(np.float32)
                    for s in order} for i, t in ((0, 2), (1, 1))}
    actual = {i: {s: a.copy() for s, a in arrays.items()} for i, arrays in expected.items()}
    actual[1]["L0.att.wkv"][0, 3] += 0.01
    actual[1]["logits"][0, 2] = np.nan

    def run(arrays, name):
        return compare.MemoryRun(steps=steps, stage_order=order, dtype="float32", arrays=arrays,
                                 description={"backend": name, "mode": "m", "dtype": "float32", "path": "/p"})

    result = compare.compare_runs(actual=run(actual, "tvm"), expected=run(expected, "torch"),
                                  policy=compare.TolerancePolicy.for_dtype("float32")).to_dict()
    page = render_html(result)
    panel = page[page.index("First divergence"):page.index("Heat map")]
    assert "L0.att.wkv" in panel and "decode step 1" in panel and "token id 7" in panel
    assert "nonfinite_side" not in panel  # the engine's null non-finite fields are not shown as noise
    assert re.search(r'<td class="nf x"><a href="#' + re.escape(record_anchor(1, "logits")) + '"', page)
    c = _parse(page)
    assert not c.errors and all(h[1:] in set(c.ids) for h in c.hrefs)
