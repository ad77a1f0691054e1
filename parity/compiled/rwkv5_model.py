"""RWKV-5 (5.0, 5.1, 5.2) as a TVM Relax ``nn.Module`` (the MLC-LLM way), parameters named like the checkpoint.

The versions differ as in the torch reference, and only in ``Attention``: per-head (5.0/5.1) or
per-channel (5.2) decay, u = exp(time_first) (5.0/5.1) or time_faaaa raw (5.2), and the gate
(5.1/5.2). Per-head w and u are broadcast to (H, N) in the graph, so one wkv5 kernel serves all.

Parameter names equal the ChatRWKV keys (``blocks.0.att.key.weight`` …), so the same state dict
feeds this model and the torch reference with no renaming. Raw checkpoint values go in; the
transforms the official package applies at load (E = LN(emb; ln0), w = exp(-exp(time_decay)))
happen in the graph, so no second copy of that mapping exists anywhere.

Entry points and state plumbing are the shared ``RWKVModel`` (common.py); the state per layer
is att_x (C,), att_kv (H, N, N) fp32 [head, k, v], ffn_x (C,).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from parity.checkpoint import ModelConfig, ModelVersion
from tvm import te, tirx

from parity.compiled.common import Block, Linear, RWKVModel, StateLayout, Taps, last_row, time_mix, to_dtype
from parity.compiled.gemv_cuda import DECODE_WARPS, decode_gemv_fits
from parity.compiled.wkv5_kernel import wkv5

LN_X_EPS = 64e-5  # the official package since 0.8.21; older ports used 1e-5 (docs/RWKV.md §2)


def state_layout(config: ModelConfig) -> StateLayout:
    """Per layer: att_x (C,), att_kv (H, N, N) [head, k, v] — the canonical layout, kept as is — ffn_x (C,)."""
    C, H, N = config.n_embd, config.n_head, config.head_size
    return StateLayout(slots=("att_x", "att_kv", "ffn_x"), shapes=((C,), (H, N, N), (C,)), fill=(0.0, 0.0, 0.0))


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


class GroupNormKernel(GroupNorm):
    """``GroupNorm`` in one kernel: one TE op holding both reductions and the affine tail, where
    the four Relax ops above (sum, subtract, sum of squares, divide) are a kernel each on CUDA.
    The arithmetic is theirs, in their order: mean = sum * (1/N); centred = x - mean;
    var = sum(centred^2) * (1/N); y = centred / sqrt(var + eps) * weight + bias. (``GroupNorm``
    stays as it is: the bug zoo's GroupNorms and examples/mlc_rwkv5 build on its ops.)"""

    def forward(self, x: Tensor) -> Tensor:
        T, C = x.shape
        G = self.num_groups
        N = C // G
        inv_n, eps = 1.0 / N, self.eps

        def group_norm(x: te.Tensor, weight: te.Tensor, bias: te.Tensor) -> te.Tensor:
            xg = te.compute((x.shape[0], G, N), lambda t, h, n: x[t, h * N + n], name="xg")  # (T, H, N)
            i = te.reduce_axis((0, N), name="i")
            total = te.compute((x.shape[0], G), lambda t, h: te.sum(xg[t, h, i], axis=i), name="total")
            centred = te.compute(xg.shape, lambda t, h, n: xg[t, h, n] - total[t, h] * tirx.const(inv_n, "float32"),
                                 name="centred")
            j = te.reduce_axis((0, N), name="j")
            sq = te.compute((x.shape[0], G), lambda t, h: te.sum(centred[t, h, j] * centred[t, h, j], axis=j), name="sq")
            # (T, H, N) out, reshaped after: one GPU thread block per (token, head) (written as
            # (T, C), DLight gave the whole token one block and looped over its heads).
            return te.compute(
                xg.shape,
                lambda t, h, n: centred[t, h, n]
                / tirx.sqrt(sq[t, h] * tirx.const(inv_n, "float32") + tirx.const(eps, "float32"))
                * weight[h * N + n] + bias[h * N + n],
                name="group_norm",
            )

        return op.reshape(op.tensor_expr_op(group_norm, "group_norm", [x, self.weight, self.bias]), (T, C))


class Attention(nn.Module):
    """The v5 time-mix. Its replaceable parts are class attributes and small methods (``kernel``,
    ``group_norm_cls``, ``receptance_act``, ``decay_and_bonus``, ``kernel_state``), so the bug zoo
    (parity/mutants/) injects a porting bug by overriding one of them, never by copying this class."""

    kernel = wkv5
    group_norm_cls = GroupNormKernel

    def __init__(self, config: ModelConfig, *, dtype: str = "float32"):
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        self.config = config
        self.dtype = dtype
        self.gated = config.version.gated
        self.per_channel = config.version == ModelVersion.V5_2
        # Mixes and matmul weights in the model dtype; decay, bonus and ln_x stay fp32 (docs/RWKV.md §3).
        self.time_mix_k = nn.Parameter((1, 1, C), dtype)
        self.time_mix_v = nn.Parameter((1, 1, C), dtype)
        self.time_mix_r = nn.Parameter((1, 1, C), dtype)
        if self.per_channel:
            self.time_decay = nn.Parameter((H, N), "float32")
            self.time_faaaa = nn.Parameter((H, N), "float32")
        else:
            self.time_decay = nn.Parameter((H,), "float32")
            self.time_first = nn.Parameter((H,), "float32")
        self.receptance = Linear(C, A, dtype=dtype)
        self.key = Linear(C, A, dtype=dtype)
        self.value = Linear(C, A, dtype=dtype)
        if self.gated:
            self.time_mix_g = nn.Parameter((1, 1, C), dtype)
            self.gate = Linear(C, A, dtype=dtype)
        self.output = Linear(A, C, dtype=dtype)
        self.ln_x = self.group_norm_cls(H, A, eps=LN_X_EPS)

    def receptance_act(self, r: Tensor) -> Tensor:
        return r  # v5: no sigmoid on r

    def decay_and_bonus(self) -> tuple[Tensor, Tensor]:
        """(w, u), both (H, N) fp32: the only place the versions differ numerically."""
        H, N = self.config.n_head, self.config.head_size
        w = op.exp(op.negative(op.exp(self.time_decay)))
        if self.per_channel:
            return w, self.time_faaaa  # 5.2: per channel; u is time_faaaa raw
        # 5.0/5.1: one value per head, broadcast over the head's N channels; u = exp(time_first)
        w = op.broadcast_to(op.reshape(w, (H, 1)), (H, N))
        u = op.broadcast_to(op.reshape(op.exp(self.time_first), (H, 1)), (H, N))
        return w, u

    def kernel_state(self, att_kv: Tensor) -> Tensor:
        """The layout adapter into the kernel: identity, since wkv5 keeps the canonical [h, k, v]."""
        return att_kv

    def mixes(self) -> list[Tensor]:
        """The time-mix μ (k, v, r[, g]), in the order ``forward`` takes its ``mixed`` inputs."""
        return [self.time_mix_k, self.time_mix_v, self.time_mix_r] + ([self.time_mix_g] if self.gated else [])

    # -- the plain CUDA build's grouped form (group_projections; issue 10) ------------------------
    grouped = False
    GROUPS = ("key", "value", "receptance", "gate")  # the order of mixes(): k, v, r, g

    def group(self) -> None:
        """Become the grouped form: the k, v, r, g weights one (4, A, C) parameter ``rkvg_weight`` and
        their time-mix μ one (4, 1, 1, C) ``rkvg_mix``, both stacked from the checkpoint's tensors at
        load (the runtime, from the model's ``param_groups``); the separate ones are no parameters."""
        C, A = self.config.n_embd, self.config.dim_att
        self.rkvg_weight = nn.Parameter((len(self.GROUPS), A, C), self.dtype)
        self.rkvg_mix = nn.Parameter((len(self.GROUPS), 1, 1, C), self.dtype)
        for name in self.GROUPS:
            setattr(self, name, None)
            setattr(self, f"time_mix_{name[0]}", None)
        self.grouped = True

    def grouped_forward(self, xx: Tensor, att_x: Tensor, att_kv: Tensor, *, decay: Tensor | None = None,
                        residual: Tensor | None = None, ln=None):
        """``forward`` (with the Block's token shift and time-mix) in four kernels, for one token as for
        many: shift + the four lerps stacked (G, T, C) and xx's fp32 copy; one GEMV for r, k, v, g
        (a batched matmul, each group its own input row: DLight schedules it as one GEMV with 4x the
        rows of each before, accumulated in fp32 and rounded once to the dtype, as ``Linear``); the
        scan with ln_x and the gate (wkv_cuda.wkv5_gn_gate_cuda); the output Linear.
        -> (att.out, (new att_kv,), xx in fp32). With ``residual`` (the decode step, ``GroupedBlock``),
        ``xx`` is the stream before ln1 (``ln``): the LayerNorm, the shift and the lerps are made
        inside the r/k/v/g GEMV, the GEMVs and the scan are the decode step's own kernels
        (``decode_step``), and att.out comes back with the residual added: residual + att.out."""
        from parity.compiled.wkv_cuda import WKV_WARP, time_mix_stacked_cuda, wkv5_gn_gate_cuda, wkv5_gn_gate_decode_cuda

        cfg, dt = self.config, self.dtype
        C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
        T, G = xx.shape[0], len(self.GROUPS)
        w, u = self.decay_and_bonus() if decay is None else (decay, self.time_faaaa)
        rkvg = tuple(self.GROUPS.index(n) for n in ("receptance", "key", "value", "gate"))
        if residual is not None:
            # ln1, the shift and the four lerps inside the r/k/v/g GEMV (gemv_cuda: mix, ln_eps)
            y, xx32 = decode_mix_gemv(xx, att_x, [(self.rkvg_mix, self.rkvg_weight, "cast")], ln=ln)
            y = op.reshape(y, (G, 1, H, N))
            scan = (wkv5_gn_gate_decode_cuda(N, dt, LN_X_EPS, rkvg, H, G) if N % WKV_WARP == 0
                    else wkv5_gn_gate_cuda(N, dt, LN_X_EPS, rkvg))  # (a head narrower than a warp: the serial one)
            _, new_kv, gated = op.tensor_ir_op(  # named wkv5, its first two outputs wkv5's
                scan, "wkv5",
                args=[y, w, u, att_kv, self.ln_x.weight, self.ln_x.bias],
                out=[Tensor.placeholder((1, H, N), "float32"), Tensor.placeholder((H, N, N), "float32"),
                     Tensor.placeholder((1, H, N), dt)])
            out = decode_gemv(op.reshape(gated, (1, A)), self.output.weight, "residual", residual)
            return out, (new_kv,), xx32
        stacked, xx32 = op.tensor_ir_op(
            time_mix_stacked_cuda(G, dt), "time_mix", args=[xx, att_x, self.rkvg_mix],
            out=[Tensor.placeholder((G, T, C), dt), Tensor.placeholder((T, C), "float32")])
        y = op.matmul(stacked, op.permute_dims(self.rkvg_weight, axes=[0, 2, 1]),
                      out_dtype="float32" if dt != "float32" else None)
        y = op.reshape(to_dtype(y, dt), (G, T, H, N))
        _, new_kv, gated = op.tensor_ir_op(  # named wkv5, its first two outputs wkv5's (wkv_cuda.py says why)
            wkv5_gn_gate_cuda(N, dt, LN_X_EPS, rkvg), "wkv5",
            args=[y, w, u, att_kv, self.ln_x.weight, self.ln_x.bias],
            out=[Tensor.placeholder((T, H, N), "float32"), Tensor.placeholder((H, N, N), "float32"),
                 Tensor.placeholder((T, H, N), dt)])
        return self.output(op.reshape(gated, (T, A))), (new_kv,), xx32

    def forward(self, xx: Tensor, sx: Tensor, att_kv: Tensor, *, layer: int, tap: Taps,
                mixed: list[Tensor] | None = None, decay: Tensor | None = None):
        """(T, C) inputs and this layer's wkv state -> (att.out, (new att_kv,)). ``mixed``:
        ``time_mix(xx, sx, self.mixes())`` when the caller made it already (common.Block does);
        ``decay``: w when the model made it (RWKV5Model.layer_decays: v5.2 only, u is time_faaaa)."""
        cfg = self.config
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        T = xx.shape[0]
        pre = f"L{layer}.att."

        mixed = mixed or time_mix(xx, sx, self.mixes())
        xk, xv, xr = mixed[:3]
        for name, val in (("xk", xk), ("xv", xv), ("xr", xr)):
            tap(pre + name, val)
        if self.gated:
            xg = mixed[3]
            tap(pre + "xg", xg)
        r = self.receptance_act(self.receptance(xr))  # (T, A)
        k = self.key(xk)
        v = self.value(xv)
        for name, val in (("r", r), ("k", k), ("v", v)):
            tap(pre + name, val)
        if self.gated:
            g = op.silu(self.gate(xg))
            tap(pre + "g", g)
        w, u = self.decay_and_bonus() if decay is None else (decay, self.time_faaaa)

        def scan_input(x: Tensor) -> Tensor:  # the scan reads fp32 whatever the dtype
            # Cast, then reshape: the cast (elementwise) fuses into the matmul's epilogue, and the
            # reshape is a view; reshaped first, the cast was a kernel of its own (an injective op
            # does not fuse after a matmul).
            return op.reshape(to_dtype(x, "float32"), (T, H, N))

        wkv, new_kv = op.tensor_ir_op(
            self.kernel,
            "wkv5",
            args=[scan_input(r), scan_input(k), scan_input(v), w, u, self.kernel_state(att_kv)],
            out=[Tensor.placeholder((T, H, N), "float32"), Tensor.placeholder((H, N, N), "float32")],
        )
        wkv = op.reshape(wkv, (T, C))
        tap(pre + "wkv", wkv)
        # GroupNorm per token and head over the head's N channels; never over time.
        ln_x = self.ln_x(wkv)
        tap(pre + "ln_x", ln_x)
        if self.gated:
            gated = to_dtype(ln_x, self.dtype) * g
            tap(pre + "gated", gated)
        else:
            gated = to_dtype(ln_x, self.dtype)  # 5.0: no gate
        out = self.output(gated)
        tap(pre + "out", out)
        return out, (new_kv,)


def decays_te(*time_decays: te.Tensor) -> list[te.Tensor]:
    """w = exp(-exp(time_decay)) of every layer, one output each, in one kernel."""
    outs = te.compute(time_decays[0].shape, lambda h, n: tuple(tirx.exp(-tirx.exp(d[h, n])) for d in time_decays),
                      name="decay")
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def _y_placeholder(groups: int, rows: int, epilogue: str, dt: str) -> Tensor:
    return Tensor.placeholder((groups, 1, rows) if epilogue == "cast" else (1, rows),
                              "float32" if epilogue == "logits" else dt)


def decode_gemv(x: Tensor, weight: Tensor, epilogue: str, *extra: Tensor) -> Tensor:
    """``x @ weight.T`` for one token with its elementwise tail, one kernel (gemv_cuda.decode_gemv_cuda):
    ``weight`` (rows, K) or stacked (G, rows, K) with ``x`` (G, 1, K); ``extra``: the tail's e0[, e1]."""
    from parity.compiled.gemv_cuda import decode_gemv_cuda

    *g, rows, k = (int(d) for d in weight.shape)
    groups = g[0] if g else 1
    func = decode_gemv_cuda(k, weight.dtype, ((groups, rows, epilogue),), x_shape=tuple(int(d) for d in x.shape))
    return op.tensor_ir_op(func, f"gemv_{epilogue}", args=[x, weight, *extra],
                           out=_y_placeholder(groups, rows, epilogue, weight.dtype))


def decode_mix_gemv(xx: Tensor, last: Tensor, parts: list[tuple[Tensor, Tensor, str]], *, ln=None):
    """The time-mix lerps of one token and the GEMVs they feed, one kernel (gemv_cuda: mix): for each
    (mu, weight, epilogue) of ``parts``, tail((xx * mu + dt(last) * (1 - mu)) @ weight.T), ``last``
    the carried token (C,) fp32. With ``ln`` (a common.LayerNorm) ``xx`` is its input, normalised
    in the kernel. -> (each part's y ..., xx in fp32 (1, C): the new state)."""
    from parity.compiled.gemv_cuda import decode_gemv_cuda

    specs, args, outs = [], [xx, last] if ln is None else [xx, ln.weight, ln.bias, last], []
    for mu, weight, epilogue in parts:
        *g, rows, k = (int(d) for d in weight.shape)
        groups = g[0] if g else 1
        specs.append((groups, rows, epilogue))
        args += [mu, weight]
        outs.append(_y_placeholder(groups, rows, epilogue, weight.dtype))
    func = decode_gemv_cuda(k, xx.dtype, tuple(specs), mix=True, ln_eps=None if ln is None else ln.eps)
    name = ("gemv_ln_mix_" if ln is not None else "gemv_mix_") + "_".join(e for _, _, e in parts)
    return op.tensor_ir_op(func, name, args=args, out=[*outs, Tensor.placeholder((1, k), "float32")])


def decode_step(x: Tensor) -> bool:
    """Whether ``x`` (T, C) is the decode step's one token (T static 1): the grouped build's decode
    kernels then apply (their shapes are all static). Prefill (T symbolic) keeps DLight's schedules."""
    t = x.shape[0]
    return isinstance(t, int) and t == 1 and decode_gemv_fits(int(x.shape[1]), x.dtype)


class GroupedBlock(Block):
    """``Block``; in the grouped build's decode step (``decode_step``) every matmul is the decode
    GEMV (gemv_cuda.decode_gemv_cuda) with what surrounds it in the same kernel: the LayerNorm,
    token shift and lerps feeding it (r/k/v/g; the FFN's key and receptance, side by side in one
    kernel) with xx's fp32 copy for the state, and its tail: att.output + the residual, relu^2,
    sigmoid, ffn.value + r * v + the residual (common.py's arithmetic, in its order: each product
    accumulated in fp32 and rounded once to the dtype). A layer is 5 kernels: ln1 + r/k/v/g, scan +
    ln_x + gate, output, ln2 + key + receptance, value. No taps (the plain build)."""

    def forward(self, x: Tensor, att_x: Tensor, att_state, ffn_x: Tensor, *, tap: Taps, decay: Tensor | None = None):
        att, ffn = self.att, self.ffn
        ok = getattr(att, "decode_kernels", False) and not tap.enabled and decode_step(x)
        if ok:
            C, F = att.config.n_embd, att.config.dim_ffn
            ok = (decode_gemv_fits(att.config.dim_att, self.dtype) and decode_gemv_fits(F, self.dtype)
                  and C % DECODE_WARPS == 0 and F % DECODE_WARPS == 0)  # (key and receptance side by side)
        if not ok:
            return super().forward(x, att_x, att_state, ffn_x, tap=tap, decay=decay)
        att_kwargs = {"decay": decay} if decay is not None else {}
        x, new_att_state, xx32 = att.grouped_forward(x, att_x, *att_state, residual=x, ln=self.ln1, **att_kwargs)
        new_att_x = op.tensor_expr_op(last_row, "last_row", [xx32])
        k, r, xx32 = decode_mix_gemv(x, ffn_x, [(ffn.time_mix_k, ffn.key.weight, "relu2"),
                                                (ffn.time_mix_r, ffn.receptance.weight, "sigmoid")], ln=self.ln2)
        x = decode_gemv(k, ffn.value.weight, "rmul_residual", x, r)
        new_ffn_x = op.tensor_expr_op(last_row, "last_row", [xx32])
        return x, (new_att_x, *new_att_state, new_ffn_x)


class RWKV5Model(RWKVModel):
    attention_cls = Attention
    block_cls = GroupedBlock  # Block itself wherever the attention is not grouped (group_projections)

    def run_head(self, x: Tensor, tap: Taps) -> Tensor:
        """The grouped build's decode step: the head as the decode GEMV (logits in fp32, rounded to
        the dtype first, as ``RWKVModel.run_head``); everywhere else RWKVModel's."""
        if not (getattr(self, "decode_kernels", False) and not tap.enabled and decode_step(x)):
            return super().run_head(x, tap)
        return decode_gemv(self.ln_out(x), self.head.weight, "logits")

    def __init__(self, config: ModelConfig, *, debug: bool = False, dtype: str = "float32"):
        super().__init__(config, attention=self.attention_cls, layout=state_layout(config), debug=debug, dtype=dtype)

    def layer_decays(self) -> list[Tensor] | None:
        """v5.2: every layer's w = exp(-exp(time_decay)) in one kernel (``decays_te``), the same
        arithmetic as ``Attention.decay_and_bonus`` makes per layer (a kernel per layer, each step).
        Only where every layer uses that very method: a bug-zoo attention with its own decay, and
        5.0/5.1 (per-head decay, broadcast), keep theirs."""
        atts = [block.att for block in self.blocks]
        if not all(a.per_channel and type(a).decay_and_bonus is Attention.decay_and_bonus for a in atts):
            return None
        out = op.tensor_expr_op(decays_te, "decay", [a.time_decay for a in atts])
        return list(out) if isinstance(out, (list, tuple)) else [out]




def group_projections(model: RWKV5Model, *, decode_kernels: bool = True) -> bool:
    """Give the plain CUDA build its grouped attention (``Attention.group``) in every layer, and record
    in the model which checkpoint tensors each stacked parameter is made of (``param_groups``).
    Only the gated versions (5.1, 5.2) with this file's own attention, GroupNorm and decay: a bug-zoo
    attention, 5.0 (no gate) and every other build keep the separate Linears. ``decode_kernels``:
    the decode step is ``GroupedBlock``'s kernels (else DLight's, as the prefill). Returns whether it did."""
    atts = [block.att for block in model.blocks]
    if not atts or not all(type(a) is Attention and a.gated and type(a.ln_x) is GroupNormKernel for a in atts):
        return False
    if model.quant is not None:
        return False
    groups = {}
    for i, att in enumerate(atts):
        pre = f"blocks.{i}.att."
        groups[pre + "rkvg_weight"] = [pre + f"{n}.weight" for n in Attention.GROUPS]
        groups[pre + "rkvg_mix"] = [pre + f"time_mix_{n[0]}" for n in Attention.GROUPS]
        att.group()
    model._param_groups = groups
    model.decode_kernels = decode_kernels
    for att in atts:
        att.decode_kernels = decode_kernels
    return True
