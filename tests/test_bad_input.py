"""Bad input and hostile circumstances at the command line: one line and exit 2, never a traceback,
never a silently overwritten file, and no temporary dumps left behind by a SIGTERM.

The refusals are checked in-process (``main``, no torch start-up per case): every one of them
happens before any work, so each costs milliseconds. One real run shows ``--force`` re-running
into the same paths, and one real subprocess is terminated with SIGTERM mid-run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity.cli import main
from parity_cli import REPO, cli_env

FIXTURE = REPO / "fixtures" / "rwkv5_2-L2-C144-H12.pth"
NUMPY_PORT = f"{REPO}/examples/numpy_rwkv5.py:make_backend"  # a plug-in: nothing to compile


def run_main(capsys, args: list) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parity: error: "), err
    return lines[0]


# -- no silent overwrite: every writer of user files refuses an existing destination ----------------
# name -> arguments; {existing} is a file holding "keep me", {full} a non-empty directory.
WRITERS = {
    "run --json": ["run", "--checkpoint", FIXTURE, "--json", "{existing}"],
    "run --html": ["run", "--checkpoint", FIXTURE, "--html", "{existing}"],
    "run --dump-dir": ["run", "--checkpoint", FIXTURE, "--dump-dir", "{full}"],
    "run --corpus --json": ["run", "--checkpoint", FIXTURE, "--corpus", REPO / "fixtures" / "scenarios", "--json", "{existing}"],
    "diff --json": ["diff", "{full}", "{full}", "--json", "{existing}"],
    "diff --html": ["diff", "{full}", "{full}", "--html", "{existing}"],
    "bisect --json": ["bisect", "--checkpoint", FIXTURE, "--json", "{existing}"],
    "bisect --html": ["bisect", "--checkpoint", FIXTURE, "--html", "{existing}"],
    "selftest --json": ["selftest", "--only", "state-transposed", "--json", "{existing}"],
    "report --html": ["report", "{full}", "--html", "{existing}"],
    "report --markdown": ["report", "{full}", "--markdown", "{existing}"],
    "report --csv": ["report", "{full}", "--csv", "{existing}"],
    "prompt --json": ["prompt", "--text", "hi", "--against", "chatrwkv", "--json", "{existing}"],
    "prompt --markdown": ["prompt", "--text", "hi", "--against", "chatrwkv", "--markdown", "{existing}"],
    "tokenize --json": ["tokenize", "--text", "hi", "--json", "{existing}"],
    "explain --json": ["explain", "{full}", "--json", "{existing}"],
    "convert DEST file": ["convert", FIXTURE, "{existing}.pth"],
    "convert DEST dir": ["convert", FIXTURE, "{full}"],
}


@pytest.fixture
def occupied(tmp_path):
    (tmp_path / "existing").write_text("keep me")
    (tmp_path / "existing.pth").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    return tmp_path


def _fill(args: list, tmp: Path) -> list[str]:
    return [str(a).format(existing=tmp / "existing", full=tmp / "full") for a in args]


@pytest.mark.parametrize("name", list(WRITERS))
def test_existing_destination_is_refused_in_one_line(capsys, occupied, name):
    code, out, err = run_main(capsys, _fill(WRITERS[name], occupied))
    line = one_error_line(err)
    assert code == 2, (code, err)
    assert "exists" in line and "pass --force to overwrite it" in line, line
    # Nothing was touched: the refusal comes before any work.
    assert (occupied / "existing").read_text() == "keep me"
    assert (occupied / "existing.pth").read_text() == "keep me"
    assert [p.name for p in (occupied / "full").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_writer_accepts_force(name):
    from parity.cli import build_parser

    args = build_parser().parse_args([*map(str, WRITERS[name]), "--force"])
    assert args.force is True


def test_demo_owns_its_report_dir_and_has_no_force():
    from parity.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--force"])


def test_stdout_and_an_empty_directory_are_not_refused(tmp_path):
    from parity.report.cli import refuse_overwrite

    (tmp_path / "empty").mkdir()
    refuse_overwrite(["-", tmp_path / "empty", tmp_path / "new.json", None], force=False)  # no raise


def test_a_rerun_needs_force_and_then_replaces_every_output(capsys, tmp_path):
    args = ["run", "--checkpoint", FIXTURE, "--backends", f"reference,{NUMPY_PORT}", "--ids", "ones:3",
            "--decode-steps", "1", "--dump-dir", tmp_path / "dumps", "--json", tmp_path / "r.json",
            "--html", tmp_path / "r.html", "-q"]
    code, _, err = run_main(capsys, args)
    assert code == 0, err
    first = (tmp_path / "r.json").read_text()
    manifest = tmp_path / "dumps" / "reference" / "manifest.json"
    before = manifest.stat().st_mtime_ns

    code, _, err = run_main(capsys, args)
    assert code == 2 and "r.json exists" in one_error_line(err)  # the first destination named
    assert manifest.stat().st_mtime_ns == before

    time.sleep(0.01)  # mtime resolution: the rewritten manifest must be newer
    code, _, err = run_main(capsys, [*args, "--force"])
    assert code == 0, err
    assert manifest.stat().st_mtime_ns > before  # the dump was replaced, not appended to
    assert (tmp_path / "r.json").read_text().count('"first_divergence"') == first.count('"first_divergence"')
    assert not list((tmp_path / "dumps").glob("*.partial-*")) and not list((tmp_path / "dumps").glob("*.old-*"))


def test_force_never_replaces_a_directory_that_is_not_a_dump(capsys, occupied):
    # --force lifts the "exists" refusal only; the dump writer still refuses to replace a
    # directory that is not a dump (parity.dumpers.format), so --force cannot wipe user files.
    (occupied / "full" / "reference").mkdir()
    (occupied / "full" / "reference" / "mine.txt").write_text("keep me")
    code, _, err = run_main(capsys, ["run", "--checkpoint", FIXTURE, "--backends", f"reference,{NUMPY_PORT}",
                                     "--ids", "ones:2", "--decode-steps", "0", "--dump-dir", occupied / "full",
                                     "--force", "-q"])
    assert code == 2 and "not a dump" in one_error_line(err)
    assert (occupied / "full" / "reference" / "mine.txt").read_text() == "keep me"


# -- ids and argparse -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expect", [
    (["run", "--ids", ""], "--ids is empty"),
    (["run", "--ids", "   "], "--ids is empty"),
    (["run", "--decode-ids", ""], "--decode-ids is empty"),
    (["bisect", "--checkpoint", FIXTURE, "--ids", " "], "--ids is empty"),
    (["run", "--ids", "1", "2", "3"], "unrecognized arguments: 2 3 (see parity run --help)"),
    (["run", "--decode-steps", "two"], "invalid int value: 'two' (see parity run --help)"),
    (["report"], "required: SOURCE (see parity report --help)"),
    ([], "required: command (see parity --help)"),
])
def test_bad_arguments_are_one_line_without_usage(capsys, args, expect):
    code, out, err = run_main(capsys, args)
    assert code == 2 and out == ""
    assert expect in one_error_line(err), err
    assert "usage:" not in err


# -- SIGTERM: cleaned up like Ctrl-C ----------------------------------------------------------------
def test_sigterm_mid_run_removes_temporary_dumps(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # Long enough (hundreds of decode steps) that the run is surely still going when terminated.
    proc = subprocess.Popen(
        [sys.executable, "-m", "parity.cli", "run", "--checkpoint", str(FIXTURE), "--backends",
         f"reference,{NUMPY_PORT}", "--ids", "ones:8", "--decode-steps", "3000", "-q"],
        cwd=REPO, env=cli_env(TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # Wait for the first recorded step: a step file in a temporary dump.
        while not list(tmp.glob("parity-dumps-*/**/step-*.safetensors")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step was recorded within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "parity: terminated (SIGTERM); temporary files removed", err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("parity-")) == []


# -- a run whose dumps would not fit says so before it starts ---------------------------------------
def test_dump_size_estimate_is_close_to_a_real_run(capsys, tmp_path):
    from parity.checkpoint import load_checkpoint
    from parity.cli import estimate_dump_bytes

    code, _, err = run_main(capsys, ["run", "--checkpoint", FIXTURE, "--backends", f"reference,{NUMPY_PORT}",
                                     "--ids", "ones:20", "--decode-steps", "6", "--dump-dir", tmp_path / "d", "-q"])
    assert code == 0, err
    dumps = [d for d in (tmp_path / "d").iterdir() if d.is_dir()]
    assert len(dumps) == 3  # reference, the port, and the port replayed by the reference
    actual = sum(f.stat().st_size for d in dumps for f in d.iterdir())
    estimate = estimate_dump_bytes(load_checkpoint(FIXTURE).config, prefill_tokens=20, decode_steps=6, dumps=3)
    # Within 10%: the estimate counts the tensors, the files add headers, manifests and the state
    # inputs some stages record; a warning that is off by more would mislead in either direction.
    assert 0.9 < estimate / actual < 1.1, (estimate, actual)


def test_a_run_over_the_dump_limit_is_refused_before_it_starts(capsys, tmp_path):
    # The case: 100,000 prompt ids once wrote 5.4 GB without a word.
    code, _, err = run_main(capsys, ["run", "--checkpoint", FIXTURE, "--ids", "ones:100000",
                                     "--dump-dir", tmp_path / "d", "--max-dump-bytes", "1G", "-q"])
    line = one_error_line(err)
    assert code == 2 and "dumps would take about" in line and "--max-dump-bytes" in line, line
    assert not (tmp_path / "d").exists()  # nothing started


@pytest.mark.parametrize("text", ["x", "0", "-5M", "1Q"])
def test_bad_dump_limit_is_one_line(capsys, text):
    code, _, err = run_main(capsys, ["run", "--max-dump-bytes", text])
    assert code == 2 and "--max-dump-bytes" in one_error_line(err)
