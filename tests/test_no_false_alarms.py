"""No false alarms: two *correct* backends never diverge in fp32, whatever hypothesis draws.

The reference and the TVM debug build run the same drawn case step by step, in memory, and the
diff engine judges every stage of every step under the DEFAULT fp32 policy — never loosened here:
a failing example is a finding about the policy (or a backend), not something to tune away.

Three ways of judging, as a user's run does (parity/compare/verdict.py): "isolated" (the compiled
layers on the reference's inputs) and "replayed" (the reference's layers on the compiled run's
own inputs, parity/dumpers/replay.py) must show no stage out of tolerance at all; "propagated"
(each on its own outputs) must stay within the drift envelope of its depth — and, on the shallow
shapes the per-stage policy was calibrated on, within the per-stage tolerance itself. Deep (12
layers) and wide (C = 1024) shapes are drawn too: there, drift past the per-stage tolerance is
expected and is exactly what the envelope is for.

Compiling is the expensive part, so the compiled *shapes* are a small fixed set, each built once
per session; the compile cache key is the config alone, so weights (seed and decay profile),
prompts, decode ids and the capture mode are drawn freely per example over those few builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from parity.checkpoint import Checkpoint, ModelConfig
from parity.compare import MemoryRun, RunComparison, StepInfo, TolerancePolicy, compare_runs
from parity.compare.verdict import drift_summary
from parity.compiled.build import BuildArtifact, build_model
from parity.compiled.runtime import CompiledRWKV
from parity.dumpers.replay import spliced_values
from parity.reference import make_reference
from parity.stages import stage_order, state_slots
from parity.synthetic import DECAY_PROFILES, make_config, make_weights

# Few enough to compile in seconds, varied enough to cover every version, one and several layers,
# several heads, an odd vocabulary, and H = N (where an (H, N) / (N, H) mix-up keeps every shape).
SHAPES: dict[str, ModelConfig] = {
    "v5.2-L1-H2": make_config(version="5.2", n_layer=1, n_embd=64, head_size=32, vocab_size=64),
    "v5.2-L2-H4": make_config(version="5.2", n_layer=2, n_embd=64, head_size=16, vocab_size=97),
    "v5.2-L2-H8=N8": make_config(version="5.2", n_layer=2, n_embd=64, head_size=8, vocab_size=64),
    "v5.1-L2-H2": make_config(version="5.1", n_layer=2, n_embd=64, head_size=32, vocab_size=64),
    "v5.0-L2-H4": make_config(version="5.0", n_layer=2, n_embd=64, head_size=16, vocab_size=64),
    "v4-L2": make_config(version="4", n_layer=2, n_embd=64, vocab_size=64),
    # Deep and wide (issue 9): released models have 12-32 layers and C 768-4096.
    "v5.2-L12-H2": make_config(version="5.2", n_layer=12, n_embd=128, head_size=64, vocab_size=256),
    "v5.2-L2-C1024-H16": make_config(version="5.2", n_layer=2, n_embd=1024, head_size=64, vocab_size=256),
    "v4-L12": make_config(version="4", n_layer=12, n_embd=64, vocab_size=64),
}
# Where the per-stage tolerance itself must hold in propagated runs: the depth it was calibrated at.
SHALLOW = {name for name, cfg in SHAPES.items() if cfg.n_layer <= 2 and cfg.n_embd <= 256}
MODES = ("propagated", "isolated", "replayed")
MAX_PROMPT = 12
MAX_DECODE = 4

# The policy under test, exactly as users get it.
POLICY = TolerancePolicy.for_dtype("float32")

# Stage kind ("att.wkv", "state.att_kv", "logits") -> (worst min_atol / effective atol seen, case).
# Only bookkeeping: a script that runs this module in-process reads it for the headroom report.
WORST_RATIO: dict[str, tuple[float, str]] = {}


@dataclass(frozen=True)
class Case:
    shape: str
    seed: int
    decay_profile: str
    prompt: tuple[int, ...]
    decode: tuple[int, ...]
    mode: str
    dtype: str = "float32"  # what the compiled build (and, replayed, the reference) computes in

    @property
    def config(self) -> ModelConfig:
        return SHAPES[self.shape]

    def steps(self) -> list[StepInfo]:
        return [StepInfo(index=0, kind="prefill", ids=list(self.prompt))] + [
            StepInfo(index=i, kind="decode", ids=[t]) for i, t in enumerate(self.decode, start=1)
        ]


@st.composite
def cases(draw) -> Case:
    shape = draw(st.sampled_from(sorted(SHAPES)))
    cfg = SHAPES[shape]
    # T = H on its own: a prompt as long as the head count is where a (T, H) transpose hides.
    length = draw(st.integers(1, MAX_PROMPT) | st.just(cfg.n_head))
    token = st.integers(0, cfg.vocab_size - 1)
    return Case(
        shape=shape,
        seed=draw(st.integers(0, 2**31 - 1)),
        decay_profile=draw(st.sampled_from(sorted(DECAY_PROFILES))),
        prompt=tuple(draw(st.lists(token, min_size=length, max_size=length))),
        decode=tuple(draw(st.lists(token, max_size=MAX_DECODE))),
        mode=draw(st.sampled_from(MODES)),
    )


class Builds:
    """One debug build per shape, compiled on first use and shared by every example."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self._artifacts: dict[str, BuildArtifact] = {}

    def model(self, checkpoint: Checkpoint, *, shape: str, dtype: str = "float32") -> CompiledRWKV:
        if (shape, dtype) not in self._artifacts:
            self._artifacts[shape, dtype] = build_model(
                checkpoint.config, variant="debug", cache_dir=self.cache_dir, dtype=dtype
            )
        # Binding fresh weights to a cached build costs about a millisecond.
        return CompiledRWKV(checkpoint, variant="debug", artifact=self._artifacts[shape, dtype])


