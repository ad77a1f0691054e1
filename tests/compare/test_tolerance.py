import json

import pytest

from parity.compare.tolerance import DEFAULT_TOLERANCES, Tolerance, TolerancePolicy, parse_override
from parity.errors import ParityError


def test_defaults_match_torch_testing():
    assert (DEFAULT_TOLERANCES["float32"].rtol, DEFAULT_TOLERANCES["float32"].atol) == (1.3e-6, 1e-5)
    assert (DEFAULT_TOLERANCES["float16"].rtol, DEFAULT_TOLERANCES["float16"].atol) == (1e-3, 1e-5)
    assert (DEFAULT_TOLERANCES["bfloat16"].rtol, DEFAULT_TOLERANCES["bfloat16"].atol) == (1.6e-2, 1e-5)
    assert (DEFAULT_TOLERANCES["float64"].rtol, DEFAULT_TOLERANCES["float64"].atol) == (1e-7, 1e-7)
    assert all(t.reason for t in DEFAULT_TOLERANCES.values())


def test_unknown_dtype_raises():
    with pytest.raises(ParityError, match="int8"):
        TolerancePolicy.for_dtype("int8")


def test_dtype_alias_is_normalised():
    assert TolerancePolicy.for_dtype("bf16").dtype == "bfloat16"


def test_for_stage_without_override_is_dtype_default():
    policy = TolerancePolicy.for_dtype("float16")
    assert policy.for_stage("L3.att.wkv") == DEFAULT_TOLERANCES["float16"]


def test_overrides_apply_by_pattern_and_first_match_wins():
    narrow = Tolerance(rtol=1e-2, atol=1e-2, reason="narrow")
    broad = Tolerance(rtol=1e-4, atol=1e-4, reason="broad")
    state = Tolerance(rtol=0.0, atol=1e-3, reason="state")
    policy = TolerancePolicy.for_dtype(
        "float32", overrides={"L0.att.wkv": narrow, "L*.att.wkv": broad, "state.*.att_kv": state}
    )
    assert policy.for_stage("L0.att.wkv") is narrow
    assert policy.for_stage("L12.att.wkv") is broad
    assert policy.for_stage("state.L5.att_kv") is state
    assert policy.for_stage("L12.att.k") == DEFAULT_TOLERANCES["float32"]
    # Case matters: stage names are canonical, "l0.att.wkv" is not one.
    assert policy.for_stage("l0.att.wkv") == DEFAULT_TOLERANCES["float32"]


def test_insertion_order_not_specificity_decides():
    broad = Tolerance(rtol=1e-4, atol=1e-4, reason="broad")
    narrow = Tolerance(rtol=1e-2, atol=1e-2, reason="narrow")
    policy = TolerancePolicy.for_dtype("float32", overrides=[("L*", broad), ("L0.att.wkv", narrow)])
    assert policy.for_stage("L0.att.wkv") is broad


def test_policy_dict_round_trip_keeps_order():
    policy = TolerancePolicy.for_dtype(
        "float16",
        overrides=[parse_override("L*.att.wkv=1e-5,1e-4"), parse_override("logits=0.01,0")],
    )
    d = json.loads(json.dumps(policy.to_dict(), allow_nan=False))
    assert [o["pattern"] for o in d["overrides"]] == ["L*.att.wkv", "logits"]
    assert d["default"]["rtol"] == 1e-3
    again = TolerancePolicy.from_dict(d)
    assert again == policy
    assert list(again.overrides) == ["L*.att.wkv", "logits"]


def test_parse_override():
    pattern, tol = parse_override(" L*.att.wkv = 1e-5 , 1e-4 ")
    assert pattern == "L*.att.wkv"
    assert (tol.rtol, tol.atol) == (1e-5, 1e-4)
    assert "L*.att.wkv" in tol.reason


@pytest.mark.parametrize(
    "text",
    ["logits", "=1e-3,1e-5", "logits=1e-3", "logits=1e-3,1e-5,1,2", "logits=abc,1e-5", "logits=-1,0",
     "logits=nan,0", "logits=1e-3,inf", ""],
)
def test_parse_override_rejects_bad_text(text):
    with pytest.raises(ParityError, match="PATTERN=RTOL,ATOL|must be finite"):
        parse_override(text)


def test_tolerance_rejects_negative():
    with pytest.raises(ParityError):
        Tolerance(rtol=-1e-3, atol=0.0, reason="x")


def test_from_dict_rejects_missing_keys():
    with pytest.raises(ParityError):
        TolerancePolicy.from_dict({"overrides": []})
    with pytest.raises(ParityError):
        TolerancePolicy.from_dict({"dtype": "float32", "overrides": [{"pattern": "x", "rtol": 1.0}]})
