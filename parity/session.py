"""One parity run, start to finish: backends -> dumps -> comparison -> result.

The CLI, the demo and the pytest suite all go through here, so they judge runs the same way.
Data flows one way: each backend writes its dump; the dumps are read back and compared; the
result is assembled typed (parity/results.py: ``RunResult`` and its blocks) from the comparisons,
and ``RunOutcome.result`` is its JSON form, what reports render and ``--json`` writes.
"""

from __future__ import annotations

import datetime as _dt
import gc
import shlex
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.compare import TolerancePolicy, compare_runs
from parity.compare.tolerance import JUDGE_ISOLATED, JUDGE_PAIR, JUDGE_REPLAY, spliced_scan_tolerance
from parity.compare.verdict import VERDICT_DRIFT
from parity.dumpers.backends import (ReferenceBackend, RunPlan, pin_torch_math, reference_device_info, target_for_device,
                                     tool_versions, torch_math_settings)
from parity.dumpers.format import DumpReader
from parity.dumpers.registry import check_backend_spec, dump_dir_name, make_backend
from parity.dumpers.worker import DEFAULT_TIMEOUT, in_process_requested, open_dump, run_in_worker
from parity.heap import trim_heap
from parity.errors import ParityError
from parity.reference import check_reference_device
from parity.results import Crash, Divergence, Drift, EndToEnd, OwnError, PairResult, Record, RunInfo, RunResult, Summary

# replay (default): propagated drift judged against its envelope + each stage's own error by replay;
# propagated: the strict per-stage verdict of the propagated run alone; isolated: own error only
# (our compiled build run layer by layer on the yardstick's inputs, every other backend replayed);
# both: as replay, with our compiled build isolated instead of replayed, both shown side by side.
MODES = ("replay", "propagated", "isolated", "both")

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
    result: dict  # JSON-able: ``typed.to_dict()``; top level is the primary comparison (see ``run_parity``)
    dumps: dict[str, Path]
    comparisons: list[dict] = field(default_factory=list)
    # spec -> the comparison that shows the error each of its stages adds (replay or isolated)
    own_comparisons: dict[str, dict] = field(default_factory=dict)

    # spec -> BackendFailure.to_dict() of each backend that crashed or hung (parity/dumpers/worker.py)
    failures: dict[str, dict] = field(default_factory=dict)
    typed: RunResult | None = None  # the result as run_parity assembled it (``result`` is its JSON form)

    @property
    def crashed(self) -> bool:
        return bool(self.failures)

    @property
    def diverged(self) -> bool:
        return self.result["first_divergence"] is not None or self.crashed


def compare_dumps(expected: Path, actual: Path, *, policy: TolerancePolicy | None = None, overrides=None) -> dict:
    """Compare two dump directories; ``expected`` is the yardstick (usually the reference). Without a
    ``policy``, the two are a pair of runs (judge_policy says who judges with what)."""
    exp, act = open_dump(expected), open_dump(actual)  # a crashed backend's completed steps, too
    if exp.model != act.model:
        raise ParityError(f"dumps {expected} and {actual} are of different models; nothing to compare")
    policy = policy or judge_policy(JUDGE_PAIR, dump=actual, overrides=overrides)
    result = compare_runs(actual=act, expected=exp, policy=policy).to_dict()
    trim_heap()  # the records it read are gone; their pages go back (parity/heap.py)
    return result


def judge_policy(judge: str, *, dump: Path, overrides=None, spliced: bool = False) -> TolerancePolicy:
    """The one place that decides which allowance judges ``dump``'s records, given who judges them
    (parity.compare.tolerance.JUDGES says what each judge is; the user's --tol come first in all):

    - a pair of runs (JUDGE_PAIR; the arbiter's, and a quantised pair's, whose drift _judge_pair leaves
      to the end-to-end metrics): the dtype's defaults, the drift envelope's units;
    - a replay or the isolated judge that ``spliced`` in the dump's own r, k, v and wkv for every layer
      and step (splices_scan_inputs): the judge's scale for the dtype (tolerance.JUDGED_TOLERANCES) and
      att.wkv at fp32's (spliced_scan_tolerance). On RWKV-4 (no GroupNorm, nothing spliced) the judged
      scale too: each stage there is computed from the dump's own inputs without a renormalised head;
    - an RWKV-5 judge that did not splice the scan's inputs (a backend that records no r, k, v, an
      --only-layer isolated run): the pair's, since GroupNorm renormalised the judge's own wkv and a
      record carries what two runs differ by (bf16: 0.58 of max|b| replayed so, 1.08 isolated).
    """
    from parity.dumpers.replay import splices_scan_inputs

    reader = open_dump(dump)
    scan = judge != JUDGE_PAIR and spliced and splices_scan_inputs(reader)  # the manifest read once
    if judge != JUDGE_PAIR and not scan and reader.model.get("version") != "4":
        judge = JUDGE_PAIR
    return TolerancePolicy.for_dtype(reader.dtype, overrides, judge=judge, spliced_scan=scan)


def _typed(cls, d: dict | None):
    """``d`` (a dict the comparison engine or the verdict made) as a fresh typed block, or None."""
    return None if d is None else cls.build(d)


def _divergence(fd: dict | None) -> Divergence | None:
    # A record's fields as the engine wrote them (only its keys), plus how it was judged.
    return None if fd is None else Divergence.from_dict(fd)


def _shown(comparison: dict) -> RunResult:
    """The typed top level of a result, from the comparison it shows (RunComparison.to_dict())."""
    return RunResult(
        verdict=comparison["verdict"], first_divergence=_divergence(comparison["first_divergence"]),
        expected=comparison["expected"], actual=comparison["actual"], policy=comparison["policy"],
        steps=comparison["steps"], records=[Record.from_dict(r) for r in comparison["records"]],
        summary=Summary.from_dict(comparison["summary"]), missing=comparison.get("missing", []),
        unmatched_steps=comparison.get("unmatched_steps", []), not_comparable=comparison.get("not_comparable"),
        end_to_end=_typed(EndToEnd, comparison.get("end_to_end")),
    )


