"""Pure-PyTorch RWKV-5 (5.0, 5.1, 5.2), ChatRWKV style: prefill and decode over explicit state.

The three versions differ in exactly three places, each spelled out once at load time:
    decay w   5.0/5.1: per head, exp(-exp(time_decay)) of shape (H,);  5.2: per channel, (H, N)
    bonus u   5.0/5.1: exp(time_first), per head;                       5.2: time_faaaa raw, (H, N)
    gate      5.0: none (att.output takes ln_x);  5.1/5.2: g = silu(xg·Wg), gated = ln_x·g
Per-head w and u are broadcast to (H, N) so one recurrence serves all three.

Readable rather than fast: one function per block, shapes commented, every canonical stage
(docs/RWKV.md §2) handed to an optional recorder as it is computed. The same math serves a
prefill of T tokens and a decode of one (T = 1); nothing here keeps hidden state between calls.

Precision: matmuls run in the model dtype (fp32/fp16/bf16), but the decay w, the bonus u, the
wkv state and the wkv accumulator stay fp32 — bf16 would round w = exp(-exp(-8)) to 1.0 and an
fp16 accumulator loses ~1e-3 relative (docs/RWKV.md §3). GroupNorm runs in fp32 for the same reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from parity.checkpoint import Checkpoint, ModelConfig, ModelVersion
from parity.errors import ParityError
from parity.stages import SPLICE_STAGES

# ln_x eps of the official package since 0.8.21 (training: GroupNorm(o/8, eps=1e-5), the same thing).
LN_X_EPS = 64e-5
LN_EPS = 1e-5

# float64 is the arbiter: every stage, the wkv state and its accumulator included, in double.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# The official package's RESCALE_LAYER: 6 whenever fp16 computes anything, else 0 (off). fp16's
# largest finite value is 65504, and a trained model's residual stream grows layer after layer;
# halving it every 6 layers (with att.output and ffn.value divided to match) keeps it in range.
# bf16 has fp32's exponent range and needs none (docs/RWKV.md §3).
RESCALE_LAYER = {"float16": 6}

# Stages that carry the residual stream's scale; a rescaled model records them multiplied back
# (by a power of two, so exactly) to the canonical, unscaled values every other backend records.
_STREAM_STAGES = ("att.out", "ffn.out", "x_after_att", "x_out")



def rescale_layer_for(dtype: str) -> int:
    return RESCALE_LAYER.get(dtype, 0)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of w, u, the wkv state and its sums: fp32, or fp64 when the whole model is fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Recorder(Protocol):
    def __call__(self, stage: str, value: torch.Tensor) -> None: ...


def _no_record(stage: str, value: torch.Tensor) -> None:
    pass


def check_ids(ids, *, vocab_size: int) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ParityError("no token ids given")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise ParityError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    return ids


@dataclass
class LayerState:
    att_x: torch.Tensor  # (C,) last row of ln1 output, model dtype
    att_kv: torch.Tensor  # (H, N, N) fp32, indexed [head, k-index, v-index]
    ffn_x: torch.Tensor  # (C,) last row of ln2 output, model dtype


@dataclass
class RWKV5State:
    layers: list[LayerState] = field(default_factory=list)

    def clone(self) -> "RWKV5State":
        return RWKV5State([LayerState(s.att_x.clone(), s.att_kv.clone(), s.ffn_x.clone()) for s in self.layers])

    def slots(self) -> dict[str, torch.Tensor]:
        """Canonical state stage names -> tensors (``state.L{l}.att_kv`` …)."""
        out = {}
        for i, s in enumerate(self.layers):
            out[f"state.L{i}.att_x"] = s.att_x
            out[f"state.L{i}.att_kv"] = s.att_kv
            out[f"state.L{i}.ffn_x"] = s.ffn_x
        return out


@dataclass
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    mix_k: torch.Tensor  # (C,)
    mix_v: torch.Tensor
    mix_r: torch.Tensor
    mix_g: torch.Tensor | None  # None in 5.0 (no gate)
    w: torch.Tensor  # (H, N) decay exp(-exp(time_decay)), fp32
    u: torch.Tensor  # (H, N) bonus, fp32
    Wr: torch.Tensor  # (A, C) stored (out, in)
    Wk: torch.Tensor
    Wv: torch.Tensor
    Wg: torch.Tensor | None
    Wo: torch.Tensor  # (C, A)
    lnx_w: torch.Tensor  # (A,) fp32
    lnx_b: torch.Tensor
    ffn_mix_k: torch.Tensor
    ffn_mix_r: torch.Tensor
    ffn_Wk: torch.Tensor  # (F, C)
    ffn_Wr: torch.Tensor  # (C, C)
    ffn_Wv: torch.Tensor  # (C, F)


def decay_and_bonus(weights: dict[str, torch.Tensor], *, prefix: str, config: ModelConfig):
    """(w, u), both (H, N) fp32, from one layer's raw checkpoint tensors — the version split."""
    H, N = config.n_head, config.head_size
    decay = weights[prefix + "att.time_decay"].float()
    w = torch.exp(-torch.exp(decay))  # fp32 always: bf16 would round w to 1.0 for decay < -8
    if config.version == ModelVersion.V5_2:
        return w.reshape(H, N), weights[prefix + "att.time_faaaa"].float().reshape(H, N)
    u = torch.exp(weights[prefix + "att.time_first"].float())
    return w.reshape(H, 1).expand(H, N).contiguous(), u.reshape(H, 1).expand(H, N).contiguous()


