"""A backend that dies or hangs is a verdict, not the end of the run (issue 12).

Each fault — SIGSEGV, SIGABRT, a Python exception, a hang — once in a plug-in (parity/mutants/crash.py,
our torch reference wrapped as a plug-in that fails at decode step 2) and, for the native three,
once in a compiled TVM mutant (parity/mutants/crash_models.py: the wkv5 kernel fails when T = 1,
i.e. at decode step 1). Through the real command: exit 1, the verdict "crashed" / "timed out"
naming backend, step, kernel and last stage, JSON and HTML written, the reference's dump complete,
the crashed backend's finished steps compared and its unfinished dump never readable as complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parity.cli import main
from parity.dumpers.format import DumpReader
from parity.dumpers.worker import PartialDumpReader
from parity.errors import ParityError
from parity.stages import stage_order
from parity_cli import REPO

FIXTURE = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"
N_LAYER = 4
DECODE_STEPS = 3
# A hang is called after this many seconds without a finished step. A fixture step takes
# milliseconds, so a correct step never comes near it even on a loaded CI machine; it is what
# each hang test costs in wall time.
HANG_TIMEOUT = 8
# What a backend that finished step s-1 and died in step s recorded last. A plug-in's stages arrive
# when its step() returns, so nothing of the dying step: the last stage of step s-1 in our stage order.
# The TVM debug build hands each stage over as the graph computes it (parity.tap_sink), so the dying
# step's stages up to the faulting kernel arrive: the compiled faults strike in layer 0's wkv5 call,
# whose last input computed before it is att.g.
LAST_STAGE = stage_order(n_layer=N_LAYER, version="5.2")[-1]
LAST_STAGE_BEFORE_WKV5 = "L0.att.g"

PLUGIN = "parity.mutants.crash:"
CASES = [
    # spec, verdict, signal, error type, step, kernel, name the tables show
    pytest.param(PLUGIN + "segfault_plugin", "crashed", "SIGSEGV", None, 2, None, "crash-plugin/segfault", id="plugin-segv"),
    pytest.param(PLUGIN + "abort_plugin", "crashed", "SIGABRT", None, 2, None, "crash-plugin/abort", id="plugin-abort"),
    pytest.param(PLUGIN + "raising_plugin", "crashed", None, "IndexError", 2, None, "crash-plugin/raise", id="plugin-raise"),
    pytest.param(PLUGIN + "hanging_plugin", "timed out", None, None, 2, None, "crash-plugin/hang", id="plugin-hang"),
    pytest.param("mutant/crash-oob-gather", "crashed", "SIGSEGV", None, 1, "wkv5", "mutant/crash-oob-gather",
                 id="compiled-segv"),
    pytest.param("mutant/crash-kernel-abort", "crashed", "SIGABRT", None, 1, "wkv5", "mutant/crash-kernel-abort",
                 id="compiled-abort"),
    pytest.param("mutant/hang-kernel-loop", "timed out", None, None, 1, "wkv5", "mutant/hang-kernel-loop",
                 id="compiled-hang"),
]


@pytest.mark.parametrize(("spec", "verdict", "signal", "error_type", "step", "kernel", "name"), CASES)
def test_a_dying_backend_is_a_verdict_with_reports(tmp_path, capsys, spec, verdict, signal, error_type, step, kernel, name):
    out = {"json": tmp_path / "r.json", "html": tmp_path / "r.html", "md": tmp_path / "r.md"}
    dumps = tmp_path / "dumps"
    rc = main(["run", "-q", "--checkpoint", str(FIXTURE), "--backends", f"reference,{spec}", "--ids", "ones:3",
               "--decode-steps", str(DECODE_STEPS), "--timeout", str(HANG_TIMEOUT), "--dump-dir", str(dumps),
               "--json", str(out["json"]), "--html", str(out["html"])])
    stdout = capsys.readouterr().out
    assert rc == 1, stdout

    result = json.loads(out["json"].read_text())
    crash = result["crash"]
    assert result["verdict"] == verdict and crash["kind"] == verdict
    assert (crash["backend"], crash["name"], crash["step"]) == (spec, name, step)
    assert crash["step_kind"] == "decode" and crash["steps_completed"] == step
    if kernel:
        assert crash["last_stage"] == {"step": step, "stage": LAST_STAGE_BEFORE_WKV5}
    else:
        assert crash["last_stage"] == {"step": step - 1, "stage": LAST_STAGE}
    assert crash["kernel"] == kernel and crash["signal"] == signal and crash["error_type"] == error_type
    # The compiled fault strikes in the first wkv5 call of the step (layer 0): every layer's has T = 1.
    assert crash["kernel_call"] == (1 if kernel else None)
    if verdict == "timed out":
        assert crash["timeout_s"] == HANG_TIMEOUT
    if error_type is not None:  # the port author's own frame is in the traceback
        assert "rows[3]" in crash["traceback"] and "IndexError: list index out of range" in crash["traceback"]
    # What it finished is compared, and agrees (the fault is the only bug).
    assert crash["compared"] == {"against": "reference", "steps": step, "verdict": "no divergence", "first_divergence": None}
    # ... by the default verdict: its finished steps replayed (own error), not judged strictly per
    # stage, which at depth is a false alarm (the 0.4B zoo showed it at L10.att.ln_x).
    assert result["own_errors"][spec]["records"] > 0 and result["own_errors"][spec]["first_divergence"] is None
    assert [s["index"] for s in result["steps"]] == list(range(step))
    assert result["first_divergence"] is None and result["summary"]["records"] > 0
    (pair,) = result["comparisons"]
    assert (pair["expected"], pair["actual"], pair["verdict"]) == ("reference", spec, verdict)

    # One line says it all.
    (line,) = stdout.strip().splitlines()
    head = "TIMED OUT" if verdict == "timed out" else "CRASHED"
    where = f"decode step {step}" + (f" in kernel {kernel}" if kernel else "")
    assert line.startswith(f"{head}: {name} ") and where in line, line
    assert line.endswith(f"compared against reference: no divergence)"), line
    if signal:
        assert f"died with {signal}" in line, line

    html = out["html"].read_text()
    assert 'id="crash"' in html and name in html

    # The reference's dump is complete; the crashed one's holds its finished steps and never reads as complete.
    assert len(DumpReader(dumps / "reference").steps) == 1 + DECODE_STEPS
    partial = Path(crash["partial_dump"])
    assert partial.parent == dumps and ".partial-" in partial.name
    assert json.loads((partial / "manifest.json").read_text())["complete"] is False
    with pytest.raises(ParityError, match="incomplete dump"):
        DumpReader(partial)
    assert len(PartialDumpReader(partial).steps) == step


def test_markdown_of_a_crash_names_it_and_keeps_the_traceback(tmp_path, capsys):
    from parity.report.markdown import render_markdown

    rc = main(["run", "-q", "--checkpoint", str(FIXTURE), "--backends", f"reference,{PLUGIN}raising_plugin",
               "--ids", "ones:3", "--decode-steps", str(DECODE_STEPS), "--json", str(tmp_path / "r.json")])
    capsys.readouterr()
    assert rc == 1
    md = render_markdown(json.loads((tmp_path / "r.json").read_text()))
    assert md.startswith("### \u274c rwkv-parity: crashed")
    assert "CRASHED: crash-plugin/raise failed at decode step 2" in md and "rows[3]" in md


def test_parity_debug_prints_the_plugins_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PARITY_DEBUG", "1")
    rc = main(["run", "-q", "--checkpoint", str(FIXTURE), "--backends", f"reference,{PLUGIN}raising_plugin",
               "--ids", "ones:3", "--decode-steps", str(DECODE_STEPS)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "Traceback (most recent call last)" in captured.err and "rows[3]" in captured.err, captured.err
    assert captured.out.startswith("CRASHED: crash-plugin/raise"), captured.out


def test_without_parity_debug_the_traceback_stays_in_the_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PARITY_DEBUG", raising=False)
    rc = main(["run", "--checkpoint", str(FIXTURE), "--backends", f"reference,{PLUGIN}raising_plugin",
               "--ids", "ones:3", "--decode-steps", str(DECODE_STEPS)])
    captured = capsys.readouterr()
    assert rc == 1 and "Traceback" not in captured.out + captured.err
    assert "PARITY_DEBUG=1 prints its traceback" in captured.out


PORT_DYING_EARLY = '''
import ctypes


def segfault_when_made(checkpoint):
    ctypes.string_at(0)  # dies while the backend is being built: nothing recorded at all


class _ExitsInPrefill:
    name = "exits-in-prefill"

    def reset(self):
        pass

    def step(self, ids):
        import os

        os._exit(7)  # a native library calling exit(): no signal, no exception


def exit_in_prefill(checkpoint):
    return _ExitsInPrefill()
'''


@pytest.mark.parametrize(("factory", "expected"), [
    ("segfault_when_made", "CRASHED: {spec} died with SIGSEGV before its first step (no step finished, nothing compared)"),
    ("exit_in_prefill", "CRASHED: exits-in-prefill failed at prefill: exited with code 7 before finishing "
                        "(no step finished, nothing compared)"),
])
def test_a_backend_dying_before_any_step_still_gets_reports(tmp_path, capsys, factory, expected):
    (tmp_path / "early.py").write_text(PORT_DYING_EARLY)
    spec = f"{tmp_path / 'early.py'}:{factory}"
    rc = main(["run", "-q", "--checkpoint", str(FIXTURE), "--backends", f"reference,{spec}", "--ids", "ones:3",
               "--decode-steps", "1", "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")])
    out = capsys.readouterr().out
    assert rc == 1 and out.strip() == expected.format(spec=spec), out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["verdict"] == "crashed" and result["crash"]["steps_completed"] == 0 and result["records"] == []
    assert 'id="crash"' in (tmp_path / "r.html").read_text()
