"""Three-way comparison: a wrong reference is named as the odd one out by the other two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import parity.reference as reference_pkg
from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.reference.rwkv5 import RWKV5Reference
from parity.session import odd_one_out, run_parity

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv5_2-L2-C144-H12.pth"


class SigmoidOnR(RWKV5Reference):
    """A real porting bug: v4 habit carried into v5, r = sigmoid(xr·Wr)."""

    def _receptance(self, xr, p):
        return torch.sigmoid(super()._receptance(xr, p))


def test_odd_one_out_logic():
    backends = ["a", "b", "c"]
    assert odd_one_out(backends, {("a", "b"): False, ("a", "c"): False, ("b", "c"): True})["backend"] == "a"
    assert odd_one_out(backends, {("a", "b"): True, ("a", "c"): False, ("b", "c"): False})["backend"] == "c"
    assert odd_one_out(backends, {("a", "b"): True, ("a", "c"): True, ("b", "c"): True})["backend"] is None
    # Two disagreeing pairs that do not single anyone out.
    assert odd_one_out(backends, {("a", "b"): False, ("a", "c"): False, ("b", "c"): False})["backend"] is None


@pytest.mark.slow
def test_wrong_reference_is_the_odd_one_out(tmp_path, monkeypatch, compile_cache):
    monkeypatch.setattr(reference_pkg, "make_reference", lambda checkpoint, dtype="float32", **_: SigmoidOnR(checkpoint, dtype=dtype))
    ck = load_checkpoint(FIXTURE)
    outcome = run_parity(
        ck, backends=["reference", "tvm", "chatrwkv"], plan=RunPlan(prefill_ids=(1,) * 10, decode_ids=(3, 4)),
        dump_dir=tmp_path / "dumps", cache_dir=compile_cache,
    )
    result = outcome.result
    assert result["odd_one_out"]["backend"] == "reference"
    verdicts = {(c["expected"], c["actual"]): c["first_divergence"] for c in result["comparisons"]}
    assert verdicts[("tvm", "chatrwkv")] is None
    # The reference's own first wrong stage is where the sigmoid went in: layer 0's r.
    assert verdicts[("reference", "tvm")]["stage"] == "L0.att.r"
    assert verdicts[("reference", "tvm")]["step"] == 0
