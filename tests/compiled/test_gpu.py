"""The CUDA build: what can be checked here (it builds, its kernels are scheduled, the GPU-only bugs
hide on llvm), and — marked ``gpu``, skipped where TVM sees no CUDA GPU — what only a GPU proves:
reference vs CUDA build on every fixture and a 0.4B shape, in every capture mode, and the bug zoo
on CUDA. scripts/gpu-job runs the ``gpu`` tests on the GPU machine, from a carried compile cache
($PARITY_GPU_CACHE_DIR: tests/conftest.py points $PARITY_CACHE_DIR at a fresh per-session cache);
$PARITY_GPU_OUT, when set, receives what the tests saw (gpu-tests.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.errors import ParityError
from parity.mutants import CATALOGUE, GPU_CATALOGUE, get_mutant
from parity.session import default_decode_ids, parse_ids, run_parity

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ALL_FIXTURES = sorted(p.stem for p in FIXTURES.glob("*.pth"))
# Mutants whose bug is a hand-written llvm scan kernel with no CUDA schedule: the CUDA build refuses them.
LLVM_ONLY = {"wkv-time-not-recurrent", "wkv-fp16-accumulator", "kernel-writes-input-state", "v4-wkv-without-max",
             "wkv-time-parallel-cpu",
             # the crash and hang kernels are CPU loops (their faults are a segfault, abort() and a
             # loop on the host); a CUDA fault would be another mutant
             "crash-oob-gather", "crash-kernel-abort", "hang-kernel-loop"}
COMPILED_MUTANTS = [n for n, m in CATALOGUE.items() if m.side == "compiled"]


def _cuda_available() -> bool:
    try:
        from parity.compiled.cuda import ensure_cuda_runtime

        ensure_cuda_runtime(cache_dir=Path(os.environ.get("PARITY_GPU_CACHE_DIR", "/tmp")))
        return True
    except (ParityError, OSError, ImportError):
        return False


needs_gpu = pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU visible to TVM")


@pytest.fixture(scope="session")
def cache(compile_cache: Path) -> Path:
    # The GPU machine cannot compile (runtime-only TVM): it reads the carried cache.
    env = os.environ.get("PARITY_GPU_CACHE_DIR")
    return Path(env) if env else compile_cache


def _plan(ck, *, ids: str = "random:10:7", steps: int = 3) -> RunPlan:
    v = ck.config.vocab_size
    return RunPlan(prefill_ids=parse_ids(ids, vocab_size=v), decode_ids=default_decode_ids(steps=steps, vocab_size=v))


def _where(fd: dict | None) -> str | None:
    if fd is None:
        return None
    return f"{'prefill' if fd['step'] == 0 else 'decode ' + str(fd['step'])} {fd['stage']}"


def run_mutant_on(name: str, *, device: str, cache: Path, tmp: Path) -> dict:
    m = get_mutant(name)
    ck = load_checkpoint(FIXTURES / f"{m.fixture}.pth")
    out = run_parity(ck, backends=["reference", f"mutant/{name}"], plan=_plan(ck, ids=m.ids, steps=m.decode_steps),
                     dump_dir=tmp / f"{name}-{device}", cache_dir=cache, mode="both", device=device)
    modes = out.result["modes"]
    return {mode: (modes[mode] or {}).get("first_divergence") for mode in ("propagated", "isolated")}


# -- here, no GPU needed --------------------------------------------------------------------------

def test_cuda_build_schedules_every_kernel(tmp_path):
    """Every version builds for CUDA: DLight schedules the graph kernels (an unscheduled kernel
    fails TVM's memory verifier) and the scans are the hand-scheduled ones (threads, one block per head)."""
    import tvm
    from tvm import relax

    from parity.compiled.build import make_target, model_for

    for name in ("rwkv4-L2-C64", "rwkv5_2-L2-C144-H12"):
        cfg = load_checkpoint(FIXTURES / f"{name}.pth").config
        model = model_for(cfg, debug=False, target="cuda")
        mod, _ = model.export_tvm(spec=model.get_default_spec())
        target = make_target("cuda")
        with target:
            mod = tvm.transform.Sequential([relax.transform.FuseTransposeMatmul(), relax.get_default_pipeline(target)])(mod)
        scans = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("wkv")]
        assert scans and all("threadIdx.x" in f.script() and "blockIdx.x" in f.script() for f in scans)
        ex = tvm.compile(mod, target=target, relax_pipeline=None)
        from parity.compiled.cuda import cuda_sources

        (src,) = cuda_sources(ex.mod)
        assert "__global__" in src and "__syncthreads" in src  # wkv5's shared stage has its barriers (TVM's ThreadSync)


