"""Backend: the official ChatRWKV package (``rwkv`` on PyPI), run as it ships.

It is the independent oracle: it settles "is my reference right?". We run it on the CPU in fp32
with its JIT and CUDA kernels off, and record what it exposes without changing its math:
    - ``emb``: rows of its own precomputed embedding table (it folds ln0 in at load);
    - per layer, by wrapping its per-layer functions (``att_seq_v5_2``, ``ffn_one`` …) from the
      outside: ``L{l}.x_after_att`` and ``L{l}.x_out`` (what they return), and the new state;
    - ``logits`` of every token row (``full_output=True``) and the state after every step, its
      flat per-layer list adapted to the canonical slots (its v5 S is [head, k, v] already).
Finer stages (ln1, r, k, v, wkv …) live inside those functions; capturing them would mean
editing its code, which would make it no longer the official package.
"""

from __future__ import annotations

import os
from pathlib import Path

from parity.checkpoint import Checkpoint, ModelVersion
from parity.dumpers.backends import Backend
from parity.dumpers.format import StepWriter
from parity.errors import ParityError
from parity.stages import state_slots

# The package's per-layer entry points, by version and by prefill (seq) / decode (one).
_ATT_FUNCS = {
    ModelVersion.V4: ("att_seq", "att_one"),
    ModelVersion.V5_0: ("att_seq_v5", "att_one_v5"),
    ModelVersion.V5_1: ("att_seq_v5_1", "att_one_v5_1"),
    ModelVersion.V5_2: ("att_seq_v5_2", "att_one_v5_1"),  # the package decodes 5.2 with the 5.1 function
}
_FFN_FUNCS = ("ffn_seq", "ffn_one")


# Our dtype names -> the package's strategy words (it runs fp16 and bf16 on the CPU too).
STRATEGIES = {"float32": "cpu fp32", "float16": "cpu fp16", "bfloat16": "cpu bf16"}


def load_official_model(source: Checkpoint | str | Path, *, dtype: str = "float32", weights: str | None = None):
    """The official package's model, as every caller runs it: ``cpu fp32`` (or ``cpu fp16`` / ``cpu bf16``).

    Given a path, the package reads the file itself, as it ships. Given a loaded ``Checkpoint``, it
    gets the checkpoint's shared fp32 tensors instead of its own copy (a 1.5B model: 6.3 GB less),
    and its math is unchanged: in ``cpu fp32`` it upcasts every tensor to fp32 before any
    arithmetic (bf16 -> fp32 is exact), so fp32 input is the same input, and on the CPU it keeps
    transposed views, never writing into them. The one exception is the embedding: it applies
    ln0 to the table in the file's dtype when emb and ln0 share it, so those three tensors are
    handed over exactly as stored. Tested bit-identical in tests/test_checkpoint.py.
    """
    if dtype not in STRATEGIES:
        raise ParityError(f"the official package runs {', '.join(STRATEGIES)} here, not {dtype!r}")
    strategy = STRATEGIES[dtype] + ("i8" if weights == "int8" else "")
    RWKV = _load_official()
    if not isinstance(source, Checkpoint):
        return RWKV(str(Path(source)), strategy, verbose=False)
    fp32 = source.fp32_weights()
    weights = dict(fp32)  # a new dict: the package renames and deletes keys in it
    for key in _AS_STORED:
        weights[key] = source.weights[key]
    # The package takes a file name (it appends .pth when missing) and calls torch.load on it; that
    # one call returns our tensors. Any other torch.load goes through untouched.
    name = str(source.path)
    name = name if name.endswith(".pth") else name + ".pth"
    import torch

    real_load = torch.load

    def load(f, *args, **kwargs):
        return weights if f == name else real_load(f, *args, **kwargs)

    import torch.nn.functional as F

    from parity.checkpoint import LN0_EPS

    # Its ln0 fold is F.layer_norm(emb, (C,), ln0 weight, ln0 bias) over the whole table; where it runs
    # in fp32 on the stored table (emb fp32, or emb and ln0 stored in different dtypes: the package's
    # fallback upcasts them), that is exactly Checkpoint.folded_embedding's call on the same values,
    # so it gets that shared table instead of a second one. Any other call goes through untouched.
    real_layer_norm, emb = F.layer_norm, weights["emb.weight"]
    folded = source.folded_embedding() if emb.dtype == torch.float32 else None  # made before F is patched
    ln0 = (fp32["blocks.0.ln0.weight"], fp32["blocks.0.ln0.bias"])

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=LN0_EPS):
        if (folded is not None and input is emb and eps == LN0_EPS and tuple(normalized_shape) == tuple(emb.shape[1:])
                and weight is not None and bias is not None and weight.dtype == bias.dtype == torch.float32
                and torch.equal(weight, ln0[0]) and torch.equal(bias, ln0[1])):
            return folded
        return real_layer_norm(input, normalized_shape, weight, bias, eps)

    torch.load, F.layer_norm = load, layer_norm
    try:
        return RWKV(name, strategy, verbose=False)
    finally:
        torch.load, F.layer_norm = real_load, real_layer_norm


