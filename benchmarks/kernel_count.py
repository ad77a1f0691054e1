"""How many kernels one step of the plain CUDA build launches: the count the CUDA graph's step time follows.

    python benchmarks/kernel_count.py [--shapes 0.4b,1.5b] [--dtypes float16,float32] [--version 5.2]
                                      [--trees HEAD] [--out DIR]

In a CUDA graph every kernel still costs ~2 us on the H200, so at 1.5B the small kernels of a
decode step (casts, lerps, GroupNorm's pieces) cost more than the weight-bound GEMVs (issue 10).
This counts them without a GPU: for each tree (a git revision, exported with `git archive`, so a
run measures committed code only), shape and dtype, one fresh process builds the plain model for
the CUDA target (parity/compiled/build.py: model_for, export_tvm, compile_pipeline; nothing is
compiled to a library), and counts the kernel launches of the lowered ``decode`` and ``prefill``:
every call of a TIR function, times the thread-block loop nests that function holds (one for
every kernel of these builds; the VM's builtins, such as a reshape that is a view, launch
nothing). ``per layer`` is the count at the shape's depth minus the count one layer shallower. A
prefill's count is per call, whatever its length. The GPU profile of benchmarks/gpu.py counted the
same 846 (fp16) and 580 (fp32) kernels a 1.5B decode step at 542c97a
(benchmarks/results/gpu-2026-11-30-3).

Prints a table; with --out writes kernel-count-<commit>.md and .json there.

    python benchmarks/kernel_count.py --trees 542c97a,HEAD --out benchmarks/results   # before/after
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def count(shape: str, dtype: str, version: str, layers: int | None = None) -> dict[str, int]:
    """Kernel calls in the plain CUDA build's decode and prefill (run inside a tree's process)."""
    import tvm

    from parity.compiled import build
    from parity.synth import shape_config

    cfg = shape_config(shape, version=version, layers=layers)
    model = build.model_for(cfg, debug=False, mutant=None, target="cuda", dtype=dtype)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    target = build.make_target("cuda")
    with target:
        mod = build.compile_pipeline("cuda", target)(mod)
    # Launches per TIR function: its loop nests bound to blockIdx.x. One, unless a schedule rule
    # left several nests side by side in one function (each is a launch of its own).
    launches = {gv.name_hint: max(1, f.script().count('thread="blockIdx.x"'))
                for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    out = {}
    for fn in ("decode", "prefill"):
        # A kernel call prints as `name(args...)`, alone on its line (its outputs are arguments).
        called = re.findall(r"^\s*(?:\w+ = )?(?:cls\.)?(\w+)\(", mod[fn].script(), re.M)
        out[fn] = sum(launches[name] for name in called if name in launches)
    return out


def worker(args) -> None:
    from parity.synth import SHAPES

    rows = []
    for shape in args.shapes:
        depth = SHAPES[shape].n_layer
        for dtype in args.dtypes:
            full = count(shape, dtype, args.version)
            shallower = count(shape, dtype, args.version, layers=depth - 1)
            rows.append({"shape": shape, "dtype": dtype, "layers": depth, "decode": full["decode"],
                         "prefill": full["prefill"], "decode_per_layer": full["decode"] - shallower["decode"]})
    print(json.dumps(rows))


def run_tree(rev: str, args) -> list[dict]:
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", commit, "parity"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        env = dict(os.environ, PYTHONPATH=tmp)
        cmd = [sys.executable, __file__, "--worker", "--shapes", ",".join(args.shapes), "--dtypes",
               ",".join(args.dtypes), "--version", args.version]
        done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"tree {rev} ({commit}) failed:\n{done.stderr[-2000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [{"tree": rev, "commit": commit, **row} for row in rows]


def table(rows: list[dict]) -> str:
    lines = ["| tree | shape | dtype | layers | decode launches | per layer | prefill launches |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tree']} ({r['commit']}) | {r['shape']} | {r['dtype']} | {r['layers']} | {r['decode']} "
                     f"| {r['decode_per_layer']} | {r['prefill']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.4b,1.5b")
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--version", default="5.2")
    ap.add_argument("--trees", default="HEAD", help="comma-separated git revisions (committed code only)")
    ap.add_argument("--out", type=Path, help="directory for kernel-count-<commit>.md and .json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if args.worker:
        worker(args)
        return
    from parity.synth import SHAPES

    from parity.compiled.dtypes import DTYPES

    for given, known, what in ((args.shapes, SHAPES, "shape"), (args.dtypes, DTYPES, "dtype")):
        bad = [x for x in given if x not in known]
        if bad:
            print(f"unknown {what} {bad[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
            sys.exit(2)
    rows = [row for rev in args.trees.split(",") for row in run_tree(rev, args)]
    text = table(rows)
    print(text)
    if args.out:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
        args.out.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/kernel_count.py " + " ".join(sys.argv[1:])
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        md = (f"# Kernels per step of the plain CUDA build (issue 10)\n\n{stamp}, checkout {head}: `{cmd}`\n\n"
              "Counted in the lowered Relax functions (no GPU): the kernel launches of `decode` / `prefill` "
              "(each TIR call, times its blockIdx-bound loop nests); "
              "per layer = the count at the shape's depth minus one layer shallower.\n\n" + text + "\n")
        (args.out / f"kernel-count-{head}.md").write_text(md)
        (args.out / f"kernel-count-{head}.json").write_text(json.dumps({"date": stamp, "command": cmd, "rows": rows},
                                                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
