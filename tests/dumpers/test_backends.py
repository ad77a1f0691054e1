"""Each backend's dump: canonical stage names, every step, readable back; and the kernel-call naming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.dumpers.backends import RunPlan, map_kernel_calls
from parity.dumpers.registry import make_backend
from parity.dumpers.format import DumpReader
from parity.errors import ParityError
from parity.stages import stage_order

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "rwkv5_2-L2-C144-H12.pth"
PLAN = RunPlan(prefill_ids=(1,) * 10, decode_ids=(11, 42))

# ---------------------------------------------------------------------------------------------
# map_kernel_calls on a synthetic call list: L = 2, C = 8 as H = 2 heads of N = 4, T = 3 tokens.

L, H, N, T = 2, 2, 4, 3
C = H * N


class CallLog:
    """Builds a call list the way the VM hook reports it: (symbol, call index, output index, array)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, np.ndarray]] = []
        self.index = 0

    def call(self, symbol: str, *shapes: tuple[int, ...]) -> list[np.ndarray]:
        # Each output a distinct constant, so a test can tell which array ended up under which name.
        arrays = [np.full(shape, float(len(self.calls) + k), np.float32) for k, shape in enumerate(shapes)]
        self.calls += [(symbol, self.index, k, a) for k, a in enumerate(arrays)]
        self.index += 1
        return arrays


def model_like_calls(*, n_layer: int = L, skip_ln_out: bool = False, layer_ln_fused: bool = False):
    """A call sequence shaped like the plain build's prefill (``layer_ln_fused``: like the CUDA decode
    step, each layer's LayerNorms inside a GEMV); returns the log and the arrays by role."""
    log, role = CallLog(), {}
    log.call("shape_func", (5,))
    log.call("take1", (T, C))
    (role["emb"],) = log.call("layer_norm1", (T, C))
    for layer in range(n_layer):
        if layer_ln_fused:
            log.call("gemv_ln_mix_cast", (4, T, C))
        else:
            (role[f"L{layer}.att.ln1"],) = log.call("layer_norm1", (T, C))
        (role[f"L{layer}.att.shift"],) = log.call("fused_token_shift", (T, C))
        log.call("fused_NT_matmul4_silu1", (T, C))
        role[f"L{layer}.att.wkv"], role[f"state.L{layer}.att_kv"] = log.call("wkv5", (T, H, N), (H, N, N))
        if layer_ln_fused:
            log.call("gemv_ln_mix_relu2_sigmoid", (T, C))
        else:
            (role[f"L{layer}.ffn.ln2"],) = log.call("layer_norm1", (T, C))
        (role[f"L{layer}.ffn.shift"],) = log.call("fused_token_shift1", (T, C))
    for layer in range(n_layer):
        (role[f"state.L{layer}.att_x"],) = log.call("last_row", (C,))
        (role[f"state.L{layer}.ffn_x"],) = log.call("last_row1", (C,))
    if not skip_ln_out:
        (role["ln_out"],) = log.call("layer_norm1", (T, C))
    log.call("NT_matmul7", (T, 16))
    return log, role


def test_map_names_every_sure_stage() -> None:
    log, role = model_like_calls()
    named = map_kernel_calls(log.calls, n_layer=L, n_embd=C)
    for name, array in role.items():
        assert name in named, name
        assert named[name].flat[0] == array.flat[0], f"{name} got another call's output"
    # wkv comes out of the kernel as (T, H, N); the canonical stage is (T, C).
    assert named["L1.att.wkv"].shape == (T, C)
    assert named["state.L1.att_kv"].shape == (H, N, N)


def test_map_gives_the_layer_by_call_order() -> None:
    log, role = model_like_calls()
    named = map_kernel_calls(log.calls, n_layer=L, n_embd=C)
    assert named["L0.att.wkv"].flat[0] < named["L1.att.wkv"].flat[0]
    ln = [named[n].flat[0] for n in ("emb", "L0.att.ln1", "L0.ffn.ln2", "L1.att.ln1", "L1.ffn.ln2", "ln_out")]
    assert ln == sorted(ln)