class LayerwiseModel:
    """What both families' references share: the step as embed -> layer after layer -> head.

    fp16 runs rescaled as the official package does (``rescale_layer`` R = 6): layer l's
    att.output and ffn.value weights are divided by 2^(l // R) at load and the residual stream is
    halved after every R-th layer, so inside layer l the stream is 2^(l // R) times smaller than the
    canonical one. What is *recorded* is always canonical (the four stream stages multiplied back,
    in fp32, exactly); ``stream_in`` turns a canonical input into the stream layer l expects.

    ``embed`` / ``layer`` / ``head`` are also the replay's entry points (parity/dumpers/replay.py):
    the reference runs one layer on inputs some other backend recorded, so a stage can be judged
    by the error it adds itself, whatever error arrived with its inputs. A family supplies
    ``layer(index, x, state, record=)``, ``zero_state()`` and its ``state_cls``.
    """

    state_cls: type
    rescale_layer: int = 0
    # Where the weights live and every tensor of a step is made (``place``); inputs handed in as
    # numpy (a replay's recorded values) or CPU tensors are moved here.
    device: torch.device = torch.device("cpu")

    def place(self, device: str) -> None:
        """Move every weight to ``device`` (``cpu``: nothing moves). Called at the end of loading: the
        load-time math (ln0 folded into the table, the decay's exps, int8 / q4 quantisation) ran on the
        CPU, so a CUDA reference starts from the very weights, and quantised codes, the CPU one holds
        and the compiled builds bind; only the step's math runs on the GPU."""
        self.device = torch.device(device)
        if self.device.type == "cpu":
            return

        def move(t):
            return t.to(self.device) if isinstance(t, torch.Tensor) else t

        self.layers = [
            {k: move(v) for k, v in p.items()} if isinstance(p, dict)
            else dataclasses.replace(p, **{f.name: move(getattr(p, f.name)) for f in dataclasses.fields(p)})
            for p in self.layers
        ]
        for name in ("emb", "ln_out_w", "ln_out_b", "head_weight"):
            setattr(self, name, move(getattr(self, name)))

    def _here(self, x) -> torch.Tensor:
        """``x`` (numpy or torch, from anywhere) as a tensor on this model's device."""
        return torch.as_tensor(x, device=self.device)

    def layer_scale(self, layer: int) -> float:
        """Canonical stream / this model's stream, inside layer ``layer`` (a power of two)."""
        return float(2 ** (layer // self.rescale_layer)) if self.rescale_layer else 1.0

    def stream_in(self, layer: int, x) -> torch.Tensor:
        """A canonical residual-stream value (numpy or torch) as layer ``layer`` of this model takes it."""
        x = self._here(x)
        return (x.to(self.acc) / self.layer_scale(layer)).to(self.dtype)

    def head_in(self, x) -> torch.Tensor:
        """A canonical last ``x_out`` as the head takes it (after the last layer's halving, if any)."""
        n = self.config.n_layer
        x = self._here(x)
        return (x.to(self.acc) / self.layer_scale(n)).to(self.dtype)

    def layer(self, index: int, x: torch.Tensor, state, *, record: Recorder | None = None,
              splice: Mapping[str, object] | None = None):
        """Layer ``index`` on this model's stream rows x (T, C) (``stream_in`` of a canonical one) from
        ``state``: (x_out in this model's stream, the layer's new state). Records canonical values.

        ``splice`` (canonical stage name -> a value, numpy or torch): after recording its own value of
        such a stage, the layer goes on from the given one instead (the replay's GroupNorm input,
        parity/dumpers/replay.py). Only the stages in ``parity.stages.SPLICE_STAGES`` are honoured."""
        record = record or _no_record
        scale = self.layer_scale(index)
        if scale != 1.0:
            inner, stream = record, tuple(f"L{index}.{s}" for s in _STREAM_STAGES)

            def record(stage: str, value: torch.Tensor) -> None:
                inner(stage, value.to(self.acc) * scale if stage in stream else value)

        splice = {f"L{index}.{s}": splice[f"L{index}.{s}"] for s in SPLICE_STAGES if f"L{index}.{s}" in (splice or {})}
        return self._layer(index, x, state, record=record, splice=splice)

    def _prepared_weights(self, w: dict, *, weights: str | None) -> dict:
        """The fp32 weights as the official package prepares them at load: att.output and ffn.value
        of layer l divided by its rescale factor (exact: a power of two), then — ``weights="int8"``,
        the package's ``fp32i8`` / ``fp16i8`` — every matmul weight quantised to uint8 and
        dequantised in the model dtype (parity/reference/int8.py); ``weights="q4"``, MLC-LLM's
        q4f16_1 — quantised to 4-bit groups and dequantised to fp16 (parity/reference/q4.py)."""
        if weights not in (None, "int8", "q4"):
            raise ParityError(f"unknown weight format {weights!r}; the reference knows int8 and q4")
        self.weights_format = weights
        w = dict(w)
        for layer in range(self.config.n_layer):
            scale = self.layer_scale(layer)
            if scale != 1.0:
                for k in (f"blocks.{layer}.att.output.weight", f"blocks.{layer}.ffn.value.weight"):
                    w[k] = w[k] / scale
        if weights == "int8":
            from parity.reference.int8 import int8_weights

            w = int8_weights(w, dtype=self.dtype)
        elif weights == "q4":
            from parity.reference.q4 import q4_weights

            w = q4_weights(w, dtype=self.dtype)
        return w

    def embed(self, ids, *, record: Recorder | None = None) -> torch.Tensor:
        ids = check_ids(ids, vocab_size=self.config.vocab_size).to(self.device)
        x = self.emb[ids]  # (T, C)
        (record or _no_record)("emb", x)
        return x

    def head(self, x: torch.Tensor, *, record: Recorder | None = None) -> torch.Tensor:
        """ln_out and the head on the last layer's output rows: logits (T, V) fp32 (fp64 for the arbiter)."""
        record = record or _no_record
        x = F.layer_norm(x, (self.config.n_embd,), self.ln_out_w, self.ln_out_b, LN_EPS)
        record("ln_out", x)
        logits = (x @ self.head_weight.T).to(self.acc)
        record("logits", logits)
        return logits

    @torch.no_grad()
    def forward(self, ids, state=None, *, record: Recorder | None = None):
        """Run T tokens (T rows of every stage). Returns (logits (T, V) fp32, new state).

        The input state is not modified, so a caller can rerun a step from the same state.
        """
        record = record or _no_record
        state = state or self.zero_state()
        x = self.embed(ids, record=record)
        new_layers = []
        for i, st in enumerate(state.layers):
            x, st = self.layer(i, x, st, record=record)
            new_layers.append(st)
            if self.rescale_layer and (i + 1) % self.rescale_layer == 0:
                x = x / 2  # as the official package: after every R-th layer, in the model dtype
        logits = self.head(x, record=record)
        new_state = self.state_cls(new_layers)
        for name, val in new_state.slots().items():
            record(name, val)
        return logits, new_state


class RWKV5Reference(LayerwiseModel):
    """RWKV-5.x reference. ``forward(ids, state, record=...)`` handles prefill (T > 1) and decode."""

    state_cls = RWKV5State

    def __init__(self, checkpoint: Checkpoint, *, dtype: str = "float32", rescale_layer: int | None = None,
                 weights: str | None = None, device: str = "cpu"):
        cfg = checkpoint.config
        if cfg.version not in (ModelVersion.V5_0, ModelVersion.V5_1, ModelVersion.V5_2):
            raise ParityError(f"RWKV5Reference runs RWKV-5.x, checkpoint is RWKV-{cfg.version.value}")
        if dtype not in DTYPES:
            raise ParityError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.config: ModelConfig = cfg
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.rescale_layer = rescale_layer_for(dtype) if rescale_layer is None else rescale_layer
        acc = self.acc = accumulate_dtype(self.dtype)
        # fp32: the checkpoint's one shared fp32 copy (every backend in this process reads it; the
        # .to(dt) below are then no-ops, never copies). fp16/bf16 keep their own cast copies, and
        # fp64 (the arbiter) its own; their upcast dict is temporary, not cached on the checkpoint.
        shared = self.dtype == torch.float32
        w = checkpoint.fp32_weights() if shared else {k: v.to(acc) for k, v in checkpoint.weights.items()}
        dt = self.dtype

        # Embedding LayerNorm is folded into the table at load, as the official package does:
        # per row the math is identical to applying ln0 after the lookup.
        self.emb = checkpoint.folded_embedding() if shared else F.layer_norm(
            w["emb.weight"], (cfg.n_embd,), w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"], LN_EPS).to(dt)
        self.layers: list[_Layer] = []
        gated = cfg.version.gated
        w = self._prepared_weights(w, weights=weights)
        for i in range(cfg.n_layer):
            b = f"blocks.{i}."
            w_i, u_i = (t.to(acc) for t in decay_and_bonus(w, prefix=b, config=cfg))
            self.layers.append(
                _Layer(
                    ln1_w=w[b + "ln1.weight"].to(dt), ln1_b=w[b + "ln1.bias"].to(dt),
                    ln2_w=w[b + "ln2.weight"].to(dt), ln2_b=w[b + "ln2.bias"].to(dt),
                    mix_k=w[b + "att.time_mix_k"].reshape(-1).to(dt),
                    mix_v=w[b + "att.time_mix_v"].reshape(-1).to(dt),
                    mix_r=w[b + "att.time_mix_r"].reshape(-1).to(dt),
                    mix_g=w[b + "att.time_mix_g"].reshape(-1).to(dt) if gated else None,
                    w=w_i, u=u_i,
                    Wr=w[b + "att.receptance.weight"].to(dt), Wk=w[b + "att.key.weight"].to(dt),
                    Wv=w[b + "att.value.weight"].to(dt), Wg=w[b + "att.gate.weight"].to(dt) if gated else None,
                    Wo=w[b + "att.output.weight"].to(dt),
                    lnx_w=w[b + "att.ln_x.weight"], lnx_b=w[b + "att.ln_x.bias"],
                    ffn_mix_k=w[b + "ffn.time_mix_k"].reshape(-1).to(dt),
                    ffn_mix_r=w[b + "ffn.time_mix_r"].reshape(-1).to(dt),
                    ffn_Wk=w[b + "ffn.key.weight"].to(dt), ffn_Wr=w[b + "ffn.receptance.weight"].to(dt),
                    ffn_Wv=w[b + "ffn.value.weight"].to(dt),
                )
            )
        self.ln_out_w = w["ln_out.weight"].to(dt)
        self.ln_out_b = w["ln_out.bias"].to(dt)
        self.head_weight = w["head.weight"].to(dt)  # (V, C)
        self.place(device)

    # -- state ----------------------------------------------------------------------------------
    def zero_state(self) -> RWKV5State:
        c = self.config
        return RWKV5State([
            LayerState(
                att_x=torch.zeros(c.n_embd, dtype=self.dtype, device=self.device),
                att_kv=torch.zeros(c.n_head, c.head_size, c.head_size, dtype=self.acc, device=self.device),
                ffn_x=torch.zeros(c.n_embd, dtype=self.dtype, device=self.device),
            )
            for _ in range(c.n_layer)
        ])

    # -- blocks ---------------------------------------------------------------------------------
    def _wkv(self, r, k, v, *, w, u, s):
        """The v5 recurrence over T rows: a true scan, each step reading the state the last wrote.

        r, k, v: (T, H, N) fp32; w, u: (H, N); s: (H, N, N) [head, i=k, j=v]. Returns ((T,H,N), s).
        """
        T = r.shape[0]
        out = torch.empty_like(r)
        for t in range(T):
            kv = k[t].unsqueeze(2) * v[t].unsqueeze(1)  # (H, N_i, N_j)
            out[t] = torch.einsum("hi,hij->hj", r[t], u.unsqueeze(2) * kv + s)
            s = kv + w.unsqueeze(2) * s
        return out, s

    def _receptance(self, xr: torch.Tensor, p: _Layer) -> torch.Tensor:
        # Its own method so a deliberately wrong reference (tests, the bug zoo) can override it.
        return xr @ p.Wr.T  # (T, A); v5: no sigmoid on r (v4 has one)

    @staticmethod
    def _spliced(splice: Mapping[str, object], stage: str, own: torch.Tensor) -> torch.Tensor:
        """``own``, or the value handed in for ``stage`` in its dtype and shape (``layer(splice=...)``)."""
        if stage not in splice:
            return own
        return torch.as_tensor(splice[stage], device=own.device).to(own.dtype).reshape(own.shape)

    def _att(self, x, layer: int, st: LayerState, record: Recorder, splice: Mapping[str, object]):
        c, p = self.config, self.layers[layer]
        T, H, N = x.shape[0], c.n_head, c.head_size
        pre = f"L{layer}.att."
        xx = F.layer_norm(x, (c.n_embd,), p.ln1_w, p.ln1_b, LN_EPS)
        record(pre + "ln1", xx)
        sx = torch.cat((st.att_x.unsqueeze(0), xx[:-1]))  # row t is xx[t-1]; row 0 the carried state
        record(pre + "shift", sx)
        xk = xx * p.mix_k + sx * (1 - p.mix_k)
        xv = xx * p.mix_v + sx * (1 - p.mix_v)
        xr = xx * p.mix_r + sx * (1 - p.mix_r)
        record(pre + "xk", xk)
        record(pre + "xv", xv)
        record(pre + "xr", xr)
        if p.Wg is not None:
            xg = xx * p.mix_g + sx * (1 - p.mix_g)
            record(pre + "xg", xg)
        r = self._receptance(xr, p)
        k = xk @ p.Wk.T
        v = xv @ p.Wv.T
        record(pre + "r", r)
        record(pre + "k", k)
        record(pre + "v", v)
        r, k, v = (self._spliced(splice, pre + name, own) for name, own in (("r", r), ("k", k), ("v", v)))
        if p.Wg is not None:
            g = F.silu(xg @ p.Wg.T)
            record(pre + "g", g)
        wkv, s = self._wkv(
            r.to(self.acc).view(T, H, N), k.to(self.acc).view(T, H, N), v.to(self.acc).view(T, H, N),
            w=p.w, u=p.u, s=st.att_kv
        )
        wkv = wkv.reshape(T, H * N)  # (T, A) fp32
        record(pre + "wkv", wkv)
        wkv = self._spliced(splice, pre + "wkv", wkv)
        # GroupNorm per token and per head over that head's N channels, never over time.
        ln_x = F.group_norm(wkv, num_groups=H, weight=p.lnx_w, bias=p.lnx_b, eps=LN_X_EPS)
        record(pre + "ln_x", ln_x)
        if p.Wg is not None:
            gated = ln_x.to(self.dtype) * g
            record(pre + "gated", gated)
        else:
            gated = ln_x.to(self.dtype)  # 5.0: no gate, att.output takes ln_x
        out = gated @ p.Wo.T
        record(pre + "out", out)
        return out, LayerState(att_x=xx[-1].clone(), att_kv=s, ffn_x=st.ffn_x)

    def _ffn(self, x, layer: int, st: LayerState, record: Recorder):
        c, p = self.config, self.layers[layer]
        pre = f"L{layer}.ffn."
        xx = F.layer_norm(x, (c.n_embd,), p.ln2_w, p.ln2_b, LN_EPS)
        record(pre + "ln2", xx)
        sx = torch.cat((st.ffn_x.unsqueeze(0), xx[:-1]))
        record(pre + "shift", sx)
        xk = xx * p.ffn_mix_k + sx * (1 - p.ffn_mix_k)
        xr = xx * p.ffn_mix_r + sx * (1 - p.ffn_mix_r)
        record(pre + "xk", xk)
        record(pre + "xr", xr)
        r = torch.sigmoid(xr @ p.ffn_Wr.T)
        record(pre + "r", r)
        k = torch.relu(xk @ p.ffn_Wk.T) ** 2
        record(pre + "k", k)
        out = r * (k @ p.ffn_Wv.T)
        record(pre + "out", out)
        return out, LayerState(att_x=st.att_x, att_kv=st.att_kv, ffn_x=xx[-1].clone())

    # -- entry points (embed, head and forward: LayerwiseModel) --------------------------------
    def _layer(self, index: int, x: torch.Tensor, state: LayerState, *, record: Recorder,
               splice: Mapping[str, object]):
        """Layer ``index`` on input rows x (T, C) from ``state``: (x_out (T, C), the layer's new state)."""
        att, st = self._att(x, index, state, record, splice)
        x = x + att
        record(f"L{index}.x_after_att", x)
        ffn, st = self._ffn(x, index, st, record)
        x = x + ffn
        record(f"L{index}.x_out", x)
        return x, st

    def layer_state(self, slots) -> LayerState:
        """One layer's state from canonical slot values (numpy or torch), in this model's dtypes."""
        return LayerState(
            att_x=self._here(slots["att_x"]).to(self.dtype).reshape(self.config.n_embd),
            att_kv=self._here(slots["att_kv"]).to(self.acc).reshape(self.config.n_head, self.config.head_size, self.config.head_size),
            ffn_x=self._here(slots["ffn_x"]).to(self.dtype).reshape(self.config.n_embd),
        )

    def prefill(self, ids, state: RWKV5State | None = None, *, record: Recorder | None = None):
        return self.forward(ids, state, record=record)

    def decode(self, token: int, state: RWKV5State, *, record: Recorder | None = None):
        return self.forward([token], state, record=record)


RecorderFn = Callable[[str, torch.Tensor], None]
