import json

import numpy as np
import pytest

from parity.compare import (
    MemoryRun,
    RunView,
    StepInfo,
    Tolerance,
    TolerancePolicy,
    compare_runs,
)
from parity.errors import ParityError
from parity.stages import stage_order

T, C, H, N, V = 3, 8, 2, 4, 11
ORDER = stage_order(n_layer=2)
SMALL = ["emb", "L0.att.wkv", "L0.x_out", "L1.att.wkv", "L1.x_out", "logits", "state.L0.att_kv"]
STEPS = [StepInfo(index=0, kind="prefill", ids=[5, 6, 7]), StepInfo(index=1, kind="decode", ids=[9]),
         StepInfo(index=2, kind="decode", ids=[4])]


def _arrays(seed):
    rng = np.random.default_rng(seed)
    out = {}
    for step in STEPS:
        rows = len(step.ids)
        out[step.index] = {
            "emb": rng.standard_normal((rows, C)).astype(np.float32),
            "L0.att.wkv": rng.standard_normal((rows, C)).astype(np.float32),
            "L0.x_out": rng.standard_normal((rows, C)).astype(np.float32),
            "L1.att.wkv": rng.standard_normal((rows, C)).astype(np.float32),
            "L1.x_out": rng.standard_normal((rows, C)).astype(np.float32),
            "logits": rng.standard_normal((rows, V)).astype(np.float32),
            "state.L0.att_kv": rng.standard_normal((H, N, N)).astype(np.float32),
        }
    return out


def _pair(*, actual_steps=STEPS):
    expected = _arrays(0)
    actual = {i: {k: v.copy() for k, v in d.items()} for i, d in expected.items()}
    e = MemoryRun(steps=list(STEPS), stage_order=ORDER, dtype="float32", arrays=expected,
                  description={"backend": "torch"})
    a = MemoryRun(steps=list(actual_steps), stage_order=ORDER, dtype="float32",
                  arrays=actual, description={"backend": "tvm"})
    return a, e


POLICY = TolerancePolicy.for_dtype("float32")


def test_memory_run_is_a_run_view():
    a, _ = _pair()
    assert isinstance(a, RunView)
    assert a.describe()["backend"] == "tvm"
    with pytest.raises(ParityError, match="step 7"):
        a.read_step(7)


def test_identical_runs_have_no_divergence():
    a, e = _pair()
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert result.passed and result.complete
    assert result.first_divergence is None
    assert len(result.records) == len(STEPS) * len(SMALL)
    assert [r.stage for r in result.records[: len(SMALL)]] == SMALL  # canonical order, not dict order
    assert result.records[1].layer == 0 and result.records[0].layer is None
    d = result.to_dict()
    assert d["verdict"] == "no divergence" and d["first_divergence"] is None
    assert d["summary"] == {"records": 21, "failed": 0, "worst_logits_max_abs": 0.0}


def test_earliest_step_wins_over_earlier_stage_in_later_step():
    a, e = _pair()
    a.arrays[1]["emb"] += 1.0  # step 1, first stage
    a.arrays[0]["state.L0.att_kv"][1, 2, 3] += 1.0  # step 0, last stage
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    first = result.first_divergence
    assert (first.step, first.step_kind, first.stage, first.layer) == (0, "prefill", "state.L0.att_kv", 0)
    assert first.metrics.first_row is None  # a state slot has no token axis
    assert first.metrics.worst_index == (1, 2, 3)
    assert len(result.failed) == 2


def test_within_a_step_earliest_stage_in_stage_order_wins():
    a, e = _pair()
    # Insert in reverse so dict order disagrees with execution order.
    a.arrays[2] = dict(reversed(list(a.arrays[2].items())))
    a.arrays[2]["logits"] += 1.0
    a.arrays[2]["L1.att.wkv"][0, 4] += 1.0
    a.arrays[2]["L1.x_out"] += 1.0
    first = compare_runs(actual=a, expected=e, policy=POLICY).first_divergence
    assert (first.step, first.stage, first.layer, first.metrics.first_row) == (2, "L1.att.wkv", 1, 0)