@pytest.fixture(scope="session")
def builds(compile_cache: Path) -> Builds:
    # The compile cache the other test modules use (tests/conftest.py: shared by every xdist
    # worker), so a shape they share is compiled once.
    return Builds(compile_cache)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Alternating with TVM's worker pool, torch's intra-op threads fight it for the cores: on 2
    # cores an example took 0.37 s with torch's default threads and 0.06 s with one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _numpy(value: torch.Tensor) -> np.ndarray:
    # Copy: a recorded tensor may be a view the reference later reuses.
    return value.detach().float().numpy().copy()


def run_case(case: Case, builds: Builds) -> tuple[MemoryRun, MemoryRun]:
    """(reference run, compiled run) of ``case``, every canonical stage of every step."""
    cfg = case.config
    weights = make_weights(cfg, seed=case.seed, decay_profile=case.decay_profile)
    checkpoint = Checkpoint(path=Path("<synthetic>"), sha256="synthetic", config=cfg, weights=weights)
    reference = make_reference(checkpoint)
    compiled = builds.model(checkpoint, shape=case.shape, dtype=case.dtype)
    steps = case.steps()
    ref_arrays: dict[int, dict[str, np.ndarray]] = {}
    tvm_arrays: dict[int, dict[str, np.ndarray]] = {}

    ref_state = None
    for step in steps:
        recorded: dict[str, np.ndarray] = {}

        def record(name: str, value: torch.Tensor, into=recorded) -> None:
            into[name] = _numpy(value)

        _, ref_state = reference.forward(step.ids, ref_state, record=record)
        ref_arrays[step.index] = recorded

    if case.mode in ("propagated", "replayed"):
        state = compiled.zero_state()
        for step in steps:
            out = compiled.forward(step.ids, state)
            state = out.state
            tvm_arrays[step.index] = {**out.taps, **compiled.state_to_canonical(state)}
        if case.mode == "replayed":
            # Replayed in the build's own dtype, as parity/dumpers/replay.py does from a dump.
            same = reference if case.dtype == "float32" else make_reference(checkpoint, dtype=case.dtype)
            ref_arrays = replay(same, tvm_arrays, steps=steps)
    else:
        # Teacher-forced, as parity.dumpers.isolated: every compiled piece starts from the
        # reference's input to it and the reference's state before the step.
        slots = state_slots(cfg.version.value)
        before = compiled.state_to_canonical(compiled.zero_state())
        for step in steps:
            ref = ref_arrays[step.index]
            arrays = {**compiled.iso_embed(step.ids), **compiled.iso_head(ref[f"L{cfg.n_layer - 1}.x_out"])}
            for layer in range(cfg.n_layer):
                x_in = ref["emb"] if layer == 0 else ref[f"L{layer - 1}.x_out"]
                taps, new_state = compiled.iso_layer(layer, x_in, {s: before[f"state.L{layer}.{s}"] for s in slots})
                arrays.update(taps)
                arrays.update(new_state)
            tvm_arrays[step.index] = arrays
            before = {name: ref[name] for name in before}

    order = stage_order(n_layer=cfg.n_layer, version=cfg.version.value)

    def memory_run(arrays, backend: str, dtype: str) -> MemoryRun:
        return MemoryRun(steps=steps, stage_order=order, dtype=dtype, arrays=arrays, description={"backend": backend})

    return memory_run(ref_arrays, "reference", "float32"), memory_run(tvm_arrays, f"tvm-{case.mode}", case.dtype)


