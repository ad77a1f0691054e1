"""Long decodes: every bundled fixture, reference vs tvm, thousands of teacher-forced decode steps.

Correct backends must give "no divergence" however long the run: each step's rounding is carried
by the recurrent state into the next, and the verdict's envelope (parity/compare/verdict.py) must
hold that drift without a false alarm. One ``parity run`` per fixture, in a process of its own.

    python benchmarks/long_decode.py                   # 3000 decode steps, every fixture
    python benchmarks/long_decode.py --decode-steps 500 --fixtures rwkv5_2-L4-C128-H2
    python benchmarks/long_decode.py --checkpoints r04.safetensors --ids ones:16 --decode-steps 256
Results: benchmarks/results/long_decode.md and .json, with date and commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_one(name: str, checkpoint: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="parity-long-") as tmp:
        out = Path(tmp) / "r.json"
        argv = [sys.executable, "-m", "parity.cli", "run", "--checkpoint", str(checkpoint),
                "--backends", args.backends, "--ids", args.ids, "--decode-steps", str(args.decode_steps),
                "--json", str(out), "-q"]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if not out.exists():
            print(f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
            return {"fixture": name, "exit": proc.returncode, "verdict": "no result", "wall_s": wall}
        r = json.loads(out.read_text())
    drift, own = r.get("drift") or {}, r.get("own_error") or {}
    return {
        "fixture": name, "exit": proc.returncode, "verdict": r["verdict"], "wall_s": wall,
        "own_worst_ratio": own.get("worst_ratio"), "drift_status": drift.get("status"),
        "drift_worst_ratio": drift.get("worst_ratio"), "drift_worst_step": drift.get("worst_step"),
        "envelope_fraction": drift.get("envelope_fraction"), "floor": drift.get("floor"),
        "kl_max": (r.get("end_to_end") or {}).get("kl_max"),
        "top1_agreement": (r.get("end_to_end") or {}).get("top1_agreement"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-steps", type=int, default=3000)
    ap.add_argument("--fixtures", help="comma-separated fixture names (default: every one in fixtures/)")
    ap.add_argument("--checkpoints", help="comma-separated checkpoint paths instead of fixtures (e.g. a parity synth 0.4B)")
    ap.add_argument("--backends", default="reference,tvm")
    ap.add_argument("--ids", default="random:16:3")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs side by side (each is one process tree; give each OMP_NUM_THREADS = cores / jobs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.checkpoints:
        runs = {Path(p).stem: Path(p) for p in args.checkpoints.split(",")}
    else:
        names = args.fixtures.split(",") if args.fixtures else sorted(p.stem for p in (REPO / "fixtures").glob("*.pth"))
        runs = {name: REPO / "fixtures" / f"{name}.pth" for name in names}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = os.environ.get("PARITY_COMMIT", commit)[:7]  # a copy of the tree without .git (the device job) names its commit
    by_name = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, name, path, args): name for name, path in runs.items()}
        for future in as_completed(futures):
            row = future.result()
            by_name[row["fixture"]] = row
            print(json.dumps(row), flush=True)
            # After every row: a job stopped by a time limit keeps the rows that finished.
            write_results([by_name[n] for n in runs if n in by_name], args=args, commit=commit)
    return 0


def write_results(rows: list[dict], *, args, commit: str) -> None:
    meta = {"date": dt.date.today().isoformat(), "commit": commit, "decode_steps": args.decode_steps,
            "backends": args.backends, "ids": args.ids}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_decode.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")

    def g(x, spec=".3g"):
        return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)

    lines = [f"# Long decodes ({meta['date']}, commit {commit})", "",
             f"`python benchmarks/long_decode.py {' '.join(sys.argv[1:])}`: backends {args.backends}, prompt "
             f"`{args.ids}`, {args.decode_steps} decode steps, default verdict (replay + drift envelope).", "",
             "| fixture | verdict | exit | own error | drift (allowances) | at step | of envelope | floor | KL max | top-1 | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             *[f"| {r['fixture']} | {r['verdict']} | {r['exit']} | {g(r.get('own_worst_ratio'))} | {g(r.get('drift_worst_ratio'))} | "
               f"{g(r.get('drift_worst_step'))} | {g(r.get('envelope_fraction'), '.2f')} | {g(r.get('floor'))} | "
               f"{g(r.get('kl_max'))} | {g(r.get('top1_agreement'))} | {r['wall_s']:.0f} s |" for r in rows]]
    (args.out / "long_decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