def replay_own_error(
    ck, *, candidate_dump: Path, path: Path, model, overrides, judge: str, on_step=None, device: str | None = None
) -> tuple[dict, dict]:
    """Replay one dump and compare it with its replay: (own-error summary, comparison). ``device``: where
    a reference the replay makes for itself (another dtype than ``model``'s) runs; default ``model``'s."""
    from parity.compare.verdict import own_error_summary
    from parity.dumpers.replay import replay_dump

    replayed, gaps = replay_dump(ck, candidate_dump=candidate_dump, path=path, model=model, on_step=on_step,
                                 device=device)
    # The replay splices the candidate's r, k, v and wkv in wherever it recorded them (ReplayBackend).
    policy = judge_policy(JUDGE_REPLAY, dump=candidate_dump, overrides=overrides, spliced=True)
    comparison = compare_dumps(replayed, candidate_dump, policy=policy)
    return {**own_error_summary(comparison, method="replay", not_replayable=gaps), "judge": judge}, comparison


def diff_dumps(expected: Path, actual: Path, *, checkpoint=None, overrides=None) -> dict:
    """``parity diff``: two saved dumps. With the checkpoint they ran, each dump (but a plain
    reference's) is replayed and judged as ``run_parity`` judges a live run; without it, the
    strict per-stage verdict of the propagated comparison."""
    from parity.reference import make_reference

    for path in (expected, actual):
        DumpReader(path)  # the user's dumps must be complete: a crashed run's partial dump is refused, not judged whole
    comparison = compare_dumps(expected, actual, overrides=overrides)
    if checkpoint is None:
        return comparison
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    names = {"expected": DumpReader(expected).backend, "actual": DumpReader(actual).backend}
    if names["expected"] == names["actual"]:
        names = {side: f"{name} ({side})" for side, name in names.items()}
    own: dict[str, tuple[dict, dict]] = {}
    model = make_reference(ck, dtype="float32")
    with tempfile.TemporaryDirectory(prefix="parity-replay-") as tmp:
        for side, path in (("expected", expected), ("actual", actual)):
            if DumpReader(path).backend == "reference" and DumpReader(path).mode == "eager":
                continue  # the plain reference replays itself exactly
            own[names[side]] = replay_own_error(ck, candidate_dump=Path(path), path=Path(tmp) / side, model=model,
                                                overrides=overrides, judge="reference (replay only)")
    a, b = names["expected"], names["actual"]
    judged = _judge_pair(a, b, comparison, own=own, mode="replay", backends=[a, b])
    side = judged["own_side"]
    result = _shown(own[side][1] if judged["first_divergence"] is not None and side in own and
                    judged["first_divergence"].get("judged_by") == "replay" else comparison)
    result.verdict, result.first_divergence = judged["verdict"], _divergence(judged["first_divergence"])
    result.drift, result.end_to_end = _typed(Drift, judged["drift"]), _typed(EndToEnd, comparison.get("end_to_end"))
    result.mode, result.pair = "replay", {"expected": a, "actual": b}
    if side in own:
        result.own_error = OwnError.build({"backend": side, **own[side][0]})
    result.own_errors = {spec: OwnError.build(summary) for spec, (summary, _) in own.items()}
    result.comparisons = [_pair_entry(a, b, comparison, judged, failures={})]
    return result.to_dict()


def divergence_detail(result: RunResult, *, dumps: dict[str, Path]) -> dict | None:
    """What a report needs beyond the metrics: the error histogram of the first diverging tensor
    and its per-token-row worst error, read back from the two dumps (never held in the result)."""
    fd = result.first_divergence
    if fd is None:
        return None
    paths = {str(p.resolve()): p for p in dumps.values()}
    exp_path, act_path = result.expected.get("path"), result.actual.get("path")
    if exp_path not in paths or act_path not in paths:
        return None
    try:
        a = open_dump(paths[act_path]).read_stage(fd.step, fd.stage).astype(np.float64)
        b = open_dump(paths[exp_path]).read_stage(fd.step, fd.stage).astype(np.float64)
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
    if not fd.stage.startswith("state.") and diff.ndim >= 1:
        per_row = diff.reshape(diff.shape[0], -1)
        rows = [float(np.nanmax(r)) if np.isfinite(r).any() else "nan" for r in per_row]
    return {"stage": fd.stage, "step": fd.step, "histogram": hist, "row_max_abs": rows}


def repro_command(ck: Checkpoint, *, backends: list[str], plan: RunPlan, result: RunResult) -> str:
    """One line that reruns just enough to see the first divergence again (or the whole run)."""
    fd = result.first_divergence
    steps = len(plan.decode_ids) if fd is None else fd.step
    argv = ["parity", "run", "--checkpoint", str(ck.path), "--backends", ",".join(backends),
            "--ids", ",".join(map(str, plan.prefill_ids))]
    decode = list(plan.decode_ids)[:steps]
    argv += ["--decode-ids", ",".join(map(str, decode))] if decode else ["--decode-steps", "0"]
    if fd is not None and result.mode == "isolated":
        argv += ["--mode", "isolated", "--only-step", str(fd.step)]
        if fd.layer is not None:
            argv += ["--only-layer", str(fd.layer)]
    return shlex.join(argv)


