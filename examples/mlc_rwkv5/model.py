"""An RWKV-5.2 port built the way MLC-LLM builds one — the "their code" half of the worked example.

Written by us from MLC-LLM's public conventions (facts, not code), so that parity can be shown
checking a port whose layout, names and entry points are not its own:

- a TVM Relax ``nn.Module`` with HF-style parameter names under ``model.`` (``model.embeddings``,
  ``model.blocks.L.attention.key``, ``model.blocks.L.feed_forward.value``, ``head``);
- weights transformed when loaded, not in the graph: ``time_decay`` holds w = exp(-exp(x))
  (parity/weights_map.py, as MLC-LLM's loader does);
- every activation keeps a batch axis of one sequence, (1, T, C);
- entry points ``embed(input_ids)``, ``prefill(input_embed, state)``, ``decode(input_embed,
  state)``; ``pre_ln`` (ChatRWKV's ln0) is applied at run time by block 0, not folded into the
  embedding table; ``prefill`` returns the logits of the last token only, (1, 1, V);
- state kept per layer in MLC-LLM's state order (ATT_X = 0, ATT_KV = 1, FFN_X = 2) with the wkv
  state as [batch, head, v-index, k-index] — the transpose of parity's canonical [head, k, v];
- ln_x is a GroupNorm with eps = 1e-5 * head_size_divisor ** 2 (HF's RWKV-5 convention, 64e-5).

What is reused from parity/compiled: ``GroupNorm`` (two-pass: TVM's own group_norm loses ~1e-3
on the logits, see rwkv5_model.py) and the llvm target. The wkv kernel, the token shift, the
module tree and the entry points are this port's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from parity.compiled.rwkv5_model import GroupNorm


@dataclass(frozen=True)
class RWKV5Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_heads: int
    head_size: int
    vocab_size: int
    head_size_divisor: int = 8
    layer_norm_epsilon: float = 1e-5

    @property
    def ln_x_eps(self) -> float:
        return 1e-5 * self.head_size_divisor**2


ATT_X, ATT_KV, FFN_X = 0, 1, 2  # state ids, MLC-LLM's order


@T.prim_func(private=True)
def wkv5_hvk(r_h: T.handle, k_h: T.handle, v_h: T.handle, w_h: T.handle, u_h: T.handle, s_h: T.handle,
             out_h: T.handle, s_out_h: T.handle):
    """One sequence's wkv scan; the state is [b, head, v, k]: S[b,h,j,i] for value j, key i."""
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    B, L, H, N = T.int64(), T.int64(), T.int64(), T.int64()
    r = T.match_buffer(r_h, (B, L, H, N), "float32")
    k = T.match_buffer(k_h, (B, L, H, N), "float32")
    v = T.match_buffer(v_h, (B, L, H, N), "float32")
    w = T.match_buffer(w_h, (H, N), "float32")
    u = T.match_buffer(u_h, (H, N), "float32")
    s = T.match_buffer(s_h, (B, H, N, N), "float32")
    out = T.match_buffer(out_h, (B, L, H, N), "float32")
    s_out = T.match_buffer(s_out_h, (B, H, N, N), "float32")
    for b in range(B):
        for h in T.parallel(H):
            for j in range(N):
                for i in range(N):
                    s_out[b, h, j, i] = s[b, h, j, i]
                for t in T.serial(L):  # the recurrence: never reordered
                    out[b, t, h, j] = T.float32(0)
                    for i in range(N):
                        out[b, t, h, j] = out[b, t, h, j] + r[b, t, h, i] * (
                            u[h, i] * k[b, t, h, i] * v[b, t, h, j] + s_out[b, h, j, i])
                        s_out[b, h, j, i] = k[b, t, h, i] * v[b, t, h, j] + w[h, i] * s_out[b, h, j, i]


def _shift(x: te.Tensor, prev: te.Tensor) -> te.Tensor:
    # (1, T, C) and the previous step's last row (1, C): row t of the result is x[t-1].
    return te.compute(x.shape, lambda b, t, c: tirx.if_then_else(t == 0, prev[b, c], x[b, t - 1, c]), name="shift")


