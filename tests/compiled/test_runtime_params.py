"""A low-precision build's parameters made from numpy (a torch-free worker) are the ones made from torch.

parity/compiled/runtime.py's ``_low_precision_param`` divides by the rescale factor and rounds to
fp16 with numpy when the weights are numpy arrays (parity.checkpoint.MappedCheckpoint), with torch
otherwise. Both are IEEE: the same bits for every fp32 input, subnormals, ties, overflow included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from parity.compiled.runtime import CompiledRWKV


def _bare_model() -> CompiledRWKV:
    model = CompiledRWKV.__new__(CompiledRWKV)  # only what _low_precision_param reads
    model.target, model.device = "llvm", tvm.cpu()
    return model


@pytest.mark.parametrize("scale", [1.0, 4.0, 0.5])
def test_fp16_params_from_numpy_and_from_torch_are_bit_identical(scale):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 16, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.abs(values) < 1e30]  # finite (load_checkpoint refuses NaN/Inf), and / 0.5 stays finite
    edges = np.array([65504.0, 65519.99, 65520.0, 1e9, -1e9, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14,
                      1 + 2.0**-11, 1 + 3 * 2.0**-11, -0.0, 0.0], dtype=np.float32)  # overflow, subnormal, ties
    weight = np.concatenate([values, edges]).reshape(-1, 1)
    model = _bare_model()
    from_numpy = model._low_precision_param(weight, dtype="float16", scale=scale).numpy()
    from_torch = model._low_precision_param(torch.from_numpy(weight.copy()), dtype="float16", scale=scale).numpy()
    assert from_numpy.dtype == np.float16 and from_numpy.shape == weight.shape
    assert np.array_equal(from_numpy.view(np.uint16), from_torch.view(np.uint16))
