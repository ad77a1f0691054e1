"""The builds of one GPU job (scripts/gpu-job --prepare runs this, from the committed snapshot).

    python scripts/gpu_prepare.py PART PARTS MANIFEST

Builds every ``PARTS``-th entry of the list below starting at ``PART`` (--prepare runs PARTS of
these side by side) into $PARITY_CACHE_DIR and appends the cache files each one needs (library,
sidecar, nvcc fatbins) to MANIFEST, which is what --prepare packs. The list is in the job's order:
what the job runs first is built first.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import parity

# The snapshot's code, not the checkout's (an editable install would point there).
assert Path(parity.__file__).resolve().is_relative_to(Path.cwd().resolve()), parity.__file__

from parity.checkpoint import load_checkpoint  # noqa: E402
from parity.compiled.build import build_model, default_cache_dir  # noqa: E402
from parity.compiled.cuda_graph import build_graph_model  # noqa: E402
from parity.mutants import CATALOGUE, GPU_CATALOGUE  # noqa: E402
from parity.mutants.compiled import builds_for  # noqa: E402
from parity.synth import shape_config  # noqa: E402

GRAPH_FIXTURE = "rwkv5_2-L2-C144-H12"  # tests/compiled/test_gpu.py: the graphs compute what the plain build does
# CUDA GEMV variants (parity/compiled/gemv_cuda.py) for `benchmarks/gpu.py --gemv` at 1.5B fp16:
# none by default since the 2026-11-30-3 run measured v16, v16-ts4 and v16-ts2-tr64 within 1 % of
# DLight's (the GEMVs already run at ~2.7 TB/s; the step's time is its ~850 kernels).
GEMVS = [g for g in os.environ.get("PREPARE_GEMV", "").split(",") if g]


def fixture(name: str):
    """A mutant's fixture: fixtures/NAME.pth (some in a subfolder, e.g. precision/)."""
    return load_checkpoint(Path("fixtures") / f"{name}.pth").config


def todo() -> list[tuple[str, object, dict]]:
    """(what, config, build keywords) of every build, in the job's order."""
    fixtures = {p.stem: load_checkpoint(p).config for p in sorted(Path("fixtures").glob("*.pth"))}
    s04, s15 = shape_config("0.4b", version="5.2"), shape_config("1.5b", version="5.2")
    out = []
    # stages fp16 and quant: `tvm@<dtype>` runs the debug build
    for dtype in ("float16", "bfloat16", "fp16i8", "fp32i8", "q4f16_1"):
        out += [(name, cfg, dict(variant="debug", target="cuda", dtype=dtype)) for name, cfg in fixtures.items()]
    for dtype in ("float32", "float16"):  # stage graphs
        cfg = fixtures[GRAPH_FIXTURE]
        out += [(GRAPH_FIXTURE, cfg, dict(variant="plain", target="cuda", dtype=dtype)),
                (GRAPH_FIXTURE, cfg, dict(graph=True, dtype=dtype))]
    out.append(("0.4b", s04, dict(variant="debug", target="cuda")))  # stage 04b
    for name, m in GPU_CATALOGUE.items():  # stage mutants: on CUDA, and the llvm verdict beside
        out += [(name, fixture(m.fixture), dict(variant="debug", target=t, mutant=name, dtype=m.dtype)) for t in ("cuda", "llvm")]
    for dtype in ("float32", "float16"):  # stage bench: 1.5B, plain and the Relax-graph build
        out += [("1.5b", s15, dict(variant="plain", target="cuda", dtype=dtype)), ("1.5b", s15, dict(graph=True, dtype=dtype))]
    # and 0.4B's plain fp16 build, for BENCH_ARGS="--shapes 0.4b,1.5b ..." (its fp32 one is the overhead's, below)
    out.append(("0.4b", s04, dict(variant="plain", target="cuda", dtype="float16")))
    out += [("1.5b", s15, dict(variant="plain", target="cuda", dtype="float16", gemv=g)) for g in GEMVS]
    out.append(("0.4b", s04, dict(variant="plain", target="cuda")))  # the harness overhead's bare CUDA run
    # stage fp32 (reference vs tvm, the debug build; tvm-instrumented, the plain one) and the rest of the zoo
    out += [(name, cfg, dict(variant=v, target="cuda")) for name, cfg in fixtures.items() for v in ("plain", "debug")]
    for name, m in CATALOGUE.items():
        if m.side == "compiled" and builds_for(name, "cuda"):
            # In the mutant's own dtype (decay-in-bf16 is an fp16 build, int8-scales-swapped an fp16i8 one):
            # the GPU test asks for that build.
            out.append((name, fixture(m.fixture), dict(variant="debug", target="cuda", mutant=name, dtype=m.dtype)))
    return out


def main() -> int:
    part, parts, manifest = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cache = default_cache_dir()
    t0 = time.time()
    for what, cfg, kw in todo()[part::parts]:
        kw = dict(kw)
        gemv = kw.pop("gemv", None)
        if gemv:  # read by build.py's cuda_gemv(): part of the key and the entry's name
            os.environ["PARITY_CUDA_GEMV"] = gemv
        try:
            if kw.pop("graph", False):
                art = build_graph_model(cfg, dtype=kw["dtype"], cache_dir=cache)
            else:
                art = build_model(cfg, cache_dir=cache, **kw)
        finally:
            os.environ.pop("PARITY_CUDA_GEMV", None)
        files = [art.library, art.library.with_suffix(".json")]
        files += [cache / "cuda-fatbin" / f for f in art.meta.get("cuda_fatbins") or []]
        with manifest.open("a") as f:
            f.write("".join(str(p.relative_to(cache)) + "\n" for p in files))
        how = "cached" if art.cached else f"compiled in {art.meta['compile_seconds']} s"
        print(f"{time.time() - t0:6.0f} s  {what}  {art.library.name}  {how}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
