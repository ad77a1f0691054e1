"""ChatRWKV's int8 weights (``cpu fp32i8`` / ``cuda fp16i8``), dequantised exactly as the official package does.

For every matmul weight (not emb), stored as the package stores it, transposed to (in = N, out = M):
if N > M subtract the row minimum my, then the column minimum mx; else mx first, then my. Then
rx = column max, W /= rx; ry = row max, W /= ry; q = clip(floor(256 W), 0, 255) as uint8, with rx
and ry kept divided by 16. Each matmul then uses (q + 0.5) * ry * rx + my + mx, computed in the
activation dtype (docs/RWKV.md §3: ~6.4e-3 relative weight error). The reference applies that
dequantised matrix in place of the weight, so it computes what the package computes from the
same uint8 codes; everything else (state, scan, GroupNorm) is untouched.
"""

from __future__ import annotations

import torch

# The checkpoint keys the package quantises: every 2-D matmul weight; emb stays a lookup table.
_MATMUL_SUFFIXES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.gate.weight",
                    "att.output.weight", "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")


def quantized_keys(weights: dict) -> list[str]:
    return [k for k in weights if k == "head.weight" or k.endswith(_MATMUL_SUFFIXES)]


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The package's uint8 codes and offsets/scales of one (out, in) weight: q, mx, rx, my, ry (fp32)."""
    w = weight.float().t()  # (N = in, M = out), as the package keeps it
    if w.shape[0] > w.shape[1]:
        my = torch.amin(w, dim=1).unsqueeze(1)
        w = w - my
        mx = torch.amin(w, dim=0)
        w = w - mx
    else:
        mx = torch.amin(w, dim=0)
        w = w - mx
        my = torch.amin(w, dim=1).unsqueeze(1)
        w = w - my
    rx = torch.amax(w, dim=0)
    w = w / rx
    ry = torch.amax(w, dim=1).unsqueeze(1)
    w = w / ry
    q = torch.clip(torch.floor(w * 256), min=0, max=255).to(torch.uint8)
    return {"q": q, "mx": mx, "rx": rx / 16, "my": my, "ry": ry / 16}


def dequantize(parts: dict[str, torch.Tensor], *, dtype: torch.dtype) -> torch.Tensor:
    """(q + 0.5) * ry * rx + my + mx in ``dtype`` (the package's atype), returned as (out, in)."""
    mx, rx, my, ry = (parts[k].to(dtype) for k in ("mx", "rx", "my", "ry"))
    return ((parts["q"].to(dtype) + 0.5) * ry * rx + my + mx).t()


def int8_weights(weights: dict[str, torch.Tensor], *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weights`` with every quantised matrix replaced by its dequantised (out, in) version in ``dtype``."""
    out = dict(weights)
    for key in quantized_keys(weights):
        out[key] = dequantize(quantize(weights[key]), dtype=dtype)
    return out
