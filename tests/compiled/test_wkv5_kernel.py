"""The wkv5 TIR scan kernel on its own, against a float64 loop of the recurrence (docs/RWKV.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from parity.compiled.wkv5_kernel import wkv5

# (H, N): H != N, and H = N, where swapping the head and channel axes keeps every shape right.
SHAPES = [(2, 4), (3, 5), (4, 4)]


@pytest.fixture(scope="module")
def kernel():
    # The kernel is private (it is meant to be called from the Relax graph); building it alone
    # needs a public symbol.
    lib = tvm.compile(tvm.IRModule({"main": wkv5.with_attr("global_symbol", "main")}), target="llvm")
    return lib["main"]


def wkv5_float64(r, k, v, w, u, state):
    """The recurrence as written in docs/RWKV.md §2, one scalar at a time, in float64."""
    r, k, v, w, u, s = (np.asarray(a, dtype=np.float64) for a in (r, k, v, w, u, state))
    s = s.copy()
    T, H, N = r.shape
    out = np.zeros((T, H, N))
    for t in range(T):
        for h in range(H):
            for j in range(N):
                out[t, h, j] = sum(r[t, h, i] * (u[h, i] * k[t, h, i] * v[t, h, j] + s[h, i, j]) for i in range(N))
            for i in range(N):
                for j in range(N):
                    s[h, i, j] = k[t, h, i] * v[t, h, j] + w[h, i] * s[h, i, j]
    return out, s


def make_inputs(*, T: int, H: int, N: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return {
        "r": rng.standard_normal((T, H, N)).astype(f32),
        "k": rng.standard_normal((T, H, N)).astype(f32),
        "v": rng.standard_normal((T, H, N)).astype(f32),
        # Realistic decays, w = exp(-exp(time_decay)) with time_decay in [-6, -1]: 0.69 ... 0.998.
        "w": np.exp(-np.exp(rng.uniform(-6, -1, (H, N)))).astype(f32),
        "u": rng.standard_normal((H, N)).astype(f32),
        # A non-zero incoming state, so the kernel must read it rather than assume zeros.
        "state": rng.standard_normal((H, N, N)).astype(f32),
    }


def run_kernel(kernel, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (out, state_out, the input state buffer read back after the call)."""
    dev = tvm.cpu()
    T, H, N = inputs["r"].shape
    args = [tvm.runtime.tensor(inputs[n], dev) for n in ("r", "k", "v", "w", "u", "state")]
    # Poisoned outputs: a row the kernel forgets to write shows up as NaN.
    out = tvm.runtime.tensor(np.full((T, H, N), np.nan, np.float32), dev)
    state_out = tvm.runtime.tensor(np.full((H, N, N), np.nan, np.float32), dev)
    kernel(*args, out, state_out)
    return out.numpy(), state_out.numpy(), args[5].numpy()


@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize(("H", "N"), SHAPES)
def test_matches_float64_recurrence(kernel, T: int, H: int, N: int) -> None:
    inputs = make_inputs(T=T, H=H, N=N, seed=100 * T + 10 * H + N)
    out, state_out, _ = run_kernel(kernel, inputs)
    want_out, want_state = wkv5_float64(**inputs)
    # fp32 sums of N <= 5 terms of size O(1..10) against float64: a few ulps.
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state_out, want_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("H", "N"), SHAPES)
def test_input_state_is_not_written(kernel, H: int, N: int) -> None:
    inputs = make_inputs(T=7, H=H, N=N, seed=1)
    before = inputs["state"].copy()
    _, state_out, state_after = run_kernel(kernel, inputs)
    assert np.array_equal(state_after, before)
    assert not np.array_equal(state_out, before)  # the scan did move the state


def test_same_call_twice_gives_the_same_result(kernel) -> None:
    inputs = make_inputs(T=7, H=2, N=4, seed=2)
    first = run_kernel(kernel, inputs)
    second = run_kernel(kernel, inputs)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


@pytest.mark.parametrize(("H", "N"), SHAPES)
def test_prefill_equals_chained_single_token_calls(kernel, H: int, N: int) -> None:
    T = 7
    inputs = make_inputs(T=T, H=H, N=N, seed=3)
    out, state_out, _ = run_kernel(kernel, inputs)

    state = inputs["state"]
    rows = []
    for t in range(T):
        step = {**inputs, "state": state, **{n: inputs[n][t : t + 1] for n in ("r", "k", "v")}}
        row, state, _ = run_kernel(kernel, step)
        rows.append(row)
    # One compiled loop nest, the same per-(h, j) order of operations whether t runs inside one
    # call or across calls: the results are bit-identical, not merely close.
    assert np.array_equal(np.concatenate(rows), out)
    assert np.array_equal(state, state_out)


def test_rows_after_the_first_see_the_carried_state(kernel) -> None:
    # The bug this project exists for: a scan that treats t as parallel is exact for row 0 and
    # wrong from row 1 on. Check that row 1 really depends on token 0 through the state.
    inputs = make_inputs(T=2, H=2, N=4, seed=4)
    out, _, _ = run_kernel(kernel, inputs)
    alone, _, _ = run_kernel(kernel, {**inputs, **{n: inputs[n][1:] for n in ("r", "k", "v")}})
    assert not np.allclose(out[1], alone[0], rtol=1e-3, atol=1e-3)