def replay(reference, compiled_arrays: dict[int, dict[str, np.ndarray]], *, steps) -> dict[int, dict[str, np.ndarray]]:
    """The reference's layers on the compiled run's own recorded inputs and state, as
    parity/dumpers/replay.py does from a dump (here in memory)."""
    cfg = reference.config
    slots = state_slots(cfg.version.value)
    out: dict[int, dict[str, np.ndarray]] = {}
    before = None
    for step in steps:
        seen = compiled_arrays[step.index]
        recorded: dict[str, np.ndarray] = {}

        def record(name: str, value: torch.Tensor, into=recorded) -> None:
            into[name] = _numpy(value)

        with torch.no_grad():
            reference.embed(step.ids, record=record)
            zero = reference.zero_state().layers
            for layer in range(cfg.n_layer):
                x = reference.stream_in(layer, seen["emb" if layer == 0 else f"L{layer - 1}.x_out"])
                state = zero[layer] if before is None else reference.layer_state(
                    {s: before[f"state.L{layer}.{s}"] for s in slots})
                # As ReplayBackend does: the layer goes on from the compiled run's own r, k, v and wkv.
                _, new = reference.layer(layer, x, state, record=record, splice=spliced_values(seen, layer=layer))
                for s in slots:
                    record(f"state.L{layer}.{s}", getattr(new, s))
            reference.head(reference.head_in(seen[f"L{cfg.n_layer - 1}.x_out"]), record=record)
        out[step.index] = recorded
        before = seen
    return out


def stage_kind(stage: str) -> str:
    return re.sub(r"L\d+\.", "", stage)


def headroom(comparison: RunComparison) -> dict[str, float]:
    """Stage kind -> worst min_atol / effective atol over its records: > 1 would be a failure."""
    out: dict[str, float] = {}
    for record in comparison.records:
        m = record.metrics
        ratio = m.min_atol / m.effective_atol
        kind = stage_kind(record.stage)
        out[kind] = max(out.get(kind, 0.0), ratio)
    return out


def describe_failure(case: Case, comparison: RunComparison) -> str:
    first = comparison.first_divergence
    m = first.metrics
    return (
        f"false alarm on {case.config.describe()} ({case}): step {first.step} ({first.step_kind}) "
        f"stage {first.stage}: {m.message()}; min_atol {m.min_atol:.3g} vs atol {m.effective_atol:.3g}, "
        f"max_rel {m.max_rel:.3g}, rms_rel {m.rms_rel:.3g}"
    )


