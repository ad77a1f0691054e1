"""The CPU (llvm) schedule: matmuls tiled, vectorised and parallel; everything else as lowered.

Every Linear of the model is an ``NT_matmul`` after FuseTransposeMatmul: out[t, n] = sum_k
x[t, k] * W[n, k], with both operands contiguous along k. Unscheduled, LLVM compiles it as one
serial scalar loop nest (a 0.4B prefill took 32x torch's time). Here each one gets a register-
blocked dot-product schedule:

- k is split into 16-float lanes and ``rfactor``-ed, so the inner loop is a vector FMA over
  contiguous loads of both x and W (one AVX-512 register; two AVX2 ones), lanes summed at the end;
- a TT x NT tile of (token, output) pairs is accumulated in registers (local scope), so each
  loaded vector of W serves TT tokens and each vector of x serves NT outputs;
- the (output tile, token tile) loop is fused and ``parallel``: rows split across the cores.

A decode step (T = 1) gets TT = 1 (a GEMV, bound by memory bandwidth: a wider token tile would
only waste its tail). Epilogues fused into a matmul (bias-free adds, activations, the gate) stay
as lowered: they are elementwise over (T, N), a small fraction of the work. The wkv scans carry
their own parallel loops (wkv5_kernel.py) and are marked scheduled, so this pass skips them.

Note the summation order of a scheduled matmul differs from the plain loop's (16 partial sums,
then their sum): fp32 results change in the last bits, well inside every tolerance.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

LANES = 16  # floats per vector accumulator: one AVX-512 register
TOKEN_TILE = 4  # tokens per register tile in a prefill
OUT_TILE = 4  # outputs per register tile (TOKEN_TILE x OUT_TILE x LANES accumulators: 16 zmm)
GEMV_OUT_TILE = 8


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
    k_extent = sch.get(k).extent
    if not isinstance(k_extent, tvm.tirx.IntImm) or k_extent.value % LANES:
        return None
    t_extent = sch.get(t).extent
    decode = isinstance(t_extent, tvm.tirx.IntImm) and t_extent.value == 1
    tt, nt = (1, GEMV_OUT_TILE) if decode else (TOKEN_TILE, OUT_TILE)
    _, ki = sch.split(k, [None, LANES])
    rf = sch.rfactor(ki, factor_axis=2)  # partial sums rf[t, n, lane]: lanes contiguous
    t, n, ko, ki = sch.get_loops(rf)
    to, ti = sch.split(t, [None, tt])
    no, ni = sch.split(n, [None, nt])
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
