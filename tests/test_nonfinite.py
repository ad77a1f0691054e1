"""NaN/Inf end to end: the first non-finite value is localised like any other divergence, and a
stage non-finite on both sides at the same places is reported as such, never as equal."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.session import run_parity

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv5_2-L2-C144-H12.pth"

PLUGIN = textwrap.dedent('''
    import numpy as np
    from parity.reference import make_reference

    class NaNAt:
        """The reference, with NaN written into one element of one stage (and everything after it)."""

        def __init__(self, checkpoint, stage, step, row):
            self.model = make_reference(checkpoint)
            self.stage, self.step_index, self.row = stage, step, row
            self.name = "nan-at-" + stage

        def reset(self):
            self.state = None
            self.count = 0

        def step(self, ids):
            out = {}
            def record(name, value):
                out[name] = value.detach().float().numpy().copy()
            _, self.state = self.model.forward(ids, self.state, record=record)
            if self.count == self.step_index:
                out[self.stage][self.row, 3] = np.nan
                # a NaN propagates: make every later stage of this step non-finite too
                names = list(out)
                for later in names[names.index(self.stage) + 1:]:
                    out[later] = out[later] * np.nan
            self.count += 1
            return out

    def wkv_row2(checkpoint):
        return NaNAt(checkpoint, "L1.att.wkv", 0, 2)

    def wkv_row2_again(checkpoint):
        return NaNAt(checkpoint, "L1.att.wkv", 0, 2)
''')


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "nan_backends.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nan_backends"


def test_first_nan_is_localised(plugin, tmp_path):
    ck = load_checkpoint(FIXTURE)
    out = run_parity(ck, backends=["reference", f"{plugin}:wkv_row2"], plan=RunPlan(prefill_ids=tuple(range(1, 6))),
                     dump_dir=tmp_path / "d")
    fd = out.result["first_divergence"]
    assert (fd["step"], fd["layer"], fd["stage"], fd["row"]) == (0, 1, "L1.att.wkv", 2)
    assert fd["reason"] == "nonfinite" and fd["nonfinite_side"] == "actual"
    assert fd["first_nonfinite_index"] == [2, 3]


def test_both_sides_nonfinite_at_the_same_places_is_not_equal(plugin, tmp_path):
    ck = load_checkpoint(FIXTURE)
    # The strict pair comparison: both sides NaN at the same places is a finding, never "equal".
    out = run_parity(ck, backends=[f"{plugin}:wkv_row2", f"{plugin}:wkv_row2_again"],
                     plan=RunPlan(prefill_ids=tuple(range(1, 6))), dump_dir=tmp_path / "d", mode="propagated")
    fd = out.result["first_divergence"]
    assert out.result["verdict"] == "divergence"
    assert fd["stage"] == "L1.att.wkv" and fd["reason"] == "nonfinite"
    assert fd["nonfinite_side"] == "both" and fd["nonfinite_same_places"] is True
    assert fd["mismatch_count"] == 0  # the finite values agree; the finding is the NaN itself
    # The default verdict replays each backend: the NaN is the candidate's own, against a finite replay.
    out = run_parity(ck, backends=[f"{plugin}:wkv_row2", f"{plugin}:wkv_row2_again"],
                     plan=RunPlan(prefill_ids=tuple(range(1, 6))), dump_dir=tmp_path / "replay")
    fd = out.result["first_divergence"]
    assert (fd["stage"], fd["reason"], fd["nonfinite_side"], fd["judged_by"]) == ("L1.att.wkv", "nonfinite", "actual", "replay")
