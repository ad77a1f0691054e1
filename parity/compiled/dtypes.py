"""What the compiled model computes in (parity/compiled/common.py says how).

A module of its own, importing nothing: build.py needs it without the model code (a cache hit on
the runtime-only TVM never imports common.py), and common.py needs it without build.py.

Beside the three float dtypes, the quantisation schemes: weights stored quantised, dequantised by
the compiled graph at every call, activations in the scheme's float dtype (QUANT_SCHEMES).
"""

# scheme -> (activation dtype, weight format): fp32i8 / fp16i8 are ChatRWKV's int8 strategies
# (parity/reference/int8.py), q4f16_1 is MLC-LLM's 4-bit group quantisation (parity/reference/q4.py).
QUANT_SCHEMES = {"fp32i8": ("float32", "int8"), "fp16i8": ("float16", "int8"), "q4f16_1": ("float16", "q4")}

DTYPES = ("float32", "float16", "bfloat16", *QUANT_SCHEMES)


def split_scheme(dtype: str) -> tuple[str, str | None]:
    """``fp16i8`` -> (``float16``, ``int8``); a plain float dtype -> (itself, None)."""
    return QUANT_SCHEMES.get(dtype, (dtype, None))
