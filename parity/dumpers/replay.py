"""Replay: the reference re-runs each layer on the inputs *another backend* recorded.

Isolated mode (parity/dumpers/isolated.py) feeds the reference's inputs to a compiled layer, so it
needs a backend with per-layer entry points — our own TVM build only. Replay turns that around and
works for any backend that records enough: for every step and layer, the torch reference runs
layer l on the candidate's own recorded input to that layer (its ``emb`` or ``L{l-1}.x_out``) and
the candidate's own state of layer l before the step (its ``state.L{l}.*`` after the previous
step). Compared with the replay, each of the candidate's stages then shows only the error its own
layer adds — whatever error the candidate inherited from earlier layers and steps arrived in the
inputs both sides share. Propagated drift (every correct fp32 implementation rounds differently,
and a deep network amplifies that) cannot reach this comparison; a porting bug in a layer can.

What a candidate must record for layer l of step k to be replayable (docs/backends.md):
    the layer's input   ``emb`` (l = 0) or ``L{l-1}.x_out``, at step k;
    its state before    every ``state.L{l}.<slot>`` at step k-1 (none at step 0: the zero state).
The head (ln_out, logits) is replayed on ``L{n-1}.x_out``. Inside an RWKV-5 layer, the scan
runs on the candidate's own ``att.r``/``att.k``/``att.v`` and GroupNorm on its own ``att.wkv`` where it
recorded them (parity.stages.SPLICE_STAGES says why): each stage shows only the error it adds. Layers that are not replayable are
listed, with what is missing, in the replay dump's ``extra.not_replayable``; they are not judged.

Data flows dump -> dump: the candidate's dump is read, never its backend.

The replay computes in the candidate's dtype and with its quantised weights (its dump says which): an fp16 candidate is replayed
by the fp16 reference (ChatRWKV's ``cpu fp16``, official-package exact), so the error a stage adds
is measured against what a correct fp16 port computes from the same inputs — fp16's own rounding
of each stage's output is then the only difference a correct port shows, and a wrong kernel stands
out against it. Replayed by the fp32 reference, every fp16 stage would instead show its dtype's
rounding as "own error" (up to ~1e-2 of max|b| after ln_x), which is what the fp16 tolerance must
then allow, and a kernel bug no larger than that rounding would be hidden in it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from parity.checkpoint import Checkpoint
from parity.dumpers.backends import Backend, RunPlan, tensor_to_numpy
from parity.dumpers.format import DumpReader, StepWriter
from parity.errors import ParityError
from parity.stages import SPLICE_STAGES, state_slots


# ReplayBackend's default ``weights``: the candidate dump's own format (extra.weights).
FROM_CANDIDATE = "from-candidate"


def layer_input_name(layer: int) -> str:
    return "emb" if layer == 0 else f"L{layer - 1}.x_out"


def replay_gaps(candidate: DumpReader, *, n_layer: int, version: str) -> list[dict]:
    """Which (step, layer) pairs of ``candidate`` cannot be replayed, and what each lacks.

    Read from the manifest's per-step stage lists alone: no array is loaded.
    """
    slots = state_slots(version)
    gaps = []
    previous: set[str] | None = None
    for step in candidate.steps:
        have = set(candidate.step_stages(step.index))
        for layer in range(n_layer):
            name = layer_input_name(layer)
            missing = [] if name in have else [name]
            if "rows." + name in have:  # only some token rows: the layer's token shift needs them all
                missing.append(f"{name} (all token rows; it holds only some)")
            if previous is not None:
                missing += [f"state.L{layer}.{s} (step {step.index - 1})" for s in slots if f"state.L{layer}.{s}" not in previous]
            if missing:
                gaps.append({"step": step.index, "layer": layer, "missing": missing})
        previous = have
    return gaps


class ReplayBackend(Backend):
    """The torch reference, layer by layer, on a candidate dump's own inputs and states."""

    def __init__(self, checkpoint: Checkpoint, *, candidate_dump: Path, model=None, dtype: str | None = None,
                 weights: str | None = FROM_CANDIDATE, splice: bool = True, splice_from: Path | None = None,
                 device: str | None = None):
        from parity.reference import make_reference

        if ".partial-" in Path(candidate_dump).name:
            # A crashed backend's finished steps (format.PartialDumpReader): replayed like any dump.
            from parity.dumpers.format import PartialDumpReader

            self.candidate = PartialDumpReader(candidate_dump)
        else:
            self.candidate = DumpReader(candidate_dump)
        if self.candidate.model != checkpoint.config.to_dict():
            raise ParityError(f"dump {candidate_dump} is of another model than {checkpoint.path}; cannot replay it")
        # The candidate's own dtype unless told otherwise; a model handed in (the session's shared
        # fp32 reference) serves only a candidate of its dtype.
        dtype = dtype or self.candidate.dtype
        # ... and its weights: an int8 candidate (ChatRWKV's fp32i8/fp16i8, tvm@fp16i8) or a q4 one
        # (tvm@q4f16_1) is replayed by a reference that dequantises the same codes (parity/reference/
        # int8.py, q4.py), so quantisation error is shared, not "own" error. ``weights`` overrides it:
        # the judge of an isolated quantised build replays the *yardstick's* dump with the build's format
        # (None: unquantised weights, whatever the dump used).
        if weights == FROM_CANDIDATE:
            weights = self.candidate.extra.get("weights") if isinstance(self.candidate.extra, dict) else None
        # Where a model made here computes: ``device``, else where the model handed in does (the run's
        # reference device: the replay runs beside the reference it stands in for), else the CPU.
        device = device or str(getattr(model, "device", "cpu"))
        if model is not None and (getattr(model, "dtype_name", "float32") != dtype
                                  or getattr(model, "weights_format", None) != weights):
            model = None
        self.model = model if model is not None else make_reference(checkpoint, dtype=dtype, weights=weights, device=device)
        cfg = checkpoint.config
        self.gaps = replay_gaps(self.candidate, n_layer=cfg.n_layer, version=cfg.version.value)
        super().__init__(
            checkpoint=checkpoint, name=f"reference (replaying {self.candidate.backend})", mode="replay",
            dtype=getattr(self.model, "dtype_name", dtype),
            extra={"replays": str(self.candidate.path), "candidate": self.candidate.backend,
                   "not_replayable": self.gaps},
        )
        # Where a layer goes on from the candidate's own values (parity.stages.SPLICE_STAGES), and whose:
        # the replayed dump's by default; ``splice_from`` another dump's — the isolated judge replays the
        # *yardstick's* inputs, and splices in the isolated build's own r, k, v and wkv, which it computed
        # from those same inputs (without, fp16 tvm's isolated L23.att.ln_x needed 1.4e-2 of max|b| at 0.4B).
        self.splice_stages = SPLICE_STAGES if splice else ()
        self.splice_source = None
        if splice and splice_from is not None:
            from parity.dumpers.format import open_dump

            self.splice_source = open_dump(splice_from)
        self._splice_steps = {st.index for st in self.splice_source.steps} if self.splice_source is not None else set()
        self._missing = {(g["step"], g["layer"]) for g in self.gaps}
        self._step = 0
        self._state_before: dict[str, np.ndarray] | None = None

    def plan(self) -> RunPlan:
        """The candidate's own steps: replay walks exactly what it recorded."""
        steps = sorted(self.candidate.steps, key=lambda s: s.index)
        if not steps or steps[0].kind != "prefill":
            raise ParityError(f"dump {self.candidate.path} does not start with a prefill step; nothing to replay")
        return RunPlan(prefill_ids=tuple(steps[0].ids), decode_ids=tuple(s.ids[0] for s in steps[1:]))

    def begin(self) -> None:
        self._step = 0
        self._state_before = None

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        import torch

        index = self._step
        self._step += 1
        cfg = self.checkpoint.config
        slots = state_slots(cfg.version.value)
        seen = self.candidate.read_step(index)
        source = seen
        if self.splice_source is not None:
            source = self.splice_source.read_step(index) if index in self._splice_steps else {}
        def record(stage: str, value: torch.Tensor) -> None:
            # Straight to the step's spool (StepWriter.add writes the bytes now): a 512-token
            # prefill's replayed stages are ~0.6 GB at 0.1B, which a dict held until the step's end
            # on top of the reference model (issue 9; the run's peak, measured). The file lists its
            # stages in stage_order whatever the order they are added in.
            step.add(stage, tensor_to_numpy(value))

        with torch.no_grad():
            self.model.embed(ids, record=record)
            zero = self.model.zero_state().layers if index == 0 else None
            for layer in range(cfg.n_layer):
                if (index, layer) in self._missing:
                    continue
                x = self.model.stream_in(layer, seen[layer_input_name(layer)])
                if zero is not None:
                    state = zero[layer]
                else:
                    state = self.model.layer_state({s: self._state_before[f"state.L{layer}.{s}"] for s in slots})
                splice = spliced_values(source, layer=layer, stages=self.splice_stages)
                _, new_state = self.model.layer(layer, x, state, record=record, splice=splice)
                for s in slots:
                    record(f"state.L{layer}.{s}", getattr(new_state, s))
            last = f"L{cfg.n_layer - 1}.x_out"
            if last in seen and "rows." + last not in seen:
                self.model.head(self.model.head_in(seen[last]), record=record)
        # Only the candidate's state is carried to the next step: the replay never feeds itself.
        # Keys first, then only the state stages: a step read lazily (StepArrays) loads what is looked up.
        self._state_before = {k: seen[k] for k in seen if k.startswith("state.")}


