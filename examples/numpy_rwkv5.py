"""RWKV-5.2 in plain numpy, as a parity plug-in backend (docs/backends.md).

Written from the RWKV-5.2 equations (token shift, per-head matrix-valued wkv state with decay
exp(-exp(w)) and bonus u, GroupNorm ln_x, SiLU gate; squared-ReLU channel mix), not from parity's
torch reference, so agreeing with it means something. Everything is float32, the wkv state included. Use it as

    parity run --checkpoint fixtures/rwkv5_2-L4-C128-H2.pth \
        --backends reference,examples/numpy_rwkv5.py:make_backend

It records every canonical stage; a port that can observe less returns less (at least logits).
"""

from __future__ import annotations

import numpy as np

from parity.errors import ParityError

LN_EPS = 1e-5
# ln_x eps of the official package since 0.8.21; ports that kept 1e-5 differ where a head's
# variance is near eps, which is exactly the kind of difference parity should show, not hide.
LN_X_EPS = 64e-5


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, *, eps: float = LN_EPS) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased, as torch's layer_norm
    return (x - mean) / np.sqrt(var + eps) * w + b


def _shift(xx: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Row t is xx[t-1]; row 0 is the previous step's last row, kept in the state."""
    return np.concatenate([prev[None, :], xx[:-1]], axis=0)


def _mix(xx: np.ndarray, sx: np.ndarray, mu: np.ndarray) -> np.ndarray:
    return xx * mu + sx * (1 - mu)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


class NumpyRWKV5:
    """One model plus its recurrent state; ``step`` advances the state and returns every stage."""

    name = "numpy-rwkv5"

    def __init__(self, checkpoint):
        cfg = checkpoint.config
        if cfg.version.value != "5.2":
            raise ParityError(f"examples/numpy_rwkv5.py runs RWKV-5.2 only; this checkpoint is RWKV-{cfg.version.value}")
        self.n_layer, self.n_head, self.head_size = cfg.n_layer, cfg.n_head, cfg.head_size
        w = {k: v.float().numpy() for k, v in checkpoint.weights.items()}  # bf16 -> fp32 is exact
        # ln0 is folded into the embedding once, as the official package does.
        self.emb = _layer_norm(w["emb.weight"], w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
        self.ln_out = (w["ln_out.weight"], w["ln_out.bias"])
        self.head = np.ascontiguousarray(w["head.weight"].T)  # stored (out, in); x @ W.T
        self.layers = [self._layer_weights(w, prefix=f"blocks.{l}.") for l in range(self.n_layer)]
        self.reset()

    @staticmethod
    def _layer_weights(w: dict, *, prefix: str) -> dict:
        p = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
        out = {k: v.reshape(-1) for k, v in p.items() if "time_mix" in k or k.startswith(("ln", "att.ln_x"))}
        out |= {k: np.ascontiguousarray(v.T) for k, v in p.items() if k.endswith(".weight") and v.ndim == 2}
        # The one place decay is transformed: w = exp(-exp(time_decay)) per channel, (H, N).
        out["decay"] = np.exp(-np.exp(p["att.time_decay"]))
        out["bonus"] = p["att.time_faaaa"]  # u, used raw in 5.2
        return out

    def reset(self) -> None:
        C, H, N = self.emb.shape[1], self.n_head, self.head_size
        self.state = [
            {"att_x": np.zeros(C, np.float32), "att_kv": np.zeros((H, N, N), np.float32), "ffn_x": np.zeros(C, np.float32)}
            for _ in range(self.n_layer)
        ]

    def _wkv(self, r, k, v, *, p: dict, state: dict) -> np.ndarray:
        """The recurrence, one token at a time: each row reads the state the previous row wrote."""
        T, H, N = r.shape[0], self.n_head, self.head_size
        r, k, v = (a.reshape(T, H, N) for a in (r, k, v))  # (T, H, N)
        S = state["att_kv"]  # (H, N, N), [head, k-index i, v-index j]
        out = np.empty((T, H, N), np.float32)
        for t in range(T):
            kv = k[t, :, :, None] * v[t, :, None, :]  # (H, i, j)
            out[t] = np.einsum("hi,hij->hj", r[t], p["bonus"][:, :, None] * kv + S)
            S = kv + p["decay"][:, :, None] * S
        state["att_kv"] = S
        return out.reshape(T, H * N)

    def _group_norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per token and per head, over that head's N channels only."""
        T = x.shape[0]
        g = x.reshape(T, self.n_head, self.head_size)
        mean, var = g.mean(-1, keepdims=True), g.var(-1, keepdims=True)
        return ((g - mean) / np.sqrt(var + LN_X_EPS)).reshape(T, -1) * w + b

    def _layer(self, x: np.ndarray, *, l: int, rec: dict) -> np.ndarray:
        p, st, L = self.layers[l], self.state[l], f"L{l}."
        a = {"ln1": _layer_norm(x, p["ln1.weight"], p["ln1.bias"])}
        a["shift"] = _shift(a["ln1"], st["att_x"])
        for c in "kvrg":
            a[f"x{c}"] = _mix(a["ln1"], a["shift"], p[f"att.time_mix_{c}"])
        a["r"] = a["xr"] @ p["att.receptance.weight"]  # no sigmoid in v5
        a["k"] = a["xk"] @ p["att.key.weight"]
        a["v"] = a["xv"] @ p["att.value.weight"]
        gate = a["xg"] @ p["att.gate.weight"]
        a["g"] = gate * _sigmoid(gate)  # silu
        a["wkv"] = self._wkv(a["r"], a["k"], a["v"], p=p, state=st)
        a["ln_x"] = self._group_norm(a["wkv"], p["att.ln_x.weight"], p["att.ln_x.bias"])
        a["gated"] = a["ln_x"] * a["g"]
        a["out"] = a["gated"] @ p["att.output.weight"]
        st["att_x"] = a["ln1"][-1]
        x = x + a["out"]
        rec |= {f"{L}att.{k}": v for k, v in a.items()} | {f"{L}x_after_att": x}

        f = {"ln2": _layer_norm(x, p["ln2.weight"], p["ln2.bias"])}
        f["shift"] = _shift(f["ln2"], st["ffn_x"])
        f["xk"] = _mix(f["ln2"], f["shift"], p["ffn.time_mix_k"])
        f["xr"] = _mix(f["ln2"], f["shift"], p["ffn.time_mix_r"])
        f["r"] = _sigmoid(f["xr"] @ p["ffn.receptance.weight"])
        f["k"] = np.square(np.maximum(f["xk"] @ p["ffn.key.weight"], 0))
        f["out"] = f["r"] * (f["k"] @ p["ffn.value.weight"])
        st["ffn_x"] = f["ln2"][-1]
        x = x + f["out"]
        rec |= {f"{L}ffn.{k}": v for k, v in f.items()} | {f"{L}x_out": x}
        return x

    def step(self, ids: list[int]) -> dict[str, np.ndarray]:
        rec: dict[str, np.ndarray] = {}
        x = rec["emb"] = self.emb[np.asarray(ids)]  # (T, C)
        for l in range(self.n_layer):
            x = self._layer(x, l=l, rec=rec)
        rec["ln_out"] = _layer_norm(x, *self.ln_out)
        rec["logits"] = rec["ln_out"] @ self.head  # (T, V)
        for l, st in enumerate(self.state):
            rec |= {f"state.L{l}.{slot}": value.copy() for slot, value in st.items()}
        return rec


def make_backend(checkpoint) -> NumpyRWKV5:
    """The plug-in entry point: ``examples/numpy_rwkv5.py:make_backend``."""
    return NumpyRWKV5(checkpoint)
