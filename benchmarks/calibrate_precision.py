"""Measure what correct fp16 and bf16 backends need of the tolerances (parity/compare/tolerance.py).

For every bundled fixture, two prompts and --decode-steps teacher-forced decode steps, each correct
low-precision backend — the torch reference in the dtype (ChatRWKV's strategy), our TVM build in
the dtype, and the official package's ``cpu fp16`` / ``cpu bf16`` — is measured four ways:

  own/dtype   its replay by the reference *in its own dtype* (what `parity run` judges it by):
              the error each stage adds beside a correct port of the same precision;
  own/fp64    its replay by the float64 reference (the arbiter's math): what each stage adds
              against exact arithmetic — the rounding the dtype itself costs, one stage at a time;
  isolated    (TVM only) its layers run on the fp32 reference's inputs, against the fp32 reference
              (`--mode isolated` today): one layer's rounding, inputs rounded to the dtype included;
  iso/dtype   (TVM only) the same isolated run against the reference *in the dtype* on the same
              fp32 inputs (the fp32 reference's dump replayed by the fp16/bf16 reference, the
              isolated build's own r, k, v and wkv spliced in): the judge `--mode isolated` uses;
  propagated  against the fp32 reference, whole run: carried-stage drift per unit of depth (the
              verdict's envelope units) and the end-to-end metrics (KL max, top-1 agreement).

A measurement is, per stage, the ``scale`` a tolerance would need for that record to pass (rtol
and atol as the dtype's defaults): (min_atol - atol) / max|expected|. The worst of each class of
stage (ln_x and att.gated, where GroupNorm divides by a head's own spread; everything else) over
every fixture, prompt, step and backend is what the constants are set from.

Which constant each measure sets (parity/compare/tolerance.py; who judges: session.judge_policy):
own/dtype the replay's, iso/dtype the isolated judge's (JUDGED_TOLERANCES where a dtype has its own,
else the dtype's default); drift/depth the pair's drift envelope (compare/verdict.py), in the pair's
allowances. own/fp64 and isolated (against fp32) say what the dtype's rounding itself costs.

Writes benchmarks/results/calibrate_precision.json and .md with the date and commit.

    python benchmarks/calibrate_precision.py                         # every fixture (~10 min on 2 cores)
    python benchmarks/calibrate_precision.py --fixtures rwkv4-L2-C64 --decode-steps 4   # a quick look
    python benchmarks/calibrate_precision.py --checkpoint 0.4b.pth --prompts random:16:3 --decode-steps 8
"""

from __future__ import annotations

import argparse
import os
import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from parity.checkpoint import load_checkpoint  # noqa: E402
from parity.compare import compare_runs  # noqa: E402
from parity.compare.tolerance import DEFAULT_TOLERANCES, TolerancePolicy, Tolerance  # noqa: E402
from parity.compare.verdict import is_carried, record_depth, record_ratio  # noqa: E402
from parity.dumpers.backends import ReferenceBackend, RunPlan  # noqa: E402
from parity.dumpers.format import DumpReader  # noqa: E402
from parity.dumpers.replay import ReplayBackend  # noqa: E402
from parity.session import default_decode_ids, parse_ids  # noqa: E402

FIXTURES = sorted((REPO / "fixtures").glob("*.pth"))
PROMPTS = ("ones:10", "random:16:3")
DTYPES = ("float16", "bfloat16")
GN_STAGES = (".att.ln_x", ".att.gated")  # GroupNorm's output and ln_x * g


def probe_policy(dtype: str) -> TolerancePolicy:
    """The dtype's rtol and atol with a known, nonzero scale, so a record's max|expected| can be read back."""
    d = DEFAULT_TOLERANCES[dtype]
    return TolerancePolicy(dtype=dtype, overrides={"*": Tolerance(rtol=d.rtol, atol=d.atol, scale=1.0, reason="probe")})


def needed_scales(actual: Path, expected: Path, *, dtype: str) -> list[dict]:
    """Per record: the scale its tolerance would need (rtol, atol the dtype's), with where it is."""
    cmp = compare_runs(actual=DumpReader(actual), expected=DumpReader(expected), policy=probe_policy(dtype)).to_dict()
    atol = DEFAULT_TOLERANCES[dtype].atol
    out = []
    for r in cmp["records"]:
        if r.get("reason") in ("nonfinite", "shape"):
            out.append({"step": r["step"], "stage": r["stage"], "layer": r.get("layer"), "scale": math.inf})
            continue
        max_b = r["atol"] - atol  # probe scale 1: effective atol = atol + max|expected|
        need = 0.0 if max_b <= 0 else max(0.0, (r["min_atol"] - atol) / max_b)
        out.append({"step": r["step"], "stage": r["stage"], "layer": r.get("layer"), "scale": need})
    return out