def spliced_values(seen, *, layer: int, stages: tuple[str, ...] = SPLICE_STAGES) -> dict:
    """The candidate's own values the replayed layer goes on from (parity.stages.SPLICE_STAGES: GroupNorm's
    input), where it recorded them for every token row."""
    names = [f"L{layer}.{stage}" for stage in stages]
    return {n: seen[n] for n in names if n in seen and "rows." + n not in seen}


def splices_scan_inputs(candidate_dump) -> bool:
    """Whether a replay of this dump runs every layer's scan on the candidate's own r, k and v: an
    RWKV-5 dump holding all three, all token rows, for every layer of every step. ``candidate_dump``:
    its path, or the dump already open (a reader from open_dump)."""
    from parity.dumpers.format import open_dump

    reader = open_dump(candidate_dump) if isinstance(candidate_dump, (str, Path)) else candidate_dump
    n_layer = int(reader.model.get("n_layer", 0))
    if reader.model.get("version") == "4" or not n_layer or not reader.steps:
        return False
    for step in reader.steps:
        have = set(reader.step_stages(step.index))
        for layer in range(n_layer):
            for s in ("r", "k", "v"):
                name = f"L{layer}.att.{s}"
                if name not in have or "rows." + name in have:
                    return False
    return True


def replay_dump(
    checkpoint: Checkpoint, *, candidate_dump: Path, path: Path, model=None, on_step=None, device: str | None = None
) -> tuple[Path, list[dict]]:
    """Write the replay of ``candidate_dump`` to ``path``; returns (path, the layers not replayable).
    ``device``: where a reference made for it computes (default: ``model``'s device, else the CPU)."""
    backend = ReplayBackend(checkpoint, candidate_dump=candidate_dump, model=model, device=device)
    return backend.dump(backend.plan(), path=path, on_step=on_step), backend.gaps
