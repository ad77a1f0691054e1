"""Rank known porting bugs by how exactly each reproduces a candidate's first divergence.

Data flows dump -> dump: the candidate's recorded tensors are read from its dump, never from its
backend. For the faulty layer, each step examined is replayed as parity/dumpers/replay.py does
(the candidate's own layer input and its own state of the previous step), once with the clean
reference and once per hypothesis planted (hypotheses.py). Every stage of that layer — and its
state after the step — is compared with the candidate's under the run's own tolerance policy; a
hypothesis's reproduction error is its worst ratio (smallest passing atol / allowed atol) over
those stages and the steps examined (the faulty step, the one before and the next two). A ratio
<= 1 reproduces the candidate within tolerance. The hypotheses tried are those that first show at
the faulty stage; when none of them reproduces it, those of the layer's earlier stages too (a
bug can stay inside its own stage's tolerance and fail only downstream).

"Explained" only when the best hypothesis reproduces the candidate and the clean reference does
not; otherwise "not explained by any known porting bug" — never a guess dressed as a finding.

The reference planted into computes as the candidate does — in its dtype, with its quantised
weights (its dump says which; parity/dumpers/replay.py does the same) — so an fp16 candidate is
measured against fp16's own rounding and only the bug is left to explain (the precision family of
hypotheses: decay in bf16, GroupNorm variance in fp16, fp16 without the residual rescale, ...).
The head (ln_out, logits) is replayed too, from the candidate's last x_out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.compare import TolerancePolicy
from parity.compare.divergence import ROWS_PREFIX
from parity.compare.metrics import compare_arrays
from parity.dumpers.format import DumpReader
from parity.dumpers.replay import spliced_values
from parity.errors import ParityError
from parity.report.verdict import as_result
from parity.results import Record, RunResult
from parity.stages import short_stage, stage_info, state_slots

EXPLAINED = "explained"
NOT_EXPLAINED = "not explained"
NOTHING = "no divergence"
# Steps examined around the faulty step k: k-1 (a hypothesis must not diverge before the candidate
# did) through k+2 (nor fail to follow it afterwards).
STEPS_BEFORE, STEPS_AFTER = 1, 2


@dataclass
class Context:
    """What a hypothesis may look at while planting itself."""

    checkpoint: object
    candidate: DumpReader
    step: int
    layer: int | None
    stage: str
    current_step: int | None = None  # the step being replayed, for hypotheses that read the candidate's tensors
    _cache: dict = field(default_factory=dict)
    _reference: object = None  # the prepared reference every hypothesis gets a copy of

    @property
    def config(self):
        return self.checkpoint.config

    @property
    def version(self) -> str:
        return self.checkpoint.config.version.value

    @property
    def weights(self):
        return self.checkpoint.fp32_weights()

    @property
    def head(self) -> bool:
        """The faulty stage is the head's (ln_out, logits), not the embedding's."""
        return self.layer is None and self.stage != "emb"

    @property
    def weights_format(self) -> str | None:
        """The candidate's quantised weight format as its dump names it (``int8``, ``q4``), or None."""
        extra = self.candidate.extra if isinstance(self.candidate.extra, dict) else {}
        return extra.get("weights")

    def reference(self):
        """A fresh reference computing as the candidate does (its dtype, its quantised weights).

        Made once and copied for every hypothesis: preparing one (casting every weight to fp16,
        quantising every matrix) is most of an explanation's time — 8 of 10 s for an int8 candidate
        of the 4-layer fixture, made afresh for each of 8 hypotheses. The copy is shallow: its own
        attributes and its own list of layers, the tensors shared. A hypothesis replaces what it
        plants (a method, a layer's entry, a tensor attribute), never writing into a tensor — as it
        already must not, since an fp32 reference's tensors are the checkpoint's own."""
        import copy

        from parity.reference import make_reference

        if self._reference is None:
            self._reference = make_reference(self.checkpoint, dtype=self.candidate.dtype, weights=self.weights_format)
        model = copy.copy(self._reference)
        model.layers = list(model.layers)
        return model

    def candidate_arrays(self, step: int) -> dict[str, np.ndarray]:
        if step not in self._cache:
            self._cache[step] = self.candidate.read_step(step)
        return self._cache[step]


