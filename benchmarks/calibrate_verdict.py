"""Reproduce the figures behind the verdict's constants (parity/compare/verdict.py, tolerance.py).

1. Correct backends (reference, tvm, chatrwkv, and the numpy plug-in on 5.2), every bundled
   fixture, two prompts, 64 decode steps; the demo fixture with 3,000 decode steps; and any
   released-shape checkpoint given with --checkpoint (make one with ``parity synth``). For each
   pair: the worst propagated ratio (min_atol / atol), the envelope constant it would need
   (max over records of ratio / (depth + 1)) and the worst own (replayed) ratio.
2. The bug zoo (CPU mutants): each mutant's own-error ratio at its first divergence — how far
   above its allowance the mildest porting bug sits, i.e. the margin the per-stage tolerance has.

Writes benchmarks/results/calibrate_verdict.md and .json with the date and commit.

    python benchmarks/calibrate_verdict.py                      # fixtures + zoo (~15 min on 2 cores)
    python benchmarks/calibrate_verdict.py --checkpoint 0.4b.pth --ids random:64:3 --skip-zoo
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from parity.checkpoint import load_checkpoint  # noqa: E402
from parity.compare.verdict import DRIFT_ENVELOPES, is_carried, record_depth, record_ratio  # noqa: E402
from parity.dumpers.backends import RunPlan  # noqa: E402
from parity.session import default_decode_ids, parse_ids, run_parity  # noqa: E402

FIXTURES = sorted((REPO / "fixtures").glob("*.pth"))
NUMPY = f"{REPO}/examples/numpy_rwkv5.py:make_backend"


def needed_per_layer(records: list[dict]) -> float:
    """The smallest envelope constant K (allowances per unit of depth) these records' carried
    stages fit in: the drift envelope is K * (depth + 1) on the carried stages."""
    n_layer = 1 + max((r["layer"] for r in records if r.get("layer") is not None), default=-1)
    return max((record_ratio(r) / (record_depth(r, n_layer=n_layer) + 1) for r in records if is_carried(r["stage"])),
               default=0.0)


def measure(ck_path: Path, *, backends: list[str], ids: str, steps: int, work: Path, arbiter: bool = True) -> list[dict]:
    """Every correct backend against the reference, and the fp32 reference against float64."""
    from parity.session import compare_dumps

    ck = load_checkpoint(ck_path)
    plan = RunPlan(prefill_ids=parse_ids(ids, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=steps, vocab_size=ck.config.vocab_size))
    t0 = time.perf_counter()
    out = run_parity(ck, backends=backends, plan=plan, dump_dir=work / "dumps", arbiter=arbiter, arbiter_multiplier=1e9)
    multipliers = {b["backend"]: max((r["min_multiplier"] for r in b["records"] if isinstance(r["min_multiplier"], float)),
                                     default=0.0) for b in out.result.get("arbiter", [])}
    pairs = [(backends[0], spec) for spec in backends[1:]] + ([("reference-fp64", "reference")] if arbiter else [])
    rows = []
    for expected, spec in pairs:
        prop = compare_dumps(out.dumps[expected], out.dumps[spec])
        own = out.own_comparisons.get(spec)
        rows.append({
            "checkpoint": ck_path.name, "model": ck.config.describe(),
            "pair": f"{expected}~{spec.split(':')[-1]}", "ids": ids, "decode_steps": steps,
            "verdict": out.result.get("tolerance_verdict", out.result)["verdict"] if expected != "reference-fp64" else None,
            "carried_worst_ratio": max((record_ratio(r) for r in prop["records"] if is_carried(r["stage"])), default=0.0),
            "any_stage_worst_ratio": max(map(record_ratio, prop["records"])),
            "needed_per_layer": needed_per_layer(prop["records"]),
            "own_worst_ratio": max(map(record_ratio, own["records"])) if own else None,
            "arbiter_multiplier": multipliers.get(spec),
            "kl_max": (prop.get("end_to_end") or {}).get("kl_max"),
            "wall_s": time.perf_counter() - t0,
        })
        print(json.dumps(rows[-1]), flush=True)
    import shutil

    shutil.rmtree(work / "dumps", ignore_errors=True)
    return rows


def zoo(work: Path) -> list[dict]:
    from parity.mutants import CATALOGUE
    from parity.selftest import run_mutant

    rows = []
    for name, mutant in CATALOGUE.items():
        row = run_mutant(mutant, cache_dir=None, work=work)
        found = row.found_isolated or {}  # the own-error comparison: isolated for tvm mutants, else replay
        rows.append({"mutant": name, "stage": found.get("stage"), "step": found.get("step"),
                     "own_ratio_at_first_divergence": record_ratio(found) if found else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, action="append", default=[], help="a released-shape checkpoint (repeatable)")
    ap.add_argument("--ids", default="random:64:3", help="prompt for --checkpoint runs (default random:64:3)")
    ap.add_argument("--skip-fixtures", action="store_true")
    ap.add_argument("--skip-zoo", action="store_true")
    ap.add_argument("--long-steps", type=int, default=3000, help="decode steps of the long run on the demo fixture")
    args = ap.parse_args()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="parity-calibrate-") as tmp:
        work = Path(tmp)
        if not args.skip_fixtures:
            for f in FIXTURES:
                backends = ["reference", "tvm", "chatrwkv"] + ([NUMPY] if f.name.startswith("rwkv5_2") else [])
                for ids in ("ones:10", "random:16:1"):
                    runs += measure(f, backends=backends, ids=ids, steps=64, work=work)
            runs += measure(REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth", backends=["reference", "tvm"], ids="ones:10",
                            steps=args.long_steps, work=work)
        for ck in args.checkpoint:
            runs += measure(ck, backends=["reference", "tvm", "chatrwkv"], ids=args.ids, steps=64, work=work)
        mutants = [] if args.skip_zoo else zoo(work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = {"date": dt.date.today().isoformat(), "commit": commit, "command": " ".join(["python", *sys.argv]),
           "envelope_per_layer": DRIFT_ENVELOPES["float32"].per_layer, "runs": runs, "mutants": mutants}
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = "calibrate_verdict" + ("" if not args.checkpoint else "-" + "-".join(c.stem for c in args.checkpoint))
    (results / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")

    def g(x):
        return "-" if x is None else f"{x:.3g}"

    lines = [f"# Verdict calibration ({out['date']}, commit {commit})", "", f"`{out['command']}`", "",
             "Ratios are min_atol / atol (allowances). Drift: the carried stages (x_out, x_after_att, ln_out, logits, state); "
             "any stage: every record. K needed: the smallest envelope constant the carried stages fit in (envelope "
             "K x (depth + 1)). Arbiter: the largest min_multiplier of the fp64 arbiter. reference-fp64~reference is the "
             "fp32 reference against float64.", "",
             "| checkpoint | pair | prompt | decode | verdict | drift (carried) | any stage | K needed | own error | arbiter | KL max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['checkpoint']} | {r['pair']} | `{r['ids']}` | {r['decode_steps']} | {r['verdict'] or '-'} | "
              f"{g(r['carried_worst_ratio'])} | {g(r['any_stage_worst_ratio'])} | {g(r['needed_per_layer'])} | "
              f"{g(r['own_worst_ratio'])} | {g(r['arbiter_multiplier'])} | {g(r['kl_max'])} |" for r in runs]
    if runs:
        lines += ["", f"Worst K needed by a correct pair: **{g(max(r['needed_per_layer'] for r in runs))}** "
                  f"(the envelope uses K = {out['envelope_per_layer']:g}); worst own ratio of a correct backend: "
                  f"**{g(max(r['own_worst_ratio'] or 0 for r in runs))}**; largest arbiter multiplier of a correct "
                  f"backend: **{g(max(r['arbiter_multiplier'] or 0 for r in runs))}**."]
    if mutants:
        lines += ["", "| mutant | first divergence | own ratio there |", "|---|---|---|"]
        lines += [f"| {m['mutant']} | step {m['step']} {m['stage']} | {g(m['own_ratio_at_first_divergence'])} |" for m in mutants]
        lines += ["", f"Mildest mutant: **{g(min(m['own_ratio_at_first_divergence'] or float('inf') for m in mutants))}x** its allowance."]
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
