"""End-to-end metrics over logits: does a divergence matter to someone using the model?

The stage verdict says where two implementations part; these say what it does to the next-token
distribution, in the terms users of LLM ports already trust (llama.cpp's KL-divergence tool,
MLC's and vLLM's accuracy checks): KL divergence of the next-token distributions, top-1 agreement,
top-5 overlap and logit cosine, per token row. They never replace the stage verdict.

Top-1 is near-tie aware: when the two sides pick different tokens but the expected side's logits
for those two tokens are within ``tie_atol`` of each other, the flip is a tie — rounding can
legitimately reorder two logits that close — and it is counted apart from a disagreement.

Pure numpy, in float64; rows are processed one block at a time so a (512, 65536) logits record
never needs more than a few blocks of float64 in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from parity.compare.metrics import as_record, json_safe

# Rows per float64 block: 16 x 65536 x 8 B = 8 MiB per array. A block makes about eight such
# temporaries (both sides, their log-softmax, exp, products); at 64 rows that was ~0.25 GB on top
# of the two (512, 65536) records, the run's peak on a 0.1B model with a 512-token prompt (issue 9).
_BLOCK_ROWS = 16


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


@dataclass
class RowMetrics:
    """Per token row: KL(expected || actual) in nats, top-1 outcome, top-5 overlap, cosine."""

    kl: list[float] = field(default_factory=list)
    top1: list[str] = field(default_factory=list)  # "agree", "tie" or "flip"
    top5_overlap: list[float] = field(default_factory=list)  # |top5(a) ∩ top5(e)| / 5
    cosine: list[float] = field(default_factory=list)

    def extend(self, other: RowMetrics) -> None:
        self.kl += other.kl
        self.top1 += other.top1
        self.top5_overlap += other.top5_overlap
        self.cosine += other.cosine


def logit_rows(actual: np.ndarray, expected: np.ndarray, *, tie_atol: float) -> RowMetrics:
    """Metrics of every token row of two (T, V) logits records (any float dtype)."""
    a, e = as_record(actual), as_record(expected)  # a stored record is read a block of rows at a time
    a2, e2 = a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])
    if a2.shape != e2.shape:
        raise ValueError(f"logits shapes differ: {a2.shape} vs {e2.shape}")
    out = RowMetrics()
    k = min(5, a2.shape[1])
    for start in range(0, a2.shape[0], _BLOCK_ROWS):
        a = a2[start : start + _BLOCK_ROWS].astype(np.float64)
        e = e2[start : start + _BLOCK_ROWS].astype(np.float64)
        finite = np.isfinite(a).all(axis=1) & np.isfinite(e).all(axis=1)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            la, le = _log_softmax(a), _log_softmax(e)
            kl = np.sum(np.exp(le) * (le - la), axis=1)
            na, ne = np.linalg.norm(a, axis=1), np.linalg.norm(e, axis=1)
            cos = np.sum(a * e, axis=1) / np.maximum(na * ne, np.finfo(np.float64).tiny)
        ia, ie = np.argmax(a, axis=1), np.argmax(e, axis=1)
        rows = np.arange(a.shape[0])
        gap = np.abs(e[rows, ia] - e[rows, ie])
        top_a = np.argpartition(-a, k - 1, axis=1)[:, :k]
        top_e = np.argpartition(-e, k - 1, axis=1)[:, :k]
        for r in rows:
            if not finite[r]:
                out.kl.append(float("inf"))
                out.top1.append("flip")
                out.top5_overlap.append(0.0)
                out.cosine.append(float("nan"))
                continue
            out.kl.append(max(float(kl[r]), 0.0))  # rounding can make an exact match -1e-17
            out.top1.append("agree" if ia[r] == ie[r] else ("tie" if gap[r] <= tie_atol else "flip"))
            out.top5_overlap.append(len(set(top_a[r].tolist()) & set(top_e[r].tolist())) / k)
            out.cosine.append(float(cos[r]))
    return out


def summarize(rows: RowMetrics) -> dict:
    """Aggregate row metrics: KL mean / max / 99.9th percentile, top-1 agreement (ties count as
    agreement, and are also counted apart), top-5 overlap, worst cosine, and the row count."""
    n = len(rows.kl)
    if n == 0:
        return {"rows": 0}
    kl = np.asarray(rows.kl, dtype=np.float64)
    finite = kl[np.isfinite(kl)]
    agree = sum(t == "agree" for t in rows.top1)
    ties = sum(t == "tie" for t in rows.top1)
    cos = np.asarray(rows.cosine, dtype=np.float64)
    return json_safe({
        "rows": n,
        "kl_mean": float(np.mean(kl)) if finite.size == n else float("inf"),
        "kl_max": float(np.max(kl)),
        # "higher": the 99.9th percentile is a value some row really has, never an interpolation.
        "kl_p999": float(np.percentile(kl, 99.9, method="higher")) if finite.size == n else float("inf"),
        "top1_agreement": (agree + ties) / n,
        "top1_flips": n - agree - ties,
        "top1_ties": ties,
        "top5_overlap": float(np.mean(rows.top5_overlap)),
        "cosine_min": float(np.nanmin(cos)) if np.isfinite(cos).any() else float("nan"),
    })
