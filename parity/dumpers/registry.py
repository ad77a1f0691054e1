"""Backend names -> backend objects: the one place that knows every backend.

It sits above the modules it names (backends, hf, official, plugin, the mutants), which import
only the ``Backend`` base from parity.dumpers.backends; nothing they import comes back here, so
the arrows point one way: session -> registry -> backends.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from parity.checkpoint import Checkpoint
from parity.dumpers.backends import Backend, ReferenceBackend, TVMDebugBackend, TVMInstrumentedBackend
from parity.dumpers.quiet import known_tvm_warnings_hidden
from parity.errors import ParityError

__all__ = ["BACKEND_NAMES", "check_backend_spec", "did_you_mean", "dump_dir_name", "make_backend", "spec_weights",
           "split_dtype"]

BACKEND_NAMES = ("reference", "tvm", "tvm-instrumented", "chatrwkv", "hf")

# ``NAME@DTYPE`` picks the precision a backend computes in: ``tvm@fp16``, ``reference@bf16``. "@"
# because ":" already means a plug-in (module:attribute) and "/" a mutant, and neither a Python
# module path nor a backend name can contain it. The dtypes each backend runs:
BACKEND_DTYPES = {
    "reference": ("float32", "float16", "bfloat16", "float64"),
    "tvm": ("float32", "float16", "bfloat16"),
    "chatrwkv": ("float32", "float16", "bfloat16"),
}
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
# ChatRWKV's int8 strategies: uint8 weights (parity/reference/int8.py), activations in the dtype;
# the compiled variant dequantises the same codes in its graph (parity/compiled/common.py).
INT8_WORDS = {"fp32i8": "float32", "fp16i8": "float16"}
INT8_BACKENDS = ("reference", "chatrwkv", "tvm")
# MLC-LLM's q4f16_1: 4-bit groups of 32, fp16 scales and activations (parity/reference/q4.py). The
# official package has no 4-bit strategy, so chatrwkv does not run it.
Q4_WORDS = {"q4f16_1": "float16"}
Q4_BACKENDS = ("reference", "tvm")
# word -> the weight format the reference and the replay are told (ReferenceBackend's ``weights``).
WEIGHT_FORMATS = {**{w: "int8" for w in INT8_WORDS}, **{w: "q4" for w in Q4_WORDS}}


def split_dtype(spec: str) -> tuple[str, str | None]:
    """``tvm@fp16`` -> (``tvm``, ``float16``); a spec without ``@`` -> (spec, None). Refuses a dtype
    the backend does not run (or any on a backend that runs only its own), in one line."""
    if "@" not in spec:
        return spec, None
    from parity.compare.tolerance import canonical_dtype

    base, _, word = spec.rpartition("@")
    if not base or not word:
        raise ParityError(f"bad backend {spec!r}: write NAME@DTYPE, e.g. tvm@fp16")
    check_backend_spec(base)  # an unknown name is named as such first
    if word in INT8_WORDS:
        if base not in INT8_BACKENDS:
            raise ParityError(f"bad backend {spec!r}: int8 weights are built for {', '.join(INT8_BACKENDS)}")
        return base, INT8_WORDS[word]
    if word in Q4_WORDS:
        if base not in Q4_BACKENDS:
            raise ParityError(f"bad backend {spec!r}: q4f16_1 weights are built for {', '.join(Q4_BACKENDS)}")
        return base, Q4_WORDS[word]
    try:
        dtype = canonical_dtype(word)
    except ParityError:
        raise ParityError(f"bad backend {spec!r}: unknown dtype {word!r}; write fp32, fp16, bf16 or fp64 "
                          f"(or a quantisation: {', '.join(WEIGHT_FORMATS)})") from None
    allowed = BACKEND_DTYPES.get(base)
    if allowed is None:
        what = "a mutant computes in its own dtype" if base.startswith("mutant/") else f"{base!r} runs in one dtype only"
        raise ParityError(f"bad backend {spec!r}: {what}; a dtype can be given to {', '.join(BACKEND_DTYPES)}")
    if dtype not in allowed:
        raise ParityError(f"bad backend {spec!r}: {base} runs {', '.join(_SHORT[d] for d in allowed)}")
    return base, dtype


def spec_dtype(spec: str) -> str | None:
    """The dtype a spec asks for (None: the backend's own)."""
    return split_dtype(spec)[1]


def spec_weights(spec: str) -> str | None:
    """The quantised weight format a spec asks for (``int8``, ``q4``), or None: ``tvm@q4f16_1`` -> ``q4``.
    What a judge of that backend's stages must quantise its reference with (the replay, the isolated judge)."""
    if "@" not in spec:
        return None
    split_dtype(spec)
    return WEIGHT_FORMATS.get(spec.rpartition("@")[2])


def did_you_mean(word: str, choices) -> str:
    """``; did you mean 'x'?`` for a near miss among ``choices``, else ``''``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _mutant(name: str):
    from parity.mutants import CATALOGUE, GPU_CATALOGUE, get_mutant

    if name not in CATALOGUE and name not in GPU_CATALOGUE:
        raise ParityError(f"unknown mutant {name!r}{did_you_mean(name, CATALOGUE)} (parity selftest --list names them)")
    return get_mutant(name)


def check_backend_spec(spec: str) -> None:
    """Refuse an unknown backend name before anything runs (mutants and plugins checked by form)."""
    if "@" in spec:
        split_dtype(spec)
        return
    if spec.startswith("mutant/"):
        _mutant(spec.split("/", 1)[1])
        return
    if spec in BACKEND_NAMES or (":" in spec and not spec.startswith(":")):
        return
    hint = did_you_mean(spec, BACKEND_NAMES) or did_you_mean(spec, [f"mutant/{n}" for n in _mutant_names()])
    raise ParityError(
        f"unknown backend {spec!r}{hint}; choose from {', '.join(BACKEND_NAMES)}, mutant/<name> or module:attribute"
    )


def _mutant_names() -> list[str]:
    from parity.mutants import CATALOGUE

    return list(CATALOGUE)


def dump_dir_name(spec: str) -> str:
    # "@" stays: "tvm@fp16" is a plain file name, and "reference-fp64" is the arbiter's own dump.
    return spec.replace("/", "-").replace(":", "-").replace("\\", "-")


def make_backend(
    spec: str, checkpoint: Checkpoint, *, cache_dir: Path | None = None, on_event=None, target: str = "llvm",
    repeat: bool = False,
) -> Backend:
    """``reference``, ``tvm`` (debug build), ``tvm-instrumented`` (plain build + VM hook), ``chatrwkv``,
    ``hf`` (v4), ``mutant/<name>`` (the bug zoo), or ``package.module:attribute`` (your own; see
    docs/backends.md). Built with TVM's known-harmless compile warning filtered (parity.dumpers.quiet)."""
    check_backend_spec(spec)
    with known_tvm_warnings_hidden():
        return _make_backend(spec, checkpoint, cache_dir=cache_dir, on_event=on_event, target=target, repeat=repeat)


def _make_backend(spec: str, checkpoint: Checkpoint, *, cache_dir, on_event, target: str, repeat: bool) -> Backend:
    if "@" in spec:
        base, dtype = split_dtype(spec)
        word = spec.rpartition("@")[2]
        weights = WEIGHT_FORMATS.get(word)
        if base == "reference":
            return ReferenceBackend(checkpoint, dtype=dtype, name=spec, weights=weights)
        if base == "tvm":
            # A quantised build is its own compiled variant: the scheme word is its build dtype.
            return TVMDebugBackend(checkpoint, target=target, cache_dir=cache_dir, on_event=on_event, repeat=repeat,
                                   dtype=word if weights else dtype)
        from parity.dumpers.official import ChatRWKVBackend

        return ChatRWKVBackend(checkpoint, dtype=dtype, name=spec, weights=weights)
    if spec.startswith("mutant/"):
        m = _mutant(spec.split("/", 1)[1])
        if m.side == "reference":
            from parity.mutants.reference import REFERENCES

            return ReferenceBackend(checkpoint, model=REFERENCES[m.name](checkpoint, dtype=m.dtype), name=spec, dtype=m.dtype)
        return TVMDebugBackend(
            checkpoint, target=target, cache_dir=cache_dir, on_event=on_event, mutant=m.name, repeat=repeat or m.repeat_check
        )
    if ":" in spec:
        from parity.dumpers.plugin import load_plugin_backend

        return load_plugin_backend(spec, checkpoint)
    if spec == "reference":
        return ReferenceBackend(checkpoint)
    if spec == "tvm":
        return TVMDebugBackend(checkpoint, target=target, cache_dir=cache_dir, on_event=on_event, repeat=repeat)
    if spec == "tvm-instrumented":
        return TVMInstrumentedBackend(checkpoint, target=target, cache_dir=cache_dir, on_event=on_event)
    if spec == "chatrwkv":
        from parity.dumpers.official import ChatRWKVBackend

        return ChatRWKVBackend(checkpoint)
    from parity.dumpers.hf import HFBackend  # the last name check_backend_spec lets through

    return HFBackend(checkpoint)
