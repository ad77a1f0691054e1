"""Quantisation bugs injected into the TVM model (the quant mutants of parity/mutants/quant.py).

Each is the real quantised build (parity/compiled/common.py's ``Linear`` under a scheme) with a
wrong dequantisation function put on some of its Linears; every other kernel is the real one.
"""

from __future__ import annotations

from tvm import te, tirx

from parity.compiled.common import Q4_GROUP, Q4_MAX_INT, Q4_PER_WORD, linears
from parity.compiled.rwkv5_model import RWKV5Model


def dequant_int8_scales_swapped(q: te.Tensor, mx: te.Tensor, rx: te.Tensor, my: te.Tensor, ry: te.Tensor) -> te.Tensor:
    dt = mx.dtype
    # BUG: ry is per input row and rx per output column; here each is indexed by the other axis.
    return te.compute(
        q.shape, lambda o, i: ((q[o, i].astype(dt) + tirx.const(0.5, dt)) * ry[o] * rx[i] + my[i]) + mx[o],
        name="dequant_int8",
    )


def dequant_q4_group_off_by_one(q: te.Tensor, scale: te.Tensor, *, in_features: int) -> te.Tensor:
    dt = scale.dtype

    def value(o, i):
        shift = ((i % Q4_PER_WORD) * 4).astype("uint32")
        code = (q[o, i // Q4_PER_WORD] >> shift) & tirx.const(0xF, "uint32")
        # BUG: the scale of the previous group (group 0 clamped to itself).
        g = tirx.max(i // Q4_GROUP - 1, 0)
        return (code.astype(dt) - tirx.const(Q4_MAX_INT, dt)) * scale[o, g]

    return te.compute((q.shape[0], in_features), value, name="dequant_q4")


class _Int8ScalesSwappedModel(RWKV5Model):
    def __init__(self, config, *, debug: bool = False, dtype: str = "fp16i8"):
        super().__init__(config, debug=debug, dtype=dtype)
        for lin in linears(self):
            if lin.in_features == lin.out_features:  # both index orders in bounds
                lin.dequant_int8 = dequant_int8_scales_swapped


class _Q4GroupOffByOneModel(RWKV5Model):
    def __init__(self, config, *, debug: bool = False, dtype: str = "q4f16_1"):
        super().__init__(config, debug=debug, dtype=dtype)
        for lin in linears(self):
            lin.dequant_q4 = dequant_q4_group_off_by_one


MODELS: dict = {
    "int8-scales-swapped": _Int8ScalesSwappedModel,
    "q4-group-off-by-one": _Q4GroupOffByOneModel,
}
