"""The HTML report renders offline from a result dict: escaped, self-contained, linked, well-formed."""

from __future__ import annotations

import html
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


def _full_result() -> dict:
    """``_result()`` plus everything a session run adds: detail, repro, both modes, every pair, known
    differences, and a folded text prompt with a greedy comparison that parts at step 2."""
    result = _result()
    first = result["first_divergence"]
    result["first_divergence_detail"] = {
        "stage": first["stage"], "step": first["step"],
        "histogram": {"log10_edges": [-8.0, -7.5, -7.0, -6.5, -6.0, -5.5, -5.0, -4.5, -4.0, -3.5, -3.0, -2.5],
                      "counts": [1, 2, 5, 9, 3, 0, 0, 0, 0, 1, 2], "exact": 1, "nonfinite": 0},
        "row_max_abs": [3e-3],
    }
    result["repro"] = ("parity run --checkpoint /m/rwkv.pth --backends reference,tvm --ids 11,22,33 "
                       "--decode-ids 41 --mode isolated --only-step 1 --only-layer 1")
    result["mode"] = "isolated"
    propagated = dict(first, stage="L0.att.k", layer=0)
    result["modes"] = {
        "propagated": {"verdict": "divergence", "first_divergence": propagated,
                       "summary": {"records": 100, "failed": 77, "worst_logits_max_abs": 0.5}},
        "isolated": {"verdict": "divergence", "first_divergence": first, "summary": result["summary"]},
    }
    result["comparisons"] = [
        {"expected": "reference", "actual": "tvm", "verdict": "divergence", "first_divergence": first,
         "summary": {"records": 10, "failed": 4, "worst_logits_max_abs": 0.25}},
        {"expected": "reference", "actual": "chatrwkv", "verdict": "no divergence", "first_divergence": None,
         "summary": {"records": 10, "failed": 0, "worst_logits_max_abs": 0.0}},
        {"expected": "chatrwkv", "actual": "tvm", "verdict": "divergence", "first_divergence": first,
         "summary": {"records": 10, "failed": 4, "worst_logits_max_abs": 0.25}},
    ]
    result["odd_one_out"] = {"backend": "tvm", "explanation": "reference, chatrwkv agree with each other; "
                                                             "tvm diverges from all of them"}
    result["known_differences"] = [
        {"backend": "hf", "name": "rescale_every", "applies": False, "detail": "only layers >= 6"},
        {"backend": "hf", "name": "ln0_at_run_time", "applies": True, "detail": "identical in fp32"},
    ]
    result["actual"].update(tool_versions={"apache-tvm": "0.27.0", "torch": "2.13.0", "numpy": "2.4.6"},
                            extra={"target": "llvm -mcpu=znver3", "library": "rwkv5-debug.so"})
    result["expected"]["tool_versions"] = {"apache-tvm": "0.27.0", "torch": "2.12.0", "numpy": "2.4.6"}
    result["run"].update(
        backends=["reference", "tvm", "chatrwkv"], mode="both", prefill_ids=[11, 22, 33], decode_ids=[41, 42],
        tool_versions={"apache-tvm": "0.27.0", "torch": "2.13.0", "numpy": "2.4.6"},
        scenario={"name": "chat-hello", "description": "one chat turn", "source": "fixtures/scenarios/chat-hello.json"},
        template="chatrwkv", text="User: Hi!\n\nAssistant:", tokenizer_ids=[24281, 22, 1057],
        model_ids=[729, 22, 33], vocab_folded=True,
        warnings=["vocab folded: 2 of 3 ids were mapped to id % 1024"],
        greedy={
            "steps": 4, "yardstick": "reference",
            "backends": {"reference": {"tokens": [5, 6, 7, 8], "text": "Hello there"},
                         "tvm": {"tokens": [5, 6, 9, 10], "text": "Hello thing"}},
            "margins": [0.5, 0.4, 2e-5, 0.3],
            "comparisons": [{"expected": "reference", "actual": "tvm", "tokens_equal": False,
                             "teacher_forced_max_abs": [1e-6, 2e-6, 4e-6, 3e-6], "max_abs": 4e-6,
                             "first_token_divergence": None}],
            "first_token_divergence": {
                "step": 2, "expected": "reference", "actual": "tvm", "expected_token": 7, "actual_token": 9,
                "margin": 2e-5, "actual_margin": 1e-5, "logit_drift": 4e-6, "near_tie": True,
                "explanation": "near-tie: reference's top-2 margin is 2e-05 and the logits differ by only 4e-06"},
            "flip_atol": 1e-3, "vocab_folded": False, "warnings": [],
        },
    )
    return result


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