def _last(x: te.Tensor) -> te.Tensor:
    return te.compute((x.shape[0], x.shape[2]), lambda b, c: x[b, x.shape[1] - 1, c], name="last_token")


def _last_rows(x: te.Tensor) -> te.Tensor:
    return te.compute((x.shape[0], 1, x.shape[2]), lambda b, t, c: x[b, x.shape[1] - 1, c], name="take_last")


def _lerp(x: Tensor, sx: Tensor, mu: Tensor) -> Tensor:
    return x * mu + sx * (1.0 - mu)


class RWKV5Attention(nn.Module):
    def __init__(self, c: RWKV5Config):
        C, H, N = c.hidden_size, c.num_heads, c.head_size
        self.c = c
        for name in ("time_mix_key", "time_mix_value", "time_mix_receptance", "time_mix_gate"):
            setattr(self, name, nn.Parameter((1, 1, C), "float32"))
        self.time_decay = nn.Parameter((H, N), "float32")  # already w = exp(-exp(x)), from the loader
        self.time_faaaa = nn.Parameter((H, N), "float32")
        self.key = nn.Linear(C, C, bias=False, dtype="float32")
        self.value = nn.Linear(C, C, bias=False, dtype="float32")
        self.receptance = nn.Linear(C, C, bias=False, dtype="float32")
        self.gate = nn.Linear(C, C, bias=False, dtype="float32")
        self.output = nn.Linear(C, C, bias=False, dtype="float32")
        self.ln_x = GroupNorm(H, C, eps=c.ln_x_eps)

    def forward(self, x: Tensor, att_x: Tensor, kv: Tensor):
        B, L, C = x.shape
        H, N = self.c.num_heads, self.c.head_size
        sx = op.tensor_expr_op(_shift, "shift", [x, att_x])
        r = self.receptance(_lerp(x, sx, self.time_mix_receptance))
        k = self.key(_lerp(x, sx, self.time_mix_key))
        v = self.value(_lerp(x, sx, self.time_mix_value))
        g = op.silu(self.gate(_lerp(x, sx, self.time_mix_gate)))
        out, new_kv = op.tensor_ir_op(
            wkv5_hvk, "wkv5_hvk",
            args=[op.reshape(t, (B, L, H, N)) for t in (r, k, v)] + [self.time_decay, self.time_faaaa, kv],
            out=[Tensor.placeholder((B, L, H, N), "float32"), Tensor.placeholder((B, H, N, N), "float32")],
        )
        y = op.reshape(self.ln_x(op.reshape(out, (B * L, C))), (B, L, C))
        return self.output(y * g), op.tensor_expr_op(_last, "last_token", [x]), new_kv


class RWKV5FeedForward(nn.Module):
    def __init__(self, c: RWKV5Config):
        C, F = c.hidden_size, c.intermediate_size
        self.time_mix_key = nn.Parameter((1, 1, C), "float32")
        self.time_mix_receptance = nn.Parameter((1, 1, C), "float32")
        self.key = nn.Linear(C, F, bias=False, dtype="float32")
        self.receptance = nn.Linear(C, C, bias=False, dtype="float32")
        self.value = nn.Linear(F, C, bias=False, dtype="float32")

    def forward(self, x: Tensor, ffn_x: Tensor):
        sx = op.tensor_expr_op(_shift, "shift", [x, ffn_x])
        k = op.square(op.relu(self.key(_lerp(x, sx, self.time_mix_key))))
        r = op.sigmoid(self.receptance(_lerp(x, sx, self.time_mix_receptance)))
        return r * self.value(k), op.tensor_expr_op(_last, "last_token", [x])


