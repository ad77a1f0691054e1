"""Compare two arrays under one tolerance and say how far apart they are.

Same judgement as ``torch.testing.assert_close``: both sides are promoted to float64 before
diffing (so an fp16-vs-fp32 comparison measures the values, not the rounding of the subtraction),
and an element mismatches when |a-b| > atol + rtol*|b| with b the *expected* side — where, past
torch, atol is the record's *effective* absolute floor: the tolerance's atol plus its ``scale``
times the largest finite |b| of the record (see ``parity.compare.tolerance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from parity.compare.tolerance import Tolerance
from parity.errors import ParityError

# How many ulps a minimum tolerance may be nudged up; rounding in atol + rtol*|b| needs one or two.
_MAX_NUDGES = 64


@dataclass
class RecordMetrics:
    """How one (actual, expected) pair compares. Truthy when it passes."""

    passed: bool
    reason: str | None  # None when passed; else "tolerance", "nonfinite" or "shape"
    tolerance: Tolerance
    shape: tuple[int, ...]  # the expected side's shape
    actual_shape: tuple[int, ...]
    # Everything below is over the positions finite on both sides; None where there is nothing
    # to measure (a shape mismatch, or no position finite on both sides).
    max_abs: float | None = None
    max_rel: float | None = None  # |a-b|/|b|, with 0/0 = 0 and x/0 = inf
    rms_rel: float | None = None  # ||a-b|| / ||b||: RWKV's own kernel tests use this one
    cosine: float | None = None
    mismatch_count: int | None = None  # includes non-finite positions where the sides disagree
    numel: int = 0
    mismatch_pct: float | None = None
    worst_index: tuple[int, ...] | None = None  # where |a-b| is largest
    worst_actual: float | None = None
    worst_expected: float | None = None
    effective_atol: float | None = None  # tolerance.atol + tolerance.scale * max|expected|
    min_atol: float | None = None  # smallest (effective) atol that passes with this rtol
    min_rtol: float | None = None  # smallest rtol that passes with this atol (finite positions)
    first_row: int | None = None  # per-token records: first token row with any finding
    # The token rows compared, when a side recorded only some rows of a per-token stage (a
    # port's prefill returning the last token's logits): None means every row. first_row and
    # worst_index then count token positions of the step, not positions in this subset.
    rows: tuple[int, ...] | None = None
    # Non-finite findings; all None/0 when both sides are finite everywhere.
    nonfinite_side: str | None = None  # "actual", "expected" or "both"
    first_nonfinite_index: tuple[int, ...] | None = None
    nonfinite_same_places: bool | None = None  # same positions and same values (NaN == NaN)
    nonfinite_count_actual: int = 0
    nonfinite_count_expected: int = 0

    def __bool__(self) -> bool:
        return self.passed

    def message(self) -> str:
        """One line in torch.testing's wording, for assertion messages and logs."""
        if self.reason == "shape":
            return f"Shape mismatch: actual {self.actual_shape} vs expected {self.shape}"
        parts = []
        if self.reason == "nonfinite":
            same = " (same places and values on both sides)" if self.nonfinite_same_places else ""
            parts.append(
                f"Non-finite values in {self.nonfinite_side}, first at {self.first_nonfinite_index}{same}"
            )
        if self.mismatch_count is not None:
            parts.append(
                f"Mismatched elements: {self.mismatch_count} / {self.numel} ({self.mismatch_pct:.1f}%)"
            )
        if self.worst_index is not None:
            parts.append(
                f"Greatest absolute difference: {self.max_abs:.6g} at index {self.worst_index} "
                f"(actual {self.worst_actual:.6g}, expected {self.worst_expected:.6g}; "
                f"up to {self.effective_atol:.3g} + {self.tolerance.rtol:.3g}*|expected| allowed)"
            )
        return "; ".join(parts) if parts else "ok"

    def to_dict(self) -> dict:
        """JSON-safe (passes ``json.dumps(..., allow_nan=False)``): inf/nan become strings."""
        d = {
            "passed": self.passed,
            "reason": self.reason,
            "shape": list(self.shape),
            "actual_shape": list(self.actual_shape),
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "rms_rel": self.rms_rel,
            "cosine": self.cosine,
            "mismatch_count": self.mismatch_count,
            "numel": self.numel,
            "mismatch_pct": self.mismatch_pct,
            "worst_index": self.worst_index,
            "worst_actual": self.worst_actual,
            "worst_expected": self.worst_expected,
            "min_atol": self.min_atol,
            "min_rtol": self.min_rtol,
            "first_row": self.first_row,
            "rows": None if self.rows is None else list(self.rows),
            "rtol": self.tolerance.rtol,
            "atol": self.effective_atol if self.effective_atol is not None else self.tolerance.atol,
            "atol_base": self.tolerance.atol,
            "scale": self.tolerance.scale,
            "tolerance_reason": self.tolerance.reason,
            "nonfinite_side": self.nonfinite_side,
            "first_nonfinite_index": self.first_nonfinite_index,
            "nonfinite_same_places": self.nonfinite_same_places,
            "nonfinite_count_actual": self.nonfinite_count_actual,
            "nonfinite_count_expected": self.nonfinite_count_expected,
        }
        return {k: json_safe(v) for k, v in d.items()}


