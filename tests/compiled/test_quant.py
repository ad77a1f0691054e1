"""The compiled quantised variants: ChatRWKV's int8 (tvm@fp16i8, tvm@fp32i8) and MLC-LLM's q4f16_1
(tvm@q4f16_1), judged against the reference that dequantises the same codes, and end to end
against the fp32 reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint
from parity.compiled.build import build_model, cache_key
from parity.compiled.runtime import CompiledRWKV, source_key
from parity.dumpers.backends import RunPlan
from parity.dumpers.format import DumpReader
from parity.dumpers.registry import check_backend_spec, make_backend, spec_weights, split_dtype
from parity.dumpers.replay import ReplayBackend
from parity.errors import ParityError
from parity.session import run_parity

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PLAN = RunPlan(prefill_ids=tuple(range(20, 30)), decode_ids=(5, 11, 3))


def test_a_quantised_build_stores_its_matmul_weights_quantised(compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L2-C144-H12.pth")
    keys = {s: cache_key(config=ck.config, variant="debug", target="llvm", dtype=s) for s in ("float16", "fp16i8", "q4f16_1")}
    assert len(set(keys.values())) == 3
    art = build_model(ck.config, variant="debug", cache_dir=compile_cache, dtype="q4f16_1")
    assert "-q4f16_1-" in art.library.name and art.meta["dtype"] == "q4f16_1"
    dtypes = dict(zip(art.meta["params"], art.meta["param_dtypes"]))
    # 144 inputs: 5 groups of 32 (the last one 16 wide), 4 words of 8 codes per group.
    assert dtypes["blocks.0.att.key.weight_q"] == "uint32" and dtypes["blocks.0.att.key.weight_scale"] == "float16"
    assert "blocks.0.att.key.weight" not in dtypes and "head.weight_q" in dtypes
    assert dtypes["emb.weight"] == "float32" and dtypes["blocks.0.att.time_decay"] == "float32"
    assert source_key("blocks.0.att.key.weight_scale") == "blocks.0.att.key.weight"
    assert source_key("blocks.0.att.time_decay") == "blocks.0.att.time_decay"
    model = CompiledRWKV(ck, variant="debug", cache_dir=compile_cache, dtype="q4f16_1")
    q = model.params[art.meta["params"].index("blocks.0.att.key.weight_q")]
    assert q.shape == (144, 20) and model.dtype == "float16" and model.weights_format == "q4"
    assert model.backend_name == "tvm@q4f16_1"


@pytest.mark.parametrize("scheme", ["fp16i8", "q4f16_1"])
@pytest.mark.parametrize("name", ["rwkv5_2-L4-C128-H2.pth", "rwkv4-L2-C64.pth", "rwkv5_2-L2-C144-H12.pth"])
def test_compiled_matches_the_reference_with_the_same_codes(name: str, scheme: str, tmp_path: Path,
                                                          compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / name)
    # Same codes on both sides, so quantisation error is shared: the fp16 tolerances judge what is
    # left (summation order, fp16 rounding), in the propagated run and layer by layer (isolated).
    outcome = run_parity(ck, backends=[f"reference@{scheme}", f"tvm@{scheme}"], plan=PLAN, dump_dir=tmp_path / "d",
                         cache_dir=compile_cache, mode="both", in_process=True)
    result = outcome.result
    assert result["verdict"] == "no divergence", result["first_divergence"]
    own = result["own_error"]
    assert own["method"] == "isolated" and own["failed"] == 0 and own["worst_ratio"] < 1.0
    assert DumpReader(outcome.dumps[f"tvm@{scheme}"]).extra["weights"] == ("int8" if scheme == "fp16i8" else "q4")


@pytest.mark.parametrize("scheme", ["fp16i8", "q4f16_1"])
def test_isolated_against_the_fp32_yardstick_is_judged_with_the_same_codes(scheme: str, tmp_path: Path,
                                                                          compile_cache: Path) -> None:
    # The fp32 reference is the yardstick; the quantised build's isolated layers are judged by the
    # reference in the build's dtype *and* codes, run on the yardstick's inputs. Judged by an
    # unquantised reference, tvm@fp16i8's quantisation was its "own error" (divergence at L0.att.wkv).
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth")
    result = run_parity(ck, backends=["reference", f"tvm@{scheme}"], plan=PLAN, dump_dir=tmp_path / "d",
                        cache_dir=compile_cache, mode="isolated", in_process=True).result
    assert result["verdict"] == "no divergence", result["first_divergence"]
    own = result["own_error"]
    assert own["method"] == "isolated" and own["worst_ratio"] < 1.0
    assert "weights" in own["judge"] and own["judge"].startswith("reference@float16")


def test_against_fp32_the_drift_is_not_judged_and_the_kernel_is(tmp_path: Path, compile_cache: Path) -> None:
    # Quantised vs the fp32 reference: the drift envelope covers rounding, not quantisation (q4 on
    # this fixture drifts to ~6x it), so the drift is reported "not judged"; the verdict is the
    # replay's (same codes), which a wrong group or scale fails (parity selftest's quant zoo).
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth")
    result = run_parity(ck, backends=["reference", "tvm@q4f16_1"], plan=PLAN, dump_dir=tmp_path / "d",
                        cache_dir=compile_cache, in_process=True).result
    assert result["verdict"] == "no divergence", result["first_divergence"]
    assert result["drift"]["status"] == "not judged" and "quantised" in result["drift"]["not_judged"]
    assert result["drift"]["envelope_fraction"] > 1  # what the fixed envelope would have called a finding
    assert result["own_error"]["method"] == "replay" and result["own_error"]["worst_ratio"] < 1


@pytest.mark.parametrize("scheme", ["fp16i8", "q4f16_1"])
def test_end_to_end_against_fp32_is_the_quantisation_s_own(scheme: str, tmp_path: Path, compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth")
    dumps = {s: make_backend(s, ck, cache_dir=compile_cache).dump(PLAN, path=tmp_path / s)
             for s in ("reference", f"reference@{scheme}", f"tvm@{scheme}")}

    def logits(spec):
        reader = DumpReader(dumps[spec])
        return np.concatenate([reader.read_stage(i, "logits") for i in range(1 + len(PLAN.decode_ids))])

    def kl_rows(p, q):
        lp = p - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True)) - p.max(-1, keepdims=True)
        lq = q - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q.max(-1, keepdims=True)
        return (np.exp(lp) * (lp - lq)).sum(-1)

    fp32 = logits("reference").astype(np.float64)
    compiled = kl_rows(fp32, logits(f"tvm@{scheme}").astype(np.float64))
    reference = kl_rows(fp32, logits(f"reference@{scheme}").astype(np.float64))
    # What the compiled variant loses against fp32 is what the quantised reference loses (the codes
    # are the same): its KL per row within 10% (+1e-6 for fp16's own rounding) of the reference's.
    # A kernel applying other weights (a wrong scale, group or offset) moves far past that.
    assert np.all(np.abs(compiled - reference) <= 0.1 * reference + 1e-6), (compiled, reference)
    assert reference.max() > 0  # lossy: the quantised logits are not fp32's


def test_a_quantised_tvm_dump_is_replayed_with_the_same_codes(tmp_path: Path, compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L4-C128-H2.pth")
    dump = make_backend("tvm@q4f16_1", ck, cache_dir=compile_cache).dump(PLAN, path=tmp_path / "q4")
    replay = ReplayBackend(ck, candidate_dump=dump)
    assert replay.model.weights_format == "q4" and replay.model.dtype_name == "float16"
    # The isolated judge replays the yardstick's (unquantised) dump with the build's format.
    plain = make_backend("reference@fp16", ck).dump(PLAN, path=tmp_path / "fp16")
    assert ReplayBackend(ck, candidate_dump=plain, weights="int8").model.weights_format == "int8"
    # ... and a plain build judged on a quantised yardstick's inputs gets unquantised weights.
    assert ReplayBackend(ck, candidate_dump=dump, weights=None).model.weights_format is None


@pytest.mark.parametrize(("spec", "want", "weights"), [
    ("tvm@fp16i8", ("tvm", "float16"), "int8"), ("tvm@fp32i8", ("tvm", "float32"), "int8"),
    ("tvm@q4f16_1", ("tvm", "float16"), "q4"), ("reference@q4f16_1", ("reference", "float16"), "q4"),
    ("tvm@fp16", ("tvm", "float16"), None), ("tvm", ("tvm", None), None),
])
def test_quant_spec_words(spec: str, want, weights) -> None:
    check_backend_spec(spec)
    assert split_dtype(spec) == want and spec_weights(spec) == weights


@pytest.mark.parametrize(("spec", "message"), [
    ("chatrwkv@q4f16_1", "q4f16_1 weights are built for reference, tvm"),
    ("hf@fp16i8", "int8 weights are built for reference, chatrwkv, tvm"),
    ("tvm@q4f16_0", "unknown dtype 'q4f16_0'"),
    ("tvm@int4", "unknown dtype 'int4'"),
])
def test_bad_quant_spec_words_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(ParityError, match=message) as e:
        check_backend_spec(spec)
    assert "\n" not in str(e.value)


def test_unknown_scheme_is_refused_by_the_build(compile_cache: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv4-L2-C64.pth")
    with pytest.raises(ParityError, match="no compiled model in 'q4f32_1'"):
        build_model(ck.config, variant="debug", cache_dir=compile_cache, dtype="q4f32_1")


def _run_kernel(fn, inputs: list[np.ndarray]) -> np.ndarray:
    """Compile one dequantisation TE function alone (llvm) and run it on ``inputs``."""
    import tvm
    from tvm import te

    placeholders = [te.placeholder(a.shape, str(a.dtype), name=f"in{i}") for i, a in enumerate(inputs)]
    out = fn(*placeholders)
    lib = tvm.compile(te.create_prim_func([*placeholders, out]), target="llvm")
    dev = tvm.cpu()
    result = tvm.runtime.empty([int(s) for s in out.shape], out.dtype, dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in inputs], result)
    return result.numpy()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_compiled_int8_dequantisation_equals_the_reference_s_bit_for_bit(dtype: str) -> None:
    import torch

    from parity.compiled.common import dequant_int8
    from parity.compiled.runtime import quantized_parts
    from parity.reference import int8

    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))  # (out, in): both offsets' branches differ
    parts = quantized_parts(w, weights="int8", dtype=dtype)
    got = _run_kernel(dequant_int8, [parts[k] for k in ("q", "mx", "rx", "my", "ry")])
    want = int8.dequantize(int8.quantize(w), dtype=getattr(torch, dtype)).numpy()
    # The same operations in the same order, each rounded to the dtype: identical weights, so the
    # compiled matmul and the reference's multiply the same numbers.
    np.testing.assert_array_equal(got, want)


def test_compiled_q4_dequantisation_equals_the_reference_s_bit_for_bit() -> None:
    import torch

    from parity.compiled.common import dequant_q4
    from parity.compiled.runtime import quantized_parts
    from parity.reference import q4

    w = torch.randn(24, 144, generator=torch.Generator().manual_seed(3))  # 144 = 4.5 groups: a partial one
    parts = quantized_parts(w, weights="q4", dtype="float16")
    got = _run_kernel(lambda q, s: dequant_q4(q, s, in_features=144), [parts["q"], parts["scale"]])
    want = q4.dequantize(q4.quantize(w), in_features=144).numpy()
    np.testing.assert_array_equal(got, want)
