"""K4's lean decode timing of one source snapshot (cwd = snapshot, PYTHONPATH = snapshot, PARITY_CACHE_DIR = the
carried cache): the 1.5B plain CUDA build (benchmarks/gpu.py's random weights, seed 0), per dtype: the per-kernel
profile of 3 VM decode steps (gpu.profile_decode) and the whole step in one CUDA graph (gpu's GraphDecoder timing),
3 rounds of 200 replays (the median and all three). No torch rows (benchmarks/gpu.py has them).

    python k4_bench.py OUT.json float16[,float32]
"""
import json, sys, time
from pathlib import Path

sys.path.insert(0, str(Path.cwd() / "benchmarks"))
import torch  # noqa: E402
from gpu import _param_bytes, _timed, profile_decode, random_weights  # noqa: E402
from parity.checkpoint import Checkpoint  # noqa: E402
from parity.compiled.cuda_graph import GraphDecoder  # noqa: E402
from parity.compiled.runtime import CompiledRWKV  # noqa: E402
from parity.dumpers.backends import pin_torch_math  # noqa: E402
from parity.synth import shape_config  # noqa: E402

pin_torch_math()
out, res = sys.argv[1], {}
cfg = shape_config("1.5b", version="5.2")
w = random_weights(cfg, seed=0, device="cuda")
ck = Checkpoint(path=Path("random-1.5b"), sha256="-", config=cfg, weights=w)
for dtype in sys.argv[2].split(","):
    t0 = time.perf_counter()
    m = CompiledRWKV(ck, variant="plain", target="cuda", dtype=dtype)
    r = {"library": m.artifact.library.name, "load_s": time.perf_counter() - t0,
         "weight_bytes": _param_bytes(m.artifact.meta, w)}
    r["profile"] = profile_decode(m)
    g = GraphDecoder(m)
    r["graph_ms_rounds"] = [_timed(lambda: g.step(1), sync=g.sync, repeat=200) * 1e3 for _ in range(3)]
    r["graph_ms"] = sorted(r["graph_ms_rounds"])[1]
    r["roofline_pct"] = 100 * r["weight_bytes"] / 4.8e12 * 1e3 / r["graph_ms"]
    del g, m
    torch.cuda.empty_cache()
    res[dtype] = r
    p = r["profile"]
    print(f"{dtype}: graph {r['graph_ms']:.3f} ms {r['graph_ms_rounds']} ({r['roofline_pct']:.0f} %), "
          f"kernels {p['kernels_per_step']:.0f} busy {p['gpu_busy_ms_per_step']:.3f} ms", flush=True)
    for t in p["top"][:6]:
        print(f"   {t['ms_per_step'] * 1e3 / max(t['per_step'], 1):7.2f} us x{t['per_step']:.0f}  {t['kernel'][:60]}", flush=True)
    Path(out).write_text(json.dumps(res, indent=1, default=float))
