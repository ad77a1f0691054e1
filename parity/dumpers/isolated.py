"""Isolated (teacher-forced) capture: each compiled piece runs on the *reference's* inputs.

In a propagated run an error made in layer 1 flows into every later stage, and near-cancelling
values can make a later stage the first to cross its tolerance: the first stage over tolerance is
then not where the bug is. Here nothing propagates. For every step, the compiled embedding runs on
the step's ids; compiled layer l runs on the reference's input to layer l (its ``L{l-1}.x_out``, or
``emb``) and the reference's state of layer l before the step; the compiled head runs on the
reference's last ``x_out``. Each recorded stage therefore carries only the error its own layer adds
(PyTorch's Numeric Suite calls this "without error propagation"). The dump has the usual stage
names, so the same diff engine judges it.

Inputs come from the reference's dump of the same plan: data flows dump -> dump, nothing is rerun.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from parity.checkpoint import Checkpoint
from parity.dumpers.backends import Backend
from parity.dumpers.format import DumpReader, StepWriter
from parity.errors import ParityError
from parity.stages import state_slots


class TVMIsolatedBackend(Backend):
    """The TVM debug build, run piece by piece on the reference dump's inputs."""

    def __init__(
        self, checkpoint: Checkpoint, *, reference_dump: Path, target: str = "llvm", cache_dir: Path | None = None,
        on_event=None, model=None, only_layer: int | None = None, only_step: int | None = None, dtype: str | None = None,
    ):
        from parity.compiled.runtime import CompiledRWKV

        # An fp16/bf16 build takes the (fp32) reference's inputs as they are: its entry points round
        # them to its dtype (and rescale them) as its own layers would (parity/compiled/common.py).
        self.model = model or CompiledRWKV(
            checkpoint, variant="debug", target=target, cache_dir=cache_dir, on_event=on_event, dtype=dtype
        )
        self.reference = DumpReader(reference_dump)
        super().__init__(
            checkpoint=checkpoint, name=getattr(self.model, "backend_name", "tvm"), mode="isolated",
            dtype=getattr(self.model, "dtype", "float32"),
            extra={"target": target, "inputs_from": str(reference_dump), "library": self.model.artifact.library.name},
        )
        self._step = 0
        # Narrowing for a repro: record only this layer (its stages and state) / only this step.
        self.only_layer = only_layer
        self.only_step = only_step
        if only_layer is not None and not 0 <= only_layer < checkpoint.config.n_layer:
            raise ParityError(f"--only-layer {only_layer}: the model has layers 0..{checkpoint.config.n_layer - 1}")

    def begin(self) -> None:
        self._step = 0

    def _state_before(self, step: int) -> dict[str, np.ndarray]:
        if step == 0:
            return self.model.state_to_canonical(self.model.zero_state())
        prev = self.reference.read_step(step - 1)
        missing = [n for n in self.model.slot_names if n not in prev]
        if missing:
            raise ParityError(f"reference dump {self.reference.path} lacks {missing[0]} at step {step - 1}; isolated runs need the full state")
        return {n: prev[n] for n in self.model.slot_names}

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        index = self._step
        self._step += 1
        ref_steps = {s.index: s for s in self.reference.steps}
        if index not in ref_steps or list(ref_steps[index].ids) != list(ids):
            raise ParityError(f"reference dump {self.reference.path} does not hold step {index} with ids {ids}")
        if self.only_step is not None and index != self.only_step:
            return
        ref = self.reference.read_step(index)
        state = self._state_before(index)
        n_layer = self.checkpoint.config.n_layer
        slots = state_slots(self.checkpoint.config.version.value)
        # Each entry point's records go to the step's spool as they come (StepWriter.add writes the
        # bytes now), not into one dict for the whole step: at 512 tokens that dict was the
        # worker's peak (issue 9). The file lists its stages in stage_order whatever the order.
        def add(records: dict[str, np.ndarray]) -> None:
            for name, value in records.items():
                step.add(name, value)

        if self.only_layer is None:
            add(self.model.iso_embed(ids))
            add(self.model.iso_head(ref[f"L{n_layer - 1}.x_out"]))
        for layer in range(n_layer) if self.only_layer is None else [self.only_layer]:
            x_in = ref["emb"] if layer == 0 else ref[f"L{layer - 1}.x_out"]
            layer_state = {s: state[f"state.L{layer}.{s}"] for s in slots}
            taps, new_state = self.model.iso_layer(layer, x_in, layer_state)
            add(taps)
            add(new_state)