def stage_class(stage: str) -> str:
    return "groupnorm" if stage.endswith(GN_STAGES) else "other"


def worst_by_class(rows: list[dict]) -> dict:
    out = {}
    for cls in ("groupnorm", "other"):
        sel = [r for r in rows if stage_class(r["stage"]) == cls]
        if sel:
            w = max(sel, key=lambda r: r["scale"])
            out[cls] = {"scale": w["scale"], "step": w["step"], "stage": w["stage"]}
    return out


def propagated(actual: Path, expected: Path, *, dtype: str) -> dict:
    """Drift (carried stages, allowances per unit of depth under the dtype's policy) and end to end."""
    cmp = compare_runs(actual=DumpReader(actual), expected=DumpReader(expected),
                       policy=TolerancePolicy.for_dtype(dtype)).to_dict()
    recs = cmp["records"]
    n_layer = 1 + max((r["layer"] for r in recs if r.get("layer") is not None), default=-1)
    per_depth = max((record_ratio(r) / (record_depth(r, n_layer=n_layer) + 1) for r in recs if is_carried(r["stage"])),
                    default=0.0)
    e2e = cmp.get("end_to_end") or {}
    return {"drift_per_depth": per_depth, "kl_max": e2e.get("kl_max"), "top1_agreement": e2e.get("top1_agreement"),
            "min_cosine": e2e.get("cosine_min")}


def measure(ck_path: Path, *, prompt: str, steps: int, work: Path, backends: list[str]) -> list[dict]:
    from parity.dumpers.isolated import TVMIsolatedBackend
    from parity.dumpers.registry import make_backend

    ck = load_checkpoint(ck_path)
    plan = RunPlan(prefill_ids=parse_ids(prompt, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=steps, vocab_size=ck.config.vocab_size))
    ref32 = ReferenceBackend(ck).dump(plan, path=work / "reference")
    fp64_model = ReferenceBackend(ck, dtype="float64").model
    rows = []
    for dtype in DTYPES:
        short = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
        for base in backends:
            spec = f"{base}@{short}"
            t0 = time.perf_counter()
            backend = make_backend(spec, ck)
            path = backend.dump(plan, path=work / spec)
            row = {"checkpoint": ck_path.name, "prompt": prompt, "decode_steps": steps, "dtype": dtype, "backend": spec}
            if base != "reference":  # the reference in its dtype replays itself exactly (0 by construction)
                own = ReplayBackend(ck, candidate_dump=path)
                own_dump = own.dump(own.plan(), path=work / f"{spec}-replay")
                row["own_dtype"] = worst_by_class(needed_scales(path, own_dump, dtype=dtype))
            exact = ReplayBackend(ck, candidate_dump=path, model=fp64_model, dtype="float64")
            exact_dump = exact.dump(exact.plan(), path=work / f"{spec}-replay64")
            row["own_fp64"] = worst_by_class(needed_scales(path, exact_dump, dtype=dtype))
            if base == "tvm":
                iso = TVMIsolatedBackend(ck, reference_dump=ref32, model=backend.model)
                iso_dump = iso.dump(plan, path=work / f"{spec}-isolated")
                row["isolated"] = worst_by_class(needed_scales(iso_dump, ref32, dtype=dtype))
                # The judge `parity run --mode isolated` uses: the reference in the dtype on the yardstick's
                # inputs, with the isolated build's own r, k, v and wkv spliced in (parity/session.py).
                yard = ReplayBackend(ck, candidate_dump=ref32, dtype=dtype, splice_from=iso_dump)
                same = yard.dump(yard.plan(), path=work / f"{spec}-isolated-judge")
                row["iso_dtype"] = worst_by_class(needed_scales(iso_dump, same, dtype=dtype))
            row.update(propagated(path, ref32, dtype=dtype))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for dtype in DTYPES:
        sel = [r for r in rows if r["dtype"] == dtype]
        summary = {}
        for measure_ in ("own_dtype", "own_fp64", "isolated", "iso_dtype"):
            for cls in ("groupnorm", "other"):
                cands = [(r[measure_][cls], r) for r in sel if measure_ in r and cls in r[measure_]]
                if cands:
                    w, r = max(cands, key=lambda c: c[0]["scale"])
                    summary[f"{measure_}/{cls}"] = {**w, "backend": r["backend"], "checkpoint": r["checkpoint"],
                                                    "prompt": r["prompt"]}
        kl = [r["kl_max"] for r in sel if r.get("kl_max") is not None]
        t1 = [r["top1_agreement"] for r in sel if r.get("top1_agreement") is not None]
        summary["drift_per_depth_max"] = max((r["drift_per_depth"] for r in sel), default=None)
        summary["kl_max"] = max(kl, default=None)
        summary["top1_agreement_min"] = min(t1, default=None)
        out[dtype] = summary
    return out


