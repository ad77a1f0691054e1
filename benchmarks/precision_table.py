"""The precision table: backend x dtype x fixture -> worst own error, KL max and top-1 against fp32.

Every case is one ``parity run`` in process (parity.session.run_parity) with the fp32 reference as
the yardstick and the low-precision backend as the candidate, in the default verdict (replay):

  own error   the candidate replayed by the reference computing as it does (its dtype, its quantised
              weights): the worst ratio of a record's error to its allowance over every stage and
              step (1.0 = the tolerance), where, and the verdict;
  drift       the worst carried-stage drift from the fp32 reference, as a fraction of that dtype's
              envelope (what the propagated verdict judges);
  end to end  against the fp32 reference's logits, every token row: KL max (nats) and top-1
              agreement (near-ties count as agreement; flips outside them are listed).

Rows: every bundled fixture (fixtures/*.pth, every RWKV version), the precision zoo's hot RWKV-4
fixture (fixtures/precision/, where an fp16 residual needs the rescale), and with --checkpoint a
checkpoint of your own (e.g. ``parity synth --shape 0.4b``). Backends: our TVM build and the
official package (ChatRWKV) in fp16 and bf16, the reference in the dtype (its KL is the dtype's own
cost; its own error is zero by construction, so it is not listed), and the quantised builds
(tvm@fp16i8, tvm@fp32i8, tvm@q4f16_1, and the official package's chatrwkv@fp16i8) whose own error
is judged with the same codes — the reference dequantising the candidate's own int8 / q4 weights —
while KL and top-1 are against the fp32 reference (what the quantisation costs). Their drift from
the fp32 reference is recorded but not judged (parity/session.py: the envelope covers rounding, not
quantisation), and the table says so.

The tolerances these ratios are measured in are those of parity/compare/tolerance.py; the
measurements behind each constant (benchmarks/calibrate_precision.py, not re-run here) are
quoted from benchmarks/results/calibrate_precision.json in the output.

    python benchmarks/precision_table.py                               # every fixture (~10 min, 2 cores)
    python benchmarks/precision_table.py --fixtures rwkv4-L2-C64 --decode-steps 2   # a quick look
    python benchmarks/precision_table.py --checkpoint /tmp/0.4b.pth --prompts random:16:3 \\
        --specs tvm@fp16,tvm@bf16 --out benchmarks/results/precision_table-0.4b

Writes OUT.json and OUT.md (default benchmarks/results/precision_table) with the date and commit.
With --merge the rows of an existing OUT.json that this run does not redo are kept (each row names
the run that made it), so a few backends can be re-measured without re-running every one:

    python benchmarks/precision_table.py --specs tvm@fp16i8,tvm@fp32i8,tvm@q4f16_1,chatrwkv@fp16i8 --merge
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = sorted((REPO / "fixtures").glob("*.pth")) + sorted((REPO / "fixtures" / "precision").glob("*.pth"))
SPECS = ("tvm@fp16", "chatrwkv@fp16", "reference@fp16", "tvm@bf16", "chatrwkv@bf16", "reference@bf16",
         "tvm@fp16i8", "tvm@fp32i8", "tvm@q4f16_1", "chatrwkv@fp16i8")
PROMPTS = ("ones:10", "random:16:3")


def _commit() -> str:
    # An exported tree (scripts/scale-job) is not a git checkout: the commit it was exported from.
    if os.environ.get("PARITY_COMMIT"):
        return os.environ["PARITY_COMMIT"][:7]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_case(ck, *, spec: str, prompt: str, decode_steps: int, cache_dir: Path | None, work: Path) -> dict:
    from parity.dumpers.backends import RunPlan
    from parity.session import default_decode_ids, parse_ids, run_parity

    cfg = ck.config
    plan = RunPlan(prefill_ids=parse_ids(prompt, vocab_size=cfg.vocab_size),
                   decode_ids=default_decode_ids(steps=decode_steps, vocab_size=cfg.vocab_size))
    t0 = time.perf_counter()
    out = run_parity(ck, backends=["reference", spec], plan=plan, dump_dir=work, cache_dir=cache_dir)
    r = out.result
    own = (r.get("own_errors") or {}).get(spec) or {}
    drift = r.get("drift") or {}
    e2e = r.get("end_to_end") or {}
    fd = r.get("first_divergence")
    return {
        "checkpoint": ck.path.stem, "prompt": prompt, "decode_steps": decode_steps, "spec": spec,
        "verdict": r["verdict"],
        "first_divergence": None if fd is None else {k: fd.get(k) for k in ("step", "stage", "judged_by")},
        "own_worst_ratio": own.get("worst_ratio"), "own_worst_at": [own.get("worst_step"), own.get("worst_stage")],
        "own_judge": own.get("judge"), "own_records": own.get("records"),
        "drift_envelope_fraction": _drift_fraction(drift), "drift_status": drift.get("status"),
        "kl_max": e2e.get("kl_max"), "top1_agreement": e2e.get("top1_agreement"), "top1_flips": e2e.get("top1_flips"),
        "rows": e2e.get("rows"), "seconds": round(time.perf_counter() - t0, 2),
    }


def _drift_fraction(drift: dict):
    """The worst carried-stage drift as a fraction of the dtype's envelope (None where not judged)."""
    value = drift.get("envelope_fraction")
    return value if isinstance(value, (int, float)) else None


