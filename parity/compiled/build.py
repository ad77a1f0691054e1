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

from parity.cache_lock import build_once
from parity.compiled import host
from parity.compiled.host import default_cache_dir  # noqa: F401  (re-exported: where the cache lives)
from parity.checkpoint import ModelConfig, ModelVersion
from parity.errors import ParityError

# Nothing that needs TVM's compiler is imported at module level: on the GPU machine TVM is the
# runtime-only bundle (docs/guide.md, "Running on a GPU"), where a warm cache hit must still work.

CACHE_SCHEMA = 3  # 3: isolated entry points and their taps (function_taps)
# llvm: the CPU pipeline with every matmul scheduled (schedule_cpu.py); cuda: DLight's GPU rules,
# each rule that raises on a kernel passing it on to the next (see _tolerant below).
PIPELINE_ID = "FuseTransposeMatmul+cpu-matmul-schedule|dlight-gpu-tolerant"
VARIANTS = ("plain", "debug")
from parity.compiled.dtypes import DTYPES  # noqa: E402  (re-exported: what the build computes in)
from parity.compiled.gemv_cuda import DEFAULT_GEMV, GEMV_CONFIGS, gemv_config  # noqa: E402  (no TVM compiler needed)

_TARGETS = {
    "llvm": {"kind": "llvm"},
    # Hopper (H100 / H200). The limits are the card's; without them TVM assumes 48 KB of shared
    # memory and says so on every kernel.
    "cuda": {"kind": "cuda", "arch": "sm_90a", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024},
}


def llvm_cpu() -> str:
    """The CPU the llvm build is compiled for: $PARITY_LLVM_CPU, else this machine's (LLVM's name,
    e.g. znver5). Part of the cache key: a build for one CPU is never loaded on another. Asked of
    LLVM, the name is remembered in the compile cache (host.py), so that the runtime-only TVM of a
    worker that only loads a cached build knows it too."""
    env = os.environ.get("PARITY_LLVM_CPU")
    if env:
        return env
    try:
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - the runtime-only TVM has no LLVM to ask
        name = host.remembered(default_cache_dir())
        if name is None:
            raise ParityError("cannot ask LLVM for this machine's CPU (runtime-only TVM); set PARITY_LLVM_CPU") from None
        return name
    host.remember(default_cache_dir(), name)
    return name


def target_spec(name: str) -> dict:
    if name not in _TARGETS:
        raise ParityError(f"unknown target {name!r}; choose one of {', '.join(_TARGETS)}")
    spec = dict(_TARGETS[name])
    if name == "llvm":
        spec["mcpu"] = llvm_cpu()  # without it LLVM emits baseline x86-64 (SSE2): 4-float vectors
        # No fused multiply-add: LLVM would contract a*b+c differently in each fusion context, so
        # the plain and debug builds (whose kernels fuse differently) would no longer agree bit
        # for bit, and every product would round differently from the reference's.
        spec["mattr"] = ["-fma"]
    return spec


