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
from parity.dumpers.backends import RunPlan, target_for_device, tool_versions, torch_math_settings
from parity.dumpers.format import DumpReader
from parity.dumpers.registry import check_backend_spec, dump_dir_name, make_backend
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


def divergence_detail(result: dict, *, dumps: dict[str, Path]) -> dict | None:
    """What a report needs beyond the metrics: the error histogram of the first diverging tensor
    and its per-token-row worst error, read back from the two dumps (never held in the result)."""
    fd = result.get("first_divergence")
    if fd is None:
        return None
    paths = {str(p.resolve()): p for p in dumps.values()}
    exp_path, act_path = (result[side].get("path") for side in ("expected", "actual"))
    if exp_path not in paths or act_path not in paths:
        return None
    try:
        a = DumpReader(paths[act_path]).read_stage(fd["step"], fd["stage"]).astype(np.float64)
        b = DumpReader(paths[exp_path]).read_stage(fd["step"], fd["stage"]).astype(np.float64)
    except ParityError:
        return None
    if a.shape != b.shape:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - b)
    finite = diff[np.isfinite(diff)]
    nonzero = finite[finite > 0]
    hist = None
    if nonzero.size:
        lo, hi = np.floor(np.log10(nonzero.min())), np.ceil(np.log10(nonzero.max()))
        edges = np.arange(lo, max(hi, lo + 1) + 0.5, 0.5)  # half-decade bins of log10 |a - b|
        counts, _ = np.histogram(np.log10(nonzero), bins=edges)
        hist = {"log10_edges": edges.tolist(), "counts": counts.tolist(), "exact": int(finite.size - nonzero.size),
                "nonfinite": int(diff.size - finite.size)}
    rows = None
    if not fd["stage"].startswith("state.") and diff.ndim >= 1:
        per_row = diff.reshape(diff.shape[0], -1)
        rows = [float(np.nanmax(r)) if np.isfinite(r).any() else "nan" for r in per_row]
    return {"stage": fd["stage"], "step": fd["step"], "histogram": hist, "row_max_abs": rows}


def repro_command(ck: Checkpoint, *, backends: list[str], plan: RunPlan, result: dict) -> str:
    """One line that reruns just enough to see the first divergence again (or the whole run)."""
    fd = result.get("first_divergence")
    steps = len(plan.decode_ids) if fd is None else fd["step"]
    argv = ["parity", "run", "--checkpoint", str(ck.path), "--backends", ",".join(backends),
            "--ids", ",".join(map(str, plan.prefill_ids))]
    decode = list(plan.decode_ids)[:steps]
    argv += ["--decode-ids", ",".join(map(str, decode))] if decode else ["--decode-steps", "0"]
    if fd is not None and result.get("mode") == "isolated":
        argv += ["--mode", "isolated", "--only-step", str(fd["step"])]
        if fd.get("layer") is not None:
            argv += ["--only-layer", str(fd["layer"])]
    return shlex.join(argv)


def _run_arbiter(ck, *, result, backends, dumps, plan, dump_dir: Path, overrides, say, on_step, multiplier) -> None:
    from parity.compare import arbitrate_runs
    from parity.compare.arbiter import DEFAULT_MULTIPLIER
    from parity.dumpers.backends import ReferenceBackend

    if backends[0] != "reference":
        raise ParityError("the fp64 arbiter needs the torch reference as the first backend")
    say("running the float64 arbiter (the reference in double precision)")
    arb = ReferenceBackend(ck, dtype="float64", name="reference-fp64").dump(plan, path=dump_dir / "reference-fp64", on_step=on_step)
    dumps["reference-fp64"] = arb
    arbiter_view, reference_view = DumpReader(arb), DumpReader(dumps[backends[0]])
    blocks = []
    for spec, path in dumps.items():
        if spec in (backends[0], "reference-fp64"):
            continue
        actual = DumpReader(path)
        policy = TolerancePolicy.for_dtype(actual.dtype, overrides)
        verdict = arbitrate_runs(actual=actual, reference=reference_view, arbiter=arbiter_view, policy=policy,
                                 multiplier=multiplier or DEFAULT_MULTIPLIER).to_dict()
        blocks.append({"backend": spec, **verdict})
    result["arbiter"] = blocks
    # With the arbiter asked for, it is the judge: its first divergence (of the primary pair) decides.
    primary = next((b for b in blocks if b["first_divergence"] is not None), blocks[0] if blocks else None)
    if primary is not None:
        result["tolerance_verdict"] = {"verdict": result["verdict"], "first_divergence": result["first_divergence"]}
        result["verdict"] = primary["verdict"]
        fd = primary["first_divergence"]
        result["first_divergence"] = None if fd is None else {
            **fd, "step_kind": "prefill" if fd["step"] == 0 else "decode", "row": None, "reason": "arbiter",
            "max_abs": fd["actual_error"], "judged_by": f"fp64 arbiter ({primary['backend']})",
        }


def _isolatable(backend) -> bool:
    from parity.dumpers.backends import TVMDebugBackend

    return isinstance(backend, TVMDebugBackend)


