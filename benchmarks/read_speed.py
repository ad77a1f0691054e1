"""How fast a dump's stages are read, before and after the reader stopped reopening step files.

    python benchmarks/read_speed.py --expected DUMP --actual DUMP [--before REV] [--rss-step N] [--suffix S]

Until the reader parsed each step file's header once (parity/dumpers/format.py, _StepFile), every
stage lookup opened the file with safetensors' ``safe_open``, which parses the header and maps the
file each time. This measures, in one run on one machine, the reader of git revision ``--before``
(its format.py, loaded from ``git show``) against this checkout's:

- per lookup: ``read_stage`` of every recorded stage of every step of ``--expected``, old and new
  alternating stage by stage (so both see the same page cache; every file is read once first, so
  neither pays for the disk), median and mean ms;
- the comparison phase: opening both dumps and ``compare_runs`` on them (the float policy of the
  dump's dtype), old and new alternating, best of ``--repeats``; with the seconds spent opening,
  in stage lookups (``StepArrays.__getitem__``, wrapped with a timer) and in ``read_step``;
- memory: in a fresh process per reader, every stage of step ``--rss-step`` (default: the largest
  step file) read once and dropped; the growth of peak RSS (VmHWM) over the RSS before reading, and
  the RSS left after, beside the largest array and the file's size. Reading a stage should cost
  about that stage, not the file;
- the parsed headers the new reader keeps (tracemalloc: what DumpReader holds once built).

Writes benchmarks/results/read_speed[-SUFFIX].md and .json. Numbers are from this machine in this
run only (a shared 2-core machine: other work adds noise; the alternation shares it out).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

BEFORE = "542c97a"  # the last commit whose reader opened the file with safe_open at every lookup


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def load_reader_module(rev: str | None):
    """This checkout's parity.dumpers.format, or ``rev``'s version of that file as a module of its own."""
    if rev is None:
        from parity.dumpers import format as current
        return current
    source = _git("show", f"{rev}:parity/dumpers/format.py")
    spec = importlib.util.spec_from_loader(f"format_at_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:parity/dumpers/format.py", "exec"), module.__dict__)
    return module


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_child(dump: str, step: int | None, rev: str | None) -> dict:
    """In this (fresh) process: read every stage of one step once, dropping each."""
    fmt = load_reader_module(rev)
    reader = fmt.DumpReader(dump)
    if step is None:
        step = max(range(len(reader.steps)), key=lambda i: (reader.path / reader.manifest["steps"][i]["file"]).stat().st_size)
    file = reader.path / reader.manifest["steps"][step]["file"]
    gc.collect()
    before = _status_kib("VmRSS")
    largest = 0
    t0 = time.perf_counter()
    for name in reader.step_stages(step):
        array = reader.read_stage(step, name)
        largest = max(largest, array.nbytes)
        del array
    seconds = time.perf_counter() - t0
    gc.collect()
    return {
        "step": step, "file_bytes": file.stat().st_size, "stages": len(reader.step_stages(step)),
        "largest_array_bytes": largest, "rss_before_kib": before, "peak_growth_kib": _status_kib("VmHWM") - before,
        "rss_after_growth_kib": _status_kib("VmRSS") - before, "seconds": seconds,
    }


def per_lookup(dump: str, old, new) -> dict:
    readers = {"before": old.DumpReader(dump), "after": new.DumpReader(dump)}
    lookups = [(s.index, name) for s in readers["after"].steps for name in readers["after"].step_stages(s.index)]
    for index, name in lookups:  # warm the page cache: neither side pays for the disk
        readers["after"].read_stage(index, name)
    times: dict[str, list[float]] = {"before": [], "after": []}
    for i, (index, name) in enumerate(lookups):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        arrays = {}
        for which in order:
            t0 = time.perf_counter()
            arrays[which] = readers[which].read_stage(index, name)
            times[which].append(time.perf_counter() - t0)
        if arrays["before"].tobytes() != arrays["after"].tobytes() or arrays["before"].dtype != arrays["after"].dtype:
            raise SystemExit(f"the readers disagree on step {index} stage {name}")
    return {
        which: {"lookups": len(t), "median_ms": 1e3 * statistics.median(t), "mean_ms": 1e3 * statistics.fmean(t),
                "total_s": sum(t)}
        for which, t in times.items()
    }


def _timing(cls, attr: str, acc: dict):
    """Wrap ``cls.attr`` to add its calls and seconds to ``acc``; returns the original, to restore."""
    original = getattr(cls, attr)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[attr] = acc.get(attr, 0.0) + time.perf_counter() - t0
            acc[attr + "_calls"] = acc.get(attr + "_calls", 0) + 1

    setattr(cls, attr, timed)
    return original


def comparison_phase(expected: str, actual: str, old, new, *, repeats: int) -> dict:
    from parity.compare import TolerancePolicy, compare_runs

    best: dict[str, dict] = {}
    verdicts = {}
    for r in range(repeats):
        for which, fmt in ((("before", old), ("after", new)) if r % 2 == 0 else (("after", new), ("before", old))):
            gc.collect()
            acc: dict = {}
            # Where the time goes: stage lookups (StepArrays) and step reads, timed from outside.
            saved = [(fmt.StepArrays, a, _timing(fmt.StepArrays, a, acc)) for a in ("__getitem__",)]
            saved += [(fmt.DumpReader, a, _timing(fmt.DumpReader, a, acc)) for a in ("read_step",)]
            try:
                t0 = time.perf_counter()
                exp, act = fmt.DumpReader(expected), fmt.DumpReader(actual)
                opened = time.perf_counter() - t0
                out = compare_runs(actual=act, expected=exp, policy=TolerancePolicy.for_dtype(exp.dtype))
                seconds = time.perf_counter() - t0
            finally:
                for cls, attr, original in saved:
                    setattr(cls, attr, original)
            run = {"total_s": seconds, "open_s": opened, "lookups": acc["__getitem___calls"],
                   "lookup_s": acc["__getitem__"], "read_step_s": acc["read_step"]}
            if which not in best or seconds < best[which]["total_s"]:
                best[which] = run
            fd = out.first_divergence
            verdicts[which] = (len(out.records), out.passed, None if fd is None else (fd.step, fd.stage))
    if verdicts["before"] != verdicts["after"]:
        raise SystemExit(f"the readers give different comparisons: {verdicts}")
    return {"best": best, "records": verdicts["after"][0], "passed": verdicts["after"][1], "repeats": repeats}


def header_memory(dump: str, new) -> int:
    gc.collect()
    tracemalloc.start()
    reader = new.DumpReader(dump)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del reader
    return held


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expected", required=True, help="a dump directory (e.g. a run's reference dump)")
    ap.add_argument("--actual", required=True, help="the dump compared with it (e.g. the tvm dump of the same run)")
    ap.add_argument("--before", default=BEFORE, help=f"the git revision whose reader is 'before' (default {BEFORE})")
    ap.add_argument("--rss-step", type=int, default=None, help="the step read for memory (default: the largest file)")
    ap.add_argument("--rss-dump", default=None, help="the dump read for memory (default: --expected)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--suffix", default="")
    ap.add_argument("--rss-child", nargs=3, metavar=("DUMP", "STEP", "REV"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.rss_child:
        dump, step, rev = args.rss_child
        print(json.dumps(rss_child(dump, None if step == "-" else int(step), None if rev == "-" else rev)))
        return 0

    old, new = load_reader_module(args.before), load_reader_module(None)
    result: dict = {
        "commit": _git("rev-parse", "--short", "HEAD").strip(), "before": args.before,
        "command": "python benchmarks/read_speed.py " + " ".join(sys.argv[1:]),
        "expected": args.expected, "actual": args.actual,
        "stages_per_dump": sum(len(s["stages"]) for s in json.loads((Path(args.expected) / "manifest.json").read_text())["steps"]),
    }
    result["per_lookup"] = per_lookup(args.expected, old, new)
    result["comparison"] = comparison_phase(args.expected, args.actual, old, new, repeats=args.repeats)
    result["header_bytes_held"] = header_memory(args.expected, new)
    rss_dump = args.rss_dump or args.expected
    result["rss"] = {}
    for which, rev in (("before", args.before), ("after", "-")):
        proc = subprocess.run(
            [sys.executable, __file__, "--expected", "-", "--actual", "-", "--rss-child", rss_dump,
             "-" if args.rss_step is None else str(args.rss_step), rev],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )
        result["rss"][which] = json.loads(proc.stdout)
        result["rss"][which]["dump"] = rss_dump

    name = "read_speed" + (f"-{args.suffix}" if args.suffix else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    pl, cmp, rss = r["per_lookup"], r["comparison"], r["rss"]
    cb, ca = cmp["best"]["before"], cmp["best"]["after"]
    mib = 1 / 1024
    lines = [
        f"# Dump read speed: reader of {r['before']} (safe_open per lookup) vs {r['commit']} (header parsed once)",
        "",
        f"expected: `{r['expected']}` ({r['stages_per_dump']} recorded stages), actual: `{r['actual']}`",
        "",
        f"    {r['command']}",
        "",
        "| | before | after | before / after |",
        "|---|---:|---:|---:|",
        f"| per lookup, median ms ({pl['after']['lookups']} lookups) | {pl['before']['median_ms']:.3f} | "
        f"{pl['after']['median_ms']:.3f} | {pl['before']['median_ms'] / pl['after']['median_ms']:.1f}x |",
        f"| per lookup, mean ms | {pl['before']['mean_ms']:.3f} | {pl['after']['mean_ms']:.3f} | "
        f"{pl['before']['mean_ms'] / pl['after']['mean_ms']:.1f}x |",
        f"| comparison phase s (open both + compare_runs, {cmp['records']} records, best of {cmp['repeats']}) | "
        f"{cb['total_s']:.2f} | {ca['total_s']:.2f} | {cb['total_s'] / ca['total_s']:.1f}x |",
        f"| — opening both dumps s | {cb['open_s']:.3f} | {ca['open_s']:.3f} | {cb['open_s'] / ca['open_s']:.1f}x |",
        f"| — stage lookups during it: s ({ca['lookups']} lookups) | {cb['lookup_s']:.2f} | {ca['lookup_s']:.2f} | "
        f"{cb['lookup_s'] / ca['lookup_s']:.1f}x |",
        f"| — read_step calls s | {cb['read_step_s']:.3f} | {ca['read_step_s']:.3f} | |",
        f"| read every stage of step {rss['after']['step']} once, s | {rss['before']['seconds']:.2f} | {rss['after']['seconds']:.2f} | |",
        f"| — peak RSS growth MiB | {rss['before']['peak_growth_kib'] * mib:.1f} | {rss['after']['peak_growth_kib'] * mib:.1f} | |",
        f"| — RSS growth left after MiB | {rss['before']['rss_after_growth_kib'] * mib:.1f} | {rss['after']['rss_after_growth_kib'] * mib:.1f} | |",
        "",
        f"Memory step: `{rss['after']['dump']}` step {rss['after']['step']}: {rss['after']['stages']} stages, file "
        f"{rss['after']['file_bytes'] / 2**20:.1f} MiB, largest array {rss['after']['largest_array_bytes'] / 2**20:.1f} MiB.",
        f"Parsed headers the new reader holds for `{r['expected']}`: {r['header_bytes_held'] / 2**20:.2f} MiB (tracemalloc).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
