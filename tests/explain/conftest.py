"""The explanation tests judge what `parity explain` makes of a dump, not how a run survives its
backends (tests/test_worker.py, tests/test_crash.py do): their runs keep every backend in the test's
process (PARITY_IN_PROCESS, the documented opt-out), which spares each run a worker's start -- 2-4 s
of CPU, most of these tests' time on CI's two cores. A worker's dump is the in-process one, bit for
bit (tests/test_worker.py)."""

import pytest


@pytest.fixture(autouse=True)
def _backends_in_process(monkeypatch):
    monkeypatch.setenv("PARITY_IN_PROCESS", "1")
