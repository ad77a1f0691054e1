"""A failing parity case fails with one paragraph naming the divergence and leaves its HTML report."""

from __future__ import annotations

import numpy as np
import pytest

from parity.compare import MemoryRun, StepInfo, TolerancePolicy, compare_runs
from parity.session import RunOutcome
from parity.suite.test_parity import _assert_no_divergence


def _run(*, bump: float) -> MemoryRun:
    rng = np.random.default_rng(0)
    arrays = {0: {"emb": rng.normal(size=(3, 8)), "L0.att.wkv": rng.normal(size=(3, 8))}}
    arrays[0]["L0.att.wkv"][2, 5] += bump
    return MemoryRun(
        steps=[StepInfo(0, "prefill", [1, 1, 1])], stage_order=["emb", "L0.att.wkv"], dtype="float32", arrays=arrays
    )


def test_failing_case_names_divergence_and_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_REPORT_DIR", str(tmp_path))
    result = compare_runs(actual=_run(bump=1.0), expected=_run(bump=0.0), policy=TolerancePolicy.for_dtype("float32")).to_dict()
    with pytest.raises(pytest.fail.Exception) as info:
        _assert_no_divergence(RunOutcome(result=result, dumps={}), name="case")
    message = str(info.value)
    assert "prefill, layer 0, stage L0.att.wkv, token row 2" in message
    assert "\n" in message and message.count("\n") == 1  # one paragraph + the report path
    report = tmp_path / "case.html"
    assert report.exists() and "L0.att.wkv" in report.read_text()


def test_passing_case_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_REPORT_DIR", str(tmp_path))
    result = compare_runs(actual=_run(bump=0.0), expected=_run(bump=0.0), policy=TolerancePolicy.for_dtype("float32")).to_dict()
    _assert_no_divergence(RunOutcome(result=result, dumps={}), name="case")
    assert not list(tmp_path.iterdir())