def _run_arbiter(ck, *, result: RunResult, backends, dumps, plan, dump_dir: Path, overrides, say, on_step,
                 multiplier, reference_device: str = "cpu") -> None:
    from parity.compare import arbitrate_runs
    from parity.compare.arbiter import DEFAULT_MULTIPLIER
    from parity.dumpers.backends import ReferenceBackend

    if backends[0] != "reference":
        raise ParityError("the fp64 arbiter needs the torch reference as the first backend")
    say("running the float64 arbiter (the reference in double precision)")
    arb = ReferenceBackend(ck, dtype="float64", name="reference-fp64", device=reference_device).dump(
        plan, path=dump_dir / "reference-fp64", on_step=on_step)
    dumps["reference-fp64"] = arb
    arbiter_view, reference_view = DumpReader(arb), DumpReader(dumps[backends[0]])
    blocks = []
    for spec, path in dumps.items():
        if spec in (backends[0], "reference-fp64"):
            continue
        actual = DumpReader(path)
        policy = judge_policy(JUDGE_PAIR, dump=path, overrides=overrides)  # against float64: the dtype's whole rounding
        verdict = arbitrate_runs(actual=actual, reference=reference_view, arbiter=arbiter_view, policy=policy,
                                 multiplier=multiplier or DEFAULT_MULTIPLIER).to_dict()
        blocks.append({"backend": spec, **verdict})
    result.arbiter = blocks
    # With the arbiter asked for, it is the judge: its first divergence (of the primary pair) decides.
    primary = next((b for b in blocks if b["first_divergence"] is not None), blocks[0] if blocks else None)
    if primary is not None:
        replaced = result.first_divergence
        result.tolerance_verdict = {"verdict": result.verdict,
                                    "first_divergence": None if replaced is None else replaced.to_dict()}
        result.verdict = primary["verdict"]
        fd = primary["first_divergence"]
        result.first_divergence = _divergence(None if fd is None else {
            **fd, "step_kind": "prefill" if fd["step"] == 0 else "decode", "row": None, "reason": "arbiter",
            "max_abs": fd["actual_error"], "judged_by": f"fp64 arbiter ({primary['backend']})",
        })


def _runs_beside(target: str) -> bool:
    """Whether the compiled backends' workers run while the reference runs here: on the GPU, where
    their weights do not take host memory. On the CPU they run first, alone (issue 9's memory)."""
    return target == "cuda"


# The torch references run here, on this process's one fp32 copy of the weights (Checkpoint.fp32_weights):
# ours (the replays reuse its model), the official package and transformers. They are witnesses, not
# code under test, so a crash verdict is not what they need; a worker each would hold a second copy of
# the weights and a second torch (issue 9: on a CUDA-torch host the official package's worker alone was
# 1.43 GB of a 0.1B run's 1.63 GB allowance). Compiled builds, mutants and plug-ins: a worker each.
TRUSTED_BACKENDS = ("reference", "chatrwkv", "hf")


def _trusted(spec: str) -> bool:
    """Whether backend ``spec`` (with any @dtype) is one of the torch references run in this process."""
    from parity.dumpers.registry import split_dtype

    return split_dtype(spec)[0] in TRUSTED_BACKENDS


def _isolatable(spec: str) -> bool:
    """Whether backend ``spec`` is our compiled debug build (tvm, or a compiled mutant): the one
    that can run isolated, layer by layer on the yardstick's inputs."""
    from parity.dumpers.registry import split_dtype

    if split_dtype(spec)[0] == "tvm":  # tvm, tvm@fp16, tvm@bf16
        return True
    if spec.startswith("mutant/"):
        from parity.mutants import get_mutant

        return get_mutant(spec.split("/", 1)[1]).side == "compiled"
    return False


class _Workers:
    """Runs backends in worker processes for one run, collecting their dumps, names and failures."""

    def __init__(self, ck, *, plan, cache_dir, target, timeout, say, on_step, failures, partials, names):
        self.ck, self.plan, self.cache_dir, self.target, self.timeout = ck, plan, cache_dir, target, timeout
        self.say, self.on_step = say, on_step
        self.failures, self.partials, self.names = failures, partials, names

    def run(self, spec: str, *, path: Path, isolated: dict | None = None, key: str | None = None) -> Path | None:
        """The finished dump's path, or None when the backend crashed or hung (recorded under
        ``key``, default ``spec``)."""
        key = key or spec
        out = run_in_worker(spec, self.ck, plan=self.plan, path=path, cache_dir=self.cache_dir, target=self.target,
                            timeout=self.timeout, on_event=self.say, on_step=self.on_step, isolated=isolated)
        if out.name and isolated is None:
            self.names[spec] = out.name
        if out.failure is None:
            return out.path
        self.failures[key] = out.failure
        if out.partial is not None and out.failure.steps_completed > 0:
            self.partials[key] = out.partial
        self.say(f"{spec} {out.failure.kind}: {out.failure.error} {out.failure.where()}")
        return None


def backend_labels(backends: list[str], names: dict[str, str]) -> dict[str, str]:
    """spec -> how tables name it: the backend's own ``name`` (a plug-in's, not its file path),
    unless two backends share a name (tvm and tvm-instrumented are both "tvm"): then the spec."""
    chosen = {spec: names.get(spec) or spec for spec in backends}
    counts: dict[str, int] = {}
    for label in chosen.values():
        counts[label] = counts.get(label, 0) + 1
    return {spec: label if counts[label] == 1 else spec for spec, label in chosen.items()}


