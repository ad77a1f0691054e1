"""Broken TIR scan kernels for the bug zoo: each is a real porting bug, written on purpose.

Never used by the real model. Each differs from parity/compiled/wkv5_kernel.py or wkv4_kernel.py
in exactly the way its docstring says, so the zoo can check that the harness localises it.
"""

from functools import lru_cache

from tvm.script import tirx as T

from parity.compiled.targets import register_cuda_kernel
from parity.compiled.wkv5_kernel import wkv5


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


@T.prim_func(private=True)
def wkv5_time_parallel_cpu(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """BUG (a CPU schedule): the output loop made parallel over time (T.parallel(t) — the cores
    split the tokens), which is only safe if each token reads a state nobody writes, so the port
    reads the *incoming* state for every token; the state itself is still advanced serially
    (correctly). Row 0 and every decode step are exact; prefill rows t >= 1 are wrong."""
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
    for t in T.parallel(seq_len):
        for h in range(H):
            for j in range(N):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state[h, i, j])
    for h in T.parallel(H):
        for j in range(N):
            for i in range(N):
                state_out[h, i, j] = state[h, i, j]
            for tt in T.serial(seq_len):
                for i in range(N):
                    state_out[h, i, j] = k[tt, h, i] * v[tt, h, j] + w[h, i] * state_out[h, i, j]


# -- GPU-only porting bugs ---------------------------------------------------------------------------
# Each is a pair: the kernel as the port wrote it with plain loops (what the unscheduled llvm build
# compiles — correct there, which is the point) and the same kernel as scheduled onto CUDA threads,
# where the schedule breaks it. ``register_cuda_kernel`` pairs them for the CUDA build
# (parity/compiled/targets.py). Extents that become threads are static (per head size).

@T.prim_func(private=True)
def wkv5_time_on_threads_llvm(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """The scan with t outside j: correct when t runs in order (llvm runs loops as written)."""
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
        for t in T.serial(seq_len):  # on CUDA this loop is bound to threadIdx.y: see below
            for j in range(N):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]


@lru_cache(maxsize=None)
def wkv5_time_on_threads_cuda(head_size: int):
    """BUG (the seed's bug as it appears once scheduled): the time axis bound to threads
    (threadIdx.y), as if it were spatial. All T threads of a head update the same state at once:
    a decode (T = 1) is exact; prefill rows and the state after a prefill are wrong."""
    N = head_size

    @T.prim_func(private=True)
    def kernel(
        r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
        state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int64()
        H = T.int64()
        r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
        k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
        v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
        w = T.match_buffer(w_handle, (H, N), "float32")
        u = T.match_buffer(u_handle, (H, N), "float32")
        state = T.match_buffer(state_handle, (H, N, N), "float32")
        out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
        state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
        for h in T.thread_binding(H, thread="blockIdx.x"):
            for t in T.thread_binding(seq_len, thread="threadIdx.y"):
                for j in T.thread_binding(N, thread="threadIdx.x"):
                    acc = T.decl_buffer((1,), "float32", scope="local")
                    if t == 0:
                        for i in range(N):
                            state_out[h, i, j] = state[h, i, j]
                    acc[0] = T.float32(0)
                    for i in range(N):
                        acc[0] = acc[0] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                        state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]
                    out[t, h, j] = acc[0]

    return kernel


@T.prim_func(private=True)
def wkv5_key_on_threads_llvm(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """The scan with the key index i outside j, accumulating out[t, h, j] over i: correct serially."""
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
        for i in range(N):
            for j in range(N):
                state_out[h, i, j] = state[h, i, j]
        for t in T.serial(seq_len):
            for j in range(N):
                out[t, h, j] = T.float32(0)
            for i in range(N):  # on CUDA this loop is bound to threadIdx.x: see below
                for j in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]


@lru_cache(maxsize=None)
def wkv5_key_on_threads_cuda(head_size: int):
    """BUG (a race between the threads of one head): the key index — the reduction axis of the
    output — bound to threads, each adding its term into out[t, h, j] with a plain read-modify-
    write of global memory. No barrier can fix it (it needs atomics or a tree reduction); the
    threads' updates overwrite each other, in prefill and decode alike."""
    N = head_size

    @T.prim_func(private=True)
    def kernel(
        r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
        state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int64()
        H = T.int64()
        r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
        k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
        v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
        w = T.match_buffer(w_handle, (H, N), "float32")
        u = T.match_buffer(u_handle, (H, N), "float32")
        state = T.match_buffer(state_handle, (H, N, N), "float32")
        out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
        state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
        for h in T.thread_binding(H, thread="blockIdx.x"):
            for i in T.thread_binding(N, thread="threadIdx.x"):
                for j in range(N):
                    state_out[h, i, j] = state[h, i, j]  # thread i owns row i of the state: no race here
                for t in range(seq_len):
                    out[t, h, i] = T.float32(0)
                    T.tvm_storage_sync("shared")
                    for j in range(N):
                        out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
                        state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]
                    T.tvm_storage_sync("shared")

    return kernel


