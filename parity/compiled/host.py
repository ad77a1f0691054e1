"""What a process knows of this machine's builds before it loads TVM: where the compile cache lives,
and this machine's CPU as LLVM names it, remembered so that a process without LLVM can know it.

The llvm build is compiled for the host CPU (``build.llvm_cpu``), and that name is part of every
cache key. Only TVM's compiler library (libtvm_compiler.so, LLVM inside) can ask for it; the
runtime-only library (``TVM_USE_RUNTIME_LIB=1``) cannot. A worker that only loads a cached build
and runs it needs no compiler, and the compiler library costs it ~160 MB of resident pages and
~0.7 s of CPU to load (measured at 0.1B, issue 9: the TVM worker's peak 1.27 -> 1.09 GB). So
whenever a process asks LLVM, it writes the answer into the compile cache's directory, under a
fingerprint of this CPU (its /proc/cpuinfo identity and feature flags) and of the TVM release;
a worker that finds the name there can start with the runtime-only library.

No TVM import here: the worker reads this before it decides which TVM library to load.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

# Set (to "1") by a worker that loaded TVM's runtime-only library because it expected a cached build
# (parity/dumpers/worker.py): on a miss it cannot compile, so a child process with the compiler does
# (build._compile_in_child), with the worker holding the entry's lock.
COMPILE_IN_CHILD = "PARITY_COMPILE_IN_CHILD"

# The lines of /proc/cpuinfo that say which CPU this is and what it can do (what LLVM's host
# detection reads from CPUID); frequency, cache sizes and core numbering are left out.
_IDENTITY = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags")


def default_cache_dir() -> Path:
    env = os.environ.get("PARITY_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rwkv-parity"


@functools.lru_cache(maxsize=1)  # llvm_cpu() runs for every cache key: read /proc/cpuinfo once
def _fingerprint() -> str | None:
    """A hash of this CPU's identity and of the installed TVM release, or None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None  # not Linux: no memo, the compiler library is loaded as before
    first = text.split("\n\n", 1)[0]
    lines = sorted(line.split(":", 1)[0].strip() + ":" + line.split(":", 1)[1].strip()
                   for line in first.splitlines() if ":" in line and line.split(":", 1)[0].strip() in _IDENTITY)
    if not lines:
        return None
    try:
        from importlib.metadata import version

        tvm_release = version("apache-tvm")
    except Exception:  # noqa: BLE001 - a source build of TVM has no distribution metadata
        tvm_release = "unknown"
    h = hashlib.sha256("\n".join([*lines, f"tvm={tvm_release}"]).encode())
    return h.hexdigest()[:20]


def memo_path(cache_dir: Path) -> Path | None:
    fp = _fingerprint()
    return None if fp is None else Path(cache_dir) / f"llvm-cpu-{fp}.txt"


def remembered(cache_dir: Path) -> str | None:
    """The CPU name a process with LLVM wrote for this machine, or None."""
    path = memo_path(cache_dir)
    if path is None:
        return None
    try:
        name = path.read_text().strip()
    except OSError:
        return None
    return name if name and name.replace("-", "").replace("_", "").isalnum() else None


_WRITTEN: set = set()  # (memo, name) this process wrote or found: asked again per cache key, checked once


def remember(cache_dir: Path, name: str) -> None:
    """Write ``name`` for this machine (atomically; best effort: an unwritable cache only costs
    later workers the compiler library)."""
    path = memo_path(cache_dir)
    if path is None or (path, name) in _WRITTEN or remembered(cache_dir) == name:
        return
    _WRITTEN.add((path, name))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(name + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
