"""MLC-LLM's q4f16_1 group quantisation: 4-bit codes packed 8 to a uint32, one fp16 scale per group of 32.

As MLC-LLM's ``GroupQuantize`` (python/mlc_llm/quantization/group_quantization.py, q4f16_1:
group_size 32, int4 in uint32 storage, model dtype float16, weight layout NK) does it, for one
(out, in) weight already in fp16:
    groups      of 32 consecutive elements along the *input* axis; the last one shorter when in % 32
                (MLC's ceildiv; its missing elements are packed as code 0 and never read);
    scale       max|w| over the group (fp16) / 7, computed in fp16 (max_int = 2^(4-1) - 1 = 7);
    code        q = clip(round(w / scale + 7), 0, 14) with fp16 arithmetic (symmetric: 0 -> 7);
                rounding half to even (TVM lowers ``tir.round`` on llvm to nearbyint);
    packing     element j of each run of 8 along the input axis in bits [4j, 4j + 4) of one uint32
                (MLC's ``pack_weight``: the lowest element in the lowest bits);
    dequantised value = (q - 7) * scale, in fp16 (MLC's ``_dequantize``).
A group of zeros has scale 0; MLC then divides 0 by 0. Here its codes are 7, so it dequantises to
exact zeros, which is what the weights held (our synthetic fixtures have no such group; a trained
model none either, but a pruned one might).

What is quantised: every matmul weight and the head (MLC quantises the final fc in q4f16_1), the
same keys as the int8 scheme (parity/reference/int8.py). The embedding stays fp32 here although MLC
quantises it too: our models normalise the table by ln0 in fp32 first (as the official package
does at load), and a quantised table would need a q4 lookup in the compiled embedding as well —
not built yet; the weights every matmul kernel reads are the ones this scheme tests.
"""

from __future__ import annotations

import torch

from parity.reference.int8 import quantized_keys

GROUP_SIZE = 32
MAX_INT = 7  # 2 ** (bits - 1) - 1 for 4 bits
PER_WORD = 8  # 32-bit storage / 4-bit codes


def n_groups(in_features: int) -> int:
    return -(-in_features // GROUP_SIZE)


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One (out, in) weight -> {"q": (out, n_groups * 4) uint32 as int64, "scale": (out, n_groups) fp16}.

    torch has no uint32 arithmetic we need; the packed words are returned as int64 holding the
    unsigned value (0 <= word < 2^32), and the runtime binds them as uint32."""
    w = weight.to(torch.float16)
    out_f, in_f = w.shape
    g = n_groups(in_f)
    pad = g * GROUP_SIZE - in_f
    # Padding with zeros cannot raise a group's max|w|, so the scale is that of the real elements.
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, g, GROUP_SIZE)
    scale = wp.abs().amax(dim=2) / torch.tensor(MAX_INT, dtype=torch.float16)  # fp16 / fp16 -> fp16
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    code = torch.round(wp / safe.unsqueeze(2) + torch.tensor(MAX_INT, dtype=torch.float16))
    code = torch.where((scale == 0).unsqueeze(2), torch.full_like(code, MAX_INT), code)
    code = code.clamp(0, 2 * MAX_INT).to(torch.int64).reshape(out_f, g * GROUP_SIZE)
    if pad:
        code[:, in_f:] = 0  # MLC packs missing elements as 0 bits
    return {"q": pack(code), "scale": scale}


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(rows, 8k) codes in [0, 15] -> (rows, k) words: code j of each 8 in bits [4j, 4j + 4)."""
    rows, n = codes.shape
    shifts = torch.arange(PER_WORD, dtype=torch.int64, device=codes.device) * 4
    return (codes.reshape(rows, n // PER_WORD, PER_WORD) << shifts).sum(dim=2)


def unpack(words: torch.Tensor, *, in_features: int) -> torch.Tensor:
    """(rows, k) words -> (rows, in_features) codes (the padding dropped)."""
    shifts = torch.arange(PER_WORD, dtype=torch.int64, device=words.device) * 4
    codes = (words.to(torch.int64).unsqueeze(2) >> shifts) & 0xF
    return codes.reshape(words.shape[0], -1)[:, :in_features]


def dequantize(parts: dict[str, torch.Tensor], *, in_features: int) -> torch.Tensor:
    """(q - 7) * scale in fp16, as MLC's kernel computes it: the (out, in) fp16 weight."""
    codes = unpack(parts["q"], in_features=in_features).to(torch.float16)
    scale = parts["scale"].to(torch.float16).repeat_interleave(GROUP_SIZE, dim=1)[:, :in_features]
    return (codes - MAX_INT) * scale


def q4_weights(weights: dict[str, torch.Tensor], *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weights`` with every quantised matrix replaced by its dequantised (out, in) version in ``dtype``
    (fp16 for q4f16_1: the dequantised values are fp16 numbers; any wider dtype holds them exactly)."""
    out = dict(weights)
    for key in quantized_keys(weights):
        w = weights[key]
        out[key] = dequantize(quantize(w), in_features=w.shape[1]).to(dtype)
    return out