def load_hypothesis(spec: str):
    """A user's hypothesis named ``module:attr`` or ``file.py:attr`` (as plug-in backends are)."""
    from parity.dumpers.plugin import import_plugin_module
    from parity.explain.hypotheses import Hypothesis

    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise ParityError(f"bad hypothesis {spec!r}: use module:attribute or file.py:attribute")
    h = getattr(import_plugin_module(module), attr, None)
    if not isinstance(h, Hypothesis):
        raise ParityError(f"{spec} is not a Hypothesis (make one with parity.explain.hypotheses.hypothesis(...))")
    return h


def _ratio(metrics) -> float:
    """How far one record is from passing: smallest passing atol / allowed atol (inf: non-finite
    values in other places than the candidate's, or another shape)."""
    if metrics.reason == "shape" or (metrics.reason == "nonfinite" and not metrics.nonfinite_same_places):
        return math.inf
    # Non-finite values at the same places on both sides (an overflow to Inf, and the NaN a LayerNorm
    # of it makes) are reproduced exactly: the finite positions decide, as for any other record.
    reproduced_nonfinite = metrics.reason == "nonfinite"
    if metrics.min_atol is None or metrics.effective_atol is None:
        return 0.0 if metrics.passed or reproduced_nonfinite else math.inf
    return metrics.min_atol / metrics.effective_atol if metrics.effective_atol > 0 else math.inf


def _replay_layer(model, ctx: Context, *, step: int) -> dict[str, np.ndarray] | None:
    """The model's stages of the faulty layer (or emb) at ``step``, on the candidate's own inputs."""
    import torch

    seen = ctx.candidate_arrays(step)
    ctx.current_step = step
    out: dict[str, np.ndarray] = {}

    def record(stage, value):
        value = value.detach()
        out[stage] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()

    ids = next(s.ids for s in ctx.candidate.steps if s.index == step)
    with torch.no_grad():
        if ctx.head:
            name = f"L{ctx.config.n_layer - 1}.x_out"
            if name not in seen or ROWS_PREFIX + name in seen:
                return None
            model.head(model.head_in(seen[name]), record=record)
            return out
        if ctx.layer is None:
            model.embed(ids, record=record)
            return out
        name = "emb" if ctx.layer == 0 else f"L{ctx.layer - 1}.x_out"
        if name not in seen or ROWS_PREFIX + name in seen:
            return None  # no input, or only some of its token rows: the layer cannot be re-run
        slots = state_slots(ctx.version)
        if step == 0:
            state = model.zero_state().layers[ctx.layer]
        else:
            before = ctx.candidate_arrays(step - 1)
            keys = [f"state.L{ctx.layer}.{s}" for s in slots]
            if any(k not in before for k in keys):
                return None
            state = model.layer_state({s: before[k] for s, k in zip(slots, keys)})
        # The recorded stream is canonical; an fp16 model takes it rescaled (LayerwiseModel.stream_in).
        # The scan's inputs and GroupNorm's spliced in as the verdict's replay does (parity/dumpers/
        # replay.py), so a hypothesis is held to the tolerance the divergence was judged by, on the same inputs.
        _, new = model.layer(ctx.layer, model.stream_in(ctx.layer, seen[name]), state, record=record,
                             splice=spliced_values(seen, layer=ctx.layer))
        for s in slots:
            record(f"state.L{ctx.layer}.{s}", getattr(new, s))
    return out


