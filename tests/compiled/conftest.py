"""Shared fixtures for the compiled-model tests: the bundled checkpoints and one compile cache.

The cache lives under pytest's base temp dir, not ~/.cache: a test run must never read a stale
build from a developer's cache (that would hide a change to the model source), nor fill it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.checkpoint import Checkpoint, load_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
# "h2": H = 2 = a cheap T; "hn": H = N = 12, where an (H, N) / (N, H) mix-up keeps every shape right.
FIXTURE_FILES = {"h2": "rwkv5_2-L4-C128-H2.pth", "hn": "rwkv5_2-L2-C144-H12.pth"}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same path tests/dumpers/test_backends.py uses, so a build is compiled once per session.
    path = tmp_path_factory.getbasetemp() / "parity-compile-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def checkpoints() -> dict[str, Checkpoint]:
    return {name: load_checkpoint(FIXTURES / file) for name, file in FIXTURE_FILES.items()}


@pytest.fixture(scope="session", params=sorted(FIXTURE_FILES))
def checkpoint(request: pytest.FixtureRequest, checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    return checkpoints[request.param]
