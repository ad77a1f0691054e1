"""Shared fixtures for the compiled-model tests: the bundled checkpoints. The compile cache is the
session's one (tests/conftest.py's ``compile_cache``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.checkpoint import Checkpoint, load_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
# "h2": H = 2 = a cheap T; "hn": H = N = 12, where an (H, N) / (N, H) mix-up keeps every shape right.
FIXTURE_FILES = {"h2": "rwkv5_2-L4-C128-H2.pth", "hn": "rwkv5_2-L2-C144-H12.pth"}


@pytest.fixture(scope="session")
def checkpoints() -> dict[str, Checkpoint]:
    return {name: load_checkpoint(FIXTURES / file) for name, file in FIXTURE_FILES.items()}


@pytest.fixture(scope="session", params=sorted(FIXTURE_FILES))
def checkpoint(request: pytest.FixtureRequest, checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    return checkpoints[request.param]
