"""parity.session: token-id parsing, run_parity's refusals, and compare_dumps on small dumps.

run_parity must refuse a bad request before it builds or runs anything, so these tests need no
TVM build: a refusal that came late would show up as a dump directory left behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.dumpers.format import DumpWriter
from parity.errors import ParityError
from parity.session import compare_dumps, default_decode_ids, parse_ids, run_parity
from parity.stages import stage_order

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(FIXTURE)


# -- parse_ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("1,2,3", (1, 2, 3)),
        (" 7 , 0,42 ", (7, 0, 42)),
        ("5", (5,)),
        ("ones:10", (1,) * 10),
        ("ones:1", (1,)),
    ],
)
def test_parse_ids_explicit_forms(text, ids):
    got = parse_ids(text, vocab_size=1024)
    assert got == ids
    assert all(type(i) is int for i in got)


def test_parse_ids_random_is_deterministic_and_in_vocabulary():
    a = parse_ids("random:16", vocab_size=50)
    assert len(a) == 16
    assert all(type(i) is int and 0 <= i < 50 for i in a)
    assert parse_ids("random:16", vocab_size=50) == a


def test_parse_ids_random_seed_selects_the_sequence():
    seven = parse_ids("random:16:7", vocab_size=1024)
    assert parse_ids("random:16:7", vocab_size=1024) == seven
    assert parse_ids("random:16:8", vocab_size=1024) != seven
    assert parse_ids("random:16", vocab_size=1024) != seven  # the default seed is not 7
    assert len(seven) == 16 and all(0 <= i < 1024 for i in seven)


def test_parse_ids_random_covers_a_small_vocabulary():
    ids = parse_ids("random:400:3", vocab_size=5)
    assert set(ids) == {0, 1, 2, 3, 4}


def test_parse_ids_random_needs_the_vocabulary():
    with pytest.raises(ParityError, match="vocabulary"):
        parse_ids("random:4")


@pytest.mark.parametrize(
    "text",
    ["", "   ", ",", "1,x", "1.5", "a,b", "ones:", "ones:0", "ones:-2", "ones:x",
     "random:", "random:0", "random:x", "random:4:x", "random:4:5:6", "random:4:-3", "zeros:4"],
)
def test_parse_ids_refuses_bad_forms(text):
    with pytest.raises(ParityError) as info:
        parse_ids(text, vocab_size=1024)
    msg = str(info.value)
    assert repr(text.strip()) in msg, msg  # names what it was given
    assert "ones:N" in msg and "random:N" in msg, msg  # and what it accepts
    assert "\n" not in msg


def test_default_decode_ids_are_seeded_and_in_vocabulary():
    ids = default_decode_ids(steps=6, vocab_size=30)
    assert len(ids) == 6 and all(0 <= i < 30 for i in ids)
    assert default_decode_ids(steps=6, vocab_size=30) == ids
    assert default_decode_ids(steps=6, vocab_size=30, seed=2) != ids


# -- run_parity refusals ----------------------------------------------------------------------


def refuse(checkpoint, tmp_path, **kwargs) -> str:
    kwargs.setdefault("plan", RunPlan(prefill_ids=(1, 2), decode_ids=(3,)))
    dump_dir = tmp_path / "dumps"
    with pytest.raises(ParityError) as info:
        run_parity(checkpoint, dump_dir=dump_dir, cache_dir=tmp_path / "cache", **kwargs)
    assert not dump_dir.exists(), "run_parity started dumping before refusing"
    assert not (tmp_path / "cache").exists(), "run_parity started compiling before refusing"
    return str(info.value)


@pytest.mark.parametrize("backends", [["reference", "foo"], ["nope", "reference"], ["reference", "TVM"]])
def test_run_parity_refuses_unknown_backend(checkpoint, tmp_path, backends):
    bad = next(b for b in backends if b not in ("reference",))
    msg = refuse(checkpoint, tmp_path, backends=backends)
    assert repr(bad) in msg and "tvm-instrumented" in msg  # names it and lists the choices


@pytest.mark.parametrize("backends", [[], ["reference"], ["tvm"]])
def test_run_parity_refuses_fewer_than_two_backends(checkpoint, tmp_path, backends):
    assert "at least two backends" in refuse(checkpoint, tmp_path, backends=backends)


def test_run_parity_refuses_a_repeated_backend(checkpoint, tmp_path):
    msg = refuse(checkpoint, tmp_path, backends=["reference", "tvm", "reference"])
    assert "twice" in msg


@pytest.mark.parametrize(
    "plan",
    [
        RunPlan(prefill_ids=(1, 1024)),
        RunPlan(prefill_ids=(1,), decode_ids=(5, 2000)),
        RunPlan(prefill_ids=(-1, 2)),
    ],
    ids=["prefill-id-equals-vocab", "decode-id-beyond-vocab", "negative-id"],
)
def test_run_parity_refuses_ids_outside_the_vocabulary(checkpoint, tmp_path, plan):
    bad = next(i for i in (*plan.prefill_ids, *plan.decode_ids) if not 0 <= i < 1024)
    msg = refuse(checkpoint, tmp_path, backends=["reference", "tvm"], plan=plan)
    assert f"token id {bad}" in msg and "1024" in msg


def test_run_parity_refuses_an_empty_prompt(checkpoint, tmp_path):
    msg = refuse(checkpoint, tmp_path, backends=["reference", "tvm"], plan=RunPlan(prefill_ids=()))
    assert "no prompt" in msg


def test_run_parity_refuses_a_bad_checkpoint_path(tmp_path):
    msg = refuse(tmp_path / "missing.pth", tmp_path, backends=["reference", "tvm"])
    assert "not found" in msg


# -- compare_dumps ----------------------------------------------------------------------------

C, V = 4, 8
ORDER = stage_order(n_layer=1)


def write_dump(path: Path, *, model: dict, logits: np.ndarray) -> Path:
    """A one-step dump holding only ``emb`` and ``logits``: enough to compare."""
    with DumpWriter(
        path=path, backend="b", mode="eager", dtype="float32", model=model, stage_order=ORDER,
        checkpoint=None, tool_versions={}, extra={},
    ) as w:
        with w.step(kind="prefill", ids=[1, 2]) as s:
            s.add("emb", np.ones((2, C), np.float32))
            s.add("logits", logits)
    return path


MODEL = {"version": "5.2", "n_layer": 1, "n_embd": C, "vocab_size": V}


def test_compare_dumps_same_values_no_divergence(tmp_path):
    logits = np.linspace(-1, 1, 2 * V, dtype=np.float32).reshape(2, V)
    a = write_dump(tmp_path / "a", model=MODEL, logits=logits)
    b = write_dump(tmp_path / "b", model=MODEL, logits=logits.copy())
    result = compare_dumps(a, b)
    assert result["first_divergence"] is None
    assert {r["stage"] for r in result["records"]} == {"emb", "logits"}


def test_compare_dumps_names_the_divergent_stage_and_row(tmp_path):
    logits = np.linspace(-1, 1, 2 * V, dtype=np.float32).reshape(2, V)
    bad = logits.copy()
    bad[1, 3] += 5.0
    a = write_dump(tmp_path / "a", model=MODEL, logits=logits)
    b = write_dump(tmp_path / "b", model=MODEL, logits=bad)
    fd = compare_dumps(a, b)["first_divergence"]
    assert (fd["stage"], fd["step"], fd["row"]) == ("logits", 0, 1)


def test_compare_dumps_refuses_dumps_of_different_models(tmp_path):
    logits = np.zeros((2, V), np.float32)
    a = write_dump(tmp_path / "a", model=MODEL, logits=logits)
    b = write_dump(tmp_path / "b", model={**MODEL, "n_layer": 2}, logits=logits)
    with pytest.raises(ParityError, match="different models"):
        compare_dumps(a, b)


def test_compare_dumps_refuses_a_missing_dump(tmp_path):
    a = write_dump(tmp_path / "a", model=MODEL, logits=np.zeros((2, V), np.float32))
    with pytest.raises(ParityError, match="no dump"):
        compare_dumps(a, tmp_path / "nowhere")


# -- judge_policy: who judges a record, with which allowance -------------------------------------


def write_low_dump(path: Path, *, version: str = "5.2", stages=("L0.att.r", "L0.att.k", "L0.att.v"),
                   dtype: str = "bfloat16") -> Path:
    """A one-step, one-layer dump in ``dtype`` holding ``stages`` for both token rows."""
    with DumpWriter(
        path=path, backend="b", mode="eager", dtype=dtype, model={**MODEL, "version": version},
        stage_order=stage_order(n_layer=1, version=version), checkpoint=None,
        tool_versions={}, extra={},
    ) as w:
        with w.step(kind="prefill", ids=[1, 2]) as s:
            for name in ("emb", *stages):
                s.add(name, np.ones((2, C), np.float32))
    return path


def test_a_spliced_bf16_replay_gets_the_judged_scale_and_the_fp32_scan(tmp_path):
    from parity.compare.tolerance import JUDGE_REPLAY, JUDGED_TOLERANCES
    from parity.session import judge_policy

    policy = judge_policy(JUDGE_REPLAY, dump=write_low_dump(tmp_path / "d"), spliced=True)
    assert (policy.judge, policy.spliced_scan) == (JUDGE_REPLAY, True)
    assert policy.for_stage("L0.att.ln_x") == JUDGED_TOLERANCES[JUDGE_REPLAY]["bfloat16"]
    assert policy.for_stage("L0.att.wkv").scale == 2e-4  # fp32's: the scan ran on the dump's own r, k, v


def test_a_judge_that_could_not_splice_an_rwkv5_scan_judges_as_a_pair(tmp_path):
    # No r, k, v recorded: the judge's GroupNorm renormalised its own wkv, as two runs do.
    from parity.compare.tolerance import JUDGE_ISOLATED, JUDGE_PAIR, JUDGE_REPLAY
    from parity.session import judge_policy

    bare = write_low_dump(tmp_path / "bare", stages=("L0.x_out",))
    for judge in (JUDGE_REPLAY, JUDGE_ISOLATED):
        policy = judge_policy(judge, dump=bare, spliced=True)
        assert (policy.judge, policy.spliced_scan, policy.default.scale) == (JUDGE_PAIR, False, 1.0)
    # ... and so does one told it did not splice (an isolated build judged by its yardstick directly).
    full = write_low_dump(tmp_path / "full")
    assert judge_policy(JUDGE_ISOLATED, dump=full, spliced=False).judge == JUDGE_PAIR
    assert judge_policy(JUDGE_PAIR, dump=full).default.scale == 1.0  # the pair never splices


def test_an_rwkv4_replay_is_judged_on_its_own_inputs_without_a_scan_splice(tmp_path):
    # RWKV-4 has no GroupNorm to renormalise a judge's own wkv: the judged scale, the wkv at it too.
    from parity.compare.tolerance import JUDGE_REPLAY
    from parity.session import judge_policy

    policy = judge_policy(JUDGE_REPLAY, dump=write_low_dump(tmp_path / "v4", version="4"), spliced=True)
    assert (policy.judge, policy.spliced_scan, policy.default.scale) == (JUDGE_REPLAY, False, 5e-2)
    assert policy.for_stage("L0.att.wkv") == policy.default


def test_compare_dumps_judges_a_pair_by_the_dtypes_defaults(tmp_path):
    a = write_low_dump(tmp_path / "a")
    result = compare_dumps(a, write_low_dump(tmp_path / "b"))
    assert (result["policy"]["judge"], result["policy"]["default"]["scale"]) == ("pair", 1.0)


def test_a_gpu_worker_runs_beside_the_reference(checkpoint, tmp_path, monkeypatch):
    """On the GPU (here: the rule forced on for the llvm build) the compiled backend's worker runs
    in a thread of its own while the reference runs in this one, and the run waits for its dump."""
    import threading

    import parity.session as session

    monkeypatch.setattr(session, "_runs_beside", lambda target: True)
    threads: dict[str, set[str]] = {}
    events: list[str] = []

    def on_step(name, index, total):
        threads.setdefault(name, set()).add(threading.current_thread().name)

    plan = RunPlan(prefill_ids=(1, 2, 3), decode_ids=(4, 5))
    outcome = run_parity(checkpoint, backends=["reference", "tvm"], plan=plan, dump_dir=tmp_path / "d",
                         on_step=on_step, on_event=events.append, mode="propagated")
    assert outcome.typed.verdict == "no divergence"
    assert any("tvm in a worker process" in e and "beside the reference" in e for e in events)
    tvm_threads = next(v for k, v in threads.items() if k.startswith("tvm"))
    assert all(t.startswith("parity-gpu-worker") for t in tvm_threads), threads
    assert threads["reference"] == {threading.main_thread().name}
    from parity.dumpers.format import DumpReader

    tvm_dump = DumpReader(outcome.dumps["tvm"])  # finished (a complete dump) before the comparison
    assert [s.kind for s in tvm_dump.steps] == ["prefill", "decode", "decode"]
