import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from parity.compare.metrics import compare_arrays
from parity.compare.tolerance import DEFAULT_TOLERANCES, Tolerance
from parity.errors import ParityError

FP32 = DEFAULT_TOLERANCES["float32"]
TOL = Tolerance(rtol=1e-3, atol=1e-4, reason="test")
REPO = Path(__file__).resolve().parents[2]


def _rng():
    return np.random.default_rng(0)


def _judge(a, b, *, rtol, atol, per_token=True):
    tol = Tolerance(rtol=rtol, atol=atol, reason="re-judge")
    return compare_arrays(a, b, tolerance=tol, per_token=per_token)


def test_identical_arrays_pass():
    b = _rng().standard_normal((5, 8)).astype(np.float32)
    m = compare_arrays(b.copy(), b, tolerance=FP32, per_token=True)
    assert m and m.passed and m.reason is None
    assert (m.max_abs, m.mismatch_count, m.first_row) == (0.0, 0, None)
    assert m.cosine == pytest.approx(1.0)
    assert m.numel == 40 and m.mismatch_pct == 0.0


def test_perturbation_inside_and_outside_tolerance():
    b = np.full((4, 3), 2.0)
    bound = TOL.atol + TOL.rtol * 2.0
    inside = b.copy()
    inside[2, 1] += bound * 0.99
    outside = b.copy()
    outside[2, 1] += bound * 1.01
    assert compare_arrays(inside, b, tolerance=TOL, per_token=True).passed
    m = compare_arrays(outside, b, tolerance=TOL, per_token=True)
    assert not m and m.reason == "tolerance"
    assert m.mismatch_count == 1 and m.mismatch_pct == pytest.approx(100 / 12)
    assert m.worst_index == (2, 1)
    assert (m.worst_actual, m.worst_expected) == (outside[2, 1], 2.0)
    assert m.first_row == 2


def test_rtol_is_relative_to_expected_not_actual():
    # |a-b| = 1 with b = 10 passes rtol 0.1; swapped (b = 9) it must fail.
    tol = Tolerance(rtol=0.1, atol=0.0, reason="t")
    assert compare_arrays(np.array([11.0]), np.array([10.0]), tolerance=tol, per_token=False).passed
    assert not compare_arrays(np.array([10.0]), np.array([9.0]), tolerance=tol, per_token=False).passed


def test_min_atol_and_min_rtol_are_the_boundary():
    rng = _rng()
    b = rng.standard_normal((6, 16))
    a = b + rng.standard_normal((6, 16)) * 1e-2
    m = compare_arrays(a, b, tolerance=TOL, per_token=True)
    assert not m
    assert m.min_atol > 0 and m.min_rtol > 0
    assert _judge(a, b, rtol=TOL.rtol, atol=m.min_atol).passed
    assert not _judge(a, b, rtol=TOL.rtol, atol=0.9 * m.min_atol).passed
    assert _judge(a, b, rtol=m.min_rtol, atol=TOL.atol).passed
    assert not _judge(a, b, rtol=0.9 * m.min_rtol, atol=TOL.atol).passed


def test_min_rtol_is_inf_where_expected_is_zero():
    m = compare_arrays(np.array([0.5, 1.0]), np.array([0.0, 1.0]), tolerance=TOL, per_token=False)
    assert m.min_rtol == float("inf")
    assert m.max_rel == float("inf")
    assert m.min_atol == pytest.approx(0.5)


def test_first_row_points_at_perturbed_row():
    b = _rng().standard_normal((7, 4, 3))
    a = b.copy()
    a[5, 2, 1] += 1.0
    a[6, 0, 0] += 2.0
    m = compare_arrays(a, b, tolerance=FP32, per_token=True)
    assert m.first_row == 5
    assert m.worst_index == (6, 0, 0)
    assert compare_arrays(a, b, tolerance=FP32, per_token=False).first_row is None


