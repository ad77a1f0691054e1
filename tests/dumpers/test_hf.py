"""The hf backend (transformers' RwkvForCausalLM, forward hooks): v4 only, its dump, its known differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.dumpers.registry import make_backend
from parity.dumpers.format import DumpReader
from parity.dumpers.hf import RESCALE_EVERY
from parity.errors import ParityError
from parity.session import run_parity
from parity.stages import V4_STATE_SLOTS, stage_order
from parity.synthetic import make_config, make_weights

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FIXTURE_V4 = FIXTURES / "rwkv4-L2-C64.pth"
PLAN = RunPlan(prefill_ids=(3, 1, 4, 1, 5, 9, 2, 6, 5), decode_ids=(3, 5, 8))
HOOKED = ("att.ln1", "att.k", "att.v", "att.out", "ffn.ln2", "ffn.out", "x_out")  # per layer
# Where HF's rescaling shows in a model deep enough for it: layer l >= RESCALE_EVERY has its
# att.output / ffn.value divided by 2^(l // RESCALE_EVERY), and the block output with them.
RESCALED = ("att.out", "ffn.out", "x_out")


def hooked_stages(n_layer: int) -> list[str]:
    hooked = {"emb", "logits"} | {f"L{l}.{s}" for l in range(n_layer) for s in HOOKED}
    hooked |= {f"state.L{l}.{s}" for l in range(n_layer) for s in V4_STATE_SLOTS}
    return [s for s in stage_order(n_layer=n_layer, version="4") if s in hooked]


def known(result: dict, name: str) -> dict:
    (item,) = [k for k in result["known_differences"] if k["name"] == name]
    return item


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return load_checkpoint(FIXTURE_V4)


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A synthetic 7-layer v4 model: one layer past HF's rescale point."""
    config = make_config(n_layer=RESCALE_EVERY + 1, n_embd=32, vocab_size=128, version="4")
    path = tmp_path_factory.mktemp("deep") / "rwkv4-L7-C32.pth"
    torch.save(make_weights(config, seed=11), path)
    return load_checkpoint(path)


@pytest.mark.parametrize("fixture", ["rwkv5_0-L2-C64-H2.pth", "rwkv5_1-L2-C64-H8.pth", "rwkv5_2-L2-C144-H12.pth"])
def test_refuses_rwkv5(fixture: str) -> None:
    ck = load_checkpoint(FIXTURES / fixture)
    with pytest.raises(ParityError, match=rf"RWKV-4 only .* RWKV-{ck.config.version.value}$"):
        make_backend("hf", ck)


def test_dump_records_the_hooked_stages(checkpoint, tmp_path) -> None:
    cfg = checkpoint.config
    reader = DumpReader(make_backend("hf", checkpoint).dump(PLAN, path=tmp_path / "hf"))
    assert (reader.backend, reader.mode, reader.dtype) == ("hf", "hooks", "float32")
    assert reader.extra["package"].startswith("transformers ")
    for index, (_, ids) in enumerate(PLAN.steps()):
        assert reader.step_stages(index) == hooked_stages(cfg.n_layer)
        arrays = reader.read_step(index)
        T = len(ids)
        assert arrays["logits"].shape == (T, cfg.vocab_size)  # every prefill row, batch axis dropped
        assert arrays["L1.att.k"].shape == (T, cfg.dim_att) and arrays["L1.x_out"].shape == (T, cfg.n_embd)
        for slot in V4_STATE_SLOTS:
            assert arrays[f"state.L1.{slot}"].shape == ((cfg.n_embd,) if slot.endswith("_x") else (cfg.dim_att,))
        # HF's (num, den, max) really were mapped to (aa, bb, pp): a sum of exponentials is > 0.
        assert arrays["state.L1.bb"].min() > 0
        # att_x / ffn_x are the last rows of ln1 / ln2, as the canonical table says.
        assert np.array_equal(arrays["state.L0.att_x"], arrays["L0.att.ln1"][-1])
        assert np.array_equal(arrays["state.L0.ffn_x"], arrays["L0.ffn.ln2"][-1])


