"""ChatRWKV's int8 weights (fp32i8 / fp16i8): our reference against the official package's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.dumpers.format import DumpReader
from parity.dumpers.registry import check_backend_spec, make_backend, split_dtype
from parity.dumpers.replay import ReplayBackend
from parity.errors import ParityError
from parity.reference.int8 import dequantize, quantize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PLAN = RunPlan(prefill_ids=tuple(range(20, 30)), decode_ids=(5, 11))


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])  # both branches: N > M and N <= M (N = in)
def test_dequantised_weight_is_within_the_scheme_s_resolution(shape) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    parts = quantize(w)
    assert parts["q"].dtype == torch.uint8 and parts["q"].shape == (shape[1], shape[0])
    back = dequantize(parts, dtype=torch.float32)
    assert back.shape == w.shape
    # One code step is ry * rx (each kept /16) = 1/256 of the normalised range: error <= half a step
    # per element, i.e. 0.5 * ry * rx (+ fp32 rounding).
    step = (parts["ry"] * parts["rx"]).t()
    assert torch.all((back - w).abs() <= 0.5 * step + 1e-6)
    assert (back - w).abs().max() > 0  # it is lossy: a pass-through would not be quantising


@pytest.mark.parametrize("word", ["fp32i8", "fp16i8"])
@pytest.mark.parametrize("name", ["rwkv4-L2-C64.pth", "rwkv5_2-L4-C128-H2.pth", "rwkv5_1-L2-C64-H8.pth"])
def test_matches_the_official_int8_strategy(name: str, word: str, tmp_path: Path) -> None:
    ck = load_checkpoint(FIXTURES / name)
    ours = DumpReader(make_backend(f"reference@{word}", ck).dump(PLAN, path=tmp_path / "ours"))
    official = make_backend(f"chatrwkv@{word}", ck)
    assert official.extra["strategy"] == f"cpu {word}"
    theirs = DumpReader(official.dump(PLAN, path=tmp_path / "theirs"))
    assert ours.extra["weights"] == theirs.extra["weights"] == "int8"
    # 5.1's prefill in the package is its own matrix form, not a scan (as 5.0's): there the two agree
    # to the dtype's rounding (fp32: 2e-5 of max; fp16: 5e-3, the fp16 tolerance's scale).
    exact = ck.config.version.value != "5.1"
    bound = 2e-5 if word == "fp32i8" else 5e-3
    for step in range(1 + len(PLAN.decode_ids)):
        a, b = ours.read_step(step), theirs.read_step(step)
        for stage, value in b.items():
            mine = a[stage].astype(np.float32)
            if exact:
                np.testing.assert_array_equal(mine, value, err_msg=f"step {step} {stage}")
            else:
                assert np.abs(mine - value).max() <= bound * np.abs(value).max(), (step, stage)


def test_an_int8_dump_is_replayed_by_an_int8_reference(tmp_path: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth")
    dump = make_backend("reference@fp32i8", ck).dump(PLAN, path=tmp_path / "i8")
    replay = ReplayBackend(ck, candidate_dump=dump)
    assert replay.model.weights_format == "int8"
    replayed = DumpReader(replay.dump(replay.plan(), path=tmp_path / "replay"))
    # The same code on the same inputs and weights: exact (a fp32 replay would differ by 1e-1).
    np.testing.assert_array_equal(replayed.read_stage(1, "L3.x_out"), DumpReader(dump).read_stage(1, "L3.x_out"))


@pytest.mark.parametrize("spec,message", [("tvm-instrumented@fp32i8", "int8 weights are built for reference, chatrwkv, tvm"),
                                          ("hf@fp16i8", "int8 weights are built for reference, chatrwkv, tvm")])
def test_int8_specs(spec: str, message: str) -> None:
    with pytest.raises(ParityError, match=message):
        check_backend_spec(spec)
    assert split_dtype("reference@fp16i8") == ("reference", "float16")
