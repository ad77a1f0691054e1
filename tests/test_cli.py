"""The ``parity`` command as a user runs it: exit codes, JSON, one-line errors, never a traceback.

Every command runs in a subprocess, and each costs a second or more of start-up (torch, TVM). So
the commands run in two waves, as many at once as there are CPUs: first everything independent,
then the diffs that need the first run's dumps. The tests themselves only look at the results.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from parity.stages import stage_info, stage_order
from parity_cli import REPO, cli_env, run_concurrently

FIXTURE = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"  # L4 C128 H2 N64 V1024
N_LAYER, VOCAB = 4, 1024


@pytest.fixture(scope="session")
def env(compile_cache) -> dict[str, str]:
    return cli_env()  # the session's compile cache (tests/conftest.py), plain text at 200 columns


# name -> (arguments, text the one error line must contain). Files are created by the fixture.
ERROR_CASES = {
    "missing checkpoint": (["run", "--checkpoint", "{tmp}/missing.pth"], "not found"),
    "corrupt checkpoint": (["run", "--checkpoint", "{tmp}/garbage.pth"], "garbage.pth"),
    "bad --ids": (["run", "--checkpoint", FIXTURE, "--ids", "1,x"], "bad token ids '1,x'"),
    "id >= vocab": (["run", "--checkpoint", FIXTURE, "--ids", f"0,{VOCAB}"], f"error: token id {VOCAB} is outside"),  # the user's --ids, not a "scenario"
    "unknown scenario name": (["run", "--scenario", "chat-helo"],
                              "no bundled scenario of that name; bundled: chat-hello, multilingual, ones"),
    "unknown backend": (["run", "--checkpoint", FIXTURE, "--backends", "reference,tvmm"],
                        "unknown backend 'tvmm'; did you mean 'tvm'?"),
    "misspelt mutant": (["run", "--checkpoint", FIXTURE, "--backends", "reference,mutant/sigmoid_r"],
                        "unknown mutant 'sigmoid_r'; did you mean 'sigmoid-r'?"),
    "diff of a directory that is not a dump": (["diff", "{tmp}/not-a-dump", "{tmp}/not-a-dump"], "not a dump"),
    "bad --tol text": (["run", "--checkpoint", FIXTURE, "--tol", "L*.att.wkv=1e-5"], "bad tolerance override"),
    "empty --ids": (["run", "--checkpoint", FIXTURE, "--ids", ""], "--ids is empty"),
    "blank --decode-ids": (["run", "--checkpoint", FIXTURE, "--decode-ids", "  "], "--decode-ids is empty"),
    "existing --json": (["run", "--checkpoint", FIXTURE, "--json", "{tmp}/taken.json"],
                        "taken.json exists (a file); pass --force to overwrite it"),
    "existing --dump-dir": (["run", "--checkpoint", FIXTURE, "--dump-dir", "{tmp}/not-a-dump"],
                            "not-a-dump exists (a directory); pass --force"),
}
# argparse's own errors: no torch import, so these cost almost nothing.
ARGPARSE_CASES = {
    "unknown option": (["run", "--checkpoint", FIXTURE, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "no subcommand": ([], "required"),
    "run without --checkpoint": (["run"], "--checkpoint"),
    "non-integer --decode-steps": (["run", "--checkpoint", FIXTURE, "--decode-steps", "two"], "--decode-steps"),
    "space-separated --ids": (["run", "--checkpoint", FIXTURE, "--ids", "1", "2", "3"],
                              "unrecognized arguments: 2 3 (see parity run --help)"),
}


@pytest.fixture(scope="module")
def first_wave(env, tmp_path_factory):
    """The main run (keeping its dumps), the quiet instrumented run, and every error case."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "garbage.pth").write_bytes(random.Random(0).randbytes(4096))
    (tmp / "taken.json").write_text('{"keep": "me"}\n')  # valid JSON: the helper reads a --json path back
    (tmp / "not-a-dump").mkdir()
    (tmp / "not-a-dump" / "notes.txt").write_text("not a manifest")
    out = tmp / "out"
    commands = {
        "run": ["run", "--checkpoint", FIXTURE, "--decode-steps", 2, "--json", out / "result.json",
                "--html", out / "report.html", "--dump-dir", out / "dumps"],
        "bundled scenario by name": ["run", "--scenario", "ones", "--backends", "reference,chatrwkv", "--quiet"],
        # A reference-side mutant: a bisect that compiles nothing.
        "bisect": ["bisect", "--checkpoint", FIXTURE, "--backends", "reference,mutant/reference-sigmoid-r",
                   "--ids", "ones:3", "--decode-steps", 1, "--json", out / "bisect.json", "--html", out / "bisect.html",
                   "--quiet"],
        # Quiet as well: one run checks both, and each run costs seconds.
        "instrumented": ["run", "--checkpoint", FIXTURE, "--backends", "reference,tvm-instrumented",
                         "--ids", "ones:3", "--decode-steps", 1, "--quiet"],
    }
    for name, (args, _) in {**ERROR_CASES, **ARGPARSE_CASES}.items():
        commands[name] = [str(a).format(tmp=tmp) for a in args]
    return {"out": out, "results": run_concurrently(commands, env=env)}


