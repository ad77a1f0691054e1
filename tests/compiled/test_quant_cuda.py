"""The int8 dequantisation of a CUDA build rounds where the reference rounds.

nvcc contracts ``a * b + c`` into one fused multiply-add (one rounding) unless told otherwise, and
the reference (parity/reference/int8.py: one torch op per step on the CPU) rounds every product and
sum on its own. With common.py's ``*`` / ``+`` spelling, the fp16i8 CUDA build's dequantisation ran
an HFMA2 at ``(t * rx) + my``: 13-15 % of the weights off (emulated), and tvm@fp16i8 failed reference@fp16i8 on the GPU
on two fixtures (benchmarks/results/gpu-2026-11-30-3). targets.py gives CUDA builds
``dequant_int8_cuda`` instead. Here: the PTX nvcc makes of it (the property the GPU relies on),
that CUDA builds use it, and that a build's dequant kernels give the reference's weights bit for
bit (on llvm here; tests/compiled/test_gpu.py runs the same check on the GPU).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
# PTX floating-point arithmetic: add.f16, mul.rn.f32, fma.rn.f32, add.rn.f16x2 ...
_FLOAT_OP = re.compile(r"\b((?:add|sub|mul|fma|mad|neg)(?:\.\w+)*\.(?:f16x2|f16|bf16|f32|f64))\b")


def _ptx_float_ops(fns: dict) -> dict[str, list[str]]:
    """name -> the floating-point PTX instructions nvcc makes of that dequantisation, on a small
    (64, 48) weight, in each kernel's own dtype (name: <label>_<dtype>)."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    from parity.compiled.build import make_target
    from parity.compiled.cuda import ARCH, cuda_sources, nvcc_path

    funcs = {}
    for name, (fn, dtype) in fns.items():
        q = te.placeholder((64, 48), "uint8", "q")
        mx, rx = te.placeholder((64,), dtype, "mx"), te.placeholder((64,), dtype, "rx")
        my, ry = te.placeholder((48,), dtype, "my"), te.placeholder((48,), dtype, "ry")
        funcs[name] = te.create_prim_func([q, mx, rx, my, ry, fn(q, mx, rx, my, ry)]).with_attr("global_symbol", name)
    target = make_target("cuda")
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(tvm.IRModule(funcs))  # as build.py's CUDA pipeline ends
    (src,) = cuda_sources(tvm.compile(mod, target=target).mod)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="parity-ptx-") as tmp:
        cu, ptx = Path(tmp) / "k.cu", Path(tmp) / "k.ptx"
        cu.write_text(src)
        # build.py's nvcc call (cuda.py) but stopping at PTX: the fma contraction of f32 happens
        # here already; for f16 the PTX says whether ptxas may still fuse (an op with no .rn may be).
        subprocess.run([nvcc_path(), "--ptx", "-O3", f"-arch={ARCH}", "-o", str(ptx), str(cu)], check=True,
                       capture_output=True)
        text = ptx.read_text()
    out = {}
    for name in fns:
        body = re.search(r"\.entry %s_kernel\(.*?(?=\.entry|\Z)" % name, text, re.S)
        assert body, f"no kernel {name} in the PTX"
        out[name] = _FLOAT_OP.findall(body.group(0))
    return out


def test_cuda_dequant_int8_rounds_every_step_in_ptx():
    """Every product and sum of the CUDA dequantisation is a PTX add/mul with an explicit .rn: the
    PTX ISA lets the code generator fuse a mul and an add only when they carry no rounding
    modifier, so each of the five steps rounds on its own — (q + 0.5), * ry, * rx, + my, + mx —
    as the reference's five torch ops do. common.py's spelling, the one CUDA builds had, fails it
    (fp16: mul.f16 / add.f16 that ptxas fused into HFMA2; fp32: nvcc's own fma.rn.f32)."""
    from parity.compiled import common, targets
    from parity.compiled.cuda import nvcc_path

    if nvcc_path() is None:
        pytest.skip("no nvcc here")
    fns = {f"{label}_{dtype}": (fn, dtype) for label, fn in (("common", common.dequant_int8), ("cuda", targets.dequant_int8_cuda))
           for dtype in ("float16", "float32")}
    ops = _ptx_float_ops(fns)

    def rounds_every_step(found: list[str]) -> bool:
        return len(found) == 5 and all(op.split(".")[0] in ("add", "mul") and ".rn." in op for op in found)

    for dtype in ("float16", "float32"):
        assert rounds_every_step(ops[f"cuda_{dtype}"]), ops[f"cuda_{dtype}"]
        # The check can fail: the plain spelling leaves nvcc free to fuse (or fuses already).
        assert not rounds_every_step(ops[f"common_{dtype}"]), ops[f"common_{dtype}"]
    assert "fma.rn.f32" in ops["common_float32"] and "mul.f16" in ops["common_float16"]


