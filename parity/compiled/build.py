"""Compile the Relax RWKV model with TVM and keep the result in a compile cache.

The cache key covers everything that changes the binary: the model config, the source of the
model and kernel files, the build variant (plain / debug), the target, the pass pipeline and the
TVM version. A cache entry is the exported shared library plus a JSON sidecar with what a
runner needs to call it (parameter order, state slot order, debug tap names, which arguments of
each kernel are outputs); a warm run loads the .so and compiles nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tvm
from tvm import relax

from parity.checkpoint import ModelConfig, ModelVersion
from parity.compiled import common, rwkv4_model, rwkv5_model, wkv4_kernel, wkv5_kernel
from parity.errors import ParityError

CACHE_SCHEMA = 3  # 3: isolated entry points and their taps (function_taps)
PIPELINE_ID = "FuseTransposeMatmul+default"
VARIANTS = ("plain", "debug")

_TARGETS = {
    "llvm": {"kind": "llvm"},
    "cuda": {"kind": "cuda", "arch": "sm_90a"},
}


def default_cache_dir() -> Path:
    env = os.environ.get("PARITY_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rwkv-parity"


def make_target(name: str) -> tvm.target.Target:
    if name not in _TARGETS:
        raise ParityError(f"unknown target {name!r}; choose one of {', '.join(_TARGETS)}")
    spec = dict(_TARGETS[name])
    if name == "llvm":
        spec["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target(spec)


def model_for(config: ModelConfig, *, debug: bool, mutant: str | None = None):
    """The Relax module of the checkpoint's family: one file per family (rwkv4 / rwkv5).

    ``mutant`` names a deliberately broken model from the bug zoo (parity/mutants/)."""
    if mutant is not None:
        from parity.mutants import get_mutant
        from parity.mutants.compiled import MODELS

        m = get_mutant(mutant)
        if m.side != "compiled":
            raise ParityError(f"mutant {mutant!r} breaks the {m.side}, not the compiled model")
        return MODELS[mutant](config, debug=debug)
    if config.version == ModelVersion.V4:
        return rwkv4_model.RWKV4Model(config, debug=debug)
    return rwkv5_model.RWKV5Model(config, debug=debug)


# Every source whose text shapes the binary; a change to any of them is a new cache key.
_SOURCES = (common, rwkv4_model, rwkv5_model, wkv4_kernel, wkv5_kernel)


@dataclass(frozen=True)
class BuildArtifact:
    library: Path
    meta: dict  # the sidecar: params, state_slots, tap_names, kernel_outputs, timings
    cached: bool  # True when loaded from the cache without compiling


def cache_key(*, config: ModelConfig, variant: str, target: str, mutant: str | None = None) -> str:
    h = hashlib.sha256()
    if mutant is not None:
        from parity.mutants import compiled as mutant_models, kernels as mutant_kernels

        for part in (f"mutant={mutant}", Path(mutant_models.__file__).read_text(), Path(mutant_kernels.__file__).read_text()):
            h.update(part.encode())
            h.update(b"\0")
    for part in (
        f"schema={CACHE_SCHEMA}",
        json.dumps(config.to_dict(), sort_keys=True),
        *(Path(m.__file__).read_text() for m in _SOURCES),
        Path(__file__).read_text(),  # the pipeline is defined here
        f"variant={variant}",
        json.dumps(_TARGETS[target], sort_keys=True),
        f"pipeline={PIPELINE_ID}",
        f"tvm={tvm.__version__}",
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


_STORE = re.compile(r"^\s*(\w+)\[[^\n]*\]\s*=", re.M)
_WRITES = re.compile(r"T\.writes\(([^\n]*)\)")


def _kernel_outputs(mod: tvm.IRModule) -> dict[str, list[int]]:
    """Kernel name -> indices of the arguments it writes (its outputs).

    The VM instrument hook sees a kernel's outputs only as trailing arguments, with no count.
    The printed TIR says which buffers each kernel stores into; those are its outputs.
    """
    out: dict[str, list[int]] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        text = func.script()
        written = set(_STORE.findall(text))
        for group in _WRITES.findall(text):
            written.update(re.findall(r"(\w+)\[", group))
        names = [getattr(p, "name", None) or str(p) for p in func.params]
        idx = [i for i, n in enumerate(names) if n in written]
        out[gv.name_hint] = idx or [len(names) - 1]
    return out


_SIDECAR_FIELDS = ("params", "state_slots", "state_shapes", "state_fill", "tap_names", "function_taps", "kernel_outputs")


def _read_sidecar(path: Path) -> dict | None:
    """The cache entry's metadata, or None when it is missing, damaged or from another schema."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("cache_schema") != CACHE_SCHEMA:
        return None
    if any(field not in meta for field in _SIDECAR_FIELDS):
        return None
    return meta


