"""Variants of the plain CUDA build's decode kernels, timed and checked on a GPU (issue 10).

One maintained script for what K2-K4 did with one-off copies (benchmarks/results/gpu-2026-12-01-k*/k*_*.py,
kept as records). A variant is a source snapshot: ``git archive`` of a commit, plus this checkout's
parity/compiled/*.py (the edits being tried), plus module constants of gemv_cuda.py rewritten
(``NAME = value`` lines). The build cache key hashes those sources, so every variant is its own entry in
one shared cache.

Here (the build machine: full TVM, nvcc; no GPU):

    python benchmarks/gpu_variants.py stage DIR --base REV [--variant SPEC ...] [--build WHAT ...]
        SPEC: NAME or NAME:CONST=VALUE[;CONST=VALUE...]  (NAME alone: the tree's sources as they are; CONST is
              gemv_cuda.py's, or MODULE.CONST another parity/compiled module's, e.g. wkv_cuda.WKV_HOIST)
        WHAT: NAME=big16|big|fixplain|all, or several joined by '+'  (default: base and every variant big16; "all" = big + every
              fixture's plain builds + the CUDA debug and graph builds the GPU tests use)
        --reuse-cache DIR0: copy an earlier stage's DIR0/build-cache in first (its unchanged entries are not built again)
      -> DIR/<base, NAME...>/ snapshots, DIR/build-cache, DIR/tvm (the runtime bundle: ../shared/tools/
         tvm-gpu-bundle), DIR/*.whl, and DIR.tar.xz of it all (carry it).

On the GPU (python3 of the machine; DIR.tar.xz unpacked; the job installs DIR's ffi wheel into its own interpreter
(python -m pip --no-deps --no-index) where that cannot import tvm_ffi yet):

    python3 benchmarks/gpu_variants.py job DIR OUT [--bench NAME=DTYPES ...] [--compare NAME ...] [--tests NAME]
        bench: the 1.5B build (benchmarks/gpu.py's random weights, seed 0): per-kernel profile of 3 VM decode
               steps (gpu.profile_decode) and the whole step in one CUDA graph (cuda_graph.GraphDecoder),
               3 rounds of 200 replays, the median;
        compare: logits and state of NAME vs base: 1.5B 32-token prefill + 8 decodes (fp16, fp32; where
               built), every fixture whose plain build is in the cache (7-token prefill + 3 decodes);
        tests: tests/compiled/test_gpu.py's parity-every-fixture and graphs tests on NAME.
        The benches run one at a time first (the GPU to themselves), then the tests and compares side by side.
      -> OUT/results.tar.gz (packed again after every step, without the .npz files) and OUT/summary.txt.
    (--big-dtypes: the 1.5B dtypes a compare runs; --t-bench / --t-checks: timeouts in seconds.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# -- here: snapshots and builds ---------------------------------------------------------------------
def snapshot(root: Path, dest: Path, rev: str, *, tree: bool, consts: dict[str, str]) -> None:
    dest.mkdir(parents=True)
    subprocess.run(f"git archive {rev} | tar -x -C {dest}", shell=True, cwd=root, check=True)
    for bulky in ("benchmarks/results", "docs", "examples"):  # (the carried bundle's size: 64 MiB a call)
        shutil.rmtree(dest / bulky, ignore_errors=True)
    if tree:
        for f in (root / "parity/compiled").glob("*.py"):
            shutil.copy(f, dest / "parity/compiled" / f.name)
    for name, value in consts.items():  # NAME (gemv_cuda.py's) or MODULE.NAME (parity/compiled/MODULE.py's)
        mod, _, const = name.rpartition(".")
        g = dest / f"parity/compiled/{mod or 'gemv_cuda'}.py"
        text, n = re.subn(rf"^{const} = [^#\n]*", f"{const} = {value}  ", g.read_text(), count=1, flags=re.M)
        assert n == 1, f"no module constant {const} in {g.name}"
        g.write_text(text)
    (dest / "VARIANT").write_text(json.dumps({"rev": rev, "tree": tree, "consts": consts}))


def build(what: str) -> None:
    """The builds of one snapshot (cwd = PYTHONPATH = it; PARITY_CACHE_DIR = the shared cache);
    ``what``: big16, big, fixplain or all, or several joined by '+'."""
    if "+" in what:
        for w in what.split("+"):
            build(w)
        return
    import parity
    from parity.checkpoint import load_checkpoint
    from parity.compiled.build import build_model
    from parity.compiled.cuda_graph import build_graph_model
    from parity.synth import shape_config

    assert Path(parity.__file__).resolve().is_relative_to(Path.cwd().resolve()), parity.__file__
    s15 = shape_config("1.5b", version="5.2")
    todo = []
    if what in ("big16", "big", "all"):
        todo += [("1.5b", s15, dict(variant="plain", target="cuda", dtype=d))
                 for d in (("float16",) if what == "big16" else ("float16", "float32"))]
    if what in ("fixplain", "all"):
        fixtures = {p.stem: load_checkpoint(p).config for p in sorted(Path("fixtures").glob("*.pth"))}
        for name, cfg in fixtures.items():
            todo += [(name, cfg, dict(variant="plain", target="cuda", dtype=d)) for d in ("float32", "float16")]
            if what == "all":
                todo.append((name, cfg, dict(variant="debug", target="cuda", dtype="float32")))
        if what == "all":
            g = fixtures["rwkv5_2-L2-C144-H12"]
            todo += [("graph", g, dict(graph=True, dtype=d)) for d in ("float32", "float16")]
    t0 = time.time()
    for name, cfg, kw in todo:
        art = build_graph_model(cfg, **kw) if kw.pop("graph", False) else build_model(cfg, **kw)
        print(f"{time.time() - t0:7.0f} s {name} {kw} {art.library.name} cached={art.cached}", flush=True)


def stage(args) -> None:
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    d = Path(args.dir).resolve()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if args.reuse_cache:  # an earlier stage's builds: the entries whose sources are unchanged are not built again
        shutil.copytree(Path(args.reuse_cache).resolve() / "build-cache", d / "build-cache", symlinks=True)
    names = ["base"]
    snapshot(root, d / "base", args.base, tree=False, consts={})
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        consts = dict(kv.split("=", 1) for kv in rest.split(";") if kv)
        snapshot(root, d / name, "HEAD", tree=True, consts=consts)
        names.append(name)
    for n in names:
        print(n, *re.findall(r"^DECODE_\w+ = [^#\n]*", (d / n / "parity/compiled/gemv_cuda.py").read_text(), re.M),
              *re.findall(r"^WKV_\w+ = [^#\n]*", (d / n / "parity/compiled/wkv_cuda.py").read_text(), re.M), sep="\n  ")
    shutil.copy(HERE, d / HERE.name)
    subprocess.run([str(root / "../shared/tools/tvm-gpu-bundle"), str(d), sys.executable], check=True,
                   stdout=subprocess.DEVNULL)
    whats = dict(w.split("=", 1) for w in args.build)
    env = dict(os.environ, PARITY_LLVM_CPU="x86-64-v3", PARITY_CACHE_DIR=str(d / "build-cache"))
    procs = []
    for n in names:  # --jobs builders at a time
        what = whats.get(n, "big16")
        procs.append((n, what, subprocess.Popen([sys.executable, str(HERE), "build", what], cwd=d / n,
                                                env=dict(env, PYTHONPATH=str(d / n)), stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)))
        while sum(p.poll() is None for *_, p in procs) >= args.jobs:
            time.sleep(2)
    for n, what, p in procs:
        out = p.communicate()[0]
        print(f"== {n} {what}: exit {p.returncode}\n" + "\n".join(out.splitlines()[-8:]), flush=True)
        assert p.returncode == 0, n
    subprocess.run(f"tar -C {d.parent} -cJf {d}.tar.xz {d.name}", shell=True, check=True)
    print(f"STAGED {d}.tar.xz {os.path.getsize(f'{d}.tar.xz') / 2**20:.1f} MiB")


# -- on the GPU ------------------------------------------------------------------------------------
def bench(out: str, dtypes: str) -> None:
    sys.path.insert(0, str(Path.cwd() / "benchmarks"))
    import torch
    from gpu import _param_bytes, _timed, profile_decode, random_weights

    from parity.checkpoint import Checkpoint
    from parity.compiled.cuda_graph import GraphDecoder
    from parity.compiled.runtime import CompiledRWKV
    from parity.dumpers.backends import pin_torch_math
    from parity.synth import shape_config

    pin_torch_math()
    res = {}
    cfg = shape_config("1.5b", version="5.2")
    w = random_weights(cfg, seed=0, device="cuda")
    ck = Checkpoint(path=Path("random-1.5b"), sha256="-", config=cfg, weights=w)
    for dtype in dtypes.split(","):
        m = CompiledRWKV(ck, variant="plain", target="cuda", dtype=dtype)
        r = {"library": m.artifact.library.name, "weight_bytes": _param_bytes(m.artifact.meta, w)}
        r["profile"] = profile_decode(m)
        g = GraphDecoder(m)
        r["graph_ms_rounds"] = [_timed(lambda: g.step(1), sync=g.sync, repeat=200) * 1e3 for _ in range(3)]
        r["graph_ms"] = sorted(r["graph_ms_rounds"])[1]
        r["roofline_pct"] = 100 * r["weight_bytes"] / 4.8e12 * 1e3 / r["graph_ms"]
        del g, m
        torch.cuda.empty_cache()
        res[dtype] = r
        p = r["profile"]
        print(f"{dtype}: graph {r['graph_ms']:.3f} ms {[round(x, 4) for x in r['graph_ms_rounds']]} "
              f"({r['roofline_pct']:.1f} %), kernels {p['kernels_per_step']:.0f} busy {p['gpu_busy_ms_per_step']:.3f} ms",
              flush=True)
        for t in p["top"][:7]:
            print(f"   {t['ms_per_step'] * 1e3 / max(t['per_step'], 1):7.2f} us x{t['per_step']:.0f}  {t['kernel'][:70]}",
                  flush=True)
        Path(out).write_text(json.dumps(res, indent=1, default=float))


def compare_run(out: str, big_dtypes: str = "float16,float32") -> None:
    import numpy as np

    sys.path.insert(0, str(Path.cwd() / "benchmarks"))
    from gpu import random_weights

    from parity.checkpoint import Checkpoint, load_checkpoint
    from parity.compiled.build import entry_path
    from parity.compiled.runtime import CompiledRWKV
    from parity.synth import shape_config

    res = {}

    def go(tag, ck, dtype, prompt, steps):
        if not entry_path(ck.config, variant="plain", target="cuda", dtype=dtype).exists():
            return
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
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, cfg.vocab_size, 32)]
    for d in big_dtypes.split(","):
        go("1.5b", ck, d, prompt, 8)
    for p in sorted(Path("fixtures").glob("*.pth")):
        fck = load_checkpoint(p)
        for d in ("float32", "float16"):
            go(p.stem, fck, d, [1, 5, 9, 2, 7, 3, 4], 3)
    np.savez(out, **res)


def compare_diff(a: str, b: str) -> str:
    """max |a - b| per (model, dtype, logits|state), and relative to max |a|; 'bit for bit' where 0."""
    import numpy as np

    A, B = dict(np.load(a)), dict(np.load(b))
    worst = {}
    for k in sorted(set(A) & set(B)):
        x, y = A[k].astype(np.float64), B[k].astype(np.float64)
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        same = A[k].tobytes() == B[k].tobytes()
        scale = float(np.max(np.abs(x))) or 1.0
        group = k.rsplit("/", 1)[0] + "/" + ("logits" if k.endswith("logits") else "state")
        prev = worst.get(group, (0.0, 0.0, 0.0, 0, True))
        worst[group] = (max(prev[0], d), max(prev[1], d / scale), max(prev[2], scale), prev[3] + 1, prev[4] and same)
    lines = [f"{'what':52s} {'n':>3s} {'max|a-b|':>10s} {'/max|a|':>10s} {'max|a|':>10s}"]
    for g, (d, r, s, n, same) in worst.items():
        lines.append(f"{g:52s} {n:3d} {d:10.3e} {r:10.3e} {s:10.3e}" + ("  bit for bit" if same else ""))
    only = sorted(set(A) ^ set(B))
    if only:
        lines.append(f"in one file only: {len(only)} {only[:6]}")
    return "\n".join(lines)


def job(args) -> None:
    d, out = Path(args.dir).resolve(), Path(args.out).resolve()
    work = out.parent / (out.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = []

    def log(msg):
        line = f"[+{time.time() - t0:4.0f}s] {msg}"
        print(line, flush=True)
        summary.append(line)
        (work / "summary.txt").write_text("\n".join(summary) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "summary.txt", out / "summary.txt")
        subprocess.run(f"tar -C {work} --exclude='*.npz' -czf {out}/results.tar.gz .", shell=True)

    def start(name, argv, log_to, env=()):
        e = dict(os.environ, PYTHONPATH=f"{d}:{d / name}", TVM_USE_RUNTIME_LIB="1", PARITY_LLVM_CPU="x86-64-v3",
                 PARITY_CACHE_DIR=str(d / "build-cache"), PARITY_GPU_CACHE_DIR=str(d / "build-cache"),
                 PYTHONUNBUFFERED="1", **dict(env))
        return subprocess.Popen(argv, cwd=d / name, env=e, stdout=open(log_to, "w"), stderr=subprocess.STDOUT)

    def wait(p, timeout):
        try:
            return p.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            return "timeout"

    def keep(path, pattern):
        return "\n".join(ln for ln in Path(path).read_text().splitlines() if re.search(pattern, ln))[:3000]

    # The bundle's tvm needs the ffi wheel in this very interpreter: a bare `pip` may be another python's
    # (K6's call 2 on a fresh machine: every step failed on "No module named 'tvm_ffi'").
    if subprocess.run([sys.executable, "-c", "import tvm_ffi"], capture_output=True).returncode:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              *map(str, sorted(d.glob("apache_tvm_ffi-*.whl")))], capture_output=True, text=True)
        log(f"installed the ffi wheel into {sys.executable}: exit {pip.returncode} {pip.stderr.strip()[-300:]}")
    me = str(HERE)
    for spec in args.bench:  # one at a time: the GPU to itself
        n, _, dtypes = spec.partition("=")
        rc = wait(start(n, [sys.executable, me, "bench", str(work / f"bench-{n}.json"), dtypes or "float16"],
                        work / f"bench-{n}.txt"), args.t_bench)
        log(f"bench {n}: exit {rc}\n" + keep(work / f"bench-{n}.txt", r"graph|^\s+\d|Error"))
    # then the checks side by side (no timing)
    procs = {}
    if args.tests:
        n = args.tests
        (work / f"gpu-{n}").mkdir(exist_ok=True)
        procs[f"tests {n}"] = (start(n, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "-p",
                                         "parity.pytest_plugin", "tests/compiled/test_gpu.py", "-m", "gpu", "-k",
                                         "test_cuda_parity_every_fixture or test_cuda_graphs_compute_what_the_plain_build_does"],
                                        work / f"tests-{n}.txt", env={"PARITY_GPU_OUT": str(work / f"gpu-{n}")}.items()),
                               work / f"tests-{n}.txt")
    for n in ["base", *args.compare] if args.compare else []:
        procs[f"compare run {n}"] = (start(n, [sys.executable, me, "compare", "run", str(work / f"cmp-{n}.npz"),
                                               args.big_dtypes], work / f"cmp-{n}.txt"), work / f"cmp-{n}.txt")
    t1 = time.time()
    for what, (p, path) in procs.items():
        rc = wait(p, args.t_checks - (time.time() - t1))
        tail = (Path(path).read_text().strip().splitlines() or [""])[-1]
        log(f"{what}: exit {rc}: {tail[:300]}")
    for n in args.compare:
        try:
            text = compare_diff(str(work / "cmp-base.npz"), str(work / f"cmp-{n}.npz"))
        except Exception as e:  # noqa: BLE001
            text = f"diff failed: {e!r}"
        (work / f"diff-base-{n}.txt").write_text(text + "\n")
        log(f"diff base {n}:\n" + "\n".join(ln for ln in text.splitlines() if "logits" in ln or "what" in ln))
    for f in work.glob("cmp-*.npz"):
        f.unlink()  # (large; the diffs are kept)
    log("done")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("dir")
    s.add_argument("--base", required=True)
    s.add_argument("--variant", action="append", default=[])
    s.add_argument("--build", action="append", default=[])
    s.add_argument("--jobs", type=int, default=2)
    s.add_argument("--reuse-cache", help="an earlier stage's DIR: its build-cache is copied in first")
    b = sub.add_parser("build")
    b.add_argument("what")
    be = sub.add_parser("bench")
    be.add_argument("out")
    be.add_argument("dtypes")
    c = sub.add_parser("compare")
    c.add_argument("mode", choices=("run", "diff"))
    c.add_argument("files", nargs="+")  # run: OUT.npz [1.5B dtypes]; diff: A.npz B.npz
    j = sub.add_parser("job")
    j.add_argument("dir")
    j.add_argument("out")
    j.add_argument("--bench", action="append", default=[])
    j.add_argument("--compare", action="append", default=[])
    j.add_argument("--tests")
    j.add_argument("--big-dtypes", default="float16,float32")  # the 1.5B builds a compare runs
    j.add_argument("--t-bench", type=int, default=60)
    j.add_argument("--t-checks", type=int, default=150)  # the tests and compares together
    a = ap.parse_args()
    if a.cmd == "stage":
        stage(a)
    elif a.cmd == "build":
        build(a.what)
    elif a.cmd == "bench":
        bench(a.out, a.dtypes)
    elif a.cmd == "compare":
        compare_run(*a.files) if a.mode == "run" else print(compare_diff(*a.files))
    else:
        job(a)


if __name__ == "__main__":
    main()
