"""The run's verdict: error a stage *adds* versus drift it *inherits*.

A propagated comparison (each backend on its own outputs) measures both at once: what a stage
computes wrong, and what it was handed. Every correct fp32 implementation rounds differently
(serial TIR sums, blocked BLAS, the official package's own kernels), and a deep network amplifies
those differences layer after layer, so past a few layers the per-stage tolerance — calibrated
on what one stage may add — is crossed by inherited drift alone (the false alarms of issue 9:
1.14x at 0.4B, 1.62x at 1.5B, 1.17x at decode step 44 of the 4-layer fixture).

So a verdict has two inputs:
  - **own error**: a comparison in which nothing propagates — the replay (the reference re-runs
    each layer on the candidate's own recorded inputs; parity/dumpers/replay.py) or isolated
    mode (the compiled layer runs on the reference's inputs). A stage out of tolerance there adds
    the error itself: a porting bug, named at (step, layer, stage, row).
  - **drift**: the propagated comparison, each record as a *ratio* — the smallest atol that would
    pass it over the atol it was allowed. Within the dtype's envelope it is what correct
    implementations show at depth: a pass, with the numbers. Beyond the envelope with no stage at
    fault, it is an accuracy finding of its own (verdict "drift beyond envelope"), not a location.

Pure Python over the comparison dicts of ``RunComparison.to_dict()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parity.compare.metrics import json_safe
from parity.compare.tolerance import canonical_dtype

VERDICT_PASS = "no divergence"
VERDICT_ADDED = "divergence"
VERDICT_DRIFT = "drift beyond envelope"


@dataclass(frozen=True)
class DriftEnvelope:
    """How far correct implementations of one dtype drift apart, by depth and by decode step.

    Depth: each layer adds its own rounding and amplifies what it was handed; between correct
    fp32 backends the worst ratio grows roughly linearly in the layer index (0.4B, random:64, any
    stage: 0.12 at layer 0, ~1 at layer 7, ~4 at layer 13, 11.9 at layer 19; carried stages 4.3 at
    layer 23). Steps: the recurrent state carries each step's rounding into the next, and the
    drift of the state grows like a random walk, with the square root of the step count (demo
    fixture, carried stages, in allowances per unit of depth: 0.19 after 64 decode steps, 0.79
    after 1000; sqrt(1000/64) = 4.0). So at depth d (layer d; emb is depth 0, ln_out and logits one
    past the last layer) and step s the envelope is ``per_layer * (d + 1) * sqrt(1 + s / STEP_SCALE)``
    allowances.
    """

    per_layer: float  # allowances of propagated error per unit of depth, at the prefill
    reason: str  # the measurement behind it (benchmarks/calibrate_verdict.py reproduces it)

    def at(self, depth: int, step: int = 0) -> float:
        return self.per_layer * (depth + 1) * math.sqrt(1 + max(step, 0) / STEP_SCALE)


STEP_SCALE = 64  # decode steps over which the state's drift doubles its variance (see DriftEnvelope)


# Measured with benchmarks/calibrate_verdict.py (its output, with date and commit, is committed in
# benchmarks/results/); see the reason strings for the figures.
DRIFT_ENVELOPES: dict[str, DriftEnvelope] = {
    "float64": DriftEnvelope(per_layer=8.0, reason="as fp32: no fp64 port measured"),
    "float32": DriftEnvelope(
        per_layer=8.0,
        reason="carried stages of correct fp32 pairs (reference vs tvm, chatrwkv and the numpy plug-in, and the "
        "fp32 reference vs float64), benchmarks/calibrate_verdict.py: every bundled fixture, ones:10 and random:16 "
        "with 64 decode steps, at most 0.19 allowances per unit of depth; the demo fixture after 1000 decode steps "
        "0.79 (0.19 once scaled by sqrt(1 + steps/64)); 0.4B (L24 C1024) random:16 + 64 steps: reference vs tvm "
        "0.21, fp32 reference vs float64 2.61 (a deep random-init network amplifies any rounding difference; a "
        "correct CUDA build's logits were 19x further from torch than llvm's). 8.0 is 3x the worst measured; a "
        "state that leaks 1e-4 a step leaves it within 120 steps",
    ),
    "float16": DriftEnvelope(
        per_layer=24.0,
        reason="correct fp16 backends (reference, TVM, the official package's cpu fp16) against the fp32 reference, "
        "benchmarks/calibrate_precision.py, every bundled fixture, ones:10 and random:16:3 + 32 decode steps: at most "
        "7.0 allowances (fp16 scale 1e-2) per unit of depth (rwkv5_2-L4-C128-H2, random:16:3); 24 is 3.4x that",
    ),
    "bfloat16": DriftEnvelope(
        per_layer=8.0,
        reason="correct bf16 backends against the fp32 reference: at most 0.42 allowances (bf16 scale 1.0) per unit of "
        "depth, benchmarks/calibrate_precision.py; 8.0 as fp32, 19x that",
    ),
}


def envelope_for(dtype: str) -> DriftEnvelope:
    return DRIFT_ENVELOPES[canonical_dtype(dtype)]


def record_ratio(record: dict) -> float:
    """How many allowances a record's error spends: min_atol / atol (inf when non-finite or shapes differ)."""
    min_atol, atol = record.get("min_atol"), record.get("atol")
    if record.get("reason") in ("nonfinite", "shape") or not isinstance(min_atol, (int, float)):
        return math.inf
    if not isinstance(atol, (int, float)) or atol <= 0:
        return math.inf if min_atol > 0 else 0.0
    return float(min_atol) / float(atol)


