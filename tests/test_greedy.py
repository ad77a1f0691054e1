"""Greedy decoding per backend: equal tokens on correct backends, the right step for a mutant."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.errors import ParityError
from parity.greedy import FLIP_ATOL, ReferenceStepper, Stepper, decode_run, greedy_compare, run_greedy, top2_margins
from parity.reference.rwkv5 import RWKV5Reference
from parity.scenarios import Scenario, scenario_plan

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv5_2-L4-C128-H2.pth"
PROMPT = [1] * 10


@pytest.fixture(scope="session")
def ck() -> Checkpoint:
    return load_checkpoint(FIXTURE)


class BiasedReference(RWKV5Reference):
    """A broken port: from greedy step ``from_step`` on, one vocabulary entry gets a large bias."""

    def __init__(self, checkpoint, *, token: int, from_step: int, bias: float = 1e3):
        super().__init__(checkpoint)
        self.token, self.from_step, self.bias = token, from_step, bias
        self.calls = 0

    def zero_state(self):  # a new run starts from the zero state: count greedy steps from here
        self.calls = 0
        return super().zero_state()

    def forward(self, ids, state=None, *, record=None):
        # The bias is on the logits the port records and returns alike: what every backend reports.
        active = self.calls >= self.from_step
        self.calls += 1

        def biased(stage, value):
            if stage == "logits" and active:
                value = value.clone()
                value[:, self.token] += self.bias
            if record is not None:
                record(stage, value)

        logits, new_state = super().forward(ids, state, record=biased)
        if active:
            logits = logits.clone()
            logits[:, self.token] += self.bias
        return logits, new_state


class ScriptedStepper:
    """Logits from a table: row k of ``table`` after k steps, whatever ids are fed."""

    def __init__(self, table: np.ndarray, *, name: str):
        self.name, self.table, self.k = name, table, 0
        self.fed: list[list[int]] = []

    def reset(self) -> None:
        self.k, self.fed = 0, []

    def step(self, ids) -> np.ndarray:
        self.fed.append(list(ids))
        row = self.table[self.k]
        self.k += 1
        return row


def _table(tokens: list[int], *, vocab: int = 1024, margin: float = 1.0) -> np.ndarray:
    table = np.zeros((len(tokens), vocab), np.float32)
    for k, t in enumerate(tokens):
        table[k, t] = margin
    return table


# -- the real backends -----------------------------------------------------------------------------
def test_reference_and_tvm_choose_the_same_tokens(ck, compile_cache):
    result = greedy_compare(ck, backends=["reference", "tvm"], prompt_ids=PROMPT, steps=8, cache_dir=compile_cache)
    ref, tvm = result["backends"]["reference"]["tokens"], result["backends"]["tvm"]["tokens"]
    assert len(ref) == 8 and ref == tvm
    assert result["first_token_divergence"] is None
    (cmp,) = result["comparisons"]
    assert cmp["tokens_equal"] and len(cmp["teacher_forced_max_abs"]) == 8
    # fp32 rounding may differ, but only a little (and may not at all: equal logits are no failure).
    assert cmp["max_abs"] < 1e-3
    assert len(result["margins"]) == 8 and all(m > 0 for m in result["margins"])
    json.dumps(result, allow_nan=False)


def test_official_package_agrees(ck, compile_cache):
    result = greedy_compare(ck, backends=["reference", "chatrwkv"], prompt_ids=PROMPT, steps=4)
    assert result["backends"]["chatrwkv"]["tokens"] == result["backends"]["reference"]["tokens"]
    assert result["comparisons"][0]["max_abs"] < 1e-3


def test_mutant_diverges_at_the_biased_step(ck, compile_cache):
    clean, _ = decode_run(ReferenceStepper(ck), prompt_ids=PROMPT, steps=6)
    target = (clean[3] + 1) % ck.config.vocab_size  # any token the clean model does not pick at step 3
    mutant = ReferenceStepper(ck, model=BiasedReference(ck, token=target, from_step=3), name="mutant")
    result = greedy_compare(ck, backends=["tvm", "reference", mutant], prompt_ids=PROMPT, steps=6, cache_dir=compile_cache)

    fd = result["first_token_divergence"]
    assert fd["step"] == 3 and fd["expected"] == "tvm" and fd["actual"] == "mutant"
    assert fd["expected_token"] == clean[3] and fd["actual_token"] == target
    assert fd["near_tie"] is False and "real divergence" in fd["explanation"]
    assert result["backends"]["mutant"]["tokens"][:3] == clean[:3]
    by_actual = {c["actual"]: c for c in result["comparisons"]}
    assert by_actual["reference"]["tokens_equal"] and by_actual["reference"]["first_token_divergence"] is None
    # Teacher-forced on tvm's tokens: clean before step 3, the bias itself from then on.
    drift = by_actual["mutant"]["teacher_forced_max_abs"]
    assert max(drift[:3]) < 1e-3 and min(drift[3:]) > 900
    json.dumps(result, allow_nan=False)


def test_equal_tokens_cannot_hide_drift(ck):
    # A small bias on the least likely token changes no choice, but the drift shows it.
    never = int(np.argmin(decode_run(ReferenceStepper(ck), prompt_ids=PROMPT, steps=1)[1][0]))
    mutant = ReferenceStepper(ck, model=BiasedReference(ck, token=never, from_step=2, bias=0.01), name="mutant")
    result = greedy_compare(ck, backends=["reference", mutant], prompt_ids=PROMPT, steps=4)
    cmp = result["comparisons"][0]
    assert cmp["tokens_equal"] and result["first_token_divergence"] is None
    assert cmp["teacher_forced_max_abs"][:2] == [0.0, 0.0]
    assert cmp["teacher_forced_max_abs"][2:] == pytest.approx([0.01, 0.01], rel=1e-3)


def test_run_greedy_from_a_scenario_plan(ck, compile_cache):
    _, info = scenario_plan(Scenario(name="t", text="Hi there", greedy_steps=3), vocab_size=ck.config.vocab_size)
    result = run_greedy(ck, backends=["reference", "tvm-instrumented"], info=info, cache_dir=compile_cache)
    assert result["prompt_ids"] == info["model_ids"] and result["steps"] == 3
    assert result["vocab_folded"] is info["vocab_folded"] is True
    assert result["warnings"] and "vocab folded" in result["warnings"][0]
    assert all(b["text"] is None for b in result["backends"].values())  # folded ids do not decode to the text
    assert run_greedy(ck, backends=["reference", "tvm"], info={**info, "greedy_steps": 0}) is None


# -- the comparison logic, on scripted steppers ----------------------------------------------------
def test_steppers_satisfy_the_protocol(ck):
    assert isinstance(ScriptedStepper(_table([1]), name="a"), Stepper)
    assert isinstance(ReferenceStepper(ck), Stepper)
    assert not isinstance(object(), Stepper)


def test_each_backend_feeds_back_its_own_argmax(ck):
    a = ScriptedStepper(_table([5, 6, 7]), name="a")
    b = ScriptedStepper(_table([5, 9, 7]), name="b")
    result = greedy_compare(ck, backends=[a, b], prompt_ids=[1, 2], steps=3)
    assert result["backends"]["a"]["tokens"] == [5, 6, 7] and result["backends"]["b"]["tokens"] == [5, 9, 7]
    fd = result["first_token_divergence"]
    assert (fd["step"], fd["expected_token"], fd["actual_token"]) == (1, 6, 9)
    # b's last run was teacher-forced on a's tokens: prompt, then a's 5 and 6 (never its own 9).
    assert b.fed == [[1, 2], [5], [6]]
    assert result["comparisons"][0]["teacher_forced_max_abs"] == [0.0, 1.0, 0.0]


def test_near_tie_is_labelled(ck):
    table_a = _table([5, 6], margin=1e-4)
    table_b = table_a.copy()
    table_b[1, 8] = 2e-4  # a flip by 2e-4: rounding-sized, so a legitimate near-tie
    result = greedy_compare(
        ck, backends=[ScriptedStepper(table_a, name="a"), ScriptedStepper(table_b, name="b")], prompt_ids=[1], steps=2,
    )
    fd = result["first_token_divergence"]
    assert fd["step"] == 1 and fd["near_tie"] is True and "near-tie" in fd["explanation"]
    assert fd["margin"] == pytest.approx(1e-4, rel=1e-3) and fd["logit_drift"] == pytest.approx(2e-4, rel=1e-3)


def test_text_is_decoded_only_when_not_folded(ck):
    class Tok:
        def decode(self, ids, *, errors="strict"):
            if 0 in ids:
                raise ParityError("token id 0 is not in the vocabulary")
            return "|".join(map(str, ids))

    steppers = [ScriptedStepper(_table([5, 6]), name="a"), ScriptedStepper(_table([5, 0]), name="b")]
    result = greedy_compare(ck, backends=steppers, prompt_ids=[1], steps=2, tokenizer=Tok())
    assert result["backends"]["a"]["text"] == "5|6"
    assert result["backends"]["b"]["text"] is None and "id 0" in result["backends"]["b"]["text_error"]
    folded = greedy_compare(ck, backends=steppers, prompt_ids=[1], steps=2, tokenizer=Tok(), vocab_folded=True)
    assert folded["backends"]["a"]["text"] is None and folded["vocab_folded"] and folded["warnings"]


def test_top2_margins():
    rows = np.array([[0.0, 3.0, 1.0], [2.0, 2.0, -1.0], [np.nan, 1.0, 0.0]], np.float32)
    assert top2_margins(rows)[:2] == [2.0, 0.0]
    assert top2_margins(rows)[2] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "greedy steps must be an integer >= 1"),
        ({"backends": ["reference"]}, "at least two backends"),
        ({"prompt_ids": [5000]}, "token id 5000 is outside"),
        ({"prompt_ids": []}, "no prompt token ids"),
        ({"backends": ["reference", "tvm-debug"]}, "unknown backend 'tvm-debug'"),
        ({"backends": ["reference", "reference"]}, "backend listed twice"),
    ],
)
def test_bad_arguments(ck, kwargs, message):
    scripted = [ScriptedStepper(_table([1, 1]), name="a"), ScriptedStepper(_table([1, 1]), name="b")]
    args = {"backends": scripted, "prompt_ids": [1], "steps": 2, **kwargs}
    with pytest.raises(ParityError, match=message):
        greedy_compare(ck, **args)


def test_cache_fixture_isolates_the_compile_cache(compile_cache):
    assert os.environ["PARITY_CACHE_DIR"] == str(compile_cache)


# -- every backend decodes greedily: the same objects a dump drives --------------------------------
def test_a_reference_side_mutant_decodes_greedily_by_name(ck):
    result = greedy_compare(ck, backends=["reference", "mutant/reference-sigmoid-r"], prompt_ids=PROMPT, steps=3)
    cmp = result["comparisons"][0]
    assert cmp["actual"] == "mutant/reference-sigmoid-r" and len(cmp["teacher_forced_max_abs"]) == 3
    assert cmp["max_abs"] > FLIP_ATOL  # sigmoid(r) dropped: the logits are far off, not rounding noise


@pytest.fixture(scope="module")
def greedy_runs(tmp_path_factory, compile_cache):
    from parity_cli import REPO, cli_env, run_concurrently

    tmp = tmp_path_factory.mktemp("greedy-cli")
    common = ["--ids", "1,2,3", "--decode-steps", "1", "--greedy", "4"]
    return run_concurrently({
        "plug-in": ["run", "--checkpoint", REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth",
                    "--backends", "reference,examples/numpy_rwkv5.py:make_backend", *common, "--json", tmp / "p.json"],
        "hf": ["run", "--checkpoint", REPO / "fixtures" / "rwkv4-L2-C64.pth", "--backends", "reference,hf",
               *common, "--json", tmp / "h.json"],
    }, env=cli_env())


@pytest.mark.parametrize("name,other", [("plug-in", "numpy-rwkv5"), ("hf", "hf")])  # a plug-in names itself
def test_parity_run_greedy_works_with_any_backend(greedy_runs, name, other):
    cli = greedy_runs[name]
    assert cli.rc == 0 and cli.result is not None, cli
    greedy = cli.result["run"]["greedy"]
    assert list(greedy["backends"]) == ["reference", other]
    assert all(len(b["tokens"]) == 4 for b in greedy["backends"].values())
    (cmp,) = greedy["comparisons"]
    assert len(cmp["teacher_forced_max_abs"]) == 4 and cmp["max_abs"] < FLIP_ATOL  # two correct ports: rounding only
    fd = greedy["first_token_divergence"]
    assert fd is None or fd["near_tie"], fd  # a flip between correct ports can only be a near-tie
    assert f"greedy {other}: " in cli.stdout, cli


def test_a_backend_in_a_reference_cycle_is_gone_before_the_next_is_built(ck, monkeypatch):
    # tvm's, chatrwkv's and hf's backends sit in reference cycles: dropping the last reference
    # freed nothing, and the finished backend's
    # model stayed alive beside the next one until a full collection (issue 9). Automatic
    # collection is off here, so only greedy's own collection can free it.
    import gc
    import weakref

    import parity.greedy as greedy

    built: list[weakref.ref] = []
    alive_at_build: list[bool] = []

    class Cyclic(ScriptedStepper):
        def __init__(self, spec):
            alive_at_build.append(any(r() is not None for r in built))
            super().__init__(_table([5, 6, 7]), name=spec)
            self.me = self  # the cycle
            built.append(weakref.ref(self))

    monkeypatch.setattr(greedy, "make_stepper", lambda spec, checkpoint, **kwargs: Cyclic(spec))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        greedy_compare(ck, backends=["reference", "chatrwkv", "hf"], prompt_ids=PROMPT, steps=3)
    finally:
        if was_enabled:
            gc.enable()
    assert alive_at_build == [False, False, False]
    assert all(r() is None for r in built)