def tolerance_lines() -> list[str]:
    """Each dtype's constants as the code holds them, with the measurement each quotes."""
    from parity.compare.tolerance import DEFAULT_STAGE_TOLERANCES, DEFAULT_TOLERANCES

    lines = []
    for dtype in ("float16", "bfloat16"):
        t = DEFAULT_TOLERANCES[dtype]
        lines.append(f"- **{dtype}** rtol {t.rtol:g}, atol {t.atol:g}, scale {t.scale:g}: {t.reason}")
        for pattern, st in DEFAULT_STAGE_TOLERANCES.get(dtype, {}).items():
            lines.append(f"  - `{pattern}`: scale {st.scale:g}: {st.reason}")
    return lines


def calibration_lines() -> list[str]:
    path = REPO / "benchmarks" / "results" / "calibrate_precision.json"
    if not path.is_file():
        return ["(benchmarks/results/calibrate_precision.json not found)"]
    cal = json.loads(path.read_text())
    lines = [f"From `{cal.get('command', 'benchmarks/calibrate_precision.py')}` ({cal.get('date')}, commit "
             f"{cal.get('commit')}): the `scale` each class of record needs (a ratio to max|expected|), worst "
             "over every bundled fixture, ones:10 and random:16:3, 32 decode steps, and the backends named.", ""]
    for dtype, s in (cal.get("summary") or {}).items():
        lines.append(f"**{dtype}**")
        for key, v in s.items():
            if isinstance(v, dict):
                lines.append(f"- {key}: {_g(v.get('scale'))} at step {v.get('step')} {v.get('stage')} "
                             f"({v.get('backend')}, {v.get('checkpoint')}, {v.get('prompt')})")
            else:
                lines.append(f"- {key}: {_g(v)}")
        lines.append("")
    return lines


