"""Naming kernel calls by rules: sure names only, everything else kept as kernel.<n>.<symbol>."""

from __future__ import annotations

import numpy as np
import pytest

from parity.capture import CallNamer, KernelCall, Rule, drop_batch, flatten_heads, hvk_to_hkv, layers
from parity.errors import ParityError


def call(index: int, symbol: str, *shapes: tuple[int, ...]) -> KernelCall:
    # Each output holds its call index, so a test can tell which call a name landed on.
    return KernelCall(index=index, symbol=symbol, outputs=tuple(np.full(s, float(index), np.float32) for s in shapes))


# A 2-layer build: ln0, then per layer ln1, the wkv (2 outputs), ln2, and a fused kernel; then ln_out.
CALLS = [
    call(0, "layer_norm", (1, 3, 8)),
    call(1, "layer_norm1", (1, 3, 8)),
    call(2, "wkv5_hvk", (1, 3, 2, 4), (1, 2, 4, 4)),
    call(3, "layer_norm1", (1, 3, 8)),
    call(4, "fused_matmul_add", (1, 3, 8)),
    call(5, "layer_norm1", (1, 3, 8)),
    call(6, "wkv5_hvk", (1, 3, 2, 4), (1, 2, 4, 4)),
    call(7, "layer_norm1", (1, 3, 8)),
    call(8, "fused_matmul_add", (1, 3, 8)),
    call(9, "layer_norm", (1, 1, 8)),
]


def test_layers_expands_templates_layer_by_layer() -> None:
    assert layers(2, "L{l}.a", ("L{l}.b", None), None) == ["L0.a", ("L0.b", None), None, "L1.a", ("L1.b", None), None]


def test_rules_name_by_pattern_order_and_output() -> None:
    namer = CallNamer([
        Rule("layer_norm*", ["emb", *layers(2, "L{l}.att.ln1", "L{l}.ffn.ln2"), "ln_out"], adapt=drop_batch),
        Rule("wkv*", layers(2, ("L{l}.att.wkv", "state.L{l}.att_kv")), adapt=drop_batch),
    ], adapt={"L*.att.wkv": flatten_heads, "state.*.att_kv": hvk_to_hkv})
    out = namer(CALLS)
    assert not namer.notes
    # Call order within the layer gives the names; each value is the call's own output.
    expected = {"emb": 0, "L0.att.ln1": 1, "L0.att.wkv": 2, "state.L0.att_kv": 2, "L0.ffn.ln2": 3,
                "L1.att.ln1": 5, "L1.att.wkv": 6, "state.L1.att_kv": 6, "L1.ffn.ln2": 7, "ln_out": 9}
    for name, index in expected.items():
        assert float(out[name].flat[0]) == index, name
    # Adapters: the batch axis dropped everywhere, heads flattened for wkv, the state transposed.
    assert out["emb"].shape == (3, 8) and out["ln_out"].shape == (1, 8)
    assert out["L0.att.wkv"].shape == (3, 8) and out["state.L0.att_kv"].shape == (2, 4, 4)
    # What no rule names is kept under its kernel name, never dropped.
    assert sorted(n for n in out if n.startswith("kernel.")) == ["kernel.004.fused_matmul_add", "kernel.008.fused_matmul_add"]


def test_a_rule_whose_count_does_not_add_up_names_nothing() -> None:
    # Three names for two wkv calls: the rule does not describe this build, so no guessing.
    namer = CallNamer([Rule("wkv*", layers(3, ("L{l}.att.wkv", None)))])
    out = namer(CALLS)
    assert namer.notes == ["rule 'wkv*': 2 matching calls for 3 names; left as kernel.*"]
    assert "kernel.002.wkv5_hvk" in out and "kernel.002.wkv5_hvk.out1" in out and "L0.att.wkv" not in out
    with pytest.raises(ParityError, match="2 matching calls for 3 names; fix the rule"):
        CallNamer([Rule("wkv*", layers(3, ("L{l}.att.wkv", None)))], strict=True)(CALLS)


def test_shape_picks_calls_and_earlier_rules_claim_first() -> None:
    namer = CallNamer([
        Rule("layer_norm*", ["ln_out"], shape=(1, 1, None)),  # the one call on a single row
        Rule("layer_norm*", ["emb", *layers(2, "L{l}.att.ln1", "L{l}.ffn.ln2")]),  # the 5 left
    ])
    out = namer(CALLS)
    assert float(out["ln_out"].flat[0]) == 9 and float(out["emb"].flat[0]) == 0 and not namer.notes
    predicate = CallNamer([Rule("layer_norm*", ["ln_out"], shape=lambda s: s[1] == 1)])
    assert float(predicate(CALLS)["ln_out"].flat[0]) == 9


def test_a_stage_named_twice_is_refused() -> None:
    with pytest.raises(ParityError, match="'emb' is named by two kernel calls"):
        CallNamer([Rule("layer_norm", ["emb", "emb"])])(CALLS)


def test_naming_an_output_that_was_not_recorded_says_how_to_record_it() -> None:
    one_output = [call(0, "wkv5_hvk", (1, 3, 2, 4))]
    with pytest.raises(ParityError, match=r"outputs=\{'wkv5_hvk': n\}"):
        CallNamer([Rule("wkv*", [("L0.att.wkv", "state.L0.att_kv")])])(one_output)


def test_a_rule_may_match_by_regular_expression_or_several_patterns() -> None:
    import re

    calls = [call(0, "fused_matmul4_add3", (1, 3, 8)), call(1, "fused_matmul4_tir_sigmoid1_multiply8_add3", (1, 3, 8)),
             call(2, "fused_matmul_add", (1, 1, 8))]
    # A regex is matched in full: the sigmoid kernel, which also ends in _add3, is not picked.
    out = CallNamer([Rule(re.compile(r"fused_matmul\d*_add\d*"), ["a", "b"])])(calls)
    assert float(out["a"].flat[0]) == 0 and float(out["b"].flat[0]) == 2
    either = CallNamer([Rule(("fused_matmul4_add3", "*sigmoid*"), ["a", "b"])])(calls)
    assert float(either["a"].flat[0]) == 0 and float(either["b"].flat[0]) == 1
