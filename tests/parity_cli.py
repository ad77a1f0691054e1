"""Running the ``parity`` command in a subprocess, as a user does: one helper for every test file.

A subprocess per command costs a second or more of start-up (torch, TVM), so files start their
commands together (``run_concurrently``, or ``Pending`` to overlap them with in-process tests) and
the tests only look at the results. The environment is the test session's (its compile cache,
set by tests/conftest.py), with plain text output at a fixed width so asserted strings are stable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def cli_env(*, columns: int | None = 200, **extra: str) -> dict[str, str]:
    """The test process's environment with plain text (no colour); ``columns=None`` leaves the
    width to the command, as a pipe in a CI log does."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env["NO_COLOR"] = "1"
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return env | extra


@dataclass
class Cli:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    result: dict | None = None  # the --json result, where the command wrote one

    def __str__(self) -> str:  # what a failing assertion shows; a traceback's end is what matters
        return (f"parity {' '.join(self.args)} -> exit {self.rc}\n--- stdout\n{self.stdout[-2000:]}\n"
                f"--- stderr\n{self.stderr[-3000:]}")

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("parity: error:")]


def _json_path(args: list[str]) -> Path | None:
    return Path(args[args.index("--json") + 1]) if "--json" in args else None


def _finish(args: list[str], rc: int, stdout: str, stderr: str) -> Cli:
    path = _json_path(args)
    result = json.loads(path.read_text()) if path is not None and path.is_file() else None
    return Cli(args=args, rc=rc, stdout=stdout, stderr=stderr, result=result)


def run_cli(args: list, *, env: dict[str, str], timeout: float = TIMEOUT_S) -> Cli:
    """``python -m parity.cli ARGS`` from the repository root; waits for it."""
    args = [str(a) for a in args]
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return _finish(args, proc.returncode, proc.stdout, proc.stderr)


def run_concurrently(commands: dict[str, list], *, env: dict[str, str]) -> dict[str, Cli]:
    # No more processes than CPUs: a TVM run's thread pool wants every core, and oversubscribed
    # (all at once on 2 CPUs) a wave took twice as long. Put heavy commands first.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {name: pool.submit(run_cli, args, env=env) for name, args in commands.items()}
        return {name: f.result() for name, f in futures.items()}


class Pending:
    """A ``parity`` subprocess started now; ``get()`` waits for it once and keeps the result."""

    def __init__(self, args: list, *, env: dict[str, str]):
        self.args, self.cli = [str(a) for a in args], None
        self.proc = subprocess.Popen([sys.executable, "-m", "parity.cli", *self.args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def get(self) -> Cli:
        if self.cli is None:
            stdout, stderr = self.proc.communicate(timeout=TIMEOUT_S)
            self.cli = _finish(self.args, self.proc.returncode, stdout, stderr)
        return self.cli

    def stop(self) -> None:
        """End it if nobody waited for it (a test failed first)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
