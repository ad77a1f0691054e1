"""The diff engine: arrays and a tolerance policy in, result objects out.

Pure numerics: numpy only, no file I/O, no printing, and never torch or tvm (a test enforces it),
so reports and the CLI can re-judge saved dumps on a machine with neither installed.
"""

from parity.compare.divergence import (
    ROWS_PREFIX,
    MemoryRun,
    MissingStage,
    NotComparable,
    RunComparison,
    RunView,
    StageRecord,
    StepInfo,
    UnmatchedStep,
    compare_runs,
    declared_rows,
)
from parity.compare.arbiter import ArbiterResult, arbitrate_runs
from parity.compare.metrics import RecordMetrics, compare_arrays, json_safe
from parity.compare.tolerance import (
    DEFAULT_TOLERANCES,
    Tolerance,
    TolerancePolicy,
    canonical_dtype,
    parse_override,
)

__all__ = [
    "ArbiterResult",
    "DEFAULT_TOLERANCES",
    "arbitrate_runs",
    "MemoryRun",
    "MissingStage",
    "NotComparable",
    "ROWS_PREFIX",
    "RecordMetrics",
    "RunComparison",
    "RunView",
    "StageRecord",
    "StepInfo",
    "Tolerance",
    "TolerancePolicy",
    "UnmatchedStep",
    "canonical_dtype",
    "compare_arrays",
    "compare_runs",
    "declared_rows",
    "json_safe",
    "parse_override",
]
