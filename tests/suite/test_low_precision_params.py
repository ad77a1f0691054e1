"""``pytest parity/`` tests the compiled model's low-precision builds on every bundled fixture (every
RWKV version), as --parity-dtypes says: collected, not run (running them is the suite's own job)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = sorted(p.stem for p in (REPO / "fixtures").glob("*.pth"))


def _collect(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PARITY_REPORT_DIR"}
    return subprocess.run([sys.executable, "-m", "pytest", "parity/", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-k", "low_precision", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _ids(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::test_low_precision_build[" in line]


def test_fp16_and_bf16_by_default_on_every_fixture_and_prompt():
    ids = _ids(_collect())
    assert len(FIXTURES) == 5 and {f.split("-")[0] for f in FIXTURES} == {"rwkv4", "rwkv5_0", "rwkv5_1", "rwkv5_2"}
    for fixture in FIXTURES:
        for dtype in ("fp16", "bf16"):
            for prompt in ("ones10", "random16"):
                assert any(f"[{dtype}-{fixture}-{prompt}]" in i for i in ids), (fixture, dtype, prompt, ids[:4])
    assert len(ids) == len(FIXTURES) * 2 * 2


def test_the_option_chooses_the_builds():
    ids = _ids(_collect("--parity-dtypes", "fp16i8"))
    assert len(ids) == len(FIXTURES) * 2 and all("[fp16i8-" in i for i in ids)
    none = _collect("--parity-dtypes", "none")  # every low-precision case deselected: none collected
    assert none.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, none.stdout[-2000:]
    assert "::test_low_precision_build" not in none.stdout


def test_a_bad_word_is_a_usage_error_not_a_traceback():
    proc = _collect("--parity-dtypes", "fp8")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--parity-dtypes: unknown 'fp8'" in proc.stderr and "Traceback" not in proc.stderr
