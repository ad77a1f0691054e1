"""Weight names across the three common RWKV schemes, and the transforms ports apply at load time.

A port rarely reads the checkpoint the way ChatRWKV stores it: HF checkpoints rename the modules
(parity/hf_names.py), MLC-LLM-style ports use the HF names with ``model.`` for ``rwkv.``, and many
ports precompute part of the math when they load the weights. A port that is checked against the
reference needs both directions, so they live here, once, as data:

    ChatRWKV                      HF                                       MLC-style
    emb.weight                    rwkv.embeddings.weight                   model.embeddings.weight
    blocks.0.ln0.*                rwkv.blocks.0.pre_ln.*                   model.blocks.0.pre_ln.*
    blocks.L.ln1.* / ln2.*        rwkv.blocks.L.ln1.* / ln2.*              model.blocks.L.ln1.* / ln2.*
    blocks.L.att.time_mix_k|v|r|g rwkv.blocks.L.attention.time_mix_key|value|receptance|gate  (model. …)
    blocks.L.att.X                rwkv.blocks.L.attention.X                model.blocks.L.attention.X
    blocks.L.ffn.time_mix_k|r     rwkv.blocks.L.feed_forward.time_mix_key|receptance  (model. …)
    blocks.L.ffn.X                rwkv.blocks.L.feed_forward.X             model.blocks.L.feed_forward.X
    ln_out.*                      rwkv.ln_out.*                            model.ln_out.*
    head.weight                   head.weight                              head.weight

Load-time transforms (``LOAD_TRANSFORMS``), raw checkpoint value x -> what the port stores; the
ChatRWKV and HF checkpoints both hold x raw:

    RWKV-5.x  att.time_decay   w = exp(-exp(x))   the per-step decay (MLC-LLM's loader does this)
    RWKV-5.0/5.1 att.time_first  u = exp(x)       the bonus (5.2's time_faaaa is used raw)
    RWKV-4    att.time_decay   -exp(x)            (ChatRWKV's own load; the wkv uses exp of it)
    RWKV-4    att.time_first   x                  (unchanged)

``rescale_every`` (HF/MLC config; ChatRWKV's fp16 trick): att.output and ffn.value of layer L are
divided by 2 ** (L // rescale_every) at load, and the port halves x back every rescale_every
layers; 0 (the default) means no rescaling, which is what fp32 ports use.

Pure numpy: a port's loader can use it without torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from parity.errors import ParityError
from parity.hf_names import chatrwkv_to_hf, hf_to_chatrwkv


def hf_to_mlc(key: str) -> str:
    """``rwkv.X`` -> ``model.X``; ``head.weight`` stays."""
    if key == "head.weight":
        return key
    if not key.startswith("rwkv."):
        raise ParityError(f"unexpected HF RWKV parameter {key!r}: HF names start with 'rwkv.' (or are head.weight)")
    return "model." + key[len("rwkv."):]


def mlc_to_hf(key: str) -> str:
    if key == "head.weight":
        return key
    if not key.startswith("model."):
        raise ParityError(f"unexpected MLC-style RWKV parameter {key!r}: names start with 'model.' (or are head.weight)")
    return "rwkv." + key[len("model."):]


def chatrwkv_to_mlc(key: str) -> str:
    return hf_to_mlc(chatrwkv_to_hf(key))


def mlc_to_chatrwkv(key: str) -> str:
    return hf_to_chatrwkv(mlc_to_hf(key))


@dataclass(frozen=True)
class Transform:
    """What a port computes from a raw checkpoint tensor at load time, and back."""

    what: str  # the formula, for tables and messages
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


def _decay_v5(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.exp(x))


def _undecay_v5(w: np.ndarray) -> np.ndarray:
    return np.log(-np.log(w))


# (versions, parameter suffix after "blocks.L.att.") -> transform. fp32 in, fp32 out: the same
# rounding as a loader that casts first and then applies the formula.
LOAD_TRANSFORMS: dict[tuple[tuple[str, ...], str], Transform] = {
    (("5.0", "5.1", "5.2"), "time_decay"): Transform("w = exp(-exp(x))", _decay_v5, _undecay_v5),
    (("5.0", "5.1"), "time_first"): Transform("u = exp(x)", np.exp, np.log),
    (("4",), "time_decay"): Transform("-exp(x)", lambda x: -np.exp(x), lambda y: np.log(-y)),
}

_ATT_PARAM = re.compile(r"^blocks\.(\d+)\.att\.(\w+)$")


def load_transform(key: str, *, version: str) -> Transform | None:
    """The load-time transform of ChatRWKV key ``key`` for RWKV ``version``, or None if it is loaded as is."""
    m = _ATT_PARAM.match(key)
    if not m:
        return None
    for (versions, suffix), transform in LOAD_TRANSFORMS.items():
        if version in versions and m.group(2) == suffix:
            return transform
    return None


def _rescale_exponent(key: str, rescale_every: int) -> int:
    m = re.match(r"^blocks\.(\d+)\.(att\.output|ffn\.value)\.weight$", key)
    return int(m.group(1)) // rescale_every if (m and rescale_every > 0) else 0


def to_mlc_weights(
    weights: Mapping[str, object], *, version: str, rescale_every: int = 0, transforms: bool = True
) -> dict[str, np.ndarray]:
    """ChatRWKV-keyed weights -> MLC-style names, fp32 numpy, with the load-time transforms applied.

    ``weights`` values: numpy arrays or anything ``np.asarray`` takes (a torch tensor must be fp32:
    numpy has no bfloat16; ``checkpoint.fp32_weights()`` gives those).
    """
    if rescale_every < 0:
        raise ParityError(f"rescale_every must be >= 0, got {rescale_every}")
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        x = np.asarray(value, dtype=np.float32)
        transform = load_transform(key, version=version) if transforms else None
        if transform is not None:
            x = transform.forward(x).astype(np.float32)
        t = _rescale_exponent(key, rescale_every)
        if t:
            x = (x / np.float32(2**t)).astype(np.float32)
        out[chatrwkv_to_mlc(key)] = x
    return out


def from_mlc_weights(
    weights: Mapping[str, object], *, version: str, rescale_every: int = 0, transforms: bool = True
) -> dict[str, np.ndarray]:
    """The inverse of ``to_mlc_weights``: MLC-style (transformed) weights -> raw ChatRWKV keys."""
    out: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        key = mlc_to_chatrwkv(name)
        x = np.asarray(value, dtype=np.float32)
        t = _rescale_exponent(key, rescale_every)
        if t:
            x = (x * np.float32(2**t)).astype(np.float32)
        transform = load_transform(key, version=version) if transforms else None
        if transform is not None:
            x = transform.inverse(x).astype(np.float32)
        out[key] = x
    return out


def name_table(keys: list[str], *, version: str) -> list[dict[str, str]]:
    """One row per ChatRWKV key: its HF and MLC-style names and the load-time transform ('' if none)."""
    rows = []
    for key in keys:
        transform = load_transform(key, version=version)
        rows.append({"chatrwkv": key, "hf": chatrwkv_to_hf(key), "mlc": chatrwkv_to_mlc(key),
                     "transform": transform.what if transform else ""})
    return rows
