"""Pure-PyTorch references, one file per model family (rwkv4.py, rwkv5.py)."""

from __future__ import annotations

from parity.errors import ParityError


REFERENCE_DEVICES = ("cpu", "cuda")


def check_reference_device(device: str) -> str:
    """``device`` if the torch reference can run there (``cpu``, or ``cuda`` with a GPU torch can use),
    else a one-line ParityError."""
    if device not in REFERENCE_DEVICES:
        raise ParityError(f"unknown reference device {device!r}; choose one of {', '.join(REFERENCE_DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ParityError(f"no CUDA GPU for the torch reference (torch {torch.__version__} sees none: "
                              "torch.cuda.is_available() is False); run with --reference-device cpu")
    return device


def make_reference(checkpoint, *, dtype: str = "float32", weights: str | None = None, device: str = "cpu"):
    """The reference model for the checkpoint's version (``weights="int8"``: ChatRWKV's int8 weights; ``"q4"``: MLC-LLM's q4f16_1),
    its weights, state and every tensor it makes on ``device`` (``cpu`` or ``cuda``)."""
    from parity.checkpoint import ModelVersion

    if checkpoint.config.version == ModelVersion.V4:
        from parity.reference.rwkv4 import RWKV4Reference

        return RWKV4Reference(checkpoint, dtype=dtype, weights=weights, device=device)
    from parity.reference.rwkv5 import RWKV5Reference

    return RWKV5Reference(checkpoint, dtype=dtype, weights=weights, device=device)