def _section(page: str, section_id: str) -> str:
    """The markup of one top-level ``<section id=...>`` (sections are never nested)."""
    m = re.search(r'<section id="' + re.escape(section_id) + r'"[^>]*>(.*?)</section>', page, flags=re.S)
    assert m, f"no section {section_id!r}"
    return m.group(1)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    c.close()
    return c


def test_verdict_and_first_divergence_panel():
    page = render_html(_result())
    assert "verdict v-bad" in page and ">divergence</span>" in page
    panel = _section(page, "first-divergence")
    assert "L1.att.wkv" in panel
    assert "decode step 1" in panel
    assert "token id 41" in panel  # row 0 of decode step 1, whose id is 41
    assert "0.0029" in panel  # min_atol that would pass


def test_prefill_divergence_is_called_prefill():
    page = render_html(_result(fail=(0, "emb")))
    panel = _section(page, "first-divergence")
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
    full = _full_result()
    for key in ("first_divergence_detail", "modes", "comparisons", "odd_one_out", "known_differences"):
        result[key] = full[key]
    result["mode"] = "isolated"
    result["repro"] = "parity run --ids '" + evil + "'"
    result["first_divergence_detail"]["stage"] = evil
    result["modes"]["propagated"]["first_divergence"] = dict(result["first_divergence"], stage=evil + "p")
    result["comparisons"][0]["actual"] = evil
    result["odd_one_out"] = {"backend": evil, "explanation": evil}
    result["known_differences"][0].update(backend=evil, name=evil, detail=evil)
    result["actual"]["extra"] = {"target": evil}
    result["expected"]["tool_versions"] = {evil: evil}
    result["run"].update({k: v for k, v in full["run"].items() if k not in result["run"]})
    result["run"].update(text=evil, template=evil, tokenizer_ids=[evil], model_ids=[evil], command=evil,
                         scenario={"name": evil, "description": evil, "source": evil}, warnings=[evil])
    greedy = result["run"]["greedy"]
    greedy["backends"] = {evil: {"tokens": [evil], "text": evil}, "tvm": {"tokens": [1], "text_error": evil}}
    greedy["first_token_divergence"].update(explanation=evil, actual=evil, actual_token=evil)
    page = render_html(result, title=evil)
    for section in ("first-divergence", "modes", "pairs", "known", "prompt", "greedy", "run"):
        assert "&lt;script&gt;" in _section(page, section), section
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
    panel = _section(page, "first-divergence")
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
    panel = _section(page, "first-divergence")
    assert "L0.att.wkv" in panel and "decode step 1" in panel and "token id 7" in panel
    assert "nonfinite_side" not in panel  # the engine's null non-finite fields are not shown as noise
    assert re.search(r'<td class="nf x"><a href="#' + re.escape(record_anchor(1, "logits")) + '"', page)
    c = _parse(page)
    assert not c.errors and all(h[1:] in set(c.ids) for h in c.hrefs)


# ----------------------------------------------------------------------------- issue 5 / 6 sections


def _charts(markup: str) -> list[dict]:
    """The data of each chart (``<figure class="plot" data-chart=...>``) that report.js draws; the
    drawing itself is checked in a real browser (tests/report/test_browser.py)."""
    return [json.loads(html.unescape(d)) for d in re.findall(r'<figure class="plot" data-chart="([^"]*)">', markup)]


