"""The fp64 arbiter: judge a backend by how far it is from float64 *relative to* the fp32 reference.

A fixed tolerance cannot know that some stages are ill-conditioned (a GroupNorm over a head with
tiny variance, a long wkv sum that cancels): there every correct fp32 implementation is "far" from
every other. Against a float64 run of the same model, the fp32 reference's own error measures how
hard the stage is. The rule, as torch dynamo's accuracy checker has it (``torch._dynamo.utils.same``
with an fp64 reference): a record passes when

    rms(actual - arbiter) <= multiplier * rms(reference - arbiter) + floor

with ``floor`` a tenth of the dtype's atol (1e-6 in fp32), so that stages where the fp32
reference happens to be exact (emb, a copy) are not held to zero error. Each record also reports the
``min_multiplier`` that would pass. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from parity.compare.divergence import RunView, declared_rows
from parity.compare.metrics import json_safe
from parity.compare.tolerance import TolerancePolicy
from parity.errors import ParityError
from parity.stages import stage_info

# Measured (benchmarks/calibrate_verdict.py, "arbiter" column): correct fp32 backends need up to
# 15.4 on the bundled fixtures with 64 decode steps (the numpy plug-in on the H = N fixture; TVM
# 11.5 on 5.1) and 19 at 0.4B (issue 9), where 10 — calibrated on 4 decode steps, 5.4 — failed a
# correct TVM build. The zoo's mildest mutants need 1.3e3 (eps 1e-5) and 2.1e3 (fp16 accumulator).
# 100 is 5x the worst correct figure and 13x under the mildest bug.
DEFAULT_MULTIPLIER = 100.0
FLOOR_FRACTION = 0.1  # dynamo's tol / 10


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


@dataclass
class ArbiterRecord:
    step: int
    stage: str
    layer: int | None
    actual_error: float  # rms(actual - arbiter)
    reference_error: float  # rms(reference - arbiter)
    floor: float
    multiplier: float
    passed: bool
    min_multiplier: float  # the smallest multiplier that would pass (given the floor)
    nonfinite: bool = False

    def to_dict(self) -> dict:
        return json_safe(dict(vars(self)))


@dataclass
class ArbiterResult:
    multiplier: float
    records: list[ArbiterRecord] = field(default_factory=list)

    @property
    def first_divergence(self) -> ArbiterRecord | None:
        return next((r for r in self.records if not r.passed), None)

    def to_dict(self) -> dict:
        fd = self.first_divergence
        return {
            "multiplier": self.multiplier,
            "floor_fraction": FLOOR_FRACTION,
            "rule": "rms(actual - fp64) <= multiplier * rms(reference - fp64) + floor_fraction * atol",
            "verdict": "no divergence" if fd is None else "divergence",
            "first_divergence": None if fd is None else fd.to_dict(),
            "records": [r.to_dict() for r in self.records],
        }


def arbitrate_runs(
    *, actual: RunView, reference: RunView, arbiter: RunView, policy: TolerancePolicy,
    multiplier: float = DEFAULT_MULTIPLIER,
) -> ArbiterResult:
    """Judge ``actual`` against ``arbiter`` (float64), scaled by ``reference``'s own error."""
    if multiplier <= 0 or not math.isfinite(multiplier):
        raise ParityError(f"arbiter multiplier must be a positive number, got {multiplier}")
    out = ArbiterResult(multiplier=multiplier)
    ref_steps = {s.index: s for s in reference.steps}
    arb_steps = {s.index: s for s in arbiter.steps}
    for step in actual.steps:
        if step.index not in ref_steps or step.index not in arb_steps:
            continue
        a_arrays, r_arrays, x_arrays = actual.read_step(step.index), reference.read_step(step.index), arbiter.read_step(step.index)
        # A backend may hold only some token rows of a stage (e.g. last-token logits): judge those rows.
        held = declared_rows(a_arrays, n_tokens=len(step.ids), side="actual", step=step.index)
        for stage in arbiter.stage_order:
            if stage not in a_arrays or stage not in r_arrays or stage not in x_arrays:
                continue
            x = np.asarray(x_arrays[stage], dtype=np.float64)
            a = np.asarray(a_arrays[stage], dtype=np.float64)
            r = np.asarray(r_arrays[stage], dtype=np.float64)
            if stage in held:
                x, r = x[held[stage]], r[held[stage]]
            if a.shape != x.shape or r.shape != x.shape:
                raise ParityError(f"arbiter: {stage} at step {step.index} has shapes {a.shape} / {r.shape} / {x.shape}")
            tol = policy.for_stage(stage)
            finite = np.isfinite(x)
            floor = FLOOR_FRACTION * tol.atol
            with np.errstate(invalid="ignore", over="ignore"):
                a_err, r_err = _rms(a - x), _rms(r - x)
            nonfinite = not (np.isfinite(a).all() and np.isfinite(r).all() and finite.all())
            passed = (not nonfinite) and a_err <= multiplier * r_err + floor
            if r_err > 0:
                need = max((a_err - floor) / r_err, 0.0)
            else:
                need = 0.0 if a_err <= floor else math.inf
            out.records.append(ArbiterRecord(
                step=step.index, stage=stage, layer=stage_info(stage).layer, actual_error=a_err, reference_error=r_err,
                floor=floor, multiplier=multiplier, passed=passed, min_multiplier=need, nonfinite=nonfinite,
            ))
    return out
