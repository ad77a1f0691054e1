"""The compile cache's lock in build_model (parity/cache_lock.py): one builder per entry."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from parity.cache_lock import entry_lock
from parity.checkpoint import load_checkpoint
from parity.compiled.build import build_model, entry_path

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "rwkv4-L2-C64.pth"
REPO = Path(__file__).resolve().parents[2]


def test_a_build_waits_for_the_entry_lock_then_builds(tmp_path: Path) -> None:
    config = load_checkpoint(FIXTURE).config
    events: list[str] = []
    done = threading.Event()
    with entry_lock(entry_path(config, variant="plain", target="llvm", cache_dir=tmp_path)):
        worker = threading.Thread(
            target=lambda: (build_model(config, variant="plain", cache_dir=tmp_path, on_event=events.append), done.set())
        )
        worker.start()
        deadline = time.monotonic() + 30
        while not any("waiting for" in e for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        # It waits, naming the holder (this process), and compiles nothing while the lock is held.
        assert any(f"waiting for process {os.getpid()}" in e for e in events), events
        time.sleep(0.5)
        assert not done.is_set() and not any(e.startswith("compiling") for e in events)
    worker.join(timeout=600)
    assert done.is_set() and sum(e.startswith("compiling") for e in events) == 1


def test_two_processes_missing_the_same_entry_compile_it_once(tmp_path: Path) -> None:
    script = (
        "import sys; from parity.checkpoint import load_checkpoint; from parity.compiled.build import build_model\n"
        f"a = build_model(load_checkpoint({str(FIXTURE)!r}).config, variant='plain', cache_dir={str(tmp_path)!r}, "
        "on_event=lambda m: print(m, flush=True))\nprint('cached' if a.cached else 'built', flush=True)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    finals = sorted(out.strip().splitlines()[-1] for out in outs)
    assert finals == ["built", "cached"], outs  # one compiled, the other used its build
    assert sum(line.startswith("compiling") for out in outs for line in out.splitlines()) == 1, outs
