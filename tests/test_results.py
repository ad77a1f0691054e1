"""The typed, versioned result (parity/results.py): round trip, old files, newer files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parity.cli import main
from parity.errors import ParityError
from parity.results import RESULT_VERSION, Crash, Drift, EndToEnd, OwnError, PairResult, RunResult

REPO = Path(__file__).resolve().parents[1]
L4 = str(REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("results") / "r.json"
    assert main(["run", "--checkpoint", L4, "--backends", "reference,chatrwkv", "--decode-steps", "2", "--json", str(out), "-q"]) == 0
    return json.loads(out.read_text())


def test_a_run_writes_the_current_format_with_typed_blocks(result):
    assert result["format"] == {"name": "rwkv-parity-result", "version": RESULT_VERSION}
    typed = RunResult.from_dict(result)
    assert isinstance(typed.end_to_end, EndToEnd) and typed.end_to_end.rows == 10 + 2  # ten prompt rows, two decode steps
    assert isinstance(typed.drift, Drift) and isinstance(typed.own_error, OwnError)
    assert typed.own_errors["chatrwkv"].method == "replay" and typed.passed


def test_round_trip_is_lossless(result):
    assert RunResult.from_dict(result).to_dict() == result


def test_every_pair_is_written_also_for_two_backends(result):
    (pair,) = RunResult.from_dict(result).comparisons
    assert isinstance(pair, PairResult) and (pair.expected, pair.actual) == ("reference", "chatrwkv")
    assert pair.records and pair.verdict == pair.compared_verdict == "no divergence"


def test_a_crash_is_typed_and_fails_the_result(result):
    # As run_parity writes it for a backend that died in its worker (tests/test_crash.py runs them).
    crash = {"backend": "tvm", "name": "tvm", "kind": "crashed", "error": "died with SIGSEGV", "step": 3,
             "step_kind": "decode", "steps_completed": 3, "last_stage": {"step": 2, "stage": "logits"},
             "kernel": "wkv5", "signal": "SIGSEGV", "exitcode": -11,
             "compared": {"against": "reference", "steps": 3, "verdict": "no divergence", "first_divergence": None}}
    d = {**result, "verdict": "crashed", "crash": crash, "crashes": [crash]}
    typed = RunResult.from_dict(d)
    assert isinstance(typed.crash, Crash) and typed.crash.signal == "SIGSEGV" and typed.crashes[0].kernel == "wkv5"
    assert not typed.passed  # no first divergence, and still a failed run
    assert RunResult.from_dict(typed.to_dict()).to_dict() == typed.to_dict()


def test_unknown_keys_survive_a_round_trip(result):
    d = {**result, "later_addition": {"x": 1}}
    assert RunResult.from_dict(d).to_dict()["later_addition"] == {"x": 1}


def test_a_first_release_result_without_format_still_reads(result):
    old = {k: v for k, v in result.items() if k not in ("format", "drift", "own_error", "own_errors", "end_to_end", "pair")}
    assert RunResult.from_dict(old).verdict == "no divergence"


def test_a_newer_format_is_refused_in_one_line(result, tmp_path, capsys):
    newer = {**result, "format": {"name": "rwkv-parity-result", "version": RESULT_VERSION + 1}}
    with pytest.raises(ParityError, match="newer rwkv-parity"):
        RunResult.from_dict(newer)
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(newer))
    assert main(["report", str(path), "--markdown", "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer rwkv-parity" in err[0]


@pytest.mark.parametrize("bad", [[], {"verdict": "no divergence"}, {"records": [], "verdict": "x", "format": "v2"}])
def test_not_a_result_is_refused(bad):
    with pytest.raises(ParityError, match="not a parity result"):
        RunResult.from_dict(bad)


def test_records_divergences_and_run_are_typed(result):
    from parity.results import Record, RunInfo, Summary

    typed = RunResult.from_dict(result)
    assert all(isinstance(r, Record) for r in typed.records) and len(typed.records) == result["summary"]["records"]
    assert typed.records[0].stage == result["records"][0]["stage"] and typed.records[0].passed is True
    assert isinstance(typed.summary, Summary) and typed.summary.records == len(typed.records)
    assert isinstance(typed.run, RunInfo) and typed.run.backends == ["reference", "chatrwkv"]
    assert all(isinstance(r, Record) for r in typed.comparisons[0].records)


def test_a_divergence_is_typed_with_how_it_was_judged(result):
    from parity.results import Divergence

    record = dict(result["records"][3], passed=False, reason="tolerance", judged_by="replay")
    typed = RunResult.from_dict({**result, "verdict": "divergence", "first_divergence": record})
    fd = typed.first_divergence
    assert isinstance(fd, Divergence) and fd.judged_by == "replay" and fd.stage == record["stage"]
    assert fd.min_atol == record["min_atol"] and not typed.passed and typed.failed
    assert typed.to_dict()["first_divergence"] == record


def test_a_block_writes_back_only_the_keys_it_was_read_with(result):
    # A pair's end_to_end has no per_step / kl_rows; read and written, it must not grow them.
    pair = RunResult.from_dict(result).comparisons[0].to_dict()
    assert "per_step" not in pair["end_to_end"] and pair == result["comparisons"][0]
    record = {**result["records"][0], "a_later_metric": 0.5}
    del record["min_rtol"]
    again = RunResult.from_dict({**result, "records": [record]}).to_dict()["records"][0]
    assert again == record and list(again) == list(record)


def test_a_malformed_block_is_refused_in_one_line(result):
    with pytest.raises(ParityError, match="a malformed parity result: divergence must be a JSON object"):
        RunResult.from_dict({**result, "first_divergence": [1, 2]})
    with pytest.raises(ParityError, match="a malformed parity result: records must be a list"):
        RunResult.from_dict({**result, "records": {"a": 1}})


def test_the_verdict_line_reads_the_typed_result_and_its_json_alike(result):
    from parity.report.verdict import verdict_line

    typed = RunResult.from_dict(result)
    line = verdict_line(typed)
    assert line == verdict_line(result) and line.startswith(f"no divergence ({len(typed.records)} records")
    crash = {"backend": "tvm", "name": "tvm", "kind": "crashed", "error": "died with SIGSEGV", "step": 1,
             "step_kind": "decode", "steps_completed": 1, "signal": "SIGSEGV",
             "compared": {"against": "reference", "steps": 1, "verdict": "no divergence", "first_divergence": None}}
    crashed = {**result, "verdict": "crashed", "crash": crash, "crashes": [crash]}
    assert verdict_line(RunResult.from_dict(crashed)) == verdict_line(crashed) == (
        "CRASHED: tvm died with SIGSEGV at decode step 1 (step 0 compared against reference: no divergence)")


def test_load_result_reads_a_file_a_directory_and_a_dict(result, tmp_path):
    from parity.report.frame import load_result

    (tmp_path / "result.json").write_text(json.dumps(result))
    for source in (tmp_path / "result.json", tmp_path, result):
        assert load_result(source).to_dict() == result


def test_a_fresh_run_writes_every_field_of_its_blocks(result):
    # Assembled typed (session.py), a run's blocks are written whole, as the format has them: an
    # own_errors entry carries "backend" (null) like own_error does, a pair every PairResult field.
    from dataclasses import fields

    declared = {f.name for f in fields(OwnError)} - {"extra"}
    assert set(result["own_errors"]["chatrwkv"]) == declared and set(result["own_error"]) == declared
    assert set(result["comparisons"][0]) == {f.name for f in fields(PairResult)} - {"extra"}
    assert set(result["drift"]) == {f.name for f in fields(Drift)} - {"extra"}


def test_the_reports_take_the_typed_result_and_its_json_alike(result):
    from parity.report.html import render_html
    from parity.report.markdown import render_markdown

    typed = RunResult.from_dict(result)
    assert render_markdown(typed) == render_markdown(result)
    assert render_html(typed, title="t") == render_html(result, title="t")


def test_modes_are_typed_and_a_mode_that_did_not_run_stays_null(result):
    from parity.results import ModeVerdict, Summary

    typed = RunResult.from_dict(result)
    assert set(typed.modes) == {"propagated", "replay"}  # the default replay run: both verdicts side by side
    assert all(isinstance(m, ModeVerdict) and isinstance(m.summary, Summary) for m in typed.modes.values())
    assert typed.modes["replay"].summary.records == result["modes"]["replay"]["summary"]["records"]
    d = {**result, "modes": {**result["modes"], "isolated": None}}
    again = RunResult.from_dict(d)
    assert again.modes["isolated"] is None and again.to_dict() == d
    with pytest.raises(ParityError, match="a malformed parity result: ownerror must be a JSON object"):
        RunResult.from_dict({**result, "own_errors": {"chatrwkv": None}})  # null means "not run" in modes only


def test_a_block_set_as_plain_data_is_typed_as_it_is_set(result):
    # session.py sets modes as dicts; every reader (cli, HTML, bisect) then reads attributes.
    from parity.results import Divergence, ModeVerdict

    typed = RunResult.from_dict(result)
    record = dict(result["records"][3], passed=False, reason="tolerance")
    plain = {"verdict": "divergence", "first_divergence": record, "summary": result["summary"]}
    typed.modes = {"propagated": plain, "isolated": None}
    mode = typed.modes["propagated"]
    assert isinstance(mode, ModeVerdict) and isinstance(mode.first_divergence, Divergence)
    assert mode.first_divergence.stage == record["stage"] and mode["verdict"] == "divergence"
    assert typed.to_dict()["modes"] == {"propagated": plain, "isolated": None}


def test_drift_records_the_explanation_and_the_prompt_have_typed_homes(result):
    from parity.results import Divergence

    record = dict(result["records"][3], passed=False, reason="tolerance")
    explanation = {"status": "explained", "summary": "explained: GroupNorm eps", "hypotheses": []}
    run = {**result["run"], "template": "chatrwkv", "text": "User: hi", "vocab_folded": False, "greedy": {"steps": 2}}
    d = {**result, "drift": {**result["drift"], "first_over_tolerance": record}, "run": run, "explanation": explanation}
    typed = RunResult.from_dict(d)
    assert isinstance(typed.drift.first_over_tolerance, Divergence) and typed.drift.first_over_tolerance.stage == record["stage"]
    assert typed.explanation == explanation and "explanation" not in typed.extra
    assert (typed.run.template, typed.run.text, typed.run.greedy) == ("chatrwkv", "User: hi", {"steps": 2})
    assert not {"template", "text", "greedy"} & set(typed.run.extra)
    assert json.dumps(typed.to_dict()) == json.dumps(d)  # the same keys in the same order: the format is unchanged
