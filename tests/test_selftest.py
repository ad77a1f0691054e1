"""The bug zoo, end to end: every mutant found where it is, in both modes; bisect on two of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.bisect import bisect
from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.mutants import CATALOGUE
from parity.selftest import run_selftest
from parity.session import default_decode_ids, parse_ids

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Path(os.environ.get("PARITY_CACHE_DIR") or tmp_path_factory.mktemp("selftest-cache"))


@pytest.mark.slow
def test_every_mutant_is_localised_in_both_modes(cache):
    rows = run_selftest(cache_dir=cache)
    assert [r.mutant.name for r in rows] == list(CATALOGUE)
    failures = [r.to_dict() for r in rows if not r.passed]
    assert not failures, failures


@pytest.mark.parametrize(
    ("mutant", "step", "layer", "stage"),
    [("state-transposed", 1, 0, "L0.att.wkv"), ("groupnorm-eps-1e-5", 0, 0, "L0.att.ln_x")],
)
def test_bisect_ends_at_the_right_stage_with_a_working_repro(cache, mutant, step, layer, stage):
    ck = load_checkpoint(ROOT / "fixtures" / "rwkv5_2-L4-C128-H2.pth")
    plan = RunPlan(prefill_ids=parse_ids("random:10:7", vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=3, vocab_size=ck.config.vocab_size))
    decisions = []
    out = bisect(ck, backends=["reference", f"mutant/{mutant}"], plan=plan, cache_dir=cache, on_decision=decisions.append)
    assert (out.found["step"], out.found["layer"], out.found["stage"]) == (step, layer, stage)
    assert any("-> this step" in d for d in decisions) and any("-> this layer" in d for d in decisions)
    # The repro reruns just that layer of that step, and finds the same stage.
    env = dict(os.environ, PARITY_CACHE_DIR=str(cache))
    argv = out.repro.split()
    assert argv[:2] == ["parity", "run"] and "--only-layer" in argv and "--only-step" in argv
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *argv[1:], "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert f"stage {stage}" in proc.stdout


def test_selftest_cli_prints_the_table(cache):
    env = dict(os.environ, PARITY_CACHE_DIR=str(cache), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "selftest", "--only", "sigmoid-r,emb-without-ln0"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2/2 mutants localised in both modes" in proc.stdout
    assert "sigmoid-r" in proc.stdout and "prefill L0.att.r" in proc.stdout


def test_unknown_mutant_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "selftest", "--only", "no-such-bug"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown mutant" in proc.stderr and "Traceback" not in proc.stderr


def test_every_mutant_knows_its_rwkv_version():
    """`parity selftest --checkpoint` runs the mutants of the checkpoint's version: each mutant's
    version comes from its fixture's name, also for fixtures kept in a subfolder."""
    from parity.selftest import load_fixture_version

    versions = {name: load_fixture_version(m) for name, m in CATALOGUE.items()}
    assert set(versions.values()) <= {"4", "5.0", "5.1", "5.2"}, versions
    for name, m in CATALOGUE.items():
        assert versions[name] == load_checkpoint(Path(__file__).resolve().parents[1] / "fixtures" / f"{m.fixture}.pth").config.version.value, name
