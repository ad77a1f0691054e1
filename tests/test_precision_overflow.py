"""RWKV-4 in fp16 without the residual rescale: the first Inf, localised (docs/RWKV.md §3).

No bundled fixture (fixtures/*.pth) is deep and hot enough to overflow fp16 (their residual
stream stays below 10). The first test builds one in memory: 13 synthetic layers whose ffn.value weights from layer 6 on are 15000x, which
makes the canonical (fp32) stream reach 78,037 at L11.x_out — past fp16's 65,504 — while the
rescaled stream (halved after layer 5 and 11) stays under 40,000. The expected location is read off
the fp32 reference's own values (the first stage whose magnitude exceeds 65,504), not off the code
under test. The zoo's entry (``rwkv4-fp16-no-rescale``, a compiled fp16 build) runs on a committed
7-layer one, fixtures/precision/rwkv4-L7-C64-hot.pth (fixtures/make_fixtures.py says how it is hot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from parity.compare import TolerancePolicy, compare_runs
from parity.dumpers.backends import ReferenceBackend, RunPlan
from parity.dumpers.format import DumpReader
from parity.dumpers.replay import ReplayBackend
from parity.reference.rwkv4 import RWKV4Reference
from parity.stages import stage_order
from parity.synthetic import make_config, make_weights

FP16_MAX = 65504.0
PLAN = RunPlan(prefill_ids=tuple(range(10)), decode_ids=(3, 7))


@pytest.fixture(scope="module")
def hot(tmp_path_factory) -> Checkpoint:
    cfg = make_config(n_layer=13, n_embd=32, vocab_size=64, version="4")
    w = make_weights(cfg, seed=5)
    for layer in range(6, 13):
        key = f"blocks.{layer}.ffn.value.weight"
        w[key] = w[key] * 15000.0
    path = tmp_path_factory.mktemp("hot") / "rwkv4-hot.pth"
    save_checkpoint(Checkpoint(path=path, sha256="", config=cfg, weights=w), path)
    return load_checkpoint(path)


def test_first_inf_of_the_unrescaled_fp16_model_is_localised(hot: Checkpoint, tmp_path: Path) -> None:
    fp32 = DumpReader(ReferenceBackend(hot).dump(PLAN, path=tmp_path / "fp32"))
    order = stage_order(n_layer=13, version="4")
    steps = range(1 + len(PLAN.decode_ids))
    overflow = [(s, stage) for s in steps for stage in order
                if np.abs(fp32.read_stage(s, stage)).max() > FP16_MAX]
    assert overflow[0] == (0, "L11.x_out")  # the design of the checkpoint (module doc)

    # Rescaled, fp16 stays finite everywhere, as the official package's strategy promises.
    ok = DumpReader(ReferenceBackend(hot, dtype="float16").dump(PLAN, path=tmp_path / "fp16"))
    assert all(np.isfinite(ok.read_stage(s, stage)).all() for s in steps for stage in order)

    # The bug: the same fp16 model with RESCALE_LAYER 0.
    bug = ReferenceBackend(hot, model=RWKV4Reference(hot, dtype="float16", rescale_layer=0),
                           name="fp16-no-rescale", dtype="float16")
    bug_dump = bug.dump(PLAN, path=tmp_path / "bug")
    assert not np.isfinite(DumpReader(bug_dump).read_stage(0, "L11.x_out")).all()
    # Judged as a run judges it: replayed by the (correct, rescaled) fp16 reference, fp16 tolerance.
    replay = ReplayBackend(hot, candidate_dump=bug_dump)
    replayed = replay.dump(replay.plan(), path=tmp_path / "replay")
    first = compare_runs(actual=DumpReader(bug_dump), expected=DumpReader(replayed),
                         policy=TolerancePolicy.for_dtype("float16")).first_divergence
    assert first is not None
    assert (first.step, first.stage, first.metrics.reason) == (0, "L11.x_out", "nonfinite"), first.metrics.message()


# -- the zoo's entry: the compiled fp16 RWKV-4 without the rescale, on the committed hot fixture --
HOT = Path(__file__).resolve().parents[1] / "fixtures" / "precision" / "rwkv4-L7-C64-hot.pth"


def _zoo_plan(ck: Checkpoint):
    from parity.mutants import CATALOGUE
    from parity.session import default_decode_ids, parse_ids

    m = CATALOGUE["rwkv4-fp16-no-rescale"]
    return RunPlan(prefill_ids=parse_ids(m.ids, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=m.decode_steps, vocab_size=ck.config.vocab_size))


def test_the_hot_fixture_overflows_fp16_only_where_the_zoo_says(tmp_path: Path) -> None:
    """The catalogue's expected location is the physics of the fixture: the first stage whose fp32
    value passes 65,504 on the zoo's prompt, read off the fp32 reference; and with the rescale the
    same stage stays under fp16's range with a margin (the stream inside layer 6 is halved)."""
    from parity.mutants import CATALOGUE

    ck = load_checkpoint(HOT)
    plan = _zoo_plan(ck)
    fp32 = DumpReader(ReferenceBackend(ck).dump(plan, path=tmp_path / "fp32"))
    order = stage_order(n_layer=ck.config.n_layer, version="4")
    steps = range(1 + len(plan.decode_ids))
    peak = {(s, stage): float(np.abs(fp32.read_stage(s, stage)).max()) for s in steps for stage in order}
    first = next(k for k in peak if peak[k] > FP16_MAX)
    expected = CATALOGUE["rwkv4-fp16-no-rescale"].propagated
    assert first == (expected.step, expected.stage) == (0, "L6.att.out")
    # Inside layer 6 the rescaled stream is half the canonical one: it needs max/2 well under 65,504
    # (0.9 leaves room for fp16's own rounding of the matmul, ~1e-3 relative).
    assert max(peak.values()) / 2 < 0.9 * FP16_MAX, max(peak.values())
    ok = DumpReader(ReferenceBackend(ck, dtype="float16").dump(plan, path=tmp_path / "fp16"))
    assert all(np.isfinite(ok.read_stage(s, stage)).all() for s in steps for stage in order)


def test_selftest_localises_the_unrescaled_fp16_build_at_the_first_inf(tmp_path: Path, compile_cache: Path) -> None:
    from parity.mutants import CATALOGUE
    from parity.selftest import run_mutant

    row = run_mutant(CATALOGUE["rwkv4-fp16-no-rescale"], cache_dir=compile_cache, work=tmp_path)
    assert row.passed, row.to_dict()["found"]


@pytest.mark.parametrize("mode", ["replay", "isolated"])
def test_the_correct_fp16_build_is_not_flagged_on_the_hot_fixture(mode: str, tmp_path: Path, compile_cache: Path) -> None:
    from parity.session import run_parity

    ck = load_checkpoint(HOT)
    out = run_parity(ck, backends=["reference", "tvm@fp16"], plan=_zoo_plan(ck), dump_dir=tmp_path,
                     cache_dir=compile_cache, mode=mode)
    # (the same runs with the rescale left out are flagged at the Inf: the selftest test above)
    assert out.result["first_divergence"] is None, out.result["verdict"]
