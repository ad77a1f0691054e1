"""pytest plugin for parity suites: options, the ``parity_options`` fixture, markers, and a closing
list of every report a session wrote.

Registered through the ``pytest11`` entry point (``parity = "parity.pytest_plugin"``), so any pytest
run in an environment with rwkv-parity installed gets it; ``-p parity.pytest_plugin`` loads it where
the package is on the path but not installed. Hooks are one-liners into ``ParitySession``, the one
object that holds this session's state.

    pytest parity/ --parity-backends reference,tvm --parity-mode instrumented --parity-report-dir out/
    pytest parity/ --parity-dtypes fp16,fp16i8,q4f16_1   # the low-precision builds to test (default fp16,bf16)

A parity test that writes a report calls ``record_report(path)``; the terminal summary then lists
it. Failing tests keep their own one-paragraph message (``describe_divergence``): the plugin adds
a list at the end, never text to a failure.

Under pytest-xdist (``pytest parity/ -n auto``) tests run in worker processes and only the
controller prints the summary, so a worker sends its reports along: each one recorded during a
test rides on that test's report (``user_properties``, sent as the test finishes, so a worker that
dies later loses nothing already sent), and the rest (recorded outside any test, e.g. by a session
fixture) go in the worker's ``workeroutput`` when it shuts down. The controller merges both.

Importing this module must stay cheap (it loads into every pytest run of the environment), so it
imports nothing that pulls in torch or tvm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["ParityOptions", "ParitySession", "current_session", "record_report"]

REPORT_DIR_ENV = "PARITY_REPORT_DIR"  # what parity/suite/conftest.py's report_dir() reads
DEFAULT_BACKENDS = "reference,tvm"
# The compiled model's low-precision builds the suite tests besides fp32, as tvm@<word>: ChatRWKV's
# fp16 and bf16 strategies by default; the quantised words (int8, MLC's q4f16_1) on request, since
# each is another build per fixture. "none" tests fp32 only.
DEFAULT_DTYPES = "fp16,bf16"
LOW_PRECISION_WORDS = ("fp16", "bf16", "fp16i8", "fp32i8", "q4f16_1")
MODES = ("all", "debug", "instrumented")

# --parity-mode chooses how the compiled model is observed; these are its backends and their dump
# ``mode``. Every other backend (the reference, the official package) is observed one way only.
_COMPILED_MODES = {"tvm": "debug", "tvm-instrumented": "instrumented"}
_COMPILED_MODEL = "tvm"

# The user_properties / workeroutput key under which a worker's reports travel to the controller.
_WIRE_KEY = "parity_report"

_MARKERS = (
    "slow: compiles TVM models or runs long sequences (deselect with -m 'not slow')",
    "gpu: needs a CUDA GPU and a GPU build of the compiled model",
)


@dataclass(frozen=True)
class ParityOptions:
    """What the command line asked of the parity suite; read it through the ``parity_options`` fixture."""

    report_dir: Path  # where failing (or all) cases write their HTML reports
    backends: tuple[str, ...]  # the first is the yardstick, as in `parity run --backends`
    mode: str  # which capture modes of the compiled model to test: "all", "debug" or "instrumented"
    dtypes: tuple[str, ...] = tuple(DEFAULT_DTYPES.split(","))  # low-precision builds to test (tvm@<word>)
    reference_device: str = "cpu"  # where the torch reference runs: "cpu" or "cuda"

    @property
    def yardstick(self) -> str:
        return self.backends[0]

    def wants(self, backend: str) -> bool:
        """Whether the suite should run a case comparing ``backend`` (a `parity run` backend name).

        ``tvm-instrumented`` is the ``tvm`` model observed another way, so ``--parity-backends
        reference,tvm`` selects both capture modes, and ``--parity-mode`` narrows them to one.
        """
        listed = backend in self.backends or (backend in _COMPILED_MODES and _COMPILED_MODEL in self.backends)
        if not listed:
            return False
        return self.mode == "all" or _COMPILED_MODES.get(backend, self.mode) == self.mode


@dataclass(eq=False)  # identity: nested sessions with equal options are still different sessions
class ParitySession:
    """This pytest session's options and the reports its tests wrote, in the order written."""

    options: ParityOptions
    reports: list[tuple[Path, str | None]] = field(default_factory=list)  # (path, test node id)
    current_item: pytest.Item | None = None

    @property
    def current_test(self) -> str | None:
        return None if self.current_item is None else self.current_item.nodeid

    def record_report(self, path: str | os.PathLike, *, test: str | None = None) -> Path:
        """Note ``path``, written by ``test`` (default: the running test); each path is listed once."""
        report = Path(path)
        if not any(p == report for p, _ in self.reports):
            self.reports.append((report, test if test is not None else self.current_test))
            if self.current_item is not None and test is None:
                # For an xdist controller: this test's report carries it there (see the module doc).
                self.current_item.user_properties.append((_WIRE_KEY, str(report)))
        return report

    def summary_lines(self) -> list[str]:
        return [f"{path}" + (f"  ({test})" if test else "") for path, test in self.reports]