def test_every_section_renders_well_formed_and_linked():
    page = render_html(_full_result())
    c = _parse(page)
    assert not c.errors and c.stack == []
    assert len(set(c.ids)) == len(c.ids), "duplicate ids"
    assert all(h.startswith("#") and h[1:] in set(c.ids) for h in c.hrefs)
    order = [page.index(f'<section id="{s}"') for s in
             ("verdict", "first-divergence", "modes", "pairs", "known", "prompt", "greedy", "growth", "heatmap",
              "records", "missing", "run", "policy")]
    assert order == sorted(order)
    assert page.count("<script") == 1 and "http" not in page  # inline SVG needs no xmlns URL either


def test_repro_command_is_a_copyable_block_in_the_panel():
    result = _full_result()
    panel = _section(render_html(result), "first-divergence")
    block = re.search(r'<pre class="cmd" id="repro"><code>(.*?)</code></pre>', panel)
    assert block and block.group(1) == result["repro"]
    assert '<button class="copy" type="button" data-for="repro">' in panel
    assert "isolated run of this step and layer" in panel  # the repro is narrowed, and says so


def test_repro_without_divergence_sits_under_the_verdict_and_falls_back_to_the_command():
    result = _result(fail=None)
    result["repro"] = "parity run --checkpoint a.pth --ids 1,2"
    page = render_html(result)
    assert "parity run --checkpoint a.pth --ids 1,2" in _section(page, "verdict")
    del result["repro"]
    verdict = _section(render_html(result), "verdict")
    assert "The command of this run" in verdict and "rwkv-parity run" in verdict
    del result["run"]
    verdict = _section(render_html(result), "verdict")
    assert "parity diff /d/ref /d/tvm" in verdict
    del result["expected"]["path"]
    assert 'id="repro"' not in render_html(result)


def test_error_histogram_of_the_first_diverging_tensor():
    result = _full_result()
    panel = _section(render_html(result), "first-divergence")
    assert "Error histogram of <code>L1.att.wkv</code> at decode step 1" in panel
    hist, rows = _charts(panel)
    hist_counts = result["first_divergence_detail"]["histogram"]["counts"]
    # one bar per bin, and the exact elements counted beside them; no non-finite ones
    assert [b["count"] for b in hist["bars"]] == hist_counts and hist["exact"] == 1 and hist["nonfinite"] == 0
    assert (hist["lo"], hist["hi"]) == (-8.0, -2.5) and hist["log_atol"] == pytest.approx(-5.0)
    assert hist["atol_label"] == "atol 1e-05"
    # bins wholly above atol (1e-5) are red, those below green
    colours = {b["tip"]: b["colour"] for b in hist["bars"]}
    assert colours["1 elements with |Δ| in [0.000316, 0.001)"] == "#d73027"
    assert colours["9 elements with |Δ| in [3.16e-07, 1e-06)"] == "#85c77f"
    assert "<p class=\"muted\">24 elements: 1 exact, 0 non-finite." in panel
    # the row chart: one bar, the first divergence's row, dark
    (bar,) = rows["bars"]
    assert bar["colour"] == "#7f0000" and bar["tip"].startswith("row 0 (token id 41)")


def test_histogram_absent_or_for_another_stage_says_so():
    result = _full_result()
    result["first_divergence_detail"] = None
    panel = _section(render_html(result), "first-divergence")
    assert "No error histogram" in panel and not _charts(panel)
    result = _full_result()
    result["first_divergence_detail"].update(stage="L0.att.k", row_max_abs=None)
    panel = _section(render_html(result), "first-divergence")
    assert "not the stage named on the left" in panel and len(_charts(panel)) == 1
    result["first_divergence_detail"]["histogram"]["counts"] = [1, 2]  # does not match the edges
    assert "malformed" in _section(render_html(result), "first-divergence")


