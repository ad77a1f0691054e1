"""MLC-LLM's q4f16_1 packing (parity/reference/q4.py) against values worked out by hand, and the
reference that dequantises it (``reference@q4f16_1``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.dumpers.format import DumpReader
from parity.dumpers.registry import make_backend
from parity.errors import ParityError
from parity.reference import make_reference
from parity.reference.q4 import dequantize, pack, quantize, unpack

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PLAN = RunPlan(prefill_ids=tuple(range(20, 30)), decode_ids=(5, 11))


def _hand_row() -> list[float]:
    # Group 0 (32 elements): max|w| = 3.5, so scale = 3.5 / 7 = 0.5 (exact in fp16) and the code of
    # w is round(w / 0.5 + 7), half to even. The first eight, by hand:
    #   3.5 -> 14; -3.5 -> 0; 0 -> 7; 0.5 -> 8; 0.26 -> 7.52 -> 8 (0.26 is 0.26 in fp16 to 4e-5);
    #   0.25 -> 7.5 -> 8 (tie, to even); 0.75 -> 8.5 -> 8 (tie, to even); 1.25 -> 9.5 -> 10 (tie)
    # the other 24 are 0 -> 7. Group 1 (8 real elements of a 40-wide row, 24 padding): max|w| = 7
    # -> scale 1; w = -7..0 -> codes 0..7.
    return [3.5, -3.5, 0.0, 0.5, 0.26, 0.25, 0.75, 1.25] + [0.0] * 24 + [float(v) for v in range(-7, 1)]


def test_codes_scales_and_packing_match_hand_computed_values() -> None:
    parts = quantize(torch.tensor([_hand_row()]))
    assert parts["scale"].dtype == torch.float16
    assert parts["scale"].tolist() == [[0.5, 1.0]]
    words = parts["q"].tolist()[0]
    assert len(words) == 8  # two groups of 32 codes, 8 codes a word, the second group padded
    # Nibbles high to low are codes 7..0 of the word: A 8 8 8 8 7 0 E.
    assert words[0] == 0xA888870E
    assert words[1:4] == [0x77777777] * 3  # 24 zeros -> code 7
    # Group 1: codes 0..7 in order, then 24 padding codes of 0 bits (MLC packs missing elements as 0).
    assert words[4] == 0x76543210
    assert words[5:] == [0, 0, 0]


def test_dequantised_values_are_code_minus_seven_times_scale() -> None:
    parts = quantize(torch.tensor([_hand_row()]))
    back = dequantize(parts, in_features=40)
    assert back.dtype == torch.float16 and back.shape == (1, 40)
    # codes 14, 0, 7, 8, 8, 8, 8, 10 at scale 0.5; then zeros; then -7..0 at scale 1
    want = [3.5, -3.5, 0.0, 0.5, 0.5, 0.5, 0.5, 1.5] + [0.0] * 24 + [float(v) for v in range(-7, 1)]
    assert back[0].tolist() == want


def test_pack_and_unpack_round_trip() -> None:
    codes = torch.randint(0, 15, (3, 64), generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(unpack(pack(codes), in_features=64).numpy(), codes.numpy())


def test_error_is_within_half_a_step_of_its_group() -> None:
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    parts = quantize(w)
    back = dequantize(parts, in_features=96).float()
    step = parts["scale"].float().repeat_interleave(32, dim=1)
    w16 = w.to(torch.float16).float()
    # half a code step, plus fp16's rounding of w / scale + 7 (codes near 14 carry ~4e-3 of a step)
    # and of the dequantised product (2^-11 relative)
    assert torch.all((back - w16).abs() <= 0.51 * step + back.abs() * 2.0 ** -11)
    assert (back - w16).abs().max() > 0  # lossy: a pass-through would not be quantising


def test_a_group_of_zeros_dequantises_to_zeros() -> None:
    w = torch.zeros(2, 32)
    w[1, 3] = 1.0
    back = dequantize(quantize(w), in_features=32)
    assert torch.equal(back[0], torch.zeros(32, dtype=torch.float16)) and back[1, 3] == 1.0


def test_q4_reference_runs_the_dequantised_weights(tmp_path: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth")
    q4 = make_reference(ck, dtype="float16", weights="q4")
    fp16 = make_reference(ck, dtype="float16")
    assert q4.weights_format == "q4"
    dump = DumpReader(make_backend("reference@q4f16_1", ck).dump(PLAN, path=tmp_path / "q4"))
    assert dump.dtype == "float16" and dump.extra["weights"] == "q4"
    plain = DumpReader(make_backend("reference@fp16", ck).dump(PLAN, path=tmp_path / "fp16"))
    a, b = dump.read_stage(0, "L0.att.r"), plain.read_stage(0, "L0.att.r")
    # 4-bit weights move a matmul's output by several percent of its range (1/14 of each group's
    # max per weight); were the q4 weights not used, the two would be equal.
    assert np.abs(a - b).max() > 1e-2 * np.abs(b).max()
    assert q4.layers[0].Wr.dtype == fp16.layers[0].Wr.dtype == torch.float16


def test_unknown_weight_format_is_refused() -> None:
    ck = load_checkpoint(FIXTURES / "rwkv4-L2-C64.pth")
    with pytest.raises(ParityError, match="unknown weight format 'q3'; the reference knows int8 and q4"):
        make_reference(ck, weights="q3")