def _worst(records: list[dict]) -> dict | None:
    return max(records, key=record_ratio) if records else None


def record_depth(record: dict, *, n_layer: int) -> int:
    """emb is depth 0, layer l's stages and state depth l, ln_out and logits depth n_layer."""
    if record.get("layer") is not None:
        return int(record["layer"])
    return 0 if record.get("stage") == "emb" else n_layer


def is_carried(stage: str) -> bool:
    """Stages that carry the network's trajectory from layer to layer and step to step: the
    residual stream, the head's output and the recurrent state.

    Drift is measured on these alone. Inner stages are judged by their own (replayed) error; their
    propagated error can be amplified locally without the trajectory drifting — GroupNorm
    renormalises each head by its own spread, so in a head whose wkv nearly cancels a 1e-6
    relative input difference becomes 1e-3 of ln_x (measured: 0.4B, reference vs TVM on llvm,
    random:64: att.out 11.9x its allowance where x_out is 4.3x, logits 5.6x; on CUDA ln_x 425x).
    """
    return stage.startswith("state.") or stage in ("ln_out", "logits") or stage.endswith((".x_out", ".x_after_att"))


# How far past the run's own rounding floor (parity/dumpers/floor.py) correct backends drift: the
# envelope is at least FLOOR_MULTIPLE times the floor at that depth and step. Measured with
# benchmarks/calibrate_verdict.py --floor (figures in benchmarks/results/calibrate_floor*.md).
FLOOR_MULTIPLE = 16.0
FLOOR_REASON = (
    "16x the run's rounding floor (the reference re-run with every carried value moved by up to one unit "
    "in the last place after every layer; its drift, running maximum over depth and steps). Correct fp32 "
    "backends, benchmarks/calibrate_floor.py: TVM at 1.5B (L24 C2048) on random:64 drifted 868 allowances "
    "at the prefill's logits where the floor was 420 (2.07x; at most 2.15x anywhere), 0.1B random:64 at most "
    "5.5x (at layer 0, both far under one allowance), the demo fixture 2.26x; 16 is ~3x the worst")


class RoundingFloor:
    """The floor's drift as a running maximum: at (depth d, step s), the worst floor ratio of any
    carried record at depth <= d and step <= s. Smoothed so because one perturbed run is one draw:
    a record of it may land near zero where a correct port's record, another draw, does not."""

    def __init__(self, floor_comparison: dict):
        records = [r for r in floor_comparison.get("records", []) if is_carried(r["stage"])]
        n_layer = 1 + max((r["layer"] for r in records if r.get("layer") is not None), default=-1)
        self.n_layer = n_layer
        steps = 1 + max((r.get("step") or 0 for r in records), default=0)
        grid = [[0.0] * (n_layer + 1) for _ in range(steps)]
        for r in records:
            ratio = record_ratio(r)
            if math.isfinite(ratio):
                s, d = r.get("step") or 0, record_depth(r, n_layer=n_layer)
                grid[s][d] = max(grid[s][d], ratio)
        for s in range(steps):
            for d in range(n_layer + 1):
                grid[s][d] = max(grid[s][d], grid[s][d - 1] if d else 0.0, grid[s - 1][d] if s else 0.0)
        self.grid = grid

    def at(self, depth: int, step: int) -> float:
        if not self.grid:
            return 0.0
        row = self.grid[min(max(step, 0), len(self.grid) - 1)]
        return row[min(max(depth, 0), len(row) - 1)]