# Former false alarms of the fp32 policy (scale 2e-4 everywhere), found by a targeted search (hypothesis.target on
# min_atol / atol, ~4500 examples); random draws hit one about once in 5000. Both backends are
# correct: run isolated, the same cases stay under 0.13 of the allowance everywhere. The cause is
# GroupNorm (ln_x) renormalising each head on its own: a head whose wkv nearly cancels (std 0.018
# beside a head of std 0.45; or 0.089 beside 82) carries an absolute error sized by the *other*
# heads, which the wkv record's floor (2e-4 * max|wkv|) rightly allows, and ln_x then divides it
# by that head's small std. The ~1e-6 relative error a propagated run brings into the layer so
# becomes ~1e-4 of ln_x, above its floor of 2e-4 * max|ln_x|. Against float64 the fp32 reference
# errs too (7e-5 and 1.6e-4 on ln_x here; on a v5.1 att.gated, 3.6e-4: twice the allowance).
# They led to the built-in ln_x / att.gated tolerance (parity/compare/tolerance.py,
# DEFAULT_STAGE_TOLERANCES); now they must pass like any other example.
KNOWN_FALSE_ALARMS = (
    # One token from the zero state: L1.att.ln_x step 0, |a-b| 4.76e-4 > atol 3.77e-4 (1.26x).
    Case(shape="v5.0-L2-H4", seed=1470, decay_profile="default", prompt=(0,), decode=(), mode="propagated"),
    # Long memory, two decode steps in: L1.att.ln_x step 2, |a-b| 7.99e-4 > atol 4.32e-4 (1.85x).
    Case(
        shape="v5.2-L2-H8=N8", seed=0, decay_profile="long", prompt=(0, 56, 0, 50, 0, 58, 0, 0), decode=(6, 50, 56),
        mode="propagated",
    ),
)


# 40 random examples (plus the pinned ones below): CI's 30 minutes on two cores leave this sweep ~100 s (120 took
# 173-190 s there; 60 took 121-149 s, still the slowest test of the run, and the clean-clone CI of 76dbcce ran
# 1833 s on a rocketlake machine). benchmarks/tolerance_headroom.py re-runs 1000 fresh ones for the calibration
# figures (results/tolerance_headroom.md); the former false alarms, and one deep and one wide model (issue 9:
# >= 12 layers or C >= 1024 in some examples, whatever the random draws), stay pinned below.
@settings(max_examples=40, derandomize=True, deadline=None)
@example(case=KNOWN_FALSE_ALARMS[0])
@example(case=KNOWN_FALSE_ALARMS[1])
@example(case=Case(shape="v5.2-L12-H2", seed=3, decay_profile="long", prompt=(7, 200, 7, 31, 255), decode=(9, 9),
                   mode="propagated"))
@example(case=Case(shape="v5.2-L2-C1024-H16", seed=4, decay_profile="default", prompt=tuple(range(16)), decode=(3,),
                   mode="propagated"))
# T = H = N with long memory; the largest vocabulary id; v4 decoding the same token again.
@example(case=Case(shape="v5.2-L2-H8=N8", seed=0, decay_profile="long", prompt=tuple(range(8)), decode=(1, 2, 3, 4),
                   mode="propagated"))
@example(case=Case(shape="v5.2-L2-H4", seed=1, decay_profile="default", prompt=(96,) * 4, decode=(0,), mode="isolated"))
@example(case=Case(shape="v4-L2", seed=2, decay_profile="default", prompt=(5,), decode=(5, 5), mode="propagated"))
@given(case=cases())
def test_correct_backends_never_diverge_in_fp32(case: Case, builds: Builds) -> None:
    event(f"shape {case.shape}")
    event(f"mode {case.mode}")
    if len(case.prompt) == case.config.n_head:
        event("prompt length = head count")
    expected, actual = run_case(case, builds)
    comparison = compare_runs(actual=actual, expected=expected, policy=POLICY)
    # Vacuity guard: every canonical stage of every step was actually compared.
    assert comparison.complete, f"{case}: missing {comparison.missing[:3]}, unmatched {comparison.unmatched_steps}"
    assert len(comparison.records) == len(expected.stage_order) * len(expected.steps)
    if case.mode == "propagated" and case.shape not in SHALLOW:
        drift = drift_summary(comparison.to_dict(), dtype="float32")
        assert drift["status"] != "beyond", (
            f"drift beyond the envelope on {case.config.describe()} ({case}): {drift['worst_ratio']:.3g}x at "
            f"{drift['worst_stage']} step {drift['worst_step']}, {drift['envelope_fraction']:.3g} of the envelope")
        event(f"deep propagated drift status {drift['status']}")
        return
    assert comparison.first_divergence is None, describe_failure(case, comparison)
    for kind, ratio in headroom(comparison).items():
        if ratio > WORST_RATIO.get(kind, (-1.0, ""))[0]:
            WORST_RATIO[kind] = (ratio, repr(case))


