"""parity explain: every bug of the zoo, run as the candidate, is named by its own hypothesis.

The runs are real (our TVM build with the bug planted, or a numpy plug-in port with one), on the
bundled fixtures; nothing here knows a reproduction error but the engine's measurement. A
hypothesis "reproduces" when its worst ratio to the run's own tolerance is <= 1 — the same
tolerance that found the divergence.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.dumpers.registry import make_backend
from parity.errors import ParityError
from parity.explain.engine import EXPLAINED, NOT_EXPLAINED, NOTHING, explain_dump, explain_result, load_hypothesis
from parity.explain.hypotheses import CATALOGUE as CATALOGUE_H
from parity.mutants import CATALOGUE
from parity.mutants.quant import QUANT_CATALOGUE
from parity.session import default_decode_ids, parse_ids, run_parity

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
L4 = FIXTURES / "rwkv5_2-L4-C128-H2.pth"
HERE = f"{__file__}"

# The zoo names its bugs after where they live; two hypotheses are named for the bug itself.
OWN_HYPOTHESIS = {"groupnorm-eps-1e-5": "groupnorm-eps", "reference-sigmoid-r": "sigmoid-r",
                  "wkv-time-parallel-cpu": "wkv-time-parallel", "logits-fp16": "fp16-at-logits",
                  "rwkv4-fp16-no-rescale": "fp16-without-rescale"}


def _numpy_port():
    spec = importlib.util.spec_from_file_location("numpy_rwkv5_for_explain", REPO / "examples" / "numpy_rwkv5.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NUMPY = _numpy_port()
ODD_EPS = 2.5e-4  # neither 1e-5 nor 64e-5: only a fit finds it


class OddEpsPort(NUMPY.NumpyRWKV5):
    """A foreign port whose ln_x GroupNorm uses eps 2.5e-4."""

    def _group_norm(self, x, w, b):
        T = x.shape[0]
        g = x.reshape(T, self.n_head, self.head_size)
        mean, var = g.mean(-1, keepdims=True), g.var(-1, keepdims=True)
        return ((g - mean) / np.sqrt(var + ODD_EPS)).reshape(T, -1) * w + b  # BUG


class DoubleBonusPort(NUMPY.NumpyRWKV5):
    """A bug no hypothesis knows: the bonus applied twice (2u) in the wkv scan."""

    def _wkv(self, r, k, v, *, p, state):
        return super()._wkv(r, k, v, p={**p, "bonus": 2 * p["bonus"]}, state=state)


def odd_eps_port(checkpoint):
    return OddEpsPort(checkpoint)


def double_bonus_port(checkpoint):
    return DoubleBonusPort(checkpoint)


def _mutant_plan(ck, mutant):
    return RunPlan(prefill_ids=parse_ids(mutant.ids, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=mutant.decode_steps, vocab_size=ck.config.vocab_size))


def _assert_explained_by(explanation: dict, name: str) -> None:
    assert explanation["status"] == EXPLAINED, explanation["summary"]
    best = explanation["hypotheses"][0]
    assert best["name"] == name, [(h["name"], h["worst_ratio"]) for h in explanation["hypotheses"][:3]]
    assert best["reproduces"] and best["worst_ratio"] <= 1.0
    assert explanation["clean"]["worst_ratio"] > 1.0
    assert explanation["fix"] == best["fix"]


# Crashes and hangs leave no wrong number to explain. The precision family (parity/mutants/precision.py)
# is explained too, each by its own trap, against a reference in the mutant's own dtype. The
# quantisation family (parity/mutants/quant.py) is explained below, beside a correct build of its
# scheme.
EXPLAINABLE = [n for n, m in CATALOGUE.items() if m.fault is None and n not in QUANT_CATALOGUE]


@pytest.mark.parametrize("name", EXPLAINABLE)
def test_every_zoo_mutant_is_explained_by_its_own_hypothesis(name, tmp_path, compile_cache):
    mutant = CATALOGUE[name]
    ck = load_checkpoint(FIXTURES / f"{mutant.fixture}.pth")
    out = run_parity(ck, backends=["reference", f"mutant/{name}"], plan=_mutant_plan(ck, mutant), dump_dir=tmp_path,
                     cache_dir=compile_cache)
    assert out.result["first_divergence"] is not None
    explanation = explain_result(out.result, checkpoint=ck)
    assert explanation["candidate"] == f"mutant/{name}"
    assert explanation["stage"] == out.result["first_divergence"]["stage"]
    _assert_explained_by(explanation, OWN_HYPOTHESIS.get(name, name))


@pytest.mark.parametrize("name", list(QUANT_CATALOGUE))
def test_a_quant_mutant_is_named_and_a_correct_build_of_its_scheme_is_not(name, tmp_path, compile_cache):
    # The mutant (a wrong dequantisation index) and the correct build of its scheme (tvm@fp16i8 /
    # tvm@q4f16_1) each record the mutant's prompt, and each is explained at the place the zoo says
    # the mutant first diverges (tests/mutants/test_quant.py: a run finds it there). Dumps made in
    # process, with one decode step, rather than a whole run: CI time; the step still reads a state.
    mutant = CATALOGUE[name]
    clean = f"tvm@{mutant.dtype}"
    ck = load_checkpoint(FIXTURES / f"{mutant.fixture}.pth")
    plan = RunPlan(prefill_ids=parse_ids(mutant.ids, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=1, vocab_size=ck.config.vocab_size))
    where = {"step": mutant.isolated.step, "stage": mutant.isolated.stage}
    dumps = {s: make_backend(s, ck, cache_dir=compile_cache).dump(plan, path=tmp_path / s.replace("/", "_"))
             for s in (f"mutant/{name}", clean)}

    _assert_explained_by(explain_dump(ck, candidate_dump=dumps[f"mutant/{name}"], first_divergence=where),
                         name)  # the hypotheses are named after the zoo's bugs

    # The correct build, asked at the same place: the clean reference already reproduces it, and
    # none of its scheme's dequantisation bugs does (each is tried; the other scheme's are not).
    forced = explain_dump(ck, candidate_dump=dumps[clean], first_divergence=where)
    assert forced["status"] == NOT_EXPLAINED and forced["clean"]["worst_ratio"] <= 1.0
    assert forced["fix"] is None
    fmt = "int8" if mutant.dtype.endswith("i8") else "q4"
    quant = {h["name"]: h for h in forced["hypotheses"] if CATALOGUE_H[h["name"]].weights}
    assert set(quant) == {n for n, h in CATALOGUE_H.items() if fmt in h.weights}
    assert not any(h["reproduces"] for h in quant.values()), [(n, h["worst_ratio"]) for n, h in quant.items()]


@pytest.mark.parametrize("name", ["groupnorm-eps-1e-5", "state-transposed", "token-shift-off-by-one"])
def test_propagated_runs_are_explained_too(name, tmp_path, compile_cache):
    mutant = CATALOGUE[name]
    ck = load_checkpoint(FIXTURES / f"{mutant.fixture}.pth")
    out = run_parity(ck, backends=["reference", f"mutant/{name}"], plan=_mutant_plan(ck, mutant), dump_dir=tmp_path,
                     cache_dir=compile_cache, mode="propagated")
    assert out.result["first_divergence"]["judged_by"] == "propagated"
    _assert_explained_by(explain_result(out.result, checkpoint=ck), OWN_HYPOTHESIS.get(name, name))


def test_the_groupnorm_eps_1e5_mutant_names_the_classic_value(tmp_path, compile_cache):
    ck = load_checkpoint(L4)
    out = run_parity(ck, backends=["reference", "mutant/groupnorm-eps-1e-5"], plan=_mutant_plan(ck, CATALOGUE["groupnorm-eps-1e-5"]),
                     dump_dir=tmp_path, cache_dir=compile_cache)
    best = explain_result(out.result, checkpoint=ck)["hypotheses"][0]
    assert best["values"]["eps"] == 1e-5
    assert best["values"]["fitted_eps"] == pytest.approx(1e-5, rel=0.1)  # the fit, from the tensors alone
    assert "1e-5" in best["detail"]


@pytest.fixture(scope="module")
def ck():
    return load_checkpoint(L4)


def _plan(ck, steps=2):
    return RunPlan(prefill_ids=(5, 9, 300, 2, 77, 4, 1000, 8),
                   decode_ids=default_decode_ids(steps=steps, vocab_size=ck.config.vocab_size))


def test_a_plugin_port_with_another_eps_is_explained_with_the_fitted_value(ck, tmp_path):
    spec = f"{HERE}:odd_eps_port"
    out = run_parity(ck, backends=["reference", spec], plan=_plan(ck), dump_dir=tmp_path)
    explanation = explain_result(out.result, checkpoint=ck)
    _assert_explained_by(explanation, "groupnorm-eps")
    best = explanation["hypotheses"][0]
    assert best["title"] == "GroupNorm eps"
    # The fit recovers the port's eps from its recorded tensors to a few per cent (the ln_x error
    # is flat in eps near its minimum; float32 rounding in the port decides the last digits).
    assert best["values"]["eps"] == pytest.approx(ODD_EPS, rel=0.05)
    assert best["detail"].startswith("fitted eps 0.00025") or best["detail"].startswith("fitted eps 0.000249")


def test_a_correct_backend_has_nothing_explained(ck, tmp_path):
    out = run_parity(ck, backends=["reference", "chatrwkv"], plan=_plan(ck), dump_dir=tmp_path)
    assert explain_result(out.result, checkpoint=ck)["status"] == NOTHING
    # Asked anyway, at a stage where it agrees: the clean reference already reproduces it.
    forced = explain_dump(ck, candidate_dump=out.dumps["chatrwkv"], first_divergence={"step": 0, "stage": "L0.att.ln_x"})
    assert forced["status"] == NOT_EXPLAINED
    assert forced["clean"]["worst_ratio"] <= 1.0
    assert "nothing to explain" in forced["summary"] and forced["fix"] is None


def test_an_unlisted_bug_is_not_explained(ck, tmp_path):
    spec = f"{HERE}:double_bonus_port"
    out = run_parity(ck, backends=["reference", spec], plan=_plan(ck), dump_dir=tmp_path)
    assert out.result["first_divergence"]["stage"] == "L0.att.wkv"
    explanation = explain_result(out.result, checkpoint=ck)
    assert explanation["status"] == NOT_EXPLAINED
    assert explanation["summary"].startswith("not explained by any known porting bug")
    assert explanation["fix"] is None
    assert explanation["hypotheses"] and not any(h["reproduces"] for h in explanation["hypotheses"])


# A user's own hypothesis, loaded by module:attr: the unlisted bug above, now known.
from parity.explain.hypotheses import hypothesis  # noqa: E402


@hypothesis(name="bonus-twice", title="bonus applied twice", stages=("att.wkv",), fix="apply u once", register=False)
def bonus_twice(model, ctx):
    """u doubled in the scan."""
    import dataclasses

    for i, p in enumerate(model.layers):
        model.layers[i] = dataclasses.replace(p, u=2 * p.u)


def test_a_users_own_hypothesis_explains_what_the_catalogue_cannot(ck, tmp_path):
    out = run_parity(ck, backends=["reference", f"{HERE}:double_bonus_port"], plan=_plan(ck), dump_dir=tmp_path)
    explanation = explain_result(out.result, checkpoint=ck, extra_hypotheses=[load_hypothesis(f"{HERE}:bonus_twice")])
    _assert_explained_by(explanation, "bonus-twice")


def test_v4_only_hypotheses_are_listed_not_applicable_on_v5(ck, tmp_path):
    out = run_parity(ck, backends=["reference", f"{HERE}:double_bonus_port"], plan=_plan(ck, steps=1), dump_dir=tmp_path)
    explanation = explain_result(out.result, checkpoint=ck)
    na = {n["name"] for n in explanation["not_applicable"]}
    assert {"v4-rescale-off-by-one", "v4-wkv-without-max"} <= na
    assert not na & {h["name"] for h in explanation["hypotheses"]}


def test_bad_hypothesis_specs_are_one_line_errors():
    with pytest.raises(ParityError, match="module:attribute"):
        load_hypothesis("no_colon")
    with pytest.raises(ParityError, match="not a Hypothesis"):
        load_hypothesis(f"{HERE}:odd_eps_port")


def test_a_result_without_its_dumps_says_how_to_keep_them(ck, tmp_path):
    out = run_parity(ck, backends=["reference", f"{HERE}:double_bonus_port"], plan=_plan(ck, steps=1), dump_dir=tmp_path)
    result = {**out.result, "run": {**out.result["run"], "dumps": {}}}
    with pytest.raises(ParityError, match="--dump-dir"):
        explain_result(result, checkpoint=ck)
