"""The chatrwkv backend (the official package, observed from outside): what it dumps, and that it agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.dumpers.registry import make_backend
from parity.dumpers.format import DumpReader
from parity.session import compare_dumps
from parity.stages import stage_order, state_slots, state_stage_names

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FIXTURE_FILES = {"4": "rwkv4-L2-C64.pth", "5.0": "rwkv5_0-L2-C64-H2.pth"}
# ones:10 is the prompt where the 5.0 package's chunked prefill is furthest from a scan
# (tests/reference/test_rwkv5_versions.py); a prompt of distinct ids follows it.
PLANS = {
    "ones10": RunPlan(prefill_ids=(1,) * 10, decode_ids=(11, 42, 7)),
    "distinct12": RunPlan(prefill_ids=tuple(range(20, 32)), decode_ids=(5,)),
}


def observed_stages(*, n_layer: int, version: str) -> list[str]:
    """What the package exposes without editing its code, in canonical order."""
    outer = {"emb", "logits"} | {f"L{l}.{s}" for l in range(n_layer) for s in ("x_after_att", "x_out")}
    outer |= set(state_stage_names(n_layer=n_layer, slots=state_slots(version)))
    return [s for s in stage_order(n_layer=n_layer, version=version) if s in outer]


@pytest.fixture(scope="module", params=sorted(FIXTURE_FILES))
def checkpoint(request: pytest.FixtureRequest) -> Checkpoint:
    return load_checkpoint(FIXTURES / FIXTURE_FILES[request.param])


@pytest.fixture(scope="module")
def dumps(checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp(f"official-{checkpoint.config.version.value}")
    return {
        plan_name: {
            spec: make_backend(spec, checkpoint).dump(plan, path=out / plan_name / spec) for spec in ("reference", "chatrwkv")
        }
        for plan_name, plan in PLANS.items()
    }


def test_dump_metadata(dumps, checkpoint) -> None:
    reader = DumpReader(dumps["ones10"]["chatrwkv"])
    assert (reader.backend, reader.mode, reader.dtype) == ("chatrwkv", "official", "float32")
    assert reader.model == checkpoint.config.to_dict()
    assert reader.extra["package"].startswith("rwkv ") and reader.extra["strategy"] == "cpu fp32"


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_dump_has_the_observable_stages_of_every_step(dumps, checkpoint, plan_name: str) -> None:
    cfg = checkpoint.config
    plan = PLANS[plan_name]
    reader = DumpReader(dumps[plan_name]["chatrwkv"])
    expected = observed_stages(n_layer=cfg.n_layer, version=cfg.version.value)
    assert len(reader.steps) == 1 + len(plan.decode_ids)
    slots = state_slots(cfg.version.value)
    for index, (kind, ids) in enumerate(plan.steps()):
        assert (reader.steps[index].kind, list(reader.steps[index].ids)) == (kind, ids)
        assert reader.step_stages(index) == expected
        arrays = reader.read_step(index)
        T = len(ids)
        # Every row of the prefill, not only the last the package returns by default.
        assert arrays["logits"].shape == (T, cfg.vocab_size)
        for layer in range(cfg.n_layer):
            for stage in ("x_after_att", "x_out"):
                assert arrays[f"L{layer}.{stage}"].shape == (T, cfg.n_embd)
        assert arrays["emb"].shape == (T, cfg.n_embd)
        for slot in slots:
            want = (cfg.n_head, cfg.head_size, cfg.head_size) if slot == "att_kv" else (
                (cfg.n_embd,) if slot.endswith("_x") else (cfg.dim_att,)
            )
            assert arrays[f"state.L1.{slot}"].shape == want, slot
        # Real values, so the comparison below cannot pass on two untouched buffers.
        assert np.abs(arrays[f"state.L1.{slots[1]}"]).max() > 1e-3
    if plan_name == "distinct12":
        prefill = reader.read_step(0)["logits"]
        assert np.abs(prefill[1:] - prefill[:-1]).max(axis=1).min() > 1e-3  # every row its own


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_matches_the_reference_under_the_default_policy(dumps, checkpoint, plan_name: str) -> None:
    result = compare_dumps(dumps[plan_name]["reference"], dumps[plan_name]["chatrwkv"])
    assert result["first_divergence"] is None, result["first_divergence"]
    cfg = checkpoint.config
    expected = observed_stages(n_layer=cfg.n_layer, version=cfg.version.value)
    compared = {(r["step"], r["stage"]) for r in result["records"]}
    # A pass that compared nothing would be no pass: every observed stage of every step was compared.
    assert compared == {(step, s) for step in range(1 + len(PLANS[plan_name].decode_ids)) for s in expected}
    # The package sees fewer stages than the reference records; those are listed as missing.
    assert {m["missing_in"] for m in result["missing"]} == {"actual"}
    assert not result["unmatched_steps"]
