"""CUDA GEMV schedules for the decode step: DLight's GEMV rule with other tile sizes.

A decode step (one token) is a chain of GEMVs, each reading its whole weight once: its speed is the
weight bytes / the bandwidth the kernel reaches. DLight's GEMV rule (tvm.s_tir.dlight.gpu.GEMV)
fixes, for CUDA, 16 rows per block x 32 threads over the reduction, 4 elements per thread and
4-byte loads of the weight: for fp16 that is 2 halves per load, and at C=2048 only 128 blocks of
512 threads (the H200 has 132 SMs). ``wide_gemv_rule`` gives that rule's inner-reduction schedule with the
four numbers as a config (GEMV_CONFIGS), so a build can ask for 16-byte loads (8 halves, 4 floats)
and more, smaller blocks. The outer-reduction and fallback schedules are DLight's own (inherited).

The schedule below is DLight's ``GEMV.sch_inner_reduction`` as in apache-tvm 0.27 (Apache License
2.0, the Apache Software Foundation), copied because its tile sizes are local constants; the
only change is the marked config block. The build picks a config with $PARITY_CUDA_GEMV
(build.py: part of the cache key when not the default).
"""

# ruff: noqa: E741, N806
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, reduce


@dataclass(frozen=True)
class GemvConfig:
    ts: int  # rows per block (threadIdx.y)
    tr: int  # threads over the reduction (threadIdx.x)
    vec_c: int  # elements each thread reduces per step, vectorised
    vec_load: int  # bytes per load of the weight (4: DLight's; 16: one 128-bit load)


# "dlight" is DLight's own rule (not this schedule): the default, the build the GPU runs proved.
# vec_c stays 4: TVM 0.27's CUDA codegen cannot initialise an 8-wide float accumulator
# (make_ulonglong4 with 8 arguments, an nvcc error); a 16-byte load of 8 halves then feeds two
# 4-wide steps.
DEFAULT_GEMV = "dlight"
GEMV_CONFIGS = {
    "v16": GemvConfig(ts=16, tr=32, vec_c=4, vec_load=16),  # DLight's blocks, 16-byte loads
    "v16-ts4": GemvConfig(ts=4, tr=32, vec_c=4, vec_load=16),  # and 4 rows per block: 4x the blocks
    "v16-ts2-tr64": GemvConfig(ts=2, tr=64, vec_c=4, vec_load=16),  # 2 rows x 64 threads per block
}
_SPEC = re.compile(r"ts(\d+)-tr(\d+)-c(\d+)-l(\d+)")


def gemv_config(name: str) -> GemvConfig | None:
    """The config a $PARITY_CUDA_GEMV value names: a key of GEMV_CONFIGS, or a spelled-out
    ``ts<rows>-tr<threads>-c<vec_c>-l<load bytes>`` (e.g. ts8-tr32-c4-l16), so a benchmark can try
    tile sizes without editing this file; None when it is neither."""
    if name in GEMV_CONFIGS:
        return GEMV_CONFIGS[name]
    m = _SPEC.fullmatch(name)
    if m is None:
        return None
    ts, tr, vec_c, vec_load = map(int, m.groups())
    if ts * tr > 1024 or vec_c not in (1, 2, 4) or vec_load not in (2, 4, 8, 16) or not ts or not tr:
        return None
    return GemvConfig(ts=ts, tr=tr, vec_c=vec_c, vec_load=vec_load)


def wide_gemv_rule(config: GemvConfig):
    """DLight's GEMV rule with the CUDA tile sizes of ``config``. TVM's compiler is imported here,
    not at module level: build.py reads GEMV_CONFIGS on the GPU machine, whose runtime-only TVM
    has no schedule functions to import."""
    global s_tir, tirx, get_max_shared_memory_per_block, is_broadcast_epilogue, get_bytes, get_extent
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_max_shared_memory_per_block, is_broadcast_epilogue
    from tvm.s_tir.dlight.base import get_bytes, get_extent
    from tvm.s_tir.dlight.gpu import GEMV

    class WideGEMV(GEMV):
        sch_inner_reduction = _sch_inner_reduction

        def __init__(self):
            super().__init__()
            self.config = config

    return WideGEMV()


