"""The CPU (llvm) schedule: matmuls tiled, vectorised and parallel; everything else as lowered.

Every Linear of the model is an ``NT_matmul`` after FuseTransposeMatmul: out[t, n] = sum_k
x[t, k] * W[n, k], with both operands contiguous along k. Unscheduled, LLVM compiles it as one
serial scalar loop nest (a 0.4B prefill took 32x torch's time). Here each one gets a register-
blocked dot-product schedule:

- k is split into LANES-float lanes and ``rfactor``-ed, so the inner loop is a vector multiply
  and add over contiguous loads of both x and W, the lanes summed once at the end;
- a TOKEN_TILE x OUT_TILE tile of (token, output) pairs is accumulated in registers (local
  scope), so each loaded vector of W serves TOKEN_TILE tokens and each vector of x OUT_TILE
  outputs;
- the (output tile, token tile) loop is fused and ``parallel``, output tiles outermost: each
  core streams its own rows of W from memory once, and re-reads a tile's rows from cache for
  every token tile.

What the sizes are fitted to: the target has no FMA (build.py turns it off so the plain and
debug builds agree bit for bit), and in LLVM AVX-512 requires FMA, so ``-fma`` leaves AVX2:
8-float vectors and 16 vector registers. A 2 x 4 tile holds 8 accumulators, 4 W vectors and
2 x vectors (16-float lanes and 4 x 4 tiles, the previous sizes, needed 32 registers for the
accumulators alone, and LLVM kept them on the stack: the whole 0.4B prefill took 2.3x as long,
one thread). Tile sizes swept on the 1024 x 1024 matmul of a 64-token prefill, one thread: 2 x 4
ran 86-89 GFLOP/s, 1 x 8 80, 4 x 2 74-76, 3 x 4 57; 2 x 4 also ran 83-90 on the 0.4B shape's
1024 x 3584, 3584 x 1024 and 65536 x 1024. Each of its steps is 8 vector multiplies and 8
adds, at best 4 cycles on Zen 5's two multiply and two add pipes (32 flops a cycle); 88 GFLOP/s
is that peak at 2.75 GHz, about this machine's clock (its TSC: 2.6 GHz), so only wider vectors
(AVX-512, hence FMA) would go much faster: 115-122 GFLOP/s with them, measured, not used.

The token axis of a prefill is symbolic, so a token tile of 2 would need a bounds test inside
the inner loop; ``pad_einsum`` instead pads the token rows to a multiple of the tile (one copy of
x in, one of the output back: O(T * (K + N)) next to the matmul's O(T * K * N)). A decode step
(T = 1) gets TOKEN_TILE = 1 (a GEMV, bound by memory bandwidth) and 16 rows of W at a time, the
lane loop unrolled twice: decode of the 0.4B shape, one thread, CPU time, against 4 rows and no
unroll, 71.7 vs 74.8 ms a token (the 16-lane, 8-row GEMV this replaced: 71.4).

Epilogues fused into a matmul (adds, activations, the gate) stay as lowered: they are elementwise
over (T, N), a small fraction of the work. The wkv scans carry their own parallel loops
(wkv5_kernel.py) and are marked scheduled, so this pass skips them.

The summation order: each output is LANES partial sums, each accumulated over k in order, then
summed lane 0 to LANES - 1. It depends only on LANES, not on the tiles or on T, so a prefill and
a decode step, and a plain and a debug build, add every product in the same order; it differs
from the plain loop's (fp32 results change in the last bits, well inside every tolerance).
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

LANES = 8  # floats per vector accumulator: one AVX2 register (no AVX-512 without FMA, above)
TOKEN_TILE = 2  # tokens per register tile in a prefill
OUT_TILE = 4  # outputs per register tile: TOKEN_TILE x OUT_TILE accumulators + OUT_TILE + TOKEN_TILE loads
GEMV_OUT_TILE = 16  # a decode step: one token, 16 rows of W streamed side by side
GEMV_K_UNROLL = 2  # and two lane steps per loop trip


def schedule_matmul(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
    """The scheduled function, or None when ``func`` has no NT_matmul block of the expected form."""
    sch = Schedule(tvm.IRModule({"main": func}))
    try:
        block = sch.get_sblock("NT_matmul")
    except Exception:  # noqa: BLE001 - no such block: not a matmul
        return None
    loops = sch.get_loops(block)
    if len(loops) != 3:
        return None
    t, n, k = loops
    k_extent, n_extent, t_extent = (sch.get(loop).extent for loop in (k, n, t))
    if not isinstance(k_extent, tvm.tirx.IntImm) or k_extent.value % LANES:
        return None
    decode = isinstance(t_extent, tvm.tirx.IntImm) and t_extent.value == 1
    tt, nt = (1, GEMV_OUT_TILE) if decode else (TOKEN_TILE, OUT_TILE)
    # The widest tile (halving) that divides the outputs: every Linear of the released shapes
    # takes the full tile; a test shape may not, and a partial tile would need a bound test.
    while nt > 1 and not (isinstance(n_extent, tvm.tirx.IntImm) and n_extent.value % nt == 0):
        nt //= 2
    k_unroll = GEMV_K_UNROLL if decode and (k_extent.value // LANES) % GEMV_K_UNROLL == 0 else 1
    if tt > 1 and not (isinstance(t_extent, tvm.tirx.IntImm) and t_extent.value % tt == 0):
        padded = sch.copy()
        try:
            padded.pad_einsum(padded.get_sblock("NT_matmul"), [tt, 1, 1])
            sch = padded
        except Exception:  # noqa: BLE001 - not an einsum pad_einsum handles: untiled tokens, no bound test
            tt = 1
        block = sch.get_sblock("NT_matmul")
        t, n, k = sch.get_loops(block)
    _, ki = sch.split(k, [None, LANES])
    rf = sch.rfactor(ki, factor_axis=2)  # partial sums rf[t, n, lane]: lanes contiguous
    t, n, ko, ki = sch.get_loops(rf)
    to, ti = sch.split(t, [None, tt])
    no, ni = sch.split(n, [None, nt])
    if k_unroll > 1:  # (unrolling ko keeps every lane's order: it only cuts loop overhead)
        ko, ku = sch.split(ko, [None, k_unroll])
        sch.reorder(no, to, ko, ku, ti, ni, ki)
        sch.unroll(ku)
    else:
        sch.reorder(no, to, ko, ti, ni, ki)
    tile = sch.fuse(no, to)
    sch.parallel(tile)
    sch.vectorize(ki)
    sch.unroll(ti)
    sch.unroll(ni)
    acc = sch.cache_write(rf, 0, "local")  # the tile's accumulators: registers
    sch.reverse_compute_at(acc, tile)
    sch.decompose_reduction(rf, ko)
    sch.reverse_compute_at(sch.get_sblock("NT_matmul"), tile)  # the lane sum, tile by tile
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="ScheduleCPUMatmuls")
def schedule_cpu_matmuls(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Schedule every unscheduled NT_matmul PrimFunc of ``mod`` (after FuseTIR, before lowering)."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs and func.attrs.get("tirx.is_scheduled"):
            continue
        scheduled = schedule_matmul(func)
        if scheduled is not None:
            updates[gv] = scheduled
    for gv, func in updates.items():
        mod[gv] = func
    return mod
