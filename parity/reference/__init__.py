"""Pure-PyTorch references, one file per model family (rwkv4.py, rwkv5.py)."""

from __future__ import annotations


def make_reference(checkpoint, *, dtype: str = "float32", weights: str | None = None):
    """The reference model for the checkpoint's version (``weights="int8"``: ChatRWKV's int8 weights; ``"q4"``: MLC-LLM's q4f16_1)."""
    from parity.checkpoint import ModelVersion

    if checkpoint.config.version == ModelVersion.V4:
        from parity.reference.rwkv4 import RWKV4Reference

        return RWKV4Reference(checkpoint, dtype=dtype, weights=weights)
    from parity.reference.rwkv5 import RWKV5Reference

    return RWKV5Reference(checkpoint, dtype=dtype, weights=weights)
