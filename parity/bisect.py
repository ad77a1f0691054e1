"""``parity bisect``: the engineer's workflow, automated — step, then layer, then stage.

1. A propagated run says *whether* and roughly where the two implementations part.
2. An own-error run says where the error is *made*: our compiled build runs isolated (every layer
   of every step fed the yardstick's inputs), any other backend — plug-ins, chatrwkv, hf, a saved
   port — is replayed (the reference re-runs each layer on the backend's own recorded inputs).
   Then: the first step with any stage out of tolerance, the first layer in it, the first stage of
   that layer. Each decision is printed with the numbers behind it.
3. It ends with a one-line command that reruns just that layer of that step.
"""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from parity.checkpoint import Checkpoint
from parity.dumpers.backends import RunPlan
from parity.errors import ParityError
from parity.results import Record, RunResult
from parity.session import run_parity


@dataclass
class BisectOutcome:
    decisions: list[str] = field(default_factory=list)
    found: dict | None = None  # the first failing record of the own-error run (JSON form: bisect --json writes it)
    propagated: dict | None = None  # the propagated run's first divergence (JSON form)
    repro: str | None = None
    result: RunResult | None = None  # the comparison the bisect ran (parity bisect --html renders it)


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def bisect(
    ck: Checkpoint, *, backends: list[str], plan: RunPlan, cache_dir: Path | None = None, overrides=None,
    on_decision=None, on_event=None,
) -> BisectOutcome:
    out = BisectOutcome()

    def decide(line: str) -> None:
        out.decisions.append(line)
        if on_decision:
            on_decision(line)

    yardstick, suspect = backends[0], backends[1]
    with tempfile.TemporaryDirectory(prefix="parity-bisect-") as tmp:
        run = run_parity(ck, backends=[yardstick, suspect], plan=plan, dump_dir=Path(tmp), cache_dir=cache_dir,
                         overrides=overrides, on_event=on_event, mode="both")
    result = out.result = run.typed if run.typed is not None else RunResult.from_dict(run.result)
    if run.crashed:  # a dead or stuck suspect has no layers left to bisect: its crash is the answer
        from parity.report.verdict import crash_line

        raise ParityError(crash_line(result.crash))
    prop = result.modes["propagated"]
    propagated = prop.first_divergence if prop is not None else None
    # found and propagated are what ``parity bisect --json`` writes: their JSON form.
    out.propagated = None if propagated is None else propagated.to_dict()
    own = run.own_comparisons.get(suspect) or run.own_comparisons.get(yardstick)
    if own is None:
        raise ParityError(f"{suspect} cannot be replayed: it records no layer's input and state "
                          "(docs/backends.md, 'replay'); bisect needs each layer's emb/x_out and state")
    judged = suspect if suspect in run.own_comparisons else yardstick
    method = result.own_errors[judged].method
    if propagated is None:
        decide(f"propagated: {suspect} matches {yardstick} on every stage of every step")
    else:
        fd = propagated
        decide(f"propagated: first divergence at step {fd.step} ({fd.step_kind}), {fd.stage} "
               f"(max abs {_fmt(fd.max_abs)}); errors propagate, so this is where to start, not the answer")
    if result.own_errors[judged].first_divergence is None:
        decide(f"{method}: every layer of every step adds only in-tolerance error: no faulty stage")
        return out
    # The own-error comparison's records: the typed result keeps them only when it shows that comparison.
    records = [Record.from_dict(r) for r in own["records"]]
    by_step: dict[int, list[Record]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    found = None
    for step in sorted(by_step):
        failed = [r for r in by_step[step] if not r.passed]
        kind = "prefill" if step == 0 else f"decode step {step}"
        if not failed:
            worst = max(by_step[step], key=lambda r: r.max_abs if isinstance(r.max_abs, float) else 0.0)
            decide(f"step {step} ({kind}): clean in {method} (largest own error {_fmt(worst.max_abs)} at {worst.stage})")
            continue
        decide(f"step {step} ({kind}): {len(failed)} stage(s) add error out of tolerance -> this step")
        layers = sorted({r.layer for r in by_step[step] if r.layer is not None})
        first = next(r for r in by_step[step] if not r.passed)
        for layer in layers:
            mine = [r for r in by_step[step] if r.layer == layer]
            bad = [r for r in mine if not r.passed]
            if not bad:
                decide(f"  layer {layer}: clean")
                continue
            decide(f"  layer {layer}: {len(bad)} of {len(mine)} stages out of tolerance -> this layer")
            first = bad[0]
            break
        stage_line = (f"    stage {first.stage}: max abs {_fmt(first.max_abs)}, rms-rel {_fmt(first.rms_rel)}, "
                      f"{first.mismatch_count}/{first.numel} elements out, first token row {first.row}; "
                      f"passes only with atol >= {_fmt(first.min_atol)} (allowed {_fmt(first.atol)})")
        decide(stage_line)
        found = first
        out.found = first.to_dict()
        break
    layer = found.layer
    ids = ",".join(str(i) for i in plan.prefill_ids)
    decode = list(plan.decode_ids)[: found.step]
    argv = ["parity", "run", "--checkpoint", str(ck.path), "--backends", f"{yardstick},{suspect}", "--ids", ids]
    argv += ["--decode-ids", ",".join(map(str, decode))] if decode else ["--decode-steps", "0"]
    if method == "isolated":
        argv += ["--mode", "isolated", "--only-step", str(found.step)]
        if layer is not None:
            argv += ["--only-layer", str(layer)]
    out.repro = shlex.join(argv)
    return out
