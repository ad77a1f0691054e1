"""The wkv4 TIR scan kernel on its own, against a float64 loop of the stable recurrence (docs/RWKV.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from parity.compiled.wkv4_kernel import wkv4

A = 16  # channels; v4 channels are independent, so a few suffice
PP_INIT = -1e30  # a fresh state's "minus infinity", as the official package starts it


@pytest.fixture(scope="module")
def kernel():
    # The kernel is private (it is meant to be called from the Relax graph); building it alone
    # needs a public symbol.
    lib = tvm.compile(tvm.IRModule({"main": wkv4.with_attr("global_symbol", "main")}), target="llvm")
    return lib["main"]


def wkv4_float64(k, v, w, u, aa, bb, pp):
    """The stable recurrence as written in docs/RWKV.md §2, in float64, one token at a time."""
    k, v, w, u, aa, bb, pp = (np.asarray(a, dtype=np.float64) for a in (k, v, w, u, aa, bb, pp))
    out = np.zeros_like(k)
    for t in range(k.shape[0]):
        q = np.maximum(pp, u + k[t])
        e1, e2 = np.exp(pp - q), np.exp(u + k[t] - q)
        out[t] = (e1 * aa + e2 * v[t]) / (e1 * bb + e2)
        q = np.maximum(pp + w, k[t])
        e1, e2 = np.exp(pp + w - q), np.exp(k[t] - q)
        aa, bb, pp = e1 * aa + e2 * v[t], e1 * bb + e2, q
    return out, aa, bb, pp


def make_inputs(*, T: int, seed: int, k_offset: float = 0.0, fresh: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inputs = {
        "k": (rng.standard_normal((T, A)) + k_offset).astype(f32),
        "v": rng.standard_normal((T, A)).astype(f32),
        # w = -exp(time_decay), time_decay in [-5, 3] as the v4 init spreads it: -0.0067 ... -20.
        "w": -np.exp(rng.uniform(-5, 3, A)).astype(f32),
        "u": rng.uniform(-2, 1, A).astype(f32),
    }
    if fresh:
        inputs |= {"aa": np.zeros(A, f32), "bb": np.zeros(A, f32), "pp": np.full(A, PP_INIT, f32)}
    else:
        # A carried state: bb > 0 (a sum of exponentials), aa of either sign, pp of a few units.
        inputs |= {
            "aa": rng.standard_normal(A).astype(f32),
            "bb": rng.uniform(0.5, 3.0, A).astype(f32),
            "pp": rng.uniform(-3, 3, A).astype(f32),
        }
    return inputs


STATE = ("aa", "bb", "pp")


def run_kernel(kernel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """out, aa_out, bb_out, pp_out, and the input state buffers read back after the call."""
    dev = tvm.cpu()
    T = inputs["k"].shape[0]
    args = {n: tvm.runtime.tensor(inputs[n], dev) for n in ("k", "v", "w", "u", *STATE)}
    # Poisoned outputs: anything the kernel forgets to write shows up as NaN.
    outs = {"out": tvm.runtime.tensor(np.full((T, A), np.nan, np.float32), dev)}
    outs |= {f"{s}_out": tvm.runtime.tensor(np.full(A, np.nan, np.float32), dev) for s in STATE}
    kernel(*args.values(), *outs.values())
    result = {n: t.numpy() for n, t in outs.items()}
    result |= {f"{s}_in_after": args[s].numpy() for s in STATE}
    return result


def assert_matches_float64(got: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> None:
    out, aa, bb, pp = wkv4_float64(**inputs)
    # wkv is a weighted average of v (|v| <= ~4) with weights in (0, 1]: a few fp32 ulps per step.
    np.testing.assert_allclose(got["out"], out, rtol=1e-5, atol=1e-5)
    # aa, bb are sums of exponentials scaled by exp(-pp); pp is a max of fp32 sums (exact-ish).
    np.testing.assert_allclose(got["aa_out"], aa, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["bb_out"], bb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["pp_out"], pp, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-state", "carried-state"])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_matches_float64_recurrence(kernel, T: int, fresh: bool) -> None:
    inputs = make_inputs(T=T, seed=10 * T + fresh, fresh=fresh)
    got = run_kernel(kernel, inputs)
    assert_matches_float64(got, inputs)
    if fresh:
        # From (0, 0, -inf) the first token's wkv is exactly its own v: e1 = 0, e2 cancels.
        np.testing.assert_allclose(got["out"][0], inputs["v"][0], rtol=1e-6)


@pytest.mark.parametrize("k_offset", [30.0, 60.0, 100.0])
@pytest.mark.parametrize("T", [1, 9])
def test_large_k_stays_finite_and_exact(kernel, T: int, k_offset: float) -> None:
    inputs = make_inputs(T=T, seed=int(k_offset) + T, k_offset=k_offset)
    # The inputs really are in overflow territory for the naive form: exp(k) is inf in fp16
    # (above 11.09) for every offset, and in fp32 (above 88.7) for the largest.
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(inputs["k"].astype(np.float16))).all()
        if k_offset >= 100:
            assert np.isinf(np.exp(inputs["k"])).all()
    got = run_kernel(kernel, inputs)
    for name in ("out", "aa_out", "bb_out", "pp_out"):
        assert np.isfinite(got[name]).all(), name
    assert_matches_float64(got, inputs)
    # The max exponent tracks k: the state is carried at scale exp(pp), not exp(0).
    assert got["pp_out"].min() > k_offset - 10


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-state", "carried-state"])
def test_input_state_is_not_written(kernel, fresh: bool) -> None:
    inputs = make_inputs(T=9, seed=1, fresh=fresh)
    got = run_kernel(kernel, inputs)
    for s in STATE:
        assert np.array_equal(got[f"{s}_in_after"], inputs[s]), s
        assert not np.array_equal(got[f"{s}_out"], inputs[s]), f"the scan did not move {s}"


@pytest.mark.parametrize("k_offset", [0.0, 60.0])
def test_prefill_equals_chained_single_token_calls(kernel, k_offset: float) -> None:
    T = 9
    inputs = make_inputs(T=T, seed=3, k_offset=k_offset, fresh=True)
    whole = run_kernel(kernel, inputs)

    state = {s: inputs[s] for s in STATE}
    rows = []
    for t in range(T):
        got = run_kernel(kernel, {**inputs, **state, "k": inputs["k"][t : t + 1], "v": inputs["v"][t : t + 1]})
        rows.append(got["out"])
        state = {s: got[f"{s}_out"] for s in STATE}
    # One compiled loop nest, the same per-channel order of operations whether t runs inside one
    # call or across calls: the results are bit-identical, not merely close.
    assert np.array_equal(np.concatenate(rows), whole["out"])
    for s in STATE:
        assert np.array_equal(state[s], whole[f"{s}_out"]), s


def test_rows_after_the_first_see_the_carried_state(kernel) -> None:
    # A scan that treats t as parallel is exact for row 0 and wrong from row 1 on: check that
    # row 1 really depends on token 0 through the state.
    inputs = make_inputs(T=2, seed=4, fresh=True)
    both = run_kernel(kernel, inputs)
    alone = run_kernel(kernel, {**inputs, "k": inputs["k"][1:], "v": inputs["v"][1:]})
    assert not np.allclose(both["out"][1], alone["out"][0], rtol=1e-3, atol=1e-3)
