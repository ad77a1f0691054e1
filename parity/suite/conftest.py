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


def _selected(config) -> tuple[str, list[str]]:
    """(yardstick, backends to judge against it) from --parity-backends / --parity-mode.

    ``tvm`` stands for the compiled model in both capture modes (debug build, instrumented plain
    build); ``--parity-mode`` keeps one. Any other backend (``mutant/<name>``, ``chatrwkv``,
    ``module:attribute``) is judged as given, so ``pytest parity/ --parity-backends
    reference,mutant/state-transposed`` shows what a failing case looks like.
    """
    backends = [b.strip() for b in config.getoption("--parity-backends", default="reference,tvm").split(",") if b.strip()]
    mode = config.getoption("--parity-mode", default="all")
    out = []
    for b in backends[1:]:
        if b == "tvm":
            out += [name for name, m in (("tvm", "debug"), ("tvm-instrumented", "instrumented")) if mode in ("all", m)]
        elif b == "tvm-instrumented":
            if mode in ("all", "instrumented"):
                out.append(b)
        else:
            out.append(b)
    return backends[0], out


def pytest_generate_tests(metafunc):
    if "candidate" in metafunc.fixturenames:
        _, candidates = _selected(metafunc.config)
        metafunc.parametrize("candidate", candidates)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """--parity-device: cpu (the llvm build) or cuda (the CUDA build; the reference stays on the CPU)."""
    return pytestconfig.getoption("--parity-device", default="cpu")


@pytest.fixture(scope="session")
def yardstick(pytestconfig) -> str:
    return _selected(pytestconfig)[0]
