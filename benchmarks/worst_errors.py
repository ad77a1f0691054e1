"""Worst errors between every pair of backends, for every bundled fixture (the figures in our notes).

    python benchmarks/worst_errors.py [--decode-steps 4]

Runs reference, tvm (debug build), tvm-instrumented, chatrwkv (the official package) and, for
RWKV-4, hf on each fixture with two prompts (ten all-ones ids; 16 random ids) plus decode steps,
and prints per pair: the verdict, the worst logits max-abs error, and the worst error of any
stage as a fraction of that record's allowance (min_atol / atol; < 1 passes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from parity.checkpoint import ModelVersion, load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.session import default_decode_ids, parse_ids, run_parity

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args()
    print(f"{'fixture':24s} {'pair':32s} {'verdict':14s} {'logits max abs':>15s} {'worst stage / allowance':>24s}")
    for path in sorted((ROOT / "fixtures").glob("*.pth")):
        ck = load_checkpoint(path)
        backends = ["reference", "tvm", "tvm-instrumented", "chatrwkv"]
        if ck.config.version == ModelVersion.V4:
            backends.append("hf")
        worst: dict[str, list] = {}
        for prompt in ("ones:10", "random:16:3"):
            plan = RunPlan(prefill_ids=parse_ids(prompt, vocab_size=ck.config.vocab_size),
                           decode_ids=default_decode_ids(steps=args.decode_steps, vocab_size=ck.config.vocab_size))
            with tempfile.TemporaryDirectory() as tmp:
                out = run_parity(ck, backends=backends, plan=plan, dump_dir=Path(tmp), cache_dir=args.cache_dir)
            for c in out.comparisons:
                pair = f"{c['actual']['backend']}({c['actual']['mode']}) vs {c['expected']['backend']}"
                logits = max((r["max_abs"] for r in c["records"] if r["stage"] == "logits"), default=0.0)
                ratio, stage = max(((r["min_atol"] / r["atol"] if r["atol"] else 0.0), r["stage"]) for r in c["records"])
                w = worst.setdefault(pair, [c["verdict"], 0.0, 0.0, ""])
                if c["verdict"] != "no divergence":
                    w[0] = c["verdict"]
                w[1] = max(w[1], logits)
                if ratio > w[2]:
                    w[2], w[3] = ratio, stage
        for pair, (verdict, logits, ratio, stage) in worst.items():
            print(f"{path.stem:24s} {pair:32s} {verdict:14s} {logits:15.3g} {ratio:12.3g} ({stage})")


if __name__ == "__main__":
    main()