def test_error_growth_plot_one_line_per_step_with_legend_and_axes():
    result = _result(n_steps=3)
    growth = _section(render_html(result), "growth")
    abs_plot, tol_plot = _charts(growth)
    for plot in (abs_plot, tol_plot):
        assert len(plot["series"]) == 3  # prefill, step 1, step 2
        assert [label for _, label in plot["legend"]] == ["prefill", "step 1", "step 2"]
        assert plot["positions"] == ["emb", "L0", "L1", "head"]
    assert abs_plot["ylabel"] == "worst max |Δ|" and not abs_plot["tolerance"] and tol_plot["tolerance"]
    # step 1 fails from L1.att.wkv on at min_atol 2.9e-3 against atol 1e-5: 290x at L1, drawn as the
    # first divergence (the big marker) and linked to its row
    points = [p for series in tol_plot["series"] for p in series["points"]]
    (first,) = [p for p in points if p["first"]]
    assert first["href"] == record_anchor(1, "L1.att.wkv") and first["tip"] == "step 1 · L1: 290 at L1.att.wkv"
    assert any(p["tip"].startswith("prefill · L1: 0.01 at") for p in points)  # passing: min_atol 1e-7 / atol 1e-5


def test_error_growth_plot_greys_out_steps_past_the_legend_limit():
    growth = _section(render_html(_result(n_layer=1, n_steps=13, fail=(1, "L0.att.wkv"))), "growth")
    plot = _charts(growth)[0]
    assert len(plot["series"]) == 13
    labels = [label for _, label in plot["legend"]]
    assert labels[-1] == "3 more steps" and "step 9" in labels and "step 10" not in labels
    assert [s["own"] for s in plot["series"]] == [True] * 10 + [False] * 3  # greyed out: no markers


def test_growth_section_absent_without_records():
    assert '<section id="growth"' not in render_html({"verdict": "no divergence", "records": []})


def test_records_table_headers_are_sortable():
    page = render_html(_result())
    head = re.search(r'<table class="rec"><thead><tr>(.*?)</tr>', page).group(1)
    headers = re.findall(r'<th data-t="([ns])"( data-d="a")?>([^<]+)</th>', head)
    assert len(headers) == head.count("<th")  # every column sorts
    kinds = {name: (t, bool(asc)) for t, asc, name in headers}
    assert kinds["stage"] == ("s", False) and kinds["max_abs"] == ("n", False) and kinds["step"] == ("n", True)
    row = re.search(r'<tr id="' + re.escape(record_anchor(1, "L1.att.wkv")) + r'".*?</tr>', page).group(0)
    assert 'data-v="20.8">5 / 24 (20.8%)' in row  # mismatches sort by share, not by count
    assert ">290<" in row  # the min_atol / atol column
    assert "aria-sort" in page and "flt" in page  # the sort and the filter script


def test_run_metadata_lists_versions_target_and_checkpoint():
    result = _full_result()
    run = _section(render_html(result), "run")
    for text in ("<code>reference</code>, <code>tvm</code>, <code>chatrwkv</code>", "/m/rwkv.pth", "ab" * 32,
                 "llvm -mcpu=znver3", "rwkv5-debug.so", "rwkv-parity run", "float32", "prefill+decode",
                 "run mode</span> both", "this comparison</span> isolated"):
        assert text in run, text
    versions = re.search(r"<h3>Tool versions</h3><table.*?</table>", run, flags=re.S).group(0)
    assert re.findall(r"<tr[^>]*><th>([^<]+)</th><td>", versions) == ["apache-tvm", "torch", "numpy"]
    assert '<tr class="hl"><th>torch</th><td>2.13.0</td><td>2.12.0</td><td>2.13.0</td>' in versions
    assert '<tr><th>numpy</th>' in versions  # the same everywhere: not highlighted
    assert '<button class="copy" type="button" data-for="run-command">' in run


def test_run_metadata_without_a_run_block():
    assert "No run metadata recorded" in render_html({"records": []})
    run = _section(render_html({"records": [], "expected": {"backend": "a"}, "actual": {"backend": "b"}}), "run")
    assert "<code>b</code> against <code>a</code>" in run and "No tool versions recorded" in run


