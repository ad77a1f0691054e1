"""Crashes and hangs injected into the TVM model (the crash mutants of parity/mutants/crash.py).

Kept apart from compiled.py so the families grow independently; ``model_class`` looks here.

Each is the real wkv5 scan (parity/compiled/wkv5_kernel.py) with one fault that strikes only when
T = 1, i.e. at the first decode step: the prefill runs, is recorded and is compared, and the
harness must then report the dead or stuck backend at decode step 1, in kernel wkv5.
"""

from __future__ import annotations

from tvm.script import tirx as T

from parity.compiled.rwkv5_model import Attention, RWKV5Model


@T.prim_func(private=True)
def wkv5_oob_gather(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """BUG: the state row is gathered at an index offset by 2^32 rows when T = 1 (a stride computed
    for another layout; nothing checks bounds — TVM: "Fast mode segfaults when there are
    out-of-bounds indices"). About a terabyte past the buffer: unmapped memory, SIGSEGV."""
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    seq_len = T.int64()
    H = T.int64()
    N = T.int64()
    r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
    k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
    v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
    w = T.match_buffer(w_handle, (H, N), "float32")
    u = T.match_buffer(u_handle, (H, N), "float32")
    state = T.match_buffer(state_handle, (H, N, N), "float32")
    out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
    state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
    for h in T.parallel(H):
        for j in range(N):
            for i in range(N):
                state_out[h, i, j] = state[h, i + T.Select(seq_len == T.int64(1), T.int64(4294967296), T.int64(0)), j]
            for t in T.serial(seq_len):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]


@T.prim_func(private=True)
def wkv5_abort(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """BUG: a native check that fails for T = 1 and calls abort() (an assert in a hand-written
    kernel, a failed CHECK in a runtime): SIGABRT."""
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    seq_len = T.int64()
    H = T.int64()
    N = T.int64()
    r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
    k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
    v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
    w = T.match_buffer(w_handle, (H, N), "float32")
    u = T.match_buffer(u_handle, (H, N), "float32")
    state = T.match_buffer(state_handle, (H, N, N), "float32")
    out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
    state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
    if seq_len == T.int64(1):
        T.evaluate(T.call_extern("int32", "abort"))
    for h in T.parallel(H):
        for j in range(N):
            for i in range(N):
                state_out[h, i, j] = state[h, i, j]
            for t in T.serial(seq_len):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]


@T.prim_func(private=True)
def wkv5_endless_loop(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """BUG: a spin-wait counts up to T - 2 (a bound written for the prefill): with T = 1 the counter
    never meets it and the kernel never returns. The loop yields the CPU (sched_yield) each turn,
    which is also what keeps the compiler from removing it."""
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    seq_len = T.int64()
    H = T.int64()
    N = T.int64()
    r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
    k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
    v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
    w = T.match_buffer(w_handle, (H, N), "float32")
    u = T.match_buffer(u_handle, (H, N), "float32")
    state = T.match_buffer(state_handle, (H, N, N), "float32")
    out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
    state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
    counter = T.decl_buffer((1,), "int64")
    counter[0] = T.int64(0)
    while counter[0] != seq_len - T.int64(2):
        T.evaluate(T.call_extern("int32", "sched_yield"))
        counter[0] = counter[0] + T.int64(1)
    for h in T.parallel(H):
        for j in range(N):
            for i in range(N):
                state_out[h, i, j] = state[h, i, j]
            for t in T.serial(seq_len):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]


def _v5(kernel, name: str):
    attention = type(f"Attention{name}", (Attention,), {"kernel": kernel})
    return type("CrashRWKV5Model", (RWKV5Model,), {"attention_cls": attention})


MODELS: dict = {
    "crash-oob-gather": _v5(wkv5_oob_gather, "OOBGather"),
    "crash-kernel-abort": _v5(wkv5_abort, "Abort"),
    "hang-kernel-loop": _v5(wkv5_endless_loop, "EndlessLoop"),
}
