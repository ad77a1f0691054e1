"""K4's builds (K3's k3_build.py, plus big16 / big32: one dtype) for the GPU call (run from a source snapshot: cwd = snapshot, PYTHONPATH = snapshot).

    python k3_build.py big|big16|big32|fixplain|all|nodebug|debugs
big: the 1.5B plain CUDA builds (fp16, fp32); fixplain: every fixture's plain CUDA builds (fp32, fp16);
all: both, plus the fixtures' CUDA debug fp32 builds and the graph builds the GPU tests use (K2's k2_build.py).
"""
import sys, time
from pathlib import Path
import parity
assert Path(parity.__file__).resolve().is_relative_to(Path.cwd().resolve()), parity.__file__
from parity.checkpoint import load_checkpoint
from parity.compiled.build import build_model
from parity.compiled.cuda_graph import build_graph_model
from parity.synth import shape_config

which = sys.argv[1]
s15 = shape_config("1.5b", version="5.2")
fixtures = {p.stem: load_checkpoint(p).config for p in sorted(Path("fixtures").glob("*.pth"))}
todo = []
if which in ("big", "big16", "big32", "all", "nodebug"):
    todo += [("1.5b", s15, dict(variant="plain", target="cuda", dtype=d)) for d in ("float16", "float32") if which[3:] in ("", d[-2:]) or which in ("all", "nodebug")]
if which in ("fixplain", "all", "nodebug", "debugs"):
    for name, cfg in fixtures.items():
        for d in ("float32", "float16") if which != "debugs" else ():
            todo.append((name, cfg, dict(variant="plain", target="cuda", dtype=d)))
        if which in ("all", "debugs"):
            todo.append((name, cfg, dict(variant="debug", target="cuda", dtype="float32")))
if which in ("all", "debugs"):
    g = fixtures["rwkv5_2-L2-C144-H12"]
    todo += [("graph", g, dict(graph=True, dtype=d)) for d in ("float32", "float16")]
t0 = time.time()
for name, cfg, kw in todo:
    if kw.pop("graph", False):
        art = build_graph_model(cfg, **kw)
    else:
        art = build_model(cfg, **kw)
    print(f"{time.time()-t0:7.0f} s {name} {kw} {art.library.name} cached={art.cached}", flush=True)