def test_first_row_in_prefill_points_at_token():
    a, e = _pair()
    a.arrays[0]["L0.att.wkv"][2, 5] += 1e-2
    first = compare_runs(actual=a, expected=e, policy=POLICY).first_divergence
    assert (first.stage, first.metrics.first_row) == ("L0.att.wkv", 2)
    assert first.to_dict()["row"] == 2


def test_overrides_apply_by_pattern():
    a, e = _pair()
    for step in a.arrays.values():
        step["L0.att.wkv"] += 1e-3
        step["L1.att.wkv"] += 1e-3
    loose = Tolerance(rtol=0.0, atol=2e-3, reason="wkv accumulates in a different order")
    assert not compare_runs(actual=a, expected=e, policy=POLICY).passed
    policy = TolerancePolicy.for_dtype("float32", overrides={"L*.att.wkv": loose})
    result = compare_runs(actual=a, expected=e, policy=policy)
    assert result.passed
    wkv_reasons = {r.metrics.tolerance.reason for r in result.records if r.stage.endswith("att.wkv")}
    assert wkv_reasons == {loose.reason}


def test_missing_stages_are_listed_not_compared():
    a, e = _pair()
    del a.arrays[1]["L0.x_out"]
    del e.arrays[2]["logits"]
    a.arrays[0]["debug.extra"] = np.zeros(2)
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert result.passed and not result.complete
    missing = {(m.step, m.stage, m.missing_in) for m in result.missing}
    assert missing == {(1, "L0.x_out", "actual"), (2, "logits", "expected"), (0, "debug.extra", "expected")}
    assert not any((r.step, r.stage) in {(1, "L0.x_out"), (2, "logits")} for r in result.records)


def test_stages_outside_expected_order_go_last_sorted():
    a, e = _pair()
    for name in ("zz.tap", "aa.tap"):
        a.arrays[0][name] = np.ones(3)
        e.arrays[0][name] = np.ones(3)
    stages = [r.stage for r in compare_runs(actual=a, expected=e, policy=POLICY).records if r.step == 0]
    assert stages == SMALL + ["aa.tap", "zz.tap"]


def test_step_present_on_one_side_is_unmatched():
    a, e = _pair(actual_steps=STEPS[:2])
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert [(u.index, u.kind, u.present_in) for u in result.unmatched_steps] == [(2, "decode", "expected")]
    assert {r.step for r in result.records} == {0, 1}
    assert result.to_dict()["unmatched_steps"] == [{"index": 2, "kind": "decode", "present_in": "expected"}]


def test_steps_with_different_ids_raise():
    a, e = _pair(actual_steps=[STEPS[0], StepInfo(index=1, kind="decode", ids=[10]), STEPS[2]])
    with pytest.raises(ParityError, match="step 1"):
        compare_runs(actual=a, expected=e, policy=POLICY)


def test_steps_with_different_kind_raise():
    a, e = _pair(actual_steps=[StepInfo(index=0, kind="decode", ids=[5, 6, 7])] + STEPS[1:])
    with pytest.raises(ParityError, match="step 0"):
        compare_runs(actual=a, expected=e, policy=POLICY)


def test_reads_one_step_at_a_time_in_order():
    log = []

    class Logged(MemoryRun):
        side = ""

        def read_step(self, index):
            log.append((self.side, index))
            return super().read_step(index)

    a, e = _pair()
    la = Logged(steps=a.steps, stage_order=a.stage_order, dtype=a.dtype, arrays=a.arrays)
    le = Logged(steps=e.steps, stage_order=e.stage_order, dtype=e.dtype, arrays=e.arrays)
    la.side, le.side = "actual", "expected"
    compare_runs(actual=la, expected=le, policy=POLICY)
    assert sorted(log) == [(s, i) for s in ("actual", "expected") for i in range(3)]
    assert [i for _, i in log] == [0, 0, 1, 1, 2, 2]


