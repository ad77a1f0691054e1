"""Broken TIR scan kernels for the bug zoo: each is a real porting bug, written on purpose.

Never used by the real model. Each differs from parity/compiled/wkv5_kernel.py or wkv4_kernel.py
in exactly the way its docstring says, so the zoo can check that the harness localises it.
"""

from tvm.script import tirx as T


@T.prim_func(private=True)
def wkv5_time_not_recurrent(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """BUG: every token reads the *input* state, as if t were a parallel axis: row 0 and any decode
    step (T = 1) are exact; prefill rows t >= 1 and the state after a prefill are wrong."""
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
            for t in T.serial(seq_len):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state[h, i, j])
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state[h, i, j]


@T.prim_func(private=True)
def wkv5_fp16_accumulator(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """BUG: the output sum over the key index is accumulated in fp16 (rounded after every term)."""
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
                state_out[h, i, j] = state[h, i, j]
            for t in T.serial(seq_len):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = T.Cast("float32", T.Cast("float16", out[t, h, j]) + T.Cast(
                        "float16", r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])))
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]


@T.prim_func(private=True)
def wkv5_writes_input_state(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """BUG: correct scan, but it also writes the final state back into its *input* buffer, so the
    caller's copy of the old state changes: a second identical run from it gives another answer."""
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
                state_out[h, i, j] = state[h, i, j]
            for t in T.serial(seq_len):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]
            for i in range(N):
                state[h, i, j] = state_out[h, i, j]


@T.prim_func(private=True)
def wkv4_naive_fp16(
    k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    aa_handle: T.handle, bb_handle: T.handle, pp_handle: T.handle,
    out_handle: T.handle, aa_out_handle: T.handle, bb_out_handle: T.handle, pp_out_handle: T.handle,
):
    """BUG: the textbook v4 wkv without the running-max subtraction, computed in fp16:
    wkv = (a + e^(u+k) v) / (b + e^(u+k)); a <- e^w a + e^k v; b <- e^w b + e^k. exp() overflows
    fp16 above 11.09 and every product is rounded to fp16; pp is passed through unchanged."""
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    seq_len = T.int64()
    A = T.int64()
    k = T.match_buffer(k_handle, (seq_len, A), "float32")
    v = T.match_buffer(v_handle, (seq_len, A), "float32")
    w = T.match_buffer(w_handle, (A,), "float32")
    u = T.match_buffer(u_handle, (A,), "float32")
    aa = T.match_buffer(aa_handle, (A,), "float32")
    bb = T.match_buffer(bb_handle, (A,), "float32")
    pp = T.match_buffer(pp_handle, (A,), "float32")
    out = T.match_buffer(out_handle, (seq_len, A), "float32")
    aa_out = T.match_buffer(aa_out_handle, (A,), "float32")
    bb_out = T.match_buffer(bb_out_handle, (A,), "float32")
    pp_out = T.match_buffer(pp_out_handle, (A,), "float32")
    for c in T.parallel(A):
        aa_out[c] = aa[c]
        bb_out[c] = bb[c]
        pp_out[c] = pp[c]
        for t in T.serial(seq_len):
            ek = T.exp(T.Cast("float16", u[c] + k[t, c]))
            out[t, c] = T.Cast("float32", (T.Cast("float16", aa_out[c]) + ek * T.Cast("float16", v[t, c]))
                               / (T.Cast("float16", bb_out[c]) + ek))
            decay = T.exp(T.Cast("float16", w[c]))
            e2 = T.exp(T.Cast("float16", k[t, c]))
            aa_out[c] = T.Cast("float32", decay * T.Cast("float16", aa_out[c]) + e2 * T.Cast("float16", v[t, c]))
            bb_out[c] = T.Cast("float32", decay * T.Cast("float16", bb_out[c]) + e2)