# Low precision (issue 11): the shallow shapes of every version, in fp16 and bf16. What a user's run
# judges an fp16/bf16 backend by: its own error, replayed by the reference *in its dtype* (no
# stage out of the dtype's tolerance at all), and its propagated drift from the fp32 reference
# (within the dtype's envelope). Isolated runs are left out: today they are judged against the fp32
# reference's stages, which carries the dtype's whole rounding (benchmarks/calibrate_precision.py).
LOW_SHAPES = ("v5.2-L2-H4", "v5.1-L2-H2", "v5.0-L2-H4", "v4-L2")


@st.composite
def low_precision_cases(draw) -> Case:
    case = draw(cases().filter(lambda c: c.shape in LOW_SHAPES))
    return Case(shape=case.shape, seed=case.seed, decay_profile=case.decay_profile, prompt=case.prompt,
                decode=case.decode, mode=draw(st.sampled_from(("propagated", "replayed"))),
                dtype=draw(st.sampled_from(("float16", "bfloat16"))))


@settings(max_examples=60, derandomize=True, deadline=None)
@given(case=low_precision_cases())
def test_correct_low_precision_backends_never_diverge(case: Case, builds: Builds) -> None:
    event(f"{case.dtype} {case.mode}")
    expected, actual = run_case(case, builds)
    # The actual side's dtype, judged as a run judges it (session.judge_policy): replayed with the scan's
    # inputs spliced (RWKV-5), at the replay judge's scale; propagated, as a pair of runs.
    if case.mode == "replayed":
        policy = TolerancePolicy.for_dtype(case.dtype, judge="replay", spliced_scan=case.config.version.value != "4")
    else:
        policy = TolerancePolicy.for_dtype(case.dtype)
    comparison = compare_runs(actual=actual, expected=expected, policy=policy)
    assert comparison.complete and len(comparison.records) == len(expected.stage_order) * len(expected.steps)
    if case.mode == "propagated":
        drift = drift_summary(comparison.to_dict(), dtype=case.dtype)
        assert drift["status"] != "beyond", (
            f"drift beyond the {case.dtype} envelope on {case.config.describe()} ({case}): {drift['worst_ratio']:.3g}x at "
            f"{drift['worst_stage']} step {drift['worst_step']}, {drift['envelope_fraction']:.3g} of the envelope")
        return
    assert comparison.first_divergence is None, describe_failure(case, comparison)


@settings(max_examples=40, derandomize=True, deadline=None)
@given(case=cases(), pick=st.data())
def test_a_one_percent_error_in_one_tap_is_the_first_divergence(
    case: Case, pick: st.DataObject, builds: Builds
) -> None:
    # Deep propagated runs may already carry drift past a per-stage tolerance before the planted
    # error (the envelope's business, above); the engine's first-divergence logic is tested where
    # nothing else fails.
    assume(case.shape in SHALLOW or case.mode != "propagated")
    expected, actual = run_case(case, builds)
    step = pick.draw(st.sampled_from(expected.steps), label="step").index
    stage = pick.draw(st.sampled_from(expected.stage_order), label="stage")
    value = actual.arrays[step][stage]
    # A record whose every value is ~0 sits under the absolute floor, where 1% is no error at all.
    assume(float(np.max(np.abs(value))) > 1e-2)
    actual.arrays[step][stage] = value * np.float32(1 + 1e-2)
    first = compare_runs(actual=actual, expected=expected, policy=POLICY).first_divergence
    assert first is not None, f"{case}: a 1% error in {stage} at step {step} went unnoticed"
    assert (first.step, first.stage, first.metrics.reason) == (step, stage, "tolerance"), first.metrics.message()
