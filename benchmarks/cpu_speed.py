"""CPU speed: the scheduled llvm build vs torch eager, side by side in one process, one machine.

    python benchmarks/cpu_speed.py [--shape 0.4b] [--prefill-len 64] [--decode-steps 10] [--threads N] [--out DIR]

Both run the same RWKV-5.2 model of a released shape (random weights: speed does not depend on
their values) on every core of this machine: torch eager is the parity reference
(parity/reference, fp32, torch.set_num_threads = cores); the compiled model is the llvm build of
parity/compiled (matmuls scheduled by parity/compiled/schedule_cpu.py), built cold into a fresh
cache so its compile time is measured too. Prefill: one prompt of --prefill-len tokens from the
zero state (best of 3); decode: the mean of --decode-steps steps, state carried. The two are
timed alternately, so load on a shared machine falls on both. Prints a table and, with --out,
writes cpu-speed.json and cpu-speed.md there (date, commit, CPU, command, load averages).

--threads 1 runs both on one thread (TVM_NUM_THREADS=1, torch.set_num_threads(1)) and times
them in the thread's CPU time instead of wall time: on a machine shared with other work, wall
time counts the time the scheduler gave to others, CPU time does not, so the ratio of two
single-thread runs says how fast each one's code is even under load (what it cannot show is how
well each scales over cores: that needs the default, every core, on a quiet machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu import random_weights  # noqa: E402

from parity.checkpoint import Checkpoint  # noqa: E402
from parity.synth import shape_config  # noqa: E402


def _best(fn, repeat: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="0.4b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (a quick look)")
    ap.add_argument("--prefill-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: every core); 1 times CPU time")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or cores
    if threads < 1:
        print(f"error: --threads must be at least 1, not {threads}", file=sys.stderr)
        return 2
    # Read by TVM's thread pool when it first starts (the first parallel kernel), so set before any build.
    os.environ["TVM_NUM_THREADS"] = str(threads)
    # One thread: its own CPU time, blind to the time other processes took; several: wall time.
    clock = time.thread_time if threads == 1 else time.perf_counter
    load_start = list(os.getloadavg())

    from parity.compiled.build import build_model, target_spec
    from parity.compiled.runtime import CompiledRWKV
    from parity.reference import make_reference

    torch.set_num_threads(threads)
    config = shape_config(args.shape, version="5.2", layers=args.layers)
    ck = Checkpoint(path=Path(f"random-{args.shape}"), sha256="-", config=config, weights=random_weights(config, seed=0))
    with tempfile.TemporaryDirectory(prefix="parity-cpu-bench-") as cache:
        t0 = time.perf_counter()
        art = build_model(config, variant="plain", target="llvm", cache_dir=Path(cache))
        build_s = time.perf_counter() - t0
        tvm_model = CompiledRWKV(ck, variant="plain", target="llvm", cache_dir=Path(cache), artifact=art)
        ref = make_reference(ck)
        ids = [int(i) for i in np.random.default_rng(0).integers(0, config.vocab_size, args.prefill_len)]

        def tvm_prefill():
            return tvm_model.forward(ids)

        def torch_prefill():
            with torch.no_grad():
                return ref.forward(ids, ref.zero_state())

        tvm_prefill(), torch_prefill()  # warm-up (first-call allocation)
        t_tvm_prefill = t_torch_prefill = float("inf")
        cpu_tvm_prefill = cpu_torch_prefill = float("inf")
        for _ in range(3):  # alternate, best of 3 each
            c0 = time.process_time()
            t_tvm_prefill = min(t_tvm_prefill, _best(tvm_prefill, 1, clock))
            c1 = time.process_time()
            t_torch_prefill = min(t_torch_prefill, _best(torch_prefill, 1, clock))
            c2 = time.process_time()
            # The CPU time of every thread of the process: with one thread the same as the clock;
            # with several, what a prefill costs the machine (spinning idle threads included).
            cpu_tvm_prefill, cpu_torch_prefill = min(cpu_tvm_prefill, c1 - c0), min(cpu_torch_prefill, c2 - c1)
        tvm_state = tvm_prefill().state
        with torch.no_grad():
            _, ref_state = torch_prefill()
        tvm_dec, torch_dec = [], []
        for step in range(args.decode_steps):
            tok = [ids[step % len(ids)]]
            t0 = clock()
            tvm_state = tvm_model.forward(tok, tvm_state).state
            tvm_dec.append(clock() - t0)
            t0 = clock()
            with torch.no_grad():
                _, ref_state = ref.forward(tok, ref_state)
            torch_dec.append(clock() - t0)
        # The first decode call of each includes one-time work; the mean is over the rest.
        t_tvm_dec, t_torch_dec = float(np.mean(tvm_dec[1:])), float(np.mean(torch_dec[1:]))

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "cpu": f"{cpu}, {cores} cores",
        "threads": threads,
        "clock": "thread CPU time" if threads == 1 else "wall time",
        "llvm_target": target_spec("llvm"),
        "torch": torch.__version__,
        "command": shlex.join(["python", "benchmarks/cpu_speed.py", *sys.argv[1:]]),
        # A shared machine: torch's OpenMP threads suffer more than TVM's pool when cores are oversubscribed.
        "load_average_1_5_15_start": load_start,
        "load_average_1_5_15": list(os.getloadavg()),
        "config": config.describe(),
        "prefill_len": args.prefill_len,
        "compile_seconds": art.meta["compile_seconds"],
        "export_seconds": art.meta["export_seconds"],
        "build_seconds_cold": build_s,
        "tvm_prefill_s": t_tvm_prefill,
        "torch_prefill_s": t_torch_prefill,
        "prefill_ratio": t_tvm_prefill / t_torch_prefill,
        "tvm_prefill_process_cpu_s": cpu_tvm_prefill,
        "torch_prefill_process_cpu_s": cpu_torch_prefill,
        "tvm_decode_ms": t_tvm_dec * 1e3,
        "torch_decode_ms": t_torch_dec * 1e3,
        "decode_ratio": t_tvm_dec / t_torch_dec,
    }
    lines = [
        f"# CPU speed, {result['cpu']}, {result['date']}, commit {commit}", "",
        f"`{result['command']}` — {result['config']}, fp32, prefill of {args.prefill_len} tokens (best of 3), "
        f"decode mean of {args.decode_steps - 1} steps; llvm target {json.dumps(result['llvm_target'])}; "
        f"{threads} thread{'s' if threads > 1 else ''} each, {result['clock']}.", "",
        "| | TVM llvm (scheduled) | torch eager (parity reference) | TVM ÷ torch |", "|---|---|---|---|",
        f"| prefill | {t_tvm_prefill:.3f} s | {t_torch_prefill:.3f} s | {result['prefill_ratio']:.2f}× |",
        f"| decode | {t_tvm_dec * 1e3:.1f} ms/token | {t_torch_dec * 1e3:.1f} ms/token | {result['decode_ratio']:.2f}× |", "",
        f"Prefill CPU time of all the process's threads (best of 3): TVM {cpu_tvm_prefill:.3f} s, torch {cpu_torch_prefill:.3f} s.",
        f"Build (cold): {build_s:.1f} s — compile {art.meta['compile_seconds']} s, export (LLVM codegen) {art.meta['export_seconds']} s.",
        f"Load average (1/5/15 min) at the start: {', '.join(f'{x:.1f}' for x in load_start)}; at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {cores} cores.",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu-speed.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "cpu-speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
