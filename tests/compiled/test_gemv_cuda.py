"""The CUDA GEMV variants (parity/compiled/gemv_cuda.py): chosen by $PARITY_CUDA_GEMV, part of the
cache key, and really scheduled with the loads they promise. Here, no GPU: the CUDA source TVM
generates is what is checked; the GPU job measures their speed and how far their logits are from
the default build's (benchmarks/gpu.py --gemv)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from parity.compiled.build import DEFAULT_GEMV, cache_key, cuda_gemv, entry_path
from parity.compiled.gemv_cuda import GEMV_CONFIGS, GemvConfig, gemv_config
from parity.errors import ParityError
from parity.synth import shape_config

# One layer at the 1.5B width (C 2048, F 7168) and a small vocabulary: the GEMVs of a released
# shape, compiled in seconds.
WIDE = dataclasses.replace(shape_config("1.5b", version="5.2"), n_layer=1, vocab_size=4096)


# A 16-byte load of the weight into the thread's registers, as TVM prints it (a uint4 array, or a
# half array written through a uint4 pointer).
WEIGHT_LOAD_16 = re.compile(r"_weight_local_ptr(\[0\]| \+ 0\)) = \*\(uint4\*\)\(\w+_weight_ptr")


def test_default_is_dlight_and_a_variant_is_its_own_entry(monkeypatch, tmp_path):
    monkeypatch.delenv("PARITY_CUDA_GEMV", raising=False)
    assert cuda_gemv() == DEFAULT_GEMV == "dlight"
    plain = cache_key(config=WIDE, variant="plain", target="cuda")
    llvm = cache_key(config=WIDE, variant="plain", target="llvm")
    monkeypatch.setenv("PARITY_CUDA_GEMV", "v16")
    assert cache_key(config=WIDE, variant="plain", target="cuda") != plain
    assert cache_key(config=WIDE, variant="plain", target="llvm") == llvm  # the llvm build has no GEMV rule
    assert "-gemv-v16-plain-cuda-" in entry_path(WIDE, variant="plain", target="cuda", cache_dir=tmp_path).name
    monkeypatch.setenv("PARITY_CUDA_GEMV", "ts8-tr32-c4-l16")  # tile sizes spelled out
    assert cuda_gemv() == "ts8-tr32-c4-l16" and gemv_config("ts8-tr32-c4-l16") == GemvConfig(ts=8, tr=32, vec_c=4, vec_load=16)
    for bad in ("v99", "ts64-tr32-c4-l16", "ts4-tr32-c8-l16", "ts4-tr32-c4-l32"):  # > 1024 threads; an 8-wide
        monkeypatch.setenv("PARITY_CUDA_GEMV", bad)  # accumulator (an nvcc error in TVM 0.27); a 32-byte load
        with pytest.raises(ParityError, match=f"unknown PARITY_CUDA_GEMV '{bad}'; choose one of dlight, v16"):
            cuda_gemv()


# gemv -> the CUDA source of WIDE in fp16 with that GEMV rule: a TVM compile of WIDE costs ~20 s
# here, and two tests ask for the same variants (v16, v16-ts4) as the nvcc sweep does.
_SOURCES: dict[str | None, str] = {}


def _gemv_kernels(monkeypatch, gemv: str | None, *, nvcc_into: Path | None = None) -> dict[str, tuple[int, str]]:
    """name -> (threads, CUDA source) of each decode GEMV kernel (NT_matmul, no seq_len argument)
    of WIDE in fp16; with ``nvcc_into``, the whole source also goes through nvcc there (where
    nvcc exists), as a build's does: TVM prints code nvcc may still refuse."""
    from parity.compiled import cuda

    import tvm

    from parity.compiled.build import compile_pipeline, make_target, model_for
    from parity.compiled.cuda import cuda_sources

    if gemv:
        monkeypatch.setenv("PARITY_CUDA_GEMV", gemv)
    else:
        monkeypatch.delenv("PARITY_CUDA_GEMV", raising=False)
    if gemv not in _SOURCES:
        model = model_for(WIDE, debug=False, target="cuda", dtype="float16")
        mod, _ = model.export_tvm(spec=model.get_default_spec())
        target = make_target("cuda")
        with target:
            mod = compile_pipeline("cuda", target)(mod)
        (_SOURCES[gemv],) = cuda_sources(tvm.compile(mod, target=target, relax_pipeline=None).mod)
    src = _SOURCES[gemv]
    if nvcc_into is not None and cuda.nvcc_path() is not None:
        assert cuda.compile_source(src, cache_dir=nvcc_into)[:4] == b"\x50\xed\x55\xba"  # the fatbin magic
    out = {}
    for m in re.finditer(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (fused_NT_matmul\w*)\(([^)]*)\) \{', src):
        if "seq_len" not in m.group(3):  # the prefill's matmuls take the token count
            end = src.find('extern "C" __global__', m.end())
            out[m.group(2)] = (int(m.group(1)), src[m.end():end])
    return out


# Each variant's block shape through nvcc. "v16" is v16-ts4 with 16 rows a block instead of 4 (the same
# schedule function, wide_gemv_rule, other constants): left out here, where each variant costs ~45 s of
# CI's two cores (a TVM compile of WIDE, then nvcc); PARITY_TEST_EVERY_GEMV=1 puts it back.
SWEPT = [g for g in GEMV_CONFIGS if g != "v16" or os.environ.get("PARITY_TEST_EVERY_GEMV") == "1"]


@pytest.mark.parametrize("gemv", SWEPT)
def test_every_variant_compiles_through_nvcc(monkeypatch, compile_cache, gemv):
    # The session's cache: its fatbins are keyed by the source's digest, so a source another test
    # (or xdist worker) already put through nvcc is not compiled twice.
    assert _gemv_kernels(monkeypatch, gemv, nvcc_into=compile_cache)


def test_v16_loads_the_weight_16_bytes_at_a_time(monkeypatch):
    """DLight's tiles load the fp16 weight 4 bytes (a half2) at a time; the v16-ts4 variant 16 bytes
    (a uint4 of 8 halves) in blocks of 4 rows x 32 threads; both keep fp32 accumulators. (A variant
    also puts the decode step back on DLight-scheduled GEMVs: the default decode has its own kernels,
    test_default_decode_has_no_dlight_gemv.)"""
    dlight = _gemv_kernels(monkeypatch, "ts16-tr32-c4-l4")  # DLight's own tile sizes and load width
    wide = _gemv_kernels(monkeypatch, "v16-ts4")
    assert dlight and set(dlight) == set(wide)
    cfg = GEMV_CONFIGS["v16-ts4"]
    for name, (threads, body) in wide.items():
        assert threads == cfg.ts * cfg.tr, name
        assert WEIGHT_LOAD_16.search(body), name
        assert "float NT_matmul_intermediate_rf_local" in body, name  # fp32 accumulation kept
    for name, (threads, body) in dlight.items():
        assert threads == 512, name  # DLight's 16 x 32
        assert not WEIGHT_LOAD_16.search(body), name


def test_default_decode_has_no_dlight_gemv(monkeypatch):
    """The default build's decode step runs the decode GEMV kernels of gemv_cuda.py (one warp a row,
    the LayerNorm and lerps inside), not DLight-scheduled NT_matmul GEMVs; a variant brings those back."""
    assert not _gemv_kernels(monkeypatch, None)
    assert _gemv_kernels(monkeypatch, "v16-ts4")  # (test_v16_loads... compiles the same source)


def test_the_fp16_halving_rides_in_the_ffn_value_kernel() -> None:
    """fp16 halves the residual stream after every 6th layer (common.RESCALE_LAYER): in the decode step
    the 6th layer's FFN value GEMV does it in its epilogue (gemv_cuda.fold_halving), no launch of its own
    (test_kernel_count: 5 launches a layer, 5 outside the layers)."""
    from .test_kernel_count import decode_launches

    assert decode_launches(n_layer=6, dtype="float16") == 5 + 6 * 5


def test_fold_halving_rewrites_only_the_first_ffn_value_gemv() -> None:
    # (x + r * v) rounded to fp16 first, then * 0.5: the order of the halving kernel it replaces.
    from parity.compiled import gemv_cuda

    with gemv_cuda.fold_halving() as fold:
        f = gemv_cuda.decode_gemv_cuda(128, "float16", ((1, 128, "rmul_residual"),), x_shape=(1, 128))
        g = gemv_cuda.decode_gemv_cuda(128, "float16", ((1, 128, "rmul_residual"),), x_shape=(1, 128))
    assert fold.done and gemv_cuda._Fold.active is None
    assert "* T.float16(0.5)" in f.script() and "T.float16(0.5)" not in g.script()
    plain = gemv_cuda.decode_gemv_cuda(128, "float16", ((1, 128, "rmul_residual"),), x_shape=(1, 128))
    assert plain.script() == g.script()


# The two LayerNorm GEMVs of a 1.5B layer (fp16): ln2 + FFN key (relu^2) + receptance (sigmoid); ln1 + r/k/v/g.
LN2_PARTS = ((1, 7168, "relu2"), (1, 2048, "sigmoid"))
LN1_PARTS = ((4, 2048, "cast"),)


def _cuda_source(f) -> str:
    import tvm

    from parity.compiled.build import make_target
    from parity.compiled.cuda import cuda_sources

    mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
    (src,) = cuda_sources(tvm.compile(mod, target=make_target("cuda")).mod)
    return src


@pytest.mark.parametrize("ahead", [False, True])
def test_the_persistent_ln_gemv_walks_every_row_once(monkeypatch, tmp_path, ahead) -> None:
    """DECODE_GRID_BY (K6 measured {"ln": 132} faster; default off): an "ln" kernel of that many blocks
    (the H200's 132 SMs), each normalising the row once and taking rows [b * n // grid, (b + 1) * n // grid),
    warps in turn; a block across the key/receptance (or two groups') boundary makes both lerps. Its loads
    of the lerped row stay 16-byte ones; fp32 (two warps a row) and rows too few for a warp each keep the
    plain kernel."""
    from parity.compiled import cuda, gemv_cuda

    monkeypatch.setattr(gemv_cuda, "DECODE_GRID_AHEAD", ("ln",) if ahead else ())
    monkeypatch.setattr(gemv_cuda, "DECODE_GRID_BY", {})
    plain = {p: gemv_cuda.decode_gemv_cuda(2048, "float16", p, mix=True, ln_eps=1e-5).script() for p in (LN2_PARTS, LN1_PARTS)}
    monkeypatch.setattr(gemv_cuda, "DECODE_GRID_BY", {"ln": 132})
    for parts, n, straddle in ((LN2_PARTS, 9216, {102}), (LN1_PARTS, 8192, set())):
        assert gemv_cuda._persistent_grid(2048, "float16", parts, 16, 132) == 132
        rows = [r for b in range(132) for r in range(b * n // 132, (b + 1) * n // 132)]
        assert rows == list(range(n)) and n // 132 >= 16  # each row once; every warp has a first row
        seg = [min(r // parts[0][1], parts[0][0]) for r in range(n)]
        assert {b for b in range(132) if seg[b * n // 132] != seg[(b + 1) * n // 132 - 1]} == straddle
        f = gemv_cuda.decode_gemv_cuda(2048, "float16", parts, mix=True, ln_eps=1e-5)
        assert f.script() != plain[parts] and 'T.thread_binding(132, thread="blockIdx.x")' in f.script()
        src = _cuda_source(f)
        assert "x_s_ptr[4096]" in src and "*(uint4*)(x_s_ptr + ((xo_ptr[0] * 2048)" in src
        assert "make_uint4(x_s" not in src  # (no element-by-element gather of the lerped row)
        if cuda.nvcc_path() is not None:
            assert cuda.compile_source(src, cache_dir=tmp_path)[:4] == b"\x50\xed\x55\xba"
    assert gemv_cuda._persistent_grid(2048, "float32", LN2_PARTS, 16, 132) == 0  # two warps a row
    f32 = gemv_cuda.decode_gemv_cuda(2048, "float32", LN2_PARTS, mix=True, ln_eps=1e-5)
    assert 'T.thread_binding(132, thread="blockIdx.x")' not in f32.script()
    small = ((1, 512, "relu2"), (1, 128, "sigmoid"))  # 640 rows: 40 blocks of 16
    assert gemv_cuda._persistent_grid(128, "float16", small, 16, 132) == 40
    assert gemv_cuda._persistent_grid(128, "float16", ((1, 512, "relu2"), (1, 8, "sigmoid")), 16, 132) == 0


def test_the_ffn_value_loads_its_tail_before_its_row(monkeypatch, tmp_path) -> None:
    """DECODE_HOIST (K7, on for the fp16 FFN value): a plain GEMV whose row is several warps' sums (met in shared
    memory, after a barrier) has the row's first warp load its tail's e0, e1 into registers before the dot product;
    the tail is the same expression on the same values (GPU compare: bit for bit). Other kinds and dtypes: as before."""
    from parity.compiled import cuda, gemv_cuda

    def src(k, parts, dtype="float16"):
        return _cuda_source(gemv_cuda.decode_gemv_cuda(k, dtype, parts, x_shape=(1, k)))

    def weight_load(s):
        return s.index("= *(uint4*)(wf_ptr")

    val = ((1, 2048, "rmul_residual"),)
    assert gemv_cuda.DECODE_HOIST == {"rmul_residual": ("float16",)}
    on = src(7168, val)
    assert on.index("e0_ptr[") < weight_load(on) and on.index("e1_ptr[") < weight_load(on)
    assert "ev_ptr[0] + (ev_ptr[1] * ((half)acc_ptr[0]))" in on
    if cuda.nvcc_path() is not None:
        assert cuda.compile_source(on, cache_dir=tmp_path)[:4] == b"\x50\xed\x55\xba"
    with gemv_cuda.fold_halving():  # the halved one (every 6th layer) too
        half = src(7168, val)
    assert half.index("e1_ptr[") < weight_load(half) and "* __float2half_rn(0x1p-1f" in half
    att = src(2048, ((1, 2048, "residual"),))  # one warp a row, no barrier: not asked for
    assert att.index("e0_ptr[") > weight_load(att)
    assert "ev_ptr" not in src(7168, val, "float32")  # (fp32: not measured; its kernels as before)
    monkeypatch.setattr(gemv_cuda, "DECODE_HOIST", {})
    off = src(7168, val)
    assert off.index("e1_ptr[") > weight_load(off) and "ev_ptr" not in off
