"""ChatRWKV <-> HuggingFace names: RWKV-4's ``RwkvForCausalLM``, and the RWKV-5 HF ports' (same scheme).

HF renames the modules and the time-mix parameters and nests everything under ``rwkv.``:

    emb.weight                      rwkv.embeddings.weight
    blocks.0.ln0.{weight,bias}      rwkv.blocks.0.pre_ln.{weight,bias}
    blocks.L.ln1 / ln2              rwkv.blocks.L.ln1 / ln2
    blocks.L.att.time_mix_k|v|r|g   rwkv.blocks.L.attention.time_mix_key|value|receptance|gate
    blocks.L.att.X                  rwkv.blocks.L.attention.X        (time_decay, time_first, key, …)
    blocks.L.ffn.time_mix_k|r       rwkv.blocks.L.feed_forward.time_mix_key|receptance
    blocks.L.ffn.X                  rwkv.blocks.L.feed_forward.X
    ln_out.{weight,bias}            rwkv.ln_out.{weight,bias}
    head.weight                     head.weight

Shapes are the same on both sides (time_mix (1, 1, C), time_decay / time_first (A,)). transformers
itself has RWKV-4 only; the RWKV-5 HF checkpoints (remote code) use the same scheme, with v5's
time_mix_g as time_mix_gate and time_faaaa, gate, ln_x kept. MLC-style names and the load-time
transforms are in parity/weights_map.py.
"""

from __future__ import annotations

import re

from parity.errors import ParityError

_MIX = {"k": "key", "v": "value", "r": "receptance", "g": "gate"}
_MIX_BACK = {v: k for k, v in _MIX.items()}
_PART = {"att": "attention", "ffn": "feed_forward"}
_PART_BACK = {v: k for k, v in _PART.items()}


def chatrwkv_to_hf(key: str) -> str:
    if key == "head.weight":
        return key
    if key == "emb.weight":
        return "rwkv.embeddings.weight"
    if key.startswith("ln_out."):
        return "rwkv." + key
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m:
        raise ParityError(f"no HF name for checkpoint key {key!r}")
    layer, rest = m.groups()
    if rest.startswith("ln0."):
        return f"rwkv.blocks.{layer}.pre_ln.{rest[4:]}"
    part, _, name = rest.partition(".")
    if part in _PART:
        mix = re.fullmatch(r"time_mix_([kvrg])", name)
        if mix:
            name = "time_mix_" + _MIX[mix.group(1)]
        return f"rwkv.blocks.{layer}.{_PART[part]}.{name}"
    return f"rwkv.blocks.{layer}.{rest}"


def hf_to_chatrwkv(key: str) -> str:
    if key == "head.weight":
        return key
    if key == "rwkv.embeddings.weight":
        return "emb.weight"
    if key.startswith("rwkv.ln_out."):
        return key[len("rwkv."):]
    m = re.fullmatch(r"rwkv\.blocks\.(\d+)\.(.+)", key)
    if not m:
        raise ParityError(f"unexpected HF RWKV parameter {key!r}")
    layer, rest = m.groups()
    if rest.startswith("pre_ln."):
        return f"blocks.{layer}.ln0.{rest[len('pre_ln.'):]}"
    part, _, name = rest.partition(".")
    if part in _PART_BACK:
        mix = re.fullmatch(r"time_mix_(key|value|receptance|gate)", name)
        if mix:
            name = "time_mix_" + _MIX_BACK[mix.group(1)]
        return f"blocks.{layer}.{_PART_BACK[part]}.{name}"
    return f"blocks.{layer}.{rest}"


def hf_config(config) -> dict:
    """The HF ``config.json`` for a ModelConfig (v4)."""
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": config.vocab_size,
        "context_length": 1024,
        "hidden_size": config.n_embd,
        "attention_hidden_size": config.dim_att,
        "intermediate_size": config.dim_ffn,
        "num_hidden_layers": config.n_layer,
        "layer_norm_epsilon": 1e-5,
        "rescale_every": 6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
