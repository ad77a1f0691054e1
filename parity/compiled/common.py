"""Pieces every compiled model family shares: token shift, taps, the FFN, the state plumbing."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from parity.checkpoint import ModelConfig

LN_EPS = 1e-5


def token_shift(xx: te.Tensor, last: te.Tensor) -> te.Tensor:
    # Row t is xx[t-1]; row 0 is the carried state. if_then_else evaluates only the taken branch,
    # so xx[-1] is never read.
    return te.compute(
        xx.shape, lambda t, c: tirx.if_then_else(t == 0, last[c], xx[t - 1, c]), name="token_shift"
    )


def last_row(xx: te.Tensor) -> te.Tensor:
    return te.compute((xx.shape[1],), lambda c: xx[xx.shape[0] - 1, c], name="last_row")


class Taps:
    """Collects named intermediates for the debug build; a no-op in the plain build."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.names: list[str] = []
        self.values: list[Tensor] = []

    def __call__(self, name: str, value: Tensor) -> None:
        if self.enabled:
            self.names.append(name)
            self.values.append(value)


def lerp(xx: Tensor, sx: Tensor, mix: Tensor) -> Tensor:
    # Same operation order as the reference: xx*μ + sx*(1-μ).
    return xx * mix + sx * (1.0 - mix)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        C, F = config.n_embd, config.dim_ffn
        self.config = config
        self.time_mix_k = nn.Parameter((1, 1, C), "float32")
        self.time_mix_r = nn.Parameter((1, 1, C), "float32")
        self.key = nn.Linear(C, F, bias=False, dtype="float32")
        self.receptance = nn.Linear(C, C, bias=False, dtype="float32")
        self.value = nn.Linear(F, C, bias=False, dtype="float32")

    def forward(self, xx: Tensor, sx: Tensor, *, layer: int, tap: Taps) -> Tensor:
        C = self.config.n_embd
        pre = f"L{layer}.ffn."
        xk = lerp(xx, sx, op.reshape(self.time_mix_k, (C,)))
        xr = lerp(xx, sx, op.reshape(self.time_mix_r, (C,)))
        tap(pre + "xk", xk)
        tap(pre + "xr", xr)
        r = op.sigmoid(self.receptance(xr))
        tap(pre + "r", r)
        k = op.square(op.relu(self.key(xk)))
        tap(pre + "k", k)
        out = r * self.value(k)
        tap(pre + "out", out)
        return out


@dataclass(frozen=True)
class StateLayout:
    """A family's per-layer state: slot names (canonical), shapes, and the value a fresh state holds."""

    slots: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    fill: tuple[float, ...]

    def names(self, n_layer: int) -> list[str]:
        return [f"state.L{layer}.{slot}" for layer in range(n_layer) for slot in self.slots]

    def all_shapes(self, n_layer: int) -> list[tuple[int, ...]]:
        return [shape for _ in range(n_layer) for shape in self.shapes]

    def all_fills(self, n_layer: int) -> list[float]:
        return [f for _ in range(n_layer) for f in self.fill]


class Block(nn.Module):
    """One layer; the attention class is the family's (its state is everything between att_x and ffn_x).

    ``shift`` is a class attribute (the token-shift TE function) so a deliberately wrong model in
    the bug zoo can swap it without copying this class.
    """

    shift = staticmethod(token_shift)

    def __init__(self, config: ModelConfig, *, layer: int, attention: type):
        C = config.n_embd
        self.layer = layer
        if layer == 0:
            self.ln0 = nn.LayerNorm(C, eps=LN_EPS, dtype="float32")
        self.ln1 = nn.LayerNorm(C, eps=LN_EPS, dtype="float32")
        self.ln2 = nn.LayerNorm(C, eps=LN_EPS, dtype="float32")
        self.att = attention(config)
        self.ffn = FeedForward(config)

    def forward(self, x: Tensor, att_x: Tensor, att_state, ffn_x: Tensor, *, tap: Taps):
        i = self.layer
        xx = self.ln1(x)
        tap(f"L{i}.att.ln1", xx)
        sx = op.tensor_expr_op(self.shift, "token_shift", [xx, att_x])
        tap(f"L{i}.att.shift", sx)
        att, new_att_state = self.att(xx, sx, *att_state, layer=i, tap=tap)
        new_att_x = op.tensor_expr_op(last_row, "last_row", [xx])
        x = x + att
        tap(f"L{i}.x_after_att", x)
        xx = self.ln2(x)
        tap(f"L{i}.ffn.ln2", xx)
        sx = op.tensor_expr_op(self.shift, "token_shift", [xx, ffn_x])
        tap(f"L{i}.ffn.shift", sx)
        x = x + self.ffn(xx, sx, layer=i, tap=tap)
        tap(f"L{i}.x_out", x)
        new_ffn_x = op.tensor_expr_op(last_row, "last_row", [xx])
        return x, (new_att_x, *new_att_state, new_ffn_x)


