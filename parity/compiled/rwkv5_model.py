"""RWKV-5.2 as a TVM Relax ``nn.Module`` (the MLC-LLM way), parameters named like the checkpoint.

Parameter names equal the ChatRWKV keys (``blocks.0.att.key.weight`` …), so the same state dict
feeds this model and the torch reference with no renaming. Raw checkpoint values go in; the
transforms the official package applies at load (E = LN(emb; ln0), w = exp(-exp(time_decay)))
happen in the graph, so no second copy of that mapping exists anywhere.

Entry points (explicit state, no hidden KV cache):
    prefill(ids (seq_len,), state) -> (logits (seq_len, V), new_state[, taps])
    decode (ids (1,),       state) -> (logits (1, V),       new_state[, taps])
``state`` is a flat tuple of 3·L tensors in ``state_slot_names`` order: per layer att_x (C,),
att_kv (H, N, N) fp32 [head, k, v], ffn_x (C,). The debug build also returns every canonical
stage ("taps"), in ``tap_names`` order.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from parity.checkpoint import ModelConfig
from parity.compiled.wkv5_kernel import wkv5
from parity.stages import V5_STATE_SLOTS

LN_EPS = 1e-5
LN_X_EPS = 64e-5  # the official package since 0.8.21; older ports used 1e-5 (docs/RWKV.md §2)


def state_slot_names(config: ModelConfig) -> list[str]:
    return [f"state.L{layer}.{slot}" for layer in range(config.n_layer) for slot in V5_STATE_SLOTS]


def state_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    C, H, N = config.n_embd, config.n_head, config.head_size
    return [shape for _ in range(config.n_layer) for shape in ((C,), (H, N, N), (C,))]


def _token_shift(xx: te.Tensor, last: te.Tensor) -> te.Tensor:
    # Row t is xx[t-1]; row 0 is the carried state. if_then_else evaluates only the taken branch,
    # so xx[-1] is never read.
    return te.compute(
        xx.shape, lambda t, c: tirx.if_then_else(t == 0, last[c], xx[t - 1, c]), name="token_shift"
    )


def _last_row(xx: te.Tensor) -> te.Tensor:
    return te.compute((xx.shape[1],), lambda c: xx[xx.shape[0] - 1, c], name="last_row")


class GroupNorm(nn.Module):
    """GroupNorm over the last axis in H groups, two-pass: mean first, then mean((x - mean)^2).

    Not ``nn.GroupNorm``: TVM's topi group_norm computes var = E[x^2] - E[x]^2 in fp32, which
    cancels catastrophically when a head's |mean| is much larger than its spread — routine for
    wkv outputs (values ~100, spread ~1). This harness measured it: 2e-4 error on ln_x and 1e-3
    on the logits of the bundled 4-layer fixture after 14 tokens, ten times the torch reference's
    own error against float64. Parameter names (weight, bias) match the checkpoint's ln_x keys.
    """

    def __init__(self, num_groups: int, num_channels: int, *, eps: float):
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter((num_channels,), "float32")
        self.bias = nn.Parameter((num_channels,), "float32")

    def forward(self, x: Tensor) -> Tensor:
        T, C = x.shape
        G = self.num_groups
        xg = op.reshape(x, (T, G, C // G))  # (T, H, N): per token, per head
        inv_n = 1.0 / (C // G)
        mean = op.sum(xg, axis=2, keepdims=True) * inv_n
        centred = xg - mean
        var = op.sum(centred * centred, axis=2, keepdims=True) * inv_n  # biased, like torch
        y = op.reshape(centred / op.sqrt(var + self.eps), (T, C))
        return y * self.weight + self.bias


class _Taps:
    """Collects named intermediates for the debug build; a no-op in the plain build."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.names: list[str] = []
        self.values: list[Tensor] = []

    def __call__(self, name: str, value: Tensor) -> None:
        if self.enabled:
            self.names.append(name)
            self.values.append(value)


