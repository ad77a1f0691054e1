"""The pytest plugin: --parity-* options reach the parity_options fixture, markers are registered,
and the terminal summary lists every report the session wrote."""

from __future__ import annotations

import importlib.metadata
import os

import pytest

# Imported here, not first inside an inner run: pytester drops modules an inner run imported, and
# torch (which this pulls in) cannot be imported twice in one process.
from parity.dumpers.registry import BACKEND_NAMES
from parity.pytest_plugin import _COMPILED_MODES, REPORT_DIR_ENV, current_session, record_report

pytest_plugins = ["pytester"]


def _plugin_args() -> list[str]:
    # Once the pytest11 entry point is installed the plugin loads by itself, and loading it a second
    # time under its module name would be an error.
    installed = any(ep.value == "parity.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "parity.pytest_plugin"]


@pytest.fixture
def run(pytester, monkeypatch):
    monkeypatch.delenv(REPORT_DIR_ENV, raising=False)

    def _run(*args: str):
        # hypothesis's plugin would re-import (and assertion-rewrite) hypothesis in every inner run: 1.5 s each.
        return pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)

    return _run


def test_options_reach_the_fixture(pytester, run, tmp_path):
    pytester.makepyfile(f"""
        import os
        from pathlib import Path

        def test_options(parity_options):
            assert parity_options.report_dir == Path({str(tmp_path / "out")!r})
            assert parity_options.backends == ("reference", "tvm-instrumented")
            assert parity_options.yardstick == "reference"
            assert parity_options.mode == "instrumented"
            assert parity_options.wants("tvm-instrumented") and not parity_options.wants("tvm")
            assert not parity_options.wants("chatrwkv")  # not listed
            # The suite's report_dir() reads the environment, so the option must show there too.
            assert os.environ[{REPORT_DIR_ENV!r}] == str(parity_options.report_dir)
    """)
    result = run("--parity-report-dir", str(tmp_path / "out"), "--parity-backends", "reference, tvm-instrumented",
                 "--parity-mode", "instrumented")
    result.assert_outcomes(passed=1)
    assert REPORT_DIR_ENV not in os.environ  # restored after the session


def test_defaults(pytester, run):
    pytester.makepyfile("""
        def test_defaults(parity_options, pytestconfig):
            assert parity_options.report_dir == pytestconfig.rootpath / "reports"
            assert parity_options.backends == ("reference", "tvm") and parity_options.mode == "all"
            # Both capture modes of the tvm model run by default, as the suite always did.
            assert parity_options.wants("tvm") and parity_options.wants("tvm-instrumented")
    """)
    run().assert_outcomes(passed=1)


def test_mode_debug_rules_out_the_instrumented_build(pytester, run):
    pytester.makepyfile("""
        def test_debug(parity_options):
            assert parity_options.wants("tvm") and parity_options.wants("reference")
            assert not parity_options.wants("tvm-instrumented")
            assert parity_options.wants("chatrwkv")  # observed one way only: the mode does not apply
    """)
    run("--parity-mode", "debug", "--parity-backends", "reference,tvm,chatrwkv").assert_outcomes(passed=1)


@pytest.mark.parametrize("args, message", [
    (["--parity-backends", "reference,cuda"], "unknown backend 'cuda'"),
    (["--parity-backends", "tvm"], "at least two backends"),
    (["--parity-backends", "tvm,tvm"], "lists a backend twice"),
])
def test_bad_backends_are_usage_errors(pytester, run, args, message):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_dtypes_reach_the_fixture(pytester, run):
    pytester.makepyfile("""
        def test_dtypes(parity_options):
            assert parity_options.dtypes == ("fp16", "q4f16_1")
    """)
    run("--parity-dtypes", "fp16, q4f16_1").assert_outcomes(passed=1)
    pytester.makepyfile("""
        def test_dtypes(parity_options):
            assert parity_options.dtypes == ("fp16", "bf16")  # the default: both ChatRWKV strategies
    """)
    run().assert_outcomes(passed=1)
    pytester.makepyfile("""
        def test_dtypes(parity_options):
            assert parity_options.dtypes == ()
    """)
    run("--parity-dtypes", "none").assert_outcomes(passed=1)


@pytest.mark.parametrize("value, message", [
    ("fp8", "--parity-dtypes: unknown 'fp8'; choose from fp16, bf16"),
    ("fp32", "fp32 is what the rest of the suite tests"),
    ("fp16,fp16", "lists a dtype twice"),
])
def test_bad_dtypes_are_usage_errors(pytester, run, value, message):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run("--parity-dtypes", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_reference_device_reaches_the_fixture(pytester, run):
    pytester.makepyfile("""
        def test_device(parity_options):
            assert parity_options.reference_device == "cpu"
    """)
    run().assert_outcomes(passed=1)  # the default
    run("--parity-reference-device", "cpu").assert_outcomes(passed=1)


def test_reference_device_cuda_without_a_gpu_is_a_usage_error(pytester, run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU torch can use: the GPU job runs the suite with it (scripts/gpu-job refgpu)")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run("--parity-reference-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--parity-reference-device: no CUDA GPU for the torch reference" in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_bad_mode_is_rejected(pytester, run):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run("--parity-mode", "fast")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid choice: 'fast'" in result.stderr.str()


def test_markers_are_registered(pytester, run):
    result = run("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.slow: *", "@pytest.mark.gpu: *"])
    pytester.makepyfile("""
        import pytest

        @pytest.mark.gpu
        @pytest.mark.slow
        def test_marked():
            pass
    """)
    run("--strict-markers", "-m", "gpu").assert_outcomes(passed=1)


def test_terminal_summary_lists_every_report_and_failures_stay_one_paragraph(pytester, run, tmp_path):
    pytester.makepyfile(f"""
        import pytest
        from pathlib import Path
        from parity.pytest_plugin import record_report

        def test_writes_a_report():
            record_report(Path({str(tmp_path)!r}) / "pass.html")

        def test_fails_with_a_report():
            path = record_report(Path({str(tmp_path)!r}) / "fail.html")
            record_report(path)  # recorded once however often it is reported
            pytest.fail("first divergence: decode step 1, layer 0, stage L0.att.wkv: max abs 1\\nreport: " + str(path),
                        pytrace=False)

        def test_plain():
            pass
    """)
    result = run("-rA")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*= parity reports (2) =*",
        f"{tmp_path / 'pass.html'}  (test_terminal_summary_lists_every_report_and_failures_stay_one_paragraph.py"
        "::test_writes_a_report)",
        f"{tmp_path / 'fail.html'}  (*::test_fails_with_a_report)",
    ])
    failure = out[out.index("_ test_fails_with_a_report _"):out.index("parity reports")]
    # pytest.fail(pytrace=False) shows only the message: no source lines, no traceback added.
    assert "first divergence: decode step 1" in failure and "def test_" not in failure


