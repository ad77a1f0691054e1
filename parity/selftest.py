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

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.mutants import CATALOGUE, Mutant
from parity.session import default_decode_ids, parse_ids, run_parity

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fault_entries() -> dict[str, Mutant]:
    """The crashing plug-ins of the zoo (parity/mutants/crash.py), by their selftest name."""
    from parity.mutants.crash import CRASH_PLUGINS

    return {m.name: m for m in (p.as_mutant() for p in CRASH_PLUGINS.values())}


def every_entry() -> dict[str, Mutant]:
    """What ``parity selftest`` runs by default: the catalogue and the crashing plug-ins."""
    return {**CATALOGUE, **fault_entries()}


@dataclass
class SelftestRow:
    mutant: Mutant
    found_propagated: dict | None
    found_isolated: dict | None
    odd_one_out: str | None = None
    # A crash/hang mutant: the run's crash block (parity/dumpers/worker.py BackendFailure).
    crash: dict | None = None

    @property
    def passed(self) -> bool:
        if self.mutant.fault is not None:
            return self._fault_found()
        ok = self.mutant.propagated.matches(self.found_propagated) and self.mutant.isolated.matches(self.found_isolated)
        if self.mutant.side == "reference":
            ok = ok and self.odd_one_out == f"mutant/{self.mutant.name}"
        return ok

    def _fault_found(self) -> bool:
        """Reported as the right kind, at the right step, in the right kernel, with the right signal."""
        from parity.mutants.crash import CRASH_PLUGINS, EXPECTED_SIGNAL

        c = self.crash
        if c is None:
            return False
        kind = {"crash": "crashed", "hang": "timed out"}[self.mutant.fault]
        expected = self.mutant.propagated
        plugin = CRASH_PLUGINS.get(self.mutant.name.removeprefix("plugin:"))
        signal = plugin.signal if plugin is not None else EXPECTED_SIGNAL.get(self.mutant.name)
        return (c["kind"] == kind and c["step"] == expected.step and (not expected.stage or c["kernel"] == expected.stage)
                and c["signal"] == signal and c["steps_completed"] == expected.step
                and (c.get("compared") or {}).get("verdict") == "no divergence")

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
            "fault": self.mutant.fault,
            "crash": None if self.crash is None else {k: v for k, v in self.crash.items() if k != "traceback"},
            "passed": self.passed,
        }


def run_mutant(
    mutant: Mutant, *, cache_dir: Path | None, work: Path, on_event: Callable[[str], None] | None = None,
    checkpoint: Checkpoint | None = None, device: str = "cpu",
) -> SelftestRow:
    """Run one mutant twice: the default verdict (own error by replay, then drift against its
    envelope: "propagated" in the table, what a user's plain ``parity run`` says) and isolated
    mode (our compiled build's layers on the reference's inputs). ``checkpoint`` replaces the
    mutant's bundled fixture, e.g. a released shape from ``parity synth`` (``--checkpoint``);
    ``device`` is where the compiled side runs (the GPU job's zoo runs the same two verdicts on cuda)."""
    ck = checkpoint or load_checkpoint(FIXTURES / f"{mutant.fixture}.pth")
    plan = RunPlan(
        prefill_ids=parse_ids(mutant.ids, vocab_size=ck.config.vocab_size),
        decode_ids=default_decode_ids(steps=mutant.decode_steps, vocab_size=ck.config.vocab_size),
    )
    if mutant.fault is not None:
        return _run_fault(mutant, ck=ck, plan=plan, cache_dir=cache_dir, work=work, on_event=on_event, device=device)
    spec = f"mutant/{mutant.name}"
    backends = [spec, "tvm", "chatrwkv"] if mutant.side == "reference" else ["reference", spec]
    found = {}
    odd = None
    for mode in ("replay", "isolated"):
        # In process: these mutants compute wrong values but never crash (the fault mutants above run
        # in workers), and a worker per backend per run cost the whole zoo ~40 % more CPU time.
        outcome = run_parity(ck, backends=backends, plan=plan, dump_dir=work / f"{mutant.name}-{mode}",
                             cache_dir=cache_dir, on_event=on_event, mode=mode, in_process=True, device=device)
        result = outcome.result
        if mutant.side == "reference":
            # The pair that holds the wrong reference against the compiled model (the yardstick is the mutant).
            pair = next(c for c in result["comparisons"] if c["expected"] == spec and c["actual"] == "tvm")
            found[mode] = pair["first_divergence"]
            if mode == "replay":
                odd = (result.get("odd_one_out") or {}).get("backend")
        else:
            found[mode] = result["first_divergence"]
    return SelftestRow(mutant=mutant, found_propagated=found["replay"], found_isolated=found["isolated"], odd_one_out=odd)


def _run_fault(mutant: Mutant, *, ck, plan, cache_dir, work: Path, on_event, device: str = "cpu") -> SelftestRow:
    """A crash or hang mutant: one run against the reference, in worker processes, with a short
    step timeout; the row carries the run's crash block, and the first divergence of the steps
    finished before the fault (which must be none: the fault is the only bug)."""
    from parity.mutants.crash import CRASH_PLUGINS, SELFTEST_TIMEOUT

    plugin = CRASH_PLUGINS.get(mutant.name.removeprefix("plugin:")) if mutant.side == "plugin" else None
    spec = plugin.spec if plugin is not None else f"mutant/{mutant.name}"
    outcome = run_parity(ck, backends=["reference", spec], plan=plan, dump_dir=work / mutant.name.replace(":", "-"),
                         cache_dir=cache_dir, on_event=on_event, mode="replay", timeout=SELFTEST_TIMEOUT,
                         in_process=False, device=device)
    crash = outcome.result.get("crash")
    found = None if crash is None else {"step": crash["step"], "layer": None, "stage": crash.get("kernel") or "",
                                        "row": None}
    return SelftestRow(mutant=mutant, found_propagated=found, found_isolated=found, crash=crash)


def applicable(mutant: Mutant, checkpoint: Checkpoint | None) -> bool:
    """A mutant runs on a given checkpoint when that is of its fixture's RWKV version."""
    if checkpoint is None:
        return True
    return load_fixture_version(mutant) == checkpoint.config.version.value


def load_fixture_version(mutant: Mutant) -> str:
    name = Path(mutant.fixture).name  # fixtures of their own live in subfolders (precision/rwkv4-L7-C64-hot)
    return "4" if name.startswith("rwkv4") else name.split("-")[0].removeprefix("rwkv").replace("_", ".")


def run_selftest(
    *, names: list[str] | None = None, cache_dir: Path | None = None, on_event=None, on_row=None,
    checkpoint: Checkpoint | None = None,
) -> list[SelftestRow]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-selftest-") as tmp:
        entries = every_entry()
        for name in names or [n for n, m in CATALOGUE.items() if applicable(m, checkpoint)]:
            row = run_mutant(entries[name], cache_dir=cache_dir, work=Path(tmp), on_event=on_event, checkpoint=checkpoint)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
