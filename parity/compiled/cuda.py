"""The CUDA side of a compiled model: nvcc with a fatbin cache, and the CUDA runtime loader.

TVM built without a CUDA driver keeps each CUDA kernel module as *source* in the exported .so
and compiles it when the .so is loaded, through the global function ``tvm_callback_cuda_compile``.
This module is that callback: it runs nvcc once per distinct source and keeps the fatbin in
``<cache dir>/cuda-fatbin/<sha256 of arch + source>.fatbin``. The build fills that cache right
after export (``precompile``), so a machine that loads a cached build — the GPU machine — finds
every fatbin ready and needs no nvcc; a miss compiles with the local nvcc, or fails in one line.

``ensure_cuda_runtime`` makes ``tvm.cuda(0)`` usable with either TVM install: the full pip wheel,
or the runtime-only bundle (TVM_USE_RUNTIME_LIB=1), which neither loads libtvm_runtime_cuda.so
nor registers a compile callback on its own.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from parity.errors import ParityError

ARCH = "sm_90a"  # the target of build.py's "cuda" entry (Hopper: H100 / H200)
_state: dict = {"cache_dir": None, "registered": False, "compiled": 0, "cache_hits": 0}


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _fatbin_path(cache_dir: Path, code: str) -> Path:
    digest = hashlib.sha256(f"{ARCH}\0{code}".encode()).hexdigest()[:32]
    return Path(cache_dir) / "cuda-fatbin" / f"{digest}.fatbin"


def compile_source(code: str, *, cache_dir: Path) -> bytes:
    """The fatbin of one CUDA source: from the cache, else nvcc (and then cached)."""
    path = _fatbin_path(cache_dir, code)
    if path.exists():
        _state["cache_hits"] += 1
        return path.read_bytes()
    nvcc = nvcc_path()
    if nvcc is None:
        raise ParityError(f"no cached fatbin {path.name} and no nvcc to compile the CUDA kernels; install the CUDA toolkit")
    with tempfile.TemporaryDirectory(prefix="parity-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        proc = subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={ARCH}", "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ParityError(f"nvcc failed on the generated CUDA kernels: {proc.stderr.strip().splitlines()[-1:]}")
        data = out.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of its own: two processes compiling the same source at once (xdist workers,
    # two runs sharing a cache) must not write into one another's file before it is renamed.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp_name, path)
    _state["compiled"] += 1
    return data


def cuda_sources(module) -> list[str]:
    """The CUDA source of every CUDA module imported by a built (or loaded) runtime module."""
    out, seen, todo = [], set(), [module]
    while todo:
        m = todo.pop()
        for imp in getattr(m, "imports", ()):
            if id(imp) in seen:
                continue
            seen.add(id(imp))
            if imp.kind == "cuda":
                out.append(imp.inspect_source())
            todo.append(imp)
    return out


def precompile(executable, *, cache_dir: Path, on_event: Callable[[str], None] | None = None) -> list[str]:
    """nvcc every CUDA module of a fresh build into the fatbin cache; returns the fatbin names."""
    if nvcc_path() is None:
        if on_event:
            on_event("no nvcc here: the CUDA kernels will be compiled when the library is loaded")
        return []
    names = []
    for code in cuda_sources(executable.mod):
        compile_source(code, cache_dir=cache_dir)
        names.append(_fatbin_path(cache_dir, code).name)
    if on_event and names:
        on_event(f"nvcc: {len(names)} CUDA module(s) compiled into {Path(cache_dir) / 'cuda-fatbin'}")
    return names


def ensure_cuda_runtime(*, cache_dir: Path):
    """``tvm.cuda(0)``, ready to load CUDA builds; a one-line ParityError where there is no GPU."""
    import tvm

    _state["cache_dir"] = Path(cache_dir)
    if not _state["registered"]:
        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        if lib.exists():
            try:
                # The runtime-only bundle does not load TVM's CUDA device API by itself.
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                reason = str(e).split(": ", 1)[-1]  # e.g. "libcuda.so.1: cannot open shared object file: ..."
                raise ParityError(f"no CUDA GPU usable here: TVM's CUDA runtime does not load ({reason}); "
                                  "run with --device cpu") from None
        import tvm_ffi

        def _compile(code, *_target):
            return bytearray(compile_source(str(code), cache_dir=_state["cache_dir"]))

        # Ours replaces TVM's (nvrtc by default, which needs cuda-python; absent from the bundle).
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)
        _state["registered"] = True
    dev = tvm.cuda(0)
    try:
        exists = bool(dev.exist)
    except Exception:  # noqa: BLE001 - a missing driver surfaces as an FFI error here
        exists = False
    if not exists:
        raise ParityError("no CUDA GPU visible to TVM (tvm.cuda(0) does not exist); run with --device cpu")
    return dev


def compile_stats() -> dict:
    """How many CUDA modules were compiled by nvcc vs found in the fatbin cache in this process."""
    return {"nvcc_compiled": _state["compiled"], "fatbin_cache_hits": _state["cache_hits"]}
