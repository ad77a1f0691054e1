from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = sorted((REPO_ROOT / "fixtures").glob("*.pth"))


def report_dir() -> Path:
    return Path(os.environ.get("PARITY_REPORT_DIR", REPO_ROOT / "reports"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    # Reuse the user's compile cache when one is configured; otherwise one per test session.
    env = os.environ.get("PARITY_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session", params=FIXTURES, ids=[p.stem for p in FIXTURES])
def checkpoint(request):
    from parity.checkpoint import load_checkpoint

    return load_checkpoint(request.param)