def _g(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _key(row: dict) -> tuple:
    return row["checkpoint"], row["prompt"], row["decode_steps"], row["spec"]


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row this run redid replaced, and this run's other rows added: grouped by
    checkpoint (in order of first appearance), then by backend in SPECS order, as one run writes them."""
    fresh = {_key(r): r for r in new}
    rows = [fresh.pop(_key(r), r) for r in old] + list(fresh.values())
    first = {}
    for r in rows:
        first.setdefault(r["checkpoint"], len(first))
    rank = {s: i for i, s in enumerate(SPECS)}
    return sorted(rows, key=lambda r: (first[r["checkpoint"]], rank.get(r["spec"], len(rank))))


def _drift(r: dict) -> str:
    if r.get("drift_status") == "not judged":  # quantised vs fp32: recorded, not a verdict
        return f"{_g(r['drift_envelope_fraction'])} (not judged)"
    return _g(r["drift_envelope_fraction"])


def write(out: Path, *, rows: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # OUT names the pair without a suffix; with_suffix would eat a dotted name's tail ("-0.4b").
    out.parent.joinpath(out.name + ".json").write_text(json.dumps({**meta, "rows": rows}, indent=1, allow_nan=True) + "\n")
    runs = meta.get("runs") or [meta]
    several = len(runs) > 1  # rows from more than one run: each names its run's commit
    md = [f"# Precision table ({meta['date']}, commit {meta['commit']})", "",
          *[f"- `{m['command']}` — {m['seconds']:.0f} s on this machine ({m['date']}, commit {m['commit']})"
            for m in runs], "", *([meta["note"], ""] if meta.get("note") else []),
          "Each row: `parity run --backends reference,SPEC` (fp32 reference the yardstick, replay verdict). "
          "own error: worst record error / its allowance, the candidate replayed by the reference in its "
          "dtype and weights (1 = the tolerance); drift: worst carried-stage drift / the dtype's envelope; "
          "KL max (nats) and top-1 agreement against the fp32 reference's logits, every token row. "
          "Quantised backends (…i8, q4f16_1): own error against the reference with the same codes; their "
          "drift from the unquantised fp32 reference is shown but not judged (the envelope covers rounding, "
          "not quantisation), so their verdict is the own error's.", "",
          "| fixture | prompt | backend | verdict | own error (worst) | at | drift / envelope | KL max | top-1 |"
          + (" run |" if several else ""),
          "|---|---|---|---|---|---|---|---|---|" + ("---|" if several else "")]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['checkpoint']} | {r['prompt']} | {r['spec']} | error: {r['error']} | | | | | |"
                      + (f" {r.get('run', '')} |" if several else ""))
            continue
        own = "- (itself)" if r["spec"].startswith("reference@") else _g(r["own_worst_ratio"])
        at = "" if r["spec"].startswith("reference@") else f"step {r['own_worst_at'][0]} {r['own_worst_at'][1]}"
        top1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%" + (
            f" ({r['top1_flips']} flips)" if r["top1_flips"] else "")
        md.append(f"| {r['checkpoint']} | {r['prompt']} +{r['decode_steps']} | {r['spec']} | {r['verdict']} | {own} | "
                  f"{at} | {_drift(r)} | {_g(r['kl_max'])} | {top1} |" + (f" {r.get('run', '')} |" if several else ""))
    md += ["", "## Worst per backend", "", "| backend | own error | KL max | top-1 min | verdicts |", "|---|---|---|---|---|"]
    for spec in dict.fromkeys(r["spec"] for r in rows):
        mine = [r for r in rows if r["spec"] == spec and "error" not in r]
        if not mine:
            continue
        own = [r["own_worst_ratio"] for r in mine if r["own_worst_ratio"] is not None]
        kl = [r["kl_max"] for r in mine if r["kl_max"] is not None]
        top = [r["top1_agreement"] for r in mine if r["top1_agreement"] is not None]
        verdicts = sorted({r["verdict"] for r in mine})
        md.append(f"| {spec} | {'-' if spec.startswith('reference@') else _g(max(own) if own else None)} | "
                  f"{_g(max(kl) if kl else None)} | {_g(min(top) if top else None)} | {'; '.join(verdicts)} |")
    md += ["", "## The tolerances, and the calibration behind them", "",
           "The constants (parity/compare/tolerance.py), each with the measurement it quotes:", "",
           *tolerance_lines(), "", *calibration_lines()]
    out.parent.joinpath(out.name + ".md").write_text("\n".join(md) + "\n")


def render_only(out: Path, *, note: str | None) -> int:
    """OUT.md again from OUT.json, measuring nothing (a new --note is stored in OUT.json as well)."""
    path = out.parent / (out.name + ".json")
    if not path.is_file():
        print(f"precision_table: {path} not found; nothing to render", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    if note is not None:
        data["note"] = note
        path.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    write(out, rows=data.pop("rows"), meta=data)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=None, help="comma-separated fixture stems (default: every one)")
    ap.add_argument("--checkpoint", type=Path, action="append", default=[], help="a checkpoint instead of the fixtures")
    ap.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated backends (default {','.join(SPECS)})")
    ap.add_argument("--prompts", default=",".join(PROMPTS))
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "precision_table")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing OUT.json that this run does not redo")
    ap.add_argument("--note", default=None, help="a paragraph for the top of OUT.md (kept by --merge unless given)")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rewrite OUT.md from OUT.json (with --note, which is stored in OUT.json too)")
    args = ap.parse_args(argv)

    if args.render_only:
        return render_only(args.out, note=args.note)

    from parity.checkpoint import load_checkpoint
    from parity.errors import ParityError

    paths = args.checkpoint or [p for p in FIXTURES if args.fixtures is None or p.stem in args.fixtures.split(",")]
    if not paths:
        print(f"precision_table: no fixture named {args.fixtures}", file=sys.stderr)
        return 2
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    t0 = time.perf_counter()
    rows: list[dict] = []
    meta = {"date": dt.date.today().isoformat(), "commit": _commit(),
            "command": "python benchmarks/precision_table.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    old_rows, old_runs, note = [], [], args.note
    previous = args.out.parent / (args.out.name + ".json")
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        old_run = {k: old[k] for k in ("date", "commit", "command", "seconds") if k in old}
        old_runs = old.get("runs") or [old_run]
        # A row of an older file names no run: it is the file's (single) run's.
        old_rows = [{**r, "run": r.get("run", old_runs[0].get("commit"))} for r in old.get("rows", [])]
        note = note if note is not None else old.get("note")
    for path in paths:
        ck = load_checkpoint(path)
        for spec in specs:
            for prompt in prompts:
                with tempfile.TemporaryDirectory(prefix="precision-table-") as work:
                    try:
                        row = run_case(ck, spec=spec, prompt=prompt, decode_steps=args.decode_steps,
                                       cache_dir=args.cache_dir, work=Path(work))
                    except ParityError as exc:  # e.g. a spec this checkpoint's version has no build of
                        row = {"checkpoint": path.stem, "prompt": prompt, "decode_steps": args.decode_steps,
                               "spec": spec, "error": str(exc).splitlines()[0]}
                rows.append({**row, "run": meta["commit"]})
                print(json.dumps(row), flush=True)
                this = {**meta, "seconds": time.perf_counter() - t0}
                write(args.out, rows=merged(old_rows, rows), meta={**this, "runs": [*old_runs, this], "note": note})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
