"""Layout adapters to the canonical layout, and read-back of TVM's RNN state object.

Canonical layouts (docs/dump-format.md): per-token stages (T, ...) with no batch axis, wkv
outputs (T, A) with heads flattened, ``state.L{l}.att_kv`` (H, N, N) as [head, k-index, v-index].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

import numpy as np

from parity.errors import ParityError


def drop_batch(x: np.ndarray) -> np.ndarray:
    """(1, ...) -> (...): a batch of one sequence, as MLC-style ports keep every tensor."""
    x = np.asarray(x)
    if not x.ndim or x.shape[0] != 1:
        raise ParityError(f"drop_batch expects a leading batch axis of 1, got shape {list(x.shape)}")
    return x[0]


def hvk_to_hkv(x: np.ndarray) -> np.ndarray:
    """A wkv state kept as [.., head, v, k] -> canonical [.., head, k, v] (a copy).

    With N x N per head the shape cannot tell the two apart; only the values can, so a missing
    adapter shows as a divergence at state.L*.att_kv, never as a shape error.
    """
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ParityError(f"hvk_to_hkv expects (..., N, N), got shape {list(x.shape)}")
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def flatten_heads(x: np.ndarray) -> np.ndarray:
    """(T, H, N) -> (T, H*N): the canonical width of att.wkv and the other per-head stages."""
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1)


def rows_view(x: np.ndarray) -> np.ndarray:
    """(C,) -> (1, C): a port's single-token tensor without a token axis, as one token row."""
    x = np.asarray(x)
    return x.reshape(1, -1) if x.ndim == 1 else x


def name_state(
    values: Sequence, *, n_layer: int, slots: Sequence[str], adapt: Mapping[str, Callable] | None = None
) -> dict[str, np.ndarray]:
    """A port's flat state list, layer-major with the slots of each layer in ``slots`` order (e.g.
    MLC-LLM's ATT_X, ATT_KV, FFN_X = ("att_x", "att_kv", "ffn_x")), as canonical ``state.L{l}.<slot>``.

    ``adapt``: slot-name pattern -> layout adapter; every matching one applies, in the order given,
    e.g. ``{"*": drop_batch, "att_kv": hvk_to_hkv}``. Values may be numpy arrays or TVM tensors.
    """
    values = list(values)
    if len(values) != n_layer * len(slots):
        raise ParityError(f"{len(values)} state tensors for {n_layer} layers x {len(slots)} slots ({', '.join(slots)})")
    out = {}
    for i, value in enumerate(values):
        layer, slot = divmod(i, len(slots))
        slot = slots[slot]
        value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        for pattern, fn in (adapt or {}).items():
            if fnmatchcase(slot, pattern):
                value = fn(value)
        out[f"state.L{layer}.{slot}"] = np.array(value, copy=True)
    return out


class RNNStateReader:
    """Read a TVM runtime RNN state object (``vm.builtin.rnn_state_create``, as MLC-LLM's RWKV uses)
    back as canonical ``state.L{l}.<slot>`` arrays, through the ``vm.builtin.rnn_state_debug_get``
    builtin: (state, layer, state id, sequence id) -> that sequence's current value.

    ``slots``: state id -> canonical slot name, e.g. ``{0: "att_x", 1: "att_kv", 2: "ffn_x"}``.
    ``adapt``: slot name -> layout adapter, e.g. ``{"att_kv": hvk_to_hkv}``.
    """

    def __init__(self, *, n_layer: int, slots: Mapping[int, str], adapt: Mapping[str, Callable] | None = None,
                 seq_id: int = 0):
        import tvm

        self._get = tvm.get_global_func("vm.builtin.rnn_state_debug_get", allow_missing=True)
        if self._get is None:
            raise ParityError("this TVM has no vm.builtin.rnn_state_debug_get; read the state with your own getter")
        self.n_layer = n_layer
        self.slots = dict(slots)
        self.adapt = dict(adapt or {})
        self.seq_id = seq_id

    def read(self, state, *, layer: int, state_id: int) -> np.ndarray:
        return self._get(state, layer, state_id, self.seq_id).numpy().copy()

    def __call__(self, state) -> dict[str, np.ndarray]:
        out = {}
        for layer in range(self.n_layer):
            for state_id, slot in self.slots.items():
                value = self.read(state, layer=layer, state_id=state_id)
                if slot in self.adapt:
                    value = self.adapt[slot](value)
                out[f"state.L{layer}.{slot}"] = value
        return out
