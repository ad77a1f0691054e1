"""The HTML report in a real headless browser: it loads from file:// without errors or network, shows
the first divergence, and a heat-map click lands on (and highlights) the record's row.

Needs Playwright for Python (pip) and a Chromium: the system one (Debian's ``chromium``, or
``$PARITY_CHROMIUM``) or one that ``playwright install chromium`` fetched. Without them the tests
skip, except where ``$CI`` or ``$PARITY_REQUIRE_BROWSER`` is set: there a missing browser fails,
so CI cannot go green without having looked at the page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from parity.compare import MemoryRun, StepInfo, TolerancePolicy, compare_runs
from parity.report.html import record_anchor, write_html
from parity.stages import stage_order

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "reports" / "browser" / "report.png"
# Quiet, offline, sandbox-free (containers): nothing may reach the network, and a report needs none.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TARGET_BACKGROUND = "rgb(227, 240, 255)"  # html.py's tr:target highlight
# Smaller than the demo run (4 layers, 5 steps): a full-page screenshot's time grows with the table.
N_LAYER, N_DECODE = 2, 2
FIRST = (1, "L1.att.wkv")  # where the tampered run diverges: decode step 1, layer 1


def _unavailable(reason: str):
    if os.environ.get("CI") or os.environ.get("PARITY_REQUIRE_BROWSER"):
        pytest.fail(f"browser test cannot run: {reason}; CI must install playwright (pip) and chromium (apt)",
                    pytrace=False)
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


def _divergent_result() -> dict:
    """A demo-like run (ten-token prefill, then decode steps) with one wkv output tampered."""
    order = stage_order(n_layer=N_LAYER)
    steps = [StepInfo(0, "prefill", [1] * 10)] + [StepInfo(i, "decode", [100 + i]) for i in range(1, N_DECODE + 1)]
    rng = np.random.default_rng(5)
    expected = {s.index: {n: rng.standard_normal((2, 8, 8) if n.endswith("att_kv") else
                                                  (16,) if n.startswith("state.") else (len(s.ids), 16))
                          .astype(np.float32) for n in order} for s in steps}
    actual = {i: {k: v.copy() for k, v in a.items()} for i, a in expected.items()}
    actual[FIRST[0]][FIRST[1]][0, 5] += 0.5

    def run(arrays, backend, mode):
        return MemoryRun(steps=steps, stage_order=order, dtype="float32", arrays=arrays,
                         description={"backend": backend, "mode": mode, "dtype": "float32"})

    return compare_runs(actual=run(actual, "tvm", "debug"), expected=run(expected, "reference", "eager"),
                        policy=TolerancePolicy.for_dtype("float32")).to_dict()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    result = _divergent_result()
    assert result["first_divergence"]["stage"] == FIRST[1]
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


def test_loads_offline_without_errors_and_shows_the_first_divergence(page, report):
    _, result = report
    panel = page.locator("div.panel", has_text="First divergence")
    assert panel.is_visible()
    text = panel.inner_text()
    assert FIRST[1] in text and "decode step 1" in text and "token id 101" in text
    assert page.locator(".verdict").inner_text() == "divergence"
    assert page.locator("table.rec tbody tr").count() == len(result["records"])
    assert page.problems == []
    assert all(url.startswith("file://") for url in page.requests), page.requests


def test_heat_map_click_lands_on_the_highlighted_row(page):
    # The first divergence, then a cell far down the page: each must scroll its row into view,
    # below the sticky table header, and mark it as the target.
    for step, stage in (FIRST, (N_DECODE, "logits")):
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

    page.click(f'table.hm td a[href="#{record_anchor(*FIRST)}"]')
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.problems == []


def test_failing_only_filter_hides_passing_rows(page, report):
    _, result = report
    n_failed = sum(not r["passed"] for r in result["records"])
    assert 0 < n_failed < len(result["records"])
    page.check("#fonly")
    visible = page.locator("table.rec tbody tr:visible")
    assert visible.count() == n_failed
    assert visible.first.get_attribute("id") == record_anchor(*FIRST)
    page.fill("#flt", "logits")
    assert page.locator("table.rec tbody tr:visible").count() == sum(
        not r["passed"] and "logits" in r["stage"] for r in result["records"])
    assert page.problems == []