def test_modes_side_by_side():
    modes = _section(render_html(_full_result()), "modes")
    assert "propagated</h3>" in modes and "isolated \u2014 the verdict above</h3>" in modes
    assert "because it names the stage whose own error is out of tolerance" in modes
    assert "77" in modes and "<code>L0.att.k</code>" in modes and "<code>L1.att.wkv</code>" in modes
    assert "They differ: propagated first fails at" in modes


def test_modes_when_isolated_did_not_run_or_passed():
    result = _full_result()
    result["modes"]["isolated"] = None
    result["mode"] = "propagated"
    modes = _section(render_html(result), "modes")
    assert "Not run" in modes and "propagated \u2014 the verdict above" in modes
    result = _full_result()
    result["modes"]["isolated"].update(verdict="no divergence", first_divergence=None)
    assert "no stage adds error of its own: inherited drift" in _section(render_html(result), "modes")


def test_pairs_table_and_odd_one_out():
    result = _full_result()
    pairs = _section(render_html(result), "pairs")
    rows = re.findall(r"<tr( class=\"bad\")?><td><code>([^<]+)</code></td><td><code>([^<]+)</code>", pairs)
    assert [(r[1], r[2], bool(r[0])) for r in rows] == [
        ("reference", "tvm", True), ("reference", "chatrwkv", False), ("chatrwkv", "tvm", True)]
    assert "Odd one out: <code>tvm</code>" in pairs and "tvm diverges from all of them" in pairs
    assert "detailed below" not in pairs  # the top level is the isolated run, none of these pairs
    # describe()-style sides render by backend name too
    result["comparisons"][1].update(expected={"backend": "reference"}, actual={"backend": "chatrwkv"})
    result["mode"] = "propagated"
    result["expected"]["backend"] = "reference"  # the top level is now the reference/tvm pair
    pairs = _section(render_html(result), "pairs")
    assert "<code>chatrwkv</code></td>" in pairs and pairs.count("detailed below") == 1


def test_known_differences_applies_or_not():
    known = _section(render_html(_full_result()), "known")
    assert re.search(r"rescale_every</code></td><td>no effect here</td>", known)
    assert re.search(r"ln0_at_run_time</code></td><td><b>applies</b></td>", known)


def test_text_run_shows_prompt_ids_and_folding():
    result = _full_result()
    page = render_html(result)
    prompt = _section(page, "prompt")
    assert '<pre class="text">User: Hi!\n\nAssistant:</pre>' in prompt
    assert "<code>chatrwkv</code>" in prompt and "chat-hello" in prompt
    assert "tokenizer ids (3)" in prompt and "[24281, 22, 1057]" in prompt
    assert "[<b>729</b>, 22, <b>33</b>]" in prompt  # the folded ids are marked
    assert "Vocab folded:" in prompt and "2 of 3 ids were mapped" in prompt
    assert "Vocab folded:" in _section(page, "verdict")
    result["run"].update(model_ids=[24281, 22, 1057], vocab_folded=False, warnings=[])
    page = render_html(result)
    prompt = _section(page, "prompt")
    assert "Vocab folded" not in page and "model ids (3)</th><td><div class=\"ids\">[24281, 22, 1057]</div>" in prompt
    assert "the same as the tokenizer ids (not folded)" in prompt


def test_greedy_continuations_and_first_token_divergence():
    greedy = _section(render_html(_full_result()), "greedy")
    assert "First token divergence at step 2" in greedy and "a near-tie" in greedy
    assert "near-tie: reference&#39;s top-2 margin is 2e-05" in greedy  # autoescaped
    assert "<b>7</b>" in greedy and "<b>9</b>" in greedy
    assert '<pre class="text">Hello there</pre>' in greedy and '<pre class="text">Hello thing</pre>' in greedy
    tvm_row = re.search(r"<tr><th><code>tvm</code></th>(.*?)</tr>", greedy).group(1)
    assert re.findall(r"<td([^>]*)>(\d+)</td>", tvm_row) == [
        ("", "5"), ("", "6"), (' class="d fs"', "9"), (' class="d"', "10")]
    assert "2e-05" in greedy and "4e-06" in greedy  # margins and teacher-forced drift per step


