"""Crashes and hangs: the crash family of the bug zoo (catalogue entries; no TVM import here).

Not a wrong number but a dead or stuck backend. Two kinds:

- compiled mutants (``CRASH_CATALOGUE``, joined into ``CATALOGUE``; their models live in
  parity/mutants/crash_models.py): a TIR kernel that reads out of bounds (SIGSEGV), calls abort()
  (SIGABRT) or never leaves a loop, each on the first decode step only — the prefill runs and is
  compared, so the verdict must name decode step 1 and the kernel;
- plug-ins (``CRASH_PLUGINS``, named ``parity.mutants.crash:<factory>`` on the command line): a
  port that wraps our torch reference and, at a chosen step, segfaults (a read of address 0),
  aborts, raises, or sleeps for ever — what a user's own port does when its native code fails.

``parity selftest`` runs both and checks each is reported as "crashed" / "timed out" at its step.
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.mutants.base import Expected, Mutant

# The compiled faults strike at the first decode step (a TIR kernel cannot count steps; T = 1 is
# what tells a decode from the prefill), after the prefill was recorded whole, inside the wkv5
# kernel: ``stage`` is the kernel the report must name.
_DECODE_1 = (Expected(1, None, "wkv5"), Expected(1, None, "wkv5"))

CRASH_CATALOGUE: dict[str, Mutant] = {
    m.name: m
    for m in [
        Mutant("crash-oob-gather", "compiled",
               "wkv5 decode reads the state at a row index 2^32 out of bounds (a gather with no bounds check): SIGSEGV",
               *_DECODE_1, fault="crash"),
        Mutant("crash-kernel-abort", "compiled",
               "wkv5 kernel calls abort() when T = 1 (a failed check inside native code): SIGABRT",
               *_DECODE_1, fault="crash"),
        Mutant("hang-kernel-loop", "compiled",
               "wkv5 kernel's warm-up loop runs to T - 2, which never comes when T = 1: an endless loop",
               *_DECODE_1, fault="hang"),
    ]
}


# The signal each crash must be reported with (a hang has none: it is stopped by the harness).
EXPECTED_SIGNAL = {"crash-oob-gather": "SIGSEGV", "crash-kernel-abort": "SIGABRT"}

# Seconds per step before the selftest calls a backend hung: a fixture step takes milliseconds,
# so this is only how long the selftest waits for each hang mutant.
SELFTEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class CrashPlugin:
    """A plug-in that fails at ``step`` (0 = prefill) in the way ``fault`` says."""

    factory: str  # the attribute of this module: --backends parity.mutants.crash:<factory>
    fault: str  # "crash" | "hang": the verdict kind expected ("crashed" | "timed out")
    how: str  # "segfault" | "abort" | "raise" | "hang"
    step: int
    description: str
    signal: str | None = None  # the signal the worker must report, if any

    @property
    def spec(self) -> str:
        return f"{__name__}:{self.factory}"

    def as_mutant(self) -> Mutant:
        """The zoo's view of this plug-in (``plugin:<factory>`` in ``parity selftest``)."""
        where = Expected(self.step, None, "")
        return Mutant(f"plugin:{self.factory}", "plugin", self.description, where, where, fault=self.fault)


# Each strikes at decode step 2, so two steps (prefill and decode 1) are recorded and compared first.
CRASH_PLUGINS: dict[str, CrashPlugin] = {
    p.factory: p
    for p in [
        CrashPlugin("segfault_plugin", "crash", "segfault", 2,
                    "a plug-in whose native code reads address 0 at decode step 2", signal="SIGSEGV"),
        CrashPlugin("abort_plugin", "crash", "abort", 2, "a plug-in that calls abort() at decode step 2", signal="SIGABRT"),
        CrashPlugin("raising_plugin", "crash", "raise", 2, "a plug-in whose step() raises IndexError at decode step 2"),
        CrashPlugin("hanging_plugin", "hang", "hang", 2, "a plug-in that never returns from decode step 2"),
    ]
}


class _FailingPort:
    """Our torch reference as a plug-in (reset/step, docs/backends.md) that fails at one step."""

    def __init__(self, checkpoint, *, plugin: CrashPlugin):
        # The reference model itself, not its dumper backend: the zoo sits below parity.dumpers.
        from parity.reference import make_reference

        self.model = make_reference(checkpoint, dtype="float32")
        self.state = None
        self.plugin = plugin
        self.name = f"crash-plugin/{plugin.how}"
        self.index = 0

    def reset(self) -> None:
        self.state = self.model.zero_state()
        self.index = 0

    def step(self, ids: list[int]) -> dict:
        if self.index == self.plugin.step:
            _fail(self.plugin.how)
        self.index += 1
        out = {}

        def record(stage, value) -> None:
            out[stage] = value.detach().numpy().copy()

        _, self.state = self.model.forward(ids, self.state, record=record)
        return out


def _fail(how: str) -> None:
    import ctypes
    import os
    import time

    if how == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a native kernel's bad pointer would
    elif how == "abort":
        os.abort()
    elif how == "raise":
        rows = []
        rows[3]  # noqa: B018 - an IndexError from the port's own code, with a traceback into it
    elif how == "hang":
        while True:
            time.sleep(1)


def _factory(plugin: CrashPlugin):
    def make(checkpoint):
        return _FailingPort(checkpoint, plugin=plugin)

    make.__name__ = plugin.factory
    make.__doc__ = plugin.description
    return make


segfault_plugin = _factory(CRASH_PLUGINS["segfault_plugin"])
abort_plugin = _factory(CRASH_PLUGINS["abort_plugin"])
raising_plugin = _factory(CRASH_PLUGINS["raising_plugin"])
hanging_plugin = _factory(CRASH_PLUGINS["hanging_plugin"])
