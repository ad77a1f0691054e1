"""Precision bugs injected into the TVM model (the precision mutants of parity/mutants/precision.py).

Kept apart from compiled.py so the families grow independently; ``model_class`` looks here. Each is
a real low-precision build (parity/compiled/common.py) with one precision trap of docs/RWKV.md §3
put back in: everything else rounds exactly as the correct fp16/bf16 build does.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend.nn import Tensor, op

from parity.compiled.common import to_dtype
from parity.compiled.rwkv4_model import RWKV4Model
from parity.compiled.rwkv5_model import Attention, GroupNorm, RWKV5Model


def round_to_bf16(x: te.Tensor) -> te.Tensor:
    """fp32 -> the nearest bf16 (ties to even), kept in fp32: the rounding a bf16 store makes.

    Written with bits, not casts: TVM's bf16 legalisation computes bf16 arithmetic in fp32 and rounds
    only at buffer stores, so a cast inside a fused kernel would never round anything."""
    def rnd(*i):
        u = tirx.reinterpret("uint32", x[i])
        u = (u + tirx.const(0x7FFF, "uint32") + ((u >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))) \
            & tirx.const(0xFFFF0000, "uint32")
        return tirx.reinterpret("float32", u)

    return te.compute(x.shape, rnd, name="round_to_bf16")


class DecayInBF16(Attention):
    def decay_and_bonus(self):
        _, u = super().decay_and_bonus()
        # BUG: w = exp(-exp(time_decay)) computed from a bf16 time_decay and kept in bf16 (8 bits of
        # mantissa): every w above 1 - 2^-9 becomes 1.0 (no decay at all), the rest lose up to
        # 0.4% — compounded every token.
        decay = op.tensor_expr_op(round_to_bf16, "round_to_bf16", [self.time_decay])
        w = op.tensor_expr_op(round_to_bf16, "round_to_bf16", [op.exp(op.negative(op.exp(decay)))])
        if not self.per_channel:
            H, N = self.config.n_head, self.config.head_size
            w = op.broadcast_to(op.reshape(w, (H, 1)), (H, N))
        return w, u


class GroupNormVarianceFP16(GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        T, C = x.shape
        G = self.num_groups
        xg = op.reshape(x, (T, G, C // G))
        inv_n = 1.0 / (C // G)
        mean = op.sum(xg, axis=2, keepdims=True) * inv_n
        # BUG: the variance as E[x^2] - E[x]^2 in fp16 (what a "half the memory" port of topi's
        # group_norm computes): the two terms agree to most of fp16's 11 bits wherever a head's
        # |mean| exceeds its spread, and their difference keeps only the rounding.
        x16, m16 = to_dtype(xg, "float16"), to_dtype(mean, "float16")
        var16 = op.sum(x16 * x16, axis=2, keepdims=True) * inv_n - m16 * m16
        var = op.maximum(to_dtype(var16, "float32"), op.zeros((1,), "float32"))
        y = op.reshape((xg - mean) / op.sqrt(var + self.eps), (T, C))
        return y * self.weight + self.bias


class _AttentionWithGroupNormFP16(Attention):
    group_norm_cls = GroupNormVarianceFP16


class _DecayBF16Model(RWKV5Model):
    attention_cls = DecayInBF16


class _GroupNormFP16Model(RWKV5Model):
    attention_cls = _AttentionWithGroupNormFP16


class _LogitsFP16Model(RWKV5Model):
    def run_head(self, x: Tensor, tap):
        x = self.ln_out(x)
        tap("ln_out", x)
        # BUG: an fp32 port that hands its logits over in fp16 (half the memory for a 65k vocab):
        # 11 bits of mantissa, so a logit of 20 moves in steps of 0.016 and near-ties flip.
        logits = to_dtype(op.add(to_dtype(self.head(x), "float16"), op.zeros((1,), "float16")), "float32")
        tap("logits", logits)
        return logits


class _RWKV4FP16NoRescale(RWKV4Model):
    """An fp16 RWKV-4 port that left out the official package's residual rescale."""

    def __init__(self, config, *, debug: bool = False, dtype: str = "float32"):
        super().__init__(config, debug=debug, dtype=dtype)
        # BUG: RESCALE_LAYER 0 in fp16 — att.output and ffn.value kept whole and the stream never
        # halved, so a residual stream past 65,504 (fp16's largest finite) becomes Inf. The stream
        # is then canonical everywhere: no tap to multiply back, no parameter divided at load.
        self.rescale_layer = 0
        self.stream_scales = {}

    def param_scales(self) -> dict[str, float]:
        return {}

    def _stream_in(self, layer: int, x: Tensor) -> Tensor:
        return to_dtype(x, self.dtype)  # the isolated entry points take the canonical stream as is


MODELS: dict = {
    "decay-in-bf16": _DecayBF16Model,
    "groupnorm-variance-fp16": _GroupNormFP16Model,
    "logits-fp16": _LogitsFP16Model,
    "rwkv4-fp16-no-rescale": _RWKV4FP16NoRescale,
}