def test_metric_values():
    a = np.array([[1.0, 2.0], [3.0, 5.0]])
    b = np.array([[1.0, 2.0], [3.0, 4.0]])
    m = compare_arrays(a, b, tolerance=TOL, per_token=True)
    assert m.max_abs == 1.0
    assert m.max_rel == pytest.approx(0.25)
    assert m.rms_rel == pytest.approx(1.0 / np.linalg.norm(b))
    assert m.cosine == pytest.approx(float(a.ravel() @ b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert m.first_row == 1


def test_zero_arrays():
    z = np.zeros((3, 2))
    m = compare_arrays(z, z.copy(), tolerance=FP32, per_token=True)
    assert m.passed
    assert (m.max_rel, m.rms_rel, m.cosine) == (0.0, 0.0, 1.0)
    a = z.copy()
    a[1, 1] = 1.0
    m = compare_arrays(a, z, tolerance=FP32, per_token=True)
    assert not m
    assert (m.max_rel, m.rms_rel, m.cosine) == (float("inf"), float("inf"), 0.0)
    assert m.first_row == 1


def test_promotes_to_float64_before_diffing():
    # In float16 the two values round to the same number; promotion keeps the 1e-4 difference.
    a = np.array([1.0001], dtype=np.float32)
    b = np.array([1.0], dtype=np.float16)
    m = compare_arrays(a, b, tolerance=Tolerance(rtol=0.0, atol=1e-5, reason="t"), per_token=False)
    assert not m
    assert m.max_abs == pytest.approx(1e-4, rel=1e-3)


def test_shape_mismatch_is_a_finding():
    m = compare_arrays(np.zeros((3, 4)), np.zeros((4, 3)), tolerance=FP32, per_token=True)
    assert not m and m.reason == "shape"
    assert (m.actual_shape, m.shape) == ((3, 4), (4, 3))
    assert m.max_abs is None
    assert "Shape mismatch" in m.message()


def test_nan_in_actual():
    b = np.ones((4, 5))
    a = b.copy()
    a[2, 3] = np.nan
    a[0, 0] += 1.0  # a tolerance failure in an earlier row
    m = compare_arrays(a, b, tolerance=FP32, per_token=True)
    assert not m and m.reason == "nonfinite"
    assert m.nonfinite_side == "actual"
    assert m.first_nonfinite_index == (2, 3)
    assert m.nonfinite_same_places is False
    assert m.first_row == 0
    assert m.mismatch_count == 2
    assert m.max_abs == 1.0  # measured over the finite positions
    assert m.worst_index == (0, 0)


def test_inf_in_expected_sets_first_row():
    b = np.ones((4, 5))
    b[3, 1] = np.inf
    m = compare_arrays(np.ones((4, 5)), b, tolerance=FP32, per_token=True)
    assert not m and m.reason == "nonfinite"
    assert (m.nonfinite_side, m.first_nonfinite_index, m.first_row) == ("expected", (3, 1), 3)
    assert m.max_abs == 0.0


def test_nonfinite_same_places_on_both_sides():
    b = np.ones((3, 3))
    b[1, 1], b[2, 0] = np.nan, -np.inf
    m = compare_arrays(b.copy(), b, tolerance=FP32, per_token=True)
    assert not m and m.reason == "nonfinite"
    assert m.nonfinite_side == "both"
    assert m.nonfinite_same_places is True
    assert m.mismatch_count == 0  # same value in the same place is no disagreement
    assert m.first_row == 1
    a = b.copy()
    a[2, 0] = np.inf  # same place, different value
    assert compare_arrays(a, b, tolerance=FP32, per_token=True).nonfinite_same_places is False


def test_all_nonfinite_has_no_finite_metrics():
    m = compare_arrays(np.full(3, np.nan), np.ones(3), tolerance=FP32, per_token=False)
    assert m.reason == "nonfinite"
    assert m.max_abs is None and m.worst_index is None
    assert m.mismatch_count == 3


def test_scalar_and_empty_arrays():
    m = compare_arrays(np.float64(1.5), np.float64(1.0), tolerance=FP32, per_token=True)
    assert not m and m.worst_index == () and m.first_row is None
    empty = compare_arrays(np.zeros((0, 4)), np.zeros((0, 4)), tolerance=FP32, per_token=True)
    assert empty.passed and empty.numel == 0 and empty.first_row is None


def test_complex_is_rejected():
    with pytest.raises(ParityError, match="complex"):
        compare_arrays(np.ones(2, dtype=complex), np.ones(2), tolerance=FP32, per_token=False)


def test_to_dict_is_strict_json():
    b = np.zeros((2, 2))
    a = b.copy()
    a[0, 1] = np.nan
    a[1, 0] = 3.0
    d = compare_arrays(a, b, tolerance=FP32, per_token=True).to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["max_rel"] == "inf" and back["min_rtol"] == "inf"
    assert back["first_nonfinite_index"] == [0, 1] and back["worst_index"] == [1, 0]
    assert (back["rtol"], back["atol"], back["reason"]) == (FP32.rtol, FP32.atol, "nonfinite")


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    rtol=st.floats(min_value=0.0, max_value=0.1),
    atol=st.floats(min_value=0.0, max_value=1.0),
)
def test_passed_agrees_with_numpy_allclose(data, shape, rtol, atol):
    b = data.draw(hnp.arrays(np.float64, shape, elements=finite))
    scale = data.draw(st.sampled_from([0.0, 1e-6, 1e-3, 1e-1, 1.0]))
    noise = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1)))
    a = b + scale * noise
    tol = Tolerance(rtol=rtol, atol=atol, reason="property")
    m = compare_arrays(a, b, tolerance=tol, per_token=True)
    assert m.passed == bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=False))
    # The minimum tolerances always pass when re-judged.
    assert compare_arrays(a, b, tolerance=replace(tol, atol=m.min_atol), per_token=True).passed
    if np.isfinite(m.min_rtol):
        assert compare_arrays(a, b, tolerance=replace(tol, rtol=m.min_rtol), per_token=True).passed


def test_compare_imports_neither_torch_nor_tvm():
    code = (
        "import sys, parity.compare; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tvm')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"parity.compare pulled in: {proc.stdout.strip()} {proc.stderr.strip()}"


def test_scale_term_covers_cancellation_near_zero():
    # A reduction's error follows the size of its terms: an element that cancelled to ~0 may
    # carry an error no rtol covers, but scale * max|expected| does.
    expected = np.array([100.0, -80.0, 1e-6])
    actual = expected + np.array([0.0, 0.0, 2e-3])
    torch_rule = Tolerance(rtol=1.3e-6, atol=1e-5, reason="t")
    scaled = Tolerance(rtol=1.3e-6, atol=1e-5, scale=2e-5, reason="t")
    assert not compare_arrays(actual, expected, tolerance=torch_rule, per_token=False)
    m = compare_arrays(actual, expected, tolerance=scaled, per_token=False)
    assert m.passed
    assert m.effective_atol == pytest.approx(1e-5 + 2e-5 * 100.0)
    assert m.min_atol <= m.effective_atol
    assert m.to_dict()["atol"] == pytest.approx(m.effective_atol)
    # Just below the needed scale it fails again.
    tight = Tolerance(rtol=1.3e-6, atol=1e-5, scale=1.8e-5, reason="t")
    assert not compare_arrays(actual, expected, tolerance=tight, per_token=False)
