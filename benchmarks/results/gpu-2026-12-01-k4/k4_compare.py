"""K4's GPU check (K3's k3_compare.py, K2's k2_compare.py, unchanged): the plain CUDA build of one source snapshot, its logits and state on fixed inputs.

    python k3_compare.py run OUT.npz          (PYTHONPATH = a snapshot; PARITY_CACHE_DIR = the carried cache)
    python k3_compare.py diff A.npz B.npz     (max |a - b| per array, and relative to max |a|)

1.5B: benchmarks/gpu.py's random weights (seed 0, drawn on the GPU), a 32-token prefill then 8 decode
steps, fp16 and fp32; every fixture whose build is in the cache: a 7-token prefill then 3 decode steps.
"""
import sys
from pathlib import Path

import numpy as np


def run(out: str) -> None:
    sys.path.insert(0, str(Path.cwd() / "benchmarks"))
    from gpu import random_weights
    from parity.checkpoint import Checkpoint, load_checkpoint
    from parity.compiled.build import entry_path
    from parity.compiled.runtime import CompiledRWKV
    from parity.synth import shape_config

    res = {}

    def go(tag, ck, dtype, prompt, steps):
        m = CompiledRWKV(ck, variant="plain", target="cuda", dtype=dtype)
        o = m.forward(prompt)
        res[f"{tag}/{dtype}/prefill_logits"] = o.logits
        st = o.state
        for i in range(steps):
            o = m.forward([prompt[i % len(prompt)]], st)
            st = o.state
            res[f"{tag}/{dtype}/decode{i}_logits"] = o.logits
        for k, v in m.state_to_canonical(st).items():
            res[f"{tag}/{dtype}/{k}"] = v
        print(tag, dtype, m.artifact.library.name, flush=True)
        del m

    cfg = shape_config("1.5b", version="5.2")
    w = random_weights(cfg, seed=0, device="cuda")
    ck = Checkpoint(path=Path("random-1.5b"), sha256="-", config=cfg, weights=w)
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(0, cfg.vocab_size, 32)]
    for d in ("float16", "float32"):
        go("1.5b", ck, d, prompt, 8)
    for p in sorted(Path("fixtures").glob("*.pth")):
        fck = load_checkpoint(p)
        for d in ("float32", "float16"):
            if entry_path(fck.config, variant="plain", target="cuda", dtype=d).exists():
                go(p.stem, fck, d, [1, 5, 9, 2, 7, 3, 4], 3)
    np.savez(out, **res)


def diff(a: str, b: str) -> None:
    A, B = np.load(a), np.load(b)
    worst = {}
    for k in sorted(set(A.files) & set(B.files)):
        x, y = A[k].astype(np.float64), B[k].astype(np.float64)
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = float(np.max(np.abs(x))) or 1.0
        group = k.rsplit("/", 1)[0] + "/" + ("logits" if k.endswith("logits") else "state")
        prev = worst.get(group, (0.0, 0.0, 0.0, 0))
        worst[group] = (max(prev[0], d), max(prev[1], d / scale), max(prev[2], scale), prev[3] + 1)
    print(f"{'what':58s} {'n':>3s} {'max|a-b|':>11s} {'max|a-b|/max|a|':>16s} {'max|a|':>10s}")
    for g, (d, r, s, n) in worst.items():
        print(f"{g:58s} {n:3d} {d:11.3e} {r:16.3e} {s:10.3e}")
    only = sorted(set(A.files) ^ set(B.files))
    if only:
        print("in one file only:", len(only), only[:6])


if __name__ == "__main__":
    run(sys.argv[2]) if sys.argv[1] == "run" else diff(sys.argv[2], sys.argv[3])