def test_worst_over_pattern():
    a, e = _pair()
    a.arrays[1]["logits"][0, 3] += 0.5
    a.arrays[2]["logits"][0, 1] += 0.25
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert result.worst("logits") == pytest.approx(0.5)
    assert result.worst("L*.att.wkv") == 0.0
    assert result.worst("nothing.*") is None


def test_to_dict_structure_and_strict_json():
    a, e = _pair()
    a.arrays[1]["L1.att.wkv"][0, 0] = np.nan
    a.arrays[2]["logits"][0, 0] = np.inf
    del a.arrays[2]["emb"]
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(d) >= {"verdict", "first_divergence", "expected", "actual", "policy", "steps", "records",
                      "missing", "summary"}
    assert d["verdict"] == "divergence"
    first = d["first_divergence"]
    where = (first["step"], first["step_kind"], first["layer"], first["stage"], first["row"])
    assert where == (1, "decode", 1, "L1.att.wkv", 0) and first["reason"] == "nonfinite"
    assert first["nonfinite_side"] == "actual" and first["first_nonfinite_index"] == [0, 0]
    assert (d["expected"]["backend"], d["actual"]["backend"]) == ("torch", "tvm")
    assert d["policy"]["dtype"] == "float32"
    assert d["steps"][0] == {"index": 0, "kind": "prefill", "ids": [5, 6, 7]}
    record_keys = {
        "step", "step_kind", "stage", "layer", "row", "passed", "reason", "shape", "max_abs", "max_rel",
        "rms_rel", "cosine", "mismatch_count", "numel", "mismatch_pct", "worst_index", "worst_actual",
        "worst_expected", "min_atol", "min_rtol", "rtol", "atol", "tolerance_reason",
    }
    assert all(record_keys <= set(r) for r in d["records"])
    assert d["missing"] == [{"step": 2, "stage": "emb", "missing_in": "actual"}]
    assert d["summary"]["records"] == 20 and d["summary"]["failed"] == 2


# -- partial rows: a side that holds only some token rows of a per-token stage -----------------


def _last_row_logits(a):
    """The actual side keeps only the last prefill row of the logits, declared as rows.logits."""
    a.arrays[0]["logits"] = a.arrays[0]["logits"][-1:].copy()
    a.arrays[0]["rows.logits"] = np.array([T - 1], dtype=np.int64)


def test_last_row_logits_are_compared_on_that_row():
    a, e = _pair()
    _last_row_logits(a)
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert result.passed and not result.not_comparable
    rec = next(r for r in result.records if (r.step, r.stage) == (0, "logits"))
    assert rec.metrics.rows == (T - 1,) and rec.metrics.numel == V
    # Every other record holds every row: it says nothing about rows.
    assert all(r.metrics.rows is None for r in result.records if (r.step, r.stage) != (0, "logits"))
    # The declaration is not a stage: not compared, not listed as one-sided.
    assert not result.missing and all(not r.stage.startswith("rows.") for r in result.records)
    # End-to-end metrics use the one common row of the prefill.
    per_step = result.end_to_end()["per_step"]
    assert per_step[0]["rows"] == 1 and per_step[1]["rows"] == 1


def test_a_wrong_last_row_is_a_divergence_at_its_token_row():
    a, e = _pair()
    _last_row_logits(a)
    a.arrays[0]["logits"][0, 4] += 1.0
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    fd = result.first_divergence
    assert (fd.step, fd.stage) == (0, "logits")
    # Positions are token rows of the step, not rows of the one-row subset.
    assert fd.metrics.first_row == T - 1 and fd.metrics.worst_index == (T - 1, 4)
    d = fd.to_dict()
    assert d["rows"] == [T - 1] and d["row"] == T - 1