def test_greedy_without_divergence_and_folded_text():
    result = _full_result()
    greedy = result["run"]["greedy"]
    greedy.update(first_token_divergence=None, vocab_folded=True)
    greedy["backends"] = {"reference": {"tokens": [5, 6], "text": None}, "tvm": {"tokens": [5, 6], "text": None}}
    section = _section(render_html(result), "greedy")
    assert "every backend chose the same 2 tokens" in section and 'class="d' not in section
    assert section.count("the ids are folded") == 2


def test_text_sections_absent_for_an_ids_only_run():
    result = _result()
    result["run"].update(scenario=None, template=None, text=None, tokenizer_ids=None, model_ids=[11, 22, 33],
                         vocab_folded=False, warnings=[])
    page = render_html(result)
    for section in ("prompt", "greedy", "modes", "pairs", "known"):
        assert f'<section id="{section}"' not in page, section
    assert "Vocab folded" not in page


def test_output_size_with_every_section():
    result = _full_result()
    base = _result(n_layer=4, n_steps=5)
    result.update(records=base["records"], steps=base["steps"], first_divergence=base["first_divergence"])
    page = render_html(result)
    assert len(page.encode()) < 650_000


def test_policy_lists_one_row_per_tolerance_rule_not_per_record():
    result = _result(fail=None)
    records = result["records"]
    for i, rec in enumerate(records):  # a scale term gives every record its own effective atol
        rec.update(atol_base=1e-5, scale=2e-4, atol=1e-5 + i * 1e-8)
    result["policy"] = {"dtype": "float32", "default": {"rtol": 1.3e-6, "atol": 1e-5, "scale": 2e-4, "reason": "why"},
                        "overrides": [{"pattern": "logits", "rtol": 1e-4, "atol": 1e-4, "scale": 0.0,
                                       "reason": "head"}]}
    policy = _section(render_html(result), "policy")
    assert "rtol 1.3e-06, atol 1e-05, scale 0.0002 \u2014 why" in policy
    assert "override <code>logits</code></th><td>rtol 0.0001, atol 0.0001 \u2014 head" in policy
    applied = policy[policy.index("Tolerances applied"):]
    rows = re.findall(r"<tr><td>.*?</tr>", applied)
    hi = 1e-5 + (len(records) - 1) * 1e-8
    assert rows == [f"<tr><td>1.3e-06</td><td>1e-05</td><td>0.0002</td><td>1e-05 \u2013 {hi:.4g}</td>"
                    f"<td>{len(records)}</td><td><code>emb</code></td><td>torch.testing default for float32</td></tr>"]


def test_odd_or_partial_session_fields_still_render():
    # Hand-edited or older results: wrong types and missing keys drop a detail, never the page.
    result = _full_result()
    result["first_divergence_detail"].update(
        histogram={"log10_edges": [-3.0, -2.0], "counts": [4], "exact": 0, "nonfinite": 3},
        row_max_abs=[1e-3, "nan", 0.0])
    result["modes"] = {"propagated": "junk", "isolated": {"verdict": "divergence"}}
    result["comparisons"].append("junk")
    result["odd_one_out"] = {"backend": None, "explanation": "several pairs disagree"}
    result["known_differences"] = [{"backend": "hf"}]
    result["run"]["greedy"] = {"backends": {"reference": {"tokens": "junk"}, "tvm": None}, "margins": None}
    result["run"]["model"] = "junk"
    result["unmatched_steps"] = [{"index": 7, "present_in": "actual"}]
    page = render_html(result)
    c = _parse(page)
    assert not c.errors and c.stack == []
    hist, rows = _charts(_section(page, "first-divergence"))
    assert hist["nonfinite"] == 3
    # the exact row has no bar on a log axis (log None); the NaN row is drawn full height
    assert [(b["log"] is None, b["colour"]) for b in rows["bars"]] == [
        (False, "#7f0000"), (False, "#5e3c99"), (True, "#85c77f")]
    assert "Not run" in _section(page, "modes")  # a mode that is not a dict counts as not run
    assert '<p class="note warn"><b>No odd one out</b> \u2014 several pairs disagree' in _section(page, "pairs")
    assert "No token divergence" in _section(page, "greedy")
    assert "step 7: only in actual" in _section(page, "missing")