@T.prim_func(private=True)
def wkv5_two_phase_llvm(
    r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
    state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
):
    """The scan in two phases per token: read the state by columns (out), then update it by rows.
    Serially the phases follow each other, so it is correct."""
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
            for j in range(N):  # phase 1: thread j reads column j of the state
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j])
            for i in range(N):  # phase 2: thread i updates row i of the state
                for j in range(N):
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]


@lru_cache(maxsize=None)
def wkv5_missing_barrier_cuda(head_size: int):
    """BUG (a missing barrier): the two-phase scan on one thread per index, with no __syncthreads
    between the phases. A thread reads state column j while other threads still write their rows
    (and the next token's reads overtake the last token's writes). TVM places barriers for shared
    memory by itself, but not for a global buffer like this state: only threads in different
    warps can get ahead of each other, so a head of N <= 32 may even come out right."""
    N = head_size

    @T.prim_func(private=True)
    def kernel(
        r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
        state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int64()
        H = T.int64()
        r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
        k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
        v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
        w = T.match_buffer(w_handle, (H, N), "float32")
        u = T.match_buffer(u_handle, (H, N), "float32")
        state = T.match_buffer(state_handle, (H, N, N), "float32")
        out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
        state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
        for h in T.thread_binding(H, thread="blockIdx.x"):
            for x in T.thread_binding(N, thread="threadIdx.x"):
                acc = T.decl_buffer((1,), "float32", scope="local")
                for i in range(N):
                    state_out[h, i, x] = state[h, i, x]
                for t in range(seq_len):
                    acc[0] = T.float32(0)
                    for i in range(N):
                        acc[0] = acc[0] + r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, x] + state_out[h, i, x])
                    out[t, h, x] = acc[0]
                    # BUG: a T.tvm_storage_sync("shared") belongs here ...
                    for j in range(N):
                        state_out[h, x, j] = k[t, h, x] * v[t, h, j] + w[h, x] * state_out[h, x, j]
                    # ... and here.

    return kernel


# The port's own CPU kernel is the correct one; the k/v swap lives only in its CUDA kernel. A
# distinct object (same TIR), so the CUDA build pairs it with the broken kernel below.
wkv5_kv_swapped_llvm = wkv5.with_attr("parity.note", "the CPU kernel of a port whose CUDA kernel swaps k and v")


@lru_cache(maxsize=None)
def wkv5_kv_swapped_cuda(head_size: int):
    """BUG (a wrong thread binding): the thread index (meant to be the value index j) used to index
    k, and the serial key index used to index v: S[i, j] <- k[j] v[i] + w[i] S[i, j]."""
    N = head_size

    @T.prim_func(private=True)
    def kernel(
        r_handle: T.handle, k_handle: T.handle, v_handle: T.handle, w_handle: T.handle, u_handle: T.handle,
        state_handle: T.handle, out_handle: T.handle, state_out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int64()
        H = T.int64()
        r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
        k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
        v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
        w = T.match_buffer(w_handle, (H, N), "float32")
        u = T.match_buffer(u_handle, (H, N), "float32")
        state = T.match_buffer(state_handle, (H, N, N), "float32")
        out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
        state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
        for h in T.thread_binding(H, thread="blockIdx.x"):
            for j in T.thread_binding(N, thread="threadIdx.x"):
                s = T.decl_buffer((N,), "float32", scope="local")
                acc = T.decl_buffer((1,), "float32", scope="local")
                for i in range(N):
                    s[i] = state[h, i, j]
                for t in range(seq_len):
                    acc[0] = T.float32(0)
                    for i in range(N):
                        acc[0] = acc[0] + r[t, h, i] * (u[h, i] * k[t, h, j] * v[t, h, i] + s[i])
                        s[i] = k[t, h, j] * v[t, h, i] + w[h, i] * s[i]
                    out[t, h, j] = acc[0]
                for i in range(N):
                    state_out[h, i, j] = s[i]

    return kernel


register_cuda_kernel(wkv5_time_on_threads_llvm, lambda config: wkv5_time_on_threads_cuda(config.head_size))
register_cuda_kernel(wkv5_key_on_threads_llvm, lambda config: wkv5_key_on_threads_cuda(config.head_size))
register_cuda_kernel(wkv5_two_phase_llvm, lambda config: wkv5_missing_barrier_cuda(config.head_size))
register_cuda_kernel(wkv5_kv_swapped_llvm, lambda config: wkv5_kv_swapped_cuda(config.head_size))