def test_no_summary_section_without_reports(pytester, run):
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = run()
    result.assert_outcomes(passed=1)
    assert "parity reports" not in result.stdout.str()


def test_record_report_without_a_session_is_a_no_op(tmp_path, monkeypatch):
    import parity.pytest_plugin as plugin

    monkeypatch.setattr(plugin, "_SESSIONS", [])
    assert current_session() is None
    assert record_report(tmp_path / "x.html") == tmp_path / "x.html"


def test_compiled_capture_modes_are_real_backends():
    assert set(_COMPILED_MODES) <= set(BACKEND_NAMES)


def test_xdist_workers_reports_reach_the_controllers_summary(pytester, tmp_path):
    """``pytest -n 2``: tests run in two worker processes, the summary (printed by the controller)
    still lists every report, including one recorded outside any test (at a worker's session end)."""
    pytest.importorskip("xdist")
    pytester.makeconftest(f"""
        from pathlib import Path
        from parity.pytest_plugin import record_report

        def pytest_sessionfinish(session):
            if hasattr(session.config, "workerinput"):  # each worker, after its last test
                record_report(Path({str(tmp_path)!r}) / ("late-" + session.config.workerinput["workerid"] + ".html"))
    """)
    pytester.makepyfile(f"""
        import os
        import pytest
        from pathlib import Path
        from parity.pytest_plugin import record_report

        @pytest.mark.parametrize("case", range(6))
        def test_case(case):
            record_report(Path({str(tmp_path)!r}) / f"case-{{case}}-{{os.environ['PYTEST_XDIST_WORKER']}}.html")
            if case == 5:
                pytest.fail("first divergence: decode step 1", pytrace=False)
    """)
    # A subprocess: xdist starts its workers from the command line, and an in-process pytester run
    # would leave their imports in this interpreter.
    result = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", "-n", "2", "--dist", "load")
    result.assert_outcomes(passed=5, failed=1)
    out = result.stdout.str()
    summary = out[out.index("parity reports"):].splitlines()
    assert summary[0].strip("= ") == "parity reports (8)", out
    listed = [line.split()[0] for line in summary[1:] if line.startswith(str(tmp_path))]
    workers = {name.rsplit("-", 1)[1].removesuffix(".html") for name in map(os.path.basename, listed) if name.startswith("case")}
    assert workers == {"gw0", "gw1"}, listed  # both workers ran cases, and both sent their reports
    assert sorted(os.path.basename(p).rsplit("-", 1)[0] for p in listed) == sorted(
        [f"case-{i}" for i in range(6)] + ["late", "late"])
    assert any("::test_case[5]" in line and "case-5-" in line for line in summary), summary


def test_xdist_reports_survive_a_worker_that_dies(pytester, tmp_path):
    """A worker killed mid-session (a segfaulting kernel) never sends its session-end output; the
    reports of the tests it finished were already sent with each test's result."""
    pytest.importorskip("xdist")
    pytester.makepyfile(f"""
        import os
        from pathlib import Path
        from parity.pytest_plugin import record_report

        def test_a_writes_a_report():
            record_report(Path({str(tmp_path)!r}) / "a.html")

        def test_b_crashes_the_worker():
            os._exit(1)
    """)
    result = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", "-n", "1", "--max-worker-restart", "0")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*= parity reports (1) =*", f"{tmp_path / 'a.html'}  (*::test_a_writes_a_report)"])


def test_the_parity_suite_under_xdist_lists_every_workers_report(tmp_path):
    """The real suite, ``pytest parity/ -n 2``, on a cheap selection that fails by design (a
    reference mutant, no compile): both failing cases, run by the workers, write a report
    and the controller's summary lists both."""
    pytest.importorskip("xdist")
    import subprocess
    import sys

    from parity_cli import REPO

    env = {k: v for k, v in os.environ.items() if k != REPORT_DIR_ENV} | {"NO_COLOR": "1", "COLUMNS": "400"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "parity/", "-n", "2", "-p", "no:cacheprovider", "-q",
         "-k", "reference_vs_compiled and L4", "--parity-backends", "reference,mutant/reference-sigmoid-r",
         "--parity-report-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "2 failed" in out, out[-3000:]
    summary = out[out.index("parity reports (2)"):].splitlines()[1:3]
    for prompt in ("ones10", "random16"):
        name = f"parity-rwkv5_2-L4-C128-H2-mutant-reference-sigmoid-r-{prompt}.html"
        assert any(line.startswith(str(tmp_path / name)) for line in summary), summary
        assert (tmp_path / name).is_file()
