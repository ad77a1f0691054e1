"""Porting bugs injected into the TVM model, one small subclass each (see the catalogue).

Each overrides exactly one replaceable part of the real model (parity/compiled/), so the rest of
the graph — and therefore every other stage — is the real one.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend.nn import Tensor, op

from parity.compiled.common import Block, Taps
from parity.compiled.rwkv4_model import Attention4, RWKV4Model
from parity.compiled.rwkv5_model import Attention, GroupNorm, RWKV5Model
from parity.mutants import kernels


# -- attention ------------------------------------------------------------------------------------
class SigmoidOnR(Attention):
    def receptance_act(self, r: Tensor) -> Tensor:
        return op.sigmoid(r)  # BUG: the v4 habit; v5 has no sigmoid on r


class DecayExp(Attention):
    def decay_and_bonus(self):
        _, u = super().decay_and_bonus()
        return op.exp(self.time_decay), u  # BUG: exp(time_decay), not exp(-exp(time_decay))


class DecayNegExp(Attention):
    def decay_and_bonus(self):
        _, u = super().decay_and_bonus()
        return op.negative(op.exp(self.time_decay)), u  # BUG: the v4 log-space decay used as w


class StateTransposed(Attention):
    def kernel_state(self, att_kv: Tensor) -> Tensor:
        # BUG: the kernel was written for [h, v, k] and the transpose around the call dropped — or
        # here, added where none is needed. N x N, so every shape stays right.
        return op.permute_dims(att_kv, [0, 2, 1])


class TimeNotRecurrent(Attention):
    kernel = kernels.wkv5_time_not_recurrent


class Fp16Accumulator(Attention):
    kernel = kernels.wkv5_fp16_accumulator


class WritesInputState(Attention):
    kernel = kernels.wkv5_writes_input_state


class TimeParallelCPU(Attention):
    kernel = kernels.wkv5_time_parallel_cpu


class TimeOnThreads(Attention):
    kernel = kernels.wkv5_time_on_threads_llvm


class KeyOnThreads(Attention):
    kernel = kernels.wkv5_key_on_threads_llvm


class MissingBarrier(Attention):
    kernel = kernels.wkv5_two_phase_llvm


class KVSwappedBinding(Attention):
    kernel = kernels.wkv5_kv_swapped_llvm


class GroupNormOverTime(GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        # BUG: statistics per head over (T, N) — over time too. A decode (T = 1) is still exact.
        T, C = x.shape
        G = self.num_groups
        xg = op.reshape(x, (T, G, C // G))
        ones = xg * 0.0 + 1.0  # T is symbolic: count the elements the same way they are summed
        count = op.sum(op.sum(ones, axis=2, keepdims=True), axis=0, keepdims=True)
        mean = op.divide(op.sum(op.sum(xg, axis=2, keepdims=True), axis=0, keepdims=True), count)
        centred = xg - mean
        var = op.divide(op.sum(op.sum(centred * centred, axis=2, keepdims=True), axis=0, keepdims=True), count)
        y = op.reshape(centred / op.sqrt(var + self.eps), (T, C))
        return y * self.weight + self.bias


class GroupNormChannelAxis(GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        # BUG: (T, C) split as (T, N, H) instead of (T, H, N): each "group" takes every H-th channel.
        T, C = x.shape
        G = self.num_groups
        xg = op.permute_dims(op.reshape(x, (T, C // G, G)), [0, 2, 1])
        inv_n = 1.0 / (C // G)
        mean = op.sum(xg, axis=2, keepdims=True) * inv_n
        centred = xg - mean
        var = op.sum(centred * centred, axis=2, keepdims=True) * inv_n
        y = op.reshape(op.permute_dims(centred / op.sqrt(var + self.eps), [0, 2, 1]), (T, C))
        return y * self.weight + self.bias


class Eps1e5GroupNorm(GroupNorm):
    def __init__(self, num_groups: int, num_channels: int, *, eps: float):
        super().__init__(num_groups, num_channels, eps=1e-5)  # BUG: the old ports' eps, not 64e-5


def _attention(group_norm_cls):
    return type(f"AttentionWith{group_norm_cls.__name__}", (Attention,), {"group_norm_cls": group_norm_cls})


# -- token shift ----------------------------------------------------------------------------------
def token_shift_off_by_one(xx: te.Tensor, last: te.Tensor) -> te.Tensor:
    # BUG: row t takes xx[t-2] (rows 0 and 1 take the carried state).
    return te.compute(xx.shape, lambda t, c: tirx.if_then_else(t <= 1, last[c], xx[t - 2, c]), name="token_shift")


class ShiftOffByOne(Block):
    shift = staticmethod(token_shift_off_by_one)


# -- models ---------------------------------------------------------------------------------------
def v5_model(*, attention=Attention, block=Block, embed=None):
    body = {"attention_cls": attention, "block_cls": block}
    if embed is not None:
        body["embed"] = embed
    return type("MutantRWKV5Model", (RWKV5Model,), body)


def _embed_without_ln0(self, ids: Tensor, tap: Taps) -> Tensor:
    x = self.emb(ids)  # BUG: ln0 forgotten (the official package folds it into the table at load)
    tap("emb", x)
    return x


def _embed_ln0_twice(self, ids: Tensor, tap: Taps) -> Tensor:
    ln0 = self.blocks[0].ln0
    x = ln0(ln0(self.emb(ids)))  # BUG: folded into the table *and* applied again at run time
    tap("emb", x)
    return x


class NaiveWkv4(Attention4):
    kernel = kernels.wkv4_naive_fp16


MODELS = {
    "sigmoid-r": v5_model(attention=SigmoidOnR),
    "decay-exp": v5_model(attention=DecayExp),
    "decay-neg-exp": v5_model(attention=DecayNegExp),
    "state-transposed": v5_model(attention=StateTransposed),
    "wkv-time-not-recurrent": v5_model(attention=TimeNotRecurrent),
    "wkv-fp16-accumulator": v5_model(attention=Fp16Accumulator),
    "kernel-writes-input-state": v5_model(attention=WritesInputState),
    "groupnorm-over-time": v5_model(attention=_attention(GroupNormOverTime)),
    "groupnorm-channel-axis": v5_model(attention=_attention(GroupNormChannelAxis)),
    "groupnorm-eps-1e-5": v5_model(attention=_attention(Eps1e5GroupNorm)),
    "token-shift-off-by-one": v5_model(block=ShiftOffByOne),
    "emb-without-ln0": v5_model(embed=_embed_without_ln0),
    "emb-ln0-twice": v5_model(embed=_embed_ln0_twice),
    "v4-wkv-without-max": type("MutantRWKV4Model", (RWKV4Model,), {"attention_cls": NaiveWkv4}),
    "wkv-time-parallel-cpu": v5_model(attention=TimeParallelCPU),
    # GPU-only: correct as written (the llvm build), broken once scheduled onto CUDA threads.
    "wkv-time-on-threads": v5_model(attention=TimeOnThreads),
    "wkv-key-on-threads-race": v5_model(attention=KeyOnThreads),
    "wkv-missing-barrier": v5_model(attention=MissingBarrier),
    "wkv-kv-swapped-binding": v5_model(attention=KVSwappedBinding),
}


def builds_for(name: str, target: str) -> bool:
    """Whether mutant ``name`` has a build for ``target`` (a CUDA build needs a CUDA scan kernel)."""
    from parity.compiled.targets import has_cuda_kernel

    if target == "llvm":
        return True
    model_cls = model_class(name)
    return has_cuda_kernel(model_cls.attention_cls.kernel)


def model_class(name: str):
    """The model class of compiled mutant ``name``: this file's, or a family's own file
    (parity/mutants/crash_models.py: crashes and hangs; precision_models.py: precision bugs)."""
    if name in MODELS:
        return MODELS[name]
    from parity.mutants import crash_models, precision_models, quant_models

    for family in (crash_models, precision_models, quant_models):
        if name in family.MODELS:
            return family.MODELS[name]
    raise KeyError(name)
