"""Verdict-level guards on the calibrated constants: each fails if its constant moves far.

- The ln_x / att.gated slack (tolerance.py, scale 1e-3): the mildest GroupNorm bug of the zoo,
  eps 1e-5 on the demo fixture with ten all-ones ids, must still be caught at L0.att.ln_x, and by
  less than 5x — so a 5x loosening of the slack would let it through and fail this test. (The
  other side, a tightening back to 2e-4, is guarded by tests/test_no_false_alarms.py, whose former
  false alarms would fail again.)
- The fp32 ``scale`` term (2e-4): the fp16-accumulator wkv mutant, the mildest wkv bug, must stay
  out of tolerance at L0.att.wkv in its own (isolated) error.
- The drift envelope (verdict.py), with the run's rounding floor measured (it stays small here): a port whose recurrent state grows by 1e-4 a step adds no
  stage error a replay can see (each step's own error < 1 allowance), yet its trajectory leaves
  the envelope within 120 decode steps: verdict "drift beyond envelope", exit 1. The correct numpy
  port on the same run stays inside it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from parity.checkpoint import load_checkpoint
from parity.cli import main
from parity.compare.verdict import FLOOR_MULTIPLE, record_ratio
from parity.dumpers.backends import RunPlan
from parity.session import default_decode_ids, parse_ids, run_parity

REPO = Path(__file__).resolve().parents[1]
L4 = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"
HERE = str(Path(__file__).resolve())

_spec = importlib.util.spec_from_file_location("numpy_rwkv5_calibration", REPO / "examples" / "numpy_rwkv5.py")
_numpy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_numpy)


class LeakyState(_numpy.NumpyRWKV5):
    """The wkv state grows by a factor 1 + 1e-4 after every step (a leaky accumulator)."""

    def step(self, ids):
        out = super().step(ids)
        for layer, state in enumerate(self.state):
            state["att_kv"] *= 1 + 1e-4
            out[f"state.L{layer}.att_kv"] = state["att_kv"].copy()
        return out


def leaky_state(checkpoint):
    return LeakyState(checkpoint)


def _plan(ck, *, ids: str, steps: int) -> RunPlan:
    return RunPlan(prefill_ids=parse_ids(ids, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=steps, vocab_size=ck.config.vocab_size))


def test_the_ln_x_slack_still_catches_the_mildest_groupnorm_bug(tmp_path, compile_cache):
    ck = load_checkpoint(L4)
    out = run_parity(ck, backends=["reference", "mutant/groupnorm-eps-1e-5"], plan=_plan(ck, ids="ones:10", steps=0),
                     dump_dir=tmp_path, cache_dir=compile_cache, mode="isolated")
    fd = out.result["first_divergence"]
    assert (fd["step"], fd["stage"]) == (0, "L0.att.ln_x")
    margin = record_ratio(fd)
    assert 1.0 < margin < 5.0, f"the eps mutant is {margin:.3g}x its ln_x allowance (measured 3.9x when the slack was set)"


def test_the_scale_term_still_catches_an_fp16_accumulator(tmp_path, compile_cache):
    ck = load_checkpoint(L4)
    out = run_parity(ck, backends=["reference", "mutant/wkv-fp16-accumulator"], plan=_plan(ck, ids="random:10:7", steps=0),
                     dump_dir=tmp_path, cache_dir=compile_cache, mode="isolated")
    fd = out.result["first_divergence"]
    assert (fd["step"], fd["stage"]) == (0, "L0.att.wkv") and record_ratio(fd) > 1.0


def test_a_leaky_state_is_drift_beyond_the_envelope_not_a_stage(tmp_path, capsys):
    # 60 decode steps: the leak first leaves the envelope at step 32 and is 4x it by step 60, 125x the floor
    # (measured; 120 steps, as before, doubled this test's ~25 s).
    code = main(["run", "--checkpoint", str(L4), "--backends", f"reference,{HERE}:leaky_state,"
                 f"{REPO}/examples/numpy_rwkv5.py:make_backend", "--decode-steps", "60", "--json", str(tmp_path / "r.json"), "-q"])
    assert code == 1
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["verdict"] == "drift beyond envelope"
    assert result["own_errors"][f"{HERE}:leaky_state"]["failed"] == 0  # no stage adds error a replay can see
    assert result["drift"]["status"] == "beyond" and result["drift"]["first_beyond_envelope"]["stage"].startswith("state.")
    # Past the fixed envelope, the run measured its rounding floor (parity/dumpers/floor.py) before
    # calling it: this small model carries a last-bit difference only so far, so the leak stays a finding.
    floor = result["drift"]["floor"]
    assert floor is not None and 0 < floor and result["drift"]["worst_ratio"] > FLOOR_MULTIPLE * floor
    correct = next(c for c in result["comparisons"] if c["actual"].endswith("numpy_rwkv5.py:make_backend")
                   and c["expected"] == "reference")
    assert correct["verdict"] == "no divergence" and correct["drift"]["status"] in ("none", "within")
    assert result["odd_one_out"]["backend"] == f"{HERE}:leaky_state"
    assert capsys.readouterr().out.startswith("DRIFT BEYOND ENVELOPE:")
