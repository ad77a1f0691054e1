"""The explain commands as a user runs them: ``parity explain RESULT.json``, ``parity run --explain``,
``parity bisect --explain``; bad input is one line and exit 2. Plug-in ports only (no compile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from parity_cli import cli_env, run_cli, run_concurrently

REPO = Path(__file__).resolve().parents[2]
L4 = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"
PORTS = Path(__file__).with_name("test_engine.py")
ODD_EPS = f"{PORTS}:odd_eps_port"
UNLISTED = f"{PORTS}:double_bonus_port"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain-cli")
    common = ["--checkpoint", L4, "--ids", "5,9,300,2,77,4", "--decode-steps", "1"]
    return tmp, run_concurrently({
        "explained": ["run", *common, "--backends", f"reference,{ODD_EPS}", "--dump-dir", tmp / "d1",
                      "--json", tmp / "r1.json", "--explain"],
        "unlisted": ["run", *common, "--backends", f"reference,{UNLISTED}", "--dump-dir", tmp / "d2",
                     "--json", tmp / "r2.json"],
        "bisect": ["bisect", *common, "--backends", f"reference,{ODD_EPS}", "--json", tmp / "b.json", "--explain"],
    }, env=cli_env())


def test_run_explain_prints_and_stores_the_likely_cause(runs):
    _, out = runs
    r = out["explained"]
    assert r.rc == 1, r  # still a divergence: explaining it changes no verdict
    assert "likely cause: explained: GroupNorm eps (fitted eps" in r.stdout, r
    assert "fix: use eps = 64e-5" in r.stdout
    e = r.result["explanation"]
    assert e["status"] == "explained" and e["hypotheses"][0]["name"] == "groupnorm-eps"


def test_explain_on_a_saved_result(runs):
    tmp, out = runs
    assert out["unlisted"].rc == 1, out["unlisted"]
    again = run_cli(["explain", tmp / "r1.json", "--json", tmp / "e1.json"], env=cli_env())
    assert again.rc == 0, again
    assert again.result["explanation"]["hypotheses"][0]["name"] == "groupnorm-eps"
    assert again.result["verdict"] == out["explained"].result["verdict"]  # the result, with its explanation added
    unlisted = run_cli(["explain", tmp / "r2.json", "-q"], env=cli_env())
    assert unlisted.rc == 1, unlisted
    assert unlisted.stdout.strip().startswith("likely cause: not explained by any known porting bug")


def test_bisect_explain(runs):
    _, out = runs
    b = out["bisect"]
    assert b.rc == 1, b
    assert "bisect: first faulty stage L0.att.ln_x" in b.stdout
    assert b.result["explanation"]["status"] == "explained"
    assert b.result["explanation"]["hypotheses"][0]["name"] == "groupnorm-eps"


def test_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    out = run_concurrently({
        "missing": ["explain", tmp_path / "nope.json"],
        "junk": ["explain", tmp_path / "junk.json"],
        "list": ["explain", tmp_path / "list.json"],
        "bad-hypothesis": ["explain", tmp_path / "list.json", "--hypothesis", "nocolon"],
    }, env=cli_env())
    for name, r in out.items():
        assert r.rc == 2, r
        assert len(r.error_lines) == 1 and "Traceback" not in r.stderr, (name, r)
    assert "not found" in out["missing"].stderr
    assert "not a parity" in out["junk"].stderr and "not a parity" in out["list"].stderr
    assert "module:attribute" in out["bad-hypothesis"].stderr


def test_a_result_of_a_run_without_dump_dir_says_how_to_keep_them(runs, tmp_path):
    tmp, _ = runs
    result = json.loads((tmp / "r2.json").read_text())
    result["run"].pop("dumps")
    (tmp_path / "r.json").write_text(json.dumps(result))
    r = run_cli(["explain", tmp_path / "r.json"], env=cli_env())
    assert r.rc == 2 and "--dump-dir" in r.stderr, r
