"""``parity selftest``: run the bug zoo and check every injected bug is found where it is.

For each mutant (parity/mutants/), run it against the reference in both modes and compare the
first divergence found — (step, layer, stage) — with where the bug is known to be. A mutant of the
reference is run three ways (reference mutant, tvm, the official package) and must also be named
the odd one out. Nothing here knows the answers but the catalogue.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.mutants import CATALOGUE, Mutant
from parity.session import default_decode_ids, parse_ids, run_parity

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@dataclass
class SelftestRow:
    mutant: Mutant
    found_propagated: dict | None
    found_isolated: dict | None
    odd_one_out: str | None = None

    @property
    def passed(self) -> bool:
        ok = self.mutant.propagated.matches(self.found_propagated) and self.mutant.isolated.matches(self.found_isolated)
        if self.mutant.side == "reference":
            ok = ok and self.odd_one_out == f"mutant/{self.mutant.name}"
        return ok

    def to_dict(self) -> dict:
        def where(fd):
            return None if fd is None else {k: fd[k] for k in ("step", "layer", "stage", "row")}

        return {
            "mutant": self.mutant.name,
            "side": self.mutant.side,
            "description": self.mutant.description,
            "expected": {"propagated": vars(self.mutant.propagated), "isolated": vars(self.mutant.isolated)},
            "found": {"propagated": where(self.found_propagated), "isolated": where(self.found_isolated)},
            "odd_one_out": self.odd_one_out,
            "passed": self.passed,
        }


def run_mutant(mutant: Mutant, *, cache_dir: Path | None, work: Path, on_event: Callable[[str], None] | None = None) -> SelftestRow:
    ck = load_checkpoint(FIXTURES / f"{mutant.fixture}.pth")
    plan = RunPlan(
        prefill_ids=parse_ids(mutant.ids, vocab_size=ck.config.vocab_size),
        decode_ids=default_decode_ids(steps=mutant.decode_steps, vocab_size=ck.config.vocab_size),
    )
    spec = f"mutant/{mutant.name}"
    if mutant.side == "reference":
        backends = [spec, "tvm", "chatrwkv"]
    else:
        backends = ["reference", spec]
    outcome = run_parity(ck, backends=backends, plan=plan, dump_dir=work / mutant.name, cache_dir=cache_dir,
                         on_event=on_event, mode="both")
    modes = outcome.result["modes"]
    if mutant.side == "reference":
        # The pair that holds the wrong reference against the compiled model (the yardstick is the mutant).
        pair = next(c for c in outcome.comparisons if c["expected"]["backend"] == spec and c["actual"]["backend"] == "tvm")
        found_propagated = pair["first_divergence"]
    else:
        found_propagated = modes["propagated"]["first_divergence"]
    return SelftestRow(
        mutant=mutant,
        found_propagated=found_propagated,
        found_isolated=modes["isolated"]["first_divergence"] if modes["isolated"] else None,
        odd_one_out=(outcome.result.get("odd_one_out") or {}).get("backend"),
    )


def run_selftest(
    *, names: list[str] | None = None, cache_dir: Path | None = None, on_event=None, on_row=None
) -> list[SelftestRow]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-selftest-") as tmp:
        for name in names or list(CATALOGUE):
            row = run_mutant(CATALOGUE[name], cache_dir=cache_dir, work=Path(tmp), on_event=on_event)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