def _sch_inner_reduction(  # pylint: disable=too-many-arguments, invalid-name, unused-argument
    self,
    sch: s_tir.Schedule,
    target: Target,
    block: s_tir.schedule.SBlockRV,
    vector_input_buffers: list[tirx.Buffer],
    epilogue_info: SBlockInfo | None,
):
    """Schedule the inner reduction block."""

    def get_max_factor(n, factors):
        factors = sorted(factors, reverse=True)
        for factor in factors:
            if n % factor == 0:
                return factor
        return 1

    def apply(
        sch: s_tir.Schedule,
        gemv,
        TAG_S,
        TAG_R,
        TS,
        TR,
        TILE_S,
        TILE_R,
        VEC_LOAD,
        VEC_C,
        LOAD_V_SHARED,
        LOAD_V_VEC,
        UNROLL,
        SUPPORT_WARP_SHUFFLE,
    ):
        # rfactor: reduce to tx * vec_c
        _, s, r, c = sch.get_loops(block=gemv)
        s = sch.fuse(_, s)
        r = sch.fuse(r, c)
        bx, ts, tile_s = sch.split(s, factors=[None, TS, TILE_S], preserve_unit_iters=True)
        r, tr, tile_r_vec_n, vec_c = sch.split(
            r, factors=[None, TR, TILE_R // VEC_C, VEC_C], preserve_unit_iters=True
        )
        sch.reorder(r, tile_r_vec_n, tr, vec_c)
        tr_vec_c = sch.fuse(tr, vec_c)
        rf = sch.rfactor(tr_vec_c, 0)

        # rfactor: reduce to tx
        bx, ts, tile_s, tr_vec_c = sch.get_loops(block=gemv)
        tr, vec_c = sch.split(tr_vec_c, factors=[TR, None], preserve_unit_iters=True)
        rf2 = sch.rfactor(tr, 0)

        # bind, vectorize compute
        bx, ts, tile_s, r, tile_r_vec_n, tr_vec_c = sch.get_loops(block=rf)
        tr, vec_c = sch.split(tr_vec_c, factors=[TR, None], preserve_unit_iters=True)
        sch.reorder(bx, ts, tr, r, tile_s, tile_r_vec_n, vec_c)
        sch.bind(bx, "blockIdx.x")
        sch.bind(ts, TAG_S)
        sch.bind(tr, TAG_R)
        sch.vectorize(vec_c)

        shared_mem_usage = 0
        for buf in vector_input_buffers:
            dtype_bytes = get_bytes(buf.dtype)
            buf_size = (
                reduce(lambda x, y: x * y, buf.shape, tirx.IntImm(buf.shape[0].ty, 1))
                * dtype_bytes
            )
            shared_mem_usage += buf_size
            if not SUPPORT_WARP_SHUFFLE:
                # When warp shuffle is not able, cross-thread allreduce
                # is implemented with shared memory.
                shared_mem_usage += TS * TR * dtype_bytes

        max_smem = get_max_shared_memory_per_block(target)
        LOAD_V_SHARED = (
            LOAD_V_SHARED
            and isinstance(shared_mem_usage, tirx.IntImm)
            and shared_mem_usage.value <= max_smem
        )

        Aq_local = sch.cache_read(rf, read_buffer_index=1, storage_scope="local")
        num_cache_loops = len(sch.get_loops(block=Aq_local))
        sch.compute_at(Aq_local, r, preserve_unit_loops=True)
        cache_loops = sch.get_loops(block=Aq_local)[-num_cache_loops:]
        if len(cache_loops) == 1:
            fused_load = cache_loops[0]
        else:
            fused_load = sch.fuse(*cache_loops[-2:])
        # (changed: at most what divides the loaded run of TILE_R elements, so a 16-byte load on a
        # short reduction, e.g. C=144, is not padded with predicates)
        aq_vec_len = get_max_factor(TILE_R, [v for v in (1, 2, 4, 8, 16)
                                             if v <= max(1, VEC_LOAD // get_bytes(sch.get(Aq_local).reads[0].source.dtype))])
        fused_load, vec_load = sch.split(
            fused_load, factors=[None, aq_vec_len], preserve_unit_iters=True
        )
        sch.vectorize(vec_load)

        # load vector into shared memory, shape should be the whole vector
        if LOAD_V_SHARED:
            if len(vector_input_buffers) != 1:
                return None
            V_shared = sch.cache_read(rf, read_buffer_index=0, storage_scope="shared")
            sch.compute_at(V_shared, tr, preserve_unit_loops=True)
            l = sch.get_loops(block=V_shared)[-1]
            loop: tirx.For = sch.get(l)
            if isinstance(loop.extent, tirx.IntImm):
                # avoid introducing predicates when vector length is too large
                vec_length = max(
                    min(
                        get_max_factor(
                            (int)(loop.extent),
                            [TS * TR * 1, TS * TR * 2, TS * TR * 4, TS * TR * 8],
                        )
                        // TS
                        // TR,
                        LOAD_V_VEC,
                    ),
                    1,
                )
            else:
                vec_length = LOAD_V_VEC
            if TAG_R == "threadIdx.x":
                _, ty, tx, vec = sch.split(
                    l, factors=[None, TS, TR, vec_length], preserve_unit_iters=True
                )
            else:
                _, ty, tx, vec = sch.split(
                    l, factors=[None, TR, TS, vec_length], preserve_unit_iters=True
                )
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)

        # reduce tile_s * tr * vec to tile_s * tr
        sch.reverse_compute_at(rf2, loop=bx, preserve_unit_loops=True)
        tr, vec_c, *ts_tile_s = sch.get_loops(block=rf2)[1:]
        ts_tile_s = sch.fuse(*ts_tile_s)
        ts_o, ts_i, tile_s = sch.split(
            ts_tile_s, factors=[None, TS, TILE_S], preserve_unit_iters=True
        )
        tile_s, vec_s = sch.split(
            tile_s,
            factors=[None, get_max_factor(TILE_S, [1, 2, 4, 8])],
            preserve_unit_iters=True,
        )
        assert sch.get(ts_o).extent.value == 1
        ts = sch.fuse(ts_o, ts_i)
        sch.reorder(ts, tr, tile_s, vec_s, vec_c)
        sch.bind(ts, TAG_S)
        sch.bind(tr, TAG_R)
        sch.vectorize(vec_s)

        # reduce tile_s * tr to tile_s
        sch.reverse_compute_at(gemv, loop=bx, preserve_unit_loops=True)
        tr, *ts_tile_s = sch.get_loops(block=gemv)[1:]
        ts_tile_s = sch.fuse(*ts_tile_s)
        ts_o, ts_i, tile_s = sch.split(
            ts_tile_s, factors=[None, TS, TILE_S], preserve_unit_iters=True
        )
        assert sch.get(ts_o).extent.value == 1
        ts = sch.fuse(ts_o, ts_i)
        sch.reorder(tile_s, ts, tr)
        sch.bind(ts, TAG_S)
        sch.bind(tr, TAG_R)

        sch.decompose_reduction(rf, loop=sch.get_loops(block=rf)[3])
        sch.decompose_reduction(rf2, loop=sch.get_loops(block=rf2)[-1])

        sch.set_scope(rf, buffer_index=0, storage_scope="local")
        sch.set_scope(rf2, buffer_index=0, storage_scope="local")

        unroll_factor = UNROLL

        sch.annotate(
            block_or_loop=sch.get_loops(rf)[3],
            ann_key="pragma_auto_unroll_max_step",
            ann_val=unroll_factor,
        )
        sch.annotate(
            block_or_loop=sch.get_loops(rf)[3], ann_key="pragma_unroll_explicit", ann_val=1
        )

        sch.annotate(
            block_or_loop=sch.get_loops(rf2)[3],
            ann_key="pragma_auto_unroll_max_step",
            ann_val=unroll_factor,
        )
        sch.annotate(
            block_or_loop=sch.get_loops(rf2)[3], ann_key="pragma_unroll_explicit", ann_val=1
        )

        if LOAD_V_SHARED:
            sch.annotate(
                block_or_loop=sch.get_loops(V_shared)[-4],
                ann_key="pragma_unroll_explicit",
                ann_val=unroll_factor,
            )
            sch.annotate(
                block_or_loop=sch.get_loops(V_shared)[-4], ann_key="pragma_vectorize", ann_val=1
            )

        # Schedule epilogue
        if epilogue_info is not None:
            epilogue = epilogue_info.block_rv
            if is_broadcast_epilogue(sch, block, epilogue):
                sch.reverse_compute_at(epilogue, bx)
                sch.set_scope(block, 0, "shared")
                _, _, *s = sch.get_loops(epilogue)  # pylint: disable=invalid-name
                _, tx = sch.split(sch.fuse(*s), factors=[None, TR])
                sch.bind(tx, "threadIdx.x")
            else:
                sch.reverse_compute_at(epilogue, bx, preserve_unit_loops=True)
                ts_tile_s = sch.fuse(*sch.get_loops(epilogue)[1:])
                ts_tile_s = sch.get_loops(epilogue)[-1]
                ts_o, ts_i, tile_s = sch.split(
                    ts_tile_s, factors=[None, TS, TILE_S], preserve_unit_iters=True
                )
                assert sch.get(ts_o).extent.value == 1
                ts = sch.fuse(ts_o, ts_i)
                sch.bind(ts, TAG_S)
                sch.set_scope(block, 0, "local")
        # pylint: enable=invalid-name
        return sch

    # Specify the `len_tx` and `len_ty` according to the loop extent
    batch, s, r, c = sch.get_loops(block=block)
    len_batch, len_s, len_r, len_c = (
        get_extent(sch, batch),
        get_extent(sch, s),
        get_extent(sch, r),
        get_extent(sch, c),
    )
    len_S = len_batch * len_s
    len_R = len_r * len_c

    # The only change from DLight's rule: the CUDA tile sizes come from this rule's config
    # (DLight: TS 16, TR 32, VEC_C 4, 4-byte loads of the weight).
    TAG_S, TAG_R = "threadIdx.y", "threadIdx.x"
    SUPPORT_WARP_SHUFFLE = True
    LOAD_V_SHARED = True
    LOAD_V_VEC = 8
    UNROLL = 256
    TS, TR = self.config.ts, self.config.tr
    VEC_C = self.config.vec_c
    VEC_LOAD = self.config.vec_load

    while TS * TR > int(target.attrs["max_num_threads"]):
        if TS > 1:
            TS //= 2
        else:
            TR //= 2

    TILE_S, TILE_R = (
        1,
        (
            len_c
            if len_c > 1
            else max(get_max_factor(len_r, [TR * 1, TR * 2, TR * 4, TR * 8]) // TR, 1)
        ),
    )
    VEC_C = min(get_max_factor(TILE_R, [1, 2, 4, 8]), VEC_C)

    return apply(
        sch,
        gemv=block,
        TAG_S=TAG_S,
        TAG_R=TAG_R,
        TS=TS,
        TR=TR,
        TILE_S=TILE_S,
        TILE_R=TILE_R,
        VEC_LOAD=VEC_LOAD,
        VEC_C=VEC_C,
        LOAD_V_SHARED=LOAD_V_SHARED,
        LOAD_V_VEC=LOAD_V_VEC,
        UNROLL=UNROLL,
        SUPPORT_WARP_SHUFFLE=SUPPORT_WARP_SHUFFLE,
    )


# -- the decode step's own GEMV (issue 10) ---------------------------------------------------------
# DLight's GEMV rule (above) reaches ~3.0-3.3 TB/s on the H200 at C=2048 (its 4-byte loads, one
# block of 16 rows per 512 threads). The decode step (T = 1, every shape static) uses these kernels
# instead: one warp a row, each lane reducing 16-byte loads of the weight and of the input (8
# halves or 4 floats) into one fp32 accumulator, the warp's 32 partial sums added by shuffles, and
# the elementwise tail that followed the matmul (cast, residual add, relu^2, sigmoid, r*v + x) done
# by lane 0 in the same kernel. ``mix``: the input is the time-mix lerp xx*mu + sx*(1-mu) (sx the
# carried last token, cast to the dtype: the token shift at T = 1), made by each warp from xx, the
# state and mu as it loads them (common.time_mix's arithmetic, in its order), with xx's fp32 copy
# (the new state) written by the first blocks: the lerps' own kernel is gone. Prefill (T symbolic)
# keeps DLight's schedules.

DECODE_WARPS = 16  # warps a block of the decode GEMV (a row takes one, or a few where it is long)
DECODE_UNROLL = 8  # 16-byte loads of the weight a lane issues before it adds them (at most; a divisor of its count)
DECODE_WARPS_BY = {"rmul_residual": 4}  # warps a block for one kind of decode GEMV ("ln", "mix", or a plain one's epilogue), else DECODE_WARPS
DECODE_MIN_BLOCKS_BY = {}  # "ln": blocks an SM must hold at once (__launch_bounds__'s second number: caps registers)
DECODE_ROWS_PER_WARP = 4  # rows each warp of an "ln" kernel takes in turn: the block's LayerNorm + lerp once for them all
DECODE_GRID_BY = {"ln": 132}  # "ln1" / "ln2" / "ln": a persistent kernel of this many blocks (the H200's 132 SMs), each
# normalising the row once and walking its even share of the rows, warps in turn (one warp a row only: fp16 at C 2048;
# else as without). DECODE_ROWS_PER_WARP is then moot.
DECODE_GRID_AHEAD = ("ln2",)  # persistent kinds whose warps fetch their next row's weight before adding up the held one
# (K6, H200, 1.5B fp16: ln2 13.65 -> 12.97 us persistent, 12.82 us ahead; ln1 11.02 -> 10.41 us, 11.04 us ahead;
# benchmarks/results/gpu-2026-12-01-k6)
# On together (the lead's call of 12:33, K6's staged c2): 1.5B fp16 1.247 -> 1.218 ms a step in one CUDA graph
# (49.4 % of the roofline), logits and state bit for bit (1.5B + every fixture, fp32/fp16); GPU tests 7 passed.
# (DECODE_WARPS_BY and DECODE_MIN_BLOCKS_BY also take "ln1" (ln1 + r/k/v/g) or "ln2" (ln2 + FFN key + receptance),
# before "ln". K5 measured ln2 at 8 warps a block: slower, benchmarks/results/gpu-2026-12-02-k5.)
DECODE_HOIST = {"rmul_residual": ("float16",)}  # plain kind -> dtypes whose tail operands (e0[, e1]) the row's first
# warp loads into registers before its dot product, not after the warps' sums meet (shared memory + a barrier): same
# values, same arithmetic. (K7, H200, 1.5B fp16, one CUDA graph: FFN value 9.33 -> 8.51 us, the step 1.218 -> 1.199 ms,
# bit for bit; the attention output (one warp a row, no barrier) did not move, 4.28 -> 4.34 us; fp32 bit for bit on
# every fixture but not timed; benchmarks/results/gpu-2026-12-01-k7)
EPILOGUES = ("cast", "residual", "relu2", "sigmoid", "rmul_residual", "rmul_residual_half", "logits")
_EXTRA = {"residual": 1, "rmul_residual": 2, "rmul_residual_half": 2}


class _Fold:
    active = None  # inside fold_halving(): its result, whose .done says whether a GEMV took the halving


class _FoldResult:
    done = False


@contextmanager
def fold_halving():
    """The fp16 rescale's halving of the residual stream (common.RESCALE_LAYER), folded into the
    layer's last kernel: inside this context the first "rmul_residual" decode GEMV built (the FFN
    value: x + r * v, the block's output) computes (x + r * v) * 0.5 -- the same fp16 rounding of
    x + r * v, then the same exact halving -- instead of the stream's own elementwise kernel (a
    launch). Yields the state: ``.done`` says whether it was taken (else the caller halves)."""
    prev, _Fold.active = _Fold.active, _FoldResult()
    try:
        yield _Fold.active
    finally:
        _Fold.active = prev


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def decode_gemv_fits(k: int, dtype: str) -> bool:
    """Whether a reduction of length ``k`` in ``dtype`` can take the decode GEMV: whole 16-byte loads
    (a lane's last ones may be left out: their guard is static, and absent where ``k`` is a multiple
    of 32 loads). fp16 and fp32 (bf16 keeps DLight's schedule: not run on a GPU here)."""
    return dtype in ("float32", "float16") and k % (16 // _dtype_bytes(dtype)) == 0


def decode_gemv_cuda(k: int, dtype: str, parts: tuple, *, mix: bool = False, x_shape: tuple = (),
                     ln_eps: float | None = None):
    """One kernel of the decode step: for each part (groups, rows, epilogue) in ``parts`` (one, or
    two: the FFN's key and receptance side by side, each its own weight and output),
    y[g, n] = tail(sum_k x[g, k] * w[g, n, k]), accumulated in fp32 and rounded once to the dtype
    (as ``Linear``). Tails:
        cast           y = to_dtype(acc)                                   (groups, 1, rows)
        residual       y = e0 + to_dtype(acc)            (x + att.out)       (1, rows)
        relu2          y = relu(to_dtype(acc))^2         (ffn key)           (1, rows)
        sigmoid        y = sigmoid(to_dtype(acc))        (ffn receptance)    (1, rows)
        rmul_residual  y = e0 + e1 * to_dtype(acc)       (x + r * ffn value) (1, rows)
        rmul_residual_half  (e0 + e1 * to_dtype(acc)) * 0.5  (the same, halved: fold_halving)
        logits         y = fp32(to_dtype(acc))           (the head)          (1, rows) fp32
    Arguments, in order: x (``x_shape``), w, e0[, e1] -- or with ``mix``: xx (1, K), the carried
    last token (K,) fp32, then per part its mu ((groups, 1, 1, K)) and w ((groups, rows, K), or (rows, K)
    for one group) -- then the outputs: each part's y, and with ``mix`` xx's fp32 copy (1, K).
    ``ln_eps`` (with ``mix``): xx is the LayerNorm of the first argument x (1, K), whose weight and
    bias (K,) follow it: every block normalises the row itself (topi's layer_norm in fp32: mean =
    sum / K, var = sum((x - mean)^2) / K, (x - mean) * rsqrt(var + eps) * weight + bias, rounded to
    the dtype; its sums in another order), so the LayerNorm's own kernel is gone too."""
    parts = tuple((int(g), int(r), e) for g, r, e in parts)
    kind = ("ln" if ln_eps is not None else "mix") if mix else parts[0][2]
    if kind == "rmul_residual" and _Fold.active is not None and not _Fold.active.done:  # (fold_halving)
        _Fold.active.done = True
        parts = ((parts[0][0], parts[0][1], "rmul_residual_half"),)
    sub = f"ln{len(parts)}" if kind == "ln" else kind  # "ln1" / "ln2": one "ln" kernel

    def by(table, default):
        return table.get(sub, table.get(kind, default))

    warps = by(DECODE_WARPS_BY, DECODE_WARPS)
    rpw = 1
    if kind == "ln" and DECODE_ROWS_PER_WARP > 1:  # only where every part's rows fill whole blocks
        s = _row_split(int(k), dtype, warps, DECODE_UNROLL)
        if all(r % (warps // s * DECODE_ROWS_PER_WARP) == 0 for _, r, _ in parts):
            rpw = DECODE_ROWS_PER_WARP
    args = (int(k), dtype, parts, bool(mix), tuple(int(d) for d in x_shape), warps, DECODE_UNROLL,
            None if ln_eps is None else float(ln_eps))
    mb = int(by(DECODE_MIN_BLOCKS_BY, 0)) if kind == "ln" else 0
    grid = _persistent_grid(int(k), dtype, parts, warps, int(by(DECODE_GRID_BY, 0))) if kind == "ln" else 0
    if grid:
        return _decode_gemv(*args, 1, mb, grid, sub in DECODE_GRID_AHEAD or kind in DECODE_GRID_AHEAD)
    if _EXTRA.get(parts[0][2], 0) and dtype in by(DECODE_HOIST, ()):  # (a plain GEMV with a residual tail)
        return _decode_gemv(*args, rpw, mb, 0, False, True)
    return _decode_gemv(*args) if rpw == 1 and not mb else _decode_gemv(*args, rpw, mb)


def _persistent_grid(k: int, dtype: str, parts: tuple, warps: int, grid: int) -> int:
    """Blocks of a persistent "ln" kernel (DECODE_GRID_BY), or 0 where it does not apply: one warp a
    row, at most as many blocks as leave every warp a row, and a block's rows within two lerps
    (no more rows a block than the shortest group or part)."""
    if grid <= 0 or _row_split(k, dtype, warps, DECODE_UNROLL) != 1:
        return 0
    n = sum(g * r for g, r, _ in parts)
    grid = min(grid, n // warps)
    if grid < 1 or -(-n // grid) > min(r for _, r, _ in parts):
        return 0
    return grid


def _row_split(k: int, dtype: str, warps: int, unroll: int) -> int:
    """Warps a row: the fewest that leave each warp at most ``unroll`` 16-byte loads."""
    chunks = -(-k // (32 * (16 // _dtype_bytes(dtype))))
    splits = [n for n in (1, 2, 4, 8, 16, 32) if n <= warps and warps % n == 0 and chunks % n == 0]
    return next((n for n in splits if chunks // n <= unroll), splits[-1])


@lru_cache(maxsize=None)
def _decode_gemv(k, dtype, parts, mix, x_shape, warps, unroll, ln_eps=None, rpw=1, min_blocks=0, grid=0, ahead=False,
                 hoist=False):
    from tvm import tirx
    from tvm.script import tirx as T

    assert decode_gemv_fits(k, dtype), (k, dtype)
    assert all(e in EPILOGUES for _, _, e in parts), parts
    K, dt = k, dtype
    vec = 16 // _dtype_bytes(dt)  # elements per 16-byte load
    step = 32 * vec  # elements a warp reduces per load
    chunks = -(-K // step)  # loads a row takes per lane
    # Warps a row (a split of the reduction, summed in order through shared memory): the fewest
    # that leave each warp at most ``unroll`` loads, so that all of them are in flight at once.
    splits = [n for n in (1, 2, 4, 8, 16, 32) if n <= warps and warps % n == 0 and chunks % n == 0]
    S = next((n for n in splits if chunks // n <= unroll), splits[-1])
    cpw = chunks // S
    u = max(f for f in range(1, min(unroll, cpw) + 1) if cpw % f == 0)
    rpb = warps // S  # rows a block
    ragged_k = K % step != 0
    (G0, R0, E0) = parts[0]
    (G1, R1, E1) = parts[1] if len(parts) == 2 else (0, 0, None)
    rows0, rows1 = G0 * R0, G1 * R1
    assert len(parts) == 1 or (mix and len(parts) == 2 and G1 == 1 and rows0 % rpb == 0 and rows1 % rpb == 0), parts
    assert not mix or R0 % rpb == 0, (R0, rpb)  # a block's rows share their group's lerp
    assert not (mix and any(_EXTRA.get(e, 0) for _, _, e in parts)), parts
    single = len(parts) == 1
    n_extra = _EXTRA.get(E0, 0)
    assert not hoist or (single and not mix and n_extra), (parts, hoist)
    assert rpw == 1 or (ln_eps is not None and all(r % (rpb * rpw) == 0 for _, r, _ in parts)), (parts, rpw)
    rb = rpb * rpw  # rows a block
    blocks0 = -(-rows0 // rb)
    blocks = blocks0 + rows1 // rb
    n_all = rows0 + rows1
    if grid:  # persistent: block b takes rows [b * n_all // grid, (b + 1) * n_all // grid), warps in turn
        assert ln_eps is not None and S == 1 and rpw == 1 and n_all // grid >= warps, (parts, grid, S)
        assert -(-n_all // grid) <= min(R0, R1 if R1 else R0), (parts, grid)
        blocks = grid
        n_it = -(-(-(-n_all // grid)) // warps)  # rows a warp at most
    ahead = bool(grid) and ahead and cpw == u  # (persistent, a row in one batch of loads)
    ragged_rows = rows0 % rpb != 0
    nthreads = warps * 32
    n_per = -(-K // nthreads)  # elements of the row each thread normalises / mixes
    prefetch = cpw == u  # a warp's whole row in one batch: its loads go out before the block's prologue
    use_ln = ln_eps is not None
    assert not use_ln or mix
    zero, one = tirx.const(0, dt), tirx.const(1, dt)
    full = tirx.const(0xFFFFFFFF, "uint32")

    def y_shape(g, r, e):
        return (g, 1, r) if e == "cast" else (1, r)

    def y_dtype(e):
        return "float32" if e == "logits" else dt

    def w_shape(g, r):
        return (g, r, K) if g > 1 else (r, K)

    def tail(epilogue, acc, n, e0, e1, ev=None):  # ev: e0[0, n] (and e1's) loaded before (hoist), else None
        v = T.Cast(dt, acc)
        a0 = None if epilogue not in _EXTRA else (e0[0, n] if ev is None else ev[0])
        a1 = None if _EXTRA.get(epilogue, 0) < 2 else (e1[0, n] if ev is None else ev[1])
        if epilogue == "cast":
            return v
        if epilogue == "residual":
            return a0 + v
        if epilogue == "relu2":
            return T.max(v, zero) * T.max(v, zero)
        if epilogue == "sigmoid":
            return T.sigmoid(v)
        if epilogue == "rmul_residual":
            return a0 + a1 * v
        if epilogue == "rmul_residual_half":  # (fold_halving: the stream's halving, exact)
            return (a0 + a1 * v) * tirx.const(0.5, dt)
        return T.Cast("float32", v)

    def col(ty, co, ci, lane):  # the first element of this lane's ci-th load of run co
        return ((ty % S) * cpw + co * u + ci) * step + lane * vec

    def ok(ty, co, ci, lane):  # inside the row (static when K is whole)
        return True if not ragged_k else col(ty, co, ci, lane) < K

    def valid(b, ty):  # this warp has a row (warp-uniform; static when the rows are whole)
        return True if not ragged_rows else b * rpb + ty // S < rows0

    @T.macro
    def row_dot(acc, wl, xl, wf, xf, xoff, row, ty, lane):
        for co in T.serial(cpw // u):
            for ci in T.unroll(u):  # the weight first: it is what the kernel waits for
                if ok(ty, co, ci, lane):
                    for e in T.vectorized(vec):
                        wl[ci * vec + e] = wf[row * K + col(ty, co, ci, lane) + e]
            for ci in T.unroll(u):
                if ok(ty, co, ci, lane):
                    for e in T.vectorized(vec):
                        xl[ci * vec + e] = xf[xoff + col(ty, co, ci, lane) + e]
            for ci in T.unroll(u):
                if ok(ty, co, ci, lane):
                    for e in T.unroll(vec):
                        acc[0] = acc[0] + T.Cast("float32", xl[ci * vec + e]) * T.Cast("float32", wl[ci * vec + e])
        for o in T.unroll(5):
            acc[0] = acc[0] + T.tvm_warp_shuffle_down(full, acc[0], 16 >> o, 32, 32)

    @T.macro
    def fetch_w(wl, wf, row, ty, lane):  # the first (with prefetch: the only) batch of the weight
        for ci in T.unroll(u):
            if ok(ty, 0, ci, lane):
                for e in T.vectorized(vec):
                    wl[ci * vec + e] = wf[row * K + col(ty, 0, ci, lane) + e]

    @T.macro
    def dot_fetched(acc, wl, xl, xf, xoff, ty, lane):  # row_dot after fetch_w, when that was all of it
        for ci in T.unroll(u):
            if ok(ty, 0, ci, lane):
                for e in T.vectorized(vec):
                    xl[ci * vec + e] = xf[xoff + col(ty, 0, ci, lane) + e]
        for ci in T.unroll(u):
            if ok(ty, 0, ci, lane):
                for e in T.unroll(vec):
                    acc[0] = acc[0] + T.Cast("float32", xl[ci * vec + e]) * T.Cast("float32", wl[ci * vec + e])
        for o in T.unroll(5):
            acc[0] = acc[0] + T.tvm_warp_shuffle_down(full, acc[0], 16 >> o, 32, 32)

    @T.macro
    def finish(acc, red, ty, lane, b, yf, epilogue, base, rows_total, R, e0, e1, ev=None):
        # S warps a row: lane 0 of each leaves its sum in red; the row's first warp adds them in order
        if S > 1:
            if lane == 0:
                red[ty] = acc[0]
            T.tvm_storage_sync("shared")
            if ty % S == 0 and lane == 0 and (not ragged_rows or base + ty // S < rows_total):
                acc[0] = red[ty]
                for p in T.unroll(S - 1):
                    acc[0] = acc[0] + red[ty + p + 1]
                yf[base + ty // S] = tail(epilogue, acc[0], (base + ty // S) % R, e0, e1, ev)
        else:
            if lane == 0 and (not ragged_rows or base + ty < rows_total):
                yf[base + ty] = tail(epilogue, acc[0], (base + ty) % R, e0, e1, ev)

    @T.macro
    def plain(x, w, e0, e1, y):
        xf = T.decl_buffer((G0 * K,), dt, data=x.data)
        wf = T.decl_buffer((rows0 * K,), dt, data=w.data)
        yf = T.decl_buffer((rows0,), y_dtype(E0), data=y.data)
        for b in T.thread_binding(blocks, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((1,), "float32", scope="local")
                    wl = T.decl_buffer((u * vec,), dt, scope="local")
                    xl = T.decl_buffer((u * vec,), dt, scope="local")
                    red = T.decl_buffer((warps,), "float32", scope="shared")
                    acc[0] = T.float32(0)
                    if hoist:  # the tail's e0[, e1] first (the row's first warp, lane 0: who adds it)
                        ev = T.decl_buffer((2,), dt, scope="local")
                        if ty % S == 0 and lane == 0 and valid(b, ty):
                            ev[0] = e0[0, (b * rpb + ty // S) % R0]
                            if n_extra > 1:
                                ev[1] = e1[0, (b * rpb + ty // S) % R0]
                        if valid(b, ty):
                            row_dot(acc, wl, xl, wf, xf, (b * rpb + ty // S) // R0 * K, b * rpb + ty // S, ty, lane)
                        finish(acc, red, ty, lane, b, yf, E0, b * rpb, rows0, R0, e0, e1, ev)
                    else:
                        if valid(b, ty):
                            row_dot(acc, wl, xl, wf, xf, (b * rpb + ty // S) // R0 * K, b * rpb + ty // S, ty, lane)
                        finish(acc, red, ty, lane, b, yf, E0, b * rpb, rows0, R0, e0, e1)

    @T.macro
    def lerp(x_s, xxf, lastf, muf, muoff, copy, b, ty, lane):
        # the block's input row, once: x = xx * mu + dt(last) * (1 - mu); block 0 also copies xx to fp32
        for i in T.serial(-(-K // nthreads)):
            if K % nthreads == 0 or i * nthreads + ty * 32 + lane < K:
                x_s[i * nthreads + ty * 32 + lane] = (
                    xxf[i * nthreads + ty * 32 + lane] * muf[muoff + i * nthreads + ty * 32 + lane]
                    + T.Cast(dt, lastf[i * nthreads + ty * 32 + lane]) * (one - muf[muoff + i * nthreads + ty * 32 + lane]))
                if b == 0:
                    copy[0, i * nthreads + ty * 32 + lane] = T.Cast("float32", xxf[i * nthreads + ty * 32 + lane])

    def eidx(i, ty, lane):
        return i * nthreads + ty * 32 + lane

    def eok(i, ty, lane):
        return True if K % nthreads == 0 else eidx(i, ty, lane) < K

    @T.macro
    def block_sum(st, j, red, ty, lane):  # st[j] summed over the block (lanes by shuffles, warps in order)
        for o in T.unroll(5):
            st[j] = st[j] + T.tvm_warp_shuffle_down(full, st[j], 16 >> o, 32, 32)
        if lane == 0:
            red[ty] = st[j]
        T.tvm_storage_sync("shared")
        st[j] = red[0]
        for p in T.unroll(warps - 1):
            st[j] = st[j] + red[p + 1]

    @T.macro
    def ln_lerp(x_s, xf, lnw, lnb, lastf, muf, muoff, copy, b, ty, lane, xv, st, xh, red_a, red_b):
        # LayerNorm of the row (every block its own), then the lerp; block 0 also copies xx to fp32
        st[0] = T.float32(0)
        for i in T.unroll(n_per):
            if eok(i, ty, lane):
                xv[i] = T.Cast("float32", xf[eidx(i, ty, lane)])
                st[0] = st[0] + xv[i]
        block_sum(st, 0, red_a, ty, lane)
        st[1] = st[0] / T.float32(K)  # mean
        st[2] = T.float32(0)
        for i in T.unroll(n_per):
            if eok(i, ty, lane):
                st[2] = st[2] + (xv[i] - st[1]) * (xv[i] - st[1])
        block_sum(st, 2, red_b, ty, lane)
        st[0] = T.rsqrt(st[2] / T.float32(K) + T.float32(ln_eps))
        for i in T.unroll(n_per):
            if eok(i, ty, lane):
                xh[0] = T.Cast(dt, (xv[i] - st[1]) * st[0] * T.Cast("float32", lnw[eidx(i, ty, lane)])
                               + T.Cast("float32", lnb[eidx(i, ty, lane)]))
                x_s[eidx(i, ty, lane)] = (xh[0] * muf[muoff + eidx(i, ty, lane)]
                                          + T.Cast(dt, lastf[eidx(i, ty, lane)]) * (one - muf[muoff + eidx(i, ty, lane)]))
                if b == 0:
                    copy[0, eidx(i, ty, lane)] = T.Cast("float32", xh[0])

    @T.macro
    def ln_stats(xf, ty, lane, xv, st, red_a, red_b):  # ln_lerp's LayerNorm: xv the row, st[1] mean, st[0] rsqrt
        st[0] = T.float32(0)
        for i in T.unroll(n_per):
            if eok(i, ty, lane):
                xv[i] = T.Cast("float32", xf[eidx(i, ty, lane)])
                st[0] = st[0] + xv[i]
        block_sum(st, 0, red_a, ty, lane)
        st[1] = st[0] / T.float32(K)  # mean
        st[2] = T.float32(0)
        for i in T.unroll(n_per):
            if eok(i, ty, lane):
                st[2] = st[2] + (xv[i] - st[1]) * (xv[i] - st[1])
        block_sum(st, 2, red_b, ty, lane)
        st[0] = T.rsqrt(st[2] / T.float32(K) + T.float32(ln_eps))

    @T.macro
    def ln_write(x_s, xoff, lnw, lnb, lastf, muf, muoff, copy, b, ty, lane, xv, st, xh, with_copy):
        # ln_lerp's last loop: one lerp of the normalised row into x_s[xoff:]; block 0 (with_copy) copies it
        for i in T.unroll(n_per):
            if eok(i, ty, lane):
                xh[0] = T.Cast(dt, (xv[i] - st[1]) * st[0] * T.Cast("float32", lnw[eidx(i, ty, lane)])
                               + T.Cast("float32", lnb[eidx(i, ty, lane)]))
                x_s[xoff + eidx(i, ty, lane)] = (xh[0] * muf[muoff + eidx(i, ty, lane)]
                                                 + T.Cast(dt, lastf[eidx(i, ty, lane)]) * (one - muf[muoff + eidx(i, ty, lane)]))
                if with_copy:
                    if b == 0:
                        copy[0, eidx(i, ty, lane)] = T.Cast("float32", xh[0])

    def seg(r):  # the lerp row r takes: its group of part 0, or G0 (part 1)
        return T.min(r // R0, G0)

    @T.macro
    def p_row(acc, xo, wl, xl, w0f, w1, x_s, y0f, y1f, sa, r, ty, lane, fetched):
        # one row of the persistent kernel: its dot product (as row_dot / dot_fetched) and its tail
        acc[0] = T.float32(0)
        xo[0] = T.Select(seg(r) == sa, 0, 1)  # x_s's first or second lerp (x_s[xo * K:]: its loads stay 16-byte ones)
        if single or r < rows0:
            if fetched:
                dot_fetched(acc, wl, xl, x_s, xo[0] * K, ty, lane)
            else:
                row_dot(acc, wl, xl, w0f, x_s, xo[0] * K, r, ty, lane)
            if lane == 0:
                y0f[r] = tail(E0, acc[0], r % R0, None, None)
        else:
            if fetched:
                dot_fetched(acc, wl, xl, x_s, xo[0] * K, ty, lane)
            else:
                row_dot(acc, wl, xl, w1, x_s, xo[0] * K, r - rows0, ty, lane)
            if lane == 0:
                y1f[r - rows0] = tail(E1, acc[0], (r - rows0) % R1, None, None)

    @T.macro
    def p_fetch(wl, w0f, w1, r, ty, lane):  # row r's weight (with prefetch: all of it) into wl
        if single or r < rows0:
            fetch_w(wl, w0f, r, ty, lane)
        else:
            fetch_w(wl, w1, r - rows0, ty, lane)

    @T.macro
    def ln_persistent(xf, lnw, lnb, last, mu0f, w0f, mu1, w1, y0f, y1f, copy, b, ty, lane):
        acc = T.decl_buffer((1,), "float32", scope="local")
        xo = T.decl_buffer((1,), "int32", scope="local")
        wl = T.decl_buffer((u * vec,), dt, scope="local")
        wl2 = T.decl_buffer((u * vec,), dt, scope="local")
        xl = T.decl_buffer((u * vec,), dt, scope="local")
        xv = T.decl_buffer((n_per,), "float32", scope="local")
        st = T.decl_buffer((3,), "float32", scope="local")
        xh = T.decl_buffer((1,), dt, scope="local")
        x_s = T.decl_buffer((2 * K,), dt, scope="shared")  # the lerp of the block's first row, then (if another) its last's
        red_a = T.decl_buffer((warps,), "float32", scope="shared")
        red_b = T.decl_buffer((warps,), "float32", scope="shared")
        start = b * n_all // grid
        end = (b + 1) * n_all // grid
        if prefetch:  # the warp's first row (every warp has one)
            p_fetch(wl, w0f, w1, start + ty, ty, lane)
        ln_stats(xf, ty, lane, xv, st, red_a, red_b)
        if single or seg(start) < G0:  # (block-uniform)
            ln_write(x_s, 0, lnw, lnb, last, mu0f, seg(start) * K, copy, b, ty, lane, xv, st, xh, True)
        else:
            ln_write(x_s, 0, lnw, lnb, last, mu1, 0, copy, b, ty, lane, xv, st, xh, True)
        if seg(end - 1) != seg(start):  # a block across two groups / parts: the second lerp too
            if single or seg(end - 1) < G0:
                ln_write(x_s, K, lnw, lnb, last, mu0f, seg(end - 1) * K, copy, b, ty, lane, xv, st, xh, False)
            else:
                ln_write(x_s, K, lnw, lnb, last, mu1, 0, copy, b, ty, lane, xv, st, xh, False)
        T.tvm_storage_sync("shared")
        if ahead:  # each warp's next row is fetched (wl / wl2 in turn) before it adds up the one it holds
            for j in T.serial(-(-n_it // 2)):
                if start + (2 * j + 1) * warps + ty < end:
                    p_fetch(wl2, w0f, w1, start + (2 * j + 1) * warps + ty, ty, lane)
                if start + 2 * j * warps + ty < end:
                    p_row(acc, xo, wl, xl, w0f, w1, x_s, y0f, y1f, seg(start), start + 2 * j * warps + ty, ty, lane, True)
                if start + (2 * j + 2) * warps + ty < end:
                    p_fetch(wl, w0f, w1, start + (2 * j + 2) * warps + ty, ty, lane)
                if start + (2 * j + 1) * warps + ty < end:
                    p_row(acc, xo, wl2, xl, w0f, w1, x_s, y0f, y1f, seg(start), start + (2 * j + 1) * warps + ty, ty, lane,
                          True)
        else:
            p_row(acc, xo, wl, xl, w0f, w1, x_s, y0f, y1f, seg(start), start + ty, ty, lane, prefetch)
            for it in T.serial(n_it - 1):
                if start + (it + 1) * warps + ty < end:
                    p_row(acc, xo, wl, xl, w0f, w1, x_s, y0f, y1f, seg(start), start + (it + 1) * warps + ty, ty, lane,
                          False)

    @T.macro
    def ln_body(xf, lnw, lnb, last, mu0f, w0f, mu1, w1, y0f, y1f, copy, b, ty, lane):
        acc = T.decl_buffer((1,), "float32", scope="local")
        wl = T.decl_buffer((u * vec,), dt, scope="local")
        xl = T.decl_buffer((u * vec,), dt, scope="local")
        xv = T.decl_buffer((n_per,), "float32", scope="local")
        st = T.decl_buffer((3,), "float32", scope="local")
        xh = T.decl_buffer((1,), dt, scope="local")
        x_s = T.decl_buffer((K,), dt, scope="shared")
        red = T.decl_buffer((warps,), "float32", scope="shared")
        red_a = T.decl_buffer((warps,), "float32", scope="shared")
        red_b = T.decl_buffer((warps,), "float32", scope="shared")
        acc[0] = T.float32(0)
        if prefetch:
            if single or b < blocks0:
                if valid(b, ty):
                    fetch_w(wl, w0f, b * rb + ty // S, ty, lane)
            else:
                fetch_w(wl, w1, (b - blocks0) * rb + ty // S, ty, lane)
        if single or b < blocks0:  # (block-uniform; one part: no branch)
            ln_lerp(x_s, xf, lnw, lnb, last, mu0f, (b * rb) // R0 * K, copy, b, ty, lane, xv, st, xh,
                    red_a, red_b)
        else:
            ln_lerp(x_s, xf, lnw, lnb, last, mu1, 0, copy, b, ty, lane, xv, st, xh, red_a, red_b)
        T.tvm_storage_sync("shared")
        if single or b < blocks0:
            if valid(b, ty):
                if prefetch:
                    dot_fetched(acc, wl, xl, x_s, 0, ty, lane)
                else:
                    row_dot(acc, wl, xl, w0f, x_s, 0, b * rb + ty // S, ty, lane)
            finish(acc, red, ty, lane, b, y0f, E0, b * rb, rows0, R0, None, None)
        else:
            if prefetch:
                dot_fetched(acc, wl, xl, x_s, 0, ty, lane)
            else:
                row_dot(acc, wl, xl, w1, x_s, 0, (b - blocks0) * rb + ty // S, ty, lane)
            finish(acc, red, ty, lane, b, y1f, E1, (b - blocks0) * rb, rows1, R1, None, None)
        if rpw > 1:  # the block's other rows, a warp's in turn, on the same normalised input
            for rr in T.serial(rpw - 1):
                if S > 1:
                    T.tvm_storage_sync("shared")  # (red: the last row's sums are read)
                acc[0] = T.float32(0)
                if single or b < blocks0:
                    row_dot(acc, wl, xl, w0f, x_s, 0, b * rb + (rr + 1) * rpb + ty // S, ty, lane)
                    finish(acc, red, ty, lane, b, y0f, E0, b * rb + (rr + 1) * rpb, rows0, R0, None, None)
                else:
                    row_dot(acc, wl, xl, w1, x_s, 0, (b - blocks0) * rb + (rr + 1) * rpb + ty // S, ty, lane)
                    finish(acc, red, ty, lane, b, y1f, E1, (b - blocks0) * rb + (rr + 1) * rpb, rows1, R1,
                           None, None)

    @T.macro
    def mixed_ln(xx, lnw, lnb, last, mu0, w0, mu1, w1, y0, y1f, copy):
        xf = T.decl_buffer((K,), dt, data=xx.data)
        mu0f = T.decl_buffer((G0 * K,), dt, data=mu0.data)
        w0f = T.decl_buffer((rows0 * K,), dt, data=w0.data)
        y0f = T.decl_buffer((rows0,), y_dtype(E0), data=y0.data)
        for b in T.thread_binding(blocks, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(32, thread="threadIdx.x"):
                    if grid > 0:
                        ln_persistent(xf, lnw, lnb, last, mu0f, w0f, mu1, w1, y0f, y1f, copy, b, ty, lane)
                    elif min_blocks > 0:  # (__launch_bounds__'s second number)
                        with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", min_blocks):
                            ln_body(xf, lnw, lnb, last, mu0f, w0f, mu1, w1, y0f, y1f, copy, b, ty, lane)
                    else:
                        ln_body(xf, lnw, lnb, last, mu0f, w0f, mu1, w1, y0f, y1f, copy, b, ty, lane)

    @T.macro
    def mixed(xx, last, mu0, w0, mu1, w1, y0, y1f, copy):
        xxf = T.decl_buffer((K,), dt, data=xx.data)
        mu0f = T.decl_buffer((G0 * K,), dt, data=mu0.data)
        w0f = T.decl_buffer((rows0 * K,), dt, data=w0.data)
        y0f = T.decl_buffer((rows0,), y_dtype(E0), data=y0.data)
        for b in T.thread_binding(blocks, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((1,), "float32", scope="local")
                    wl = T.decl_buffer((u * vec,), dt, scope="local")
                    xl = T.decl_buffer((u * vec,), dt, scope="local")
                    x_s = T.decl_buffer((K,), dt, scope="shared")
                    red = T.decl_buffer((warps,), "float32", scope="shared")
                    acc[0] = T.float32(0)
                    if single or b < blocks0:  # (block-uniform; one part: no branch)
                        lerp(x_s, xxf, last, mu0f, (b * rpb) // R0 * K, copy, b, ty, lane)
                    else:
                        lerp(x_s, xxf, last, mu1, 0, copy, b, ty, lane)
                    T.tvm_storage_sync("shared")
                    if single or b < blocks0:
                        if valid(b, ty):
                            row_dot(acc, wl, xl, w0f, x_s, 0, b * rpb + ty // S, ty, lane)
                        finish(acc, red, ty, lane, b, y0f, E0, b * rpb, rows0, R0, None, None)
                    else:
                        row_dot(acc, wl, xl, w1, x_s, 0, (b - blocks0) * rpb + ty // S, ty, lane)
                        finish(acc, red, ty, lane, b, y1f, E1, (b - blocks0) * rpb, rows1, R1, None, None)

    ys0, yd0 = y_shape(G0, R0, E0), y_dtype(E0)
    ws0 = w_shape(G0, R0)
    if use_ln and len(parts) == 2:
        @T.prim_func(private=True)
        def gemv(x_h: T.handle, lnw_h: T.handle, lnb_h: T.handle, last_h: T.handle, mu0_h: T.handle, w0_h: T.handle,
                 mu1_h: T.handle, w1_h: T.handle, y0_h: T.handle, y1_h: T.handle, copy_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, (1, K), dt)
            lnw = T.match_buffer(lnw_h, (K,), dt)
            lnb = T.match_buffer(lnb_h, (K,), dt)
            last = T.match_buffer(last_h, (K,), "float32")
            mu0 = T.match_buffer(mu0_h, (G0, 1, 1, K) if G0 > 1 else (1, 1, K), dt)
            w0 = T.match_buffer(w0_h, ws0, dt)
            mu1f = T.match_buffer(mu1_h, (1, 1, K), dt)
            w1 = T.match_buffer(w1_h, (R1, K), dt)
            y0 = T.match_buffer(y0_h, ys0, yd0)
            y1 = T.match_buffer(y1_h, (1, R1), y_dtype(E1))
            copy = T.match_buffer(copy_h, (1, K), "float32")
            mu1 = T.decl_buffer((K,), dt, data=mu1f.data)
            w1f = T.decl_buffer((R1 * K,), dt, data=w1.data)
            y1f = T.decl_buffer((R1,), y_dtype(E1), data=y1.data)
            mixed_ln(x, lnw, lnb, last, mu0, w0, mu1, w1f, y0, y1f, copy)
    elif use_ln:
        @T.prim_func(private=True)
        def gemv(x_h: T.handle, lnw_h: T.handle, lnb_h: T.handle, last_h: T.handle, mu0_h: T.handle, w0_h: T.handle,
                 y0_h: T.handle, copy_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, (1, K), dt)
            lnw = T.match_buffer(lnw_h, (K,), dt)
            lnb = T.match_buffer(lnb_h, (K,), dt)
            last = T.match_buffer(last_h, (K,), "float32")
            mu0 = T.match_buffer(mu0_h, (G0, 1, 1, K) if G0 > 1 else (1, 1, K), dt)
            w0 = T.match_buffer(w0_h, ws0, dt)
            y0 = T.match_buffer(y0_h, ys0, yd0)
            copy = T.match_buffer(copy_h, (1, K), "float32")
            mixed_ln(x, lnw, lnb, last, mu0, w0, None, None, y0, None, copy)
    elif mix and len(parts) == 2:
        @T.prim_func(private=True)
        def gemv(xx_h: T.handle, last_h: T.handle, mu0_h: T.handle, w0_h: T.handle, mu1_h: T.handle, w1_h: T.handle,
                 y0_h: T.handle, y1_h: T.handle, copy_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xx = T.match_buffer(xx_h, (1, K), dt)
            last = T.match_buffer(last_h, (K,), "float32")
            mu0 = T.match_buffer(mu0_h, (G0, 1, 1, K) if G0 > 1 else (1, 1, K), dt)
            w0 = T.match_buffer(w0_h, ws0, dt)
            mu1f = T.match_buffer(mu1_h, (1, 1, K), dt)
            w1 = T.match_buffer(w1_h, (R1, K), dt)
            y0 = T.match_buffer(y0_h, ys0, yd0)
            y1 = T.match_buffer(y1_h, (1, R1), y_dtype(E1))
            copy = T.match_buffer(copy_h, (1, K), "float32")
            mu1 = T.decl_buffer((K,), dt, data=mu1f.data)
            w1f = T.decl_buffer((R1 * K,), dt, data=w1.data)
            y1f = T.decl_buffer((R1,), y_dtype(E1), data=y1.data)
            mixed(xx, last, mu0, w0, mu1, w1f, y0, y1f, copy)
    elif mix:
        @T.prim_func(private=True)
        def gemv(xx_h: T.handle, last_h: T.handle, mu0_h: T.handle, w0_h: T.handle, y0_h: T.handle, copy_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xx = T.match_buffer(xx_h, (1, K), dt)
            last = T.match_buffer(last_h, (K,), "float32")
            mu0 = T.match_buffer(mu0_h, (G0, 1, 1, K) if G0 > 1 else (1, 1, K), dt)
            w0 = T.match_buffer(w0_h, ws0, dt)
            y0 = T.match_buffer(y0_h, ys0, yd0)
            copy = T.match_buffer(copy_h, (1, K), "float32")
            mixed(xx, last, mu0, w0, None, None, y0, None, copy)
    elif n_extra == 0:
        @T.prim_func(private=True)
        def gemv(x_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, x_shape, dt)
            w = T.match_buffer(w_h, ws0, dt)
            y = T.match_buffer(y_h, ys0, yd0)
            plain(x, w, None, None, y)
    elif n_extra == 1:
        @T.prim_func(private=True)
        def gemv(x_h: T.handle, w_h: T.handle, e0_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, x_shape, dt)
            w = T.match_buffer(w_h, ws0, dt)
            e0 = T.match_buffer(e0_h, (1, R0), dt)
            y = T.match_buffer(y_h, ys0, yd0)
            plain(x, w, e0, None, y)
    else:
        @T.prim_func(private=True)
        def gemv(x_h: T.handle, w_h: T.handle, e0_h: T.handle, e1_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, x_shape, dt)
            w = T.match_buffer(w_h, ws0, dt)
            e0 = T.match_buffer(e0_h, (1, R0), dt)
            e1 = T.match_buffer(e1_h, (1, R0), dt)
            y = T.match_buffer(y_h, ys0, yd0)
            plain(x, w, e0, e1, y)

    return gemv
