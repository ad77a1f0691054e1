"""Verdicts at released model sizes: every correct backend, every shape, every prompt.

For each shape (synthesised with ``parity synth``: realistic random weights, bf16, emb fp32) and
each prompt, one ``parity run --backends reference,tvm,chatrwkv`` (``hf`` too for RWKV-4) with
64 decode steps, in a process of its own so its peak RSS is its own. One row per run:

    verdict, worst own-error ratio (replay: the error a stage adds, in allowances), drift (the
    propagated error, as a fraction of the depth envelope), KL max and top-1 agreement of the
    next-token distributions, wall time, peak RSS, fp32 weight bytes, dump bytes.

Every backend here is correct, so every row must say "no divergence"; a row that does not is a
false alarm, and the table shows it. Results: benchmarks/results/scale.md and scale.json, with
date and commit.

    python benchmarks/scale.py                       # the full table (hours on 2 cores)
    python benchmarks/scale.py --shapes 0.1b --prompts ones:16 --decode-steps 8   # a quick row
    python benchmarks/scale.py --jobs 4 --deadline 480 --out OUT   # rows side by side (a big machine;
                                                                     # scripts/scale-job does this)

``--jobs`` runs rows side by side: each row's peak RSS is still its own (its own process), but its
wall time then includes waiting for cores, and the table says how many ran at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCENARIO = "chat-hello"  # a bundled text scenario (fixtures/scenarios/chat-hello.json)
# shape -> versions. 512-token prompts only where the unscheduled CPU build finishes in minutes.
PLAN = [("0.1b", "5.2"), ("0.4b", "5.2"), ("1.5b", "5.2"), ("3b", "5.2"), ("0.4b", "4")]
PROMPTS = ["ones:16", "random:64:3", f"scenario:{SCENARIO}", "random:512:5"]
LONG_PROMPT_SHAPES = {"0.1b", "0.4b"}


def _tree_rss(root: int) -> int:
    """RSS of process ``root`` and all its descendants now, in bytes (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def one_run(argv: list[str]) -> None:
    """Child mode: run ``parity`` in this process, then report this process's peak RSS, its largest
    worker's, and the peak of the whole process tree at once (sampled every 0.2 s)."""
    from parity.cli import main

    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - t0
    done.set()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    # A backend run in a worker process of its own holds its memory there, not here: the largest
    # such child is reported beside this process (both are peaks; they may not coincide in time).
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("SCALE-ROW " + json.dumps({"exit": code, "wall_s": wall, "peak_rss": rss, "peak_rss_children": children,
                                     "peak_rss_tree": peak[0]}),
          flush=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fp32_weight_bytes(checkpoint: Path) -> int:
    from parity.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    return sum(t.numel() * 4 for t in ck.weights.values())


def row_from(result: dict, child: dict, *, shape: str, version: str, prompt: str, weights: int, ckpt: int, dumps: int) -> dict:
    own = result.get("own_errors", {})
    worst_own = max((o["worst_ratio"] for o in own.values() if isinstance(o.get("worst_ratio"), (int, float))), default=None)
    pairs = result.get("comparisons") or [result]
    drift = [c.get("drift") or {} for c in pairs]
    e2e = [c.get("end_to_end") or {} for c in pairs]
    kl = [e["kl_max"] for e in e2e if isinstance(e.get("kl_max"), (int, float))]
    top1 = [e["top1_agreement"] for e in e2e if isinstance(e.get("top1_agreement"), (int, float))]
    drift_of_result = result.get("drift") or {}
    return {
        "shape": shape, "version": version, "prompt": prompt, "verdict": result["verdict"],
        "pairs": [f"{c.get('expected')}~{c.get('actual')}: {c.get('verdict')}" for c in result.get("comparisons", [])],
        "worst_own_ratio": worst_own,
        "drift_worst_ratio": max((d.get("worst_ratio", 0) for d in drift if isinstance(d.get("worst_ratio"), (int, float))), default=None),
        "drift_envelope_fraction": drift_of_result.get("envelope_fraction"),
        # The run's rounding floor at the worst record (measured only when the fixed envelope was exceeded).
        "drift_floor": drift_of_result.get("floor"),
        "drift_status": [f"{c.get('expected')}~{c.get('actual')}: {(c.get('drift') or {}).get('status')} "
                         f"{(c.get('drift') or {}).get('worst_ratio')}" for c in pairs],
        "kl_max": max(kl) if kl else None, "top1_agreement": min(top1) if top1 else None,
        "wall_s": child["wall_s"], "peak_rss": child["peak_rss"], "fp32_weight_bytes": weights,
        # The machine's memory for the run: the process tree's peak at one moment (sampled), where
        # measured; else this process's own peak (rows from before backends ran in workers).
        "checkpoint_bytes": ckpt, "peak_rss_tree": child.get("peak_rss_tree"),
        "rss_over_weights_plus_file": (child.get("peak_rss_tree") or child["peak_rss"]) / (weights + ckpt),
        "dump_bytes": dumps, "exit": child["exit"], "peak_rss_children": child.get("peak_rss_children", 0),
    }


def fmt_row(r: dict) -> str:
    def g(x, spec=".3g"):
        return "-" if x is None else format(x, spec)

    return (f"| {r['shape']} | {r['version']} | `{r['prompt']}` | {r['verdict']} | {g(r['worst_own_ratio'])} | "
            f"{g(r['drift_worst_ratio'])} ({g(r['drift_envelope_fraction'], '.2f')} of envelope) | {g(r['kl_max'])} | "
            f"{g(100 * r['top1_agreement'] if r['top1_agreement'] is not None else None, '.4g')}% | {r['wall_s']:.0f} s | "
            f"{_gib(r.get('peak_rss_tree'))} ({r['rss_over_weights_plus_file']:.2f}x); run {_gib(r['peak_rss'])}, "
            f"largest worker {_gib(r.get('peak_rss_children'))} | {r['dump_bytes'] / 2**20:.0f} MiB |"
            + (f" {r['src']} |" if "src" in r else ""))


def _gib(n) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def _commit() -> str:
    if os.environ.get("PARITY_COMMIT"):  # a snapshot without .git (scripts/scale-job) names its commit
        return os.environ["PARITY_COMMIT"][:10]
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def write_results(rows: list[dict], *, args) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    machine = f"{os.cpu_count()} cores" + (f", {args.jobs} rows at a time" if args.jobs > 1 else "")
    if args.merge:
        machine = "rows merged from earlier runs, each row's run in column src"
    meta = {"date": dt.date.today().isoformat(), "commit": commit, "decode_steps": args.decode_steps,
            "machine": machine, "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])}
    (out / "scale.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Verdicts at released sizes ({meta['date']}, commit {commit}, {meta['machine']})", "",
        f"`{meta['command']}`; {args.decode_steps} decode steps; backends reference, tvm, chatrwkv (+ hf for v4).",
        "Own error: worst replayed stage, in allowances (< 1 passes). Drift: worst propagated record in allowances,",
        "and as a fraction of the depth envelope (<= 1 passes). Peak RSS: the whole process tree's at one moment (sampled),",
        "its ratio over fp32 weights + checkpoint file, then the run's own and its largest worker's peaks.", "",
        "| shape | v | prompt | verdict | own error | drift | KL max (nats) | top-1 | wall | peak RSS | dumps |"
        + (" src |" if args.merge else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.merge else ""),
        *[fmt_row(r) for r in rows],
    ]
    (out / "scale.md").write_text("\n".join(lines) + "\n")


def merge_runs(runs: list[Path], *, args) -> None:
    """Write one table from earlier runs: every row keeps where it ran (the run's directory, commit
    and machine), and rows are ordered as the full plan orders them."""
    rows = []
    for run in runs:
        path = run / "scale.json" if run.is_dir() else run
        data = json.loads(path.read_text())
        where = run if run.is_dir() else run.parent
        for row in data["rows"]:
            rows.append({**row, "src": f"{where.parent.name}/{where.name} ({data['commit']}, {data['machine']})"})
    plan_order = {sv: i for i, sv in enumerate(PLAN)}
    prompt_order = {p: i for i, p in enumerate(PROMPTS)}
    rows.sort(key=lambda r: (plan_order.get((r["shape"], r["version"]), len(PLAN)), prompt_order.get(r["prompt"], 99)))
    write_results(rows, args=args)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one_run(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated shape[@version], e.g. 0.1b,0.4b@4 (default: the full plan)")
    ap.add_argument("--prompts", help=f"comma-separated (default: {', '.join(PROMPTS)})")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--work", type=Path, help="where checkpoints and dumps go (default: a temp dir, removed)")
    ap.add_argument("--append", action="store_true", help="add to the committed rows instead of replacing them")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where scale.md / scale.json go (default benchmarks/results)")
    ap.add_argument("--jobs", type=int, default=1, help="rows run side by side (default 1)")
    ap.add_argument("--deadline", type=float, help="start no row after this many seconds; finished rows are kept")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="RUN",
                    help="run nothing: one table from earlier runs' scale.json (a file or its directory), e.g. rows "
                         "run on several machines or device calls; rows in plan order, each naming its run (src)")
    args = ap.parse_args()
    if args.merge:
        merge_runs(args.merge, args=args)
        return 0
    plan = PLAN if not args.shapes else [tuple((s.split("@") + ["5.2"])[:2]) for s in args.shapes.split(",")]
    prompts = PROMPTS if not args.prompts else args.prompts.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="parity-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    committed = args.out / "scale.json"
    rows = json.loads(committed.read_text())["rows"] if args.append and committed.exists() else []
    started = time.monotonic()
    py = sys.executable
    lock = threading.Lock()

    def checkpoint(shape: str, version: str) -> Path:
        ckpt = work / f"rwkv{version}-{shape}.safetensors"
        if not ckpt.exists():
            print(f"synthesising {shape} RWKV-{version} -> {ckpt}", flush=True)
            subprocess.run([py, "-m", "parity.cli", "synth", "--shape", shape, "--version", version, str(ckpt)],
                           check=True)  # the whole machine, its progress in the log
            print(f"synthesised {shape} RWKV-{version} ({time.monotonic() - started:.0f} s)", flush=True)
        return ckpt

    # Rows side by side share the cores: each gets its slice, or torch's and TVM's thread pools
    # (each as wide as the machine) oversubscribe it many times over.
    env = dict(os.environ)
    if args.jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TVM_NUM_THREADS=threads)
    ckpts = {sv: checkpoint(*sv) for sv in plan}  # one at a time: each synth uses the whole machine

    def one_row(index: int, shape: str, version: str, prompt: str) -> None:
        if args.deadline is not None and time.monotonic() - started > args.deadline:
            print(f"{shape} v{version} {prompt}: not started (past --deadline {args.deadline:.0f} s)", flush=True)
            return
        ckpt = ckpts[(shape, version)]
        backends = "reference,tvm,chatrwkv" + (",hf" if version == "4" else "")
        dump_dir, out = work / f"dumps-{index}", work / f"result-{index}.json"
        shutil.rmtree(dump_dir, ignore_errors=True)
        out.unlink(missing_ok=True)
        source = ["--scenario", str(REPO / "fixtures" / "scenarios" / (prompt.split(":", 1)[1] + ".json"))] \
            if prompt.startswith("scenario:") else ["--ids", prompt]
        argv = ["run", "--checkpoint", str(ckpt), "--backends", backends, *source, "--decode-steps",
                str(args.decode_steps), "--dump-dir", str(dump_dir), "--json", str(out), "-q"]
        print(f"{shape} v{version} {prompt}: parity {' '.join(argv)}", flush=True)
        proc = subprocess.run([py, __file__, "--one", *argv], capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("SCALE-ROW ")), None)
        if line is None or not out.exists():
            print(f"run failed: {shape} {prompt}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
            return
        row = row_from(json.loads(out.read_text()), json.loads(line[len("SCALE-ROW "):]), shape=shape, version=version,
                       prompt=prompt, weights=fp32_weight_bytes(ckpt), ckpt=ckpt.stat().st_size, dumps=dir_bytes(dump_dir))
        shutil.rmtree(dump_dir, ignore_errors=True)
        with lock:  # every finished row is written at once: a run cut short keeps what it measured
            rows.append(row)
            print(fmt_row(row), flush=True)
            write_results(rows, args=args)

    # Prompt by prompt across the shapes: a run cut short has every shape's first prompt.
    todo = [(shape, version, prompt) for prompt in prompts for shape, version in plan
            if not (prompt.startswith("random:512") and shape not in LONG_PROMPT_SHAPES)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one_row, i, *t) for i, t in enumerate(todo)]:
            f.result()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
