"""The wkv scans hand-scheduled for CUDA, the way real GPU ports schedule them.

DLight cannot schedule a scan (it raises ScheduleError on the recurrence, docs/TVM.md), so the
CUDA build replaces the llvm kernels of wkv5_kernel.py / wkv4_kernel.py with these, which compute
the same recurrence in the same operation order:

wkv5: one thread block per head, one thread per value index j. Thread j keeps column j of its
head's state, S[:, j], in registers (a local array of N floats) for the whole scan; the time axis
is a serial loop inside the thread, so step t reads exactly what step t-1 wrote. Each step the
block stages r[t, h, :] and k[t, h, :] in shared memory (thread j loads element j); every thread
then reads all N of them. TVM's ThreadSync pass places the barriers the staging needs (before
the reads, and before the next step overwrites the stage).

wkv4: one thread per channel, (aa, bb, pp) in registers, time serial inside the thread.

A register array needs a static length, so the kernels are made per head size (``head_size`` is
64 in every released RWKV-5); the sequence length and the head / channel counts stay symbolic.
"""

from __future__ import annotations

from functools import lru_cache

from tvm import tirx
from tvm.script import tirx as T

WKV4_BLOCK = 128  # threads per block of the wkv4 scan (channels are independent)


@lru_cache(maxsize=None)
def wkv5_cuda(head_size: int):
    N = head_size

    @T.prim_func(private=True)
    def wkv5(
        r_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        w_handle: T.handle,
        u_handle: T.handle,
        state_handle: T.handle,
        out_handle: T.handle,
        state_out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int64()
        H = T.int64()
        r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
        k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
        v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
        w = T.match_buffer(w_handle, (H, N), "float32")
        u = T.match_buffer(u_handle, (H, N), "float32")
        state = T.match_buffer(state_handle, (H, N, N), "float32")  # [head, k-index, v-index]
        out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
        state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
        for h in T.thread_binding(H, thread="blockIdx.x"):
            for j in T.thread_binding(N, thread="threadIdx.x"):
                s = T.decl_buffer((N,), "float32", scope="local")  # S[:, j] of head h
                acc = T.decl_buffer((1,), "float32", scope="local")
                r_s = T.decl_buffer((N,), "float32", scope="shared")
                k_s = T.decl_buffer((N,), "float32", scope="shared")
                for i in range(N):
                    s[i] = state[h, i, j]
                for t in range(seq_len):
                    r_s[j] = r[t, h, j]
                    k_s[j] = k[t, h, j]
                    acc[0] = T.float32(0)
                    for i in range(N):
                        acc[0] = acc[0] + r_s[i] * (u[h, i] * k_s[i] * v[t, h, j] + s[i])
                        s[i] = k_s[i] * v[t, h, j] + w[h, i] * s[i]
                    out[t, h, j] = acc[0]
                for i in range(N):
                    state_out[h, i, j] = s[i]

    return wkv5


@T.prim_func(private=True)
def wkv4_cuda(
    k_handle: T.handle,
    v_handle: T.handle,
    w_handle: T.handle,
    u_handle: T.handle,
    aa_handle: T.handle,
    bb_handle: T.handle,
    pp_handle: T.handle,
    out_handle: T.handle,
    aa_out_handle: T.handle,
    bb_out_handle: T.handle,
    pp_out_handle: T.handle,
):
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
    for c0 in T.thread_binding((A + WKV4_BLOCK - 1) // WKV4_BLOCK, thread="blockIdx.x"):
        for c1 in T.thread_binding(WKV4_BLOCK, thread="threadIdx.x"):
            st = T.decl_buffer((3,), "float32", scope="local")  # aa, bb, pp of channel c
            if c0 * WKV4_BLOCK + c1 < A:
                st[0] = aa[c0 * WKV4_BLOCK + c1]
                st[1] = bb[c0 * WKV4_BLOCK + c1]
                st[2] = pp[c0 * WKV4_BLOCK + c1]
                for t in range(seq_len):
                    c = c0 * WKV4_BLOCK + c1
                    q = T.max(st[2], u[c] + k[t, c])
                    e1 = T.exp(st[2] - q)
                    e2 = T.exp(u[c] + k[t, c] - q)
                    out[t, c] = (e1 * st[0] + e2 * v[t, c]) / (e1 * st[1] + e2)
                    q2 = T.max(st[2] + w[c], k[t, c])
                    d1 = T.exp(st[2] + w[c] - q2)
                    d2 = T.exp(k[t, c] - q2)
                    st[0] = d1 * st[0] + d2 * v[t, c]
                    st[1] = d1 * st[1] + d2
                    st[2] = q2
                aa_out[c0 * WKV4_BLOCK + c1] = st[0]
                bb_out[c0 * WKV4_BLOCK + c1] = st[1]
                pp_out[c0 * WKV4_BLOCK + c1] = st[2]


# -- the plain CUDA build's grouped attention (rwkv5_model.group_projections; issue 10) ---------------
# Written as scheduled TIR, not TE: a TE time-mix with the stacked output and the fp32 copy (two
# shapes) is two kernels under DLight, and a TE GroupNorm cannot sit inside the scan's thread block.

MIX_BLOCK = 256  # threads per block of the stacked time-mix (elementwise)


@lru_cache(maxsize=None)
def time_mix_stacked_cuda(groups: int, dtype: str):
    """Token shift and every lerp of a time-mix in one kernel, the lerps stacked along a new first
    axis (what the grouped GEMV reads): out[g, t, c] = xx[t, c] * mu[g, c] + sx[t, c] * (1 - mu[g, c]),
    sx[t] = xx[t - 1] (row 0: the carried state, cast to the dtype), the arithmetic of common.py's
    ``token_shift`` and ``time_mix`` in their order; copy = xx in fp32 (the state keeps its last row)."""
    G = groups
    one = tirx.const(1.0, dtype)

    @T.prim_func(private=True)
    def time_mix(xx_handle: T.handle, last_handle: T.handle, mu_handle: T.handle, out_handle: T.handle,
                 copy_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int64()
        C = T.int64()
        xx = T.match_buffer(xx_handle, (seq_len, C), dtype)
        last = T.match_buffer(last_handle, (C,), "float32")
        mu = T.match_buffer(mu_handle, (G, 1, 1, C), dtype)
        out = T.match_buffer(out_handle, (G, seq_len, C), dtype)
        copy = T.match_buffer(copy_handle, (seq_len, C), "float32")
        for b in T.thread_binding((seq_len * C + MIX_BLOCK - 1) // MIX_BLOCK, thread="blockIdx.x"):
            for x in T.thread_binding(MIX_BLOCK, thread="threadIdx.x"):
                if b * MIX_BLOCK + x < seq_len * C:
                    for g in range(G):
                        out[g, (b * MIX_BLOCK + x) // C, (b * MIX_BLOCK + x) % C] = (
                            xx[(b * MIX_BLOCK + x) // C, (b * MIX_BLOCK + x) % C] * mu[g, 0, 0, (b * MIX_BLOCK + x) % C]
                            + T.if_then_else((b * MIX_BLOCK + x) // C == 0,
                                             T.Cast(dtype, last[(b * MIX_BLOCK + x) % C]),
                                             xx[(b * MIX_BLOCK + x) // C - 1, (b * MIX_BLOCK + x) % C])
                            * (one - mu[g, 0, 0, (b * MIX_BLOCK + x) % C]))
                    copy[(b * MIX_BLOCK + x) // C, (b * MIX_BLOCK + x) % C] = T.Cast(
                        "float32", xx[(b * MIX_BLOCK + x) // C, (b * MIX_BLOCK + x) % C])

    return time_mix


@lru_cache(maxsize=None)
def wkv5_gn_gate_cuda(head_size: int, dtype: str, eps: float, rkvg: tuple[int, int, int, int]):
    """The wkv5 scan (``wkv5_cuda``'s recurrence, in its order), its GroupNorm (ln_x) and the gate in
    one kernel: one block per head is exactly GroupNorm's group. r, k, v, g are read from the grouped
    GEMV's output y (G, T, H, N) in the dtype at group indices ``rkvg`` (cast to fp32 for the scan:
    exact). Per step, after the scan: mean = sum(x) * (1/N); centred = x - mean;
    var = sum(centred^2) * (1/N); y = centred / sqrt(var + eps) * weight + bias (rwkv5_model's
    GroupNormKernel's arithmetic; the sums here are serial over the head's N values, staged in shared
    memory); out = to_dtype(y) * silu(g), silu(g) = g * sigmoid(g) in the dtype (op.silu's).
    Outputs (wkv, new state, out): the first two are ``wkv5_cuda``'s, so the instrumented backend
    (parity/dumpers/backends.py, kernels named wkv5*) still names att.wkv and the att_kv state."""
    N = head_size
    RI, KI, VI, GI = rkvg
    inv_n = tirx.const(1.0 / N, "float32")
    eps_c = tirx.const(eps, "float32")

    @T.prim_func(private=True)
    def wkv5_gn_gate(
        y_handle: T.handle,
        w_handle: T.handle,
        u_handle: T.handle,
        state_handle: T.handle,
        lnw_handle: T.handle,
        lnb_handle: T.handle,
        wkv_handle: T.handle,
        state_out_handle: T.handle,
        out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int64()
        H = T.int64()
        G = T.int64()
        y = T.match_buffer(y_handle, (G, seq_len, H, N), dtype)
        w = T.match_buffer(w_handle, (H, N), "float32")
        u = T.match_buffer(u_handle, (H, N), "float32")
        state = T.match_buffer(state_handle, (H, N, N), "float32")  # [head, k-index, v-index]
        lnw = T.match_buffer(lnw_handle, (H * N,), "float32")
        lnb = T.match_buffer(lnb_handle, (H * N,), "float32")
        wkv = T.match_buffer(wkv_handle, (seq_len, H, N), "float32")
        state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
        out = T.match_buffer(out_handle, (seq_len, H, N), dtype)
        for h in T.thread_binding(H, thread="blockIdx.x"):
            for j in T.thread_binding(N, thread="threadIdx.x"):
                s = T.decl_buffer((N,), "float32", scope="local")  # S[:, j] of head h
                acc = T.decl_buffer((4,), "float32", scope="local")  # wkv, v, sum, sum of squares
                r_s = T.decl_buffer((N,), "float32", scope="shared")
                k_s = T.decl_buffer((N,), "float32", scope="shared")
                x_s = T.decl_buffer((N,), "float32", scope="shared")
                c_s = T.decl_buffer((N,), "float32", scope="shared")
                for i in range(N):
                    s[i] = state[h, i, j]
                for t in range(seq_len):
                    r_s[j] = T.Cast("float32", y[RI, t, h, j])
                    k_s[j] = T.Cast("float32", y[KI, t, h, j])
                    acc[1] = T.Cast("float32", y[VI, t, h, j])
                    acc[0] = T.float32(0)
                    for i in range(N):
                        acc[0] = acc[0] + r_s[i] * (u[h, i] * k_s[i] * acc[1] + s[i])
                        s[i] = k_s[i] * acc[1] + w[h, i] * s[i]
                    wkv[t, h, j] = acc[0]
                    x_s[j] = acc[0]
                    acc[2] = T.float32(0)
                    for i in range(N):
                        acc[2] = acc[2] + x_s[i]
                    acc[0] = acc[0] - acc[2] * inv_n
                    c_s[j] = acc[0]
                    acc[3] = T.float32(0)
                    for i in range(N):
                        acc[3] = acc[3] + c_s[i] * c_s[i]
                    out[t, h, j] = T.Cast(dtype, acc[0] / T.sqrt(acc[3] * inv_n + eps_c) * lnw[h * N + j]
                                          + lnb[h * N + j]) * (y[GI, t, h, j] * T.sigmoid(y[GI, t, h, j]))
                for i in range(N):
                    state_out[h, i, j] = s[i]

    return wkv5_gn_gate


WKV_SPLIT = 8  # decode's scan: threads a value index j (each sums N / WKV_SPLIT key indices)
WKV_WARP = 32  # the decode scan needs a multiple of this head size (GroupNorm's sums are warp shuffles)


@lru_cache(maxsize=None)
def wkv5_gn_gate_decode_cuda(head_size: int, dtype: str, eps: float, rkvg: tuple[int, int, int, int], heads: int,
                             groups: int, split: int = WKV_SPLIT):
    """``wkv5_gn_gate_cuda`` for one token (the decode step, every shape static), with more threads:
    one block per head of N x ``split`` threads, thread (j, q) owning S[i, j] for the q-th run of
    N / split key indices i. Each thread updates its part of the state (read once, written once,
    S' = k v + w S) and sums its part of wkv[j] = sum_i r_i (u_i k_i v_j + S_ij); the ``split``
    partial sums are added in q order through shared memory. GroupNorm's two sums over the head's
    N values are warp shuffles (halving) then the warps' totals in order: another fp32 summation
    order than the serial kernel's. Same outputs (wkv, new state, out) and name (wkv5)."""
    N, Q, H, G = head_size, split, heads, groups
    assert N % WKV_WARP == 0 and N % Q == 0, (N, Q)
    NI = N // Q  # key indices a thread sums
    W = N // 32  # warps a row of N values spans
    RI, KI, VI, GI = rkvg
    inv_n = tirx.const(1.0 / N, "float32")
    eps_c = tirx.const(eps, "float32")
    full = tirx.const(0xFFFFFFFF, "uint32")

    @T.prim_func(private=True)
    def wkv5_gn_gate(
        y_handle: T.handle,
        w_handle: T.handle,
        u_handle: T.handle,
        state_handle: T.handle,
        lnw_handle: T.handle,
        lnb_handle: T.handle,
        wkv_handle: T.handle,
        state_out_handle: T.handle,
        out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        y = T.match_buffer(y_handle, (G, 1, H, N), dtype)
        w = T.match_buffer(w_handle, (H, N), "float32")
        u = T.match_buffer(u_handle, (H, N), "float32")
        state = T.match_buffer(state_handle, (H, N, N), "float32")  # [head, k-index, v-index]
        lnw = T.match_buffer(lnw_handle, (H * N,), "float32")
        lnb = T.match_buffer(lnb_handle, (H * N,), "float32")
        wkv = T.match_buffer(wkv_handle, (1, H, N), "float32")
        state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
        out = T.match_buffer(out_handle, (1, H, N), dtype)
        for h in T.thread_binding(H, thread="blockIdx.x"):
            for q in T.thread_binding(Q, thread="threadIdx.y"):
                for j in T.thread_binding(N, thread="threadIdx.x"):
                    acc = T.decl_buffer((4,), "float32", scope="local")  # wkv, v, sum, sum of squares
                    r_s = T.decl_buffer((N,), "float32", scope="shared")
                    k_s = T.decl_buffer((N,), "float32", scope="shared")
                    part = T.decl_buffer((Q * N,), "float32", scope="shared")
                    red = T.decl_buffer((2 * Q * W,), "float32", scope="shared")
                    if q == 0:
                        r_s[j] = T.Cast("float32", y[RI, 0, h, j])
                        k_s[j] = T.Cast("float32", y[KI, 0, h, j])
                    T.tvm_storage_sync("shared")
                    acc[1] = T.Cast("float32", y[VI, 0, h, j])
                    acc[0] = T.float32(0)
                    for ii in T.unroll(NI):
                        acc[0] = acc[0] + r_s[q * NI + ii] * (u[h, q * NI + ii] * k_s[q * NI + ii] * acc[1]
                                                             + state[h, q * NI + ii, j])
                        state_out[h, q * NI + ii, j] = (k_s[q * NI + ii] * acc[1]
                                                        + w[h, q * NI + ii] * state[h, q * NI + ii, j])
                    part[q * N + j] = acc[0]
                    T.tvm_storage_sync("shared")
                    acc[0] = part[j]
                    for p in T.unroll(Q - 1):
                        acc[0] = acc[0] + part[(p + 1) * N + j]
                    # GroupNorm: the mean, then the centred sum of squares, over the head's N values
                    acc[2] = acc[0]
                    for o in T.unroll(5):
                        acc[2] = acc[2] + T.tvm_warp_shuffle_down(full, acc[2], 16 >> o, 32, 32)
                    if j % 32 == 0:
                        red[q * W + j // 32] = acc[2]
                    T.tvm_storage_sync("shared")
                    acc[2] = red[q * W]
                    for p in T.unroll(W - 1):
                        acc[2] = acc[2] + red[q * W + p + 1]
                    acc[1] = acc[0] - acc[2] * inv_n  # centred (v is no longer needed)
                    acc[3] = acc[1] * acc[1]
                    for o in T.unroll(5):
                        acc[3] = acc[3] + T.tvm_warp_shuffle_down(full, acc[3], 16 >> o, 32, 32)
                    if j % 32 == 0:
                        red[Q * W + q * W + j // 32] = acc[3]
                    T.tvm_storage_sync("shared")
                    acc[3] = red[Q * W + q * W]
                    for p in T.unroll(W - 1):
                        acc[3] = acc[3] + red[Q * W + q * W + p + 1]
                    if q == 0:
                        wkv[0, h, j] = acc[0]
                        out[0, h, j] = T.Cast(dtype, acc[1] / T.sqrt(acc[3] * inv_n + eps_c) * lnw[h * N + j]
                                              + lnb[h * N + j]) * (y[GI, 0, h, j] * T.sigmoid(y[GI, 0, h, j]))

    return wkv5_gn_gate