def test_map_keeps_unsure_kernels_under_their_own_names() -> None:
    log, _ = model_like_calls()
    named = map_kernel_calls(log.calls, n_layer=L, n_embd=C)
    # Fused kernels compute more than one stage; shape_func and the head matmul are no stage.
    assert "kernel.000.shape_func" in named
    assert "kernel.001.take1" in named
    gate = [n for n in named if n.endswith(".fused_NT_matmul4_silu1")]
    assert len(gate) == L and all(n.startswith("kernel.") for n in gate)
    assert named[f"kernel.{log.index - 1:03d}.NT_matmul7"].shape == (T, 16)
    assert len(named) == len(log.calls)  # nothing dropped, nothing named twice


def test_map_falls_back_when_counts_do_not_match() -> None:
    # One layer_norm short (2L + 1 calls): no layer_norm can be placed for sure, so none is named.
    log, _ = model_like_calls(skip_ln_out=True)
    named = map_kernel_calls(log.calls, n_layer=L, n_embd=C)
    assert not {"emb", "ln_out", "L0.att.ln1", "L1.ffn.ln2"} & named.keys()
    assert "kernel.002.layer_norm1" in named
    assert "L0.att.wkv" in named  # the other kinds still map

    # Three layers' worth of wkv5 calls for a two-layer model: every wkv5 output keeps its kernel name.
    log, _ = model_like_calls(n_layer=3)
    named = map_kernel_calls(log.calls, n_layer=L, n_embd=C)
    assert not [n for n in named if n.endswith("att.wkv") or n.endswith("att_kv")]
    wkv = sorted(n for n in named if ".wkv5" in n)
    assert len(wkv) == 6
    assert wkv[0].startswith("kernel.") and wkv[0].endswith(".wkv5") and wkv[1].endswith(".wkv5.out1")


def test_map_names_emb_and_ln_out_where_the_layers_layernorms_are_fused() -> None:
    # The CUDA decode step: ln1 / ln2 inside the GEMVs, ln0 and ln_out still their own kernels.
    log, role = model_like_calls(layer_ln_fused=True)
    named = map_kernel_calls(log.calls, n_layer=L, n_embd=C)
    for name in ("emb", "ln_out", "L1.att.wkv"):
        assert named[name].flat[0] == role[name].flat[0], name
    assert not [n for n in named if n.endswith((".ln1", ".ln2"))]
    # Two LayerNorms between the scans (L0's ln2, L1's ln1) are the layers' own: not placed.
    log = CallLog()
    log.call("take1", (T, C))
    log.call("wkv5", (T, H, N), (H, N, N))
    log.call("layer_norm1", (T, C))
    log.call("layer_norm1", (T, C))
    log.call("wkv5", (T, H, N), (H, N, N))
    named = map_kernel_calls(log.calls, n_layer=L, n_embd=C)
    assert not {"emb", "ln_out"} & named.keys() and "L1.att.wkv" in named


def test_map_of_no_calls_is_empty() -> None:
    assert map_kernel_calls([], n_layer=L, n_embd=C) == {}


# ---------------------------------------------------------------------------------------------
# Real dumps of the small fixture


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return load_checkpoint(FIXTURE)


@pytest.fixture(scope="module")
def dumps(checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DumpReader]:
    # The same cache path tests/compiled/conftest.py uses: each build compiles once per session.
    cache = tmp_path_factory.getbasetemp() / "parity-compile-cache"
    out_dir = tmp_path_factory.mktemp("dumps")
    readers = {}
    # The backends that run every version with canonical stages in-process (chatrwkv and hf have
    # their own tests: tests/dumpers/test_official.py, test_hf.py).
    for spec in ("reference", "tvm", "tvm-instrumented"):
        steps: list[tuple[str, int, int]] = []
        backend = make_backend(spec, checkpoint, cache_dir=cache)
        path = backend.dump(PLAN, path=out_dir / spec, on_step=lambda *s: steps.append(s))
        assert steps == [(backend.name, i, 3) for i in range(3)]
        readers[spec] = DumpReader(path)
    return readers


def canonical(checkpoint: Checkpoint) -> list[str]:
    return stage_order(n_layer=checkpoint.config.n_layer)


