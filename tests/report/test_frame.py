"""Results as a DataFrame: one row per (step, stage) record, numeric metrics, from a dict, file or dir."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from parity.compare import MemoryRun, StepInfo, TolerancePolicy, compare_runs
from parity.errors import ParityError
from parity.report.frame import load_results, records_to_csv

REPO = Path(__file__).resolve().parents[2]
ORDER = ["emb", "L0.att.wkv", "L0.x_out", "logits", "state.L0.att_kv"]
STEPS = [StepInfo(0, "prefill", [1, 2, 3]), StepInfo(1, "decode", [4])]


def _result() -> dict:
    rng = np.random.default_rng(1)
    expected = {s.index: {n: rng.standard_normal((2, 4) if n.startswith("state.") else (len(s.ids), 6))
                          for n in ORDER} for s in STEPS}
    actual = {i: {k: v.copy() for k, v in a.items()} for i, a in expected.items()}
    actual[1]["L0.att.wkv"][0, 2] += 1.0
    actual[1]["logits"][0, 1] = np.inf

    def run(arrays, backend):
        return MemoryRun(steps=STEPS, stage_order=ORDER, dtype="float32", arrays=arrays,
                         description={"backend": backend, "mode": "m", "dtype": "float32"})

    return compare_runs(actual=run(actual, "tvm"), expected=run(expected, "reference"),
                        policy=TolerancePolicy.for_dtype("float32")).to_dict()


def test_one_row_per_record_with_metrics_and_backends():
    result = _result()
    df = load_results(result)
    assert len(df) == len(result["records"]) == len(ORDER) * len(STEPS)
    assert list(zip(df.step, df.stage)) == [(r["step"], r["stage"]) for r in result["records"]]
    assert set(df.backend_actual) == {"tvm"} and set(df.backend_expected) == {"reference"}
    for col in ("max_abs", "rms_rel", "min_atol", "atol", "rtol", "tol_ratio"):
        assert df[col].dtype == np.float64, col
    assert df.passed.dtype == bool
    assert str(df.layer.dtype) == "Int64" and pd.isna(df.layer[0]) and df.layer[1] == 0
    assert df["shape"][0] == (3, 6)  # tuples, so the column can be grouped on


def test_failures_and_nonfinite_values_are_numbers():
    df = load_results(_result())
    failed = df[~df.passed]
    assert list(zip(failed.step, failed.stage)) == [(1, "L0.att.wkv"), (1, "logits")]
    wkv = failed.iloc[0]
    assert wkv.reason == "tolerance" and wkv.row == 0 and wkv.max_abs == pytest.approx(1.0)
    assert wkv.tol_ratio == pytest.approx(wkv.min_atol / wkv.atol) and wkv.tol_ratio > 1
    logits = failed.iloc[1]
    assert logits.reason == "nonfinite" and math.isinf(logits.tol_ratio)
    assert (df[df.passed].tol_ratio <= 1).all()  # min_atol / atol <= 1 exactly when a record passes


def test_file_directory_and_dict_give_the_same_frame(tmp_path):
    result = _result()
    (tmp_path / "result.json").write_text(json.dumps(result, allow_nan=False))
    from_dict = load_results(result)
    pd.testing.assert_frame_equal(load_results(tmp_path / "result.json"), from_dict)
    pd.testing.assert_frame_equal(load_results(str(tmp_path)), from_dict)


def test_unreadable_sources_are_parity_errors(tmp_path):
    with pytest.raises(ParityError, match="without result.json"):
        load_results(tmp_path)
    with pytest.raises(ParityError, match="no result file"):
        load_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ParityError, match="not valid JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ParityError, match="not a comparison result"):
        load_results(tmp_path / "list.json")
    with pytest.raises(ParityError, match="cannot read a comparison result"):
        load_results(42)


def test_empty_result_gives_an_empty_frame_with_the_columns():
    df = load_results({"records": []})
    assert len(df) == 0
    assert {"step", "stage", "max_abs", "tol_ratio", "backend_actual", "backend_expected"} <= set(df.columns)


def test_records_to_csv_round_trips(tmp_path):
    result = _result()
    out = records_to_csv(result, tmp_path / "sub" / "records.csv")
    assert out == tmp_path / "sub" / "records.csv"
    back = pd.read_csv(out)
    assert list(back.stage) == [r["stage"] for r in result["records"]]
    assert back.loc[~back.passed, "stage"].tolist() == ["L0.att.wkv", "logits"]
    assert np.isinf(back.tol_ratio).sum() == 1
    stream = io.StringIO()
    assert records_to_csv(result, stream) is None
    assert stream.getvalue() == out.read_text()


def test_package_exports_load_results_lazily():
    import parity

    assert parity.load_results is load_results
    # ... and load_result, the typed RunResult of one result (what the renderers read).
    from parity.report.frame import load_result
    from parity.results import RunResult

    assert parity.load_result is load_result and isinstance(parity.load_result(_result()), RunResult)
    # parity/__init__.py runs before every parity.* import; it must not drag pandas into parity.compare.
    code = ("import sys, parity, parity.compare; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'torch', 'tvm')); "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"import parity.compare pulled in: {proc.stdout.strip()} {proc.stderr.strip()}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        parity.nope  # noqa: B018
