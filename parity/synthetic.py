"""Realistic random RWKV-4 / RWKV-5.x weights (docs/RWKV.md §6), deterministic by seed.

Random weights with the training init's *structure* (decay spread across channels, time-mix
ramps, orthogonal matrices, non-trivial LayerNorms) exercise the same numerics as a real model:
long- and short-memory heads, values of realistic size after every stage. Plain N(0,1) weights
would not — their logits saturate and their decays are meaningless.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch

from parity.checkpoint import ModelConfig, ModelVersion

# Decay profiles: where time_decay lives. "default" is the training init (−6 … −1, i.e. w from
# ≈0.998 down to ≈0.69); "long" is a long-memory model (−9 … −6: w ≥ 0.9975, thousands of tokens).
DECAY_PROFILES = {"default": (-6.0, 5.0), "long": (-9.0, 3.0)}


def ffn_size(n_embd: int, *, version: ModelVersion = ModelVersion.V5_2) -> int:
    """v4: 4C. v5: int(3.5 C) rounded down to a multiple of 32."""
    if version == ModelVersion.V4:
        return 4 * n_embd
    return int(3.5 * n_embd) // 32 * 32


def make_config(
    *, n_layer: int, n_embd: int, head_size: int | None = None, vocab_size: int, version: str = "5.2"
) -> ModelConfig:
    v = ModelVersion(version)
    if v == ModelVersion.V4:
        n_head, head_size = 1, n_embd  # v4 has no heads: one "head" spanning every channel
    elif head_size is None:
        raise ValueError("RWKV-5 needs a head size")
    else:
        n_head = n_embd // head_size
    return ModelConfig(
        version=v,
        n_layer=n_layer,
        n_embd=n_embd,
        dim_att=n_embd,
        dim_ffn=ffn_size(n_embd, version=v),
        n_head=n_head,
        head_size=head_size,
        vocab_size=vocab_size,
    )


def _orthogonal(rows: int, cols: int, *, gain: float, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64)
    # $PARITY_SYNTH_DEVICE=cuda: the QR (almost all of a released shape's synth time) on a GPU. The
    # same seed draws the same matrix, but Q then differs from the CPU's in its last bits: use it
    # for throwaway scale checkpoints (scripts/scale-job), never for the bundled fixtures.
    device = os.environ.get("PARITY_SYNTH_DEVICE")
    if device:
        a = a.to(device)
    q, r = torch.linalg.qr(a)
    del a  # in place from here: a released head (65536 x C) is 0.5-2 GB per float64 copy
    q.mul_(torch.sign(torch.diagonal(r)))  # unique, uniformly distributed Q
    q.mul_(gain)
    if rows < cols:
        q = q.T
    return q.to(torch.float32).cpu().contiguous()


def _linear(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    return _orthogonal(rows, cols, gain=gain, gen=gen)


def stored(key: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor as released checkpoints (and our fixtures and ``parity synth``) store it: bf16,
    except emb.weight in fp32. The official package applies ln0 to the table in the file's dtype
    when emb and ln0 share it, so a bf16 table would give it a bf16-rounded embedding (≈4e-3
    relative) that no fp32 backend reproduces — a real trap, but not one a parity run should trip on."""
    return (t.float() if key == "emb.weight" else t.to(torch.bfloat16)).contiguous()


def make_weights(config: ModelConfig, *, seed: int, decay_profile: str = "default") -> dict[str, torch.Tensor]:
    """A ChatRWKV-layout state dict (fp32) for ``config``, any supported version."""
    return {key: t for part in iter_weights(config, seed=seed, decay_profile=decay_profile) for key, t in part.items()}