def test_run_parity_with_hf_on_the_two_layer_fixture(checkpoint, tmp_path) -> None:
    outcome = run_parity(checkpoint, backends=["reference", "hf"], plan=PLAN, dump_dir=tmp_path, command="test")
    result = outcome.result
    assert result["first_divergence"] is None, result["first_divergence"]
    compared = {(r["step"], r["stage"]) for r in result["records"]}
    assert compared == {(step, s) for step in range(1 + len(PLAN.decode_ids)) for s in hooked_stages(2)}
    rescale = known(result, "rescale_every")
    assert rescale["backend"] == "hf" and rescale["applies"] is False
    assert "2 layers" in rescale["detail"]
    assert "hf: rescale_every (no effect here)" in result["run"]["known_differences"]


def test_rescaling_applies_past_six_layers_and_logits_still_agree(deep_checkpoint, tmp_path) -> None:
    outcome = run_parity(deep_checkpoint, backends=["reference", "hf"], plan=PLAN, dump_dir=tmp_path, command="test")
    result = outcome.result
    assert known(result, "rescale_every")["applies"] is True
    assert "hf: rescale_every (applies)" in result["run"]["known_differences"]
    logits = [r for r in result["records"] if r["stage"] == "logits"]
    assert len(logits) == 1 + len(PLAN.decode_ids)
    # ln_out undoes the 2^-1 scale up to LayerNorm eps: within the default fp32 policy.
    assert all(r["passed"] for r in logits), [(r["step"], r["max_abs"]) for r in logits]
    # The backend records rescaled stages back in canonical units, so the named difference leaves
    # no divergence: every stage passes, including layer 6's att.out / ffn.out / x_out.
    assert result["first_divergence"] is None, result["first_divergence"]
    # And they agree elementwise with the reference at the same closeness as every other stage.
    ref, hf = DumpReader(tmp_path / "reference").read_step(0), DumpReader(tmp_path / "hf").read_step(0)
    for stage in RESCALED:
        name = f"L{RESCALE_EVERY}.{stage}"
        np.testing.assert_allclose(hf[name], ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max())


def test_hf_runs_on_the_checkpoints_shared_fp32_weights(deep_checkpoint) -> None:
    from parity.hf_names import chatrwkv_to_hf

    backend = make_backend("hf", deep_checkpoint)
    params = dict(backend.model.named_parameters())
    shared = {chatrwkv_to_hf(k): v for k, v in deep_checkpoint.fp32_weights().items()}
    assert params.keys() == shared.keys()
    own = {f"rwkv.blocks.{RESCALE_EVERY}.attention.output.weight", f"rwkv.blocks.{RESCALE_EVERY}.feed_forward.value.weight"}
    for name, param in params.items():
        # The same memory, not an equal copy: HF holds no fp32 copy of its own (issue 9) ...
        if name not in own:
            assert param.data_ptr() == shared[name].data_ptr(), name
        # ... but for the two weights HF rescales in place on its first eval forward.
        else:
            assert param.data_ptr() != shared[name].data_ptr(), name


def test_hf_leaves_the_shared_weights_unwritten_and_computes_as_transformers_loads_it(deep_checkpoint, tmp_path) -> None:
    from transformers import RwkvConfig, RwkvForCausalLM

    from parity.hf_names import chatrwkv_to_hf, hf_config

    before = {k: v.clone() for k, v in deep_checkpoint.fp32_weights().items()}
    reader = DumpReader(make_backend("hf", deep_checkpoint).dump(PLAN, path=tmp_path / "hf"))
    after = deep_checkpoint.fp32_weights()
    assert all(torch.equal(before[k], after[k]) for k in before), "a shared weight was written"
    # The model built the way transformers' users build it (its own parameters, weights copied in
    # by load_state_dict), run on the same ids: the same logits, bit for bit.
    hc = {k: v for k, v in hf_config(deep_checkpoint.config).items() if k not in ("architectures", "model_type")}
    plain = RwkvForCausalLM(RwkvConfig(**{**hc, "rescale_every": RESCALE_EVERY})).eval()
    plain.load_state_dict({chatrwkv_to_hf(k): v.float() for k, v in deep_checkpoint.weights.items()}, strict=True)
    state = None
    with torch.no_grad():
        for index, (_, ids) in enumerate(PLAN.steps()):
            out = plain(input_ids=torch.tensor([ids]), state=state, use_cache=True)
            state = out.state
            assert reader.read_step(index)["logits"].tobytes() == out.logits[0].numpy().tobytes(), f"step {index}"