# -- tampering with a saved dump --------------------------------------------------------------


def step_file(dump: Path, step: int) -> Path:
    manifest = json.loads((dump / "manifest.json").read_text())
    return dump / manifest["steps"][step]["file"]


def tamper(dump: Path, *, step: int, stage: str, change) -> None:
    """Rewrite one array of one step file in place, keeping the file's header metadata."""
    path = step_file(dump, step)
    with safe_open(path, "np") as f:
        metadata = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    before = arrays[stage].copy()
    change(arrays[stage])
    assert not np.array_equal(before, arrays[stage]), "the tamper changed nothing"
    save_file(arrays, path, metadata=metadata)


def scale_row_3(a: np.ndarray) -> None:
    # Far outside the default fp32 tolerance, yet within |a-b| <= 1 + 1*|b|: the '*=1,1'
    # override below must pass it.
    a[3] = a[3] * 1.5 + 0.5


def bump_one_state_element(a: np.ndarray) -> None:
    a[1, 5, 7] += 10.0 + abs(a[1, 5, 7])


@pytest.fixture(scope="module")
def second_wave(first_wave, env, tmp_path_factory):
    """Diffs of tampered copies of the first run's dumps (untouched, they passed in the run)."""
    run = first_wave["results"]["run"]
    dumps = first_wave["out"] / "dumps"
    assert (dumps / "reference" / "manifest.json").is_file() and (dumps / "tvm" / "manifest.json").is_file(), (
        f"the main run left no dumps to tamper with:\n{run}"
    )
    tmp = tmp_path_factory.mktemp("tampered")
    wkv = shutil.copytree(dumps / "tvm", tmp / "wkv" / "tvm")
    tamper(wkv, step=0, stage="L2.att.wkv", change=scale_row_3)
    state = shutil.copytree(dumps / "tvm", tmp / "state" / "tvm")
    tamper(state, step=2, stage="state.L1.att_kv", change=bump_one_state_element)
    ref = dumps / "reference"
    commands = {
        "wkv diff": ["diff", ref, wkv, "--json", tmp / "wkv.json"],
        "wkv diff, loosened": ["diff", ref, wkv, "--tol", "*=1,1", "--json", tmp / "wkv-loose.json"],
        "state diff": ["diff", ref, state, "--json", tmp / "state.json"],
    }
    results = run_concurrently(commands, env=env)
    json_paths = {name: Path(args[args.index("--json") + 1]) for name, args in commands.items()}
    return {"results": results, "json": json_paths}


def read_json(second_wave, name: str) -> dict:
    path = second_wave["json"][name]
    assert path.is_file(), f"no JSON written:\n{second_wave['results'][name]}"
    return json.loads(path.read_text())


def failed_records(result: dict) -> list[tuple[int, str]]:
    return [(r["step"], r["stage"]) for r in result["records"] if not r["passed"]]


# -- parity run -------------------------------------------------------------------------------


def test_run_exits_0_and_prints_the_verdict(first_wave):
    cli = first_wave["results"]["run"]
    assert cli.rc == 0, cli
    assert "Traceback" not in cli.stderr, cli
    assert cli.stdout.strip().splitlines()[-1].startswith("no divergence"), cli


def test_run_json_has_the_verdict_and_every_record(first_wave):
    path = first_wave["out"] / "result.json"
    assert path.is_file(), first_wave["results"]["run"]
    result = json.loads(path.read_text())
    assert "first_divergence" in result and result["first_divergence"] is None
    assert result["verdict"] == "no divergence"
    records = result["records"]
    assert all({"step", "stage", "layer"} <= r.keys() for r in records)
    order = stage_order(n_layer=N_LAYER)
    for step in (0, 1, 2):  # prefill + 2 decode steps, every canonical stage in each
        assert [r["stage"] for r in records if r["step"] == step] == order
    assert {r["step"] for r in records} == {0, 1, 2}
    assert all(r["layer"] == stage_info(r["stage"]).layer for r in records)
    run = result["run"]
    assert run["backends"] == ["reference", "tvm"]
    assert run["prefill_ids"] == [1] * 10  # the default --ids ones:10
    assert len(run["decode_ids"]) == 2 and all(0 <= i < VOCAB for i in run["decode_ids"])
    assert run["model"]["n_layer"] == N_LAYER and run["model"]["vocab_size"] == VOCAB


