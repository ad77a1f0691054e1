"""What the compiled model computes in (parity/compiled/common.py says how).

A module of its own, importing nothing: build.py needs it without the model code (a cache hit on
the runtime-only TVM never imports common.py), and common.py needs it without build.py.
"""

DTYPES = ("float32", "float16", "bfloat16")
