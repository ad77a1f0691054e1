"""RWKV-4 as a TVM Relax ``nn.Module``, parameters named like the checkpoint.

Only the attention differs from v5: r = sigmoid(xr·Wr); the wkv is the stable (aa, bb, pp) scan of
wkv4_kernel.py with w = -exp(time_decay) computed in the graph and u = time_first raw; no
GroupNorm, no gate; att.output takes r·wkv. State per layer: att_x (C,), aa, bb, pp (A,) fp32,
ffn_x (C,); a fresh state has pp = -1e30 (as the official package), everything else 0.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from parity.checkpoint import ModelConfig
from parity.compiled.common import Linear, RWKVModel, StateLayout, Taps, time_mix, to_dtype
from parity.compiled.wkv4_kernel import wkv4

PP_INIT = -1e30


def state_layout(config: ModelConfig) -> StateLayout:
    C, A = config.n_embd, config.dim_att
    return StateLayout(
        slots=("att_x", "aa", "bb", "pp", "ffn_x"),
        shapes=((C,), (A,), (A,), (A,), (C,)),
        fill=(0.0, 0.0, 0.0, PP_INIT, 0.0),
    )


class Attention4(nn.Module):
    kernel = wkv4  # a class attribute, so the bug zoo can swap in a broken scan

    def __init__(self, config: ModelConfig, *, dtype: str = "float32"):
        C, A = config.n_embd, config.dim_att
        self.config = config
        self.dtype = dtype
        self.time_mix_k = nn.Parameter((1, 1, C), dtype)
        self.time_mix_v = nn.Parameter((1, 1, C), dtype)
        self.time_mix_r = nn.Parameter((1, 1, C), dtype)
        self.time_decay = nn.Parameter((A,), "float32")  # decay and bonus fp32 whatever the dtype
        self.time_first = nn.Parameter((A,), "float32")
        self.key = Linear(C, A, dtype=dtype)
        self.value = Linear(C, A, dtype=dtype)
        self.receptance = Linear(C, A, dtype=dtype)
        self.output = Linear(A, C, dtype=dtype)

    def mixes(self) -> list[Tensor]:
        """The time-mix μ (k, v, r), in the order ``forward`` takes its ``mixed`` inputs."""
        return [self.time_mix_k, self.time_mix_v, self.time_mix_r]

    def forward(self, xx: Tensor, sx: Tensor, aa: Tensor, bb: Tensor, pp: Tensor, *, layer: int, tap: Taps,
                mixed: list[Tensor] | None = None):
        """(T, C) inputs and this layer's (aa, bb, pp) -> (att.out, (aa, bb, pp)). ``mixed``:
        ``time_mix(xx, sx, self.mixes())`` when the caller made it already (common.Block does)."""
        T = xx.shape[0]
        A = self.config.dim_att
        pre = f"L{layer}.att."
        xk, xv, xr = mixed or time_mix(xx, sx, self.mixes())
        for name, val in (("xk", xk), ("xv", xv), ("xr", xr)):
            tap(pre + name, val)
        r = op.sigmoid(self.receptance(xr))  # v4: sigmoid on r
        k = self.key(xk)
        v = self.value(xv)
        for name, val in (("r", r), ("k", k), ("v", v)):
            tap(pre + name, val)
        w = op.negative(op.exp(self.time_decay))  # log-space decay, fp32
        wkv, aa2, bb2, pp2 = op.tensor_ir_op(
            self.kernel,
            "wkv4",
            args=[to_dtype(k, "float32"), to_dtype(v, "float32"), w, self.time_first, aa, bb, pp],
            out=[Tensor.placeholder((T, A), "float32")] + [Tensor.placeholder((A,), "float32")] * 3,
        )
        tap(pre + "wkv", wkv)
        gated = r * to_dtype(wkv, self.dtype)
        tap(pre + "gated", gated)
        out = self.output(gated)
        tap(pre + "out", out)
        return out, (aa2, bb2, pp2)


class RWKV4Model(RWKVModel):
    attention_cls = Attention4

    def __init__(self, config: ModelConfig, *, debug: bool = False, dtype: str = "float32"):
        super().__init__(config, attention=self.attention_cls, layout=state_layout(config), debug=debug, dtype=dtype)
