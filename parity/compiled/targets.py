"""Which scan kernel each target compiles: the llvm kernels as written, or their CUDA schedules.

The Relax models name one scan kernel per attention class (``Attention.kernel``, the llvm kernel of
wkv5_kernel.py / wkv4_kernel.py, or a bug-zoo kernel). For a CUDA build each of those is paired
with its hand-scheduled CUDA version here; a kernel with no CUDA pair cannot be built for CUDA,
and says so instead of silently compiling the correct kernel in its place.
"""

from __future__ import annotations

from typing import Callable

from parity.checkpoint import ModelConfig
from parity.compiled import wkv_cuda
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


def retarget(model, *, target: str, what: str) -> None:
    """Give every layer's attention the scan kernel of ``target`` (in place; llvm keeps its own)."""
    if target == "llvm":
        return
    for block in model.blocks:
        block.att.kernel = cuda_kernel_for(type(block.att).kernel, model.config, what=what)