def test_cuda_build_cached_with_fatbin(tmp_path):
    from parity.compiled import cuda
    from parity.compiled.build import build_model

    cfg = load_checkpoint(FIXTURES / "rwkv5_2-L2-C144-H12.pth").config
    art = build_model(cfg, variant="plain", target="cuda", cache_dir=tmp_path)
    assert art.meta["target"] == "cuda" and not art.cached
    if cuda.nvcc_path() is None:
        pytest.skip("no nvcc here: the fatbin is made at load time")
    (fatbin,) = art.meta["cuda_fatbins"]
    data = (tmp_path / "cuda-fatbin" / fatbin).read_bytes()
    assert data[:4] == b"\x50\xed\x55\xba"  # the fatbin magic: nvcc compiled it, ahead of any GPU
    assert build_model(cfg, variant="plain", target="cuda", cache_dir=tmp_path).cached


def test_llvm_only_mutants_refuse_cuda():
    from parity.mutants.compiled import builds_for

    for name in COMPILED_MUTANTS + list(GPU_CATALOGUE):
        assert builds_for(name, "cuda") == (name not in LLVM_ONLY), name
    from parity.compiled.build import model_for

    cfg = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth").config
    with pytest.raises(ParityError, match="no CUDA schedule"):
        model_for(cfg, debug=True, mutant="wkv-time-not-recurrent", target="cuda")


@pytest.mark.parametrize("name", list(GPU_CATALOGUE))
def test_gpu_only_mutants_hide_on_llvm(name, cache, tmp_path):
    """The kernel as written runs its loops in order on llvm: no divergence, in either mode. That
    is the point of these bugs — only the scheduled CUDA build shows them (test_gpu_zoo)."""
    found = run_mutant_on(name, device="cpu", cache=cache, tmp=tmp_path)
    assert found == {"propagated": None, "isolated": None}


def test_device_cuda_without_gpu_is_one_line_error(tmp_path):
    if _cuda_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, "-m", "parity.cli", "run", "--checkpoint", str(FIXTURES / "rwkv5_2-L4-C128-H2.pth"),
         "--device", "cuda", "--cache-dir", str(tmp_path), "-q"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_runtime_only_tvm_loads_a_cached_build(cache, tmp_path):
    """The GPU machine's route: a TVM without its compiler library (TVM_USE_RUNTIME_LIB=1) loads a
    cached build and runs it; only a cache miss needs the compiler, and says so in one line."""
    from parity.compiled.runtime import CompiledRWKV

    ck = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth")
    want = CompiledRWKV(ck, variant="plain", cache_dir=cache).forward([1, 2, 3]).logits
    script = (
        "import sys, numpy as np; from parity.checkpoint import load_checkpoint; "
        "from parity.compiled.runtime import CompiledRWKV; "
        "ck = load_checkpoint(sys.argv[1]); "
        "out = CompiledRWKV(ck, variant='plain', cache_dir=sys.argv[2]).forward([1, 2, 3]).logits; "
        "np.save(sys.argv[3], out)"
    )
    from parity.compiled.build import llvm_cpu

    # The runtime-only TVM has no LLVM to ask which CPU this is (a part of the cache key): say it.
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PARITY_LLVM_CPU": llvm_cpu()}
    proc = subprocess.run([sys.executable, "-c", script, str(ck.path), str(cache), str(tmp_path / "l.npy")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "l.npy"), want)
    miss = subprocess.run([sys.executable, "-m", "parity.cli", "run", "--checkpoint", str(ck.path),
                           "--cache-dir", str(tmp_path / "empty"), "-q"], capture_output=True, text=True, env=env)
    assert miss.returncode == 2 and "runtime-only" in miss.stderr, miss.stderr[-2000:]