def json_safe(value):
    """Floats inf/nan as strings, tuples as lists, numpy scalars as Python scalars."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(value, (tuple, list)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def _as_float64(x, *, side: str) -> np.ndarray:
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ParityError(f"{side} array is complex ({arr.dtype}); stages are real-valued")
    try:
        return arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as e:
        raise ParityError(f"{side} array of dtype {arr.dtype} cannot be compared numerically") from e


def _mismatches(diff: np.ndarray, abs_b: np.ndarray, *, rtol: float, atol: float) -> np.ndarray:
    # The single place the pass/fail rule is written, so min_atol/min_rtol are checked against
    # exactly the arithmetic that judges the record.
    return diff > atol + rtol * abs_b


def _min_atol(diff: np.ndarray, abs_b: np.ndarray, *, rtol: float) -> float:
    if diff.size == 0:
        return 0.0
    cand = max(float(np.max(diff - rtol * abs_b)), 0.0)
    for _ in range(_MAX_NUDGES):
        if not _mismatches(diff, abs_b, rtol=rtol, atol=cand).any():
            break
        cand = float(np.nextafter(cand, math.inf))
    return cand


def _min_rtol(diff: np.ndarray, abs_b: np.ndarray, *, atol: float) -> float:
    if diff.size == 0:
        return 0.0
    # Where expected is exactly 0 no rtol helps: only atol can cover the difference.
    zero_b = abs_b == 0
    if bool(np.any(diff[zero_b] > atol)):
        return math.inf
    nonzero = ~zero_b
    if not nonzero.any():
        return 0.0
    cand = max(float(np.max((diff[nonzero] - atol) / abs_b[nonzero])), 0.0)
    for _ in range(_MAX_NUDGES):
        if not _mismatches(diff, abs_b, rtol=cand, atol=atol).any():
            break
        cand = float(np.nextafter(cand, math.inf))
    return cand


def _first_row(findings: np.ndarray) -> int | None:
    if findings.ndim == 0 or findings.shape[0] == 0:
        return None
    rows = findings.reshape(findings.shape[0], -1).any(axis=1)
    hits = np.flatnonzero(rows)
    return int(hits[0]) if hits.size else None


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _to_token_rows(out: RecordMetrics) -> None:
    """Row positions in the compared subset -> the token rows they are (``out.rows``)."""
    if out.first_row is not None:
        out.first_row = out.rows[out.first_row]
    for field in ("worst_index", "first_nonfinite_index"):
        index = getattr(out, field)
        if index:
            setattr(out, field, (out.rows[index[0]], *index[1:]))


def compare_arrays(actual, expected, *, tolerance: Tolerance, per_token: bool, rows=None) -> RecordMetrics:
    """Judge ``actual`` against ``expected``; ``per_token``: axis 0 is the token row.

    ``rows``: the token rows the two arrays hold (both sides already cut to the rows they share),
    when that is not every row of the step; reported positions are then token rows.
    """
    if rows is not None and not per_token:
        raise ParityError("rows apply to per-token stages only; a state slot has no token axis")
    a = _as_float64(actual, side="actual")
    b = _as_float64(expected, side="expected")
    if rows is not None:
        rows = tuple(int(r) for r in rows)
        if b.ndim == 0 or len(rows) != b.shape[0]:
            raise ParityError(f"{len(rows)} token rows named for an expected array of shape {tuple(b.shape)}")
    if a.shape != b.shape:
        # A finding, not an exception: a layout bug (e.g. a dropped reshape) is what we hunt.
        return RecordMetrics(
            passed=False,
            reason="shape",
            tolerance=tolerance,
            shape=tuple(b.shape),
            actual_shape=tuple(a.shape),
            numel=int(b.size),
            rows=rows,
        )
    shape = tuple(b.shape)
    finite_a = np.isfinite(a)
    finite_b = np.isfinite(b)
    nonfinite_a = int(a.size - np.count_nonzero(finite_a))
    nonfinite_b = int(b.size - np.count_nonzero(finite_b))
    all_finite = nonfinite_a == 0 and nonfinite_b == 0

    if all_finite:
        af, bf = a.ravel(), b.ravel()
        positions = None  # compared positions are all of them, in C order
    else:
        finite = finite_a & finite_b
        af, bf = a[finite], b[finite]
        positions = np.flatnonzero(finite)

    # Subtracting two finite float64 values can still overflow to inf; that is a real finding.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        diff = np.abs(af - bf)
        abs_b = np.abs(bf)
        atol = tolerance.atol + (tolerance.scale * float(abs_b.max()) if abs_b.size else 0.0)
        mism = _mismatches(diff, abs_b, rtol=tolerance.rtol, atol=atol)

        if all_finite:
            findings = mism.reshape(shape)
            mismatch_count = int(np.count_nonzero(mism))
        else:
            findings = np.zeros(shape, dtype=bool)
            findings[finite] = mism
            # A non-finite value counts as a mismatch unless the other side holds the very same
            # value there (inf == inf, or NaN on both sides).
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            findings |= ~finite & ~same
            mismatch_count = int(np.count_nonzero(findings))
            findings = findings | ~finite  # first_row reports the first row with any finding

        out = RecordMetrics(
            passed=True,
            reason=None,
            tolerance=tolerance,
            shape=shape,
            actual_shape=shape,
            numel=int(b.size),
            effective_atol=atol,
            mismatch_count=mismatch_count,
            mismatch_pct=100.0 * mismatch_count / b.size if b.size else 0.0,
            nonfinite_count_actual=nonfinite_a,
            nonfinite_count_expected=nonfinite_b,
        )

        if diff.size:
            k = int(np.argmax(diff))
            out.max_abs = float(diff[k])
            out.worst_index = _index(k if positions is None else int(positions[k]), shape)
            out.worst_actual = float(af[k])
            out.worst_expected = float(bf[k])
            safe_b = np.where(abs_b > 0, abs_b, 1.0)
            rel = np.where(abs_b > 0, diff / safe_b, np.where(diff > 0, math.inf, 0.0))
            out.max_rel = float(np.max(rel))
            norm_d = float(np.linalg.norm(diff))
            norm_a = float(np.linalg.norm(af))
            norm_b = float(np.linalg.norm(bf))
            if norm_b == 0:
                out.rms_rel = 0.0 if norm_d == 0 else math.inf
            else:
                out.rms_rel = norm_d / norm_b
            if norm_a == 0 and norm_b == 0:
                out.cosine = 1.0
            elif norm_a == 0 or norm_b == 0:
                out.cosine = 0.0  # undefined; 0 says "no shared direction" without a NaN
            else:
                out.cosine = float(np.clip(np.dot(af, bf) / (norm_a * norm_b), -1.0, 1.0))
            out.min_atol = _min_atol(diff, abs_b, rtol=tolerance.rtol)
            out.min_rtol = _min_rtol(diff, abs_b, atol=atol)
        elif b.size == 0:
            out.max_abs = out.max_rel = out.rms_rel = 0.0
            out.cosine = 1.0
            out.min_atol = out.min_rtol = 0.0

    if per_token:
        out.first_row = _first_row(findings)
        if rows is not None:
            out.rows = rows
            _to_token_rows(out)

    if not all_finite:
        out.passed = False
        out.reason = "nonfinite"
        if nonfinite_a and nonfinite_b:
            out.nonfinite_side = "both"
        else:
            out.nonfinite_side = "actual" if nonfinite_a else "expected"
        out.first_nonfinite_index = _index(int(np.flatnonzero(~(finite_a & finite_b))[0]), shape)
        out.nonfinite_same_places = bool(
            np.array_equal(finite_a, finite_b) and np.array_equal(a[~finite_a], b[~finite_b], equal_nan=True)
        )
    elif mismatch_count:
        out.passed = False
        out.reason = "tolerance"
    return out
