"""The CPU matmul schedule (parity/compiled/schedule_cpu.py) on single NT_matmul functions.

The oracle is an fp32 emulation in numpy of the summation order the schedule promises: LANES
partial sums, each over k in order, then summed lane 0 to LANES - 1, every product and every sum
rounded to fp32 (no FMA: the llvm target has none). Matching it bit for bit checks the order and
that LLVM contracted nothing; matching it for every T checks that token tiles and their padding
never change what a row computes, which is what lets a prefill row and a decode step agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from parity.compiled.build import make_target
from parity.compiled.schedule_cpu import LANES, OUT_TILE, TOKEN_TILE, schedule_cpu_matmuls, schedule_matmul


def nt_matmul(n_out: int, k_in: int, *, tokens: int | None = None) -> tirx.PrimFunc:
    """out[t, n] = sum_k x[t, k] * W[n, k] as FuseTransposeMatmul leaves a Linear; T symbolic unless given."""
    t = tirx.Var("seq_len", "int64") if tokens is None else tirx.IntImm("int64", tokens)
    N, K = tirx.IntImm("int64", n_out), tirx.IntImm("int64", k_in)
    x = te.placeholder((t, K), "float32", name="x")
    w = te.placeholder((N, K), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    out = te.compute((t, N), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="NT_matmul")
    return te.create_prim_func([x, w, out]).with_attr("tirx.noalias", True)


def lane_order_fp32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The schedule's summation order, in fp32 with every operation rounded."""
    T, K = x.shape
    prods = (x[:, None, :] * w[None, :, :]).astype(np.float32)  # (T, N, K), each product rounded
    lanes = np.zeros(prods.shape[:2] + (LANES,), np.float32)
    for ko in range(K // LANES):
        lanes = (lanes + prods[:, :, ko * LANES:(ko + 1) * LANES]).astype(np.float32)
    total = np.zeros(prods.shape[:2], np.float32)
    for lane in range(LANES):
        total = (total + lanes[:, :, lane]).astype(np.float32)
    return total


def run(func: tirx.PrimFunc, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func}), target=make_target("llvm"))
    out = tvm.runtime.tensor(np.zeros((x.shape[0], w.shape[0]), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    return out.numpy()


@pytest.fixture(scope="module")
def operands() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    # N = 36: a multiple of OUT_TILE; K = 96: a multiple of LANES with 12 steps per lane.
    return rng.standard_normal((7, 96)).astype(np.float32), rng.standard_normal((36, 96)).astype(np.float32)


@pytest.fixture(scope="module")
def prefill(operands) -> tvm.runtime.Module:
    _, w = operands
    scheduled = schedule_matmul(nt_matmul(*w.shape))
    assert scheduled is not None
    return tvm.compile(tvm.IRModule({"main": scheduled}), target=make_target("llvm"))


@pytest.mark.parametrize("tokens", [2, 3, 7])  # a whole token tile, one and a half, and odd
def test_prefill_rows_follow_the_lane_order_bit_for_bit(prefill, operands, tokens: int) -> None:
    assert TOKEN_TILE == 2  # (3 and 7 then leave a partial tile: the padded rows)
    x, w = operands
    x = x[:tokens]
    out = tvm.runtime.tensor(np.zeros((tokens, w.shape[0]), np.float32))
    prefill["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_array_equal(out.numpy(), lane_order_fp32(x, w))


@pytest.mark.parametrize("k_in", [96, 88])  # 12 lane steps (unrolled in pairs) and 11 (not)
def test_decode_step_follows_the_same_order(operands, k_in: int) -> None:
    x, w = (a[:, :k_in] for a in operands)  # 36 outputs: not a whole GEMV tile, so a narrower one
    scheduled = schedule_matmul(nt_matmul(*w.shape, tokens=1))
    np.testing.assert_array_equal(run(scheduled, x[3:4], w), lane_order_fp32(x[3:4], w))


def test_outputs_not_a_multiple_of_the_tile(operands) -> None:
    x, w = operands
    w = w[: OUT_TILE * 8 + 2]
    scheduled = schedule_matmul(nt_matmul(*w.shape))
    np.testing.assert_array_equal(run(scheduled, x, w), lane_order_fp32(x, w))


def test_lane_order_is_close_to_the_exact_product() -> None:
    """The oracle itself against float64: the fp32 error of a K-term sum, at most K * eps * sum|x*w|
    (Higham's bound for recursive summation, with room for the product rounding)."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal((5, 64)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    bound = 64 * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)
    assert np.all(np.abs(lane_order_fp32(x, w) - exact) <= bound)


def test_what_is_not_a_matmul_is_left_alone() -> None:
    x = te.placeholder((tirx.IntImm("int64", 4), tirx.IntImm("int64", 16)), "float32", name="x")
    relu = te.compute(x.shape, lambda i, j: tirx.max(x[i, j], tirx.const(0, "float32")), name="relu")
    assert schedule_matmul(te.create_prim_func([x, relu])) is None
    assert schedule_matmul(nt_matmul(8, LANES * 2 + 1)) is None  # k not a whole number of lanes


def test_the_pass_schedules_matmuls_and_skips_scheduled_functions() -> None:
    mod = tvm.IRModule({
        "mm": nt_matmul(8, 32),
        "done": nt_matmul(8, 32).with_attr("tirx.is_scheduled", True),
    })
    out = schedule_cpu_matmuls(mod)
    assert out["mm"].attrs["tirx.is_scheduled"]
    assert out["done"].same_as(mod["done"])  # left as it was, not rescheduled


def test_every_linear_of_a_model_is_scheduled(checkpoint) -> None:
    """The pass finds the model's matmuls by their block name: a model change that renamed them
    would leave every Linear unscheduled (32x slower) and nothing else would fail."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from parity.compiled.build import model_for

    model = model_for(checkpoint.config, debug=False)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    target = make_target("llvm")
    with target:
        mod = relax.transform.FuseTransposeMatmul()(mod)
        mod = tvm.transform.Sequential([*cpu.library_dispatch_passes(target), *cpu.legalize_passes(target)])(mod)

    def matmuls(module: tvm.IRModule) -> set[str]:
        return {gv.name_hint for gv, f in module.functions.items()
                if isinstance(f, tirx.PrimFunc) and "NT_matmul" in f.script()}

    before = matmuls(mod)
    # Distinct functions, one per shape and epilogue (the layers share them): at least the
    # C x C time-mix Linears, the FFN's C x F and F x C, and the head.
    assert len(before) >= 4
    after = schedule_cpu_matmuls(mod)
    unscheduled = [name for name in before if not after[name].attrs.get("tirx.is_scheduled")]
    assert not unscheduled
