"""How far past the run's rounding floor correct backends drift: the figure behind FLOOR_MULTIPLE.

For each checkpoint and prompt: the fp32 reference, its rounding floor (parity/dumpers/floor.py:
the reference again with every carried value moved by up to one ulp after every layer) and each
correct backend. Per carried record, the backend's drift from the reference (in allowances) over
the floor's running maximum at that depth and step (``RoundingFloor.at``); the table gives the
worst such ratio per backend, with where it was, and the worst drift itself against the fixed
envelope. FLOOR_MULTIPLE in parity/compare/verdict.py must stay well above every ratio here.

    python benchmarks/calibrate_floor.py                              # the bundled fixtures
    python benchmarks/calibrate_floor.py --checkpoint X.safetensors --prompts random:64:3 --append
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import tempfile
from pathlib import Path

from parity.checkpoint import load_checkpoint
from parity.compare.verdict import FLOOR_MULTIPLE, RoundingFloor, envelope_for, is_carried, record_depth, record_ratio
from parity.dumpers.backends import ReferenceBackend, RunPlan
from parity.dumpers.floor import floor_dump
from parity.dumpers.registry import make_backend
from parity.session import compare_dumps, default_decode_ids, parse_ids

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def measure(path: Path, *, prompt: str, steps: int, backends: list[str]) -> list[dict]:
    ck = load_checkpoint(path)
    n = ck.config.n_layer
    plan = RunPlan(prefill_ids=parse_ids(prompt, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=steps, vocab_size=ck.config.vocab_size))
    env = envelope_for("float32")
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-floor-") as tmp:
        ref = ReferenceBackend(ck)
        reference = ref.dump(plan, path=Path(tmp) / "reference")
        floor = RoundingFloor(compare_dumps(reference, floor_dump(ck, model=ref.model, plan=plan, path=Path(tmp) / "floor")))
        for spec in backends:
            dump = make_backend(spec, ck).dump(plan, path=Path(tmp) / spec.replace("/", "-").replace(":", "-"))
            worst_over_floor, worst_drift = None, None
            for r in compare_dumps(reference, dump)["records"]:
                if not is_carried(r["stage"]):
                    continue
                depth, step = record_depth(r, n_layer=n), r.get("step") or 0
                ratio, at_floor = record_ratio(r), floor.at(depth, step)
                item = {"over_floor": ratio / max(at_floor, 1e-9), "ratio": ratio, "floor": at_floor,
                        "fixed_envelope": env.at(depth, step), "step": step, "stage": r["stage"]}
                if worst_over_floor is None or item["over_floor"] > worst_over_floor["over_floor"]:
                    worst_over_floor = item
                if worst_drift is None or item["ratio"] > worst_drift["ratio"]:
                    worst_drift = item
            rows.append({"checkpoint": path.name, "model": ck.config.describe(), "prompt": prompt, "decode_steps": steps,
                         "backend": spec, "worst_over_floor": worst_over_floor, "worst_drift": worst_drift,
                         "floor_at_logits_last_step": floor.at(n, steps)})
            print(fmt(rows[-1]), flush=True)
    return rows


def fmt(r: dict) -> str:
    w, d = r["worst_over_floor"], r["worst_drift"]
    return (f"| {r['model']} | `{r['prompt']}` +{r['decode_steps']} | {r['backend']} | **{w['over_floor']:.3g}** "
            f"({w['ratio']:.3g} over floor {w['floor']:.3g}, step {w['step']} {w['stage']}) | {d['ratio']:.3g} at step "
            f"{d['step']} {d['stage']} (fixed envelope {d['fixed_envelope']:.3g}, floor {d['floor']:.3g}) | "
            f"{r['floor_at_logits_last_step']:.3g} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, action="append", help="default: every bundled fixture")
    ap.add_argument("--prompts", default="ones:10,random:16:3")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--backends", default="tvm,chatrwkv")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="add to the committed rows")
    args = ap.parse_args()
    paths = args.checkpoint or sorted((REPO / "fixtures").glob("*.pth"))
    out = args.out / "calibrate_floor.json"
    rows = json.loads(out.read_text())["rows"] if args.append and out.exists() else []
    for path in paths:
        for prompt in args.prompts.split(","):
            rows += measure(path, prompt=prompt, steps=args.decode_steps, backends=args.backends.split(","))
    commit = os.environ.get("PARITY_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"date": dt.date.today().isoformat(), "commit": commit[:10], "floor_multiple": FLOOR_MULTIPLE}
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    worst = max((r["worst_over_floor"]["over_floor"] for r in rows), default=0.0)
    lines = [
        f"# Drift of correct backends over the run's rounding floor ({meta['date']}, commit {meta['commit']})", "",
        "`python benchmarks/calibrate_floor.py` (see its docstring). Over floor: a backend's carried-stage drift from",
        "the fp32 reference over the floor's running maximum at that depth and step; FLOOR_MULTIPLE "
        f"= {FLOOR_MULTIPLE:g} must stay well above it. Worst over every row: **{worst:.3g}**.", "",
        "| model | prompt | backend | worst drift / floor | worst drift (allowances) | floor at logits, last step |",
        "|---|---|---|---|---|---|",
        *[fmt(r) for r in rows],
    ]
    (args.out / "calibrate_floor.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