# The package's embedding table is ln0(emb) computed in the file's dtype (see load_official_model).
_AS_STORED = ("emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias")


def canonical_state(flat, *, version: str, n_layer: int) -> dict:
    """The package's flat per-layer state list under canonical slot names (its v5 S is [h, k, v])."""
    slots = state_slots(version)
    if len(flat) != len(slots) * n_layer:
        raise ParityError(f"the official package returned {len(flat)} state tensors, expected {len(slots) * n_layer}")
    return {f"state.L{layer}.{slot}": flat[layer * len(slots) + k] for layer in range(n_layer) for k, slot in enumerate(slots)}


def _load_official():
    # Both switches are read at import time; the JIT would also hide the functions we wrap.
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    try:
        from rwkv.model import RWKV
    except ImportError:
        raise ParityError("the chatrwkv backend needs the official package: pip install rwkv==0.8.32") from None
    if os.environ.get("RWKV_JIT_ON") != "0":
        raise ParityError("rwkv.model was imported with its JIT on; run the chatrwkv backend in a fresh process")
    return RWKV


class ChatRWKVBackend(Backend):
    """The official package, ``cpu fp32`` (``cpu fp16`` / ``cpu bf16`` with a dtype).

    In fp16 the package rescales (RESCALE_LAYER 6: the residual stream inside layer l is 2^(l // 6)
    smaller); the stream stages it exposes are multiplied back, exactly, to canonical values.
    """

    def __init__(self, checkpoint: Checkpoint, *, dtype: str = "float32", name: str = "chatrwkv",
                 weights: str | None = None):
        super().__init__(checkpoint=checkpoint, name=name, mode="official", dtype=dtype)
        import importlib.metadata

        self.model = load_official_model(checkpoint, dtype=dtype, weights=weights)
        self.extra = {"package": f"rwkv {importlib.metadata.version('rwkv')}",
                      "strategy": STRATEGIES[dtype] + ("i8" if weights == "int8" else ""),
                      "rescale_layer": int(self.model.RESCALE_LAYER)}
        if weights:
            self.extra["weights"] = weights  # read by the replay (parity/dumpers/replay.py)
        self.state = None
        self._capture: dict = {}
        self._wrap()

    def _wrap(self) -> None:
        version = self.checkpoint.config.version
        att_funcs = _ATT_FUNCS[version]
        slots = state_slots(version.value)
        inner = slots[1:-1]  # the attention's own state: (att_kv,) or (aa, bb, pp)
        counter = {"att": 0, "ffn": 0}

        def wrap_att(fn):
            def wrapped(x, sx, *args, **kwargs):
                out = fn(x, sx, *args, **kwargs)
                layer = counter["att"]
                counter["att"] += 1
                self._capture[f"L{layer}.x_after_att"] = out[0]
                self._capture[f"state.L{layer}.att_x"] = out[1]
                for name, value in zip(inner, out[2:]):
                    self._capture[f"state.L{layer}.{name}"] = value
                return out

            return wrapped

        def wrap_ffn(fn):
            def wrapped(x, sx, *args, **kwargs):
                out = fn(x, sx, *args, **kwargs)
                layer = counter["ffn"]
                counter["ffn"] += 1
                self._capture[f"L{layer}.x_out"] = out[0]
                self._capture[f"state.L{layer}.ffn_x"] = out[1]
                return out

            return wrapped

        for name in set(att_funcs):
            setattr(self.model, name, wrap_att(getattr(self.model, name)))
        for name in _FFN_FUNCS:
            setattr(self.model, name, wrap_ffn(getattr(self.model, name)))
        self._counter = counter

    def begin(self) -> None:
        self.state = None

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        import torch

        self._capture.clear()
        self._counter.update(att=0, ffn=0)
        step.add("emb", self.model.w["emb.weight"][torch.tensor(ids)].float().numpy())
        logits, self.state = self.model.forward(list(ids), self.state, full_output=True)
        # A decode step runs on 1-D vectors; give every per-token stage its (T, ...) row axis.
        captured = {}
        rescale = int(self.model.RESCALE_LAYER)
        for name, value in self._capture.items():
            value = value.detach().float()
            if rescale > 0 and not name.startswith("state."):  # L{l}.x_after_att / L{l}.x_out
                value = value * float(2 ** (int(name[1:].split(".", 1)[0]) // rescale))
            if not name.startswith("state.") and value.dim() == 1:
                value = value.unsqueeze(0)
            captured[name] = value
        logits = logits.float()
        captured["logits"] = logits if logits.dim() == 2 else logits.unsqueeze(0)
        # The returned state list is authoritative (the wrappers saw the same tensors).
        cfg = self.checkpoint.config
        for name, value in canonical_state(self.state, version=cfg.version.value, n_layer=cfg.n_layer).items():
            captured[name] = value.detach().float()
        order = {n: i for i, n in enumerate(self.canonical_order())}
        for name in sorted(captured, key=order.__getitem__):
            step.add(name, captured[name].contiguous().numpy())
