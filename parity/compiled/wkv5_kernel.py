"""The hand-written TIR scan kernel for the RWKV-5 wkv recurrence (docs/RWKV.md §2).

Per head h, value index j and token t (i is the key index):
    out[t, h, j] = sum_i r[t,h,i] * (u[h,i] * k[t,h,i] * v[t,h,j] + S[h,i,j])
    S[h,i,j]    <- k[t,h,i] * v[t,h,j] + w[h,i] * S[h,i,j]

The time axis is a true recurrence: step t reads the state step t-1 wrote, so t is a plain
serial loop *inside* the (h, j) loops, and the state lives in the output buffer ``state_out``
for the whole scan — the input state is copied once and never written (a kernel that updated
its input in place would make a second identical run differ). Heads and value indices are
independent, so they are the loops a schedule may parallelise; t must never be.

Every extent is symbolic (seq_len, H, N), so one kernel serves prefill of any length, decode
(seq_len = 1), and every model shape. State and accumulation are fp32 whatever the model dtype:
an fp16 accumulator costs ~1e-3 relative error (docs/RWKV.md §3).

Written without sblocks on purpose: on llvm the unscheduled loop nest is compiled as written,
and there is no ``T.init()`` whose lowering could skip rows t > 0 (docs/TVM.md).
"""

from tvm.script import tirx as T


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
    N = T.int64()
    r = T.match_buffer(r_handle, (seq_len, H, N), "float32")
    k = T.match_buffer(k_handle, (seq_len, H, N), "float32")
    v = T.match_buffer(v_handle, (seq_len, H, N), "float32")
    w = T.match_buffer(w_handle, (H, N), "float32")
    u = T.match_buffer(u_handle, (H, N), "float32")
    state = T.match_buffer(state_handle, (H, N, N), "float32")  # [head, k-index, v-index]
    out = T.match_buffer(out_handle, (seq_len, H, N), "float32")
    state_out = T.match_buffer(state_out_handle, (H, N, N), "float32")
    for h in T.parallel(H):
        for j in range(N):
            for i in range(N):
                state_out[h, i, j] = state[h, i, j]
            for t in T.serial(seq_len):
                out[t, h, j] = T.float32(0)
                for i in range(N):
                    out[t, h, j] = out[t, h, j] + r[t, h, i] * (
                        u[h, i] * k[t, h, i] * v[t, h, j] + state_out[h, i, j]
                    )
                    state_out[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * state_out[h, i, j]
