"""The plain CUDA build's grouped form (rwkv5_model.group_projections; issue 10), checked without a GPU:
which builds get it, and that each stacked parameter names its checkpoint tensors in the order its
kernels read them. (On a GPU: tests/compiled/test_gpu.py, the instrumented parity run and the graphs.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.checkpoint import expected_shapes, load_checkpoint
from parity.compiled import build
from parity.compiled.rwkv5_model import Attention

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _model(name: str, **kw):
    return build.model_for(load_checkpoint(FIXTURES / f"{name}.pth").config, **kw)


def test_only_the_plain_cuda_build_of_a_gated_v5_is_grouped() -> None:
    assert _model("rwkv5_2-L2-C144-H12", debug=False, target="cuda").param_groups()
    assert _model("rwkv5_1-L2-C64-H8", debug=False, target="cuda", dtype="float16").param_groups()
    for name, kw in (("rwkv5_2-L2-C144-H12", dict(debug=False, target="llvm")),  # every llvm build
                     ("rwkv5_2-L2-C144-H12", dict(debug=True, target="cuda")),  # the taps' build
                     ("rwkv5_2-L2-C144-H12", dict(debug=False, target="cuda", dtype="fp16i8")),  # quantised
                     ("rwkv5_0-L2-C64-H2", dict(debug=False, target="cuda")),  # no gate
                     ("rwkv4-L2-C64", dict(debug=False, target="cuda"))):
        assert _model(name, **kw).param_groups() == {}, (name, kw)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stacked_parameters_are_made_of_their_checkpoint_tensors(dtype) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L2-C144-H12.pth")
    shapes = expected_shapes(ck.config)
    model = build.model_for(ck.config, debug=False, target="cuda", dtype=dtype)
    params = dict(model.named_parameters())
    groups = model.param_groups()
    for name, keys in groups.items():
        # each source exists and has one shape; the stack adds the leading axis
        assert len({tuple(shapes[k]) for k in keys}) == 1, name
        assert tuple(params[name].shape) == (len(keys), *shapes[keys[0]]), name
        assert str(params[name].dtype) == dtype, name
        # a source is a parameter of the build in one place only: stacked, never also on its own
        assert not set(keys) & set(params), name
    pre = "blocks.1.att."
    # The kernels index the stack by Attention.GROUPS: the time-mix lerps in mixes() order (k, v, r, g)
    # and the weights the same, so lerp g feeds weight g.
    assert groups[pre + "rkvg_weight"] == [pre + f"{n}.weight" for n in ("key", "value", "receptance", "gate")]
    assert groups[pre + "rkvg_mix"] == [pre + f"time_mix_{n}" for n in ("k", "v", "r", "g")]
    assert Attention.GROUPS == ("key", "value", "receptance", "gate")
    assert "blocks.1.ffn.kr_mix" not in groups  # the FFN's lerps stay separate (the LayerNorm+mix kernel was slower)
    # every checkpoint tensor but the stacked ones is still a parameter of its own
    stacked = {k for keys in groups.values() for k in keys}
    assert (set(params) - set(groups)) | stacked == set(shapes)


def _called_kernels(model, fn: str) -> list[str]:
    """The TIR kernels ``fn`` (decode / prefill) of a CUDA build calls, in order (benchmarks/kernel_count.py's way)."""
    import re

    import tvm

    mod, _ = model.export_tvm(spec=model.get_default_spec())
    target = build.make_target("cuda")
    with target:
        mod = build.compile_pipeline("cuda", target)(mod)
    names = {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    return [c for c in re.findall(r"^\s*(?:\w+ = )?(?:cls\.)?(\w+)\(", mod[fn].script(), re.M) if c in names]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_decode_step_is_five_kernels_a_layer(dtype) -> None:
    """The grouped build's decode (T = 1): per layer ln1 + lerps + r/k/v/g GEMV, the scan (named wkv5*,
    as the instrumented backend needs), output GEMV + residual, ln2 + lerps + FFN key and receptance,
    FFN value + r * v + residual (rwkv5_model.GroupedBlock); the head is the decode GEMV too. Prefill
    (T symbolic) keeps DLight's matmuls: none of these kernels."""
    model = _model("rwkv5_2-L4-C128-H2", debug=False, target="cuda", dtype=dtype)  # N = 64: the parallel scan
    decode = _called_kernels(model, "decode")
    layer = ["gemv_ln_mix_cast", "wkv5", "gemv_residual", "gemv_ln_mix_relu2_sigmoid", "gemv_rmul_residual"]
    first = decode.index("gemv_ln_mix_cast")
    for i in range(4):
        got = decode[first + 5 * i: first + 5 * i + 5]
        assert len(got) == 5 and all(g.startswith(want) for g, want in zip(got, layer)), (i, decode)
    assert decode[-1].startswith("gemv_logits"), decode
    assert not any(k.startswith("gemv_") for k in _called_kernels(model, "prefill"))


@pytest.mark.parametrize("k, dtype, parts, kw", [
    (2048, "float16", ((4, 2048, "cast"),), dict(mix=True, ln_eps=1e-5)),  # 1.5B's r/k/v/g
    (144, "float16", ((1, 448, "relu2"), (1, 144, "sigmoid")), dict(mix=True, ln_eps=1e-5)),  # a ragged row
    (7168, "float32", ((1, 2048, "rmul_residual"),), dict(x_shape=(1, 7168))),  # a row split over warps
    (64, "float32", ((1, 50, "logits"),), dict(x_shape=(1, 64))),  # ragged rows
])
def test_decode_gemv_compiles_to_wide_loads_and_warp_sums(k, dtype, parts, kw) -> None:
    """gemv_cuda.decode_gemv_cuda for CUDA (codegen only, no GPU): 16-byte loads of the weight, fp32
    accumulation finished by warp shuffles, a barrier wherever shared memory is handed between warps."""
    import tvm

    from parity.compiled.gemv_cuda import decode_gemv_cuda

    f = decode_gemv_cuda(k, dtype, parts, **kw)
    ex = tvm.compile(tvm.IRModule({"gemv": f.with_attr("global_symbol", "gemv")}), target=build.make_target("cuda"))
    src = "".join(m.inspect_source() for m in (ex.mod if hasattr(ex, "mod") else ex).imports)
    assert ("*(uint4*)(wl_ptr" in src) if dtype == "float16" else ("*(float4*)(wl_ptr" in src), src[-3000:]
    assert "__shfl_down_sync" in src and "float acc_ptr[1]" in src
    assert ("__syncthreads" in src) == (kw.get("mix", False) or k == 7168)


def test_ln_decode_gemv_takes_rows_per_warp_where_they_fill_blocks(monkeypatch) -> None:
    """gemv_cuda.DECODE_ROWS_PER_WARP (codegen only): an "ln" kernel (LayerNorm + lerps + GEMV) whose every part's
    rows fill whole blocks of warps * that many rows is launched on that many times fewer blocks (the block's
    LayerNorm once for all its rows); a part that does not (C = 144) keeps one row a warp. DECODE_MIN_BLOCKS_BY
    puts its number in __launch_bounds__."""
    import re

    import tvm

    from parity.compiled import gemv_cuda

    def grid(k, dtype, parts):
        s = gemv_cuda.decode_gemv_cuda(k, dtype, parts, mix=True, ln_eps=1e-5).script()
        return [int(n) for n in re.findall(r'T.thread_binding\((\d+), thread="blockIdx.x"\)', s)]

    monkeypatch.setattr(gemv_cuda, "DECODE_WARPS", 16)
    monkeypatch.setattr(gemv_cuda, "DECODE_WARPS_BY", {})
    monkeypatch.setattr(gemv_cuda, "DECODE_MIN_BLOCKS_BY", {})
    monkeypatch.setattr(gemv_cuda, "DECODE_GRID_BY", {})  # the persistent grid has its own tests (test_gemv_cuda.py)
    rkvg, kr, ragged = ((2048, "float16", ((4, 2048, "cast"),)),  # 1.5B: one warp a row (8 loads a lane)
                        (2048, "float32", ((1, 7168, "relu2"), (1, 2048, "sigmoid"))),  # 1.5B fp32: two warps a row
                        (144, "float16", ((1, 448, "relu2"), (1, 144, "sigmoid"))))
    monkeypatch.setattr(gemv_cuda, "DECODE_ROWS_PER_WARP", 1)
    assert grid(*rkvg) == [8192 // 16] and grid(*kr) == [9216 // 8] and grid(*ragged) == [37]
    monkeypatch.setattr(gemv_cuda, "DECODE_ROWS_PER_WARP", 4)
    assert grid(*rkvg) == [8192 // 64] and grid(*kr) == [9216 // 32] and grid(*ragged) == [37]
    monkeypatch.setattr(gemv_cuda, "DECODE_MIN_BLOCKS_BY", {"ln": 3})
    f = gemv_cuda.decode_gemv_cuda(*rkvg, mix=True, ln_eps=1e-5)
    ex = tvm.compile(tvm.IRModule({"gemv": f.with_attr("global_symbol", "gemv")}), target=build.make_target("cuda"))
    src = "".join(m.inspect_source() for m in (ex.mod if hasattr(ex, "mod") else ex).imports)
    assert "__launch_bounds__(512, 3)" in src and "__syncthreads" in src
