"""The fp16 and bf16 references: ChatRWKV's strategies, checked against the official package itself.

The official package (rwkv 0.8.32) runs ``cpu fp16`` and ``cpu bf16`` on this machine, so our
low-precision reference is held to the strongest standard there is: the same numbers, bit for bit,
on the same weights — the bundled fixtures and a 13-layer synthetic model, deep enough that fp16's
residual rescale (halve the stream after every 6th layer) takes effect twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parity.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from parity.dumpers.backends import ReferenceBackend, RunPlan
from parity.dumpers.format import DumpReader
from parity.reference import make_reference
from parity.synthetic import make_config, make_weights

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PLAN = RunPlan(prefill_ids=tuple(range(20, 30)), decode_ids=(5, 11, 42))


def deep_checkpoint(tmp: Path, *, version: str) -> Checkpoint:
    cfg = make_config(n_layer=13, n_embd=32, head_size=None if version == "4" else 16, vocab_size=64, version=version)
    path = tmp / f"deep-{version}.pth"
    save_checkpoint(Checkpoint(path=path, sha256="", config=cfg, weights=make_weights(cfg, seed=3)), path)
    return load_checkpoint(path)


def _checkpoint(name: str, tmp_path_factory) -> Checkpoint:
    if name.startswith("deep-"):
        return deep_checkpoint(tmp_path_factory.mktemp("deep"), version=name.split("-", 1)[1])
    return load_checkpoint(FIXTURES / name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["rwkv4-L2-C64.pth", "rwkv5_0-L2-C64-H2.pth", "rwkv5_2-L4-C128-H2.pth", "deep-4", "deep-5.2"])
def test_matches_the_official_package_bit_for_bit(name: str, dtype: str, tmp_path_factory) -> None:
    from parity.dumpers.official import ChatRWKVBackend

    ck = _checkpoint(name, tmp_path_factory)
    out = tmp_path_factory.mktemp("dumps")
    ours = DumpReader(ReferenceBackend(ck, dtype=dtype).dump(PLAN, path=out / "ref"))
    theirs_backend = ChatRWKVBackend(ck, dtype=dtype)
    assert theirs_backend.extra["rescale_layer"] == (6 if dtype == "float16" else 0)
    theirs = DumpReader(theirs_backend.dump(PLAN, path=out / "official"))
    assert ours.dtype == theirs.dtype == dtype
    # 5.0's prefill in the package is a chunked matrix form, not a scan: its fp32 sums associate
    # differently, so there (only) the two agree to fp32 rounding of the state, 2e-4 x max|b| — the
    # fp32 allowance, 50x tighter than what fp16 rounding itself costs (tests below, calibration) —
    # or, where that order difference flips a rounding to the dtype, to one ulp of it, carried
    # through two layers: 2 eps x max|b|. Measured (2026-12-01, a Sapphire Rapids CPU: AMX,
    # AVX512-FP16): fp16 0.98 eps x max|b| (logits, L1.x_out), bf16 0.002 eps; on the CPU of the
    # earlier runs no flip at all.
    chunked = ck.config.version.value == "5.0"
    chunk_rtol = max(2e-4, 2 * torch.finfo(getattr(torch, dtype)).eps)
    compared = 0
    for step in range(1 + len(PLAN.decode_ids)):
        a, b = ours.read_step(step), theirs.read_step(step)
        for stage, value in b.items():
            mine = a[stage].astype(np.float32)
            if chunked:
                assert np.abs(mine - value).max() <= chunk_rtol * np.abs(value).max(), f"step {step} {stage}"
            else:
                np.testing.assert_array_equal(mine, value, err_msg=f"step {step} {stage}")
            compared += 1
    assert compared >= 4 * (1 + 2 * ck.config.n_layer)  # emb, logits, two stream stages a layer, the state


@pytest.mark.parametrize("version", ["4", "5.2"])
def test_rescaled_run_records_canonical_values(version: str, tmp_path) -> None:
    # In fp32 the rescale is exact up to LayerNorm's eps, so a rescaled run that records the stream
    # multiplied back must match the plain run closely at every layer — had the multiplication been
    # missed, layers 6-11 would be off by 2x and layer 12 by 4x.
    ck = deep_checkpoint(tmp_path, version=version)
    plain = make_reference(ck, dtype="float32")
    scaled = type(plain)(ck, dtype="float32", rescale_layer=6)
    rec: dict[str, dict] = {"plain": {}, "scaled": {}}
    for key, model in (("plain", plain), ("scaled", scaled)):
        model.forward(list(PLAN.prefill_ids), record=lambda s, v, key=key: rec[key].__setitem__(s, v.float().clone()))
    for stage in ("L12.x_out", "L6.x_after_att", "L11.ffn.out", "L12.att.out", "logits"):
        a, b = rec["scaled"][stage], rec["plain"][stage]
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max())), stage
    # ... and the stream really was carried smaller inside (it is the rescale, not a no-op).
    assert scaled.layer_scale(12) == 4.0 and scaled.layers[12] is not None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["rwkv4-L2-C64.pth", "rwkv5_2-L4-C128-H2.pth"])
def test_state_and_scan_stay_fp32(name: str, dtype: str) -> None:
    ck = load_checkpoint(FIXTURES / name)
    model = make_reference(ck, dtype=dtype)
    seen: dict[str, torch.dtype] = {}
    _, state = model.forward([1, 2, 3], record=lambda s, v: seen.__setitem__(s, v.dtype))
    wide = {torch.float32}
    assert seen["L0.att.wkv"] in wide and seen["logits"] in wide
    assert seen["L0.att.k"] == seen["L0.x_out"] == model.dtype  # activations in the model dtype
    for name_, value in state.slots().items():
        expect = model.dtype if name_.endswith(("att_x", "ffn_x")) else torch.float32
        assert value.dtype == expect, name_
