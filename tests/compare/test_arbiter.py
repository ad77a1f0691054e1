import numpy as np
import pytest

from parity.compare import MemoryRun, StepInfo, TolerancePolicy, arbitrate_runs
from parity.errors import ParityError

POLICY = TolerancePolicy.for_dtype("float32")


def _run(values: dict[str, np.ndarray]) -> MemoryRun:
    return MemoryRun(steps=[StepInfo(0, "prefill", [1, 2])], stage_order=list(values), dtype="float32", arrays={0: values})


def test_within_a_multiple_of_the_references_own_error_passes():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(2, 64)) * 50
    ref = truth + rng.normal(size=truth.shape) * 1e-4  # the fp32 reference's own error
    act = truth + rng.normal(size=truth.shape) * 2e-4  # twice as far: fine under k = 10
    result = arbitrate_runs(actual=_run({"L0.att.wkv": act}), reference=_run({"L0.att.wkv": ref}),
                            arbiter=_run({"L0.att.wkv": truth}), policy=POLICY)
    (record,) = result.records
    assert record.passed and result.first_divergence is None
    assert 1.0 < record.min_multiplier < 3.0


def test_far_beyond_the_references_error_fails_and_reports_the_needed_multiplier():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(2, 64))
    ref = truth + rng.normal(size=truth.shape) * 1e-6
    act = truth + 1e-3  # an fp16-sized error
    result = arbitrate_runs(actual=_run({"x": act}), reference=_run({"x": ref}), arbiter=_run({"x": truth}),
                            policy=POLICY, multiplier=10.0)
    fd = result.first_divergence
    assert fd is not None and fd.stage == "x"
    # Re-judging with the reported minimum multiplier passes; with 0.9x of it, it fails.
    again = arbitrate_runs(actual=_run({"x": act}), reference=_run({"x": ref}), arbiter=_run({"x": truth}),
                           policy=POLICY, multiplier=fd.min_multiplier * 1.0001)
    assert again.first_divergence is None
    tighter = arbitrate_runs(actual=_run({"x": act}), reference=_run({"x": ref}), arbiter=_run({"x": truth}),
                             policy=POLICY, multiplier=fd.min_multiplier * 0.9)
    assert tighter.first_divergence is not None
    assert result.to_dict()["verdict"] == "divergence"


def test_exact_reference_is_judged_against_the_floor():
    truth = np.ones((1, 8))
    small = truth + 5e-7  # below the floor (0.1 x atol = 1e-6)
    big = truth + 5e-6
    ok = arbitrate_runs(actual=_run({"emb": small}), reference=_run({"emb": truth}), arbiter=_run({"emb": truth}), policy=POLICY)
    bad = arbitrate_runs(actual=_run({"emb": big}), reference=_run({"emb": truth}), arbiter=_run({"emb": truth}), policy=POLICY)
    assert ok.first_divergence is None
    assert bad.first_divergence is not None and bad.records[0].min_multiplier == float("inf")


def test_nonfinite_never_passes():
    truth = np.ones((1, 4))
    act = truth.copy()
    act[0, 2] = np.nan
    result = arbitrate_runs(actual=_run({"x": act}), reference=_run({"x": truth}), arbiter=_run({"x": truth}), policy=POLICY)
    assert result.first_divergence is not None and result.records[0].nonfinite


def test_bad_multiplier_is_refused():
    truth = np.ones((1, 4))
    with pytest.raises(ParityError, match="multiplier"):
        arbitrate_runs(actual=_run({"x": truth}), reference=_run({"x": truth}), arbiter=_run({"x": truth}),
                       policy=POLICY, multiplier=0)


def test_a_backend_holding_the_last_row_only_is_judged_on_that_row():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(2, 16)) * 10
    ref = truth + rng.normal(size=truth.shape) * 1e-5
    good_last = truth[1:] + rng.normal(size=(1, 16)) * 1e-5
    actual = MemoryRun(steps=[StepInfo(0, "prefill", [1, 2])], stage_order=["logits"], dtype="float32",
                       arrays={0: {"logits": good_last, "rows.logits": np.array([1])}})
    result = arbitrate_runs(actual=actual, reference=_run({"logits": ref}), arbiter=_run({"logits": truth}), policy=POLICY)
    assert result.first_divergence is None and len(result.records) == 1
    # The same row, shifted by what row 0 would need: judged against row 1's truth, it fails.
    wrong = MemoryRun(steps=[StepInfo(0, "prefill", [1, 2])], stage_order=["logits"], dtype="float32",
                      arrays={0: {"logits": truth[:1], "rows.logits": np.array([1])}})
    bad = arbitrate_runs(actual=wrong, reference=_run({"logits": ref}), arbiter=_run({"logits": truth}), policy=POLICY)
    assert bad.first_divergence is not None