def test_run_writes_html_and_keeps_the_dumps(first_wave):
    out = first_wave["out"]
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "L0.att.wkv" in html
    for backend in ("reference", "tvm"):
        manifest = json.loads((out / "dumps" / backend / "manifest.json").read_text())
        assert manifest["complete"] is True and len(manifest["steps"]) == 3


def test_run_with_the_instrumented_backend(first_wave):
    cli = first_wave["results"]["instrumented"]
    assert cli.rc == 0, cli
    assert "Traceback" not in cli.stderr, cli
    assert cli.stdout.strip().splitlines()[-1].startswith("no divergence"), cli


def test_bisect_writes_json_and_html_and_quiet_prints_one_line(first_wave):
    cli = first_wave["results"]["bisect"]
    assert cli.rc == 1, cli
    assert cli.stdout.strip().splitlines() == ["bisect: first faulty stage L0.att.r at step 0 (prefill), layer 0"], cli
    outcome = json.loads((first_wave["out"] / "bisect.json").read_text())
    assert outcome["found"]["stage"] == "L0.att.r" and outcome["decisions"] and outcome["repro"].startswith("parity run")
    assert "L0.att.r" in (first_wave["out"] / "bisect.html").read_text()


def test_a_bundled_scenario_runs_by_name(first_wave):
    cli = first_wave["results"]["bundled scenario by name"]
    assert cli.rc == 0 and cli.stdout.startswith("no divergence"), cli


def test_quiet_prints_only_the_verdict_line(first_wave):
    cli = first_wave["results"]["instrumented"]
    assert cli.rc == 0, cli
    assert len(cli.stdout.strip().splitlines()) == 1, cli
    assert cli.stdout.startswith("no divergence"), cli
    assert "preparing backend" not in cli.stderr and "reference steps" not in cli.stderr, cli  # no progress either


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "parity"
    assert script.is_file(), f"no `parity` console script next to {sys.executable}"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all(cmd in proc.stdout for cmd in ("run", "diff", "demo"))


# -- parity diff ------------------------------------------------------------------------------


def test_diff_names_the_tampered_prefill_stage_and_row(second_wave):
    cli = second_wave["results"]["wkv diff"]
    assert cli.rc == 1, cli
    assert "Traceback" not in cli.stderr, cli
    result = read_json(second_wave, "wkv diff")
    fd = result["first_divergence"]
    assert (fd["step"], fd["step_kind"], fd["layer"], fd["stage"], fd["row"]) == (0, "prefill", 2, "L2.att.wkv", 3)
    assert fd["worst_index"][0] == 3
    assert failed_records(result) == [(0, "L2.att.wkv")]  # nothing else was touched
    verdict = cli.stdout.strip().splitlines()[-1]
    assert verdict.startswith("DIVERGENCE") and "L2.att.wkv" in verdict and "token row 3" in verdict, cli


def test_diff_names_the_tampered_decode_step(second_wave):
    cli = second_wave["results"]["state diff"]
    assert cli.rc == 1, cli
    assert "Traceback" not in cli.stderr, cli
    result = read_json(second_wave, "state diff")
    fd = result["first_divergence"]
    assert (fd["step"], fd["step_kind"], fd["layer"], fd["stage"]) == (2, "decode", 1, "state.L1.att_kv")
    assert list(fd["worst_index"]) == [1, 5, 7]
    assert failed_records(result) == [(2, "state.L1.att_kv")]
    assert "decode step 2" in cli.stdout and "state.L1.att_kv" in cli.stdout, cli


def test_tol_override_that_loosens_everything_passes_the_tampered_dump(second_wave):
    cli = second_wave["results"]["wkv diff, loosened"]
    assert cli.rc == 0, cli
    result = read_json(second_wave, "wkv diff, loosened")
    assert result["first_divergence"] is None
    assert result["policy"]["overrides"][0]["pattern"] == "*"


# -- usage and input errors: exit 2, one line, no traceback -----------------------------------


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_input_error_is_one_line_and_exit_2(first_wave, name):
    cli = first_wave["results"][name]
    assert cli.rc == 2, cli
    assert "Traceback" not in cli.stderr, cli
    # Only the error line: no usage, no traceback, no progress residue.
    assert cli.stderr.strip().splitlines() == cli.error_lines, cli
    assert len(cli.error_lines) == 1, cli
    assert ERROR_CASES[name][1] in cli.error_lines[0], cli