def drift_summary(propagated: dict, *, dtype: str, floor: RoundingFloor | None = None) -> dict:
    """Propagated error of the carried stages as ratios: worst, per layer (the growth curve), and
    against the envelope — the dtype's fixed envelope, raised to FLOOR_MULTIPLE times the run's
    rounding floor where one was measured (a model that amplifies last-bit differences)."""
    env = envelope_for(dtype)
    records = [r for r in propagated.get("records", []) if is_carried(r["stage"])]
    n_layer = 1 + max((r["layer"] for r in records if r.get("layer") is not None), default=-1)

    def envelope(depth: int, step: int) -> float:
        fixed = env.at(depth, step)
        return fixed if floor is None else max(fixed, FLOOR_MULTIPLE * floor.at(depth, step))

    by_layer: dict[int, float] = {}
    worst, worst_ratio, worst_fraction, over = None, 0.0, 0.0, None
    for r in records:
        ratio = record_ratio(r)
        depth = record_depth(r, n_layer=n_layer)
        if r.get("layer") is not None:
            by_layer[depth] = max(by_layer.get(depth, 0.0), ratio)
        fraction = ratio / envelope(depth, r.get("step") or 0)
        if fraction > worst_fraction or worst is None:
            worst, worst_ratio, worst_fraction = r, ratio, fraction
        if over is None and fraction > 1.0:
            over = r  # records come in execution order: this is the first to leave the envelope
    status = "none" if max((record_ratio(r) for r in records), default=0.0) <= 1.0 else (
        "within" if worst_fraction <= 1.0 else "beyond")
    depth = record_depth(worst, n_layer=n_layer) if worst else 0
    step = (worst.get("step") or 0) if worst else 0
    return json_safe({
        "status": status,
        "worst_ratio": worst_ratio,  # of the record closest to (or furthest past) its envelope
        "worst_stage": worst["stage"] if worst else None,
        "worst_step": worst["step"] if worst else None,
        "envelope": envelope(depth, step),  # at that record's depth and step
        "envelope_fraction": worst_fraction,
        "envelope_per_layer": env.per_layer,
        "envelope_reason": env.reason if floor is None else f"{env.reason}; raised to {FLOOR_REASON}",
        # Where the run's rounding floor was measured: its ratio at the worst record (None: not measured).
        "floor": None if floor is None else floor.at(depth, step),
        "by_layer": [{"layer": k, "ratio": by_layer[k], "envelope": envelope(k, 0)} for k in sorted(by_layer)],
        "first_over_tolerance": propagated.get("first_divergence"),
        "first_beyond_envelope": None if over is None else {
            k: over.get(k) for k in ("step", "step_kind", "stage", "layer", "row", "max_abs", "min_atol", "atol")},
        "failed": propagated.get("summary", {}).get("failed", 0),
    })


def own_error_summary(own: dict, *, method: str, not_replayable: list[dict] | None = None) -> dict:
    """The error each stage adds itself (a replay or isolated comparison), as ratios."""
    worst = _worst(own.get("records", []))
    return json_safe({
        "method": method,
        "verdict": own.get("verdict"),
        "worst_ratio": record_ratio(worst) if worst else 0.0,
        "worst_stage": worst["stage"] if worst else None,
        "worst_step": worst["step"] if worst else None,
        "first_divergence": own.get("first_divergence"),
        "records": own.get("summary", {}).get("records", 0),
        "failed": own.get("summary", {}).get("failed", 0),
        "not_replayable": not_replayable or [],
    })


def classify(*, drift: dict | None, own: list[dict]) -> tuple[str, dict | None]:
    """(verdict, first divergence) from a drift summary and the own-error summaries of the pair.

    An own error out of tolerance decides first: it names where a porting bug adds its error.
    Otherwise propagated error within the envelope passes, and beyond it is a finding of its own.
    """
    for o in own:
        if o.get("first_divergence") is not None:
            return VERDICT_ADDED, {**o["first_divergence"], "judged_by": o["method"]}
    if drift is not None and drift["status"] == "beyond":
        fd = drift["first_over_tolerance"] or {}
        return VERDICT_DRIFT, {**fd, "judged_by": "drift envelope", "envelope_fraction": drift["envelope_fraction"]}
    return VERDICT_PASS, None
