"""KernelRecorder on a real Relax VM: every kernel call, in order, with copies of its outputs."""

from __future__ import annotations

import numpy as np
import pytest

from parity.capture import KernelRecorder
from parity.errors import ParityError


@pytest.fixture(scope="module")
def vm():
    import tvm
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op
    from tvm.runtime.vm import VirtualMachine

    class Tiny(nn.Module):
        def forward(self, x):
            y = op.exp(x)
            return op.multiply(y, y) + x  # three kernels: exp, multiply, add

    mod, _ = Tiny().export_tvm(spec={"forward": {"x": nn.spec.Tensor([2, 3], "float32"),
                                                 "$": {"param_mode": "plain", "effect_mode": "none"}}})
    return VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())


def test_every_kernel_call_is_recorded_in_order_with_its_output(vm) -> None:
    import tvm

    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 6
    rec = KernelRecorder(vm)
    with rec.recording() as calls:
        out = vm["forward"](tvm.runtime.tensor(x)).numpy()
    kinds = [c.symbol.rstrip("0123456789") for c in calls]
    assert kinds == ["tir_exp", "multiply", "add"], [c.symbol for c in calls]  # TVM names exp tir_exp
    assert [c.index for c in calls] == [0, 1, 2]
    # Each output is what that kernel computed (copied at once, not a buffer reused later).
    np.testing.assert_allclose(calls[0].outputs[0], np.exp(x), rtol=1e-6)
    np.testing.assert_allclose(calls[1].outputs[0], np.exp(x) ** 2, rtol=1e-6)
    np.testing.assert_array_equal(calls[2].outputs[0], out)
    # Outside a recording nothing is recorded: the hook is a no-op again.
    vm["forward"](tvm.runtime.tensor(x))
    assert len(calls) == 3


def test_skip_and_output_counts(vm) -> None:
    import tvm

    x = tvm.runtime.tensor(np.ones((2, 3), np.float32))
    with KernelRecorder(vm, skip=("vm.builtin.*", "tir_exp*")).recording() as calls:
        vm["forward"](x)
    assert [c.symbol.rstrip("0123456789") for c in calls] == ["multiply", "add"]
    # Two trailing arguments of add are (x, out): recorded as outputs 0 and 1 when asked.
    with KernelRecorder(vm, outputs={"add*": 2}).recording() as calls:
        vm["forward"](x)
    assert len(calls[-1].outputs) == 2


def test_recordings_do_not_nest_and_a_non_vm_is_refused(vm) -> None:
    rec = KernelRecorder(vm)
    with rec.recording():
        with pytest.raises(ParityError, match="cannot nest"):
            with rec.recording():
                pass
    with pytest.raises(ParityError, match="needs a tvm.runtime.vm.VirtualMachine"):
        KernelRecorder(object())


def test_outputs_read_from_the_lowered_module_drive_the_recorder() -> None:
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op
    from tvm.runtime.vm import VirtualMachine

    from parity.capture import outputs_from_module

    class Tiny(nn.Module):
        def forward(self, x):
            return op.multiply(op.exp(x), x)

    mod, _ = Tiny().export_tvm(spec={"forward": {"x": nn.spec.Tensor([2, 3], "float32"),
                                                 "$": {"param_mode": "plain", "effect_mode": "none"}}})
    target = tvm.target.Target("llvm")
    with target:
        lowered = relax.get_default_pipeline(target)(mod)
    outputs = outputs_from_module(lowered)
    # This pipeline fuses exp and multiply into one kernel of (x, out): its output is argument 1.
    assert list(outputs.values()) == [[1]], outputs
    vm = VirtualMachine(tvm.compile(lowered, target=target, relax_pipeline=None), tvm.cpu())
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    with KernelRecorder(vm, outputs=outputs).recording() as calls:
        vm["forward"](tvm.runtime.tensor(x))
    assert [c.symbol for c in calls] == list(outputs)
    np.testing.assert_allclose(calls[0].outputs[0], np.exp(x) * x, rtol=1e-6)
