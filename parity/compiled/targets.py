"""Which scan kernel each target compiles: the llvm kernels as written, or their CUDA schedules.

The Relax models name one scan kernel per attention class (``Attention.kernel``, the llvm kernel of
wkv5_kernel.py / wkv4_kernel.py, or a bug-zoo kernel). For a CUDA build each of those is paired
with its hand-scheduled CUDA version here; a kernel with no CUDA pair cannot be built for CUDA,
and says so instead of silently compiling the correct kernel in its place.

A CUDA build also dequantises its int8 weights with ``dequant_int8_cuda``: the same arithmetic as
common.py's ``dequant_int8``, written so nvcc cannot fuse it into another rounding (see there).
"""

from __future__ import annotations

from typing import Callable

from tvm import te, tirx

from parity.checkpoint import ModelConfig
from parity.compiled import common, wkv_cuda
from parity.compiled.wkv4_kernel import wkv4
from parity.compiled.wkv5_kernel import wkv5
from parity.errors import ParityError

# (llvm kernel, config -> its CUDA kernel); compared by identity: a PrimFunc object is one kernel.
_CUDA_PAIRS: list[tuple[object, Callable[[ModelConfig], object]]] = []


def register_cuda_kernel(llvm_kernel, make_cuda: Callable[[ModelConfig], object]) -> None:
    _CUDA_PAIRS.append((llvm_kernel, make_cuda))


register_cuda_kernel(wkv5, lambda config: wkv_cuda.wkv5_cuda(config.head_size))
register_cuda_kernel(wkv4, lambda config: wkv_cuda.wkv4_cuda)


def cuda_kernel_for(kernel, config: ModelConfig, *, what: str):
    for llvm_kernel, make in _CUDA_PAIRS:
        if llvm_kernel is kernel:
            return make(config)
    raise ParityError(f"{what} has no CUDA schedule of its scan kernel; it builds for llvm only")


def has_cuda_kernel(kernel) -> bool:
    return any(llvm_kernel is kernel for llvm_kernel, _ in _CUDA_PAIRS)


# Round-to-nearest CUDA intrinsics, per dtype: (multiply, add). nvcc never contracts these into a
# fused multiply-add ("__fmul_rn ... will never be merged into a single multiply-add instruction";
# __hmul_rn / __hadd_rn compile to PTX mul.rn.f16 / add.rn.f16, which ptxas keeps as they are).
_RN = {"float16": ("__hmul_rn", "__hadd_rn"), "float32": ("__fmul_rn", "__fadd_rn")}


def dequant_int8_cuda(q: te.Tensor, mx: te.Tensor, rx: te.Tensor, my: te.Tensor, ry: te.Tensor) -> te.Tensor:
    """common.dequant_int8 for CUDA: ((q + 0.5) * ry * rx + my) + mx, every product and sum rounded to
    the dtype on its own, as the reference does (parity/reference/int8.py: one torch op each).

    Written with ``*`` and ``+``, nvcc contracts ``(t * rx) + my`` into one fused multiply-add
    (SASS HFMA2 in the fp16 build; FFMA in fp32), which rounds once where the reference rounds
    twice: emulated on the fixtures' weights, 13-15 % of them differ (by one rounding of the
    intermediate, up to ~1000 ulp of a weight near zero, where + mx cancels), and on the GPU
    tvm@fp16i8 failed reference@fp16i8 on two fixtures (own error 1.65x and 1.23x the tolerance, benchmarks/results/gpu-2026-11-30-3).
    The same contraction emulated in the reference on the CPU gives 1.30x and 0.75x (from 0.13x
    and 0.11x). The llvm build is compiled without FMA (build.py), so it needs no such care."""
    dt = str(mx.dtype)
    if dt not in _RN:
        raise ValueError(f"no round-to-nearest CUDA intrinsics for {dt}")
    mul_name, add_name = _RN[dt]

    def mul(a, b):
        return tirx.call_pure_extern(dt, mul_name, a, b)

    def add(a, b):
        return tirx.call_pure_extern(dt, add_name, a, b)

    def value(o, i):
        t = add(q[o, i].astype(dt), tirx.const(0.5, dt))
        return add(add(mul(mul(t, ry[i]), rx[o]), my[i]), mx[o])

    return te.compute(q.shape, value, name="dequant_int8")


def retarget_dequant(model) -> int:
    """Give every int8 Linear of ``model`` that dequantises the correct way (common.dequant_int8)
    the CUDA spelling of it; a bug-zoo Linear keeps its own wrong one. Returns how many changed."""
    changed = 0
    for m in common.linears(model):
        if m.quant == "int8" and m.dequant_int8 is common.dequant_int8:
            m.dequant_int8 = dequant_int8_cuda
            changed += 1
    return changed


def retarget(model, *, target: str, what: str) -> None:
    """Give every layer's attention the scan kernel of ``target`` and, for CUDA, every int8 Linear the
    CUDA dequantisation (in place; llvm keeps its own)."""
    if target == "llvm":
        return
    for block in model.blocks:
        block.att.kernel = cuda_kernel_for(type(block.att).kernel, model.config, what=what)
    retarget_dequant(model)