# pytester runs a pytest session inside another, so sessions nest: the innermost is current.
_SESSIONS: list[ParitySession] = []
_SESSION_KEY = pytest.StashKey[ParitySession]()
_ENV_KEY = pytest.StashKey[tuple[bool, str | None]]()


def current_session() -> ParitySession | None:
    """The running pytest session's parity state, or None outside pytest or without this plugin."""
    return _SESSIONS[-1] if _SESSIONS else None


def record_report(path: str | os.PathLike) -> Path:
    """Note a report written by the running test, for the end-of-session list; a no-op without the plugin."""
    session = current_session()
    return session.record_report(path) if session is not None else Path(path)


# ----------------------------------------------------------------------------- hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "rwkv-parity")
    group.addoption("--parity-report-dir", metavar="DIR", default=None,
                    help=f"where parity tests write HTML reports (default: ${REPORT_DIR_ENV}, else reports/ "
                         "under the rootdir)")
    group.addoption("--parity-backends", metavar="LIST", default=DEFAULT_BACKENDS,
                    help=f"comma-separated backends as for `parity run --backends`, the first is the "
                         f"yardstick (default {DEFAULT_BACKENDS})")
    group.addoption("--parity-mode", choices=MODES, default="all",
                    help="capture modes of the compiled model to test: debug (the build returns every stage), "
                         "instrumented (the plain build, observed by the VM hook) or all (default)")
    group.addoption("--parity-dtypes", metavar="LIST", default=DEFAULT_DTYPES,
                    help=f"comma-separated low-precision builds of the compiled model to test besides fp32, each "
                         f"judged by the reference in its precision and by KL/top-1 against the fp32 yardstick: "
                         f"{', '.join(LOW_PRECISION_WORDS)} or none (default {DEFAULT_DTYPES})")
    group.addoption("--parity-device", choices=("cpu", "cuda"), default="cpu",
                    help="where the compiled model runs: cpu (the llvm build, default) or cuda (the CUDA build)")
    group.addoption("--parity-reference-device", choices=("cpu", "cuda"), default="cpu",
                    help="where the torch reference runs, and with it its replays and the judges: cpu (default) or "
                         "cuda (TF32 and reduced-precision reductions pinned off, recorded in each result)")


