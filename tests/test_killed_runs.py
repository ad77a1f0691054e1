"""A real ``parity run`` killed in the middle of its dumps (issue 12).

SIGKILL (the OOM killer, ``kill -9``, a CI runner torn down) runs no cleanup at all, so what it
leaves is whatever the dump format leaves: ``<dir>.partial-<pid>`` directories whose manifests say
``complete: false``. Checked here: nothing left reads as a complete dump, every command pointed at
the leftovers says so in one line, no worker process outlives the run, and a re-run into the same
``--dump-dir`` (with ``--force``: the directory is not empty) works and clears what the killed run
left. SIGTERM, which does run cleanup, is tested with a temporary dump directory in
tests/test_bad_input.py; here it is tested with ``--dump-dir``.

The run: the 5.2 fixture, the reference against the numpy plug-in (no compile), 400 decode steps,
killed once a step file past the prefill is on disk, so the kill lands mid-dump.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity.dumpers.format import DumpReader
from parity.errors import ParityError
from parity_cli import REPO, cli_env, run_cli

FIXTURE = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"
NUMPY_PORT = f"{REPO}/examples/numpy_rwkv5.py:make_backend"


def _run_args(dump_dir: Path, *, decode_steps: int) -> list[str]:
    return ["run", "--checkpoint", str(FIXTURE), "--backends", f"reference,{NUMPY_PORT}", "--ids", "ones:4",
            "--decode-steps", str(decode_steps), "--dump-dir", str(dump_dir), "-q"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _start_and_signal(dump_dir: Path, sig: int) -> tuple[subprocess.Popen, list[int], str]:
    """Start a long run, send ``sig`` once a decode step is on disk; returns (process, its
    children at that moment, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "parity.cli", *_run_args(dump_dir, decode_steps=400)], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(dump_dir.glob("*.partial-*/step-0002.safetensors")):
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no decode step was written within 180 s"
            time.sleep(0.02)
        children = _children(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, children, err


def _wait_gone(pids: list[int], *, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _assert_nothing_reads_as_complete(dump_dir: Path) -> list[str]:
    left = sorted(p.name for p in dump_dir.iterdir())
    for name in left:
        with pytest.raises(ParityError) as info:
            DumpReader(dump_dir / name)
        assert "incomplete dump" in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(ParityError, match="unfinished run left"):
            DumpReader(dump_dir / name.split(".partial-")[0])  # the final path: absent, and says why
    return left


def test_sigkill_mid_dump_leaves_nothing_that_reads_as_complete_and_a_rerun_works(tmp_path):
    dump_dir = tmp_path / "dumps"
    proc, children, _ = _start_and_signal(dump_dir, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # The plug-in ran in a worker process; with its parent gone it must not run on (and write) alone.
    assert children, "expected the plug-in's worker process"
    assert _wait_gone(children, seconds=30) == [], "a worker outlived its killed parent"

    left = _assert_nothing_reads_as_complete(dump_dir)
    assert left and all(".partial-" in name for name in left), left

    # What a user does next: look at it, or run again into the same place. One line each.
    report = run_cli(["report", dump_dir, "--markdown", "-"], env=cli_env())
    assert report.rc == 2 and len(report.error_lines) == 1 and "Traceback" not in report.stderr, report
    assert "dumps found: none" in report.stderr, report
    again = run_cli(_run_args(dump_dir, decode_steps=2), env=cli_env())
    assert again.rc == 2 and "pass --force" in again.error_lines[0], again

    forced = run_cli([*_run_args(dump_dir, decode_steps=2), "--force"], env=cli_env())
    assert forced.rc == 0, forced
    dumps = sorted(p.name for p in dump_dir.iterdir())
    assert not [n for n in dumps if ".partial-" in n], dumps  # the killed run's leftovers are gone
    for name in dumps:
        assert len(DumpReader(dump_dir / name).steps) == 3  # prefill + 2 decode steps, complete


def test_sigterm_with_a_dump_dir_exits_143_and_leaves_nothing_that_reads_as_complete(tmp_path):
    dump_dir = tmp_path / "dumps"
    proc, children, err = _start_and_signal(dump_dir, signal.SIGTERM)
    assert proc.returncode == 143, (proc.returncode, err)
    assert err.strip().splitlines()[-1].startswith("parity: terminated (SIGTERM)"), err
    assert "Traceback" not in err
    assert _wait_gone(children, seconds=30) == []
    # Partial dumps in --dump-dir may stay (they are the user's directory, and say complete: false);
    # none reads as complete.
    _assert_nothing_reads_as_complete(dump_dir)
