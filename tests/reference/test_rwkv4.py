"""The RWKV-4 torch reference against the official ChatRWKV package (`rwkv` 0.8.32), and against itself."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.dumpers.official import canonical_state, load_official_model
from parity.errors import ParityError
from parity.reference.rwkv4 import PP_INIT, RWKV4Reference, RWKV4State
from parity.stages import V4_STATE_SLOTS, stage_order

# Read at import time by the official package: no TorchScript, no CUDA kernel, plain CPU torch.
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FIXTURE = FIXTURES / "rwkv4-L2-C64.pth"  # L2 C64 V512
VOCAB = 512
PROMPTS = {
    "ones10": [1] * 10,
    "random16": [int(i) for i in np.random.default_rng(16).integers(0, VOCAB, 16)],
}
DECODE_IDS = [int(i) for i in np.random.default_rng(4).integers(0, VOCAB, 4)]
# v4 has no chunked prefill in the official package: att_seq runs the same (aa, bb, pp) scan
# token by token, so both sides do the same fp32 ops in the same order. Measured: 2.6e-7 of
# max|expected| (prefill logits), 0 on every decode step. 1e-6 leaves 4x room; a wrong sign,
# a missing sigmoid or a dropped u moves values by O(1e-2) or more.
OFFICIAL_RTOL = 1e-6
# Prefill vs per-token decode of the reference itself: (T, C) and (1, C) matmuls round
# differently. Measured 8.3e-7 of max|expected|; 5e-6 leaves room.
SELF_RTOL = 5e-6


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return load_checkpoint(FIXTURE)


@pytest.fixture(scope="module")
def reference(checkpoint: Checkpoint) -> RWKV4Reference:
    return RWKV4Reference(checkpoint)


@pytest.fixture(scope="module")
def official(checkpoint: Checkpoint) -> RWKV:
    return load_official_model(checkpoint.path)




def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max(1, max|expected|): the error in units of the tensor's scale."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / max(1.0, expected.double().abs().max().item())


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_matches_official_package(reference, official, checkpoint, prompt: str) -> None:
    n_layer = checkpoint.config.n_layer
    ref_state, off_state = None, None
    errors: dict[str, float] = {}
    for step, ids in enumerate([PROMPTS[prompt]] + [[i] for i in DECODE_IDS]):
        logits, ref_state = reference.forward(ids, ref_state)
        # The package replaces entries of the list it is given: hand it a copy.
        off_logits, off_state = official.forward(ids, None if off_state is None else list(off_state))
        assert logits.shape == (len(ids), checkpoint.config.vocab_size)
        errors[f"step {step} logits"] = scaled_error(logits[-1], off_logits)
        off = canonical_state(off_state, version="4", n_layer=n_layer)
        assert off.keys() == ref_state.slots().keys()
        for name, value in ref_state.slots().items():
            errors[f"step {step} {name}"] = scaled_error(value, off[name])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= OFFICIAL_RTOL, f"worst: {worst} = {errors[worst]:.2e} of scale"
    # Guard against comparing two untouched states: the run moved every slot.
    slots = ref_state.slots()
    assert slots["state.L1.bb"].min() > 0 and slots["state.L1.pp"].min() > PP_INIT / 2
    assert slots["state.L0.aa"].abs().max() > 1e-3


def test_recorder_sees_every_canonical_stage_once(reference) -> None:
    cfg = reference.config
    _, state = reference.forward([1] * 3)  # a non-zero incoming state
    T = 5
    seen: list[tuple[str, tuple[int, ...]]] = []
    reference.forward([3] * T, state, record=lambda name, value: seen.append((name, tuple(value.shape))))
    assert [name for name, _ in seen] == stage_order(n_layer=cfg.n_layer, version="4")
    # v4: no GroupNorm, no gate branch; `gated` is r·wkv.
    assert not [name for name, _ in seen if name.endswith((".ln_x", ".xg", ".g"))]
    A, C = cfg.dim_att, cfg.n_embd
    for name, shape in seen:
        if name.startswith("state."):
            assert shape == ((C,) if name.endswith(("att_x", "ffn_x")) else (A,)), name
        else:
            assert shape[0] == T and len(shape) == 2, name
    shapes = dict(seen)
    assert shapes["logits"] == (T, cfg.vocab_size) and shapes["L0.ffn.k"] == (T, cfg.dim_ffn)


def test_recorded_stages_are_the_v4_formulas(reference) -> None:
    rec: dict[str, torch.Tensor] = {}
    logits, state = reference.forward([5, 6, 7, 8], record=lambda name, value: rec.__setitem__(name, value.clone()))
    # v4 r goes through a sigmoid (v5's does not).
    r = rec["L0.att.r"]
    assert r.min() > 0 and r.max() < 1
    assert torch.allclose(rec["L0.att.gated"], r * rec["L0.att.wkv"])
    # From the fresh state (0, 0, -1e30) the first token's wkv is its own v: e1 = 0, e2 cancels.
    assert torch.allclose(rec["L0.att.wkv"][0], rec["L0.att.v"][0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(rec["L0.att.wkv"][1], rec["L0.att.v"][1], rtol=1e-3, atol=1e-3)
    assert torch.equal(rec["logits"], logits)
    for name, value in state.slots().items():
        assert torch.equal(rec[name], value), name
    assert torch.equal(rec["state.L1.att_x"], rec["L1.att.ln1"][-1])


def test_zero_state_starts_pp_at_minus_1e30(reference) -> None:
    slots = reference.zero_state().slots()
    assert set(slots) == {f"state.L{l}.{s}" for l in range(2) for s in V4_STATE_SLOTS}
    assert torch.all(slots["state.L0.pp"] == PP_INIT)
    assert all(torch.all(v == 0) for k, v in slots.items() if not k.endswith("pp"))


def run_decodes(reference: RWKV4Reference, ids: list[int]) -> tuple[torch.Tensor, RWKV4State]:
    rows, state = [], None
    for i in ids:
        logits, state = reference.forward([i], state)
        rows.append(logits)
    return torch.cat(rows), state


def test_prefill_equals_one_decode_per_token(reference) -> None:
    ids = PROMPTS["random16"]
    prefill_logits, prefill_state = reference.forward(ids)
    decode_logits, decode_state = run_decodes(reference, ids)
    # Every row, not only the last: a scan bug shows from row 1 on.
    assert scaled_error(prefill_logits, decode_logits) <= SELF_RTOL
    for name, value in prefill_state.slots().items():
        assert scaled_error(value, decode_state.slots()[name]) <= SELF_RTOL, name


def test_input_state_is_not_mutated(reference) -> None:
    _, state = reference.forward(PROMPTS["random16"])
    before = {k: v.clone() for k, v in state.slots().items()}
    first, _ = reference.forward([7], state)
    reference.forward([8, 9, 10], state)
    again, _ = reference.forward([7], state)
    for name, value in state.slots().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(first, again)


def test_large_keys_stay_finite_in_fp16(checkpoint) -> None:
    # k up to ~±100: exp(k) overflows fp16 above 11.09 (and fp32 above 88.7). The (aa, bb, pp)
    # form never takes exp of a positive number, and the wkv runs in fp32 whatever the dtype.
    weights = dict(checkpoint.weights)
    for layer in range(checkpoint.config.n_layer):
        key = f"blocks.{layer}.att.key.weight"
        weights[key] = weights[key].float() * 200
    loud = Checkpoint(path=checkpoint.path, sha256=checkpoint.sha256, config=checkpoint.config, weights=weights)
    rec: dict[str, torch.Tensor] = {}
    logits, _ = RWKV4Reference(loud, dtype="float16").forward(
        PROMPTS["random16"], record=lambda name, value: rec.__setitem__(name, value)
    )
    assert rec["L1.att.k"].abs().max() > 11.1  # the test really is in overflow territory
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(rec[f"state.L{l}.{s}"]).all() for l in range(2) for s in ("aa", "bb", "pp"))


def test_bad_inputs_are_parity_errors(checkpoint, reference) -> None:
    for ids in ([VOCAB], [-1], []):
        with pytest.raises(ParityError):
            reference.forward(ids)
    with pytest.raises(ParityError, match="dtype"):
        RWKV4Reference(checkpoint, dtype="int8")
    with pytest.raises(ParityError, match="RWKV-4"):
        RWKV4Reference(load_checkpoint(FIXTURES / "rwkv5_0-L2-C64-H2.pth"))
