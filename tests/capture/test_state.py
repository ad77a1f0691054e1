"""Layout adapters, the flat state list, and TVM's runtime RNN state object read back."""

from __future__ import annotations

import numpy as np
import pytest

from parity.capture import RNNStateReader, drop_batch, flatten_heads, hvk_to_hkv, name_state, rows_view
from parity.errors import ParityError


def test_hvk_to_hkv_is_the_transpose_of_the_last_two_axes() -> None:
    s = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)  # [head, v, k]
    out = hvk_to_hkv(s)
    assert out[1, 0, 2] == s[1, 2, 0] and out.flags.c_contiguous
    with pytest.raises(ParityError, match=r"\(\.\.\., N, N\)"):
        hvk_to_hkv(np.zeros((2, 3, 4)))


def test_drop_batch_refuses_a_real_batch() -> None:
    assert drop_batch(np.zeros((1, 5, 7))).shape == (5, 7)
    with pytest.raises(ParityError, match="leading batch axis of 1"):
        drop_batch(np.zeros((3, 7)))  # a (T, C) record: dropping its token axis would be wrong


def test_flatten_heads_and_rows_view() -> None:
    assert flatten_heads(np.zeros((4, 2, 3))).shape == (4, 6)
    assert rows_view(np.zeros(7)).shape == (1, 7)


def test_name_state_reads_a_flat_layer_major_list() -> None:
    C, H, N = 4, 2, 3
    values = []
    for layer in range(2):
        values += [np.full((1, C), 10 * layer + 0.0, np.float32),
                   np.arange(H * N * N, dtype=np.float32).reshape(1, H, N, N) + 10 * layer,
                   np.full((1, C), 10 * layer + 2.0, np.float32)]
    out = name_state(values, n_layer=2, slots=("att_x", "att_kv", "ffn_x"), adapt={"*": drop_batch, "att_kv": hvk_to_hkv})
    assert sorted(out) == sorted(f"state.L{l}.{s}" for l in range(2) for s in ("att_x", "att_kv", "ffn_x"))
    assert out["state.L1.ffn_x"].shape == (C,) and float(out["state.L1.ffn_x"][0]) == 12.0
    np.testing.assert_array_equal(out["state.L1.att_kv"], values[4][0].swapaxes(-1, -2))
    with pytest.raises(ParityError, match="5 state tensors for 2 layers x 3 slots"):
        name_state(values[:5], n_layer=2, slots=("att_x", "att_kv", "ffn_x"))


def _rnn_state(shapes, *, n_layer: int):
    """A real TVM RNN state object (vm.builtin.rnn_state_create) with llvm-built get/set copies.

    The get/set functions are the object's storage accessors: storage is (sequences, history,
    *shape) and a set writes history slot (h + 1) % history, the convention the builtin expects.
    """
    import tvm
    from tvm.script import tirx as T

    nseq, hist = 2, 2

    def accessor(shape, *, write: bool):
        rows, cols = shape

        @T.prim_func
        def f(storage_h: T.handle, seq_h: T.handle, hist_h: T.handle, data_h: T.handle):
            B = T.int32()
            storage = T.match_buffer(storage_h, (nseq, hist, rows, cols), "float32")
            seq = T.match_buffer(seq_h, (B,), "int32")
            hid = T.match_buffer(hist_h, (B,), "int32")
            data = T.match_buffer(data_h, (B, rows, cols), "float32")
            for b in range(B):
                for i in range(rows):
                    for j in range(cols):
                        if write:
                            storage[seq[b], (hid[b] + 1) % hist, i, j] = data[b, i, j]
                        else:
                            data[b, i, j] = storage[seq[b], hid[b], i, j]

        return tvm.compile(tvm.IRModule({"main": f}), target="llvm")["main"]

    create = tvm.get_global_func("vm.builtin.rnn_state_create")
    init = [tvm.runtime.tensor(np.zeros(s, "float32")) for s in shapes]
    state = create(n_layer, nseq, hist, [accessor(s, write=False) for s in shapes],
                   [accessor(s, write=True) for s in shapes], init)
    tvm.get_global_func("vm.builtin.kv_state_add_sequence")(state, 0)
    return state


def test_rnn_state_reader_reads_the_runtime_state_object() -> None:
    import tvm

    shapes = [(1, 3), (4, 4)]  # state id 0: a (1, C) shift row; state id 1: one head's [v, k] matrix
    state = _rnn_state(shapes, n_layer=2)
    rng = np.random.default_rng(0)
    written = {(layer, sid): rng.standard_normal((1, *shapes[sid])).astype(np.float32)
               for layer in range(2) for sid in range(2)}
    tvm.get_global_func("vm.builtin.kv_state_begin_forward")(state, tvm.runtime.ShapeTuple([0]), tvm.runtime.ShapeTuple([1]))
    for (layer, sid), value in written.items():
        tvm.get_global_func("vm.builtin.rnn_state_set")(state, layer, sid, tvm.runtime.tensor(value))
    tvm.get_global_func("vm.builtin.kv_state_end_forward")(state)
    out = RNNStateReader(n_layer=2, slots={0: "att_x", 1: "att_kv"}, adapt={"att_kv": hvk_to_hkv})(state)
    assert sorted(out) == ["state.L0.att_kv", "state.L0.att_x", "state.L1.att_kv", "state.L1.att_x"]
    for layer in range(2):
        # What was set for the sequence, the wkv matrix transposed from [v, k] to [k, v].
        np.testing.assert_array_equal(out[f"state.L{layer}.att_x"], written[(layer, 0)][0])
        np.testing.assert_array_equal(out[f"state.L{layer}.att_kv"], written[(layer, 1)][0].T)
