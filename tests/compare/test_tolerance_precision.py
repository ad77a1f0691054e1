"""The fp16 and bf16 tolerances: calibrated, with the measurements that set them committed beside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parity.compare import MemoryRun, StepInfo, compare_runs
from parity.compare.tolerance import (
    DEFAULT_STAGE_TOLERANCES,
    DEFAULT_TOLERANCES,
    JUDGE_ISOLATED,
    JUDGE_PAIR,
    JUDGE_REPLAY,
    JUDGED_TOLERANCES,
    Tolerance,
    TolerancePolicy,
)
from parity.errors import ParityError
from parity.stages import stage_order

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
@pytest.mark.parametrize("judge,measure", [(JUDGE_REPLAY, "own_dtype"), (JUDGE_ISOLATED, "iso_dtype")])
def test_the_committed_calibration_fits_inside_the_tolerance(dtype: str, judge: str, measure: str) -> None:
    # The constants were set from benchmarks/calibrate_precision.py; its committed results must
    # still fit them: every correct backend's own error under the judge that measures it (replayed in
    # its dtype; isolated beside the reference in its dtype, the build's scan inputs spliced in).
    summary = json.loads(RESULTS.read_text())["summary"][dtype]
    policy = TolerancePolicy.for_dtype(dtype, judge=judge, spliced_scan=True)
    assert _worst(summary, f"{measure}/other") < policy.for_stage("L0.ffn.out").scale
    assert _worst(summary, f"{measure}/groupnorm") < policy.for_stage("L0.att.ln_x").scale
    assert _worst(summary, f"{measure}/groupnorm") < policy.for_stage("L0.att.gated").scale


# -- the scan, judged on the candidate's own inputs (replay with r, k, v spliced in) --------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_spliced_scan_is_judged_at_fp32_precision_with_room_for_the_output_rounding(dtype: str) -> None:
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


# -- who judges: bf16 held to its judged scale where the judge worked on the candidate's own inputs --

BF16_STAGES = ("L0.att.k", "L0.att.ln_x", "L0.att.gated", "L0.ffn.out", "L1.x_out")
# The worst a correct bf16 port needed of max|b| where a judge worked on its own inputs: replayed,
# rwkv5_1 fixture, random:16:3, L0.ffn.out (benchmarks/results/calibrate_precision.md, ff71cd5).
BF16_WORST_NEEDED = 1.32e-2


def _bf16_pair(*, off: str | None = None, by: float = 0.1) -> tuple[MemoryRun, MemoryRun]:
    """(actual, expected): one prefill step of BF16_STAGES. ``actual`` is what a correct bf16 port records
    beside a judge on its own inputs: every element rounded to bf16 (2^-8 relative) and, at the largest
    element, the worst error measured; stage ``off`` is also ``by`` (relative) off throughout."""
    rng = np.random.default_rng(11)
    step = StepInfo(index=0, kind="prefill", ids=[1, 2, 3, 4])
    expected, actual = {}, {}
    for stage in BF16_STAGES:
        b = rng.standard_normal((4, 64)).astype(np.float32)
        a = b * (1 + 2.0 ** -8 * rng.choice([-1.0, 1.0], size=b.shape))
        # The measured figure is what a record needs of max|b| beyond rtol * |b| (calibrate_precision.py):
        # that much, just under, at the largest element.
        worst = np.unravel_index(np.argmax(np.abs(b)), b.shape)
        beyond = DEFAULT_TOLERANCES["bfloat16"].rtol * abs(b[worst]) + 0.99 * BF16_WORST_NEEDED * np.abs(b).max()
        a[worst] = b[worst] + np.sign(b[worst]) * beyond
        if stage == off:
            a = a * (1 + by)
        expected[stage], actual[stage] = b, a.astype(np.float32)
    order = stage_order(n_layer=2)

    def run(arrays, name):
        return MemoryRun(steps=[step], stage_order=order, dtype="bfloat16", arrays={0: arrays}, description={"backend": name})

    return run(actual, "tvm@bf16"), run(expected, "reference@bf16")


@pytest.mark.parametrize("judge", [JUDGE_REPLAY, JUDGE_ISOLATED])
def test_a_correct_bf16_port_passes_its_judge_at_the_worst_measured_error(judge: str) -> None:
    actual, expected = _bf16_pair()
    policy = TolerancePolicy.for_dtype("bf16", judge=judge, spliced_scan=True)
    assert compare_runs(actual=actual, expected=expected, policy=policy).first_divergence is None


@pytest.mark.parametrize("judge", [JUDGE_REPLAY, JUDGE_ISOLATED])
@pytest.mark.parametrize("stage", BF16_STAGES)
def test_a_bf16_stage_ten_percent_off_is_the_first_divergence_where_judged_on_its_own_inputs(judge: str, stage: str) -> None:
    actual, expected = _bf16_pair(off=stage)
    policy = TolerancePolicy.for_dtype("bf16", judge=judge, spliced_scan=True)
    first = compare_runs(actual=actual, expected=expected, policy=policy).first_divergence
    assert first is not None and first.stage == stage, first
    # The pair's allowance (two runs each computing their own wkv: 1.0, 2.0 on ln_x) lets it through:
    # that is why the judges have a scale of their own.
    pair = TolerancePolicy.for_dtype("bf16")
    assert compare_runs(actual=actual, expected=expected, policy=pair).first_divergence is None


def test_the_bf16_judged_scale_is_tight_enough_to_name_a_stage_ten_percent_off() -> None:
    # What the tests above pin: a 10% error fails the judged scale, and would pass it loosened 5x.
    actual, expected = _bf16_pair(off="L0.ffn.out")
    for judge in (JUDGE_REPLAY, JUDGE_ISOLATED):
        tol = JUDGED_TOLERANCES[judge]["bfloat16"]
        assert BF16_WORST_NEEDED * 3 < tol.scale < 0.1 - tol.rtol, (judge, tol.scale)  # margin on both sides
        loose = Tolerance(rtol=tol.rtol, atol=tol.atol, scale=5 * tol.scale, reason="5x looser")
        policy = TolerancePolicy.for_dtype("bf16", {"*": loose}, judge=judge)
        assert compare_runs(actual=actual, expected=expected, policy=policy).first_divergence is None


@pytest.mark.parametrize("alias,dtype", [("fp32", "float32"), ("fp16", "float16")])
def test_dtypes_without_a_judged_scale_keep_their_defaults_for_every_judge(alias: str, dtype: str) -> None:
    pair = TolerancePolicy.for_dtype(alias)
    for judge in (JUDGE_REPLAY, JUDGE_ISOLATED):
        policy = TolerancePolicy.for_dtype(alias, judge=judge)
        assert policy.default == pair.default == DEFAULT_TOLERANCES[dtype]
        assert policy.for_stage("L2.att.ln_x") == pair.for_stage("L2.att.ln_x")


def test_the_judged_bf16_policy_drops_the_pairs_groupnorm_exception_and_keeps_the_spliced_scan() -> None:
    judged = TolerancePolicy.for_dtype("bf16", judge=JUDGE_REPLAY, spliced_scan=True)
    assert judged.for_stage("L3.att.ln_x") == judged.default == JUDGED_TOLERANCES[JUDGE_REPLAY]["bfloat16"]
    assert judged.for_stage("L3.att.wkv").scale == DEFAULT_TOLERANCES["float32"].scale
    unspliced = TolerancePolicy.for_dtype("bf16", judge=JUDGE_REPLAY)
    assert unspliced.for_stage("L3.att.wkv") == unspliced.default


def test_the_judge_survives_the_results_json_and_the_users_tol_still_comes_first() -> None:
    mine = Tolerance(rtol=0.0, atol=1.0, scale=0.0, reason="user")
    policy = TolerancePolicy.for_dtype("bf16", {"L*.att.wkv": mine}, judge=JUDGE_ISOLATED, spliced_scan=True)
    again = TolerancePolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy and again.for_stage("L0.att.wkv") == mine
    # A result written before policies named their judge reads back as a pair's.
    old = {k: v for k, v in policy.to_dict().items() if k not in ("judge", "spliced_scan")}
    assert TolerancePolicy.from_dict(old).judge == JUDGE_PAIR


def test_a_policy_refuses_an_unknown_judge_and_a_spliced_pair() -> None:
    with pytest.raises(ParityError, match="unknown judge"):
        TolerancePolicy.for_dtype("bf16", judge="oracle")
    with pytest.raises(ParityError, match="splices nothing"):
        TolerancePolicy.for_dtype("bf16", spliced_scan=True)
