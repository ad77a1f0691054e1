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
from dataclasses import dataclass
from functools import reduce


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