def _run_isolated(
    ck, *, backends, made, dumps, plan, dump_dir: Path, overrides, say, on_step, only_layer=None, only_step=None
) -> list[dict]:
    """Each compiled backend again, piece by piece on the first backend's dumped inputs."""
    from parity.dumpers.isolated import TVMIsolatedBackend

    yardstick = backends[0]
    out = []
    for spec in backends[1:]:
        backend = made[spec]
        if not _isolatable(backend):
            say(f"{spec} has no per-layer entry points; it runs propagated only")
            continue
        say(f"running {spec} isolated: every layer of every step on {yardstick}'s inputs")
        iso = TVMIsolatedBackend(
            ck, reference_dump=dumps[yardstick], model=backend.model, only_layer=only_layer, only_step=only_step
        )
        path = iso.dump(plan, path=dump_dir / (dump_dir_name(spec) + "-isolated"), on_step=on_step)
        dumps[f"{spec} (isolated)"] = path
        out.append(compare_dumps(dumps[yardstick], path, overrides=overrides))
    if not out:
        raise ParityError("isolated mode needs a compiled backend (tvm or mutant/...) after the yardstick")
    return out


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
    mode: str = "propagated",
    only_layer: int | None = None,
    only_step: int | None = None,
    arbiter: bool = False,
    arbiter_multiplier: float | None = None,
    device: str = "cpu",
) -> RunOutcome:
    """Run every backend on ``plan``, dump each, compare every pair.

    The returned result's top level is one comparison (the first that diverged, else the first),
    with a ``run`` block of metadata and, when more than two backends ran, ``comparisons``: the
    verdict of every pair.

    ``mode``: "propagated" (each backend on its own outputs), "isolated" (compiled backends run
    piece by piece on the first backend's inputs, so a stage shows only the error it adds; see
    parity/dumpers/isolated.py) or "both". With "both" the top level is the isolated comparison
    — the verdict names the first stage whose *own* error is out of tolerance — and ``modes``
    holds both verdicts side by side.

    ``arbiter``: also run the first backend (the torch reference) in float64 and judge every other
    backend by the dynamo rule of parity/compare/arbiter.py: error against fp64 within a multiple
    of the fp32 reference's own error against fp64. The result then has ``arbiter`` blocks, and
    the arbiter's verdict is the run's verdict.
    """
    if mode not in ("propagated", "isolated", "both"):
        raise ParityError(f"unknown mode {mode!r}; choose propagated, isolated or both")
    if (only_layer is not None or only_step is not None) and mode != "isolated":
        raise ParityError("--only-layer / --only-step narrow an isolated run; add --mode isolated")
    if only_step is not None and not 0 <= only_step <= len(plan.decode_ids):
        raise ParityError(f"--only-step {only_step}: the plan has steps 0..{len(plan.decode_ids)}")
    target = target_for_device(device)  # where the compiled backends run; the reference stays in torch on the CPU
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if len(backends) < 2:
        raise ParityError("need at least two backends to compare, e.g. --backends reference,tvm")
    for b in backends:
        check_backend_spec(b)
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
        made = {}
        for spec in backends:
            say(f"preparing backend {spec}")
            backend = made[spec] = make_backend(spec, ck, cache_dir=cache_dir, on_event=say, target=target)
            if mode == "isolated" and spec != backends[0] and _isolatable(backend):
                continue  # only its isolated run is wanted
            say(f"running {spec}: prefill of {len(plan.prefill_ids)} tokens + {len(plan.decode_ids)} decode steps")
            dumps[spec] = backend.dump(plan, path=Path(dump_dir) / dump_dir_name(spec), on_step=on_step)
        # Every pair, the earlier-listed backend as the yardstick: with three or more, agreement
        # between two of them is what tells which one is wrong.
        ran = [b for b in backends if b in dumps]
        pairs = [(a, b) for i, a in enumerate(ran) for b in ran[i + 1 :]]
        comparisons = [compare_dumps(dumps[a], dumps[b], overrides=overrides) for a, b in pairs]
        isolated = []
        if mode in ("isolated", "both"):
            isolated = _run_isolated(ck, backends=backends, made=made, dumps=dumps, plan=plan, dump_dir=Path(dump_dir),
                                     overrides=overrides, say=say, on_step=on_step, only_layer=only_layer, only_step=only_step)
        propagated_primary = next((c for c in comparisons if c["first_divergence"] is not None), comparisons[0]) if comparisons else None
        isolated_primary = next((c for c in isolated if c["first_divergence"] is not None), isolated[0]) if isolated else None
        primary = isolated_primary if isolated_primary is not None else propagated_primary
        result = dict(primary)
        result["mode"] = "isolated" if primary is isolated_primary else "propagated"
        if mode == "both":
            result["modes"] = {
                name: None if c is None else {"verdict": c["verdict"], "first_divergence": c["first_divergence"], "summary": c["summary"]}
                for name, c in (("propagated", propagated_primary), ("isolated", isolated_primary))
            }
        if arbiter:
            _run_arbiter(ck, result=result, backends=backends, dumps=dumps, plan=plan, dump_dir=Path(dump_dir),
                         overrides=overrides, say=say, on_step=on_step, multiplier=arbiter_multiplier)
        result["first_divergence_detail"] = divergence_detail(result, dumps=dumps)
        result["repro"] = repro_command(ck, backends=[result["expected"]["backend"], result["actual"]["backend"]],
                                        plan=plan, result=result)
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
            "mode": mode,
            "device": device,
            "torch_math": torch_math_settings(),
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