@pytest.mark.parametrize("name", list(ARGPARSE_CASES))
def test_usage_error_is_one_line_and_exit_2(first_wave, name):
    cli = first_wave["results"][name]
    assert cli.rc == 2, cli
    assert "Traceback" not in cli.stderr, cli
    assert cli.stderr.strip().splitlines() == cli.error_lines, cli  # no usage block: one line
    assert len(cli.error_lines) == 1, cli
    assert ARGPARSE_CASES[name][1] in cli.error_lines[0], cli
    assert cli.stdout == "", cli


def test_reference_device_cuda_without_a_gpu_is_one_line_and_exit_2(capsys, monkeypatch):
    """In this process (no subprocess wave needed: the check comes before the checkpoint is read),
    with torch told it has no GPU, as on a CPU machine, so the test means the same on the GPU machine."""
    import torch

    from parity.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["run", "--checkpoint", str(FIXTURE), "--reference-device", "cuda", "-q"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err, err
    assert err.startswith("parity: error: no CUDA GPU for the torch reference"), err
    assert "--reference-device cpu" in err, err


# -- output read through a pipe, as a CI log reads it -------------------------------------------

FIXTURE_V4 = REPO / "fixtures" / "rwkv4-L2-C64.pth"  # the cheapest model to compile


@pytest.fixture(scope="module")
def piped(tmp_path_factory, compile_cache):
    """No COLUMNS and no terminal: the width is the command's own choice. The long run compiles into
    a cache of its own, so TVM's compile warnings (which a cache hit never prints) would show."""
    fresh = {"PARITY_CACHE_DIR": str(tmp_path_factory.mktemp("fresh-cache"))}
    results = run_concurrently({
        "long run": ["run", "--checkpoint", FIXTURE_V4, "--ids", "ones:3", "--decode-steps", 40],
        "version": ["--version"],
    }, env=cli_env(columns=None, **fresh))
    results |= run_concurrently({"selftest": ["selftest", "--only", "sigmoid-r"]}, env=cli_env(columns=None))
    return results


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("\u2502")]  # rich's body rows: │ ... │


def test_version(piped):
    import importlib.metadata

    cli = piped["version"]
    assert cli.rc == 0 and cli.stdout.strip() == f"parity {importlib.metadata.version('rwkv-parity')}", cli


def test_a_long_run_through_a_pipe_keeps_every_column_and_folds_its_steps(piped):
    cli = piped["long run"]
    assert cli.rc == 0, cli
    assert "\u2026" not in cli.stdout + cli.stderr, cli  # no cut column, number or label
    rows = _table_rows(cli.stdout)
    assert {row.count("\u2502") for row in rows} == {8}, cli  # all seven columns on every row
    labels = [row.split("\u2502")[1].strip() for row in rows]
    # 41 steps in far fewer rows: the first steps, the last, and folded stretches between them
    assert labels[:3] == ["prefill", "decode 1", "decode 2"] and labels[-1] == "decode 40" and len(rows) <= 24, cli
    folded = [label for label in labels if label.endswith("steps)")]
    assert folded and sum(int(label.split("(")[1].split()[0]) for label in folded) + len(rows) - len(folded) == 41
    for row in rows:  # every number whole: a float in full %.3g form
        for cell in row.split("\u2502")[5:8]:
            assert re.fullmatch(r"\s*(-|\d+(\.\d+)?(e[-+]\d+)?)\s*", cell), row
    assert "Fast mode segfaults" not in cli.stderr and "compiling" in cli.stderr, cli  # a compile, its warning hidden


def test_selftest_through_a_pipe_keeps_every_column(piped):
    cli = piped["selftest"]
    assert cli.rc in (0, 1), cli
    assert "\u2026" not in cli.stdout, cli
    (row,) = _table_rows(cli.stdout)
    cells = [c.strip() for c in row.split("\u2502")[1:-1]]
    assert len(cells) == 5 and cells[0] == "sigmoid-r" and cells[4] in ("pass", "FAIL"), cli
    assert all(cell.split()[0] in ("prefill", "decode", "not") for cell in cells[1:4]), cli


def test_every_option_of_every_command_has_help():
    import argparse

    from parity.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in sub.choices.items() for action in parser._actions
               if not action.help and not isinstance(action, argparse._HelpAction)]
    assert not missing, missing
