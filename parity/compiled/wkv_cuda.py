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
