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


def _low_precision(config) -> tuple[str, ...]:
    """--parity-dtypes: the compiled model's low-precision builds to test (tvm@<word>), fp16 and bf16
    by default. Read as the plugin reads it (its UsageError for a bad word comes first)."""
    from parity.pytest_plugin import DEFAULT_DTYPES, _dtypes_from

    return _dtypes_from(str(config.getoption("--parity-dtypes", default=DEFAULT_DTYPES)))


def pytest_generate_tests(metafunc):
    if "candidate" in metafunc.fixturenames:
        _, candidates = _selected(metafunc.config)
        metafunc.parametrize("candidate", candidates)
    if "low_precision" in metafunc.fixturenames:
        metafunc.parametrize("low_precision", _low_precision(metafunc.config))


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """--parity-device: cpu (the llvm build) or cuda (the CUDA build; the reference runs where
    --parity-reference-device says)."""
    return pytestconfig.getoption("--parity-device", default="cpu")


@pytest.fixture(scope="session")
def reference_device(parity_options) -> str:
    """--parity-reference-device: where the torch reference (and its replays) runs, cpu or cuda."""
    return parity_options.reference_device


@pytest.fixture(scope="session")
def yardstick(pytestconfig) -> str:
    return _selected(pytestconfig)[0]


def pytest_collection_modifyitems(config, items):
    # --parity-dtypes none: no low-precision case at all (deselected), rather than one skipped
    # "empty parameter set" case per fixture and prompt.
    if not _low_precision(config):
        dropped = [i for i in items if "low_precision" in getattr(i, "fixturenames", ())]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if i not in dropped]