def iter_weights(config: ModelConfig, *, seed: int, decay_profile: str = "default") -> Iterator[dict[str, torch.Tensor]]:
    """The same weights as ``make_weights``, in parts: the embedding (with ln0), then one dict per
    layer, then ln_out and the head. A writer that stores each part before asking for the next
    holds one layer at a time (a 3B model: ~0.4 GB instead of 12 GB of fp32)."""
    version = config.version
    gen = torch.Generator().manual_seed(seed)
    C, A, F, V, H, N, L = (config.n_embd, config.dim_att, config.dim_ffn, config.vocab_size,
                           config.n_head, config.head_size, config.n_layer)
    decay_lo, decay_span = DECAY_PROFILES[decay_profile]
    ddd = torch.arange(C, dtype=torch.float64) / C
    n = torch.arange(A, dtype=torch.float64)

    def ln_pair(prefix: str) -> None:
        w[f"{prefix}.weight"] = (1 + 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).float()
        w[f"{prefix}.bias"] = (0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).float()

    def mix(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, 1, C).float()

    w: dict[str, torch.Tensor] = {}
    w["emb.weight"] = ((torch.rand(V, C, generator=gen, dtype=torch.float64) * 2 - 1) * 1e-4).float()
    ln_pair("blocks.0.ln0")
    # Yield a part, then start the next in a fresh dict: the same draws, in the same order, as
    # building one dict (the fixtures are regenerated from this bit for bit).
    yield w
    for layer in range(L):
        w = {}
        r01 = layer / (L - 1) if L > 1 else 0.0
        r10 = 1 - layer / L
        b = f"blocks.{layer}"
        ln_pair(f"{b}.ln1")
        ln_pair(f"{b}.ln2")
        w[f"{b}.att.time_mix_k"] = mix(ddd**r10)
        w[f"{b}.att.time_mix_v"] = mix(ddd**r10 + 0.3 * r01)
        w[f"{b}.att.time_mix_r"] = mix(ddd ** (0.5 * r10))
        if version.gated:
            w[f"{b}.att.time_mix_g"] = mix(ddd ** (0.5 * r10))
        if version == ModelVersion.V4:
            # v4 decay spans −5 … 3 before w = −exp(decay); time_first alternates around ln 0.3.
            w[f"{b}.att.time_decay"] = (-5 + 8 * (n / (A - 1)) ** (0.7 + 1.3 * r01)).float()
            w[f"{b}.att.time_first"] = (math.log(0.3) + 0.5 * ((n + 1) % 3 - 1)).float()
        elif version == ModelVersion.V5_2:
            decay = decay_lo + decay_span * (n / (A - 1)) ** (0.7 + 1.3 * r01)
            faaaa = r01 * (1 - n / (A - 1)) + 0.1 * ((n + 1) % 3 - 1)
            w[f"{b}.att.time_decay"] = decay.reshape(H, N).float()
            w[f"{b}.att.time_faaaa"] = faaaa.reshape(H, N).float()
        else:
            # 5.0/5.1: the same profile, one value per head; u = exp(time_first) around 0.3.
            h = torch.arange(H, dtype=torch.float64)
            frac = h / (H - 1) if H > 1 else h
            w[f"{b}.att.time_decay"] = (decay_lo + decay_span * frac ** (0.7 + 1.3 * r01)).float()
            w[f"{b}.att.time_first"] = (math.log(0.3) + 0.5 * ((h + 1) % 3 - 1)).float()
        for name in ("receptance", "key", "value") + (("gate",) if version.gated else ()):
            w[f"{b}.att.{name}.weight"] = _linear(A, C, gen)
        w[f"{b}.att.output.weight"] = _linear(C, A, gen)
        if version != ModelVersion.V4:
            w[f"{b}.att.ln_x.weight"] = torch.full((A,), ((layer + 1) / L) ** 0.7)
            w[f"{b}.att.ln_x.bias"] = (0.1 * torch.randn(A, generator=gen, dtype=torch.float64)).float()
        w[f"{b}.ffn.time_mix_k"] = mix(ddd**r10)
        w[f"{b}.ffn.time_mix_r"] = mix(ddd**r10)
        w[f"{b}.ffn.key.weight"] = _linear(F, C, gen)
        w[f"{b}.ffn.receptance.weight"] = _linear(C, C, gen)
        w[f"{b}.ffn.value.weight"] = _linear(C, F, gen)
        yield w
    w = {}
    ln_pair("ln_out")
    w["head.weight"] = _orthogonal(V, C, gain=0.5 * math.sqrt(V / C), gen=gen)
    yield w

