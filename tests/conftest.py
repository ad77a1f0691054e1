"""What every test shares: one compile cache for the whole session.

Every test that compiles a model, in-process or through a ``parity`` subprocess, finds the same
cache through PARITY_CACHE_DIR (parity.compiled.build.default_cache_dir), so a model is compiled
once per session however many tests use it (and however many xdist workers run them). The cache lives under pytest's base temp dir, never
~/.cache: a test run must not read a stale build from a developer's cache (that would hide a change
to the model source), nor fill it. tests/compiled/conftest.py's ``compile_cache`` is the same path.

tests/ itself is on sys.path (pytest puts a conftest's directory there), so test files import the
shared helper modules beside this one (``parity_cli``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_compile_cache(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist (scripts/test runs -n auto) each worker's base temp dir is
        # <run's base>/popen-gwN: the cache goes one level up, so all workers share it. Two workers
        # missing one entry compile it once (parity/cache_lock.py; tests/compiled/test_build_lock.py).
        base = base.parent
    path = base / "parity-compile-cache"
    path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARITY_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def compile_cache(session_compile_cache: Path) -> Path:
    assert os.environ["PARITY_CACHE_DIR"] == str(session_compile_cache)
    return session_compile_cache