def make_target(name: str):
    spec = target_spec(name)
    if name == "llvm":
        spec["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target(spec)


def cuda_gemv() -> str:
    """The CUDA GEMV schedule a build uses: $PARITY_CUDA_GEMV, else DLight's own (gemv_cuda.py).
    A choice other than the default is part of the cache key and of the entry's name."""
    name = os.environ.get("PARITY_CUDA_GEMV") or DEFAULT_GEMV
    if name != DEFAULT_GEMV and gemv_config(name) is None:
        raise ParityError(f"unknown PARITY_CUDA_GEMV {name!r}; choose one of {', '.join([DEFAULT_GEMV, *GEMV_CONFIGS])} "
                          "or write ts<rows>-tr<threads>-c<1|2|4>-l<load bytes>")
    return name


def _tolerant(rule):
    """A DLight rule that returns None (leave the kernel to the next rule) where it would raise:
    DLight's GPU Reduction rule asserts on some reductions (a sum of a sum, in the bug zoo)."""
    from tvm.s_tir import dlight as dl

    class Tolerant(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - any failure of this rule: try the next
                return None

    return Tolerant()


def compile_pipeline(target: str, tvm_target):
    """Relax -> scheduled TIR. Both targets start with FuseTransposeMatmul: without it every call
    re-transposes every (out, in) weight (docs/TVM.md)."""
    from tvm import relax

    if target == "llvm":
        from tvm.relax.backend.cpu_generic import pipeline as cpu
        from parity.compiled.schedule_cpu import schedule_cpu_matmuls

        passes = [*cpu.library_dispatch_passes(tvm_target), *cpu.legalize_passes(tvm_target), schedule_cpu_matmuls]
        lower = [*cpu.dataflow_lower_passes(tvm_target), *cpu.finalize_passes(tvm_target)]
    else:
        from tvm.relax.backend.cuda import pipeline as cuda
        from tvm.s_tir import dlight as dl

        # The CUDA pipeline's own legalisation, with DLight's GPU rules made tolerant. The scans
        # are marked scheduled (wkv_cuda.py), so DLight leaves them alone.
        legalize = [p for p in cuda.legalize_passes(tvm_target) if not isinstance(p, dl.ApplyDefaultSchedule)]
        gemv = cuda_gemv()
        if gemv == DEFAULT_GEMV:
            gemv_rule = dl.gpu.GEMV()
        else:  # DLight's GEMV schedule with other tile sizes (gemv_cuda.py; $PARITY_CUDA_GEMV)
            from parity.compiled.gemv_cuda import wide_gemv_rule

            gemv_rule = wide_gemv_rule(gemv_config(gemv))
        rules = (dl.gpu.Matmul(), gemv_rule, dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
        passes = [*cuda.library_dispatch_passes(tvm_target), *legalize,
                  dl.ApplyDefaultSchedule(*(_tolerant(r) for r in rules))]
        lower = [*cuda.dataflow_lower_passes(tvm_target), *cuda.finalize_passes(tvm_target)]
    return tvm.transform.Sequential([relax.transform.FuseTransposeMatmul(), *passes, *lower])


def model_for(
    config: ModelConfig, *, debug: bool, mutant: str | None = None, target: str = "llvm", dtype: str = "float32"
):
    """The Relax module of the checkpoint's family: one file per family (rwkv4 / rwkv5), with the
    scan kernels of ``target`` (parity/compiled/targets.py), computing in ``dtype`` (common.py).

    ``mutant`` names a deliberately broken model from the bug zoo (parity/mutants/); it computes
    in its own dtype (``Mutant.dtype``), and ``dtype`` must be left at its default or match it."""
    from parity.compiled import rwkv4_model, rwkv5_model, targets

    kwargs = {"dtype": dtype} if dtype != "float32" else {}
    if mutant is not None:
        from parity.mutants import get_mutant
        from parity.mutants.compiled import model_class

        m = get_mutant(mutant)
        if m.side != "compiled":
            raise ParityError(f"mutant {mutant!r} breaks the {m.side}, not the compiled model")
        model = model_class(mutant)(config, debug=debug, **kwargs)
        what = f"mutant {mutant!r}"
    elif config.version == ModelVersion.V4:
        model, what = rwkv4_model.RWKV4Model(config, debug=debug, **kwargs), "the RWKV-4 model"
    else:
        model, what = rwkv5_model.RWKV5Model(config, debug=debug, **kwargs), "the RWKV-5 model"
    targets.retarget(model, target=target, what=what)
    if target == "cuda" and not debug and mutant is None and config.version != ModelVersion.V4:
        # The plain CUDA build only (issue 10's decode speed): r/k/v/g as one GEMV, the scan with
        # ln_x and the gate as one kernel, and the decode step's own GEMV kernels (gemv_cuda.py) --
        # unless $PARITY_CUDA_GEMV asks for a DLight GEMV variant, which then schedules the decode's
        # matmuls too (what benchmarks/gpu.py --gemv compares). The debug build and llvm keep theirs.
        rwkv5_model.group_projections(model, decode_kernels=cuda_gemv() == DEFAULT_GEMV)
    return model


# Every source whose text shapes the binary (cuda_graph.py: the CUDA-graph builds, kept under the
# plain build's key); a change to any of them is a new cache key. Read as
# files, not imported, so computing a key needs no TVM compiler.
_HERE = Path(__file__).resolve().parent
_SOURCES = tuple(
    _HERE / name
    for name in ("common.py", "rwkv4_model.py", "rwkv5_model.py", "wkv4_kernel.py", "wkv5_kernel.py", "wkv_cuda.py", "targets.py",
                 "schedule_cpu.py", "dtypes.py", "cuda_graph.py", "gemv_cuda.py")
)
_MUTANT_SOURCES = tuple(_HERE.parent / "mutants" / name for name in (
    "compiled.py", "kernels.py", "crash_models.py", "precision_models.py", "quant_models.py"))


@dataclass(frozen=True)
class BuildArtifact:
    library: Path
    meta: dict  # the sidecar: params, state_slots, tap_names, kernel_outputs, timings
    cached: bool  # True when loaded from the cache without compiling


def cache_key(*, config: ModelConfig, variant: str, target: str, mutant: str | None = None, dtype: str = "float32") -> str:
    h = hashlib.sha256()
    if dtype != "float32":  # (absent for fp32: its keys are those of the builds made before dtypes)
        h.update(f"dtype={dtype}".encode() + b"\0")
    if target == "cuda" and cuda_gemv() != DEFAULT_GEMV:  # (absent for the default: DLight's rule)
        h.update(f"gemv={cuda_gemv()}".encode() + b"\0")
    if mutant is not None:
        for part in (f"mutant={mutant}", *(p.read_text() for p in _MUTANT_SOURCES)):
            h.update(part.encode())
            h.update(b"\0")
    for part in (
        f"schema={CACHE_SCHEMA}",
        json.dumps(config.to_dict(), sort_keys=True),
        *(p.read_text() for p in _SOURCES),
        Path(__file__).read_text(),  # the pipeline is defined here
        f"variant={variant}",
        json.dumps(target_spec(target), sort_keys=True),
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


_SIDECAR_FIELDS = ("params", "state_slots", "state_shapes", "state_fill", "tap_names", "function_taps", "kernel_outputs",
                   "tvm_version", "library_bytes", "library_sha256")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry_fault(lib_path: Path, meta: dict) -> str | None:
    """Why a cache entry whose sidecar reads fine cannot be used, or None when it can.

    The library is checked against the size and hash the sidecar recorded when it was exported: a
    truncated or overwritten .so (a full disk, a copy cut short, another tool's file) would
    otherwise fail at load with TVM's own error, or load and compute garbage. The library is small
    (the weights are parameters, not in it), so hashing it on every hit costs milliseconds.
    """
    if meta["tvm_version"] != tvm.__version__:
        return f"built by TVM {meta['tvm_version']}, this is {tvm.__version__}"
    size = lib_path.stat().st_size
    if size != meta["library_bytes"]:
        return f"library is {size} bytes, {meta['library_bytes']} were written (truncated or replaced)"
    if _file_sha256(lib_path) != meta["library_sha256"]:
        return "library's sha256 differs from the one recorded at export (modified)"
    return None


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
    dtype: str = "float32",
) -> BuildArtifact:
    """Return the compiled model for ``config`` computing in ``dtype``, compiling only on a cache miss."""
    if dtype not in DTYPES:
        raise ParityError(f"no compiled model in {dtype!r}; choose one of {', '.join(DTYPES)}")
    if variant not in VARIANTS:
        raise ParityError(f"unknown build variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if target not in _TARGETS:
        raise ParityError(f"unknown target {target!r}; choose one of {', '.join(_TARGETS)}")
    say = on_event or (lambda msg: None)
    lib_path = entry_path(config, variant=variant, target=target, mutant=mutant, dtype=dtype, cache_dir=cache_dir)
    meta_path = lib_path.with_suffix(".json")
    said_unusable = []

    def ready() -> BuildArtifact | None:
        meta = _read_sidecar(meta_path) if lib_path.exists() else None
        fault = None if meta is None else _entry_fault(lib_path, meta)
        if fault is not None:
            if not said_unusable:  # asked again under the lock: say it once
                say(f"compile cache entry {lib_path.name} is unusable ({fault}); rebuilding it")
                said_unusable.append(True)
            return None
        if meta is None:
            return None
        say(f"compile cache hit: {lib_path.name}")
        return BuildArtifact(library=lib_path, meta=meta, cached=True)

    # One builder per entry (parity/cache_lock.py): a second process that misses the same entry
    # waits for the first, then finds its published build instead of compiling it again.
    def build() -> BuildArtifact:
        if os.environ.get(host.COMPILE_IN_CHILD) == "1":
            _compile_in_child(config, variant=variant, target=target, mutant=mutant, dtype=dtype, lib_path=lib_path,
                              say=say)
            meta = _read_sidecar(meta_path)
            if meta is None:
                raise ParityError(f"the compile child exited cleanly but left no usable {meta_path.name}")
            return BuildArtifact(library=lib_path, meta=meta, cached=False)
        return _compile_entry(config, variant=variant, target=target, mutant=mutant, dtype=dtype, lib_path=lib_path,
                              say=say)

    return build_once(lib_path, ready=ready, on_wait=say, build=build)


def _compile_in_child(
    config: ModelConfig, *, variant: str, target: str, mutant: str | None, dtype: str, lib_path: Path,
    say: Callable[[str], None],
) -> None:
    """Compile and publish one cache entry in a child process with the full TVM; relay its events."""
    import subprocess
    import sys

    job = {"config": config.to_dict(), "variant": variant, "target": target, "mutant": mutant, "dtype": dtype,
           "lib_path": str(lib_path), "sys_path": sys.path,
           "llvm_cpu": llvm_cpu() if target == "llvm" else None}
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_USE_RUNTIME_LIB", host.COMPILE_IN_CHILD)}
    # Compiling reads no weights, so the child blocks torch, which tvm_ffi would import (~2.5 s).
    code = ("import json, sys; job = json.loads(sys.stdin.readline()); sys.path[:] = job['sys_path']\n"
            "sys.modules['torch'] = None\n"
            "from parity.compiled.build import _compile_child_main; _compile_child_main(job)")
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, env=env, text=True)
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.close()
        for line in proc.stdout:  # the child's events, one a line, as they happen
            say(line.rstrip("\n"))
        rc = proc.wait()
        if rc != 0:
            err.seek(0)
            lines = [ln for ln in err.read().splitlines() if ln.strip()]
            raise ParityError(f"compiling {lib_path.name} in a child process failed (exit {rc}): "
                              f"{lines[-1] if lines else 'no message'}")


def _compile_child_main(job: dict) -> None:
    """The compile child's body: the entry's lock is held by the process that started it."""
    import sys

    if job["llvm_cpu"]:
        os.environ["PARITY_LLVM_CPU"] = job["llvm_cpu"]  # the very name the parent's cache key used
    try:
        _compile_entry(ModelConfig.from_dict(job["config"]), variant=job["variant"], target=job["target"],
                       mutant=job["mutant"], dtype=job["dtype"], lib_path=Path(job["lib_path"]),
                       say=lambda msg: print(msg, flush=True))
    except ParityError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        sys.exit(1)


def entry_path(
    config: ModelConfig, *, variant: str, target: str, mutant: str | None = None, dtype: str = "float32",
    cache_dir: Path | None = None,
) -> Path:
    """The cache entry's library path (its sidecar is the same name with .json; its lock, .so.lock)."""
    cache_dir = Path(cache_dir or default_cache_dir())
    key = cache_key(config=config, variant=variant, target=target, mutant=mutant, dtype=dtype)
    family = "rwkv4" if config.version == ModelVersion.V4 else "rwkv5"
    if mutant:
        family += f"-mutant-{mutant}"
    if dtype != "float32":
        family += f"-{dtype}"
    if target == "cuda" and cuda_gemv() != DEFAULT_GEMV:
        family += f"-gemv-{cuda_gemv()}"
    return cache_dir / f"{family}-{variant}-{target}-{key}.so"


def _compile_entry(
    config: ModelConfig, *, variant: str, target: str, mutant: str | None, dtype: str, lib_path: Path,
    say: Callable[[str], None],
) -> BuildArtifact:
    """Compile and publish one cache entry (called with the entry's lock held)."""
    cache_dir = lib_path.parent
    meta_path = lib_path.with_suffix(".json")
    say(f"compiling {config.describe()} ({variant}, {target}, {dtype}{', MUTANT ' + mutant if mutant else ''}) "
        f"with TVM {tvm.__version__}")
    try:
        from tvm import relax
    except (ImportError, AttributeError):
        # The runtime-only TVM of the GPU bundle loads builds; it cannot make them.
        raise ParityError(
            f"no cached build {lib_path.name} in {cache_dir}, and this TVM is runtime-only (no compiler): "
            "build on a machine with the full apache-tvm and carry the compile cache along"
        ) from None

    t0 = time.perf_counter()
    model = model_for(config, debug=(variant == "debug"), mutant=mutant, target=target, dtype=dtype)
    mod, params = model.export_tvm(spec=model.get_default_spec())
    tvm_target = make_target(target)
    pipeline = compile_pipeline(target, tvm_target)
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
    fatbins = []
    if target == "cuda":
        # Compile the CUDA source now, here, into the fatbin cache the loader reads (cuda.py): the
        # GPU machine then never waits for nvcc. Without nvcc the source compiles at load instead.
        from parity.compiled import cuda

        fatbins = cuda.precompile(ex, cache_dir=cache_dir, on_event=say)
    meta = {
        "cache_schema": CACHE_SCHEMA,
        "config": config.to_dict(),
        "variant": variant,
        "mutant": mutant,
        "target": target,
        "tvm_version": tvm.__version__,
        "pipeline": PIPELINE_ID,
        "cuda_gemv": cuda_gemv() if target == "cuda" else None,
        "params": [name for name, _ in params],
        # What the runtime binds each parameter as (absent in builds made before dtypes: all fp32),
        # and the ones it divides first (fp16's residual rescale, common.py).
        "dtype": dtype,
        "param_dtypes": [str(p.dtype) for _, p in params],
        "param_scales": model.param_scales(),
        "param_groups": model.param_groups(),  # stacked parameters: name -> the checkpoint keys, in order
        "state_slots": model.layout.names(config.n_layer),
        "state_shapes": [list(x) for x in model.layout.all_shapes(config.n_layer)],
        "state_fill": model.layout.all_fills(config.n_layer),
        "tap_names": model.tap_names if variant == "debug" else [],
        "function_taps": model.function_taps if variant == "debug" else {},
        "kernel_outputs": kernel_outputs,
        "compile_seconds": round(t_compile, 3),
        "export_seconds": round(time.perf_counter() - t0 - t_compile, 3),
        "cuda_fatbins": fatbins,
        "library_bytes": lib_path.stat().st_size,
        "library_sha256": _file_sha256(lib_path),
    }
    # The sidecar is written last and atomically: its presence marks the entry complete.
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    say(f"compiled in {t_compile:.1f} s, exported in {meta['export_seconds']:.1f} s")
    return BuildArtifact(library=lib_path, meta=meta, cached=False)
