"""The typed, versioned result (parity/results.py): round trip, old files, newer files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parity.cli import main
from parity.errors import ParityError
from parity.results import RESULT_VERSION, Drift, EndToEnd, OwnError, RunResult

REPO = Path(__file__).resolve().parents[1]
L4 = str(REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("results") / "r.json"
    assert main(["run", "--checkpoint", L4, "--backends", "reference,chatrwkv", "--decode-steps", "2", "--json", str(out), "-q"]) == 0
    return json.loads(out.read_text())


def test_a_run_writes_format_2_with_typed_blocks(result):
    assert result["format"] == {"name": "rwkv-parity-result", "version": RESULT_VERSION}
    typed = RunResult.from_dict(result)
    assert isinstance(typed.end_to_end, EndToEnd) and typed.end_to_end.rows == 10 + 2  # ten prompt rows, two decode steps
    assert isinstance(typed.drift, Drift) and isinstance(typed.own_error, OwnError)
    assert typed.own_errors["chatrwkv"].method == "replay" and typed.passed


def test_round_trip_is_lossless(result):
    assert RunResult.from_dict(result).to_dict() == result


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
