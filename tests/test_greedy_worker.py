"""Greedy decoding runs our compiled builds in a worker process each (issue 9: memory; issue 12: crashes).

In the parity process a compiled build's greedy decoding loaded TVM and held the build's weights
beside the reference's fp32 copy (the 0.1B scenario row's peak), and a build that crashed while it
decoded ended the whole run. In a worker it holds its own copy while the parent holds none, and a
crash is a reported finding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import parity.greedy as greedy
from parity.checkpoint import Checkpoint, load_checkpoint
from parity.greedy import greedy_compare

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv5_2-L4-C128-H2.pth"
PROMPT = [1] * 10
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ck() -> Checkpoint:
    return load_checkpoint(FIXTURE)


def test_a_build_that_crashes_while_it_decodes_is_reported_not_fatal(ck, compile_cache):
    # crash-oob-gather's wkv5 kernel reads out of bounds at T = 1: a SIGSEGV at greedy step 1 (the
    # first decode step). In this process that would end pytest; in its worker it is a finding.
    result = greedy_compare(ck, backends=["reference", "mutant/crash-oob-gather", "tvm"], prompt_ids=PROMPT, steps=4,
                            cache_dir=compile_cache)
    (crash,) = result["crashes"]
    assert crash["backend"] == "mutant/crash-oob-gather" and crash["kind"] == "crashed"
    assert (crash["signal"], crash["step"], crash["kernel"]) == ("SIGSEGV", 1, "wkv5")
    fd = result["first_token_divergence"]
    assert fd["step"] == 1 and fd["actual"] == "mutant/crash-oob-gather" and fd["actual_token"] is None
    assert "crashed in greedy decoding at decode step 1" in fd["explanation"] and fd["crash"] == crash
    assert result["backends"]["mutant/crash-oob-gather"]["tokens"] == []
    # The others still decode and are compared: the crash takes nothing else down.
    ref, tvm = result["backends"]["reference"]["tokens"], result["backends"]["tvm"]["tokens"]
    assert len(ref) == 4 and ref == tvm
    assert [c["actual"] for c in result["comparisons"]] == ["tvm"] and result["comparisons"][0]["max_abs"] < 1e-3
    json.dumps(result, allow_nan=False)


def test_a_worker_decodes_as_this_process_does(ck, compile_cache):
    # sigmoid-r (compiled) chooses other tokens than the reference from step 0, so it is also
    # teacher-forced on the reference's tokens: in a second worker, once those are known.
    args = {"backends": ["reference", "mutant/sigmoid-r"], "prompt_ids": PROMPT, "steps": 5, "cache_dir": compile_cache}
    events: list[str] = []
    worker = greedy_compare(ck, **args, on_event=events.append)
    here = greedy_compare(ck, **args, in_process=True)
    assert any("teacher-forcing mutant/sigmoid-r" in e and "worker" in e for e in events), events
    assert worker["backends"] == here["backends"]
    assert worker["comparisons"] == here["comparisons"]  # the teacher-forced drift too, bit for bit
    assert worker["first_token_divergence"] == here["first_token_divergence"] is not None
    assert worker["comparisons"][0]["max_abs"] > 1e-3 and worker["crashes"] == []


def test_no_fp32_copy_here_while_a_build_decodes_in_its_worker(ck, monkeypatch):
    # The worker holds its own weights; ours beside them would be a second copy (the tree's peak).
    seen = []

    def fake_worker(spec, checkpoint, **kwargs):
        seen.append((spec, checkpoint._fp32 is None, kwargs["yardstick_tokens"], kwargs["forced_only"]))
        from parity.dumpers.worker import WorkerOutcome

        rows = np.zeros((3, ck.config.vocab_size), np.float32)
        rows[:, 7] = 1.0
        return WorkerOutcome(path=None, name=spec, greedy={"tokens": [7, 7, 7], "rows": rows, "forced_rows": None})

    monkeypatch.setattr(greedy, "_run_greedy_worker", fake_worker)
    ck.fp32_weights()  # as after a run: the reference made the shared copy
    assert ck._fp32 is not None
    result = greedy_compare(ck, backends=["reference", "tvm"], prompt_ids=PROMPT, steps=3)
    assert seen[0] == ("tvm", True, None, False)  # before the reference, with the copy let go
    assert list(result["backends"]) == ["reference", "tvm"] and result["yardstick"] == "reference"
    if result["backends"]["reference"]["tokens"] != [7, 7, 7]:  # then forced, later, on the reference's tokens
        assert seen[1][:2] == ("tvm", True) and seen[1][3] is True
        assert seen[1][2] == result["backends"]["reference"]["tokens"]


def test_greedy_does_not_load_tvm_in_the_parity_process(compile_cache):
    code = (
        "import sys\n"
        "from parity.checkpoint import load_checkpoint\n"
        "from parity.greedy import greedy_compare\n"
        f"r = greedy_compare(load_checkpoint({str(FIXTURE)!r}), backends=['reference', 'tvm'], prompt_ids=[1] * 4, steps=3)\n"
        "assert r['backends']['tvm']['tokens'] == r['backends']['reference']['tokens'], r\n"
        "print('tvm loaded:', 'tvm' in sys.modules, 'tvm_ffi' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tvm loaded: False False" in out.stdout
