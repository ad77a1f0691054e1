"""``parity run --corpus``: many prompts in one command, aggregated.

One comparison per prompt, each judged as a single run is, then pooled the way llama.cpp's
KL-divergence tool reports a quantized model against its base: per-prompt verdicts, and KL
percentiles and top-1 agreement over every token row of every prompt (not an average of
per-prompt averages, which would weigh a 3-token prompt like a 500-token one).

A corpus is a text file (one prompt per line; blank lines and lines starting with ``#`` are
skipped; each line goes through ``--template``) or a directory of scenario files (``*.json``).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np

from parity.errors import ParityError


def corpus_entries(path: Path) -> list[tuple[str, dict]]:
    """(name, the argument changes for that prompt) for every prompt of the corpus."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ParityError(f"--corpus {path}: the directory holds no scenario (*.json) files")
        return [(f.stem, {"scenario": f}) for f in files]
    if not path.is_file():
        raise ParityError(f"--corpus {path}: no such file or directory")
    from parity.tokenizer.world import read_utf8_file

    lines = read_utf8_file(path, what="--corpus").splitlines()
    entries = [(f"line {n}", {"text": line}) for n, line in enumerate(lines, start=1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise ParityError(f"--corpus {path}: no prompts (one per line; blank and # lines are skipped)")
    return entries


def aggregate(prompts: list[dict]) -> dict:
    """Pool the per-prompt end-to-end rows: KL percentiles and top-1 agreement over all tokens."""
    kl: list[float] = []
    rows = agree = ties = 0
    for p in prompts:
        e2e = p.get("end_to_end") or {}
        kl += [float("inf") if v == "inf" else float(v) for v in e2e.get("kl_rows", [])]
        n = e2e.get("rows", 0)
        rows += n
        if n:
            agree += round(e2e["top1_agreement"] * n) - e2e["top1_ties"]
            ties += e2e["top1_ties"]
    arr = np.asarray(kl, dtype=np.float64)
    pct = {f"kl_p{q:g}".replace(".", "_"): float(np.percentile(arr, q, method="higher")) if arr.size else None
           for q in (50, 90, 99, 99.9)}
    return {
        "prompts": len(prompts),
        "diverged": sum(p["verdict"] != "no divergence" for p in prompts),
        "rows": rows,
        "kl_mean": float(np.mean(arr)) if arr.size else None,
        "kl_max": float(np.max(arr)) if arr.size else None,
        **pct,
        "top1_agreement": (agree + ties) / rows if rows else None,
        "top1_ties": ties,
    }


def run_corpus(
    args: argparse.Namespace, checkpoint, *, backends: list[str], overrides, on_prompt: Callable[[str, dict], None],
    run_kwargs: dict,
) -> dict:
    """Run every prompt of ``args.corpus``; returns {"corpus": aggregate, "results": [per prompt]}."""
    from parity.scenarios import plan_from_args, run_keys
    from parity.session import run_parity

    if args.ids is not None or args.text is not None or args.prompt_file is not None or args.scenario is not None:
        raise ParityError("--corpus gives the prompts; drop --ids, --text, --prompt-file and --scenario")
    results, prompts = [], []
    for name, change in corpus_entries(args.corpus):
        one = copy.copy(args)
        one.text = change.get("text")
        one.scenario = change.get("scenario")
        plan, info = plan_from_args(one, checkpoint)
        outcome = run_parity(checkpoint, backends=backends, plan=plan, overrides=overrides, **run_kwargs)
        result = outcome.result
        result["run"].update(run_keys(info))
        summary = {"name": name, "verdict": result["verdict"], "first_divergence": result["first_divergence"],
                   "prefill_tokens": len(plan.prefill_ids), "decode_steps": len(plan.decode_ids),
                   "end_to_end": result.get("end_to_end"), "drift": (result.get("drift") or {}).get("status"),
                   "warnings": info["warnings"]}
        prompts.append(summary)
        results.append(result)
        on_prompt(name, summary)
    return {"corpus": {"source": str(args.corpus), **aggregate(prompts)}, "prompts": prompts, "results": results}