def _score(model, ctx: Context, *, steps: list[int], policy: TolerancePolicy) -> dict:
    """Worst ratio over every stage of the layer (and its state) at ``steps``; also the faulty
    stage's ratio at the faulty step, its per-row error there, and its ratio at each step."""
    worst, at_stage, where, rows, by_step = 0.0, None, None, None, {}
    for step in steps:
        got = _replay_layer(model, ctx, step=step)
        if got is None:
            continue
        seen = ctx.candidate_arrays(step)
        # A stage the candidate holds only some token rows of is compared on those rows.
        got = {n: (v[np.asarray(seen[ROWS_PREFIX + n])] if ROWS_PREFIX + n in seen else v) for n, v in got.items()}
        # Every stage of the layer, the ones before the faulty stage too: a planted bug must not
        # break what the candidate got right.
        names = [n for n in ctx.candidate.stage_order if n in got and n in seen]
        if ctx.stage in got and ctx.stage in seen and step != ctx.step:
            # the faulty stage at the other steps too: when did the error start, does it go on?
            m = compare_arrays(seen[ctx.stage], got[ctx.stage], tolerance=policy.for_stage(ctx.stage),
                               per_token=stage_info(ctx.stage).per_token)
            by_step[step] = _ratio(m)
        dead = False
        for name in names:
            if dead and not name.startswith("state."):
                # Downstream of a tensor that is non-finite everywhere on both sides, a stage shows
                # only what each kernel makes of NaN (TVM's relu, a max, gives 0; torch's gives
                # NaN): no evidence for or against the bug that made the NaN. The state is still
                # compared.
                continue
            m = compare_arrays(seen[name], got[name], tolerance=policy.for_stage(name), per_token=stage_info(name).per_token)
            dead = m.reason == "nonfinite" and bool(m.nonfinite_same_places) and m.nonfinite_count_actual == m.numel
            r = _ratio(m)
            if name == ctx.stage:
                by_step[step] = r
            if step == ctx.step and name == ctx.stage:
                at_stage = r
                rows = _row_profile(seen[name], got[name]) if stage_info(name).per_token else None
            if where is None or r > worst:
                worst, where = r, (step, name)
    return {"worst_ratio": worst, "stage_ratio": at_stage, "worst_at": where, "rows": rows, "by_step": by_step}


def _row_profile(actual: np.ndarray, expected: np.ndarray) -> list[float]:
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf where both overflowed: NaN, made inf below
        d = np.abs(a - b).reshape(a.shape[0], -1)
    d[~np.isfinite(d)] = np.inf
    return [float(x) for x in d.max(axis=1)]


def _evidence(fd_stage: str, step: int, clean: dict) -> list[str]:
    lines = []
    by_step = clean.get("by_step") or {}
    if len(by_step) > 1:
        steps = ", ".join(f"step {k}: {_fmt(v)}" for k, v in sorted(by_step.items()))
        line = f"clean reference vs candidate at {fd_stage}, by step: {steps}"
        if step > 0 and all(v <= 1.0 for k, v in by_step.items() if k < step):
            line += f"; the steps before agree: the error starts at step {step}"
            if step == 1:
                line += ", the first step that reads a state the candidate wrote"
        lines.append(line)
    rows = clean.get("rows")
    if rows and len(rows) > 1:
        worst = int(np.argmax(rows))
        zero = [i for i, r in enumerate(rows) if r == 0.0]
        line = f"clean reference vs candidate at {fd_stage}: error largest at token row {worst} of {len(rows)}"
        if step == 0 and worst == 0:
            line += ", where the state is still zero (the stage's own math, not the recurrence)"
        elif step == 0 and rows[0] < max(rows) * 1e-3:
            line += "; row 0 (zero state) is nearly exact: the error comes with the recurrence"
        if zero:
            line += f"; rows {_ranges(zero)} exact"
        lines.append(line)
    return lines


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs[:8]) + (" ..." if len(xs) > 8 else "")


def _fmt(r: float | None) -> str:
    if r is None:
        return "-"
    return "inf" if math.isinf(r) else f"{r:.3g}x"


def _rank_key(r: dict):
    return (r["worst_ratio"], r["stage_ratio"] if r["stage_ratio"] is not None else math.inf)


