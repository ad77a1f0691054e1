"""A backend stepped one token at a time, as greedy decoding drives it (parity/greedy.py, and a
worker's greedy job in parity/dumpers/worker.py): the ``Stepper`` protocol, ``BackendStepper``
and ``decode_run``. Below both, so neither imports the other for them."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from parity.errors import ParityError


@runtime_checkable
class Stepper(Protocol):
    """A backend as greedy decoding needs it: a named model that carries its own state."""

    name: str

    def reset(self) -> None:
        """Back to the zero state."""

    def step(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` from the current state; return the LAST row of logits, shape (V,)."""


class BackendStepper:
    """Any backend (``parity.dumpers.registry``: built-in, mutant, hf, plug-in) as a ``Stepper``: the
    same object a teacher-forced dump drives, stepped one token at a time, its logits' last row read."""

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name

    def reset(self) -> None:
        self.backend.reset()

    def step(self, ids: Sequence[int]) -> np.ndarray:
        logits = self.backend.step(list(ids)).get("logits")
        if logits is None:
            raise ParityError(f"backend {self.name} recorded no 'logits' stage; greedy decoding needs them")
        return np.asarray(logits, dtype=np.float32).reshape(-1, np.shape(logits)[-1])[-1]


def decode_run(stepper: Stepper, *, prompt_ids: Sequence[int], steps: int,
               forced: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(chosen tokens, logits rows (steps, V)): greedy, or fed ``forced`` tokens when given.

    With ``forced``, row i is what the stepper predicts after the prompt and ``forced[:i]`` —
    the same context the forcing backend had — while the returned tokens are its own argmaxes.
    """
    stepper.reset()
    logits = stepper.step(prompt_ids)
    chosen: list[int] = []
    rows = []
    for i in range(steps):
        rows.append(np.asarray(logits, dtype=np.float32).reshape(-1))
        chosen.append(int(np.argmax(rows[-1])))
        if i + 1 < steps:  # the last chosen token needs no forward pass: nothing reads its logits
            logits = stepper.step([forced[i] if forced is not None else chosen[-1]])
    return chosen, np.stack(rows)
