"""Pure-PyTorch RWKV-4, ChatRWKV style, with the numerically stable (aa, bb, pp) wkv state.

Differences from v5 that matter for parity: r goes through a sigmoid; the wkv is a per-channel
weighted average kept as numerator aa, denominator bb and running max exponent pp, so no exp()
argument is ever positive (exp overflows above 11.09 in fp16); decay is w = -exp(time_decay)
in log space and the bonus u = time_first is used raw. No GroupNorm, no gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from parity.checkpoint import Checkpoint, ModelConfig, ModelVersion
from parity.errors import ParityError
from parity.reference.rwkv5 import DTYPES, LN_EPS, LayerwiseModel, Recorder, accumulate_dtype, rescale_layer_for

# pp starts here: "minus infinity" that stays finite, so pp - q never makes a NaN (as ChatRWKV).
PP_INIT = -1e30


@dataclass
class LayerState4:
    att_x: torch.Tensor  # (C,) last row of ln1 output
    aa: torch.Tensor  # (A,) fp32 numerator
    bb: torch.Tensor  # (A,) fp32 denominator
    pp: torch.Tensor  # (A,) fp32 running max exponent
    ffn_x: torch.Tensor  # (C,) last row of ln2 output


@dataclass
class RWKV4State:
    layers: list[LayerState4] = field(default_factory=list)

    def slots(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, s in enumerate(self.layers):
            for name in ("att_x", "aa", "bb", "pp", "ffn_x"):
                out[f"state.L{i}.{name}"] = getattr(s, name)
        return out


class RWKV4Reference(LayerwiseModel):
    """RWKV-4 reference. ``forward(ids, state, record=...)`` handles prefill (T > 1) and decode."""

    state_cls = RWKV4State

    def __init__(self, checkpoint: Checkpoint, *, dtype: str = "float32", rescale_layer: int | None = None,
                 weights: str | None = None, device: str = "cpu"):
        cfg = checkpoint.config
        if cfg.version != ModelVersion.V4:
            raise ParityError(f"RWKV4Reference runs RWKV-4, checkpoint is RWKV-{cfg.version.value}")
        if dtype not in DTYPES:
            raise ParityError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.config: ModelConfig = cfg
        self.dtype_name = dtype
        self.dtype = dt = DTYPES[dtype]
        self.rescale_layer = rescale_layer_for(dtype) if rescale_layer is None else rescale_layer
        acc = self.acc = accumulate_dtype(dt)
        # fp32: the checkpoint's one shared fp32 copy (every backend in this process reads it; the
        # .to(dt) below are then no-ops, never copies). fp16/bf16 keep their own cast copies, and
        # fp64 (the arbiter) its own; their upcast dict is temporary, not cached on the checkpoint.
        shared = self.dtype == torch.float32
        w = checkpoint.fp32_weights() if shared else {k: v.to(acc) for k, v in checkpoint.weights.items()}
        self.emb = checkpoint.folded_embedding() if shared else F.layer_norm(
            w["emb.weight"], (cfg.n_embd,), w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"], LN_EPS).to(dt)
        self.layers = []
        w = self._prepared_weights(w, weights=weights)
        for i in range(cfg.n_layer):
            b = f"blocks.{i}."
            p = {
                name: w[b + key].reshape(-1).to(dt) if "time_mix" in key else w[b + key].to(dt)
                for name, key in (
                    ("ln1_w", "ln1.weight"), ("ln1_b", "ln1.bias"), ("ln2_w", "ln2.weight"), ("ln2_b", "ln2.bias"),
                    ("mix_k", "att.time_mix_k"), ("mix_v", "att.time_mix_v"), ("mix_r", "att.time_mix_r"),
                    ("Wk", "att.key.weight"), ("Wv", "att.value.weight"), ("Wr", "att.receptance.weight"),
                    ("Wo", "att.output.weight"), ("ffn_mix_k", "ffn.time_mix_k"), ("ffn_mix_r", "ffn.time_mix_r"),
                    ("ffn_Wk", "ffn.key.weight"), ("ffn_Wr", "ffn.receptance.weight"), ("ffn_Wv", "ffn.value.weight"),
                )
            }
            p["w"] = -torch.exp(w[b + "att.time_decay"])  # (A,) log-space decay, fp32
            p["u"] = w[b + "att.time_first"]  # (A,) used raw, fp32
            self.layers.append(p)
        self.ln_out_w = w["ln_out.weight"].to(dt)
        self.ln_out_b = w["ln_out.bias"].to(dt)
        self.head_weight = w["head.weight"].to(dt)
        self.place(device)

    def zero_state(self) -> RWKV4State:
        c = self.config
        return RWKV4State([
            LayerState4(
                att_x=torch.zeros(c.n_embd, dtype=self.dtype, device=self.device),
                aa=torch.zeros(c.dim_att, dtype=self.acc, device=self.device),
                bb=torch.zeros(c.dim_att, dtype=self.acc, device=self.device),
                pp=torch.full((c.dim_att,), PP_INIT, dtype=self.acc, device=self.device),
                ffn_x=torch.zeros(c.n_embd, dtype=self.dtype, device=self.device),
            )
            for _ in range(c.n_layer)
        ])

    @staticmethod
    def _wkv(k, v, *, w, u, aa, bb, pp):
        """The stable v4 scan over T rows; k, v (T, A) fp32. Returns (wkv (T, A), aa, bb, pp)."""
        out = torch.empty_like(k)
        for t in range(k.shape[0]):
            kk, vv = k[t], v[t]
            ww = u + kk
            q = torch.maximum(pp, ww)
            e1, e2 = torch.exp(pp - q), torch.exp(ww - q)
            out[t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
            ww = w + pp
            q = torch.maximum(ww, kk)
            e1, e2 = torch.exp(ww - q), torch.exp(kk - q)
            aa, bb, pp = e1 * aa + e2 * vv, e1 * bb + e2, q
        return out, aa, bb, pp

    # embed, layer, head and forward: LayerwiseModel; _layer() is this family's.
    def _layer(self, i: int, x: torch.Tensor, st: LayerState4, *, record: Recorder, splice=None):
        # ``splice`` (parity.stages.SPLICE_STAGES) is for GroupNorm's input; RWKV-4 has no GroupNorm.
        """Layer ``i`` on input rows x (T, C) from state ``st``: (x_out (T, C), the layer's new state)."""
        p, C = self.layers[i], self.config.n_embd
        pre = f"L{i}.att."
        xx = F.layer_norm(x, (C,), p["ln1_w"], p["ln1_b"], LN_EPS)
        record(pre + "ln1", xx)
        sx = torch.cat((st.att_x.unsqueeze(0), xx[:-1]))
        record(pre + "shift", sx)
        xk = xx * p["mix_k"] + sx * (1 - p["mix_k"])
        xv = xx * p["mix_v"] + sx * (1 - p["mix_v"])
        xr = xx * p["mix_r"] + sx * (1 - p["mix_r"])
        record(pre + "xk", xk)
        record(pre + "xv", xv)
        record(pre + "xr", xr)
        r = torch.sigmoid(xr @ p["Wr"].T)  # v4: sigmoid on r (v5 has none)
        k = xk @ p["Wk"].T
        v = xv @ p["Wv"].T
        record(pre + "r", r)
        record(pre + "k", k)
        record(pre + "v", v)
        wkv, aa, bb, pp = self._wkv(k.to(self.acc), v.to(self.acc), w=p["w"], u=p["u"], aa=st.aa, bb=st.bb, pp=st.pp)
        record(pre + "wkv", wkv)
        gated = r * wkv.to(self.dtype)
        record(pre + "gated", gated)
        out = gated @ p["Wo"].T
        record(pre + "out", out)
        x = x + out
        record(f"L{i}.x_after_att", x)
        pre = f"L{i}.ffn."
        xx2 = F.layer_norm(x, (C,), p["ln2_w"], p["ln2_b"], LN_EPS)
        record(pre + "ln2", xx2)
        sx2 = torch.cat((st.ffn_x.unsqueeze(0), xx2[:-1]))
        record(pre + "shift", sx2)
        fk = xx2 * p["ffn_mix_k"] + sx2 * (1 - p["ffn_mix_k"])
        fr = xx2 * p["ffn_mix_r"] + sx2 * (1 - p["ffn_mix_r"])
        record(pre + "xk", fk)
        record(pre + "xr", fr)
        rr = torch.sigmoid(fr @ p["ffn_Wr"].T)
        record(pre + "r", rr)
        kk = torch.relu(fk @ p["ffn_Wk"].T) ** 2
        record(pre + "k", kk)
        fout = rr * (kk @ p["ffn_Wv"].T)
        record(pre + "out", fout)
        x = x + fout
        record(f"L{i}.x_out", x)
        return x, LayerState4(att_x=xx[-1].clone(), aa=aa, bb=bb, pp=pp, ffn_x=xx2[-1].clone())

    def layer_state(self, slots) -> LayerState4:
        """One layer's state from canonical slot values (numpy or torch), in this model's dtypes."""
        C, A = self.config.n_embd, self.config.dim_att
        return LayerState4(
            att_x=self._here(slots["att_x"]).to(self.dtype).reshape(C),
            aa=self._here(slots["aa"]).to(self.acc).reshape(A),
            bb=self._here(slots["bb"]).to(self.acc).reshape(A),
            pp=self._here(slots["pp"]).to(self.acc).reshape(A),
            ffn_x=self._here(slots["ffn_x"]).to(self.dtype).reshape(C),
        )

