"""Comparison results as a pandas DataFrame: one row per (step, stage) record, for notebooks and CSV.

    >>> df = load_results("reports/demo.json")
    >>> df[~df.passed].sort_values("tol_ratio", ascending=False).head()

The saved JSON keeps inf/nan as strings (strict JSON); here they become floats again, so metric
columns are numeric and sortable. pandas is imported only when a frame is built: ``parity report``
reads results through ``load_result_dict`` without paying for it, and ``parity.compare`` must stay
importable with numpy alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from parity.errors import ParityError
from parity.report.markdown import tolerance_ratio

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["load_result", "load_result_dict", "load_results", "records_to_csv", "RESULT_FILE_NAME"]

# The name a directory's result is looked for under: `load_results(dir)` reads dir/result.json.
RESULT_FILE_NAME = "result.json"

# Columns first in this order; any field the engine adds later follows, so nothing is dropped.
_LEADING = [
    "step", "step_kind", "stage", "layer", "row", "passed", "reason", "shape", "actual_shape",
    "max_abs", "max_rel", "rms_rel", "cosine", "mismatch_count", "numel", "mismatch_pct",
    "worst_index", "worst_actual", "worst_expected", "min_atol", "min_rtol", "rtol", "atol",
    "atol_base", "scale", "tol_ratio", "tolerance_reason",
]
_FLOAT_COLUMNS = [
    "max_abs", "max_rel", "rms_rel", "cosine", "mismatch_pct", "worst_actual", "worst_expected",
    "min_atol", "min_rtol", "rtol", "atol", "atol_base", "scale", "tol_ratio",
]
_INT_COLUMNS = ["step", "layer", "row", "mismatch_count", "numel", "nonfinite_count_actual", "nonfinite_count_expected"]
_TUPLE_COLUMNS = ["shape", "actual_shape", "worst_index", "first_nonfinite_index"]


def load_result_dict(source: Any) -> dict:
    """The result dict from a dict, a RunComparison, a result .json, or a directory holding result.json."""
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict") and callable(source.to_dict):  # a RunComparison
        result = source.to_dict()
        if isinstance(result, dict):
            return result
    if not isinstance(source, (str, os.PathLike)):
        raise ParityError(
            f"cannot read a comparison result from a {type(source).__name__}; "
            "pass a dict, a result .json path, or a directory holding result.json"
        )
    path = Path(source)
    if path.is_dir():
        if not (path / RESULT_FILE_NAME).is_file():
            raise ParityError(f"{path} is a directory without {RESULT_FILE_NAME}; pass the result .json itself")
        path = path / RESULT_FILE_NAME
    if not path.is_file():
        raise ParityError(f"no result file at {path}; write one with `parity run --json PATH` or `parity diff --json PATH`")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ParityError(f"{path} is not valid JSON ({e}); is it a `parity --json` result?") from None
    except OSError as e:
        raise ParityError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(result, dict) or not isinstance(result.get("records"), list):
        raise ParityError(f"{path} is not a comparison result (no records list); is it a `parity --json` result?")
    if "format" in result:  # a run's result (format 2 on): refuse a newer format in one line
        from parity.results import RunResult

        try:
            RunResult.from_dict(result)
        except ParityError as e:
            raise ParityError(f"{path}: {e}") from None
    return result


def load_result(source: Any):
    """The typed result (``parity.results.RunResult``) from a result .json, a directory holding
    result.json, a result dict, or a ``RunResult`` (returned as it is). What the console reads;
    ``load_results`` gives the records as a DataFrame instead."""
    from parity.results import RunResult

    if isinstance(source, RunResult):
        return source
    return RunResult.from_dict(load_result_dict(source))


def load_results(path_or_dict: Any) -> pd.DataFrame:
    """One row per compared (step, stage) record, in execution order.

    Columns: the record's fields (metrics, tolerance, ``row`` = first token row with a finding),
    ``tol_ratio`` (min_atol / atol: > 1 fails), and ``backend_actual`` / ``backend_expected``.
    Integer columns that can be absent (layer, row) use pandas' nullable Int64.
    """
    import pandas as pd

    result = load_result_dict(path_or_dict)
    records = result.get("records") or []
    if not isinstance(records, list):
        raise ParityError(f"result['records'] must be a list, got {type(records).__name__}")
    records = [r for r in records if isinstance(r, dict)]

    frame = pd.DataFrame.from_records(records)
    frame["tol_ratio"] = [tolerance_ratio(r) for r in records]
    actual = result.get("actual") if isinstance(result.get("actual"), dict) else {}
    expected = result.get("expected") if isinstance(result.get("expected"), dict) else {}
    frame["backend_actual"] = actual.get("backend")
    frame["backend_expected"] = expected.get("backend")

    for col in _LEADING:
        if col not in frame.columns:
            frame[col] = None
    for col in _FLOAT_COLUMNS:
        frame[col] = pd.to_numeric(frame[col].map(_as_float), errors="coerce").astype("float64")
    for col in _INT_COLUMNS:
        if col in frame.columns:
            frame[col] = pd.array([_as_int(v) for v in frame[col]], dtype="Int64")
    for col in _TUPLE_COLUMNS:
        if col in frame.columns:
            # Tuples, not lists: hashable, so a column can be grouped or deduplicated.
            frame[col] = [tuple(v) if isinstance(v, list) else v for v in frame[col]]
    # Older results may lack "passed"; a record without a failure reason passed.
    frame["passed"] = pd.Series([bool(r["passed"]) if "passed" in r else r.get("reason") is None for r in records],
                                dtype=bool, index=frame.index)

    ordered = _LEADING + ["backend_actual", "backend_expected"]
    rest = [c for c in frame.columns if c not in ordered]
    return frame[ordered + rest].reset_index(drop=True)


def records_to_csv(result: Any, path: str | os.PathLike | IO[str]) -> Path | None:
    """Write ``load_results(result)`` as CSV to ``path`` (``-`` or an open text file: written there).

    Returns the path written, or None when written to a stream.
    """
    frame = load_results(result)
    if path == "-":
        path = sys.stdout
    if hasattr(path, "write"):
        frame.to_csv(path, index=False)
        return None
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(target, index=False)
    except OSError as e:
        raise ParityError(f"cannot write CSV to {target}: {e.strerror or e}") from None
    return target


def _as_float(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return np.nan
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "inf", "-inf", "nan" as the engine writes them
        except ValueError:
            return np.nan
    return np.nan


def _as_int(value: Any) -> int | None:
    # None becomes pandas' NA in the Int64 array.
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None
