"""One parity run, start to finish: backends -> dumps -> comparison -> result dict.

The CLI, the demo and the pytest suite all go through here, so they judge runs the same way.
Data flows one way: each backend writes its dump; the dumps are read back and compared; the
result (a JSON-able dict) is what reports render.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.compare import TolerancePolicy, compare_runs
from parity.dumpers.backends import BACKEND_NAMES, RunPlan, make_backend, tool_versions
from parity.dumpers.format import DumpReader
from parity.errors import ParityError

EventFn = Callable[[str], None]
StepFn = Callable[[str, int, int], None]


def parse_ids(text: str, *, vocab_size: int | None = None) -> tuple[int, ...]:
    """``1,2,3`` | ``ones:10`` | ``random:16`` | ``random:16:SEED`` -> token ids."""
    text = text.strip()
    try:
        if text.startswith("ones:"):
            n = int(text[5:])
            if n < 1:
                raise ValueError
            return (1,) * n
        if text.startswith("random:"):
            parts = text.split(":")
            n = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else 0
            if n < 1 or len(parts) > 3:
                raise ValueError
            if vocab_size is None:
                raise ParityError("random ids need the model's vocabulary size")
            return tuple(int(i) for i in np.random.default_rng(seed).integers(0, vocab_size, n))
        ids = tuple(int(p) for p in text.split(",") if p.strip())
        if not ids:
            raise ValueError
        return ids
    except ValueError:
        raise ParityError(
            f"bad token ids {text!r}: give comma-separated integers (1,2,3), ones:N, random:N or random:N:SEED"
        ) from None


def default_decode_ids(*, steps: int, vocab_size: int, seed: int = 1) -> tuple[int, ...]:
    """Fixed, seeded decode tokens: every backend is fed the same ones (teacher forcing)."""
    return tuple(int(i) for i in np.random.default_rng(seed).integers(0, vocab_size, steps))


@dataclass
class RunOutcome:
    result: dict  # JSON-able; top level is the primary comparison (see ``run_parity``)
    dumps: dict[str, Path]
    comparisons: list[dict] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.result["first_divergence"] is not None


def compare_dumps(expected: Path, actual: Path, *, policy: TolerancePolicy | None = None, overrides=None) -> dict:
    """Compare two dump directories; ``expected`` is the yardstick (usually the reference)."""
    exp, act = DumpReader(expected), DumpReader(actual)
    if exp.model != act.model:
        raise ParityError(f"dumps {expected} and {actual} are of different models; nothing to compare")
    policy = policy or TolerancePolicy.for_dtype(act.dtype, overrides)
    return compare_runs(actual=act, expected=exp, policy=policy).to_dict()


def odd_one_out(backends: list[str], agree: dict[tuple[str, str], bool]) -> dict:
    """Which backend disagrees with all the others while those all agree with each other.

    ``agree[(a, b)]`` is True when the pair showed no divergence. With three backends and exactly
    one of them wrong, the two right ones agree and both disagree with it — a majority verdict.
    """

    def ok(a: str, b: str) -> bool:
        return agree.get((a, b), agree.get((b, a), False))

    if all(agree.values()):
        return {"backend": None, "explanation": "all backends agree"}
    for suspect in backends:
        others = [b for b in backends if b != suspect]
        others_agree = all(ok(a, b) for i, a in enumerate(others) for b in others[i + 1 :])
        if others_agree and not any(ok(suspect, o) for o in others):
            return {
                "backend": suspect,
                "explanation": f"{', '.join(others)} agree with each other; {suspect} diverges from all of them",
            }
    return {"backend": None, "explanation": "no single backend is the odd one out: several pairs disagree"}


def run_parity(
    checkpoint: Checkpoint | str | Path,
    *,
    backends: list[str],
    plan: RunPlan,
    dump_dir: Path | None = None,
    overrides=None,
    cache_dir: Path | None = None,
    on_event: EventFn | None = None,
    on_step: StepFn | None = None,
    command: str | None = None,
) -> RunOutcome:
    """Run every backend on ``plan``, dump each, compare each against the first backend.

    The returned result's top level is one comparison (the first that diverged, else the first),
    with a ``run`` block of metadata and, when more than two backends ran, ``comparisons``: the
    verdict of every pair.
    """
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if len(backends) < 2:
        raise ParityError("need at least two backends to compare, e.g. --backends reference,tvm")
    for b in backends:
        if b not in BACKEND_NAMES:
            raise ParityError(f"unknown backend {b!r}; choose from {', '.join(BACKEND_NAMES)}")
    if len(set(backends)) != len(backends):
        raise ParityError(f"backend listed twice: {','.join(backends)}")
    plan.check(vocab_size=ck.config.vocab_size)
    say = on_event or (lambda msg: None)

    tmp = None
    if dump_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="parity-dumps-")
        dump_dir = Path(tmp.name)
    try:
        dumps: dict[str, Path] = {}
        for spec in backends:
            say(f"preparing backend {spec}")
            backend = make_backend(spec, ck, cache_dir=cache_dir, on_event=say)
            say(f"running {spec}: prefill of {len(plan.prefill_ids)} tokens + {len(plan.decode_ids)} decode steps")
            dumps[spec] = backend.dump(plan, path=Path(dump_dir) / spec, on_step=on_step)
        # Every pair, the earlier-listed backend as the yardstick: with three or more, agreement
        # between two of them is what tells which one is wrong.
        pairs = [(a, b) for i, a in enumerate(backends) for b in backends[i + 1 :]]
        comparisons = [compare_dumps(dumps[a], dumps[b], overrides=overrides) for a, b in pairs]
        primary = next((c for c in comparisons if c["first_divergence"] is not None), comparisons[0])
        result = dict(primary)
        result["run"] = {
            "checkpoint": str(ck.path),
            "checkpoint_sha256": ck.sha256,
            "model": ck.config.to_dict(),
            "backends": backends,
            "prefill_ids": list(plan.prefill_ids),
            "decode_ids": list(plan.decode_ids),
            "command": command or shlex.join(["parity", *sys.argv[1:]]),
            "tool_versions": tool_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dumps": {k: (str(v) if tmp is None else None) for k, v in dumps.items()},
        }
        known = [
            {"backend": spec, **item}
            for spec, path in dumps.items()
            for item in (DumpReader(path).extra or {}).get("known_differences", [])
        ]
        if known:
            # Legitimate, named differences of a backend's math (e.g. HF's rescaling): shown with
            # every verdict so they are never mistaken for — or hidden as — a porting bug.
            result["known_differences"] = known
            result["run"]["known_differences"] = "; ".join(
                f"{k['backend']}: {k['name']} ({'applies' if k['applies'] else 'no effect here'})" for k in known
            )
        if len(comparisons) > 1:
            result["comparisons"] = [
                {
                    "expected": a,
                    "actual": b,
                    "verdict": c["verdict"],
                    "first_divergence": c["first_divergence"],
                    "summary": c["summary"],
                }
                for (a, b), c in zip(pairs, comparisons)
            ]
            result["odd_one_out"] = odd_one_out(backends, {pair: c["first_divergence"] is None for pair, c in zip(pairs, comparisons)})
        return RunOutcome(result=result, dumps=dumps if tmp is None else {}, comparisons=comparisons)
    finally:
        if tmp is not None:
            tmp.cleanup()