@pytest.mark.parametrize(
    ("spec", "backend", "mode"),
    [("reference", "reference", "eager"), ("tvm", "tvm", "debug"), ("tvm-instrumented", "tvm", "instrumented")],
)
def test_dump_metadata_and_steps(dumps, checkpoint, spec: str, backend: str, mode: str) -> None:
    reader = dumps[spec]
    assert (reader.backend, reader.mode, reader.dtype) == (backend, mode, "float32")
    assert reader.model == checkpoint.config.to_dict()
    assert reader.checkpoint["sha256"] == checkpoint.sha256
    assert [(s.index, s.kind, s.ids) for s in reader.steps] == [
        (0, "prefill", [1] * 10), (1, "decode", [11]), (2, "decode", [42])
    ]
    if spec != "reference":
        assert reader.extra["target"] == "llvm" and reader.extra["library"].endswith(".so")


@pytest.mark.parametrize("spec", ["reference", "tvm"])
def test_full_backends_record_every_canonical_stage(dumps, checkpoint, spec: str) -> None:
    reader = dumps[spec]
    assert reader.stage_order == canonical(checkpoint)
    cfg = checkpoint.config
    for step in reader.steps:
        assert reader.step_stages(step.index) == canonical(checkpoint)
        arrays = reader.read_step(step.index)
        rows = len(step.ids)
        assert arrays["logits"].shape == (rows, cfg.vocab_size)
        assert arrays["L1.att.wkv"].shape == (rows, cfg.dim_att)
        assert arrays["state.L1.att_kv"].shape == (cfg.n_head, cfg.head_size, cfg.head_size)
        assert all(a.dtype == np.float32 for a in arrays.values())


def test_instrumented_records_sure_stages_and_kernels(dumps, checkpoint) -> None:
    reader = dumps["tvm-instrumented"]
    n_layer = checkpoint.config.n_layer
    must = {"emb", "logits"}
    must |= {f"L{layer}.att.wkv" for layer in range(n_layer)}
    must |= {f"state.L{layer}.{slot}" for layer in range(n_layer) for slot in ("att_x", "att_kv", "ffn_x")}
    order = canonical(checkpoint)
    assert reader.stage_order[: len(order)] == order  # canonical names first, kernels appended
    for step in reader.steps:
        stages = reader.step_stages(step.index)
        assert must <= set(stages), must - set(stages)
        kernels = [s for s in stages if s.startswith("kernel.")]
        assert kernels and all(s in reader.stage_order for s in kernels)
        named = [s for s in stages if not s.startswith("kernel.")]
        assert named == [s for s in order if s in named]  # in canonical order, ahead of kernels
        assert reader.read_stage(step.index, "L0.att.wkv").shape == (len(step.ids), checkpoint.config.dim_att)


def test_instrumented_stages_equal_the_debug_builds(dumps) -> None:
    # The same compiled math observed two ways: every stage both dumps name must agree bit for bit.
    # A wrong layer assignment in map_kernel_calls would put another layer's values here.
    debug, instrumented = dumps["tvm"], dumps["tvm-instrumented"]
    for step in debug.steps:
        a, b = debug.read_step(step.index), instrumented.read_step(step.index)
        shared = [name for name in b if name in a]
        assert len(shared) >= 12
        for name in shared:
            assert a[name].tobytes() == b[name].tobytes(), (step.index, name)


def test_tvm_and_reference_dumps_agree(dumps) -> None:
    ref, tvm_dump = dumps["reference"], dumps["tvm"]
    for step in ref.steps:
        for name in ("emb", "L0.att.wkv", "logits", "state.L1.att_kv"):
            want = ref.read_stage(step.index, name)
            # Measured <= 6e-6 on logits; 5e-5 still fails on any real divergence.
            np.testing.assert_allclose(tvm_dump.read_stage(step.index, name), want, rtol=1e-5, atol=5e-5, err_msg=name)


def test_bad_plan_is_refused_before_anything_is_written(checkpoint, tmp_path: Path) -> None:
    backend = make_backend("reference", checkpoint)
    for plan in (RunPlan(prefill_ids=()), RunPlan(prefill_ids=(1, 2), decode_ids=(checkpoint.config.vocab_size,))):
        with pytest.raises(ParityError):
            backend.dump(plan, path=tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_unknown_backend_is_a_parity_error(checkpoint) -> None:
    with pytest.raises(ParityError, match="tvm-instrumented"):
        make_backend("onnx", checkpoint)
