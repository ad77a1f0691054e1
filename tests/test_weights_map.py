"""ChatRWKV <-> HF <-> MLC-style names and the load-time transforms (parity/weights_map.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint
from parity.errors import ParityError
from parity.weights_map import (
    chatrwkv_to_mlc,
    from_mlc_weights,
    hf_to_mlc,
    load_transform,
    mlc_to_chatrwkv,
    name_table,
    to_mlc_weights,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pth")), ids=lambda p: p.stem)
def test_every_key_of_every_fixture_round_trips_through_mlc_names(path: Path) -> None:
    keys = list(load_checkpoint(path).weights)
    mlc = [chatrwkv_to_mlc(k) for k in keys]
    assert [mlc_to_chatrwkv(k) for k in mlc] == keys
    assert len(set(mlc)) == len(keys)
    assert all(k == "head.weight" or k.startswith("model.") for k in mlc)


@pytest.mark.parametrize(
    ("chatrwkv", "mlc"),
    [
        ("emb.weight", "model.embeddings.weight"),
        ("blocks.0.ln0.weight", "model.blocks.0.pre_ln.weight"),
        ("blocks.1.att.time_mix_g", "model.blocks.1.attention.time_mix_gate"),
        ("blocks.1.att.time_faaaa", "model.blocks.1.attention.time_faaaa"),
        ("blocks.1.att.ln_x.bias", "model.blocks.1.attention.ln_x.bias"),
        ("blocks.1.ffn.time_mix_r", "model.blocks.1.feed_forward.time_mix_receptance"),
        ("ln_out.bias", "model.ln_out.bias"),
        ("head.weight", "head.weight"),
    ],
)
def test_documented_mlc_names(chatrwkv: str, mlc: str) -> None:
    assert chatrwkv_to_mlc(chatrwkv) == mlc and mlc_to_chatrwkv(mlc) == chatrwkv


def test_time_decay_becomes_the_per_step_decay() -> None:
    # Hand values: x = 0 -> w = exp(-1); x = log(2) -> w = exp(-2). The decay lies in (0, 1).
    raw = {"blocks.0.att.time_decay": np.array([[0.0, np.log(2.0)]], np.float32),
           "blocks.0.att.time_faaaa": np.array([[0.5, -0.5]], np.float32)}
    out = to_mlc_weights(raw, version="5.2")
    np.testing.assert_allclose(out["model.blocks.0.attention.time_decay"], [[np.exp(-1.0), np.exp(-2.0)]], rtol=1e-6)
    # 5.2's bonus is used raw; only 5.0/5.1 exponentiate time_first.
    np.testing.assert_array_equal(out["model.blocks.0.attention.time_faaaa"], raw["blocks.0.att.time_faaaa"])
    assert load_transform("blocks.3.att.time_first", version="5.1").what == "u = exp(x)"
    assert load_transform("blocks.3.att.time_first", version="4") is None
    assert load_transform("blocks.3.ffn.key.weight", version="5.2") is None


def test_the_fixture_survives_the_round_trip() -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L2-C144-H12.pth")
    raw = {k: v.numpy() for k, v in ck.fp32_weights().items()}
    back = from_mlc_weights(to_mlc_weights(raw, version="5.2", rescale_every=1), version="5.2", rescale_every=1)
    assert set(back) == set(raw)
    for key, value in raw.items():
        # log(-log(exp(-exp(x)))) in fp32 loses a few ulps of x; 1e-5 relative covers it.
        np.testing.assert_allclose(back[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_rescale_divides_the_output_weights_by_powers_of_two() -> None:
    raw = {f"blocks.{i}.att.output.weight": np.ones((2, 2), np.float32) for i in range(4)}
    out = to_mlc_weights(raw, version="5.2", rescale_every=2)
    got = [float(out[f"model.blocks.{i}.attention.output.weight"][0, 0]) for i in range(4)]
    assert got == [1.0, 1.0, 0.5, 0.5]


def test_name_table_lists_all_three_names() -> None:
    rows = name_table(["blocks.0.att.time_decay", "head.weight"], version="5.2")
    assert rows[0] == {"chatrwkv": "blocks.0.att.time_decay", "hf": "rwkv.blocks.0.attention.time_decay",
                       "mlc": "model.blocks.0.attention.time_decay", "transform": "w = exp(-exp(x))"}
    assert rows[1]["transform"] == ""


@pytest.mark.parametrize("key", ["blocks.0.ln1.weight", "model.blocks.0.ln1.weight"])
def test_unknown_hf_key_is_a_parity_error(key: str) -> None:
    with pytest.raises(ParityError, match="unexpected HF RWKV parameter"):
        hf_to_mlc(key)
