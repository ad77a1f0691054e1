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


# The files whose tests take longest on CI's two cores (summed per file, 2026-12-01 clean-clone runs),
# longest first. scripts/test hands xdist whole files (--dist loadfile) in collection order: these go
# first and the many short files fill in after them, so the workers finish together instead of one
# running a long file alone at the end (the parity suite leads, as scripts/test lists it first).
LONGEST_FIRST = (
    "tests/test_docs.py", "tests/compiled/test_gpu.py", "tests/test_no_false_alarms.py", "tests/compiled/test_gemv_cuda.py",
    "tests/explain/test_engine.py", "tests/test_selftest.py", "tests/test_fuzz.py", "tests/tokenizer/test_world.py",
    "tests/test_cli.py", "tests/compiled/test_quant.py", "tests/test_crash.py", "tests/compiled/test_build.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))

    def key(item):
        path = Path(str(item.path))
        where = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        # parity/ first (-1), then LONGEST_FIRST in order, then the rest as collected (sort is stable).
        return -1 if where.startswith("parity/") else rank.get(where, len(rank))

    items.sort(key=key)
