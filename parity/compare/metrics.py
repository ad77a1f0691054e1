"""Compare two arrays under one tolerance and say how far apart they are.

Same judgement as ``torch.testing.assert_close``: both sides are promoted to float64 before
diffing (so an fp16-vs-fp32 comparison measures the values, not the rounding of the subtraction),
and an element mismatches when |a-b| > atol + rtol*|b| with b the *expected* side — where, past
torch, atol is the record's *effective* absolute floor: the tolerance's atol plus its ``scale``
times the largest finite |b| of the record (see ``parity.compare.tolerance``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from parity.compare.tolerance import Tolerance
from parity.errors import ParityError

# How many ulps a minimum tolerance may be nudged up; rounding in atol + rtol*|b| needs one or two.
_MAX_NUDGES = 64
# Elements per float64 block when a large all-finite record is compared block by block: 2**21
# elements are 16 MiB per float64 temporary. Whole-record float64 copies of a (512, 65536) logits
# record were ~270 MB each, and the comparison held about eight of them at once (issue 9).
_CHUNK_ELEMENTS = 1 << 21


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


def as_record(x):
    """``x`` as an array to compare: a stored record (a dump's StoredArray: ``stored_record``, shape,
    dtype, reshape, row slices read from its file) stays as it is, to be read a block at a time;
    anything else through np.asarray."""
    return x if getattr(x, "stored_record", False) else np.asarray(x)


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



def _set_rms_and_cosine(out, *, norm_d: float, norm_a: float, norm_b: float, dot) -> None:
    """rms_rel and cosine from the norms of the difference, a and b, and (called only when both
    norms are nonzero) their dot product: one definition for the whole-array and blocked paths."""
    if norm_b == 0:
        out.rms_rel = 0.0 if norm_d == 0 else math.inf
    else:
        out.rms_rel = norm_d / norm_b
    if norm_a == 0 and norm_b == 0:
        out.cosine = 1.0
    elif norm_a == 0 or norm_b == 0:
        out.cosine = 0.0  # undefined; 0 says "no shared direction" without a NaN
    else:
        out.cosine = float(np.clip(dot() / (norm_a * norm_b), -1.0, 1.0))


def compare_arrays(actual, expected, *, tolerance: Tolerance, per_token: bool, rows=None) -> RecordMetrics:
    """Judge ``actual`` against ``expected``; ``per_token``: axis 0 is the token row.

    ``rows``: the token rows the two arrays hold (both sides already cut to the rows they share),
    when that is not every row of the step; reported positions are then token rows.
    """
    if rows is not None and not per_token:
        raise ParityError("rows apply to per-token stages only; a state slot has no token axis")
    raw_a, raw_b = as_record(actual), as_record(expected)
    if rows is not None:
        rows = tuple(int(r) for r in rows)
        if raw_b.ndim == 0 or len(rows) != raw_b.shape[0]:
            raise ParityError(f"{len(rows)} token rows named for an expected array of shape {tuple(raw_b.shape)}")
    if (raw_a.shape == raw_b.shape and raw_b.size > _CHUNK_ELEMENTS
            and raw_a.dtype.kind in "fiub" and raw_b.dtype.kind in "fiub"
            and _all_finite(raw_a) and _all_finite(raw_b)):
        # Large and finite everywhere (every logits record of a healthy long prompt): the same
        # numbers, block by block. Non-finite records keep the whole-array path below; they are
        # rare and their findings need the positions of every non-finite value.
        out = _compare_finite_blocks(raw_a, raw_b, tolerance=tolerance, per_token=per_token)
        if per_token and rows is not None:
            out.rows = rows
            _to_token_rows(out)
        return out
    a = _as_float64(raw_a, side="actual")
    b = _as_float64(raw_b, side="expected")
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
            _set_rms_and_cosine(out, norm_d=norm_d, norm_a=norm_a, norm_b=norm_b, dot=lambda: np.dot(af, bf))
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


def _all_finite(arr: np.ndarray) -> bool:
    if arr.dtype.kind != "f":
        return True  # integers and booleans are finite
    flat = arr.reshape(-1)
    return all(bool(np.isfinite(flat[s : s + _CHUNK_ELEMENTS]).all()) for s in range(0, flat.size, _CHUNK_ELEMENTS))


def _blocks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(start, a, b, |a-b|, |b|) in float64, one block of the flat records at a time."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    for start in range(0, fb.size, _CHUNK_ELEMENTS):
        af = fa[start : start + _CHUNK_ELEMENTS].astype(np.float64)
        bf = fb[start : start + _CHUNK_ELEMENTS].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            yield start, af, bf, np.abs(af - bf), np.abs(bf)


def _any_mismatch(a: np.ndarray, b: np.ndarray, *, rtol: float, atol: float) -> bool:
    return any(_mismatches(d, ab, rtol=rtol, atol=atol).any() for _, _, _, d, ab in _blocks(a, b))


def _compare_finite_blocks(a: np.ndarray, b: np.ndarray, *, tolerance: Tolerance, per_token: bool) -> RecordMetrics:
    """``compare_arrays`` of two same-shape, non-empty, all-finite records, one block at a time.

    Every figure is the whole-array one: maxima, counts and first positions are exact (a block's
    first maximum replaces the best so far only when strictly larger, as argmax keeps the first);
    the norms and the dot product are sums of per-block sums, equal up to float64 summation order.
    """
    shape = tuple(b.shape)
    rtol = tolerance.rtol
    abs_max = max(float(np.max(np.abs(fb))) for fb in (
        b.reshape(-1)[s : s + _CHUNK_ELEMENTS].astype(np.float64) for s in range(0, b.size, _CHUNK_ELEMENTS)))
    atol = tolerance.atol + tolerance.scale * abs_max
    count, first_flat = 0, None
    best, best_k, worst_a, worst_b = -1.0, 0, 0.0, 0.0
    max_rel = 0.0
    sq_d = sq_a = sq_b = dot = 0.0
    min_atol_cand = 0.0
    zero_b_exceeds, any_nonzero, min_rtol_cand = False, False, 0.0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for start, af, bf, diff, abs_b in _blocks(a, b):
            mism = _mismatches(diff, abs_b, rtol=rtol, atol=atol)
            n = int(np.count_nonzero(mism))
            if n and first_flat is None:
                first_flat = start + int(np.argmax(mism))
            count += n
            k = int(np.argmax(diff))
            if diff[k] > best:
                best, best_k, worst_a, worst_b = float(diff[k]), start + k, float(af[k]), float(bf[k])
            safe_b = np.where(abs_b > 0, abs_b, 1.0)
            rel = np.where(abs_b > 0, diff / safe_b, np.where(diff > 0, math.inf, 0.0))
            max_rel = max(max_rel, float(np.max(rel)))
            sq_d += float(np.dot(diff, diff))
            sq_a += float(np.dot(af, af))
            sq_b += float(np.dot(bf, bf))
            dot += float(np.dot(af, bf))
            min_atol_cand = max(min_atol_cand, float(np.max(diff - rtol * abs_b)))
            zero_b = abs_b == 0
            zero_b_exceeds |= bool(np.any(diff[zero_b] > atol))
            nonzero = ~zero_b
            if nonzero.any():
                any_nonzero = True
                min_rtol_cand = max(min_rtol_cand, float(np.max((diff[nonzero] - atol) / abs_b[nonzero])))
        norm_d, norm_a, norm_b = math.sqrt(sq_d), math.sqrt(sq_a), math.sqrt(sq_b)
        out = RecordMetrics(
            passed=count == 0,
            reason="tolerance" if count else None,
            tolerance=tolerance,
            shape=shape,
            actual_shape=shape,
            numel=int(b.size),
            effective_atol=atol,
            mismatch_count=count,
            mismatch_pct=100.0 * count / b.size,
            max_abs=best,
            worst_index=_index(best_k, shape),
            worst_actual=worst_a,
            worst_expected=worst_b,
            max_rel=max_rel,
        )
        _set_rms_and_cosine(out, norm_d=norm_d, norm_a=norm_a, norm_b=norm_b, dot=lambda: dot)
        # The minimum tolerances: the same candidates and ulp nudges as _min_atol / _min_rtol,
        # each nudge checked against every block.
        cand = max(min_atol_cand, 0.0)
        for _ in range(_MAX_NUDGES):
            if not _any_mismatch(a, b, rtol=rtol, atol=cand):
                break
            cand = float(np.nextafter(cand, math.inf))
        out.min_atol = cand
        if zero_b_exceeds:
            out.min_rtol = math.inf
        elif not any_nonzero:
            out.min_rtol = 0.0
        else:
            cand = max(min_rtol_cand, 0.0)
            for _ in range(_MAX_NUDGES):
                if not _any_mismatch(a, b, rtol=cand, atol=atol):
                    break
                cand = float(np.nextafter(cand, math.inf))
            out.min_rtol = cand
    if per_token:
        out.first_row = None if first_flat is None else first_flat // (b.size // shape[0])
    return out
