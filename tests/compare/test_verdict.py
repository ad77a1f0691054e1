"""The verdict: own (replayed / isolated) error decides; propagated drift is judged by depth."""

from __future__ import annotations

import math

import pytest

from parity.compare.verdict import (
    DRIFT_ENVELOPES,
    FLOOR_MULTIPLE,
    VERDICT_ADDED,
    VERDICT_DRIFT,
    VERDICT_PASS,
    classify,
    drift_summary,
    own_error_summary,
    record_depth,
    record_ratio,
    RoundingFloor,
)


def rec(stage: str, *, layer, ratio: float, step: int = 0, reason=None) -> dict:
    atol = 1e-3
    return {"stage": stage, "layer": layer, "step": step, "step_kind": "prefill", "row": 0, "max_abs": ratio * atol,
            "min_atol": ratio * atol, "atol": atol, "passed": ratio <= 1.0, "reason": reason or (None if ratio <= 1 else "tolerance")}


def comparison(records: list[dict]) -> dict:
    first = next((r for r in records if not r["passed"]), None)
    return {"records": records, "first_divergence": first, "verdict": "no divergence" if first is None else "divergence",
            "summary": {"records": len(records), "failed": sum(not r["passed"] for r in records)}}


K = DRIFT_ENVELOPES["float32"].per_layer


def test_ratio_is_min_atol_over_atol_and_infinite_for_nonfinite():
    assert record_ratio(rec("L0.att.r", layer=0, ratio=2.5)) == pytest.approx(2.5)
    assert record_ratio(rec("L0.att.r", layer=0, ratio=2.5, reason="nonfinite")) == math.inf


def test_depth_of_head_stages_is_past_the_last_layer():
    assert record_depth({"stage": "emb", "layer": None}, n_layer=24) == 0
    assert record_depth({"stage": "logits", "layer": None}, n_layer=24) == 24
    assert record_depth({"stage": "L7.att.wkv", "layer": 7}, n_layer=24) == 7


def test_drift_within_the_envelope_at_depth_passes():
    # Layer 10 may drift K * 11 allowances; 0.9 of that is within.
    recs = [rec("emb", layer=None, ratio=0.1), rec("L10.x_out", layer=10, ratio=0.9 * K * 11)]
    d = drift_summary(comparison(recs), dtype="float32")
    assert d["status"] == "within" and d["envelope_fraction"] == pytest.approx(0.9)
    assert classify(drift=d, own=[]) == (VERDICT_PASS, None)


def test_the_same_drift_at_layer_zero_is_beyond_the_envelope():
    recs = [rec("L0.x_out", layer=0, ratio=0.9 * K * 11), rec("L10.x_out", layer=10, ratio=0.5)]
    d = drift_summary(comparison(recs), dtype="float32")
    assert d["status"] == "beyond" and d["first_beyond_envelope"]["stage"] == "L0.x_out"
    verdict, fd = classify(drift=d, own=[])
    assert verdict == VERDICT_DRIFT and fd["judged_by"] == "drift envelope"


def test_no_record_over_tolerance_is_no_drift():
    d = drift_summary(comparison([rec("L0.x_out", layer=0, ratio=0.99)]), dtype="float32")
    assert d["status"] == "none"


def test_inner_stages_do_not_count_as_drift():
    # GroupNorm's local amplification in a near-cancelling head is judged by own error, not drift.
    recs = [rec("L0.att.ln_x", layer=0, ratio=500.0), rec("L0.x_out", layer=0, ratio=0.5), rec("logits", layer=None, ratio=0.2)]
    d = drift_summary(comparison(recs), dtype="float32")
    assert d["status"] == "none" and d["worst_stage"] == "L0.x_out"
    assert d["first_over_tolerance"]["stage"] == "L0.att.ln_x"  # still shown: where the per-stage line was crossed


def test_an_own_error_decides_before_drift_and_names_its_stage():
    own = own_error_summary(comparison([rec("L3.att.ln_x", layer=3, ratio=4.0, step=2)]), method="replay")
    d = drift_summary(comparison([rec("L3.x_out", layer=3, ratio=4.0)]), dtype="float32")  # within: K*4 > 4
    verdict, fd = classify(drift=d, own=[own])
    assert verdict == VERDICT_ADDED and fd["stage"] == "L3.att.ln_x" and fd["step"] == 2 and fd["judged_by"] == "replay"


def test_by_layer_is_the_growth_curve():
    recs = [rec(f"L{l}.x_out", layer=l, ratio=0.1 * (l + 1)) for l in range(4)]
    d = drift_summary(comparison(recs), dtype="float32")
    assert [b["ratio"] for b in d["by_layer"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert [b["envelope"] for b in d["by_layer"]] == pytest.approx([K * (l + 1) for l in range(4)])


def test_the_rounding_floor_is_a_running_maximum_over_depth_and_steps():
    floor = RoundingFloor(comparison([
        rec("L0.x_out", layer=0, ratio=0.5, step=0), rec("L2.x_out", layer=2, ratio=3.0, step=0),
        rec("L1.x_out", layer=1, ratio=0.1, step=1), rec("logits", layer=None, ratio=2.0, step=1),
    ]))
    assert floor.at(0, 0) == pytest.approx(0.5)
    assert floor.at(1, 0) == pytest.approx(0.5)  # layer 1 of step 0 was not recorded: layer 0's carries
    assert floor.at(2, 0) == pytest.approx(3.0)
    assert floor.at(1, 1) == pytest.approx(0.5)  # step 1 never lower than step 0 at the same depth
    assert floor.at(3, 1) == pytest.approx(3.0)  # logits (depth 3) at step 1: the deepest max so far


def test_drift_a_chaotic_model_shows_on_its_floor_passes_and_says_why():
    # Beyond the fixed envelope at layer 0 (K allowances) ...
    drift = [rec("L0.x_out", layer=0, ratio=3 * K)]
    assert drift_summary(comparison(drift), dtype="float32")["status"] == "beyond"
    # ... but the model carries a last-bit difference to K/2 there: 3K is within FLOOR_MULTIPLE of that.
    floor = RoundingFloor(comparison([rec("L0.x_out", layer=0, ratio=K / 2)]))
    d = drift_summary(comparison(drift), dtype="float32", floor=floor)
    assert d["status"] == "within" and d["floor"] == pytest.approx(K / 2)
    assert d["envelope"] == pytest.approx(FLOOR_MULTIPLE * K / 2)
    assert "rounding floor" in d["envelope_reason"]


def test_a_small_floor_leaves_the_fixed_envelope_in_charge():
    drift = [rec("L0.x_out", layer=0, ratio=3 * K)]
    floor = RoundingFloor(comparison([rec("L0.x_out", layer=0, ratio=0.01)]))
    d = drift_summary(comparison(drift), dtype="float32", floor=floor)
    assert d["status"] == "beyond" and d["envelope"] == pytest.approx(K)
