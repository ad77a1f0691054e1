"""The rounding floor: how far this model, on this prompt, carries a last-bit difference.

Two correct fp32 implementations differ in the last bits of almost every value they compute, and
the model's own dynamics decide what becomes of those bits: on the bundled fixtures they stay a
few allowances after every layer and step, on a deep random-init model fed random tokens they can
grow by orders of magnitude (1.5B, random:64: correct TVM vs torch, 693 allowances at the logits,
where the same pair on ``ones:16`` stays at 7). A fixed drift envelope cannot hold both, so the
verdict also measures the floor of *this* run:

    the reference runs the plan again, layer by layer, and after every layer of every step its
    carried values (the residual stream handed to the next layer, every state slot) are
    re-rounded at random to a neighbouring value: each multiplied by 1 + u·2^-24, u uniform in
    (-1, 1), so about half of them move by one unit in the last place — the smallest difference
    two correct implementations can have.

Compared with the plain reference run, that gives per record how far a last-bit difference
travels here (parity/compare/verdict.py turns it into the envelope's floor). The perturbation is
seeded, so the floor of a run is reproducible. Only the carried stages are recorded.

Data flows backend -> dump: this is one more backend, written like the others.
"""

from __future__ import annotations

import numpy as np

from parity.checkpoint import Checkpoint
from parity.compare.verdict import is_carried
from parity.dumpers.backends import Backend, RunPlan, tensor_to_numpy
from parity.dumpers.format import StepWriter
from parity.stages import state_slots

ULP_SCALE = 2.0**-24  # half of fp32's machine epsilon: x * (1 + u * 2^-24) is x or a neighbour
SEED = 20261130


def carried(stage: str) -> bool:
    """The stages the drift verdict reads, and emb (where the trajectory starts)."""
    return stage == "emb" or is_carried(stage)


class FloorBackend(Backend):
    """The torch reference with every carried value re-rounded at random after every layer."""

    def __init__(self, checkpoint: Checkpoint, *, model, seed: int = SEED):
        self.model = model
        self.seed = seed
        super().__init__(
            checkpoint=checkpoint, name="reference (rounding floor)", mode="floor",
            dtype=getattr(model, "dtype_name", "float32"),
            extra={"perturbation": f"x * (1 + u * 2^-24), u ~ U(-1, 1), seed {seed}, after every layer"},
        )
        self._states = None
        self._rng = np.random.default_rng(seed)

    def begin(self) -> None:
        self._states = None
        self._rng = np.random.default_rng(self.seed)

    def _nudge(self, value):
        import torch

        # Drawn on the CPU (the same draws whatever the reference's device), then moved beside the value.
        u = torch.from_numpy(self._rng.uniform(-1.0, 1.0, size=tuple(value.shape))).to(value.device)
        return (value.to(torch.float64) * (1.0 + u * ULP_SCALE)).to(value.dtype)

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        import torch

        cfg = self.checkpoint.config
        slots = state_slots(cfg.version.value)
        model = self.model

        def record(stage: str, value: torch.Tensor) -> None:
            if carried(stage):
                step.add(stage, tensor_to_numpy(value))

        with torch.no_grad():
            if self._states is None:
                self._states = list(model.zero_state().layers)
            x = self._nudge(model.embed(ids, record=record))
            for layer in range(cfg.n_layer):
                x, state = model.layer(layer, x, self._states[layer], record=record)
                for s in slots:
                    record(f"state.L{layer}.{s}", getattr(state, s))
                x = self._nudge(x)
                self._states[layer] = model.layer_state({s: self._nudge(getattr(state, s)) for s in slots})
                if model.rescale_layer and (layer + 1) % model.rescale_layer == 0:
                    x = x / 2  # as the model's own forward (fp16's rescaled stream)
            model.head(x, record=record)


def floor_dump(checkpoint: Checkpoint, *, model, plan: RunPlan, path, on_step=None):
    """Run the floor on ``plan`` into a dump at ``path``; returns its path."""
    return FloorBackend(checkpoint, model=model).dump(plan, path=path, on_step=on_step)