def _attach_crashes(result: RunResult, *, backends, failures: dict, pairs, judged) -> None:
    """The crash verdict: ``crashes`` (every failed backend), ``crash`` (the first), each with what
    its finished steps showed against the yardstick; the run's verdict becomes the failure's kind."""
    out = []
    for spec, failure in failures.items():  # in the order they ran; an isolated run's is keyed "<spec> (isolated)"
        entry = failure.to_dict()
        against = next(((a, j) for (a, b), j in zip(pairs, judged) if b == spec), None) or \
            next(((b, j) for (a, b), j in zip(pairs, judged) if a == spec), None)
        entry["compared"] = None if against is None else {
            "against": against[0], "steps": entry["steps_completed"], "verdict": against[1]["verdict"],
            "first_divergence": against[1]["first_divergence"],
        }
        out.append(Crash.build(entry))
    result.crashes = out
    result.crash = out[0]
    result.verdict = out[0].kind


def _crash_only_result(*, backends, failures: dict, views: dict) -> RunResult:
    """A result with nothing compared: every backend but (at most) one died before its first step."""
    first = next(spec for spec in backends if spec in failures)
    ok = next((spec for spec in backends if spec in views), None)
    expected = open_dump(views[ok]).describe() if ok is not None else {"backend": None}
    return RunResult(
        verdict=failures[first].kind, first_divergence=None, expected=expected,
        actual={"backend": failures[first].name, "path": None}, policy={}, steps=[], records=[],
        summary=Summary.build({"records": 0, "failed": 0, "worst_logits_max_abs": None}), mode="propagated",
        pair={"expected": ok, "actual": first},
    )


def _finish_crash_only(result, *, ck, backends, plan, command, mode, device, labels, dumps, tmp, failures,
                       reference_device: str = "cpu") -> RunOutcome:
    _attach_crashes(result, backends=backends, failures=failures, pairs=[], judged=[])
    result.comparisons = []
    result.run = RunInfo.from_dict({
        "checkpoint": str(ck.path), "checkpoint_sha256": ck.sha256, "model": ck.config.to_dict(), "backends": backends,
        "prefill_ids": list(plan.prefill_ids), "decode_ids": list(plan.decode_ids),
        "command": command or shlex.join(["parity", *sys.argv[1:]]), "tool_versions": tool_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dumps": {k: (str(v) if tmp is None else None) for k, v in dumps.items()}, "backend_labels": labels,
        "isolation": "worker processes", "mode": mode, "device": device,
        **reference_device_info(reference_device),
    })
    return RunOutcome(result=result.to_dict(), dumps=dumps if tmp is None else {}, typed=result,
                      failures={spec: f.to_dict() for spec, f in failures.items()})


def _shared_reference(ck, made: dict, *, device: str = "cpu"):
    """The torch reference model the replays run: the yardstick's own when it is the plain
    reference, so a real-size model is held once (and runs on its device); else one made on ``device``."""
    from parity.dumpers.backends import ReferenceBackend
    from parity.reference import make_reference

    ref = made.get("reference")
    if isinstance(ref, ReferenceBackend) and ref.dtype == "float32":
        return ref.model
    return make_reference(ck, dtype="float32", device=device)


def _rounding_floor(ck, *, made: dict, dumps: dict, plan, dump_dir: Path, overrides, say, on_step,
                    reference_device: str = "cpu"):
    """The run's rounding floor (parity/dumpers/floor.py) against the plain fp32 reference's dump."""
    from parity.compare.verdict import RoundingFloor
    from parity.dumpers.backends import ReferenceBackend
    from parity.dumpers.floor import floor_dump

    model = _shared_reference(ck, made, device=reference_device)
    reference = dumps.get("reference")
    if reference is None or DumpReader(reference).dtype != "float32":
        reference = ReferenceBackend(ck, model=model).dump(plan, path=dump_dir / "reference-for-floor", on_step=on_step)
    say("drift is past the fixed envelope with no stage at fault: measuring this run's rounding floor "
        "(the reference again, its carried values moved by up to one ulp after every layer)")
    path = floor_dump(ck, model=model, plan=plan, path=dump_dir / "reference-rounding-floor", on_step=on_step)
    return RoundingFloor(compare_dumps(reference, path, overrides=overrides))


def _quantised_weights(spec: str) -> str | None:
    """The quantised weight format backend ``spec`` computes with (``int8``, ``q4``), or None."""
    from parity.compiled.dtypes import split_scheme
    from parity.dumpers.registry import spec_weights

    if spec.startswith("mutant/"):
        from parity.mutants import get_mutant

        return split_scheme(get_mutant(spec.removeprefix("mutant/")).dtype)[1]
    return spec_weights(spec)


