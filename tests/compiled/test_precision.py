"""The compiled model in fp16 and bf16: ChatRWKV's strategy, as the torch reference computes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parity.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from parity.compiled.build import build_model, cache_key
from parity.compiled.runtime import CompiledRWKV
from parity.errors import ParityError
from parity.reference import make_reference
from parity.synthetic import make_config, make_weights

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
IDS = [20, 21, 22, 23, 24, 25, 26, 27]


def reference_stages(model, ids) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    model.forward(ids, record=lambda s, v: out.__setitem__(s, v.detach().float().numpy().copy()))
    return out


def test_cache_key_and_library_name_carry_the_dtype(compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv4-L2-C64.pth")
    keys = {d: cache_key(config=ck.config, variant="debug", target="llvm", dtype=d) for d in ("float32", "float16", "bfloat16")}
    assert len(set(keys.values())) == 3
    art = build_model(ck.config, variant="debug", cache_dir=compile_cache, dtype="float16")
    assert "-float16-" in art.library.name and art.meta["dtype"] == "float16"
    # Weights in the dtype; decay and bonus fp32 (docs/RWKV.md §3).
    dtypes = dict(zip(art.meta["params"], art.meta["param_dtypes"]))
    assert dtypes["blocks.0.att.key.weight"] == "float16" and dtypes["blocks.0.att.time_decay"] == "float32"
    assert dtypes["emb.weight"] == "float32"  # normalised by ln0 in fp32, then rounded, as the reference


def test_unknown_dtype_is_a_parity_error(compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv4-L2-C64.pth")
    with pytest.raises(ParityError, match="no compiled model in 'float64'"):
        build_model(ck.config, variant="debug", cache_dir=compile_cache, dtype="float64")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["rwkv4-L2-C64.pth", "rwkv5_2-L4-C128-H2.pth"])
def test_state_stays_fp32_and_is_exact_in_the_dtype(name: str, dtype: str, compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / name)
    model = CompiledRWKV(ck, variant="debug", cache_dir=compile_cache, dtype=dtype)
    out = model.forward(IDS, model.zero_state())
    state = model.state_to_canonical(out.state)
    for slot, value in state.items():
        assert value.dtype == np.float32
        if slot.endswith(("att_x", "ffn_x")):  # LayerNorm outputs: values of the model dtype, carried in fp32
            rounded = torch.from_numpy(value).to(getattr(torch, dtype)).float().numpy()
            np.testing.assert_array_equal(rounded, value)
    # The state round-trips: a decode from it equals a decode from the same state re-entered.
    again = model.forward([7], model.state_from_canonical(state))
    first = model.forward([7], out.state)
    np.testing.assert_array_equal(again.logits, first.logits)


@pytest.mark.parametrize("version", ["4", "5.2"])
def test_fp16_rescale_matches_the_reference_at_depth(version: str, tmp_path: Path, compile_cache: Path) -> None:
    # 13 layers: the stream is halved after layers 5 and 11, so layers 6-11 carry it at 1/2 and
    # layer 12 at 1/4. Were the rescale (weights at load, stream in the graph, taps multiplied
    # back) wrong anywhere, those layers would be off by a factor of 2 or 4 — not by fp16 rounding.
    cfg = make_config(n_layer=13, n_embd=32, head_size=None if version == "4" else 16, vocab_size=64, version=version)
    path = tmp_path / "deep.pth"
    save_checkpoint(Checkpoint(path=path, sha256="", config=cfg, weights=make_weights(cfg, seed=3)), path)
    ck = load_checkpoint(path)
    model = CompiledRWKV(ck, variant="debug", cache_dir=compile_cache, dtype="float16")
    assert model.artifact.meta["param_scales"]["blocks.12.att.output.weight"] == 4.0
    taps = model.forward(IDS, model.zero_state()).taps
    ref = reference_stages(make_reference(ck, dtype="float16"), IDS)
    for stage in ("L5.x_out", "L6.x_after_att", "L11.ffn.out", "L12.att.out", "L12.x_out", "logits"):
        a, b = taps[stage], ref[stage]
        # 3e-2 of max|b|: fp16's own rounding through 13 layers (measured ≤ 1e-2 here); a factor
        # of 2 would be 50% at least.
        assert np.abs(a - b).max() <= 3e-2 * np.abs(b).max(), stage
