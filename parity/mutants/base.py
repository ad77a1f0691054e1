"""What a bug-zoo entry is: the mutant and where its first divergence must be found.

Kept apart from the catalogue (parity/mutants/__init__.py) so the families in files of their own
(crash.py, precision.py) can build entries without importing the catalogue that joins them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Expected:
    step: int
    layer: int | None
    stage: str

    def matches(self, fd: dict | None) -> bool:
        return fd is not None and (fd["step"], fd["layer"], fd["stage"]) == (self.step, self.layer, self.stage)

    def describe(self) -> str:
        where = "prefill" if self.step == 0 else f"decode {self.step}"
        return f"{where} {self.stage}"


@dataclass(frozen=True)
class Mutant:
    name: str
    side: str  # "compiled" (replaces the TVM model) or "reference" (replaces the torch reference)
    description: str
    propagated: Expected
    isolated: Expected
    fixture: str = "rwkv5_2-L4-C128-H2"
    ids: str = "random:10:7"
    decode_steps: int = 3
    # A second identical run from the same input state (catches kernels that write their inputs).
    repeat_check: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Not a wrong number but a dead or stuck backend: "crash" or "hang" (the expected verdict kind).
    fault: str | None = None
    # The dtype the mutant backend computes in (precision bugs); the reference side stays fp32.
    dtype: str = "float32"


def _same(step: int, layer: int | None, stage: str) -> tuple[Expected, Expected]:
    e = Expected(step, layer, stage)
    return e, e