def _own_errors(
    ck, *, backends, made, dumps, plan, dump_dir: Path, overrides, say, on_step, mode, only_layer=None, only_step=None,
    workers: _Workers | None = None, partials: dict[str, Path] | None = None, reference_device: str = "cpu",
) -> dict[str, tuple[dict, dict]]:
    """The error each backend's stages add themselves: spec -> (own-error summary, comparison).

    Our compiled build can run isolated (its layers on the yardstick's inputs; --mode isolated or
    both); every other backend — plug-ins, chatrwkv, hf, mutants of the reference — is replayed:
    the reference re-runs each layer on the backend's own recorded inputs (parity/dumpers/replay.py).
    The plain fp32 reference is skipped: replaying it would run the same code on the same inputs.
    """
    from parity.compare.verdict import own_error_summary
    from parity.dumpers.isolated import TVMIsolatedBackend

    yardstick = backends[0]
    out: dict[str, tuple[dict, dict]] = {}
    reference_model = None
    for spec in backends:
        if spec == "reference":
            continue
        if mode in ("isolated", "both") and spec != yardstick and _isolatable(spec):
            if yardstick not in dumps:
                continue  # the yardstick crashed: there are no inputs to isolate on
            say(f"running {spec} isolated: every layer of every step on {yardstick}'s inputs")
            path = dump_dir / (dump_dir_name(spec) + "-isolated")
            if spec in made:
                iso = TVMIsolatedBackend(ck, reference_dump=dumps[yardstick], model=made[spec].model,
                                         only_layer=only_layer, only_step=only_step)
                path = iso.dump(plan, path=path, on_step=on_step)
            else:
                path = workers.run(spec, path=path, key=f"{spec} (isolated)" if spec in dumps else spec, isolated={
                    "reference_dump": str(dumps[yardstick]), "only_layer": only_layer, "only_step": only_step})
                if path is None:
                    continue
            dumps[f"{spec} (isolated)"] = path
            judge_dump, judge = dumps[yardstick], yardstick
            dtype = DumpReader(path).dtype
            weights = _quantised_weights(spec)
            judge_reader = DumpReader(judge_dump)
            judge_weights = judge_reader.extra.get("weights") if isinstance(judge_reader.extra, dict) else None
            same = dtype == judge_reader.dtype and weights == judge_weights
            # A low-precision build's isolated layers are judged by the spliced judge even beside a
            # yardstick of their dtype: the yardstick computed its own r, k, v and wkv, and GroupNorm makes
            # that 1.08 of max|b| in bf16 (its judged scale, 5e-2, assumes the splice).
            if not same or spliced_scan_tolerance(dtype) is not None:
                # A low-precision build judged by the reference *in its dtype*, run on the same
                # yardstick inputs: its own rounding is then no error (fp16 isolated TVM vs the fp32
                # yardstick needs 0.13 of max|b|, vs the fp16 reference 2.3e-3; calibrate_precision).
                from parity.dumpers.registry import split_dtype
                from parity.dumpers.replay import ReplayBackend

                # ... and with the same quantised codes: a quantised build's isolated layers set beside
                # an unquantised judge would show the quantisation as their own error (tvm@fp16i8 was
                # called a divergence at L0.att.wkv that way).
                say(f"running the reference in {dtype}{' with ' + weights + ' weights' if weights else ''} on "
                    f"{yardstick}'s inputs: the judge of {spec}'s isolated layers")
                replay = ReplayBackend(ck, candidate_dump=dumps[yardstick], dtype=dtype, weights=weights, splice_from=path,
                                       device=reference_device)
                judge_dump = replay.dump(replay.plan(), path=dump_dir / (dump_dir_name(spec) + "-isolated-judge"),
                                         on_step=on_step)
                # Beside our reference in its own dtype and codes the judge is that yardstick's code on its own
                # inputs: it speaks for the yardstick's pairs only, as it did unspliced (_judge_pair).
                if not (same and split_dtype(yardstick)[0] == "reference"):
                    judge = f"reference@{dtype}{' (' + weights + ' weights)' if weights else ''} on {yardstick}'s inputs"
            policy = judge_policy(JUDGE_ISOLATED, dump=path, overrides=overrides, spliced=judge_dump != dumps[yardstick])
            comparison = compare_dumps(judge_dump, path, policy=policy)
            out[spec] = ({**own_error_summary(comparison, method="isolated"), "judge": judge}, comparison)
            continue
        # A crashed backend's finished steps (its partial dump) are replayed too: without an own
        # error they would be judged strictly, and at depth that is a false alarm (0.4B zoo).
        candidate = dumps.get(spec) or (partials or {}).get(spec)
        if candidate is None:
            continue
        say(f"replaying {spec}: the reference re-runs every layer on {spec}'s own inputs")
        reference_model = reference_model or _shared_reference(ck, made, device=reference_device)
        path = dump_dir / (dump_dir_name(spec) + "-replay")
        out[spec] = replay_own_error(ck, candidate_dump=candidate, path=path, model=reference_model,
                                     overrides=overrides, on_step=on_step, device=reference_device,
                                     judge="reference" if "reference" in backends else "reference (replay only)")
        dumps[f"{spec} (replay)"] = path
        gaps = out[spec][0]["not_replayable"]
        if gaps:
            say(f"{spec}: {len(gaps)} (step, layer) pair(s) not replayable, e.g. step {gaps[0]['step']} layer "
                f"{gaps[0]['layer']} lacks {gaps[0]['missing'][0]}")
    return out


def _judge_pair(a: str, b: str, comparison: dict, *, own: dict, mode: str, backends: list[str], floor=None) -> dict:
    """One pair's verdict: added error (own), drift within / beyond the envelope, or strict."""
    from parity.compare.verdict import VERDICT_ADDED, VERDICT_PASS, classify, drift_summary

    drift = drift_summary(comparison, dtype=comparison["actual"].get("dtype", "float32"), floor=floor)
    formats = {s: _quantised_weights(s) for s in (a, b) if not s.endswith(")")}  # "x (isolated)": its own spec's
    if len(set(formats.values())) > 1:
        # Quantised weights on one side only: the envelope measures rounding, not quantisation
        # (q4f16_1 vs fp32 drifts past it on correct builds); what the quantisation costs is the
        # end-to-end metrics' to say, and a kernel bug is the same-codes replay's (own error).
        drift = {**drift, "status": "not judged",
                 "not_judged": "quantised weights on one side only ("
                               + ", ".join(f"{s}: {w or 'unquantised'}" for s, w in formats.items())
                               + "): the envelope covers rounding, not quantisation; see KL and top-1"}
    # An own error is measured against a judge: the yardstick for isolated runs, the torch
    # reference for replays. It speaks for this pair only when the judge is one of the two, or is
    # no backend of the run (an independent reference): between two other backends it says
    # nothing about whether *these two* agree — and when the judge itself is the wrong one, both
    # would be blamed and the three-way vote could not name it. Such a pair is judged by its
    # propagated drift against the envelope alone.
    def speaks(spec: str) -> bool:
        judge = own[spec][0].get("judge")
        return judge in (a, b) or judge not in backends

    if mode != "isolated" and any(s in own and not speaks(s) for s in (a, b)):
        verdict, fd = classify(drift=drift, own=[])
        return {"verdict": verdict, "first_divergence": fd, "drift": drift, "own_side": b}
    owns = [own[s][0] for s in (b, a) if s in own and own[s][0]["records"] > 0 and speaks(s)]
    # A backend that is neither the plain reference nor replayable (it records too little, e.g.
    # logits only) leaves nothing to separate added error from drift: judge it per stage, strictly.
    unjudged = [s for s in (a, b) if s != "reference" and not (s in own and own[s][0]["records"] > 0)]
    if mode == "propagated" or unjudged:
        fd = comparison["first_divergence"]
        verdict = VERDICT_PASS if fd is None else VERDICT_ADDED
        fd = None if fd is None else {**fd, "judged_by": "propagated" if mode == "propagated" else
                                      f"propagated ({unjudged[0]} cannot be replayed)"}
    elif mode == "isolated":
        fd = next((o["first_divergence"] for o in owns if o["first_divergence"] is not None), None)
        verdict = VERDICT_PASS if fd is None else VERDICT_ADDED
    else:
        verdict, fd = classify(drift=drift, own=owns)
    culprit = next((s for s in (b, a) if s in own and own[s][0]["first_divergence"] is not None), None)
    return {"verdict": verdict, "first_divergence": fd, "drift": drift, "own_side": culprit or b}


