"""Peak memory of `parity run` at released model sizes: does one machine hold reference, TVM and chatrwkv?

    python benchmarks/memory.py [--shapes 0.4b,1.5b] [--version 5.2] [--trees HEAD] [--synth-dir DIR]

For each shape, `parity synth` writes a checkpoint (bf16, emb fp32; into a temporary directory, or
--synth-dir to keep and reuse it), then for each tree (a git revision, exported with `git archive`,
so a run measures committed code only) one fresh process runs

    parity run --checkpoint CK --backends reference,tvm,chatrwkv --ids random:64:3 --decode-steps 64 --dump-dir TMP

Every backend but the torch reference runs in a worker process of its own (parity/dumpers/worker.py),
so the figure that says whether one machine holds the run is the whole process tree's at one
moment. Every 0.2 s we sum, over the run's process and all its descendants, VmRSS (the tree's RSS:
pages two processes share, e.g. the checkpoint file's, count once per process) and Pss from
/proc/PID/smaps_rollup (proportional: a shared page is split between its processes, so the sum is
the memory the tree holds), and keep the largest of each with the per-process parts (RssAnon:
private; RssFile: memory-mapped files, the checkpoint's pages among them) at that moment. Also: the
run's own peak RSS (ru_maxrss from os.wait4: the largest single process of the tree, not a sum),
wall time, the dump's bytes, and whether the run compiled the model (the compile cache is shared by
every run of one invocation, so the first run of a shape compiles and later ones find it, unless a
tree's model sources differ). The target (issue 9): the tree's peak RSS <= 1.3 x (the fp32 weights
+ the checkpoint file).

Writes benchmarks/results/memory-<date>-<commit>.md and .json (the commit of this checkout; each
row names the commit it ran). Numbers are from this machine in this run only.

    python benchmarks/memory.py --shapes 0.4b --trees f653b1b,HEAD --synth-dir /tmp/h4   # before/after
    python benchmarks/memory.py --checkpoint /tmp/m1/m01.safetensors --trees f661eed,HEAD \
        --ids random:512:5 --decode-steps 4 --suffix long-prompt-2      # a checkpoint you made already

--checkpoint measures the given files instead of synthesising --shapes (a row's shape is then the
file's name); --suffix is added to the results' file names, so a second table of one day and
commit does not overwrite the first.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_FACTOR = 1.3  # issue 9: peak RSS <= 1.3 x (fp32 weights + checkpoint file)
POLL_S = 0.2


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def export_tree(rev: str, dest: Path) -> str:
    """``git archive`` of ``rev`` into ``dest``; returns its full commit hash."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (/proc/PID/status) and Pss (/proc/PID/smaps_rollup) of one process, KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _tree(root: int) -> list[int]:
    """``root`` and every descendant alive now (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = [root], True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.append(pid)
                grew = True
    return tree


def _first_to_go() -> None:
    # A shared machine: if a run (an old tree's, say) needs more memory than is free, the kernel's
    # OOM killer must pick it, not someone else's process. Its exit code then reads -9.
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def measure(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> dict:
    """Run ``cmd``; its exit code, wall time, the process tree's peak RSS and PSS (sampled sums),
    the parts of each process at the RSS peak, and the largest single process's peak (wait4)."""
    peak = {"rss": 0, "pss": 0, "at": {}, "t": None}
    hwm: dict[int, int] = {}  # pid -> its own peak RSS (VmHWM: the kernel's, not sampled), at its last sample
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_first_to_go)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            parts = {pid: _status_kb(pid) for pid in _tree(proc.pid)}
            parts = {pid: kb for pid, kb in parts.items() if kb}
            rss = sum(kb.get("VmRSS", 0) for kb in parts.values())
            for pid, kb in parts.items():
                hwm[pid] = max(hwm.get(pid, 0), kb.get("VmHWM", 0))
            peak["pss"] = max(peak["pss"], sum(kb.get("Pss", 0) for kb in parts.values()))
            if rss > peak["rss"]:
                peak.update(rss=rss, at=parts, t=round(time.perf_counter() - t0, 1))
            done.wait(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    at = list(peak["at"].values())
    return {
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_tree_rss_bytes": peak["rss"] * 1024,
        "peak_tree_pss_bytes": peak["pss"] * 1024,
        "peak_tree_at_s": peak["t"],
        # Each process of the tree at its RSS peak, the run's own first: RSS, private, file-backed.
        "peak_tree_processes": [{"rss_bytes": kb.get("VmRSS", 0) * 1024, "anon_bytes": kb.get("RssAnon", 0) * 1024,
                                 "file_bytes": kb.get("RssFile", 0) * 1024} for kb in at],
        "peak_single_process_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB; the largest one process reached
        # Each process's own peak, in the order they started (the run's own first): VmHWM at its last
        # sample, so a process's peak in its last 0.2 s can be missed (the run's own: ru_maxrss above).
        "process_peaks_bytes": [kb * 1024 for _, kb in sorted(hwm.items())],
        "output_tail": [line for line in output.strip().splitlines() if "Warning:" not in line][-2:],
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def synth(shape: str, *, version: str, out: Path, env: dict[str, str], extra: list[str]) -> dict | None:
    """Write the checkpoint unless it is there already (a --synth-dir from an earlier run)."""
    if out.exists():
        return None
    cmd = [sys.executable, "-m", "parity.cli", "synth", "--shape", shape, "--version", version, *extra, "-q", str(out)]
    print(f"  synth {shape} -> {out}", flush=True)
    m = measure(cmd, cwd=ROOT, env=env)
    if m["exit_code"] != 0:
        sys.exit(f"parity synth failed: {m['output_tail']}")
    return {"wall_s": m["wall_s"], "peak_rss_bytes": m["peak_tree_rss_bytes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.4b,1.5b", help="comma-separated released shapes (default 0.4b,1.5b; 3b needs ~20 GB)")
    ap.add_argument("--version", default="5.2")
    ap.add_argument("--trees", default="HEAD", help="comma-separated git revisions to measure (default HEAD)")
    ap.add_argument("--backends", default="reference,tvm,chatrwkv")
    ap.add_argument("--ids", default="random:64:3",
                    help="the prompt: as `parity run --ids`, or scenario:NAME for a bundled text scenario "
                         "(fixtures/scenarios/NAME.json, run with --scenario: its greedy decoding too, as benchmarks/scale.py)")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--layers", type=int, help="synthesise only N layers (a quick check of this script, not a measurement)")
    ap.add_argument("--vocab", type=int, help="synthesise a vocabulary of V tokens (likewise)")
    ap.add_argument("--synth-dir", type=Path, help="keep (and reuse) the synthesised checkpoints here")
    ap.add_argument("--checkpoint", type=Path, action="append", default=[],
                    help="measure this checkpoint file (repeatable) instead of synthesising --shapes")
    ap.add_argument("--suffix", default="", help="added to the results' file names: memory-<date>-<commit>-SUFFIX")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the Markdown and JSON go")
    args = ap.parse_args()

    here = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    rows, synths = [], {}
    now = _dt.datetime.now(_dt.timezone.utc)

    def write(rows: list[dict]) -> None:
        result = {
            "benchmark": "memory", "created": now.isoformat(timespec="seconds"), "checkout_commit": here,
            "checkout_dirty": dirty, "cpu_count": os.cpu_count(), "target_factor": TARGET_FACTOR,
            "synth": synths, "rows": rows,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"memory-{now:%Y-%m-%d}-{here[:10]}{'-' + args.suffix if args.suffix else ''}"
        # Not with_suffix: a --suffix with a dot in it (0.4b) would lose its tail.
        Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        Path(f"{stem}.md").write_text(markdown(result))
        print(f"wrote {stem}.md and .json", flush=True)

    with tempfile.TemporaryDirectory(prefix="parity-memory-") as tmp:
        tmp = Path(tmp)
        synth_dir = args.synth_dir or tmp / "checkpoints"
        synth_dir.mkdir(parents=True, exist_ok=True)
        cache = tmp / "compile-cache"
        env = dict(os.environ, PARITY_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
        trees = {}
        for rev in args.trees.split(","):
            trees[rev] = (tmp / f"tree-{len(trees)}", None)
            trees[rev] = (trees[rev][0], export_tree(rev, trees[rev][0]))
        from parity.checkpoint import load_checkpoint

        for shape in args.checkpoint or args.shapes.split(","):
            if args.checkpoint:  # given: measured as it is, named by its file
                ck_path, shape, suffix = shape.resolve(), shape.name, ""
                if not ck_path.is_file():
                    sys.exit(f"--checkpoint {ck_path}: no such file")
            else:
                extra = [*(["--layers", str(args.layers)] if args.layers else []),
                         *(["--vocab", str(args.vocab)] if args.vocab else [])]
                suffix = "".join(f"-{a.lstrip('-')[0]}{b}" for a, b in zip(extra[::2], extra[1::2]))
                ck_path = synth_dir / f"rwkv{args.version.replace('.', '_')}-{shape}{suffix}.pth"
                synths[shape + suffix] = synth(shape, version=args.version, out=ck_path, env=env, extra=extra)
            ck = load_checkpoint(ck_path)
            version = ck.config.version.value
            fp32, file_bytes = ck.fp32_nbytes(), ck_path.stat().st_size
            del ck
            for rev, (tree, commit) in trees.items():
                dump_dir = tmp / f"dumps-{shape}-{commit[:12]}"
                source = ["--scenario", str(tree / "fixtures" / "scenarios" / (args.ids.split(":", 1)[1] + ".json"))] \
                    if args.ids.startswith("scenario:") else ["--ids", args.ids]
                cmd = [sys.executable, "-m", "parity.cli", "run", "--checkpoint", str(ck_path),
                       "--backends", args.backends, *source, "--decode-steps", str(args.decode_steps),
                       "--dump-dir", str(dump_dir), "-q"]
                before = set(cache.glob("*.so")) if cache.exists() else set()
                print(f"  run {shape} on {rev} ({commit[:12]})", flush=True)
                # PYTHONPATH and cwd: the exported tree's parity, never this checkout's.
                m = measure(cmd, cwd=tree, env=dict(env, PYTHONPATH=str(tree)))
                target = TARGET_FACTOR * (fp32 + file_bytes)
                row = {
                    "shape": shape + suffix, "version": version, "tree": rev, "commit": commit,
                    "fp32_weight_bytes": fp32, "checkpoint_file_bytes": file_bytes,
                    "target_bytes": int(target), **m,
                    "ratio": round(m["peak_tree_rss_bytes"] / (fp32 + file_bytes), 2),
                    "within_target": m["peak_tree_rss_bytes"] <= target,
                    "dump_bytes": _dir_bytes(dump_dir) if dump_dir.exists() else 0,
                    "compiled": bool(set(cache.glob("*.so")) - before),
                    "command": "parity " + " ".join(cmd[3:]),
                }
                rows.append(row)
                write(rows)  # after every row: a long invocation leaves what it measured so far
                print(f"    exit {m['exit_code']}, {m['wall_s']} s, tree peak RSS {m['peak_tree_rss_bytes'] / 1e9:.2f} GB "
                      f"({row['ratio']}x fp32 + file; target {target / 1e9:.2f} GB), PSS {m['peak_tree_pss_bytes'] / 1e9:.2f} GB",
                      flush=True)
                if dump_dir.exists():
                    subprocess.run(["rm", "-rf", str(dump_dir)], check=True)

    write(rows)
    return 0


def markdown(result: dict) -> str:
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = [
        f"# Peak memory of `parity run` at released sizes ({result['created'][:10]}, checkout {result['checkout_commit'][:10]})",
        "",
        f"{result['cpu_count']} CPU cores. One fresh process tree per row: `{result['rows'][0]['command'] if result['rows'] else ''}`.",
        f"Target (issue 9): the tree's peak RSS <= {result['target_factor']} x (fp32 weights + checkpoint file). "
        "Tree RSS: the sum of VmRSS over the run's process and its workers at one moment (sampled every "
        f"{POLL_S} s); a page two processes share counts once per process. Tree PSS: the same sum of Pss, shared "
        "pages split, i.e. the memory the tree holds. At the peak, per process: RSS = private (RssAnon) + "
        "file-backed (RssFile, the checkpoint's mapped pages among them). Largest process: ru_maxrss. "
        "Each process's own peak: its VmHWM, the run's process first, then its workers in the order they started. GB = 10^9 bytes.",
        "",
        "| shape | tree (commit) | fp32 weights GB | file GB | target GB | tree peak RSS GB | / (fp32 + file) | "
        "within target | tree peak PSS GB | at the peak: each process RSS (anon + file) GB | largest process GB | "
        "each process's own peak (VmHWM) GB | wall s | dump MB | compiled | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        procs = "; ".join(f"{gb(p['rss_bytes'])} ({gb(p['anon_bytes'])} + {gb(p['file_bytes'])})"
                          for p in r["peak_tree_processes"])
        lines.append(
            f"| {r['shape']} (v{r['version']}) | {r['tree']} ({r['commit'][:10]}) | {gb(r['fp32_weight_bytes'])} | "
            f"{gb(r['checkpoint_file_bytes'])} | {gb(r['target_bytes'])} | {gb(r['peak_tree_rss_bytes'])} | "
            f"{r['ratio']} | {'yes' if r['within_target'] else 'NO'} | {gb(r['peak_tree_pss_bytes'])} | {procs} | "
            f"{gb(r['peak_single_process_rss_bytes'])} | "
            f"{', '.join(gb(b) for b in r.get('process_peaks_bytes', [])) or '-'} | {r['wall_s']} | {r['dump_bytes'] / 1e6:.1f} | "
            f"{'yes' if r['compiled'] else 'no'} | {r['exit_code']} |"
        )
    if any(r["exit_code"] == -9 for r in result["rows"]):
        lines += ["", "Exit -9: killed by the kernel's OOM killer (this script makes each run its first pick); "
                  "its peak RSS is where it was stopped, a lower bound on what it needed."]
    lines += ["", "Exit 1 is a DIVERGENCE verdict (the run finished); this table is about memory, not verdicts."]
    synths = {k: v for k, v in result["synth"].items() if v}
    if synths:
        lines += ["", "`parity synth` of each shape (when not reused):", ""]
        lines += [f"- {k}: {v['wall_s']} s, peak RSS {gb(v['peak_rss_bytes'])} GB" for k, v in synths.items()]
    lines += ["", "Last output lines of each run:", ""]
    lines += [f"- {r['shape']} {r['tree']}: `{' / '.join(r['output_tail'])}`" for r in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