def _rank(hyps, checkpoint, ctx: Context, *, steps: list[int], policy: TolerancePolicy, upstream: bool = False) -> list[dict]:
    """Each hypothesis planted into a fresh reference and scored; best first."""
    ranked = []
    for h in hyps:
        model = ctx.reference()
        planted = h.plant(model, ctx)
        # plant() may return a detail line, or a dict with "detail" and fitted values (e.g. "eps").
        values = dict(planted) if isinstance(planted, dict) else {"detail": planted}
        detail = values.pop("detail", None)
        s = _score(model, ctx, steps=steps, policy=policy)
        ranked.append({"name": h.name, "title": h.title, "detail": detail, "values": values, "worst_ratio": s["worst_ratio"],
                       "stage_ratio": s["stage_ratio"], "worst_at": s["worst_at"], "reproduces": s["worst_ratio"] <= 1.0,
                       "fix": h.fix, "doc": h.doc, "first_shows_at": list(h.stages), "upstream": upstream})
    return sorted(ranked, key=_rank_key)


def explain_dump(
    checkpoint, *, candidate_dump: Path, first_divergence: Record | dict, policy: TolerancePolicy | None = None,
    extra_hypotheses=(), only: list[str] | None = None,
) -> dict:
    """Explain ``first_divergence`` (step, layer, stage) of the candidate dump: a typed record or
    divergence, or its JSON form (``parity bisect``'s ``found``). JSON-able dict."""
    from parity.explain.hypotheses import CATALOGUE

    first_divergence = Record.from_dict(first_divergence)  # itself when typed already

    candidate = DumpReader(candidate_dump)
    if candidate.model != checkpoint.config.to_dict():
        raise ParityError(f"dump {candidate_dump} is of another model than {checkpoint.path}; cannot explain it")
    step, stage = int(first_divergence.step), first_divergence.stage
    layer = stage_info(stage).layer
    ctx = Context(checkpoint=checkpoint, candidate=candidate, step=step, layer=layer, stage=stage)
    if policy is None:
        # Judged as the verdict judges a replay (the faulty layer is replayed with the candidate's r, k, v
        # and wkv spliced in): the pair's policy would hold bf16 to 1.0 of max|b| instead of 5e-2.
        from parity.compare.tolerance import JUDGE_REPLAY
        from parity.session import judge_policy

        policy = judge_policy(JUDGE_REPLAY, dump=Path(candidate_dump), spliced=True)
    indices = sorted(s.index for s in candidate.steps)
    steps = [s for s in indices if step - STEPS_BEFORE <= s <= step + STEPS_AFTER]
    base = {"candidate": candidate.backend, "dump": str(candidate.path), "step": step, "layer": layer,
            "stage": stage, "steps_examined": steps}
    family = short_stage(stage)
    hyps = {**CATALOGUE, **{h.name: h for h in extra_hypotheses}}
    if only:
        hyps = {n: h for n, h in hyps.items() if n in only}
    # A quantised port's dequantisation bugs (int8 scales swapped, a q4 group off by one) exist only
    # in a candidate whose dump names that weight format: for any other they are not candidates at
    # all (not "not applicable" either: an fp32 port has no dequantisation to get wrong).
    hyps = {n: h for n, h in hyps.items() if not getattr(h, "weights", ()) or ctx.weights_format in h.weights}
    version = ctx.version
    # Upstream: hypotheses that first show at an earlier stage of the same layer. A bug whose own
    # stage stays inside that stage's tolerance (fp16 rounding at ln_x) first fails downstream.
    order = [short_stage(n) for n in candidate.stage_order if stage_info(n).layer == layer and stage_info(n).per_token
             and (n == "emb") == (stage == "emb")]  # layer None: the embedding and the head are apart
    earlier = set(order[:order.index(family)]) if family in order else set()
    in_family = [h for h in hyps.values() if family in h.stages]
    upstream = [h for h in hyps.values() if family not in h.stages and set(h.stages) & earlier]

    def not_applicable_of(group):
        return [{"name": h.name, "title": h.title, "reason": f"RWKV-{'/'.join(h.versions)} only; this model is RWKV-{version}"}
                for h in group if version not in h.versions]

    not_applicable = not_applicable_of(in_family)
    clean = _score(ctx.reference(), ctx, steps=steps, policy=policy)
    ranked = _rank([h for h in in_family if version in h.versions], checkpoint, ctx, steps=steps, policy=policy)
    searched_upstream = bool(upstream) and clean["worst_ratio"] > 1.0 and not any(r["reproduces"] for r in ranked)
    if searched_upstream:
        ranked = sorted(ranked + _rank([h for h in upstream if version in h.versions], checkpoint, ctx, steps=steps,
                                       policy=policy, upstream=True), key=_rank_key)
        not_applicable += not_applicable_of(upstream)
    best = ranked[0] if ranked else None
    clean_reproduces = clean["worst_ratio"] <= 1.0
    evidence = _evidence(stage, step, clean)
    if searched_upstream:
        evidence.append(f"no hypothesis of {family} itself reproduces the candidate; also tried those of the earlier "
                        f"stages of the layer ({', '.join(sorted(earlier & {s for h in upstream for s in h.stages}))}), "
                        "whose effect can stay inside their own stage's tolerance and show only downstream")
    where = f"{stage} at step {step}"
    if best is not None and best["reproduces"] and not clean_reproduces:
        status = EXPLAINED
        summary = f"explained: {best['title']}" + (f" ({best['detail']})" if best["detail"] else "") + \
                  f" reproduces the candidate at {where} to {_fmt(best['worst_ratio'])} of tolerance " \
                  f"(clean reference: {_fmt(clean['worst_ratio'])})"
        evidence.append(f"with {best['name']} planted, the reference reproduces {where} and every stage of the "
                        f"layer and its state over steps {steps[0]}..{steps[-1]} within tolerance (worst {_fmt(best['worst_ratio'])})")
        fix = best["fix"]
    else:
        status, fix = NOT_EXPLAINED, None
        if clean_reproduces:
            summary = f"not explained: the clean reference already reproduces the candidate at {where}; nothing to explain"
        else:
            tried = f"{len(ranked)} hypotheses tried" if ranked else f"no known porting bug first shows at {family}"
            closest = f"; closest {best['name']} at {_fmt(best['worst_ratio'])} of tolerance" if best else ""
            summary = f"not explained by any known porting bug ({tried}{closest})"
    return {**base, "status": status, "summary": summary, "fix": fix, "evidence": evidence,
            "clean": {"worst_ratio": clean["worst_ratio"], "stage_ratio": clean["stage_ratio"]},
            "hypotheses": ranked, "not_applicable": not_applicable}