def test_rows_only_the_other_side_has_are_never_a_divergence():
    a, e = _pair()
    # The expected side holds rows 0 and 2 only; the actual side is wrong in row 1, which the
    # expected side does not have, so there is nothing to hold it against.
    e.arrays[0]["L0.x_out"] = e.arrays[0]["L0.x_out"][[0, 2]].copy()
    e.arrays[0]["rows.L0.x_out"] = np.array([0, 2], dtype=np.int64)
    a.arrays[0]["L0.x_out"][1] += 100.0
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert result.passed
    rec = next(r for r in result.records if (r.step, r.stage) == (0, "L0.x_out"))
    assert rec.metrics.rows == (0, 2)
    # Row 2 is shared: a change there is found.
    a.arrays[0]["L0.x_out"][2] += 100.0
    fd = compare_runs(actual=a, expected=e, policy=POLICY).first_divergence
    assert (fd.stage, fd.metrics.first_row) == ("L0.x_out", 2)


def test_no_common_rows_is_not_comparable_not_a_divergence():
    a, e = _pair()
    _last_row_logits(a)
    # The yardstick has rows 0..T-2 only (say, from an extra entry point): none in common.
    e.arrays[0]["logits"] = e.arrays[0]["logits"][:-1].copy()
    e.arrays[0]["rows.logits"] = np.arange(T - 1, dtype=np.int64)
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert result.passed and not result.complete
    assert [(n.step, n.stage, n.actual_rows, n.expected_rows) for n in result.not_comparable] == [
        (0, "logits", [T - 1], list(range(T - 1)))
    ]
    assert all((r.step, r.stage) != (0, "logits") for r in result.records)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["verdict"] == "no divergence"
    assert d["not_comparable"] == [{"step": 0, "stage": "logits", "actual_rows": [T - 1], "expected_rows": [0, 1]}]
    # Decode steps still compare their logits, so the end-to-end metrics skip only the prefill.
    assert [s["step"] for s in result.end_to_end()["per_step"]] == [1, 2]


def test_a_stage_one_side_has_at_some_steps_only_is_listed_not_judged():
    a, e = _pair()
    del a.arrays[1]["L1.att.wkv"]  # recorded in the prefill and step 2, not in step 1
    result = compare_runs(actual=a, expected=e, policy=POLICY)
    assert result.passed and not result.complete
    assert [(m.step, m.stage, m.missing_in) for m in result.missing] == [(1, "L1.att.wkv", "actual")]
    assert {r.step for r in result.records if r.stage == "L1.att.wkv"} == {0, 2}


def test_an_undeclared_short_stage_is_still_a_shape_finding():
    # Only a declaration makes fewer rows legitimate; a port that silently lost rows is a finding.
    a, e = _pair()
    e.arrays[0]["rows.L0.x_out"] = np.arange(T, dtype=np.int64)  # declares all rows
    a.arrays[0]["L0.x_out"] = a.arrays[0]["L0.x_out"][:2].copy()
    fd = compare_runs(actual=a, expected=e, policy=POLICY).first_divergence
    assert (fd.stage, fd.metrics.reason) == ("L0.x_out", "shape")


@pytest.mark.parametrize(
    "rows, message",
    [
        (np.array([2, 1], dtype=np.int64), "distinct ascending"),
        (np.array([T], dtype=np.int64), r"in \[0, 3\)"),
        (np.array([0.0]), "1-D integer array"),
        (np.array([0, 1], dtype=np.int64), "names 2 rows"),
    ],
)
def test_a_malformed_rows_declaration_is_refused(rows, message):
    a, e = _pair()
    _last_row_logits(a)
    a.arrays[0]["rows.logits"] = rows
    with pytest.raises(ParityError, match=message):
        compare_runs(actual=a, expected=e, policy=POLICY)
