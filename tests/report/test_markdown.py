"""The PR-comment summary: verdict, first divergence, reproduce command, worst records, link; escaped."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from markdown_it import MarkdownIt  # a rich dependency, so always installed with the project

from parity.compare import MemoryRun, StepInfo, TolerancePolicy, compare_runs
from parity.errors import ParityError
from parity.report.markdown import render_markdown, tolerance_ratio
from parity.stages import stage_order

ORDER = stage_order(n_layer=2)
STEPS = [StepInfo(0, "prefill", [11, 22, 33]), StepInfo(1, "decode", [41]), StepInfo(2, "decode", [42])]


def _result(*, bumps: dict[tuple[int, str], float] | None = None) -> dict:
    """A real engine result over a 2-layer stage order; ``bumps`` adds an error at row 0, column 5."""
    rng = np.random.default_rng(0)
    expected = {
        s.index: {name: rng.standard_normal((8,) if name.startswith("state.") else (len(s.ids), 8)).astype(np.float32)
                  for name in ORDER}
        for s in STEPS
    }
    actual = {i: {k: v.copy() for k, v in arrays.items()} for i, arrays in expected.items()}
    for (step, stage), bump in (bumps or {}).items():
        actual[step][stage].reshape(-1)[5] += bump  # a view: row 0, column 5

    def run(arrays, backend):
        return MemoryRun(steps=STEPS, stage_order=ORDER, dtype="float32", arrays=arrays,
                         description={"backend": backend, "mode": "m", "dtype": "float32", "path": f"/d/{backend}"})

    return compare_runs(actual=run(actual, "tvm"), expected=run(expected, "reference"),
                        policy=TolerancePolicy.for_dtype("float32")).to_dict()


def _html(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(markdown)


def test_divergence_summary_names_where_and_how_badly():
    result = _result(bumps={(1, "L1.att.wkv"): 0.5})
    result["run"] = {"command": "parity run --checkpoint fixtures/m.pth --ids ones:3"}
    md = render_markdown(result)
    fd = result["first_divergence"]
    first_line = md.splitlines()[0]
    assert "\u274c" in first_line and "divergence" in first_line
    where = next(line for line in md.splitlines() if line.startswith("**First divergence:**"))
    assert "decode step 1" in where and "layer 1" in where and "`L1.att.wkv`" in where
    assert "token row 0 (token id 41)" in where
    assert f"max abs {fd['max_abs']:.3g}" in md
    assert f"rms-rel {fd['rms_rel']:.3g}" in md
    assert f"atol \u2265 {fd['min_atol']:.3g} (allowed {fd['atol']:.3g}" in md
    assert "```sh\nparity run --checkpoint fixtures/m.pth --ids ones:3\n```" in md
    assert md.rstrip().endswith("[Full HTML report]({HTML_REPORT_URL})")


def test_prefill_divergence_and_custom_link():
    md = render_markdown(_result(bumps={(0, "emb"): 1.0}), html_link="https://ci.example/run 7/report.html")
    assert "**First divergence:** prefill, stage `emb`, token row 0 (token id 11)" in md
    assert "decode step" not in md.split("**Worst")[0]
    assert "](https://ci.example/run%207/report.html)" in md
    assert '<a href="https://ci.example/run%207/report.html">' in _html(md)


def test_worst_table_ranks_failing_records_by_tolerance_ratio():
    bumps = {(1, "L0.att.k"): 0.01, (1, "L1.att.wkv"): 5.0, (2, "logits"): 0.2, (2, "L0.ffn.out"): 1.0,
             (0, "L1.x_out"): 0.05, (2, "state.L1.att_kv"): 2.0}
    result = _result(bumps=bumps)
    failing = [r for r in result["records"] if not r["passed"]]
    assert len(failing) > 5  # errors propagate nowhere here, so exactly the bumped stages fail
    md = render_markdown(result)
    table = md[md.index("**Worst failing records**"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 5
    shown = [re.search(r"`([^`]+)`", row).group(1) for row in rows]
    ranked = sorted(failing, key=lambda r: -float(r["min_atol"]) / float(r["atol"]))
    assert shown == [r["stage"] for r in ranked[:5]]
    assert f"({len(failing)} in all)" in table
    ratios = [float(re.search(r"\| ([0-9.e+-]+)\u00d7 \|$", row).group(1)) for row in rows]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] > 1


def test_all_pass_shows_closest_records_and_no_divergence_section():
    result = _result()
    md = render_markdown(result, top=3)
    assert md.splitlines()[0].startswith("### \u2705")
    assert "First divergence" not in md
    assert "**Closest to their tolerance** (all pass)" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 3 and all("| ok |" in row for row in rows)
    # A diff result has no run block; its two dump paths are the recipe.
    assert "```sh\nparity diff /d/reference /d/tvm\n```" in md


def test_untrusted_strings_cannot_become_markup():
    evil_stage = '<img src=x onerror="alert(1)">'
    result = _result(bumps={(1, "L1.att.wkv"): 0.5})
    result["first_divergence"]["stage"] = evil_stage
    failing = next(r for r in result["records"] if not r["passed"])
    failing["stage"] = "[x](javascript:alert(1)) | *b* `c`"
    result["actual"]["backend"] = "**tvm**<script>alert(2)</script>"
    result["run"] = {"command": "parity run --ids '```' <script>x</script>\n```\n# not a heading"}
    md = render_markdown(result)

    html = _html(md)
    assert "<img" not in html and "<script" not in html.replace("&lt;script", "")
    assert "javascript:" not in re.sub(r">[^<]*<", "><", html)  # only as text, never in an attribute
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html or "&lt;img src=x onerror=\"alert(1)\"&gt;" in html
    assert "**tvm**&lt;script&gt;alert(2)&lt;/script&gt;" in html  # the asterisks shown, not bold
    assert "<h1>not a heading</h1>" not in html  # the command's own ``` did not close the fence
    code = re.search(r'<pre><code class="language-sh">(.*?)</code></pre>', html, flags=re.S).group(1)
    assert "# not a heading" in code and "```" in code
    # The pipe inside the stage name stayed inside its cell: every body row has nine cells.
    body = html[html.index("<tbody>"):html.index("</tbody>")]
    assert all(row.count("<td") == 9 for row in re.findall(r"<tr>.*?</tr>", body, flags=re.S))
    assert "[x](javascript:alert(1)) | *b* `c`" in re.sub(r"<[^>]+>", "", body).replace("&quot;", '"')


def test_nonfinite_first_divergence():
    result = _result()
    rec = next(r for r in result["records"] if r["step"] == 2 and r["stage"] == "logits")
    rec.update(passed=False, reason="nonfinite", nonfinite_side="actual", first_nonfinite_index=[0, 3],
               min_atol="inf", max_abs=0.1)
    result["first_divergence"] = dict(rec)
    result["verdict"] = "divergence"
    md = render_markdown(result)
    assert "non-finite values in actual, first at [0, 3]" in md
    assert "| **nonfinite** |" in md and "| inf |" in md


def test_warns_about_stages_not_compared():
    result = _result()
    result["missing"] = [{"step": 0, "stage": "L0.att.g", "missing_in": "actual"}]
    result["unmatched_steps"] = [{"index": 3, "kind": "decode", "present_in": "expected"}]
    md = render_markdown(result)
    assert "1 stage records exist on one side only" in md and "`L0.att.g`" in md
    assert "1 steps were recorded on one side only: 3 (only in expected)" in md


@pytest.mark.parametrize("result", [{}, {"verdict": "divergence", "first_divergence": None, "records": []}])
def test_sparse_results_render(result):
    md = render_markdown(result)
    assert "No records were compared." in md and "{HTML_REPORT_URL}" in md


def test_bad_input_is_a_parity_error():
    with pytest.raises(ParityError, match="JSON object"):
        render_markdown([1])  # type: ignore[arg-type]
    with pytest.raises(ParityError, match="records"):
        render_markdown({"records": "oops"})


def test_tolerance_ratio():
    assert tolerance_ratio({"passed": True, "min_atol": 2e-6, "atol": 1e-5}) == pytest.approx(0.2)
    assert tolerance_ratio({"passed": True, "max_abs": 3e-5, "atol": 1e-5}) == pytest.approx(3.0)
    assert tolerance_ratio({"passed": True, "min_atol": 0.0, "atol": 1e-5}) == 0.0
    assert tolerance_ratio({"passed": False, "reason": "shape"}) == math.inf
    assert tolerance_ratio({"passed": False, "reason": "tolerance", "min_atol": "inf", "atol": 1e-5}) == math.inf
    assert tolerance_ratio({"passed": True, "atol": 1e-5}) is None


def test_model_level_blocks_get_one_line_each_when_present():
    from parity.report.markdown import render_markdown

    plain = render_markdown({"verdict": "no divergence", "records": []})
    assert "End-to-end" not in plain and "Drift" not in plain and "Error each stage adds" not in plain
    result = {"verdict": "no divergence", "records": [],
              "end_to_end": {"kl_mean": 1e-9, "kl_max": 2e-8, "top1_agreement": 1.0, "top1_flips": 0,
                             "top5_overlap": 1.0, "rows": 14},
              "own_error": {"method": "replay", "verdict": "no divergence", "worst_ratio": 0.4, "worst_stage": "L0.att.wkv",
                            "first_divergence": None},
              "drift": {"status": "within", "worst_ratio": 2.0, "envelope": 4.0, "by_layer": []}}
    lines = render_markdown(result).splitlines()
    assert [l for l in lines if l.startswith("- End-to-end")] == [
        "- End-to-end: KL mean 1e-09 / max 2e-08 nats, top-1 agreement 1 (0 flips), top-5 overlap 1 over 14 rows"]
    assert [l for l in lines if l.startswith("- Error each stage adds")] == [
        "- Error each stage adds (replay): no divergence, worst 0.4\u00d7 its tolerance at `L0.att.wkv`"]
    assert [l for l in lines if l.startswith("- Drift")] == ["- Drift through the layers: within (worst 2, envelope 4)"]