# -- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_cuda_parity_every_fixture(name, cache, tmp_path):
    """Reference (torch, CPU) vs the CUDA build: debug taps, VM instrument and isolated entry points."""
    ck = load_checkpoint(FIXTURES / f"{name}.pth")
    out = run_parity(ck, backends=["reference", "tvm", "tvm-instrumented"], plan=_plan(ck), dump_dir=tmp_path,
                     cache_dir=cache, mode="both", device="cuda")
    assert out.result["run"]["device"] == "cuda"
    assert out.result["run"]["torch_math"]["cuda.matmul.allow_tf32"] is False
    for c in out.comparisons:
        assert c["first_divergence"] is None, (c["actual"]["backend"], c["first_divergence"])
    assert out.result["modes"]["isolated"]["first_divergence"] is None
    logits = [r for r in out.result["records"] if r["stage"] == "logits"]
    assert len(logits) == 4  # every step compared
    _record("fixtures", name, {
        f"{c['expected']['backend']} ({c['expected'].get('mode')}) vs {c['actual']['backend']} ({c['actual'].get('mode')})": c["summary"]
        for c in out.comparisons
    })


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", [n for n in COMPILED_MUTANTS if n not in LLVM_ONLY] + list(GPU_CATALOGUE))
def test_gpu_zoo(name, cache, tmp_path):
    """Every mutant with a CUDA build is found on CUDA where it is; the llvm verdict is recorded beside."""
    m = get_mutant(name)
    found = run_mutant_on(name, device="cuda", cache=cache, tmp=tmp_path)
    llvm = run_mutant_on(name, device="cpu", cache=cache, tmp=tmp_path) if name in GPU_CATALOGUE else None
    _record("zoo", name, {
        "expected": {"propagated": m.propagated.describe(), "isolated": m.isolated.describe()},
        "cuda": {k: _where(v) for k, v in found.items()},
        "llvm": None if llvm is None else {k: _where(v) for k, v in llvm.items()},
        "cuda_detail": {k: (None if v is None else {x: v.get(x) for x in ("max_abs", "rms_rel", "frac_bad")}) for k, v in found.items()},
    })
    assert m.propagated.matches(found["propagated"]), _where(found["propagated"])
    assert m.isolated.matches(found["isolated"]), _where(found["isolated"])


@pytest.mark.gpu
@needs_gpu
def test_cuda_parity_04b_shape(cache, tmp_path):
    """A released shape (0.4B: L24 C1024, head 64, V 65536), realistic random weights.

    At depth the strict per-stage comparison of a propagated run is crossed by inherited drift
    alone (parity/compare/verdict.py), so what must pass is the error each stage *adds*: isolated
    mode (every CUDA layer on the reference's inputs). The drift verdict and the fp64 arbiter's
    (error against float64 within k x the fp32 reference's own) are recorded beside it; the
    arbiter must pass too — a CUDA build less accurate than fp32 allows is a finding."""
    from parity.synth import synthesize

    path, _ = synthesize(tmp_path / "rwkv5_2-0.4b.safetensors", shape="0.4b", version="5.2", seed=0)
    ck = load_checkpoint(path)
    out = run_parity(ck, backends=["reference", "tvm"], plan=_plan(ck, ids="random:16:3", steps=2), dump_dir=tmp_path / "d",
                     cache_dir=cache, mode="both", device="cuda", arbiter=True)
    r = out.result
    _record("0.4b", "rwkv5_2-0.4b", {k: r.get(k) for k in ("verdict", "tolerance_verdict", "modes", "summary", "drift", "own_error")}
            | {"arbiter": [{k: b.get(k) for k in ("backend", "verdict", "first_divergence", "summary")} for b in r.get("arbiter", [])]})
    assert r["modes"]["isolated"]["first_divergence"] is None
    assert all(b["first_divergence"] is None for b in r["arbiter"]), r["arbiter"][0]["first_divergence"]


def _record(section: str, key: str, value) -> None:
    """Append one result to $PARITY_GPU_OUT/gpu-tests.json (the GPU job's record of what it saw)."""
    out = os.environ.get("PARITY_GPU_OUT")
    if not out:
        return
    path = Path(out) / "gpu-tests.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(section, {})[key] = value
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
