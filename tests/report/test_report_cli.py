"""``parity report SOURCE``: re-renders saved results, re-compares a --dump-dir, exits 0 / 1 / 2."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from parity.compare import MemoryRun, StepInfo, TolerancePolicy, compare_runs
from parity.dumpers.format import DumpWriter
from parity.report.cli import add_report_parser, cmd_report, main

REPO = Path(__file__).resolve().parents[2]
ORDER = ["emb", "L0.att.wkv", "logits", "state.L0.att_kv"]
STEPS = [StepInfo(0, "prefill", [1, 2]), StepInfo(1, "decode", [3])]


def _arrays(*, bump: float) -> dict:
    rng = np.random.default_rng(2)
    arrays = {s.index: {n: rng.standard_normal((4,) if n.startswith("state.") else (len(s.ids), 4)).astype(np.float32)
                        for n in ORDER} for s in STEPS}
    arrays[1]["L0.att.wkv"][0, 1] += bump
    return arrays


def _result_file(tmp_path: Path, *, bump: float, name: str = "result.json") -> Path:
    def run(arrays, backend):
        return MemoryRun(steps=STEPS, stage_order=ORDER, dtype="float32", arrays=arrays,
                         description={"backend": backend, "mode": "m", "dtype": "float32"})

    result = compare_runs(actual=run(_arrays(bump=bump), "tvm"), expected=run(_arrays(bump=0.0), "reference"),
                          policy=TolerancePolicy.for_dtype("float32")).to_dict()
    path = tmp_path / name
    path.write_text(json.dumps(result, allow_nan=False))
    return path


def _dump(path: Path, *, backend: str, bump: float) -> None:
    with DumpWriter(path=path, backend=backend, mode="m", dtype="float32", model={"n_layer": 1},
                    stage_order=ORDER) as writer:
        for step, arrays in zip(STEPS, _arrays(bump=bump).values()):
            with writer.step(kind=step.kind, ids=step.ids) as s:
                for name in ORDER:
                    s.add(name, arrays[name])


def test_renders_every_output_from_a_divergent_result(tmp_path, capsys):
    source = _result_file(tmp_path, bump=1.0)
    out = tmp_path / "out"
    code = main([str(source), "--html", str(out / "r.html"), "--markdown", str(out / "r.md"),
                 "--csv", str(out / "r.csv"), "--html-link", "https://ci/r.html"])
    assert code == 1
    assert "L0.att.wkv" in (out / "r.html").read_text() and "First divergence" in (out / "r.html").read_text()
    md = (out / "r.md").read_text()
    assert md.startswith("### \u274c") and "[Full HTML report](https://ci/r.html)" in md
    assert len(pd.read_csv(out / "r.csv")) == len(ORDER) * len(STEPS)
    printed = capsys.readouterr().out
    assert "DIVERGENCE: first divergence: decode step 1, layer 0, stage L0.att.wkv" in printed
    assert f"HTML report: {out / 'r.html'}" in printed


def test_clean_result_exits_zero_and_dash_writes_to_stdout(tmp_path, capsys):
    source = _result_file(tmp_path, bump=0.0)
    assert main([str(source), "--markdown", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("### \u2705 rwkv-parity: no divergence")
    assert captured.out.rstrip().endswith("({HTML_REPORT_URL})")  # nothing but the document on stdout
    assert "no divergence (8 records" in captured.err


def test_csv_to_stdout_is_parseable(tmp_path, capsys):
    assert main([str(_result_file(tmp_path, bump=1.0)), "--csv", "-", "-q"]) == 1
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert frame.loc[~frame.passed, "stage"].tolist() == ["L0.att.wkv"]


def test_directory_with_result_json(tmp_path, capsys):
    _result_file(tmp_path, bump=1.0)
    assert main([str(tmp_path), "--html", str(tmp_path / "r.html"), "-q"]) == 1
    assert (tmp_path / "r.html").is_file()


def test_dump_dir_is_recompared_against_the_reference(tmp_path, capsys):
    _dump(tmp_path / "dumps" / "reference", backend="reference", bump=0.0)
    _dump(tmp_path / "dumps" / "tvm", backend="tvm", bump=0.5)
    (tmp_path / "dumps" / "notes").mkdir()  # not a dump: ignored
    assert main([str(tmp_path / "dumps"), "--markdown", str(tmp_path / "r.md")]) == 1
    md = (tmp_path / "r.md").read_text()
    assert "**tvm** (m, float32) vs **reference** (m, float32)" in md
    assert "decode step 1, layer 0, stage `L0.att.wkv`" in md
    assert f"parity diff {tmp_path / 'dumps' / 'reference'} {tmp_path / 'dumps' / 'tvm'}" in md


@pytest.mark.parametrize("case", ["missing", "bad-json", "not-a-result", "single-dump", "three-dumps", "two-stdout"])
def test_unreadable_input_exits_2_with_one_line(tmp_path, capsys, case):
    argv = None
    if case == "missing":
        argv, expect = [str(tmp_path / "nope.json")], "no such file or directory"
    elif case == "bad-json":
        (tmp_path / "r.json").write_text("{")
        argv, expect = [str(tmp_path / "r.json")], "not valid JSON"
    elif case == "not-a-result":
        (tmp_path / "r.json").write_text('{"format": "rwkv-parity-dump"}')
        argv, expect = [str(tmp_path / "r.json")], "not a comparison result"
    elif case == "single-dump":
        _dump(tmp_path / "reference", backend="reference", bump=0.0)
        argv, expect = [str(tmp_path / "reference")], "single dump"
    elif case == "three-dumps":
        for name in ("reference", "tvm", "tvm-instrumented"):
            _dump(tmp_path / name, backend=name, bump=0.0)
        argv, expect = [str(tmp_path)], "dumps found: reference, tvm, tvm-instrumented"
    else:
        argv, expect = [str(_result_file(tmp_path, bump=0.0)), "--html", "-", "--csv", "-"], "only one output"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("parity: error: ") and expect in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_add_report_parser_and_cmd_report_plug_into_a_parity_style_cli(tmp_path):
    ap = argparse.ArgumentParser(prog="parity")
    sub = ap.add_subparsers(dest="command", required=True)
    returned = add_report_parser(sub)
    assert isinstance(returned, argparse.ArgumentParser)
    args = ap.parse_args(["report", str(_result_file(tmp_path, bump=1.0)), "--csv", str(tmp_path / "r.csv")])
    assert args.command == "report" and args.html is None and args.markdown is None
    console = Console(file=io.StringIO(), record=True, width=400)
    assert cmd_report(args, console) == 1
    assert "CSV records: " in console.export_text() and (tmp_path / "r.csv").is_file()


def test_module_runs_as_a_command(tmp_path):
    source = _result_file(tmp_path, bump=1.0)
    proc = subprocess.run([sys.executable, "-m", "parity.report.cli", str(source), "--markdown", "-"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "**First divergence:** decode step 1, layer 0, stage `L0.att.wkv`" in proc.stdout
    assert proc.stderr.startswith("DIVERGENCE: ")


def test_no_output_flag_gives_a_hint_and_still_the_verdict(tmp_path, capsys):
    source = _result_file(tmp_path, bump=1.0)
    assert main([str(source)]) == 1
    captured = capsys.readouterr()
    assert "nothing written; add --html PATH, --markdown PATH or --csv PATH" in captured.err
    assert captured.out.startswith("DIVERGENCE:")
    assert main([str(source), "-q"]) == 1 and "nothing written" not in capsys.readouterr().err  # quiet asked for none
