"""End-to-end logits metrics: KL, near-tie-aware top-1, top-5 overlap, cosine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from parity.compare.endtoend import logit_rows, summarize


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) written out the long way, for checking the vectorised one."""
    p = np.exp(p_logits - p_logits.max()) / np.exp(p_logits - p_logits.max()).sum()
    q = np.exp(q_logits - q_logits.max()) / np.exp(q_logits - q_logits.max()).sum()
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))


def test_identical_logits_have_zero_kl_and_full_agreement():
    x = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    s = summarize(logit_rows(x, x, tie_atol=0.0))
    assert s["rows"] == 4 and s["kl_max"] == 0.0 and s["top1_agreement"] == 1.0
    assert s["top5_overlap"] == 1.0 and s["cosine_min"] == pytest.approx(1.0)


def test_kl_matches_the_definition_with_expected_as_p():
    rng = np.random.default_rng(1)
    e, a = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    rows = logit_rows(a, e, tie_atol=0.0)
    for r in range(3):
        assert rows.kl[r] == pytest.approx(_kl(e[r], a[r]), rel=1e-9)
    assert summarize(rows)["kl_max"] == pytest.approx(max(_kl(e[r], a[r]) for r in range(3)), rel=1e-9)


def test_a_flip_between_near_equal_logits_is_a_tie_and_a_clear_flip_is_not():
    e = np.array([[0.0, 5.0, 5.0 + 1e-6, 1.0], [0.0, 5.0, 7.0, 1.0]])
    a = np.array([[0.0, 5.0 + 2e-6, 5.0, 1.0], [0.0, 7.5, 7.0, 1.0]])
    rows = logit_rows(a, e, tie_atol=1e-5)
    assert rows.top1 == ["tie", "flip"]
    s = summarize(rows)
    assert s["top1_ties"] == 1 and s["top1_flips"] == 1 and s["top1_agreement"] == 0.5


def test_top5_overlap_counts_shared_tokens():
    e = np.arange(10, dtype=np.float64)[None, :]  # top-5: 5..9
    a = e.copy()
    a[0, 9], a[0, 0] = -1.0, 100.0  # actual's top-5: 0, 5, 6, 7, 8
    assert logit_rows(a, e, tie_atol=0.0).top5_overlap == [pytest.approx(4 / 5)]


def test_non_finite_rows_are_infinite_kl_and_a_flip():
    e = np.zeros((2, 6))
    a = e.copy()
    a[1, 2] = np.nan
    s = summarize(logit_rows(a, e, tie_atol=0.0))
    assert s["kl_max"] == "inf" and s["top1_flips"] == 1


def test_p999_is_a_value_some_row_has():
    rng = np.random.default_rng(2)
    e, a = rng.normal(size=(37, 8)), rng.normal(size=(37, 8))
    rows = logit_rows(a, e, tie_atol=0.0)
    assert summarize(rows)["kl_p999"] in rows.kl


def test_blocks_give_the_same_rows_as_one_pass(monkeypatch):
    import parity.compare.endtoend as mod

    rng = np.random.default_rng(3)
    e, a = rng.normal(size=(10, 30)), rng.normal(size=(10, 30))
    whole = logit_rows(a, e, tie_atol=1e-3)
    monkeypatch.setattr(mod, "_BLOCK_ROWS", 3)
    blocked = logit_rows(a, e, tie_atol=1e-3)
    assert blocked.kl == whole.kl and blocked.top1 == whole.top1