def build_model(
    config: ModelConfig,
    *,
    variant: str = "plain",
    target: str = "llvm",
    cache_dir: Path | None = None,
    on_event: Callable[[str], None] | None = None,
    mutant: str | None = None,
) -> BuildArtifact:
    """Return the compiled model for ``config``, compiling only on a cache miss."""
    if variant not in VARIANTS:
        raise ParityError(f"unknown build variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if target not in _TARGETS:
        raise ParityError(f"unknown target {target!r}; choose one of {', '.join(_TARGETS)}")
    say = on_event or (lambda msg: None)
    cache_dir = Path(cache_dir or default_cache_dir())
    key = cache_key(config=config, variant=variant, target=target, mutant=mutant)
    family = "rwkv4" if config.version == ModelVersion.V4 else "rwkv5"
    if mutant:
        family += f"-mutant-{mutant}"
    lib_path = cache_dir / f"{family}-{variant}-{target}-{key}.so"
    meta_path = lib_path.with_suffix(".json")
    meta = _read_sidecar(meta_path) if lib_path.exists() else None
    if meta is not None:
        say(f"compile cache hit: {lib_path.name}")
        return BuildArtifact(library=lib_path, meta=meta, cached=True)

    say(f"compiling {config.describe()} ({variant}, {target}{', MUTANT ' + mutant if mutant else ''}) with TVM {tvm.__version__}")
    t0 = time.perf_counter()
    model = model_for(config, debug=(variant == "debug"), mutant=mutant)
    mod, params = model.export_tvm(spec=model.get_default_spec())
    tvm_target = make_target(target)
    # Without FuseTransposeMatmul every call re-transposes every (out, in) weight (docs/TVM.md).
    pipeline = tvm.transform.Sequential(
        [relax.transform.FuseTransposeMatmul(), relax.get_default_pipeline(tvm_target)]
    )
    with tvm_target:
        mod = pipeline(mod)
    kernel_outputs = _kernel_outputs(mod)
    ex = tvm.compile(mod, target=tvm_target, relax_pipeline=None)
    t_compile = time.perf_counter() - t0
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Export to a temp name and rename: a killed build never leaves a half-written .so in the cache.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        ex.export_library(tmp)
        os.replace(tmp, lib_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {
        "cache_schema": CACHE_SCHEMA,
        "config": config.to_dict(),
        "variant": variant,
        "mutant": mutant,
        "target": target,
        "tvm_version": tvm.__version__,
        "pipeline": PIPELINE_ID,
        "params": [name for name, _ in params],
        "state_slots": model.layout.names(config.n_layer),
        "state_shapes": [list(x) for x in model.layout.all_shapes(config.n_layer)],
        "state_fill": model.layout.all_fills(config.n_layer),
        "tap_names": model.tap_names if variant == "debug" else [],
        "function_taps": model.function_taps if variant == "debug" else {},
        "kernel_outputs": kernel_outputs,
        "compile_seconds": round(t_compile, 3),
        "export_seconds": round(time.perf_counter() - t0 - t_compile, 3),
    }
    # The sidecar is written last and atomically: its presence marks the entry complete.
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    say(f"compiled in {t_compile:.1f} s, exported in {meta['export_seconds']:.1f} s")
    return BuildArtifact(library=lib_path, meta=meta, cached=False)
