"""The likely cause in the Markdown summary and the HTML report, from a result's "explanation"."""

from __future__ import annotations

from parity.explain.render import likely_cause_markdown
from parity.report.html import render_html
from parity.report.markdown import render_markdown

FD = {"step": 0, "step_kind": "prefill", "stage": "L0.att.ln_x", "layer": 0, "passed": False, "reason": "tolerance",
      "row": 0, "max_abs": 0.0075, "min_atol": 0.0075, "atol": 0.0013, "rtol": 1.3e-6}
EXPLANATION = {"status": "explained", "summary": "explained: GroupNorm eps (fitted eps 0.00025) reproduces it",
               "fix": "use eps = 64e-5 in the ln_x GroupNorm", "evidence": ["error largest at token row 0 <here>"],
               "hypotheses": []}


def _result(**extra):
    return {"verdict": "divergence", "first_divergence": FD, "records": [], "steps": [], **extra}


def test_markdown_names_the_likely_cause_and_fix():
    md = render_markdown(_result(explanation=EXPLANATION))
    assert "**Likely cause:** explained: GroupNorm eps (fitted eps 0.00025)" in md
    assert "**Fix:** use eps = 64e-5" in md
    assert "Likely cause" not in render_markdown(_result())


def test_markdown_escapes_table_pipes_and_says_when_unexplained():
    md = likely_cause_markdown({"summary": "not explained by any known porting bug (a|b)", "fix": None})
    assert md == "**Likely cause:** not explained by any known porting bug (a\\|b)"


def test_html_has_a_likely_cause_card_next_to_the_first_divergence():
    html = render_html(_result(explanation=EXPLANATION))
    assert 'id="likely-cause"' in html
    assert html.index('id="first-divergence"') < html.index('id="likely-cause"')
    assert "Fix: use eps = 64e-5" in html
    assert "&lt;here&gt;" in html  # evidence is text, escaped
    assert 'id="likely-cause"' not in render_html(_result())
