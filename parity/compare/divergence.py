"""Line two runs up step by step and stage by stage, and find the first divergence.

"First" is in execution order: steps in index order, stages in the expected run's stage order.
A later step's early stage failing never outranks an earlier step, because a wrong state written
by step k is only visible from step k+1 on (the dropped-transpose bug of docs/RWKV.md §2: prefill
logits exact, the next decode wrong), and the earliest failing record is where to start looking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol, runtime_checkable

import numpy as np

from parity.compare.endtoend import RowMetrics, logit_rows, summarize
from parity.compare.metrics import RecordMetrics, compare_arrays, json_safe
from parity.compare.tolerance import TolerancePolicy
from parity.errors import ParityError
from parity.stages import stage_info


@dataclass(frozen=True)
class StepInfo:
    index: int  # 0 is the prefill, 1..n the decode steps
    kind: str  # "prefill" or "decode"
    ids: list[int]  # token ids fed in this step (T for prefill, 1 for decode)

    def to_dict(self) -> dict:
        return {"index": self.index, "kind": self.kind, "ids": [int(i) for i in self.ids]}


@runtime_checkable
class RunView(Protocol):
    """One recorded run, read a step at a time so a long run never has to fit in memory."""

    steps: list[StepInfo]
    stage_order: list[str]
    dtype: str

    def read_step(self, index: int) -> Mapping[str, np.ndarray]: ...

    def describe(self) -> dict: ...


@dataclass
class MemoryRun:
    """A RunView over arrays already in memory (tests, and callers that ran a backend in-process)."""

    steps: list[StepInfo]
    stage_order: list[str]
    dtype: str
    arrays: dict[int, dict[str, np.ndarray]]  # step index -> stage -> array
    description: dict = field(default_factory=dict)

    def read_step(self, index: int) -> Mapping[str, np.ndarray]:
        if index not in self.arrays:
            raise ParityError(f"this run has no arrays for step {index}; it has steps {sorted(self.arrays)}")
        return self.arrays[index]

    def describe(self) -> dict:
        return {"backend": "memory", "dtype": self.dtype, **self.description}


@dataclass(frozen=True)
class StageRecord:
    step: int
    step_kind: str
    stage: str
    layer: int | None
    metrics: RecordMetrics

    @property
    def passed(self) -> bool:
        return self.metrics.passed

    def to_dict(self) -> dict:
        m = self.metrics.to_dict()
        m["row"] = m.pop("first_row")
        head = {"step": self.step, "step_kind": self.step_kind, "stage": self.stage, "layer": self.layer}
        return {**head, **m}


@dataclass(frozen=True)
class MissingStage:
    step: int
    stage: str
    missing_in: str  # "actual" or "expected"


@dataclass(frozen=True)
class UnmatchedStep:
    index: int
    kind: str
    present_in: str  # the side that has the step: "actual" or "expected"


@dataclass(frozen=True)
class NotComparable:
    """A per-token stage both runs recorded, but for token rows the other side does not have
    (e.g. one port keeps only the last prefill row, another only rows 0..T-2): nothing to judge,
    so neither a pass nor a divergence."""

    step: int
    stage: str
    actual_rows: list[int]
    expected_rows: list[int]

    def to_dict(self) -> dict:
        return {"step": self.step, "stage": self.stage, "actual_rows": self.actual_rows,
                "expected_rows": self.expected_rows}


# A run declares that its per-token stage X holds only some token rows of a step by recording,
# in the same step, ``rows.X``: a 1-D integer array of those rows' indices in the step (ascending,
# one per row of X). Without it X holds every row, 0..T-1.
ROWS_PREFIX = "rows."


def declared_rows(arrays: Mapping[str, np.ndarray], *, n_tokens: int, side: str, step: int) -> dict[str, list[int]]:
    """Stage -> the token rows it holds, for every stage of one step that declares its rows."""
    out: dict[str, list[int]] = {}
    # Names first, then only the rows.* records: ``arrays`` may read each value from disk when it
    # is looked up (format.StepArrays), and .items() read every stage of the step a second time.
    for name in arrays:
        if not name.startswith(ROWS_PREFIX):
            continue
        stage = name[len(ROWS_PREFIX):]
        rows = np.asarray(arrays[name])
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ParityError(f"the {side} run's {name} at step {step} must be a 1-D integer array of token rows")
        listed = [int(r) for r in rows]
        if listed != sorted(set(listed)) or any(not 0 <= r < n_tokens for r in listed):
            raise ParityError(
                f"the {side} run's {name} at step {step} must list distinct ascending token rows in [0, {n_tokens}), "
                f"got {listed}"
            )
        if stage not in arrays:
            raise ParityError(f"the {side} run declares {name} at step {step} without recording {stage}")
        if not stage_info(stage).per_token:
            raise ParityError(f"the {side} run declares {name} at step {step}, but a state slot has no token rows")
        held = np.asarray(arrays[stage]).shape
        if not held or held[0] != len(listed):
            raise ParityError(
                f"the {side} run's {stage} at step {step} has shape {list(held)} but {name} names {len(listed)} rows"
            )
        out[stage] = listed
    return out


@dataclass
class RunComparison:
    records: list[StageRecord]  # in execution order
    steps: list[StepInfo]  # the steps both runs have, in index order
    missing: list[MissingStage]
    unmatched_steps: list[UnmatchedStep]
    policy: TolerancePolicy
    expected_description: dict
    actual_description: dict
    # End-to-end metrics of the logits rows, per step (parity/compare/endtoend.py).
    logit_metrics: dict[int, RowMetrics] = field(default_factory=dict)
    # Stages both sides recorded with no token row in common: reported, never judged.
    not_comparable: list[NotComparable] = field(default_factory=list)

    @property
    def first_divergence(self) -> StageRecord | None:
        return next((r for r in self.records if not r.passed), None)

    @property
    def passed(self) -> bool:
        """No compared record fails. Missing stages and unmatched steps do not count: see complete."""
        return self.first_divergence is None

    @property
    def complete(self) -> bool:
        """Every step and stage of either run was compared."""
        return not self.missing and not self.unmatched_steps and not self.not_comparable

    @property
    def failed(self) -> list[StageRecord]:
        return [r for r in self.records if not r.passed]

    def worst(self, stage_pattern: str) -> float | None:
        """Largest max_abs over records whose stage matches ``stage_pattern``; None if none do.

        Non-finite positions are excluded from max_abs, so check first_divergence for NaN/Inf.
        """
        values = [
            r.metrics.max_abs
            for r in self.records
            if fnmatchcase(r.stage, stage_pattern) and r.metrics.max_abs is not None
        ]
        return max(values) if values else None

    def end_to_end(self) -> dict | None:
        """KL / top-1 / top-5 / cosine over every compared logits row, and per step; None without logits."""
        if not self.logit_metrics:
            return None
        every = RowMetrics()
        per_step = []
        for index in sorted(self.logit_metrics):
            rows = self.logit_metrics[index]
            every.extend(rows)
            s = summarize(rows)
            per_step.append({"step": index, "rows": s["rows"], "kl_max": s["kl_max"],
                             "top1_agreement": s["top1_agreement"], "top1_flips": s["top1_flips"]})
        # Every row's KL is kept so a corpus of runs can be aggregated into exact percentiles.
        return {**summarize(every), "per_step": per_step, "kl_rows": json_safe(every.kl)}

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {
            "verdict": "no divergence" if first is None else "divergence",
            "first_divergence": None if first is None else first.to_dict(),
            "expected": json_safe(self.expected_description),
            "actual": json_safe(self.actual_description),
            "policy": self.policy.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
            "records": [r.to_dict() for r in self.records],
            "missing": [{"step": m.step, "stage": m.stage, "missing_in": m.missing_in} for m in self.missing],
            "unmatched_steps": [
                {"index": u.index, "kind": u.kind, "present_in": u.present_in} for u in self.unmatched_steps
            ],
            "not_comparable": [n.to_dict() for n in self.not_comparable],
            "end_to_end": self.end_to_end(),
            "summary": {
                "records": len(self.records),
                "failed": len(self.failed),
                "worst_logits_max_abs": json_safe(self.worst("logits")),
            },
        }


def _steps_by_index(run: RunView, *, side: str) -> dict[int, StepInfo]:
    by_index: dict[int, StepInfo] = {}
    for step in run.steps:
        if step.index in by_index:
            raise ParityError(f"the {side} run lists step {step.index} twice; its dump is malformed")
        by_index[step.index] = step
    return by_index


def _ordered_stages(order: list[str], *, actual: Mapping, expected: Mapping) -> list[str]:
    # rows.* declarations describe a stage; they are not stages themselves.
    present = {s for s in set(actual) | set(expected) if not s.startswith(ROWS_PREFIX)}
    known = set(order)
    # Stages outside the expected order (e.g. a backend's extra debug taps) go last, sorted, so
    # they never push a canonical stage out of execution order.
    return [s for s in order if s in present] + sorted(present - known)


def compare_runs(*, actual: RunView, expected: RunView, policy: TolerancePolicy) -> RunComparison:
    """Compare every stage of every step both runs share; see RunComparison for the result."""
    actual_steps = _steps_by_index(actual, side="actual")
    expected_steps = _steps_by_index(expected, side="expected")

    steps: list[StepInfo] = []
    unmatched: list[UnmatchedStep] = []
    for index in sorted(set(actual_steps) | set(expected_steps)):
        a, e = actual_steps.get(index), expected_steps.get(index)
        if a is None or e is None:
            side, only = ("expected", e) if a is None else ("actual", a)
            unmatched.append(UnmatchedStep(index=index, kind=only.kind, present_in=side))
            continue
        if a.kind != e.kind or [int(i) for i in a.ids] != [int(i) for i in e.ids]:
            raise ParityError(
                f"step {index} differs between the runs: expected {e.kind} ids {list(e.ids)}, "
                f"actual {a.kind} ids {list(a.ids)}; record both runs from the same prompt and decode ids"
            )
        steps.append(e)

    records: list[StageRecord] = []
    missing: list[MissingStage] = []
    not_comparable: list[NotComparable] = []
    logit_metrics: dict[int, RowMetrics] = {}
    for step in steps:
        # One step per side in memory at a time: a long decode run's dump can exceed RAM.
        expected_arrays = expected.read_step(step.index)
        actual_arrays = actual.read_step(step.index)
        n_tokens = len(step.ids)
        rows_a = declared_rows(actual_arrays, n_tokens=n_tokens, side="actual", step=step.index)
        rows_e = declared_rows(expected_arrays, n_tokens=n_tokens, side="expected", step=step.index)
        for stage in _ordered_stages(expected.stage_order, actual=actual_arrays, expected=expected_arrays):
            if stage not in actual_arrays:
                missing.append(MissingStage(step=step.index, stage=stage, missing_in="actual"))
                continue
            if stage not in expected_arrays:
                missing.append(MissingStage(step=step.index, stage=stage, missing_in="expected"))
                continue
            info = stage_info(stage)
            a_value, e_value, rows = _record(actual_arrays, stage), _record(expected_arrays, stage), None
            if stage in rows_a or stage in rows_e:
                # Compare the token rows both sides hold; the rows only one side has are not a divergence.
                have_a = rows_a.get(stage, list(range(n_tokens)))
                have_e = rows_e.get(stage, list(range(n_tokens)))
                rows = sorted(set(have_a) & set(have_e))
                undeclared = [np.asarray(v) for v, d in ((a_value, rows_a), (e_value, rows_e)) if stage not in d]
                if any(not v.ndim or v.shape[0] != n_tokens for v in undeclared):
                    rows = None  # a side without a declaration lacks rows: a shape finding, as ever
                elif not rows:
                    not_comparable.append(NotComparable(step=step.index, stage=stage, actual_rows=have_a, expected_rows=have_e))
                    continue
                else:
                    a_value = _take_rows(a_value, have=have_a, rows=rows)
                    e_value = _take_rows(e_value, have=have_e, rows=rows)
                    if rows == list(range(n_tokens)):
                        rows = None  # every row after all: nothing to say
            metrics = compare_arrays(
                a_value,
                e_value,
                tolerance=policy.for_stage(stage),
                per_token=info.per_token,
                rows=rows,
            )
            records.append(
                StageRecord(
                    step=step.index, step_kind=step.kind, stage=stage, layer=info.layer, metrics=metrics
                )
            )
            if stage == "logits" and metrics.reason != "shape" and np.ndim(e_value) >= 1:
                # A flip between two logits closer than the logits' own tolerance is a tie, not a miss.
                # Only the rows both sides hold (a port's last-token logits: that one row).
                tie = metrics.effective_atol if metrics.effective_atol is not None else policy.for_stage(stage).atol
                logit_metrics[step.index] = logit_rows(a_value, e_value, tie_atol=tie)
        del expected_arrays, actual_arrays

    return RunComparison(
        records=records,
        steps=steps,
        missing=missing,
        unmatched_steps=unmatched,
        policy=policy,
        expected_description=expected.describe(),
        actual_description=actual.describe(),
        logit_metrics=logit_metrics,
        not_comparable=not_comparable,
    )


def _record(arrays: Mapping[str, np.ndarray], stage: str):
    """One stage of a step: a large record of a dump as its step file's StoredArray (read a block at
    a time by the comparison: both sides' 512-token logits held whole were +0.5 GB), else the array."""
    stored = getattr(arrays, "stored", None)
    return stored(stage) if stored is not None else arrays[stage]


def _take_rows(value, *, have: list[int], rows: list[int]) -> np.ndarray:
    """The ``rows`` (token rows) of ``value``, whose leading axis holds the token rows ``have``."""
    arr = np.asarray(value)
    where = {r: i for i, r in enumerate(have)}
    return arr[[where[r] for r in rows]]
