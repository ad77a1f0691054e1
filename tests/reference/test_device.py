"""The torch reference on a device of the caller's choosing (``parity run --reference-device``).

This machine has no GPU, so the plumbing is checked on torch's ``meta`` device: a meta tensor has a
shape and a dtype but no data, and torch refuses to mix it with a CPU tensor ("Tensor on device meta
is not on the expected device cpu"). A step that runs to the end on a meta model therefore made every
tensor it touched (weights, the zero state, the ids, inputs handed in as numpy) on the model's device;
one forgotten ``torch.zeros`` or ``torch.as_tensor`` without a device fails it. The numbers on a real
GPU are tests/compiled/test_gpu.py's (marked ``gpu``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parity.checkpoint import load_checkpoint
from parity.errors import ParityError
from parity.reference import check_reference_device, make_reference

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
V4 = FIXTURES / "rwkv4-L2-C64.pth"
V5 = FIXTURES / "rwkv5_0-L2-C64-H2.pth"  # 5.0: the cheapest RWKV-5; the versions share every device site


def _devices_of_a_run(model) -> set[str]:
    """The devices of every tensor recorded over a prefill and a decode step, and of the logits and state."""
    seen: set[str] = set()

    def record(stage: str, value: torch.Tensor) -> None:
        seen.add(value.device.type)

    logits, state = model.forward([1, 2, 3], record=record)
    logits, state = model.forward([4], state, record=record)
    seen |= {logits.device.type} | {t.device.type for t in state.slots().values()}
    return seen


@pytest.mark.parametrize("fixture", [V4, V5], ids=["rwkv4", "rwkv5"])
@pytest.mark.parametrize("weights", [None, "int8", "q4"])
def test_every_tensor_of_a_step_is_made_on_the_reference_device(fixture, weights):
    ck = load_checkpoint(fixture)
    model = make_reference(ck, weights=weights, device="meta")
    assert model.device == torch.device("meta")
    assert model.emb.device.type == "meta" and model.head_weight.device.type == "meta"
    assert _devices_of_a_run(model) == {"meta"}


@pytest.mark.parametrize("fixture", [V4, V5], ids=["rwkv4", "rwkv5"])
def test_a_replays_numpy_inputs_go_to_the_reference_device(fixture):
    """The replay's entry points take what another backend recorded (numpy, on the host)."""
    ck = load_checkpoint(fixture)
    cfg = ck.config
    model = make_reference(ck, device="meta")
    x = model.stream_in(0, np.zeros((2, cfg.n_embd), np.float32))
    zero = model.zero_state().layers[0]
    slots = {name: np.zeros(tuple(getattr(zero, name).shape), np.float32) for name in vars(zero)}
    state = model.layer_state(slots)
    splice = {}
    if cfg.version.value != "4":  # the scan's inputs and GroupNorm's input, as a replay splices them
        splice = {f"L0.att.{s}": np.zeros((2, cfg.dim_att), np.float32) for s in ("r", "k", "v", "wkv")}
    out, new_state = model.layer(0, x, state, splice=splice)
    head = model.head(model.head_in(np.zeros((2, cfg.n_embd), np.float32)))
    assert {out.device.type, head.device.type} | {getattr(new_state, n).device.type for n in vars(zero)} == {"meta"}


def test_the_cpu_reference_is_where_it_always_was():
    model = make_reference(load_checkpoint(V5))  # the default device
    assert model.device == torch.device("cpu")
    assert _devices_of_a_run(model) == {"cpu"}


def test_check_reference_device():
    assert check_reference_device("cpu") == "cpu"
    with pytest.raises(ParityError, match="unknown reference device 'tpu'; choose one of cpu, cuda"):
        check_reference_device("tpu")


def test_cuda_without_a_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine with no GPU torch can use
    with pytest.raises(ParityError) as info:
        check_reference_device("cuda")
    assert str(info.value).startswith("no CUDA GPU for the torch reference") and "\n" not in str(info.value)


def test_a_run_places_every_reference_model_it_makes_on_the_reference_device(tmp_path, monkeypatch):
    """run_parity(reference_device=...) reaches the plain reference, the replay's own reference (a
    reference@fp16 candidate is replayed by an fp16 one) and the fp64 arbiter; reference@fp16 itself,
    a backend like any other, stays on the CPU. Asked for "cuda" here (no GPU), with the check and
    the move to the GPU recorded instead of done, so the run computes on the CPU as usual."""
    import parity.session as session
    from parity.dumpers.backends import RunPlan
    from parity.reference.rwkv5 import LayerwiseModel

    placed: list[tuple[str, str]] = []
    real_place = LayerwiseModel.place

    def place(self, device: str) -> None:
        placed.append((self.dtype_name, device))
        real_place(self, "cpu")

    monkeypatch.setattr(LayerwiseModel, "place", place)
    monkeypatch.setattr(session, "check_reference_device", lambda device: device)
    monkeypatch.setattr(session, "pin_torch_math", lambda: None)  # this process's torch settings stay as they are
    monkeypatch.setattr(session, "reference_device_info", lambda device: {"reference_device": device})
    ck = load_checkpoint(V5)
    out = session.run_parity(ck, backends=["reference", "reference@fp16"], plan=RunPlan(prefill_ids=(1, 2), decode_ids=(3,)),
                             dump_dir=tmp_path, mode="replay", arbiter=True, in_process=True, reference_device="cuda")
    assert sorted(placed) == sorted([("float32", "cuda"), ("float16", "cpu"), ("float16", "cuda"), ("float64", "cuda")])
    assert out.result["run"]["reference_device"] == "cuda"


def test_a_cpu_run_records_its_reference_device(tmp_path):
    from parity.dumpers.backends import RunPlan
    from parity.session import run_parity

    out = run_parity(load_checkpoint(V5), backends=["reference", "reference@bf16"], plan=RunPlan(prefill_ids=(1, 2)),
                     dump_dir=tmp_path, mode="propagated", in_process=True, reference_device="cpu")
    run = out.result["run"]
    assert run["reference_device"] == "cpu" and "reference_gpu" not in run
