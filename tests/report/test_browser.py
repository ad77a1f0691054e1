"""The HTML report of a real mutant run in a real headless browser: it loads from file:// without
errors or network, shows the verdict, the first divergence and the heat map, a heat-map click lands
on (and highlights) the record's row, and a header click sorts the table.

The result comes from ``run_parity`` on a compiled mutant (ln_x GroupNorm eps 1e-5 instead of
64e-5), not a tampered dump, so the page is exercised on exactly what the engine writes: both
capture modes, the first divergence's histogram, the narrowed repro command.

Needs Playwright for Python (pip) and a Chromium: the system one (Debian's ``chromium``, or
``$PARITY_CHROMIUM``) or one that ``playwright install chromium`` fetched. Without them the tests
skip, except where ``$CI`` or ``$PARITY_REQUIRE_BROWSER`` is set: there a missing browser fails,
so CI cannot go green without having looked at the page.

The full-page screenshot goes under pytest's base temp dir, never into the checkout:
``/tmp/pytest-of-$USER/pytest-N/browser/report.png`` (pytest keeps the last three runs'
directories; ``pytest-current`` links the newest), or wherever ``$PARITY_SCREENSHOT`` names.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

from parity.report.html import record_anchor, write_html

REPO = Path(__file__).resolve().parents[2]
# The smallest v5.2 fixture (the mutant is a v5.2 GroupNorm bug): two layers keep the compile and a
# full-page screenshot (whose time grows with the table) short.
CHECKPOINT = REPO / "fixtures" / "rwkv5_2-L2-C144-H12.pth"
MUTANT = "mutant/groupnorm-eps-1e-5"
# Distinct prompt ids, so the panel's "token id" can be checked against the row it names.
PREFILL, DECODE = (5, 9, 13, 17, 21, 25), (100, 101)
# Quiet, offline, sandbox-free (containers): nothing may reach the network, and a report needs none.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TARGET_BACKGROUND = "rgb(227, 240, 255)"  # html.py's tr:target highlight


def _unavailable(reason: str, *, fix: str = "CI must install playwright (pip) and chromium (apt)"):
    if os.environ.get("CI") or os.environ.get("PARITY_REQUIRE_BROWSER"):
        pytest.fail(f"browser test cannot run: {reason}; {fix}", pytrace=False)
    pytest.skip(reason)


def _system_chromium() -> str | None:
    for candidate in (os.environ.get("PARITY_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    executable = _system_chromium()
    with sync_playwright() as p:
        try:
            # With no system Chromium, Playwright's own download is the only other choice.
            b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Error as e:
            _unavailable(f"no Chromium could be launched ({str(e).splitlines()[0]})")
        yield b
        b.close()


@pytest.fixture(scope="module")
def report(browser, tmp_path_factory) -> tuple[Path, dict]:
    # Depends on `browser` so that a machine without one skips before paying for the compile.
    try:
        import tvm  # noqa: F401
    except ImportError:
        _unavailable("apache-tvm is not installed, and the report comes from a compiled mutant run",
                     fix="CI must install the project with its TVM dependency")
    from parity.dumpers.backends import RunPlan
    from parity.session import run_parity

    outcome = run_parity(CHECKPOINT, backends=["reference", MUTANT], plan=RunPlan(prefill_ids=PREFILL, decode_ids=DECODE),
                         mode="both",  # the session's compile cache: $PARITY_CACHE_DIR (tests/conftest.py)
                         command="parity run (browser test)")
    result = outcome.result
    # What the rest of the file relies on: the mutant's own stage is named, by the isolated verdict.
    assert result["verdict"] == "divergence" and result["mode"] == "isolated"
    assert result["first_divergence"]["stage"] == "L0.att.ln_x"
    assert result["first_divergence_detail"]["histogram"] is not None
    return write_html(result, tmp_path_factory.mktemp("report") / "report.html"), result


@pytest.fixture
def page(browser, report):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.problems = []
    page.requests = []
    page.on("console", lambda msg: page.problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))
    page.on("request", lambda req: page.requests.append(req.url))
    page.goto(report[0].as_uri())
    yield page
    page.close()


def _row_state(page, anchor: str) -> dict:
    """Where the row is, and what a user would see at its middle (the sticky header could cover it)."""
    return page.evaluate("""(id) => {
        const row = document.getElementById(id), r = row.getBoundingClientRect();
        const hit = document.elementFromPoint(r.left + 20, r.top + r.height / 2);
        const target = document.querySelector(':target');
        return {top: r.top, bottom: r.bottom, height: innerHeight, hitRow: hit && hit.closest('tr') && hit.closest('tr').id,
                target: target && target.id, background: getComputedStyle(row).backgroundColor};
    }""", anchor)


def _column(page, header: str) -> list[str]:
    """The visible texts of one records-table column, top to bottom, as the page now orders them."""
    return page.evaluate("""(name) => {
        const ths = [...document.querySelectorAll('table.rec thead th')];
        const i = ths.findIndex(th => th.textContent === name);
        return [...document.querySelectorAll('table.rec tbody tr')].map(r => r.cells[i].textContent);
    }""", header)


def _row_ids(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('table.rec tbody tr')].map(r => r.id)")


def _as_float(text: str) -> float:
    # NaN is an error too, and the page sorts it with the worst; "inf"/"nan" are how the page prints them.
    return math.inf if text in ("inf", "nan") else float(text)


def test_loads_offline_and_shows_verdict_panel_and_heat_map(page, report):
    _, result = report
    first = result["first_divergence"]
    assert page.locator(".verdict").first.inner_text() == "divergence"
    panel = page.locator("#first-divergence")
    assert panel.is_visible()
    text = panel.inner_text()
    assert "First divergence" in text and "L0.att.ln_x" in text and "prefill" in text
    assert f"token id {PREFILL[first['row']]}" in text
    assert result["repro"] in page.locator("#repro").inner_text()
    assert panel.locator("svg.chart").first.is_visible()  # the error histogram, drawn by the page's script
    hist = result["first_divergence_detail"]["histogram"]
    n_bars = len(hist["counts"]) + bool(hist["exact"]) + bool(hist["nonfinite"])
    assert panel.locator("svg.chart").first.locator("rect.bar").count() == n_bars
    assert page.locator("table.hm").first.is_visible()
    assert page.locator("table.hm td.fd").is_visible()
    assert page.locator("#modes").is_visible() and page.locator("#growth svg.chart").count() == 2
    n_steps = len({r["step"] for r in result["records"]})
    assert page.locator("#growth svg.chart").first.locator("path").count() == n_steps  # one line per step
    # Fits a 1280 px window: nothing scrolls sideways (the records table scrolls inside its own box).
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 1280
    assert page.locator("table.rec tbody tr").count() == len(result["records"])
    assert page.problems == []
    assert all(url.startswith("file://") for url in page.requests), page.requests


def test_heat_map_click_lands_on_the_highlighted_row(page, report):
    _, result = report
    first = result["first_divergence"]
    last_step = max(r["step"] for r in result["records"])
    # The first divergence, then a cell far down the page: each must scroll its row into view,
    # below the sticky table header, and mark it as the target.
    for step, stage in ((first["step"], first["stage"]), (last_step, "logits")):
        anchor = record_anchor(step, stage)
        cell = page.locator(f'table.hm td a[href="#{anchor}"]')
        assert cell.count() == 1
        cell.click()
        page.wait_for_function("(id) => location.hash === '#' + id", arg=anchor)
        state = _row_state(page, anchor)
        assert state["target"] == anchor
        assert 0 <= state["top"] and state["bottom"] <= state["height"], state
        assert state["hitRow"] == anchor, f"row {anchor} is covered (saw {state['hitRow']!r} there)"
        assert state["background"] == TARGET_BACKGROUND
    first_cell = page.locator("table.hm td.fd")
    assert first_cell.count() == 1 and "x" in first_cell.get_attribute("class").split()
    assert page.problems == []


def test_header_click_sorts_the_table(page, report):
    _, result = report
    original = _row_ids(page)
    page.click("table.rec thead th:text-is('max_abs')")
    values = [_as_float(v) for v in _column(page, "max_abs")]
    assert values == sorted(values, reverse=True)  # error columns sort worst first
    assert values[0] == pytest.approx(max(float(r["max_abs"]) for r in result["records"]), rel=1e-2)
    sorted_ids = _row_ids(page)
    assert sorted_ids != original and sorted(sorted_ids) == sorted(original)
    assert page.get_attribute("table.rec thead th:text-is('max_abs')", "aria-sort") == "descending"

    page.click("table.rec thead th:text-is('max_abs')")  # again: reversed
    values = [_as_float(v) for v in _column(page, "max_abs")]
    assert values == sorted(values)
    # Sorting by step is stable over execution order, so it restores the original table.
    page.click("table.rec thead th:text-is('step')")
    assert _row_ids(page) == original
    assert page.problems == []


def test_failing_only_filter_hides_passing_rows(page, report):
    _, result = report
    first = result["first_divergence"]
    n_failed = sum(not r["passed"] for r in result["records"])
    assert 0 < n_failed < len(result["records"])
    page.check("#fonly")
    visible = page.locator("table.rec tbody tr:visible")
    assert visible.count() == n_failed
    assert visible.first.get_attribute("id") == record_anchor(first["step"], first["stage"])
    page.fill("#flt", "ln_x")
    assert page.locator("table.rec tbody tr:visible").count() == sum(
        not r["passed"] and "ln_x" in r["stage"] for r in result["records"])
    # A heat-map click on a row the filter hides clears the filter, so the row can be shown.
    hidden = record_anchor(0, "emb")
    page.click(f'table.hm td a[href="#{hidden}"]')
    page.wait_for_function("(id) => document.getElementById(id).style.display === ''", arg=hidden)
    assert page.locator("table.rec tbody tr:visible").count() == len(result["records"])
    assert page.problems == []


def test_copy_button_and_full_page_screenshot(page, report, tmp_path_factory):
    button = page.locator('button.copy[data-for="repro"]')
    button.click()
    page.wait_for_function("() => document.querySelector('button.copy[data-for=repro]').textContent !== 'copy'")
    assert button.inner_text() in ("copied", "selected: press Ctrl+C")
    assert page.evaluate("() => window.getSelection().toString()") == report[1]["repro"]
    page.click(f'table.hm td a[href="#{record_anchor(0, "L0.att.ln_x")}"]')
    page.evaluate("() => { window.getSelection().removeAllRanges(); window.scrollTo(0, 0); }")
    shot = Path(os.environ.get("PARITY_SCREENSHOT") or tmp_path_factory.getbasetemp() / "browser" / "report.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.problems == []
