"""The ChatRWKV <-> HF name mapping: a bijection on every fixture, and exactly HF's parameter names for v4."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.checkpoint import load_checkpoint
from parity.errors import ParityError
from parity.hf_names import chatrwkv_to_hf, hf_config, hf_to_chatrwkv

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE_V4 = FIXTURES / "rwkv4-L2-C64.pth"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pth")), ids=lambda p: p.stem)
def test_every_key_of_every_fixture_round_trips(path: Path) -> None:
    keys = list(load_checkpoint(path).weights)
    hf = [chatrwkv_to_hf(k) for k in keys]
    assert [hf_to_chatrwkv(k) for k in hf] == keys
    # Injective as well: two checkpoint keys may never land on one HF name.
    assert len(set(hf)) == len(keys)


def test_v4_names_are_exactly_hf_parameter_names() -> None:
    from transformers import RwkvConfig, RwkvForCausalLM

    ck = load_checkpoint(FIXTURE_V4)
    cfg = hf_config(ck.config)
    # RwkvConfig takes the model kwargs; the two identity fields are config.json's, not its.
    kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    model = RwkvForCausalLM(RwkvConfig(**kwargs))
    hf_params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    ours = {chatrwkv_to_hf(k): tuple(v.shape) for k, v in ck.weights.items()}
    assert set(ours) == set(hf_params), f"only ours: {set(ours) - set(hf_params)}; only HF: {set(hf_params) - set(ours)}"
    # The docstring's promise: shapes match too (time_mix (1, 1, C), time_decay (A,)).
    assert ours == hf_params


def test_hf_config_describes_the_fixture() -> None:
    cfg = load_checkpoint(FIXTURE_V4).config
    hc = hf_config(cfg)
    assert hc["model_type"] == "rwkv" and hc["architectures"] == ["RwkvForCausalLM"]
    assert (hc["hidden_size"], hc["num_hidden_layers"], hc["vocab_size"]) == (cfg.n_embd, cfg.n_layer, cfg.vocab_size)
    assert (hc["attention_hidden_size"], hc["intermediate_size"]) == (cfg.dim_att, cfg.dim_ffn)


@pytest.mark.parametrize(
    ("chatrwkv", "hf"),
    [
        ("emb.weight", "rwkv.embeddings.weight"),
        ("blocks.0.ln0.bias", "rwkv.blocks.0.pre_ln.bias"),
        ("blocks.3.att.time_mix_v", "rwkv.blocks.3.attention.time_mix_value"),
        ("blocks.2.att.time_mix_g", "rwkv.blocks.2.attention.time_mix_gate"),  # v5.1/5.2
        ("blocks.2.att.time_faaaa", "rwkv.blocks.2.attention.time_faaaa"),
        ("blocks.3.ffn.time_mix_r", "rwkv.blocks.3.feed_forward.time_mix_receptance"),
        ("blocks.11.att.time_first", "rwkv.blocks.11.attention.time_first"),
        ("blocks.1.ln2.weight", "rwkv.blocks.1.ln2.weight"),
        ("ln_out.weight", "rwkv.ln_out.weight"),
        ("head.weight", "head.weight"),
    ],
)
def test_documented_renames(chatrwkv: str, hf: str) -> None:
    assert chatrwkv_to_hf(chatrwkv) == hf
    assert hf_to_chatrwkv(hf) == chatrwkv


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "rwkv.layers.0.attention.key.weight", "lm_head.weight", "time_decay"])
def test_unknown_hf_key_is_a_parity_error(key: str) -> None:
    with pytest.raises(ParityError, match="unexpected HF RWKV parameter"):
        hf_to_chatrwkv(key)


@pytest.mark.parametrize("key", ["ln0.weight", "emb", "block.0.att.key.weight", "rwkv.blocks.0.ln1.weight", ""])
def test_unknown_checkpoint_key_is_a_parity_error(key: str) -> None:
    with pytest.raises(ParityError, match="no HF name for checkpoint key"):
        chatrwkv_to_hf(key)
