"""The bug zoo: real porting bugs with known locations, to prove the harness localises them.

Each ``Mutant`` says what is wrong, which backend it replaces (the TVM model or the torch
reference), the fixture and prompt it is run on, and where the first divergence must be found —
(step, layer, stage) — in a propagated and in an isolated (teacher-forced) run. ``parity
selftest`` runs them all; a mutant backend is also selectable anywhere as ``mutant/<name>``.
"""

from __future__ import annotations

from parity.errors import ParityError
from parity.mutants.base import Expected, Mutant, _same  # noqa: F401  (Expected, Mutant: re-exported)


CATALOGUE: dict[str, Mutant] = {
    m.name: m
    for m in [
        Mutant("wkv-time-not-recurrent", "compiled",
               "wkv5 scan whose time axis is not a true recurrence: every token reads the input state",
               *_same(0, 0, "L0.att.wkv")),
        Mutant("groupnorm-over-time", "compiled", "ln_x GroupNorm statistics taken over (T, N) — over time too",
               *_same(0, 0, "L0.att.ln_x")),
        Mutant("groupnorm-channel-axis", "compiled", "ln_x groups formed from (T, N, H) instead of (T, H, N)",
               *_same(0, 0, "L0.att.ln_x")),
        Mutant("groupnorm-eps-1e-5", "compiled", "ln_x eps 1e-5 (older ports) instead of 64e-5",
               *_same(0, 0, "L0.att.ln_x")),
        Mutant("state-transposed", "compiled", "wkv state read as [v, k] instead of [k, v]: prefill exact, next decode wrong",
               *_same(1, 0, "L0.att.wkv")),
        Mutant("decay-exp", "compiled", "decay w = exp(time_decay) instead of exp(-exp(time_decay))",
               *_same(0, 0, "L0.att.wkv")),
        Mutant("decay-neg-exp", "compiled", "decay w = -exp(time_decay) (v4's log-space decay) instead of exp(-exp(time_decay))",
               *_same(0, 0, "L0.att.wkv")),
        Mutant("sigmoid-r", "compiled", "sigmoid applied to r in RWKV-5 (a v4 habit)", *_same(0, 0, "L0.att.r")),
        Mutant("token-shift-off-by-one", "compiled", "token shift takes row t-2 instead of t-1",
               *_same(0, 0, "L0.att.shift")),
        Mutant("emb-without-ln0", "compiled", "embedding not normalised by ln0", *_same(0, None, "emb")),
        Mutant("emb-ln0-twice", "compiled", "embedding normalised by ln0 twice", *_same(0, None, "emb")),
        Mutant("wkv-fp16-accumulator", "compiled", "wkv output accumulated in fp16", *_same(0, 0, "L0.att.wkv")),
        Mutant("v4-wkv-without-max", "compiled",
               "RWKV-4 wkv without the running-max subtraction, in fp16 (exp overflows above 11.09)",
               *_same(0, 0, "L0.att.wkv"), fixture="rwkv4-L2-C64"),
        Mutant("wkv-time-parallel-cpu", "compiled",
               "wkv5 CPU scan with its output loop parallel over time: every token reads the incoming state",
               *_same(0, 0, "L0.att.wkv")),
        Mutant("kernel-writes-input-state", "compiled",
               "wkv5 kernel also writes its final state into its input buffer: a second identical run differs",
               *_same(0, 0, "L0.att.wkv"), repeat_check=True),
        Mutant("reference-sigmoid-r", "reference",
               "the engineer's own reference applies sigmoid to r in RWKV-5; the official package and TVM agree",
               *_same(0, 0, "L0.att.r")),
    ]
}


# GPU-only porting bugs: each kernel is correct as written (the unscheduled llvm build runs its
# loops in order) and broken once scheduled onto CUDA threads, so they are judged on CUDA
# (tests/compiled/test_gpu.py) and not by the llvm selftest, where each must show no divergence.
GPU_CATALOGUE: dict[str, Mutant] = {
    m.name: m
    for m in [
        Mutant("wkv-time-on-threads", "compiled",
               "wkv5 scan with its time axis bound to CUDA threads (made spatial): every token updates the state at once",
               *_same(0, 0, "L0.att.wkv")),
        Mutant("wkv-key-on-threads-race", "compiled",
               "wkv5 key index (the output's reduction axis) bound to CUDA threads: a race on out[t, h, j]",
               *_same(0, 0, "L0.att.wkv")),
        Mutant("wkv-missing-barrier", "compiled",
               "two-phase wkv5 scan (read state by columns, update it by rows) with no barrier between the phases",
               *_same(0, 0, "L0.att.wkv")),
        Mutant("wkv-kv-swapped-binding", "compiled",
               "wkv5 CUDA kernel indexes k with the thread (value) index and v with the key index",
               *_same(0, 0, "L0.att.wkv")),
    ]
}


# The families kept in files of their own join the catalogue (their modules import Mutant from here).
from parity.mutants.crash import CRASH_CATALOGUE  # noqa: E402
from parity.mutants.precision import PRECISION_CATALOGUE  # noqa: E402
from parity.mutants.quant import QUANT_CATALOGUE  # noqa: E402

CATALOGUE.update(CRASH_CATALOGUE)
CATALOGUE.update(PRECISION_CATALOGUE)
CATALOGUE.update(QUANT_CATALOGUE)


def get_mutant(name: str) -> Mutant:
    if name in GPU_CATALOGUE:
        return GPU_CATALOGUE[name]
    if name not in CATALOGUE:
        raise ParityError(f"unknown mutant {name!r}; known: {', '.join(CATALOGUE)}, {', '.join(GPU_CATALOGUE)}")
    return CATALOGUE[name]