def _lerp(xx: Tensor, sx: Tensor, mix: Tensor) -> Tensor:
    # Same operation order as the reference: xx*μ + sx*(1-μ).
    return xx * mix + sx * (1.0 - mix)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        self.config = config
        self.time_mix_k = nn.Parameter((1, 1, C), "float32")
        self.time_mix_v = nn.Parameter((1, 1, C), "float32")
        self.time_mix_r = nn.Parameter((1, 1, C), "float32")
        self.time_mix_g = nn.Parameter((1, 1, C), "float32")
        self.time_decay = nn.Parameter((H, N), "float32")
        self.time_faaaa = nn.Parameter((H, N), "float32")
        self.receptance = nn.Linear(C, A, bias=False, dtype="float32")
        self.key = nn.Linear(C, A, bias=False, dtype="float32")
        self.value = nn.Linear(C, A, bias=False, dtype="float32")
        self.gate = nn.Linear(C, A, bias=False, dtype="float32")
        self.output = nn.Linear(A, C, bias=False, dtype="float32")
        self.ln_x = GroupNorm(H, A, eps=LN_X_EPS)

    def forward(self, xx: Tensor, sx: Tensor, att_kv: Tensor, *, layer: int, tap: _Taps):
        cfg = self.config
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        T = xx.shape[0]
        pre = f"L{layer}.att."

        def mix(p: nn.Parameter) -> Tensor:
            return op.reshape(p, (C,))

        xk = _lerp(xx, sx, mix(self.time_mix_k))
        xv = _lerp(xx, sx, mix(self.time_mix_v))
        xr = _lerp(xx, sx, mix(self.time_mix_r))
        xg = _lerp(xx, sx, mix(self.time_mix_g))
        for name, val in (("xk", xk), ("xv", xv), ("xr", xr), ("xg", xg)):
            tap(pre + name, val)
        r = self.receptance(xr)  # (T, A); v5: no sigmoid on r
        k = self.key(xk)
        v = self.value(xv)
        g = op.silu(self.gate(xg))
        for name, val in (("r", r), ("k", k), ("v", v), ("g", g)):
            tap(pre + name, val)
        w = op.exp(op.negative(op.exp(self.time_decay)))  # (H, N) decay, fp32
        wkv, new_kv = op.tensor_ir_op(
            wkv5,
            "wkv5",
            args=[op.reshape(r, (T, H, N)), op.reshape(k, (T, H, N)), op.reshape(v, (T, H, N)), w, self.time_faaaa, att_kv],
            out=[Tensor.placeholder((T, H, N), "float32"), Tensor.placeholder((H, N, N), "float32")],
        )
        wkv = op.reshape(wkv, (T, C))
        tap(pre + "wkv", wkv)
        # GroupNorm per token and head over the head's N channels; never over time.
        ln_x = self.ln_x(wkv)
        tap(pre + "ln_x", ln_x)
        gated = ln_x * g
        tap(pre + "gated", gated)
        out = self.output(gated)
        tap(pre + "out", out)
        return out, new_kv


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        C, F = config.n_embd, config.dim_ffn
        self.config = config
        self.time_mix_k = nn.Parameter((1, 1, C), "float32")
        self.time_mix_r = nn.Parameter((1, 1, C), "float32")
        self.key = nn.Linear(C, F, bias=False, dtype="float32")
        self.receptance = nn.Linear(C, C, bias=False, dtype="float32")
        self.value = nn.Linear(F, C, bias=False, dtype="float32")

    def forward(self, xx: Tensor, sx: Tensor, *, layer: int, tap: _Taps) -> Tensor:
        C = self.config.n_embd
        pre = f"L{layer}.ffn."
        xk = _lerp(xx, sx, op.reshape(self.time_mix_k, (C,)))
        xr = _lerp(xx, sx, op.reshape(self.time_mix_r, (C,)))
        tap(pre + "xk", xk)
        tap(pre + "xr", xr)
        r = op.sigmoid(self.receptance(xr))
        tap(pre + "r", r)
        k = op.square(op.relu(self.key(xk)))
        tap(pre + "k", k)
        out = r * self.value(k)
        tap(pre + "out", out)
        return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, *, layer: int):
        C = config.n_embd
        self.layer = layer
        if layer == 0:
            self.ln0 = nn.LayerNorm(C, eps=LN_EPS, dtype="float32")
        self.ln1 = nn.LayerNorm(C, eps=LN_EPS, dtype="float32")
        self.ln2 = nn.LayerNorm(C, eps=LN_EPS, dtype="float32")
        self.att = Attention(config)
        self.ffn = FeedForward(config)

    def forward(self, x: Tensor, att_x: Tensor, att_kv: Tensor, ffn_x: Tensor, *, tap: _Taps):
        i = self.layer
        xx = self.ln1(x)
        tap(f"L{i}.att.ln1", xx)
        sx = op.tensor_expr_op(_token_shift, "token_shift", [xx, att_x])
        tap(f"L{i}.att.shift", sx)
        att, new_kv = self.att(xx, sx, att_kv, layer=i, tap=tap)
        new_att_x = op.tensor_expr_op(_last_row, "last_row", [xx])
        x = x + att
        tap(f"L{i}.x_after_att", x)
        xx = self.ln2(x)
        tap(f"L{i}.ffn.ln2", xx)
        sx = op.tensor_expr_op(_token_shift, "token_shift", [xx, ffn_x])
        tap(f"L{i}.ffn.shift", sx)
        x = x + self.ffn(xx, sx, layer=i, tap=tap)
        tap(f"L{i}.x_out", x)
        new_ffn_x = op.tensor_expr_op(_last_row, "last_row", [xx])
        return x, (new_att_x, new_kv, new_ffn_x)


class RWKV5Model(nn.Module):
    def __init__(self, config: ModelConfig, *, debug: bool = False):
        self.config = config
        self.debug = debug
        self.emb = nn.Embedding(config.vocab_size, config.n_embd, dtype="float32")
        self.blocks = nn.ModuleList([Block(config, layer=i) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LN_EPS, dtype="float32")
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False, dtype="float32")
        self.tap_names: list[str] = []

    def _forward(self, ids: Tensor, state):
        tap = _Taps(self.debug)
        x = self.blocks[0].ln0(self.emb(ids))  # (T, C): ln0 per row == the official precomputed table
        tap("emb", x)
        new_state = []
        for i, block in enumerate(self.blocks):
            x, slots = block(x, *state[3 * i : 3 * i + 3], tap=tap)
            new_state += slots
        x = self.ln_out(x)
        tap("ln_out", x)
        logits = self.head(x)  # (T, V) fp32
        tap("logits", logits)
        self.tap_names = tap.names
        if self.debug:
            return logits, tuple(new_state), tuple(tap.values)
        return logits, tuple(new_state)

    def prefill(self, ids: Tensor, state):
        return self._forward(ids, state)

    def decode(self, ids: Tensor, state):
        return self._forward(ids, state)

    def get_default_spec(self):
        state_spec = [nn.spec.Tensor(list(shape), "float32") for shape in state_shapes(self.config)]
        mode = {"param_mode": "plain", "effect_mode": "none"}
        return nn.spec.ModuleSpec.from_raw(
            {
                "prefill": {"ids": nn.spec.Tensor(["seq_len"], "int32"), "state": state_spec, "$": mode},
                "decode": {"ids": nn.spec.Tensor([1], "int32"), "state": list(state_spec), "$": dict(mode)},
            },
            self,
        )