def _model_checks() -> dict:
    first = _result()["first_divergence"]
    return {
        "end_to_end": {"kl_mean": 1.5e-9, "kl_max": 4e-8, "kl_p999": 3e-8, "top1_agreement": 1.0, "top1_flips": 0,
                       "top1_ties": 2, "top5_overlap": 0.998, "cosine_min": 0.9999991, "rows": 14},
        "own_error": {"method": "replay", "verdict": "divergence", "worst_ratio": 290.0, "worst_stage": "L1.att.wkv",
                      "first_divergence": first},
        "drift": {"status": "beyond", "worst_ratio": 12.0, "envelope": 4.0, "first_over_tolerance": first,
                  "by_layer": [{"layer": 0, "ratio": 1.5}, {"layer": 1, "ratio": 12.0}, {"layer": 2, "ratio": "inf"}]},
    }


def test_model_level_cards_show_each_block_present_and_nothing_when_absent():
    page = render_html(_result())
    assert '<section id="cards"' not in page and "End-to-end" not in page
    result = _result()
    result.update(_model_checks())
    cards = _section(render_html(result), "cards")
    assert "End-to-end" in cards and "1.5e-09 / 3e-08 / 4e-08" in cards and "(0 flips, 2 ties)" in cards
    assert "Error each stage adds" in cards and "(replay)" in cards and "<code>290</code>" in cards
    assert "decode step 1, L1, <code>L1.att.wkv</code>" in cards  # own error's and drift's first divergence
    assert "Drift through the layers" in cards and "beyond" in cards and "(envelope 4)" in cards
    widths = re.findall(r'<th>L(\d)</th><td class="n">([^<]+)</td><td><span class="bar" style="width:(\d+)px">', cards)
    assert widths == [("0", "1.5", "15"), ("1", "12", "120"), ("2", "inf", "120")]  # scaled to the largest finite
    for key in ("end_to_end", "own_error", "drift"):  # each alone
        alone = _result()
        alone[key] = _model_checks()[key]
        assert '<section id="cards"' in render_html(alone) and not _parse(render_html(alone)).errors


def test_model_level_cards_escape_their_strings():
    evil = "<script>alert(1)</script>"
    result = _result()
    result.update(_model_checks())
    result["own_error"].update(method=evil, worst_stage=evil)
    result["drift"]["status"] = evil
    page = render_html(result)
    assert "<script>alert" not in page and _section(page, "cards").count("&lt;script&gt;") == 3


def test_the_typed_result_and_its_json_form_render_the_same_page():
    # The page reads the typed result (parity/results.py) by attribute; a saved file is typed on entry.
    from parity.results import RunResult

    result = _full_result()
    result.update(_model_checks(), explanation={"status": "explained", "summary": "explained: eps", "fix": "use 64e-5"})
    result["crashes"] = [{"backend": "mutant/x", "name": "x", "kind": "crashed", "error": "died with SIGSEGV", "step": 2,
                          "step_kind": "decode", "steps_completed": 2, "last_stage": {"step": 1, "stage": "logits"}}]
    page = render_html(result)
    assert render_html(RunResult.from_dict(json.loads(json.dumps(result)))) == page
    assert "Likely cause" in page and "Backend crashed" in page and "Model-level checks" in page


def test_a_block_read_from_an_empty_object_counts_as_absent():
    result = _result(fail=None)
    result.update(end_to_end={}, own_error={}, drift={})
    assert '<section id="cards"' not in render_html(result)
    result["first_divergence"] = {}
    assert "there is no first divergence" in _section(render_html(result), "first-divergence")
