"""compare_arrays on large all-finite records goes block by block (issue 9: peak memory of long
prompts); the figures must be the whole-array ones.

The expectations come from the whole-array path of the same function, forced by a block size
larger than the record, which tests/compare/test_metrics.py pins against hand-computed values.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from parity.compare import metrics
from parity.compare.metrics import compare_arrays
from parity.compare.tolerance import Tolerance

# Norms and the dot product are sums of per-block sums: equal up to float64 summation order,
# which over a few thousand terms moves the last few ulps (1e-12 relative is ~4500 ulps of room).
SUM_ORDER_RTOL = 1e-12
SUMMED = ("rms_rel", "cosine")


def _both(monkeypatch, actual, expected, **kw):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1 << 40)  # one block bigger than any record: whole-array path
    whole = compare_arrays(actual, expected, **kw)
    calls = []
    real = metrics._compare_finite_blocks
    monkeypatch.setattr(metrics, "_compare_finite_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 37)  # odd size: blocks straddle token rows
    blocks = compare_arrays(actual, expected, **kw)
    assert calls, "the block path was not taken"
    return whole.to_dict(), blocks.to_dict()


def _assert_same(whole: dict, blocks: dict) -> None:
    for key in whole:
        if key in SUMMED and isinstance(whole[key], float):
            assert blocks[key] == pytest.approx(whole[key], rel=SUM_ORDER_RTOL, abs=0), key
        else:
            assert blocks[key] == whole[key], key


def _pair(seed: int, shape=(20, 50), noise=1e-4, dtype=np.float32):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(shape).astype(dtype)
    a = (e + noise * rng.standard_normal(shape)).astype(dtype)
    return a, e


@pytest.mark.parametrize("noise", [0.0, 1e-7, 1e-4, 1e-1])
def test_blocks_match_whole_array_figures(monkeypatch, noise):
    a, e = _pair(0, noise=noise)
    whole, blocks = _both(monkeypatch, a, e, tolerance=Tolerance(rtol=1e-5, atol=1e-5, scale=1e-6, reason="test"), per_token=True)
    _assert_same(whole, blocks)
    if noise >= 1e-4:  # a real finding: the comparison must fail the same way on both paths
        assert whole["passed"] is False and whole["first_row"] is not None


def test_blocks_zeros_in_expected_and_a_late_worst(monkeypatch):
    a, e = _pair(1, noise=0.0)
    e[3, :] = a[3, :] = 0.0
    a[3, :7] = 1e-9  # |a-b| where b is 0: only atol covers it
    a[3, 8] = 1e-6  # ... and here atol does not: no rtol can pass it
    a[17, 41] += 0.5  # the worst element, in a late block
    whole, blocks = _both(monkeypatch, a, e, tolerance=Tolerance(rtol=1e-4, atol=1e-8, reason="test"), per_token=True)
    _assert_same(whole, blocks)
    assert blocks["worst_index"] == [17, 41]
    assert blocks["first_row"] == 3


def test_blocks_ties_keep_the_first_maximum(monkeypatch):
    e = np.zeros((10, 30), dtype=np.float32)
    a = e.copy()
    a[2, 5] = a[8, 1] = 1.0  # equal worst differences, in different blocks: argmax keeps the first
    whole, blocks = _both(monkeypatch, a, e, tolerance=Tolerance(rtol=0.0, atol=0.5, reason="test"), per_token=True)
    _assert_same(whole, blocks)
    assert blocks["worst_index"] == [2, 5]
    assert blocks["min_rtol"] == "inf"  # expected is 0 where the sides differ by more than atol


def test_blocks_mixed_dtypes_and_rows(monkeypatch):
    a, e = _pair(2, noise=1e-3)
    rows = tuple(range(100, 120))
    whole, blocks = _both(monkeypatch, a.astype(np.float16), e.astype(np.float64),
                          tolerance=Tolerance(rtol=1e-3, atol=1e-3, reason="test"), per_token=True, rows=rows)
    _assert_same(whole, blocks)
    assert whole["first_row"] is None or whole["first_row"] >= 100


def test_blocks_state_slot_has_no_first_row(monkeypatch):
    a, e = _pair(3, shape=(4, 8, 9), noise=1e-2)
    whole, blocks = _both(monkeypatch, a, e, tolerance=Tolerance(rtol=1e-5, atol=1e-5, reason="test"), per_token=False)
    _assert_same(whole, blocks)
    assert blocks["first_row"] is None


def test_nonfinite_records_keep_the_whole_array_path(monkeypatch):
    a, e = _pair(4)
    a[5, 5] = np.nan
    called = []
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 37)
    monkeypatch.setattr(metrics, "_compare_finite_blocks", lambda *x, **k: called.append(1))
    m = compare_arrays(a, e, tolerance=Tolerance(rtol=1e-5, atol=1e-5, reason="test"), per_token=True)
    assert not called
    assert m.reason == "nonfinite" and m.first_nonfinite_index == (5, 5)


def test_large_record_never_holds_a_whole_float64_copy(monkeypatch):
    # A (64, 65536) fp32 logits record: one float64 copy of it is 33.5 MB, and the whole-array
    # path holds several at once. With 2**16-element blocks (0.5 MiB each) the comparison's
    # peak must stay well under one such copy.
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1 << 16)
    a, e = _pair(5, shape=(64, 65536), noise=1e-3)
    one_copy = a.size * 8
    tracemalloc.start()
    try:
        compare_arrays(a, e, tolerance=Tolerance(rtol=1e-5, atol=1e-5, reason="test"), per_token=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < one_copy / 2, f"peak {peak / 1e6:.1f} MB during the comparison"
    assert math.isfinite(peak)