class RWKV5Block(nn.Module):
    def __init__(self, c: RWKV5Config, layer: int):
        C, eps = c.hidden_size, c.layer_norm_epsilon
        if layer == 0:
            self.pre_ln = nn.LayerNorm(C, eps=eps, dtype="float32")
        self.ln1 = nn.LayerNorm(C, eps=eps, dtype="float32")
        self.ln2 = nn.LayerNorm(C, eps=eps, dtype="float32")
        self.attention = RWKV5Attention(c)
        self.feed_forward = RWKV5FeedForward(c)
        self.layer = layer

    def forward(self, x: Tensor, state: list[Tensor]):
        if self.layer == 0:
            x = self.pre_ln(x)
        att, att_x, kv = self.attention(self.ln1(x), state[ATT_X], state[ATT_KV])
        x = x + att
        ffn, ffn_x = self.feed_forward(self.ln2(x), state[FFN_X])
        return x + ffn, [att_x, kv, ffn_x]


class RWKV5Model(nn.Module):
    def __init__(self, c: RWKV5Config):
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size, dtype="float32")
        self.blocks = nn.ModuleList([RWKV5Block(c, i) for i in range(c.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_epsilon, dtype="float32")


class RWKV5ForCausalLM(nn.Module):
    def __init__(self, c: RWKV5Config):
        self.c = c
        self.model = RWKV5Model(c)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, dtype="float32")

    def embed(self, input_ids: Tensor):
        return self.model.embeddings(input_ids)  # (1, T, C); pre_ln comes later, in block 0

    def _forward(self, x: Tensor, state):
        new_state = []
        for i, block in enumerate(self.model.blocks):
            x, layer_state = block(x, list(state[3 * i: 3 * i + 3]))
            new_state += layer_state
        x = op.tensor_expr_op(_last_rows, "take_last", [x])  # the last token only, (1, 1, C)
        return self.head(self.model.ln_out(x)), tuple(new_state)

    def prefill(self, input_embed: Tensor, state):
        return self._forward(input_embed, state)

    def decode(self, input_embed: Tensor, state):
        return self._forward(input_embed, state)

    def state_shapes(self) -> list[tuple[int, ...]]:
        C, H, N = self.c.hidden_size, self.c.num_heads, self.c.head_size
        return [(1, C), (1, H, N, N), (1, C)] * self.c.num_hidden_layers

    def get_default_spec(self):
        C = self.c.hidden_size
        state = [nn.spec.Tensor(list(s), "float32") for s in self.state_shapes()]
        mode = {"param_mode": "plain", "effect_mode": "none"}
        return nn.spec.ModuleSpec.from_raw({
            "embed": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "$": dict(mode)},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", C], "float32"), "state": state, "$": dict(mode)},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, C], "float32"), "state": list(state), "$": dict(mode)},
        }, self)


def build(c: RWKV5Config, *, fuse: bool = False, cache_dir: Path | None = None) -> tuple[Path, list[str]]:
    """Compile for llvm once per config, source and pipeline; (library, param names).

    ``fuse=False``: ``tvm.compile``'s default, one kernel per op. ``fuse=True``: Relax's default
    pipeline for the target first, which fuses elementwise ops into their producers (matmul + add,
    the lerps), as a production build does.
    """
    import tvm
    from tvm import relax

    from parity.compiled.build import default_cache_dir, make_target, target_spec

    from parity.compiled import rwkv5_model as ours  # GroupNorm's source is part of this build too

    key = hashlib.sha256("\0".join([Path(__file__).read_text(), Path(ours.__file__).read_text(),
                                    json.dumps(asdict(c), sort_keys=True), f"fuse={fuse}",
                                    json.dumps(target_spec("llvm"), sort_keys=True), tvm.__version__]).encode())
    lib = Path(cache_dir or default_cache_dir()) / "examples" / f"mlc-rwkv5-{key.hexdigest()[:20]}.so"
    names = lib.with_suffix(".json")
    if not (lib.exists() and names.exists()):
        model = RWKV5ForCausalLM(c)
        mod, params = model.export_tvm(spec=model.get_default_spec())
        target = make_target("llvm")
        if fuse:
            with target:
                mod = relax.get_default_pipeline(target)(mod)
        ex = tvm.compile(mod, target=target, relax_pipeline=None if fuse else "default")
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so")
        os.close(fd)
        ex.export_library(tmp)
        os.replace(tmp, lib)  # a killed build never leaves half a library under the final name
        names.write_text(json.dumps([n for n, _ in params]))
    return lib, json.loads(names.read_text())
