"""The fp16 and bf16 tolerances: calibrated, with the measurements that set them committed beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parity.compare.tolerance import DEFAULT_STAGE_TOLERANCES, DEFAULT_TOLERANCES, TolerancePolicy

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "calibrate_precision.json"


def test_no_tolerance_is_provisional_any_more() -> None:
    for dtype, tol in DEFAULT_TOLERANCES.items():
        assert "provisional" not in tol.reason, dtype
    for dtype, stages in DEFAULT_STAGE_TOLERANCES.items():
        for pattern, tol in stages.items():
            assert "provisional" not in tol.reason, (dtype, pattern)


@pytest.mark.parametrize("alias,dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_policy_picks_the_dtype_and_its_stage_defaults(alias: str, dtype: str) -> None:
    policy = TolerancePolicy.for_dtype(alias)
    assert policy.dtype == dtype
    assert policy.for_stage("L0.att.k") == DEFAULT_TOLERANCES[dtype]
    ln_x = policy.for_stage("L3.att.ln_x")
    assert ln_x.scale >= DEFAULT_TOLERANCES[dtype].scale  # GroupNorm's amplification, never less slack


def _worst(summary: dict, key: str) -> float:
    return float(summary[key]["scale"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_committed_calibration_fits_inside_the_tolerance(dtype: str) -> None:
    # The constants were set from benchmarks/calibrate_precision.py; its committed results must
    # still fit them: every correct backend's own error (replayed in its dtype), class by class.
    summary = json.loads(RESULTS.read_text())["summary"][dtype]
    policy = TolerancePolicy.for_dtype(dtype)
    assert _worst(summary, "own_dtype/other") < policy.for_stage("L0.ffn.out").scale
    assert _worst(summary, "own_dtype/groupnorm") < policy.for_stage("L0.att.ln_x").scale
    assert _worst(summary, "own_dtype/groupnorm") < policy.for_stage("L0.att.gated").scale
