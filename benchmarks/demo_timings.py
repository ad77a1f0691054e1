"""Wall time and peak memory of `parity demo`, cold (empty compile cache) and warm.

    python benchmarks/demo_timings.py [--runs 3]

Each run is a fresh `parity demo` process, so import time and model loading count, as they do
for a user. Peak RSS is the child's ru_maxrss. Prints one table; numbers are from this machine
in this run only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(*, cache: Path, report_dir: Path) -> tuple[float, float, int]:
    env = dict(os.environ, PARITY_CACHE_DIR=str(cache))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "parity.cli", "demo", "--quiet", "--report-dir", str(report_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        sys.exit(f"parity demo exited {proc.returncode}: {proc.stderr.strip()}")
    # ru_maxrss of children is the max over all children so far; report it only when it rose.
    return wall, max(peak_kb, before) / 1024, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="warm runs after the cold one (default 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, reports = Path(tmp) / "cache", Path(tmp) / "reports"
        cold_wall, cold_rss, _ = one_run(cache=cache, report_dir=reports)
        meta = json.loads(next(cache.glob("*.json")).read_text())
        warm = [one_run(cache=cache, report_dir=reports) for _ in range(args.runs)]
        shutil.rmtree(cache)
    warm_walls = sorted(w for w, _, _ in warm)
    print(f"parity demo, {os.cpu_count()} cores")
    print(f"  cold (empty compile cache): {cold_wall:6.2f} s wall, peak RSS {cold_rss:.0f} MiB")
    print(f"    TVM compile {meta['compile_seconds']:.2f} s + export_library {meta['export_seconds']:.2f} s")
    print(f"  warm (cached .so), median of {len(warm)}: {warm_walls[len(warm_walls) // 2]:6.2f} s wall "
          f"(min {warm_walls[0]:.2f}, max {warm_walls[-1]:.2f})")
    print(f"  warm/cold wall ratio: {warm_walls[len(warm_walls) // 2] / cold_wall:.2f}")


if __name__ == "__main__":
    main()