def _pair_entry(a: str, b: str, comparison: dict, judged: dict, *, failures: dict) -> PairResult:
    """One pair of ``comparisons``: its verdict, first divergence, summary (worst logits), drift,
    end-to-end metrics and records. With a crashed or hung side the verdict is the failure's kind
    and ``compared_verdict`` what the steps it finished showed."""
    failed = failures.get(b) or failures.get(a)
    drift, e2e = judged.get("drift"), comparison.get("end_to_end")
    return PairResult(
        expected=a,
        actual=b,
        verdict=failed.kind if failed is not None else judged["verdict"],
        first_divergence=_divergence(judged["first_divergence"]),
        summary=Summary.from_dict(comparison["summary"]),
        drift=None if drift is None else Drift.from_dict({k: drift[k] for k in ("status", "worst_ratio", "envelope")}),
        end_to_end=None if e2e is None else
        EndToEnd.from_dict({k: v for k, v in e2e.items() if k not in ("per_step", "kl_rows")}),
        records=[Record.from_dict(r) for r in comparison["records"]],
        compared_verdict=judged["verdict"],
    )


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
    mode: str = "replay",
    only_layer: int | None = None,
    only_step: int | None = None,
    arbiter: bool = False,
    arbiter_multiplier: float | None = None,
    device: str = "cpu",
    timeout: float | None = DEFAULT_TIMEOUT,
    in_process: bool | None = None,
    reference_device: str = "cpu",
) -> RunOutcome:
    """Run every backend on ``plan``, dump each, compare every pair.

    The returned result's top level is one comparison: the pair judged first to fail, else the
    first pair — its own-error comparison when a stage adds error, else its propagated one — with
    ``verdict``, ``first_divergence``, ``drift``, ``own_error``, ``end_to_end`` (docs/result-format.md),
    a ``run`` block of metadata and, when more than two backends ran, ``comparisons``: every pair.

    ``mode`` (see MODES): "replay", the default, separates the error a stage adds (each backend's
    layers replayed by the reference on the backend's own inputs, parity/dumpers/replay.py) from
    drift it inherits (the propagated run, judged against the dtype's envelope,
    parity/compare/verdict.py). "propagated" is the strict per-stage verdict of the propagated run;
    "isolated" judges own error only (our compiled build run piece by piece on the first backend's
    inputs, parity/dumpers/isolated.py; other backends replayed); "both" is "replay" with our
    compiled build isolated, and ``modes`` holds the verdicts side by side.

    ``arbiter``: also run the first backend (the torch reference) in float64 and judge every other
    backend by the dynamo rule of parity/compare/arbiter.py: error against fp64 within a multiple
    of the fp32 reference's own error against fp64. The result then has ``arbiter`` blocks, and
    the arbiter's verdict is the run's verdict.

    Every backend but the torch reference runs in a worker process of its own
    (parity/dumpers/worker.py); one that crashes (a signal, an exception in its own code) or hangs
    (``timeout`` seconds without finishing a step) does not end the run: the verdict is "crashed"
    or "timed out", ``crash``/``crashes`` say which backend, step, last stage and error, and the
    steps it finished are compared. ``in_process`` (default: PARITY_IN_PROCESS) runs every backend
    here instead, for a debugger.

    ``device`` is where the compiled backends run (cpu: llvm, cuda: the CUDA build);
    ``reference_device`` where the torch reference (``reference``) runs, and with it every replay,
    the isolated judge, the rounding floor and the fp64 arbiter, which reuse or mirror it. Other
    torch backends (``reference@DTYPE``, mutants of the reference, chatrwkv) stay on the CPU. On
    cuda, TF32 and reduced-precision reductions are pinned off (``run.torch_math`` records them).
    """
    if mode not in MODES:
        raise ParityError(f"unknown mode {mode!r}; choose {', '.join(MODES)}")
    if timeout is not None and timeout < 0:
        raise ParityError(f"--timeout {timeout:g}: give seconds per step (0: no limit)")
    if (only_layer is not None or only_step is not None) and mode != "isolated":
        raise ParityError("--only-layer / --only-step narrow an isolated run; add --mode isolated")
    if only_step is not None and not 0 <= only_step <= len(plan.decode_ids):
        raise ParityError(f"--only-step {only_step}: the plan has steps 0..{len(plan.decode_ids)}")
    target = target_for_device(device)  # where the compiled backends run
    check_reference_device(reference_device)  # where the torch reference runs: a one-line error if it cannot
    if reference_device == "cuda":
        pin_torch_math()  # no TF32, no reduced-precision reductions in the reference (also with --device cpu)
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if len(backends) < 2:
        raise ParityError("need at least two backends to compare, e.g. --backends reference,tvm")
    for b in backends:
        check_backend_spec(b)
    if len(set(backends)) != len(backends):
        raise ParityError(f"backend listed twice: {','.join(backends)}")
    plan.check(vocab_size=ck.config.vocab_size)
    say = on_event or (lambda msg: None)

    isolate = not (in_process if in_process is not None else in_process_requested())

    tmp = None
    if dump_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="parity-dumps-")
        dump_dir = Path(tmp.name)
    try:
        dumps: dict[str, Path] = {}
        made = {}
        names: dict[str, str] = {}
        # Backends that crashed or hung in their worker, and the steps they finished (partial dumps).
        failures: dict = {}
        partials: dict[str, Path] = {}
        workers = _Workers(ck, plan=plan, cache_dir=cache_dir, target=target, timeout=timeout, say=say, on_step=on_step,
                           failures=failures, partials=partials, names=names)

        def in_parent(spec: str) -> bool:
            return not isolate or _trusted(spec)

        # Workers first: until the reference runs here, this process holds the checkpoint only
        # memory-mapped, so a worker's fp32 copy of the weights and ours are never alive together.
        # A compiled backend on the GPU holds its weights there, not beside ours: its worker runs
        # while the reference runs here (two devices busy at once), and the run waits for it below.
        beside: dict[str, Future] = {}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-gpu-worker") if (
            isolate and _runs_beside(target)) else None

        def run_worker(spec: str) -> None:
            path = workers.run(spec, path=Path(dump_dir) / dump_dir_name(spec))
            if path is not None:
                dumps[spec] = path

        for spec in sorted(backends, key=in_parent):
            say(f"preparing backend {spec}")
            only_isolated = mode == "isolated" and spec != backends[0] and _isolatable(spec)
            if not in_parent(spec):
                names.setdefault(spec, spec)
                if not only_isolated:  # else its isolated run (after the yardstick's dump) is all that is wanted
                    say(f"running {spec} in a worker process: prefill of {len(plan.prefill_ids)} tokens + "
                        f"{len(plan.decode_ids)} decode steps" + (" (beside the reference)" if pool and _isolatable(spec) else ""))
                    if pool is not None and _isolatable(spec):
                        beside[spec] = pool.submit(run_worker, spec)
                    else:
                        run_worker(spec)
                continue
            if spec == "reference":
                # The plain reference, made on its device (make_backend's, on the CPU, is the same model).
                backend = made[spec] = ReferenceBackend(ck, device=reference_device)
            else:
                backend = made[spec] = make_backend(spec, ck, cache_dir=cache_dir, on_event=say, target=target)
            ck.release_file_pages()  # the file's pages its build read (e.g. the embedding ln0 is folded into)
            names[spec] = backend.name
            if only_isolated:
                continue
            say(f"running {spec}: prefill of {len(plan.prefill_ids)} tokens + {len(plan.decode_ids)} decode steps")
            dumps[spec] = backend.dump(plan, path=Path(dump_dir) / dump_dir_name(spec), on_step=on_step)
            if spec != "reference" and not _isolatable(spec):
                # Done with it (only the reference's model and our in-process build are used again):
                # the official package's ln0-folded embedding alone is 0.2 GB at 0.1B. It sits in
                # reference cycles (hooks, wrapped methods), hence the collection.
                del made[spec], backend
                gc.collect()
                trim_heap()
        if pool is not None:
            pool.shutdown(wait=True)  # the GPU workers' dumps (or their failures) are in by now
            for future in beside.values():
                future.result()  # an error of the harness itself (not the backend's: those are failures)
        # Every pair, the earlier-listed backend as the yardstick: with three or more, agreement
        # between two of them is what tells which one is wrong. A crashed backend's finished steps
        # (its partial dump) are compared like any dump.
        views = {**dumps, **partials}
        ran = [b for b in backends if b in views]
        pairs = [(a, b) for i, a in enumerate(ran) for b in ran[i + 1 :]]
        comparisons = [compare_dumps(views[a], views[b], overrides=overrides) for a, b in pairs]
        own: dict[str, tuple[dict, dict]] = {}
        if mode != "propagated":
            own = _own_errors(ck, backends=backends, made=made, dumps=dumps, plan=plan, dump_dir=Path(dump_dir),
                              overrides=overrides, say=say, on_step=on_step, mode=mode,
                              only_layer=only_layer, only_step=only_step, workers=workers, partials=partials,
                              reference_device=reference_device)
        if mode == "isolated":
            # Only the own-error comparisons ran for compiled backends: judge those, yardstick first.
            iso_pairs = [(backends[0], spec) for spec in backends[1:] if spec in own and spec not in dumps]
            pairs += iso_pairs
            comparisons += [own[spec][1] for _, spec in iso_pairs]
        labels = backend_labels(backends, names)
        if not pairs and failures:
            result = _crash_only_result(backends=backends, failures=failures, views=views)
            return _finish_crash_only(result, ck=ck, backends=backends, plan=plan, command=command, mode=mode,
                                      device=device, labels=labels, dumps=dumps, tmp=tmp, failures=failures,
                                      reference_device=reference_device)
        if not pairs:
            raise ParityError("isolated mode needs a compiled backend (tvm or mutant/...) or a replayable one after the yardstick")
        judged = [_judge_pair(a, b, c, own=own, mode=mode, backends=backends) for (a, b), c in zip(pairs, comparisons)]
        if any(j["verdict"] == VERDICT_DRIFT for j in judged):
            # Past the fixed envelope with no stage at fault. Before calling that a finding, measure
            # how far this model carries a last-bit difference on this prompt (the rounding floor),
            # and judge the drift against a multiple of it as well (parity/compare/verdict.py).
            floor = _rounding_floor(ck, made=made, dumps=dumps, plan=plan, dump_dir=Path(dump_dir),
                                    overrides=overrides, say=say, on_step=on_step, reference_device=reference_device)
            judged = [_judge_pair(a, b, c, own=own, mode=mode, backends=backends, floor=floor)
                      for (a, b), c in zip(pairs, comparisons)]
        # The pair shown at the top: the first to diverge, else the first with a crashed backend.
        index = next((i for i, j in enumerate(judged) if j["first_divergence"] is not None),
                     next((i for i, (a, b) in enumerate(pairs) if a in failures or b in failures), 0))
        (pa, pb), primary, verdict = pairs[index], comparisons[index], judged[index]
        side = verdict["own_side"]
        own_summary, own_comparison = own.get(side, (None, None))
        if verdict["first_divergence"] is not None and verdict["first_divergence"].get("judged_by") in ("replay", "isolated"):
            # The top level shows the comparison that names the error: the stage that adds it.
            result = _shown(own_comparison)
            result.mode = own_summary["method"]
        else:
            result = _shown(primary)
            result.mode = "isolated" if (mode == "isolated" and pb not in dumps) else "propagated"
        result.verdict = verdict["verdict"]
        result.first_divergence = _divergence(verdict["first_divergence"])
        result.pair = {"expected": pa, "actual": pb}
        if mode != "isolated" or primary.get("end_to_end"):
            result.end_to_end = _typed(EndToEnd, primary.get("end_to_end"))
        if mode != "isolated":
            result.drift = _typed(Drift, verdict["drift"])
        if own_summary is not None:
            result.own_error = OwnError.build({"backend": side, **own_summary})
        if own:
            result.own_errors = {spec: OwnError.build(summary) for spec, (summary, _) in own.items()}
        if mode != "propagated":
            method = own_summary["method"] if own_summary else None
            modes = {"propagated": None if pb not in dumps or pa not in dumps else primary}
            if mode == "both":
                modes.setdefault("isolated", None)
            if method is not None:
                modes[method] = own_comparison
            result.modes = {
                name: None if c is None else {"verdict": c["verdict"], "first_divergence": c["first_divergence"], "summary": c["summary"]}
                for name, c in modes.items()
            }
        if arbiter:
            _run_arbiter(ck, result=result, backends=backends, dumps=dumps, plan=plan, dump_dir=Path(dump_dir),
                         overrides=overrides, say=say, on_step=on_step, multiplier=arbiter_multiplier,
                         reference_device=reference_device)
        result.first_divergence_detail = divergence_detail(result, dumps={**dumps, **partials})
        if failures:
            _attach_crashes(result, backends=backends, failures=failures, pairs=pairs, judged=judged)
        result.repro = repro_command(ck, backends=[pa, pb], plan=plan, result=result)
        run_info = {
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
            "backend_labels": labels,
            "isolation": "worker processes" if isolate else "in process",
            "timeout_s": timeout if isolate else None,
            "mode": mode,
            "device": device,
            **reference_device_info(reference_device),
            "torch_math": torch_math_settings(),
        }
        if partials and tmp is None:
            run_info["partial_dumps"] = {k: str(v) for k, v in partials.items()}
        extras = {spec: (open_dump(views[spec]).extra or {}) for spec in backends if spec in views}
        known = [
            {"backend": spec, **item}
            for spec, extra in extras.items()
            for item in extra.get("known_differences", [])
        ]
        if known:
            # Legitimate, named differences of a backend's math (e.g. HF's rescaling): shown with
            # every verdict so they are never mistaken for — or hidden as — a porting bug.
            result.known_differences = known
            run_info["known_differences"] = "; ".join(
                f"{k['backend']}: {k['name']} ({'applies' if k['applies'] else 'no effect here'})" for k in known
            )
        result.run = RunInfo.from_dict(run_info)
        notes = [{"backend": spec, "note": str(note)} for spec, extra in extras.items()
                 for note in extra.get("notes") or [] if isinstance(extra.get("notes"), list)]
        if notes:
            # A backend's own remarks (a plug-in's ``notes``, e.g. "rows 0..T-2 come from an extra
            # entry point"): shown with every verdict, like known differences.
            result.notes = notes
        # Every pair, always (also with two backends, and when all agree): each pair's verdict,
        # first divergence, worst logits and records, so no backend's own error goes unshown.
        result.comparisons = [_pair_entry(a, b, c, j, failures=failures)
                              for (a, b), c, j in zip(pairs, comparisons, judged)]
        if len(comparisons) > 1:
            result.odd_one_out = odd_one_out(
                # A pair with a crashed or hung side does not agree: its run never finished.
                [b for b in backends if b in views],
                {pair: j["first_divergence"] is None and not set(pair) & set(failures) for pair, j in zip(pairs, judged)}
            )
            odd = result.odd_one_out["backend"]
            if odd in failures:
                others = [labels[b] for b in backends if b in views and b != odd]
                result.odd_one_out["explanation"] = (f"{', '.join(others)} agree with each other; "
                                                     f"{labels[odd]} {failures[odd].kind}")
        # Typed as it was assembled (parity/results.py); its JSON form is what reports and --json read.
        return RunOutcome(result=result.to_dict(), dumps=dumps if tmp is None else {}, comparisons=comparisons,
                          own_comparisons={spec: c for spec, (_, c) in own.items()}, typed=result,
                          failures={spec: f.to_dict() for spec, f in failures.items()})
    finally:
        if tmp is not None:
            tmp.cleanup()