class RWKVModel(nn.Module):
    """The model skeleton shared by the families: embedding + ln0, blocks, ln_out, head.

    Entry points (explicit state, no hidden KV cache):
        prefill(ids (seq_len,), state) -> (logits (seq_len, V), new_state[, taps])
        decode (ids (1,),       state) -> (logits (1, V),       new_state[, taps])
    ``state`` is a flat tuple in ``layout.names(n_layer)`` order; the debug build also returns
    every canonical stage ("taps") in ``tap_names`` order.

    The debug build also exports the model in pieces, for isolated (teacher-forced) runs in which
    each piece is fed the *reference's* input, so its error is its own and not inherited:
        iso_embed(ids)                 -> (x, taps)                 emb
        iso_layer_<l>(x, layer_state)  -> (x_out, new_state, taps)  every L<l>.* stage
        iso_head(x)                    -> (logits, taps)            ln_out, logits
    ``function_taps`` names the taps of each exported function.
    """

    block_cls = Block  # replaceable by the bug zoo (e.g. a Block with a wrong token shift)

    def __init__(self, config: ModelConfig, *, attention: type, layout: StateLayout, debug: bool = False):
        self.config = config
        self.debug = debug
        self.layout = layout
        self.emb = nn.Embedding(config.vocab_size, config.n_embd, dtype="float32")
        self.blocks = nn.ModuleList([self.block_cls(config, layer=i, attention=attention) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LN_EPS, dtype="float32")
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False, dtype="float32")
        self.tap_names: list[str] = []
        self.function_taps: dict[str, list[str]] = {}

    # -- pieces, shared by the whole-model and the isolated entry points -----------------------
    def embed(self, ids: Tensor, tap: Taps) -> Tensor:
        x = self.blocks[0].ln0(self.emb(ids))  # (T, C): ln0 per row == the official precomputed table
        tap("emb", x)
        return x

    def run_layer(self, i: int, x: Tensor, layer_state, tap: Taps):
        return self.blocks[i](x, layer_state[0], layer_state[1:-1], layer_state[-1], tap=tap)

    def run_head(self, x: Tensor, tap: Taps) -> Tensor:
        x = self.ln_out(x)
        tap("ln_out", x)
        logits = self.head(x)  # (T, V) fp32
        tap("logits", logits)
        return logits

    def _forward(self, ids: Tensor, state):
        tap = Taps(self.debug)
        x = self.embed(ids, tap)
        new_state = []
        n = len(self.layout.slots)
        for i in range(len(self.blocks)):
            x, slots = self.run_layer(i, x, state[n * i : n * i + n], tap)
            new_state += slots
        logits = self.run_head(x, tap)
        self.tap_names = tap.names
        if self.debug:
            return logits, tuple(new_state), tuple(tap.values)
        return logits, tuple(new_state)

    def prefill(self, ids: Tensor, state):
        return self._forward(ids, state)

    def decode(self, ids: Tensor, state):
        return self._forward(ids, state)

    # -- isolated entry points (debug build only) ----------------------------------------------
    def iso_embed(self, ids: Tensor):
        tap = Taps(True)
        x = self.embed(ids, tap)
        self.function_taps["iso_embed"] = tap.names
        return x, tuple(tap.values)

    def iso_head(self, x: Tensor):
        tap = Taps(True)
        logits = self.run_head(x, tap)
        self.function_taps["iso_head"] = tap.names
        return logits, tuple(tap.values)

    def _iso_layer(self, i: int, x: Tensor, state):
        tap = Taps(True)
        x, slots = self.run_layer(i, x, state, tap)
        self.function_taps[f"iso_layer_{i}"] = tap.names
        return x, tuple(slots), tuple(tap.values)

    def get_default_spec(self):
        shapes = self.layout.all_shapes(self.config.n_layer)
        state_spec = [nn.spec.Tensor(list(s), "float32") for s in shapes]
        mode = {"param_mode": "plain", "effect_mode": "none"}
        spec = {
            "prefill": {"ids": nn.spec.Tensor(["seq_len"], "int32"), "state": state_spec, "$": mode},
            "decode": {"ids": nn.spec.Tensor([1], "int32"), "state": list(state_spec), "$": dict(mode)},
        }
        if self.debug:
            C, n = self.config.n_embd, len(self.layout.slots)
            x_spec = nn.spec.Tensor(["seq_len", C], "float32")
            spec["iso_embed"] = {"ids": nn.spec.Tensor(["seq_len"], "int32"), "$": dict(mode)}
            spec["iso_head"] = {"x": x_spec, "$": dict(mode)}
            for i in range(self.config.n_layer):
                # A named entry point per layer: export_tvm looks methods up by name.
                setattr(self, f"iso_layer_{i}", _LayerEntry(self, i))
                layer_spec = [nn.spec.Tensor(list(s), "float32") for s in shapes[:n]]
                spec[f"iso_layer_{i}"] = {"x": x_spec, "state": layer_spec, "$": dict(mode)}
        return nn.spec.ModuleSpec.from_raw(spec, self)


class _LayerEntry:
    """``model.iso_layer_<i>(x, state)``: a named, inspectable entry point for one layer."""

    def __init__(self, model: RWKVModel, index: int):
        self.model = model
        self.index = index

    def __call__(self, x, state):
        return self.model._iso_layer(self.index, x, state)