def write_markdown(path: Path, *, rows: list[dict], summary: dict, meta: dict) -> None:
    def f(x):
        return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))

    lines = [f"# Precision calibration ({meta['date']}, commit {meta['commit']})", "",
             f"`{meta['command']}` — {meta['seconds']:.0f} s", "",
             "Needed `scale` (tolerance floor / max|expected|) per record class; worst over every step.", "",
             "| checkpoint | prompt | backend | own/dtype gn | own/dtype other | own/fp64 gn | own/fp64 other | "
             "isolated gn | isolated other | iso/dtype gn | iso/dtype other | drift/depth | KL max | top-1 |",
             "|" + "---|" * 14]
    for r in rows:
        def g(m, c):
            return f(r.get(m, {}).get(c, {}).get("scale"))

        lines.append(f"| {r['checkpoint']} | {r['prompt']} +{r['decode_steps']} | {r['backend']} | "
                     f"{g('own_dtype', 'groupnorm')} | {g('own_dtype', 'other')} | {g('own_fp64', 'groupnorm')} | "
                     f"{g('own_fp64', 'other')} | {g('isolated', 'groupnorm')} | {g('isolated', 'other')} | "
                     f"{g('iso_dtype', 'groupnorm')} | {g('iso_dtype', 'other')} | "
                     f"{f(r['drift_per_depth'])} | {f(r['kl_max'])} | {f(r['top1_agreement'])} |")
    lines += ["", "## Worst per dtype", ""]
    for dtype, s in summary.items():
        lines.append(f"### {dtype}")
        for k, v in s.items():
            if isinstance(v, dict):
                lines.append(f"- {k}: {f(v['scale'])} at step {v['step']} {v['stage']} ({v['backend']}, {v['checkpoint']}, "
                             f"{v['prompt']})")
            else:
                lines.append(f"- {k}: {f(v)}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", nargs="*", help="fixture stems (default: every bundled fixture)")
    ap.add_argument("--checkpoint", type=Path, action="append", default=[], help="another checkpoint (e.g. parity synth's)")
    ap.add_argument("--prompts", nargs="*", default=list(PROMPTS))
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--backends", default="reference,tvm,chatrwkv")
    ap.add_argument("--out", default="calibrate_precision", help="results file stem under benchmarks/results/")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="no run: merge the rows of these results .json (e.g. one per fixture, each its own process)")
    args = ap.parse_args()
    fixtures = [p for p in FIXTURES if not args.fixtures or p.stem in args.fixtures] + list(args.checkpoint)
    t0 = time.perf_counter()
    rows = []
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        commits = sorted({part["commit"] for part in parts})
        seconds = max(part["seconds"] for part in parts)
        command = "; ".join(part["command"] for part in parts) + " (one process each, merged)"
    else:
        with tempfile.TemporaryDirectory(prefix="calibrate-precision-") as tmp:
            for i, ck in enumerate(fixtures):
                for j, prompt in enumerate(args.prompts):
                    rows += measure(ck, prompt=prompt, steps=args.decode_steps, work=Path(tmp) / f"{i}-{j}",
                                    backends=args.backends.split(","))
        # An exported tree (scripts/scale-job) has no git: the commit it was exported from, if given.
        commits = [os.environ.get("PARITY_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()]
        seconds = time.perf_counter() - t0
        command = "python benchmarks/calibrate_precision.py " + " ".join(sys.argv[1:])
    summary = summarise(rows)
    meta = {"date": dt.date.today().isoformat(), "commit": ",".join(c[:10] for c in commits), "seconds": seconds,
            "command": command}
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.out}.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1, default=str))
    write_markdown(results / f"{args.out}.md", rows=rows, summary=summary, meta=meta)
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