def pytest_configure(config: pytest.Config) -> None:
    # A project may declare the same markers in its own ini file; `pytest --markers` need not list them twice.
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for line in _MARKERS:
        if line.split(":", 1)[0] not in declared:
            config.addinivalue_line("markers", line)
    session = ParitySession(options=_options_from(config))
    config.stash[_SESSION_KEY] = session
    _SESSIONS.append(session)
    if config.getoption("parity_report_dir") is not None:
        # The suite's report_dir() reads the environment, as do subprocesses (xdist workers), so the
        # option is passed on that way; the previous value comes back at unconfigure.
        config.stash[_ENV_KEY] = (REPORT_DIR_ENV in os.environ, os.environ.get(REPORT_DIR_ENV))
        os.environ[REPORT_DIR_ENV] = str(session.options.report_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_SESSION_KEY, None)
    if session is not None and session in _SESSIONS:
        _SESSIONS.remove(session)
    saved = config.stash.get(_ENV_KEY, None)
    if saved is not None:
        had, value = saved
        if had:
            os.environ[REPORT_DIR_ENV] = value
        else:
            os.environ.pop(REPORT_DIR_ENV, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    session = item.config.stash[_SESSION_KEY]
    session.current_item = item
    try:
        return (yield)
    finally:
        session.current_item = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # On an xdist controller: the reports a worker's test recorded. Without xdist the same test
    # already recorded them in this process, and record_report keeps each path once.
    session = current_session()
    if session is None:
        return
    for key, value in getattr(report, "user_properties", ()):
        if key == _WIRE_KEY:
            session.record_report(value, test=report.nodeid)


@pytest.hookimpl(trylast=True)  # after other plugins' and conftests' sessionfinish, which may still record
def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)  # set only in an xdist worker
    state = session.config.stash.get(_SESSION_KEY, None)
    if workeroutput is not None and state is not None:
        workeroutput[_WIRE_KEY] = [[str(path), test] for path, test in state.reports]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: not an error where xdist is not installed
def pytest_testnodedown(node, error) -> None:
    session = current_session()
    for path, test in (getattr(node, "workeroutput", None) or {}).get(_WIRE_KEY, []):
        if session is not None:
            session.record_report(path, test=test or "")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    lines = config.stash[_SESSION_KEY].summary_lines()
    if lines:
        terminalreporter.section(f"parity reports ({len(lines)})")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def parity_options(pytestconfig: pytest.Config) -> ParityOptions:
    """The --parity-* options of this run."""
    return pytestconfig.stash[_SESSION_KEY].options


# ----------------------------------------------------------------------------- helpers


def _options_from(config: pytest.Config) -> ParityOptions:
    given = config.getoption("parity_report_dir")
    if given is not None:
        report_dir = Path(given).resolve()
    elif os.environ.get(REPORT_DIR_ENV):
        report_dir = Path(os.environ[REPORT_DIR_ENV])
    else:
        report_dir = Path(config.rootpath) / "reports"
    backends = tuple(b.strip() for b in str(config.getoption("parity_backends")).split(",") if b.strip())
    if len(backends) < 2:
        raise pytest.UsageError(
            f"--parity-backends needs at least two backends, the first the yardstick (e.g. {DEFAULT_BACKENDS})"
        )
    if len(set(backends)) != len(backends):
        raise pytest.UsageError(f"--parity-backends lists a backend twice: {','.join(backends)}")
    if backends != tuple(DEFAULT_BACKENDS.split(",")):
        # Only now: the list of backends lives beside them and importing it loads torch, which a
        # pytest run that never mentions parity should not pay for.
        from parity.dumpers.registry import check_backend_spec
        from parity.errors import ParityError

        for b in backends:
            try:
                check_backend_spec(b)
            except ParityError as exc:
                raise pytest.UsageError(f"--parity-backends: {exc}") from None
    reference_device = config.getoption("parity_reference_device")
    if reference_device != "cpu":
        # Asked for a GPU the reference cannot use: one line before any test runs, not a failure
        # per case (and torch is imported only when a GPU is asked for).
        from parity.errors import ParityError
        from parity.reference import check_reference_device

        try:
            check_reference_device(reference_device)
        except ParityError as exc:
            raise pytest.UsageError(f"--parity-reference-device: {exc}") from None
    return ParityOptions(report_dir=report_dir, backends=backends, mode=config.getoption("parity_mode"),
                         dtypes=_dtypes_from(str(config.getoption("parity_dtypes"))),
                         reference_device=reference_device)


def _dtypes_from(value: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in value.split(",") if w.strip())
    if words == ("none",):
        return ()
    for w in words:
        if w not in LOW_PRECISION_WORDS:
            hint = "; fp32 is what the rest of the suite tests" if w in ("fp32", "float32") else ""
            raise pytest.UsageError(f"--parity-dtypes: unknown {w!r}; choose from {', '.join(LOW_PRECISION_WORDS)} "
                                    f"or none{hint}")
    if len(set(words)) != len(words):
        raise pytest.UsageError(f"--parity-dtypes lists a dtype twice: {value}")
    return words