def candidate_of(result: RunResult | dict) -> str:
    """The backend a result blames: the one whose own error diverged, else the odd one out, else
    the compared side."""
    result = as_result(result)
    own = result.own_error
    if own is not None and own.first_divergence is not None:
        return own.backend
    for spec, summary in result.own_errors.items():
        if summary.first_divergence is not None:
            return spec
    odd = (result.odd_one_out or {}).get("backend")
    return odd or result.actual["backend"]


def explain_result(result: RunResult | dict, *, checkpoint=None, extra_hypotheses=(), only=None) -> dict:
    """Explain a ``parity run --json`` result, typed or its JSON form (it must have kept its dumps:
    ``--dump-dir``)."""
    from parity.checkpoint import load_checkpoint

    result = as_result(result)
    fd = result.first_divergence
    if fd is None:
        return {"status": NOTHING, "summary": "no divergence: nothing to explain", "hypotheses": []}
    dumps = result.run.dumps or {}
    spec = candidate_of(result)
    if spec not in dumps:
        raise ParityError(f"the result keeps no dump of {spec}: rerun parity run with --dump-dir DIR --json PATH")
    if checkpoint is None:
        path = result.run.checkpoint
        if not path:
            raise ParityError("the result names no checkpoint; pass --checkpoint")
        checkpoint = load_checkpoint(Path(path))
    elif not hasattr(checkpoint, "config"):
        checkpoint = load_checkpoint(Path(checkpoint))
    policy = TolerancePolicy.from_dict(result.policy) if result.policy else None
    if not Path(dumps[spec]).is_dir():
        raise ParityError(f"dump {dumps[spec]} of {spec} no longer exists; rerun with --dump-dir")
    return explain_dump(checkpoint, candidate_dump=Path(dumps[spec]), first_divergence=fd, policy=policy,
                        extra_hypotheses=extra_hypotheses, only=only)
