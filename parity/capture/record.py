"""Record every kernel call of a Relax ``VirtualMachine`` through its instrument hook.

TVM's VM calls an instrument function around every packed call it makes (TIR kernels, library
calls, ``vm.builtin.*``). A compiled kernel is called destination-passing style: its outputs are
the trailing arguments, already allocated, so after the call they hold what it computed. Nothing
in the call says how many trailing arguments are outputs; by default the last one is (one output,
the common case), and ``outputs`` says otherwise per kernel-name pattern, or
``outputs_from_module`` reads it off the IRModule before it is built, when you have it.

Every recorded output is copied at once: the VM reuses its buffers for later kernels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from parity.errors import ParityError


@dataclass(frozen=True)
class KernelCall:
    """One kernel call: its place in the recording, its symbol, and copies of its outputs."""

    index: int  # call order within one recording, from 0
    symbol: str
    outputs: tuple[np.ndarray, ...]

    def shape(self, k: int = 0) -> tuple[int, ...]:
        return tuple(self.outputs[k].shape)


def outputs_from_module(mod) -> dict[str, list[int]]:
    """Kernel name -> indices of the arguments it writes, from an IRModule *after* lowering to TIR
    (e.g. after your relax pipeline, before ``tvm.compile``): the stores in each PrimFunc say which
    buffers are outputs. Pass the result as ``KernelRecorder(..., outputs=...)``."""
    from parity.compiled.build import _kernel_outputs  # the same reading our own build records

    return _kernel_outputs(mod)


class KernelRecorder:
    """Wraps a ``tvm.runtime.vm.VirtualMachine``; ``with rec.recording() as calls:`` records every
    kernel call made inside the block into ``calls`` (a list of ``KernelCall``).

    ``outputs``: kernel-name pattern (fnmatch) or exact name -> the number of trailing arguments
    that are outputs (an int), or the argument indices (a list). Unlisted kernels: the last one.
    ``skip``: symbol patterns not recorded (by default the VM's own builtins, e.g. allocation,
    reshape views, the RNN state's get/set; record those by passing ``skip=()``).
    """

    def __init__(
        self,
        vm,
        *,
        outputs: Mapping[str, int | Sequence[int]] | None = None,
        skip: Sequence[str] = ("vm.builtin.*",),
    ):
        if not hasattr(vm, "set_instrument"):
            raise ParityError(f"KernelRecorder needs a tvm.runtime.vm.VirtualMachine, got {type(vm).__name__}")
        self.vm = vm
        self.outputs = dict(outputs or {})
        self.skip = tuple(skip)
        self._active: list[KernelCall] | None = None

    def _output_indices(self, symbol: str, n_args: int) -> list[int]:
        spec = self.outputs.get(symbol)
        if spec is None:
            spec = next((v for k, v in self.outputs.items() if fnmatchcase(symbol, k)), 1)
        if isinstance(spec, int):
            return list(range(max(n_args - spec, 0), n_args))
        return [i for i in spec if i < n_args]

    def _hook(self, func, symbol, before_run, ret_value, *args):
        from tvm.runtime.vm import VMInstrumentReturnKind

        symbol = str(symbol)
        if before_run or self._active is None or any(fnmatchcase(symbol, p) for p in self.skip):
            return VMInstrumentReturnKind.NO_OP
        outs = tuple(
            args[i].numpy().copy() for i in self._output_indices(symbol, len(args)) if hasattr(args[i], "numpy")
        )
        if outs:
            self._active.append(KernelCall(index=len(self._active), symbol=symbol, outputs=outs))
        return VMInstrumentReturnKind.NO_OP

    @contextmanager
    def recording(self) -> Iterator[list[KernelCall]]:
        """Record the kernel calls of every VM function called inside the block, in order."""
        from tvm.runtime.vm import VMInstrumentReturnKind

        if self._active is not None:
            raise ParityError("KernelRecorder.recording() blocks cannot nest")
        calls: list[KernelCall] = []
        self._active = calls
        self.vm.set_instrument(self._hook)
        try:
            yield calls
        finally:
            self._active = None
            # Back to a no-op: an instrument left installed would slow every later call.
            self.vm.set_instrument(lambda *a: VMInstrumentReturnKind.NO_OP)