def test_cuda_builds_dequantise_with_the_cuda_spelling():
    """model_for(target="cuda") puts dequant_int8_cuda on every int8 Linear; llvm keeps common.py's
    (its target has no FMA); a bug-zoo Linear keeps its own wrong dequantisation on CUDA too."""
    from parity.compiled import common
    from parity.compiled.build import model_for
    from parity.compiled.common import linears
    from parity.compiled.targets import dequant_int8_cuda
    from parity.mutants.quant_models import dequant_int8_scales_swapped

    cfg = load_checkpoint(FIXTURES / "rwkv5_2-L2-C144-H12.pth").config
    for dtype in ("fp16i8", "fp32i8"):
        cuda = linears(model_for(cfg, debug=True, target="cuda", dtype=dtype))
        assert len(cuda) == 2 * 8 + 1 and all(lin.dequant_int8 is dequant_int8_cuda for lin in cuda)
        assert all(lin.dequant_int8 is common.dequant_int8 for lin in linears(model_for(cfg, debug=True, dtype=dtype)))
    zoo = linears(model_for(cfg, debug=True, target="cuda", mutant="int8-scales-swapped"))
    wrong = [lin for lin in zoo if lin.dequant_int8 is dequant_int8_scales_swapped]
    assert wrong and all(lin.dequant_int8 is dequant_int8_cuda for lin in zoo if lin not in wrong)
    rwkv4 = load_checkpoint(FIXTURES / "rwkv4-L2-C64.pth").config
    model = model_for(rwkv4, debug=True, target="cuda", dtype="fp16i8")
    assert all(lin.dequant_int8 is dequant_int8_cuda for block in model.blocks for part in (block.att, block.ffn)
               for lin in vars(part).values() if isinstance(lin, common.Linear))


def dequant_mismatches(ck, art, device) -> dict[str, int]:
    """Run each dequant_int8 kernel of a built int8 model on the reference's codes of every weight
    of its shape, on ``device``: checkpoint key -> how many elements differ (bitwise) from the
    reference's dequantised weight (parity/reference/int8.py, in the build's activation dtype)."""
    import torch
    import tvm

    from parity.compiled.dtypes import split_scheme
    from parity.compiled.runtime import quantized_parts
    from parity.reference import int8

    dtype, weights = split_scheme(art.meta["dtype"])
    assert weights == "int8", art.meta["dtype"]
    lib = tvm.runtime.load_module(str(art.library))
    kernels = sorted(k for k in art.meta["kernel_outputs"] if k.startswith("dequant_int8"))
    fp32 = ck.fp32_weights()
    out = {}
    for key in int8.quantized_keys(fp32):
        w = fp32[key].float()
        parts = quantized_parts(w, weights="int8", dtype=dtype)
        want = int8.dequantize(int8.quantize(w), dtype=getattr(torch, dtype)).numpy()
        args = [tvm.runtime.tensor(parts[p], device) for p in ("q", "mx", "rx", "my", "ry")]
        got = None
        for name in kernels:  # one kernel per weight shape (TVM shares one among same-shaped Linears)
            res = tvm.runtime.empty(want.shape, dtype, device)
            try:
                lib.get_function(name, query_imports=True)(*args, res)
            except Exception:  # noqa: BLE001 - another shape's kernel refuses these arguments
                continue
            got = res.numpy()
            break
        assert got is not None, f"no dequant kernel of the build takes {key} {tuple(want.shape)}"
        out[key] = int(np.count_nonzero(got.view(np.uint16 if dtype == "float16" else np.uint32)
                                        != want.view(np.uint16 if dtype == "float16" else np.uint32)))
    return out


def test_llvm_dequant_kernels_equal_the_reference_bit_for_bit(compile_cache: Path):
    """The same check the GPU test makes, on the llvm build test_quant.py builds (no FMA: equal)."""
    import tvm

    from parity.compiled.build import build_model

    ck = load_checkpoint(FIXTURES / "rwkv5_2-L2-C144-H12.pth")
    art = build_model(ck.config, variant="debug", cache_dir=compile_cache, dtype="fp16i8")
    found = dequant_mismatches(ck, art, tvm.cpu())
    assert len(found) == 2 * 8 + 1 and not any(found.values()), found
