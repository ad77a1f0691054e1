"""Pieces every compiled model family shares: token shift, taps, the FFN, the state plumbing.

Precision (``dtype``: float32, float16 or bfloat16, or a quantisation scheme of dtypes.py, which
computes in its activation dtype with its matmul weights stored quantised: see ``Linear``) follows ChatRWKV's strategies as the torch
reference does (parity/reference/rwkv5.py): weights and activations in the dtype; every matmul
accumulated in fp32 and rounded once to the dtype (what torch's CPU fp16/bf16 matmul does);
LayerNorm statistics in fp32, its output rounded to the dtype; the embedding table normalised by
ln0 in fp32, then rounded; the wkv scan, its state, the decay and bonus, GroupNorm and the logits
in fp32. fp16 also rescales the residual stream every ``RESCALE_LAYER`` layers (att.output and
ffn.value weights divided at load by the runtime, the stream halved in the graph: in the plain CUDA
build's decode step by the layer's FFN value kernel itself, gemv_cuda.fold_halving), and what the
debug build returns is canonical: every tap in fp32, the four stream stages multiplied back.
The interface (ids, the state, the isolated entry points' x) stays fp32 whatever the dtype: fp16
and bf16 values are exact in fp32, so the state round-trips unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from parity.checkpoint import ModelConfig
from parity.compiled.dtypes import DTYPES, split_scheme
from parity.compiled.gemv_cuda import fold_halving

LN_EPS = 1e-5
# As the official package (and parity/reference/rwkv5.py's RESCALE_LAYER): fp16 only.
RESCALE_LAYER = {"float16": 6}
STREAM_STAGES = ("att.out", "ffn.out", "x_after_att", "x_out")


def layer_scale(layer: int, *, dtype: str) -> float:
    """Canonical residual stream / this model's, inside layer ``layer`` (a power of two)."""
    r = RESCALE_LAYER.get(dtype, 0)
    return float(2 ** (layer // r)) if r else 1.0


def to_dtype(x: Tensor, dtype: str) -> Tensor:
    return x if x.dtype == dtype else op.astype(x, dtype)


# -- quantised weights (the schemes of dtypes.QUANT_SCHEMES) -----------------------------------------
# Which weight format the Linears being constructed store: set by RWKVModel around building its
# blocks and head, so the families' attention classes (and the bug zoo's) need no new argument.
_QUANT: list[str | None] = [None]
Q4_GROUP, Q4_MAX_INT, Q4_PER_WORD = 32, 7, 8  # MLC-LLM's q4f16_1, as parity/reference/q4.py


@contextlib.contextmanager
def quantized_linears(quant: str | None):
    _QUANT.append(quant)
    try:
        yield
    finally:
        _QUANT.pop()


def dequant_int8(q: te.Tensor, mx: te.Tensor, rx: te.Tensor, my: te.Tensor, ry: te.Tensor) -> te.Tensor:
    """ChatRWKV's int8 weight, (out, in), in the activation dtype (the offsets' dtype):
    (q + 0.5) * ry * rx + my + mx, with the package's operation order (parity/reference/int8.py), so
    the dequantised weight equals the reference's; ry, my are per input row, rx, mx per output column."""
    dt = mx.dtype
    return te.compute(
        q.shape, lambda o, i: ((q[o, i].astype(dt) + tirx.const(0.5, dt)) * ry[i] * rx[o] + my[i]) + mx[o],
        name="dequant_int8",
    )


def dequant_q4(q: te.Tensor, scale: te.Tensor, *, in_features: int) -> te.Tensor:
    """MLC-LLM's q4f16_1 weight, (out, in) fp16: code j of word w in bits [4j, 4j + 4), value
    (code - 7) * scale[o, i // 32] (MLC's ``_dequantize``; parity/reference/q4.py packs them)."""
    dt = scale.dtype

    def value(o, i):
        shift = ((i % Q4_PER_WORD) * 4).astype("uint32")
        code = (q[o, i // Q4_PER_WORD] >> shift) & tirx.const(0xF, "uint32")
        return (code.astype(dt) - tirx.const(Q4_MAX_INT, dt)) * scale[o, i // Q4_GROUP]

    return te.compute((q.shape[0], in_features), value, name="dequant_q4")


class Linear(nn.Linear):
    """A bias-free Linear in the model dtype: in fp16/bf16 accumulated in fp32 and rounded once to
    the dtype, as torch's CPU matmul does; in fp32 exactly ``nn.Linear``.

    Built inside ``quantized_linears("int8" | "q4")`` it stores its weight quantised instead and the
    compiled graph dequantises it at every call, right before the matmul (a TVM kernel of its own:
    what a quantised port gets wrong is in the graph, not in the loader). Its parameters are then
    ``weight_<part>`` (runtime.py makes them from the checkpoint's ``weight``):
        int8  weight_q (out, in) uint8; weight_mx, weight_rx (out,); weight_my, weight_ry (in,)
        q4    weight_q (out, groups * 4) uint32; weight_scale (out, groups) fp16
    ``dequant_int8`` / ``dequant_q4`` are attributes so the bug zoo can put a wrong one on one Linear.
    """

    dequant_int8 = staticmethod(dequant_int8)
    dequant_q4 = staticmethod(dequant_q4)

    def __init__(self, in_features: int, out_features: int, *, dtype: str = "float32"):
        low = dtype != "float32"
        super().__init__(in_features, out_features, bias=False, dtype=dtype, out_dtype="float32" if low else None)
        self.model_dtype = dtype
        self.quant = _QUANT[-1]
        if self.quant is None:
            return
        self.weight = None  # not a parameter of a quantised build: its parts are
        if self.quant == "int8":
            self.weight_q = nn.Parameter((out_features, in_features), "uint8")
            self.weight_mx = nn.Parameter((out_features,), dtype)
            self.weight_rx = nn.Parameter((out_features,), dtype)
            self.weight_my = nn.Parameter((in_features,), dtype)
            self.weight_ry = nn.Parameter((in_features,), dtype)
        else:
            groups = -(-in_features // Q4_GROUP)
            self.weight_q = nn.Parameter((out_features, groups * Q4_GROUP // Q4_PER_WORD), "uint32")
            self.weight_scale = nn.Parameter((out_features, groups), dtype)

    def dequantized(self) -> Tensor:
        """The (out, in) weight in the model dtype, dequantised by the compiled graph."""
        if self.quant == "int8":
            return op.tensor_expr_op(self.dequant_int8, "dequant_int8",
                                     [self.weight_q, self.weight_mx, self.weight_rx, self.weight_my, self.weight_ry])
        return op.tensor_expr_op(lambda q, s: self.dequant_q4(q, s, in_features=self.in_features), "dequant_q4",
                                 [self.weight_q, self.weight_scale])

    def forward(self, x: Tensor) -> Tensor:
        if self.quant is None:
            return to_dtype(super().forward(x), self.model_dtype)
        y = op.matmul(x, op.permute_dims(self.dequantized()), out_dtype=self.out_dtype)
        return to_dtype(y, self.model_dtype)


def linears(model) -> list[Linear]:
    """Every Linear of ``model``: each block's attention and FFN matmuls, then the head (the CUDA
    retarget and the bug zoo's quantised Linears both walk them)."""
    found = []
    for block in model.blocks:
        for part in (block.att, block.ffn):
            found += [v for v in vars(part).values() if isinstance(v, Linear)]
    return found + [model.head]


class LayerNorm(nn.LayerNorm):
    """LayerNorm with weights in the model dtype; fp16/bf16 compute it in fp32 and round the output
    (torch's CPU layer_norm on fp16 does the same); fp32 is exactly ``nn.LayerNorm``."""

    def __init__(self, C: int, *, eps: float, dtype: str = "float32"):
        super().__init__(C, eps=eps, dtype=dtype)
        self.model_dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.model_dtype == "float32":
            return super().forward(x)
        # One kernel: the casts in and out inside the op. Written as separate Relax casts they were
        # four kernels per LayerNorm on CUDA (x, weight and bias each cast on its own: FuseOps does
        # not fuse a producer into a layer_norm); topi's layer_norm on the fp32 casts is the same
        # arithmetic the legalised op.layer_norm computes.
        eps, dt = self.eps, self.model_dtype

        def layer_norm(x: te.Tensor, weight: te.Tensor, bias: te.Tensor) -> te.Tensor:
            from tvm import topi

            y = topi.nn.layer_norm(topi.cast(x, "float32"), topi.cast(weight, "float32"), topi.cast(bias, "float32"),
                                   axis=[-1], epsilon=eps)
            return topi.cast(y, dt)

        return op.tensor_expr_op(layer_norm, "layer_norm", [x, self.weight, self.bias])


def token_shift(xx: te.Tensor, last: te.Tensor) -> te.Tensor:
    # Row t is xx[t-1]; row 0 is the carried state. if_then_else evaluates only the taken branch,
    # so xx[-1] is never read.
    return te.compute(
        xx.shape, lambda t, c: tirx.if_then_else(t == 0, last[c], xx[t - 1, c]), name="token_shift"
    )


def last_row(xx: te.Tensor) -> te.Tensor:
    return te.compute((xx.shape[1],), lambda c: xx[xx.shape[0] - 1, c], name="last_row")


# The packed function a streaming debug build hands each tap to (parity/compiled/runtime.py
# registers it): (name, tap[, previous token]) -> token, a 0-d int32 tensor. The token only chains
# the calls: each call takes the one before it, and the last one is a function output.
TAP_SINK = "parity.tap_sink"


class Taps:
    """Collects named intermediates for the debug build; a no-op in the plain build.

    Every tap is returned in fp32 (exact for fp16/bf16 values; numpy has no bfloat16), and a stage
    named in ``scales`` (the rescaled residual stream) multiplied back to its canonical value.

    ``stream`` (the debug build's prefill and decode): each tap leaves the graph where it is made,
    through a call to ``TAP_SINK`` that hands it to the runtime while it is alive, instead of
    being returned. A 512-token prefill's taps are ~0.6 GB at 0.1B, and as outputs of the
    function they were all alive at once when it returned (issue 9); handed over one by one, each
    is freed after its last use in the graph. The calls are marked pure (a packed call in a
    dataflow block must be) and chained by a token that ends in the function's outputs, so no
    pass drops them and they run in ``names`` order; the graph computing each tap is unchanged.
    """

    def __init__(self, enabled: bool, *, scales: dict[str, float] | None = None, stream: bool = False):
        self.enabled = enabled
        self.scales = scales or {}
        self.stream = stream
        self.names: list[str] = []
        self.values: list[Tensor] = []
        self.token: Tensor | None = None  # stream: the last sink call's result

    def __call__(self, name: str, value: Tensor) -> None:
        if self.enabled:
            value = to_dtype(value, "float32")
            if self.scales.get(name, 1.0) != 1.0:
                value = value * self.scales[name]
            self.names.append(name)
            if self.stream:
                self.token = self._sink(name, value)
            else:
                self.values.append(value)

    def read(self, slot: Tensor) -> Tensor:
        """``slot``, a field of the function's ``state`` argument; when streaming, read from the
        tuple again here, where it is used.

        The exporter reads every field at the top of the function, and FuseOps orders its output by
        the first binding of each fused group: a late layer's token shift, fused with its state
        field's read, counted as placed at the top, so everything it depends on (every earlier
        layer) was emitted before the first tap sink, and the sinks, with every tap alive until
        its own, ran at the end (measured on the L4 fixture). Read where it is used, each sink
        stays near where its tap is made. A read computes nothing: the kernels are unchanged."""
        if not (self.enabled and self.stream):
            return slot
        from tvm import relax as rx

        bb = rx.BlockBuilder.current()
        field = bb.lookup_binding(slot._expr)
        if not isinstance(field, rx.TupleGetItem):
            return slot
        return Tensor(_expr=bb.emit(rx.TupleGetItem(field.tuple_value, field.index), name_hint="state_field"))

    def _sink(self, name: str, value: Tensor) -> Tensor:
        import tvm
        from tvm import relax as rx

        prev = () if self.token is None else (self.token._expr,)
        call = rx.call_pure_packed(TAP_SINK, tvm.ir.StringImm(name), value._expr, *prev,
                                   ty_args=rx.TensorType([], "int32"))
        return Tensor(_expr=rx.BlockBuilder.current().emit(call, name_hint="tap_token"))


def time_mix(xx: Tensor, sx: Tensor, mixes: list[Tensor], *, fp32_copy: bool = False) -> list[Tensor]:
    """Every lerp of one time-mix, xx*μ + sx*(1-μ) (the reference's operation order) for each
    (1, 1, C) μ of ``mixes``, in one kernel with one output per μ. As separate Relax ops each lerp
    was a kernel of its own (nothing fuses siblings, and a matmul takes no producer), six per layer.
    ``fp32_copy``: one more output, xx in fp32 (the state keeps its last row): from this kernel,
    where a cast of its own was one more kernel per time-mix in fp16/bf16; xx itself in fp32."""
    low = fp32_copy and xx.dtype != "float32"

    def mix_te(xx: te.Tensor, sx: te.Tensor, *mus: te.Tensor) -> list[te.Tensor]:
        one = tirx.const(1.0, xx.dtype)

        def body(t, c):
            outs = [xx[t, c] * mu[0, 0, c] + sx[t, c] * (one - mu[0, 0, c]) for mu in mus]
            return tuple(outs + [xx[t, c].astype("float32")] if low else outs)

        outs = te.compute(xx.shape, body, name="time_mix")
        return list(outs) if isinstance(outs, (list, tuple)) else [outs]

    out = op.tensor_expr_op(mix_te, "time_mix", [xx, sx, *mixes])
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    return out + [xx] if fp32_copy and not low else out


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: str = "float32"):
        C, F = config.n_embd, config.dim_ffn
        self.config = config
        self.time_mix_k = nn.Parameter((1, 1, C), dtype)
        self.time_mix_r = nn.Parameter((1, 1, C), dtype)
        self.key = Linear(C, F, dtype=dtype)
        self.receptance = Linear(C, C, dtype=dtype)
        self.value = Linear(F, C, dtype=dtype)

    def mixes(self) -> list[Tensor]:
        """The time-mix μ of this half, in the order ``forward`` takes its ``mixed`` inputs."""
        return [self.time_mix_k, self.time_mix_r]

    def forward(self, xx: Tensor, sx: Tensor, *, layer: int, tap: Taps, mixed: list[Tensor] | None = None) -> Tensor:
        """``mixed``: ``time_mix(xx, sx, self.mixes())`` when the caller made it already."""
        pre = f"L{layer}.ffn."
        xk, xr = mixed or time_mix(xx, sx, self.mixes())
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

    def __init__(self, config: ModelConfig, *, layer: int, attention: type, dtype: str = "float32"):
        C = config.n_embd
        self.layer = layer
        self.dtype = dtype
        if layer == 0:
            # fp32 whatever the dtype: the reference normalises the fp32 table, then rounds it.
            self.ln0 = nn.LayerNorm(C, eps=LN_EPS, dtype="float32")
        self.ln1 = LayerNorm(C, eps=LN_EPS, dtype=dtype)
        self.ln2 = LayerNorm(C, eps=LN_EPS, dtype=dtype)
        self.att = attention(config, dtype=dtype) if dtype != "float32" else attention(config)
        self.ffn = FeedForward(config, dtype=dtype)

    def forward(self, x: Tensor, att_x: Tensor, att_state, ffn_x: Tensor, *, tap: Taps, decay: Tensor | None = None):
        """``decay``: the attention's decay w when the model made every layer's at once
        (RWKVModel.layer_decays), else None and the attention makes its own."""
        i, dt = self.layer, self.dtype
        att_kwargs = {"decay": decay} if decay is not None else {}
        xx = self.ln1(x)
        tap(f"L{i}.att.ln1", xx)
        if getattr(self.att, "grouped", False):
            # The plain CUDA build's attention (rwkv5_model.group_projections): shift and lerps, r/k/v/g,
            # and scan + ln_x + gate are a kernel each; it makes xx's fp32 copy itself. No taps.
            att, new_att_state, xx32 = self.att.grouped_forward(xx, att_x, *att_state, **att_kwargs)
        else:
            sx = op.tensor_expr_op(self.shift, "token_shift", [xx, to_dtype(tap.read(att_x), dt)])
            tap(f"L{i}.att.shift", sx)
            # The lerps of each half are made here, in one kernel with xx's fp32 copy, whose last row
            # the state keeps (a view in decode: T = 1), so no cast of its own is needed.
            *mixed, xx32 = time_mix(xx, sx, self.att.mixes(), fp32_copy=True)
            att, new_att_state = self.att(xx, sx, *(tap.read(s) for s in att_state), layer=i, tap=tap, mixed=mixed,
                                          **att_kwargs)
        new_att_x = op.tensor_expr_op(last_row, "last_row", [xx32])
        x = x + att
        tap(f"L{i}.x_after_att", x)
        xx = self.ln2(x)
        tap(f"L{i}.ffn.ln2", xx)
        sx = op.tensor_expr_op(self.shift, "token_shift", [xx, to_dtype(tap.read(ffn_x), dt)])
        tap(f"L{i}.ffn.shift", sx)
        *mixed, xx32 = time_mix(xx, sx, self.ffn.mixes(), fp32_copy=True)
        x = x + self.ffn(xx, sx, layer=i, tap=tap, mixed=mixed)
        tap(f"L{i}.x_out", x)
        new_ffn_x = op.tensor_expr_op(last_row, "last_row", [xx32])
        return x, (new_att_x, *new_att_state, new_ffn_x)


class RWKVModel(nn.Module):
    """The model skeleton shared by the families: embedding + ln0, blocks, ln_out, head.

    Entry points (explicit state, no hidden KV cache):
        prefill(ids (seq_len,), state) -> (logits (seq_len, V), new_state[, token])
        decode (ids (1,),       state) -> (logits (1, V),       new_state[, token])
    ``state`` is a flat tuple in ``layout.names(n_layer)`` order; the debug build also hands every
    canonical stage ("taps") to the runtime's ``TAP_SINK`` as it is made, in ``tap_names`` order
    (``Taps``), and returns the token that chains those calls.

    The debug build also exports the model in pieces, for isolated (teacher-forced) runs in which
    each piece is fed the *reference's* input, so its error is its own and not inherited:
        iso_embed(ids)                 -> (x, taps)                 emb
        iso_layer_<l>(x, layer_state)  -> (x_out, new_state, taps)  every L<l>.* stage
        iso_head(x)                    -> (logits, taps)            ln_out, logits
    ``function_taps`` names the taps of each exported function.
    """

    block_cls = Block  # replaceable by the bug zoo (e.g. a Block with a wrong token shift)

    def __init__(
        self, config: ModelConfig, *, attention: type, layout: StateLayout, debug: bool = False, dtype: str = "float32"
    ):
        if dtype not in DTYPES:
            from parity.errors import ParityError

            raise ParityError(f"no compiled model in {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.config = config
        self.debug = debug
        self.layout = layout
        # A quantisation scheme (fp16i8, q4f16_1 ...) computes in its activation dtype; only its
        # Linears differ (they store quantised weights), so everything else reads self.dtype as is.
        self.scheme = dtype
        dtype, self.quant = split_scheme(dtype)
        self.dtype = dtype
        self.rescale_layer = RESCALE_LAYER.get(dtype, 0)
        self.emb = nn.Embedding(config.vocab_size, config.n_embd, dtype="float32")
        block_kwargs = {"dtype": dtype} if dtype != "float32" else {}
        with quantized_linears(self.quant):  # every matmul weight and the head, as parity/reference does
            self.blocks = nn.ModuleList(
                [self.block_cls(config, layer=i, attention=attention, **block_kwargs) for i in range(config.n_layer)]
            )
            self.ln_out = LayerNorm(config.n_embd, eps=LN_EPS, dtype=dtype)
            self.head = Linear(config.n_embd, config.vocab_size, dtype=dtype)
        self.tap_names: list[str] = []
        self.function_taps: dict[str, list[str]] = {}
        # Taps of the rescaled stream, multiplied back to canonical values (fp16 only).
        self.stream_scales = {
            f"L{layer}.{stage}": layer_scale(layer, dtype=dtype)
            for layer in range(config.n_layer) for stage in STREAM_STAGES if layer_scale(layer, dtype=dtype) != 1.0
        }

    def param_groups(self) -> dict[str, list[str]]:
        """Parameters the runtime makes by stacking checkpoint tensors along a new first axis (the
        plain CUDA build's grouped attention, rwkv5_model.group_projections): name -> source keys."""
        return dict(getattr(self, "_param_groups", {}))

    def param_scales(self) -> dict[str, float]:
        """Parameters the runtime divides at load (the fp16 rescale: att.output, ffn.value of layer l by 2^(l // R))."""
        out = {}
        for layer in range(self.config.n_layer):
            s = layer_scale(layer, dtype=self.dtype)
            if s != 1.0:
                out[f"blocks.{layer}.att.output.weight"] = s
                out[f"blocks.{layer}.ffn.value.weight"] = s
        return out

    def _taps(self, enabled: bool, *, stream: bool = False) -> Taps:
        return Taps(enabled, scales=self.stream_scales, stream=stream)

    # -- pieces, shared by the whole-model and the isolated entry points -----------------------
    def embed(self, ids: Tensor, tap: Taps) -> Tensor:
        x = self.blocks[0].ln0(self.emb(ids))  # (T, C): ln0 per row == the official precomputed table
        x = to_dtype(x, self.dtype)  # normalised in fp32, then rounded (as the reference's table)
        tap("emb", x)
        return x

    def layer_decays(self) -> list[Tensor] | None:
        """Every layer's decay w, made from the parameters alone in one kernel ahead of the blocks
        (a family overrides this), or None: each layer's attention makes its own (a kernel each)."""
        return None

    def run_layer(self, i: int, x: Tensor, layer_state, tap: Taps, *, decay: Tensor | None = None):
        return self.blocks[i](x, layer_state[0], layer_state[1:-1], layer_state[-1], tap=tap, decay=decay)

    def run_head(self, x: Tensor, tap: Taps) -> Tensor:
        x = self.ln_out(x)
        tap("ln_out", x)
        logits = to_dtype(self.head(x), "float32")  # (T, V) fp32 (rounded to the dtype first, as the reference)
        tap("logits", logits)
        return logits

    def _forward(self, ids: Tensor, state):
        tap = self._taps(self.debug, stream=self.debug)  # the plain build: no taps, its graph as before
        x = self.embed(ids, tap)
        new_state = []
        n = len(self.layout.slots)
        decays = self.layer_decays()
        for i in range(len(self.blocks)):
            halve = bool(self.rescale_layer) and (i + 1) % self.rescale_layer == 0
            # (the decode step's own kernels: the layer's FFN value GEMV halves its output itself,
            # gemv_cuda.fold_halving, one launch fewer; every other build halves as below)
            with fold_halving() if halve else contextlib.nullcontext() as fold:
                x, slots = self.run_layer(i, x, state[n * i : n * i + n], tap, decay=decays[i] if decays else None)
            new_state += slots
            if halve and not fold.done:
                x = x * 0.5  # halve the stream after every R-th layer (exact), as the official package
        logits = self.run_head(x, tap)
        self.tap_names = tap.names
        if self.debug:
            return logits, tuple(new_state), tap.token  # the taps went to TAP_SINK as they were made
        return logits, tuple(new_state)

    def prefill(self, ids: Tensor, state):
        return self._forward(ids, state)

    def decode(self, ids: Tensor, state):
        return self._forward(ids, state)

    # -- isolated entry points (debug build only) ----------------------------------------------
    def _stream_in(self, layer: int, x: Tensor) -> Tensor:
        """A canonical fp32 stream value as layer ``layer`` (or the head, layer = n_layer) takes it."""
        s = layer_scale(layer, dtype=self.dtype)
        return to_dtype(x * (1.0 / s) if s != 1.0 else x, self.dtype)

    def iso_embed(self, ids: Tensor):
        tap = self._taps(True)
        x = self.embed(ids, tap)
        self.function_taps["iso_embed"] = tap.names
        return x, tuple(tap.values)

    def iso_head(self, x: Tensor):
        tap = self._taps(True)
        logits = self.run_head(self._stream_in(self.config.n_layer, x), tap)
        self.function_taps["iso_head"] = tap.names
        return logits, tuple(tap.values)

    def _iso_layer(self, i: int, x: Tensor, state):
        tap = self._taps(True)
        x, slots = self.run_layer(i, self._stream_in(i, x), state, tap)
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
