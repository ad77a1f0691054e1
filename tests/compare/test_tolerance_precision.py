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


# -- the scan, judged on the candidate's own inputs (replay with r, k, v spliced in) --------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_spliced_scan_is_judged_at_fp32_precision_with_room_for_the_output_rounding(dtype: str) -> None:
    import numpy as np

    from parity.compare.metrics import compare_arrays
    from parity.compare.tolerance import spliced_scan_tolerance

    tight, default = spliced_scan_tolerance(dtype), DEFAULT_TOLERANCES[dtype]
    rng = np.random.default_rng(0)
    wkv = rng.normal(size=(8, 128)).astype(np.float32)
    # A correct port's wkv stored in the dtype: each element rounded, well inside rtol.
    step = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype]
    rounded = wkv * (1 + step * rng.choice([-1.0, 1.0], size=wkv.shape))
    assert compare_arrays(rounded, wkv, tolerance=tight, per_token=True).passed
    # A scan error of 1e-3 x max|wkv| in one head (as decay kept in bf16 makes): past the spliced
    # scan's allowance, while the dtype's default allowance would let it through.
    bug = wkv.copy()
    bug[:, :64] += 1e-3 * np.abs(wkv).max()
    assert not compare_arrays(bug, wkv, tolerance=tight, per_token=True).passed
    assert dtype == "bfloat16" or compare_arrays(bug, wkv, tolerance=default, per_token=True).passed


def test_fp32_and_fp64_keep_their_own_scan_tolerance() -> None:
    from parity.compare.tolerance import spliced_scan_tolerance

    assert spliced_scan_tolerance("float32") is None and spliced_scan_tolerance("fp64") is None
