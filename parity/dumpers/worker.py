"""Run one backend in a worker process of its own, so its crash or hang is a finding, not our death.

The code under test is compiled code, and compiled code crashes: an out-of-bounds gather is a
SIGSEGV, a failed check an abort, a scan with a wrong loop bound never returns. In the parity
process itself any of these would take the verdict, the reports and every other backend's dump
down with it. Here each backend (but our own torch reference, which stays in the parent so a
real-size model's weights are held once for the replays) is built and run in a child started
with multiprocessing's "spawn" method — not fork: TVM's thread pool and CUDA do not survive a
fork. The child streams its dump to disk step by step (parity/dumpers/format.py: the steps go into
``<dir>.partial-<pid>`` and are renamed into place on a clean close) and tells the parent over a
pipe what it is doing: each step started and finished, each stage recorded, each compiled kernel
entered (TVM debug builds). When the child dies — by a signal, an exception in the backend's own
code, or a hang past ``timeout`` seconds without a finished step — the parent knows the last step
completed, the last stage recorded and the kernel that was running, and the steps the child
finished are still on disk to compare (``PartialDumpReader``).

Our compiled model in fp32/fp16 on the CPU (its mutants and isolated entry points too) runs in a
worker without torch (``_torch_free``): the parent, which loaded and validated the checkpoint, says
where each tensor lies in the file (parity.checkpoint.file_locations) and the child maps it with
numpy (``MappedCheckpoint``), never unpickling anything; torch, which tvm_ffi would import, is
blocked there (issue 9: ~200 MB a worker).
Where the places are not sure, the child reads the file with torch as before.

Greedy decoding (parity/greedy.py) runs our compiled builds here too, a job of its own
(``run_in_worker(..., greedy=...)``): the parent never loads TVM for it, and a build that crashes
or hangs while it decodes is a failure greedy reports, not the end of the run.

Set PARITY_IN_PROCESS=1 (or pass ``--in-process``) to run every backend in the parity process
instead, e.g. to step through a plug-in with pdb; a crash then ends the run as it would without
this module.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from parity.dumpers.format import DumpReader, PartialDumpReader, open_dump  # noqa: F401 (re-exported)
from parity.errors import ParityError

# Seconds one step (the prefill, or one decode step) of a backend in a worker may take before the
# backend is called hung and stopped. Generous: a real-size prefill through a debug build on a busy
# CPU takes minutes, and a false "timed out" would hide a working backend. Compiling is not timed.
DEFAULT_TIMEOUT = 1800.0

__all__ = ["BackendFailure", "DEFAULT_TIMEOUT", "PartialDumpReader", "WorkerOutcome", "in_process_requested", "open_dump", "run_in_worker"]

# How long a terminated (SIGTERM) child gets to go before it is killed (SIGKILL).
_TERMINATE_GRACE_S = 5.0
# Models up to this many bytes are handed to the child whole (tests build checkpoints in memory);
# larger ones are read again from their file, memory-mapped, so no copy crosses the pipe.
_SEND_WEIGHTS_UP_TO = 256 << 20
# The end of a dead child's stderr (TVM's native backtrace, faulthandler's Python stack) kept in
# the result: the frames that matter are last; never a megabyte of earlier output.
_FAULT_LOG_CHARS = 8000

CRASHED, TIMED_OUT = "crashed", "timed out"


def in_process_requested() -> bool:
    """PARITY_IN_PROCESS=1: run every backend in the parity process (for pdb; no crash verdicts)."""
    return os.environ.get("PARITY_IN_PROCESS", "").strip() not in ("", "0")


@dataclass
class BackendFailure:
    """A backend that died or hung: what the user needs to find where, and what was saved."""

    backend: str  # the spec it was asked for (--backends)
    name: str  # its own name (a plug-in's ``name``), as the tables show it
    kind: str  # "crashed" | "timed out"
    error: str  # one line: "SIGSEGV", "ZeroDivisionError: division by zero", "no step finished in 5 s"
    step: int | None  # the step it was running (0 = prefill); None: it died before its first step
    step_kind: str | None  # "prefill" | "decode"
    steps_completed: int  # steps written whole to its partial dump (0..step-1), all compared
    last_stage: dict | None = None  # {"step", "stage"}: the last stage it recorded
    kernel: str | None = None  # the compiled kernel it had entered last (TVM debug builds)
    kernel_call: int | None = None  # which call of that kernel in the step (1: the first; layer order)
    signal: str | None = None  # "SIGSEGV", "SIGABRT", ... when a signal ended it
    exitcode: int | None = None
    error_type: str | None = None  # the Python exception's type, for an exception
    traceback: str | None = None  # the full traceback (exception) or faulthandler's stack (signal)
    timeout_s: float | None = None
    partial_dump: str | None = None  # where its completed steps are (a dump marked complete: false)

    def to_dict(self) -> dict:
        return asdict(self)

    def where(self) -> str:
        """``at decode step 3 in kernel wkv5 after L1.att.wkv`` — as much as is known."""
        if self.step is None:
            return "before its first step"
        text = "at prefill" if self.step == 0 else f"at decode step {self.step}"
        if self.kernel:
            text += f" in kernel {self.kernel}" + (f" (call {self.kernel_call} of the step)" if self.kernel_call else "")
        if self.last_stage is not None:
            same = self.last_stage["step"] == self.step
            text += f" after {self.last_stage['stage']}" + ("" if same else f" (of step {self.last_stage['step']})")
        return text


@dataclass
class WorkerOutcome:
    """What a worker left: the finished dump's path, or a failure (and its partial dump, if any)."""

    path: Path | None
    failure: BackendFailure | None = None
    partial: Path | None = None
    name: str | None = None
    extra: dict = field(default_factory=dict)
    torch_loaded: bool | None = None  # whether the worker imported torch (None: it never said)
    tvm_compiler_loaded: bool | None = None  # whether it loaded TVM's compiler library (LLVM in it)
    greedy: dict | None = None  # a greedy job's runs (``_greedy_in_child``): tokens, rows, forced_rows


# -- the child ------------------------------------------------------------------------------------
class _Sender:
    def __init__(self, conn):
        self.conn = conn

    def __call__(self, *message) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):  # the parent is gone; nothing is listening any more
            os._exit(1)


class _ReportingStep:
    """Wraps a step's writer: every stage added is reported to the parent before it is stored."""

    def __init__(self, inner, *, index: int, send: _Sender):
        self._inner, self._index, self._send = inner, index, send

    def add(self, name: str, array) -> None:
        self._send("stage", self._index, name)
        self._inner.add(name, array)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


def _child_checkpoint(payload: dict):
    if payload.get("mapped") is not None:
        from parity.checkpoint import open_mapped

        # Validated by the parent, which found where each tensor lies in the file: mapped with numpy.
        return open_mapped(path=Path(payload["path"]), sha256=payload["sha256"], config=payload["config"],
                           locations=payload["mapped"])
    from parity.checkpoint import Checkpoint, _read_state_dict

    if payload.get("weights") is not None:
        import torch

        weights = torch.load(io.BytesIO(payload["weights"]), map_location="cpu", weights_only=True)
    else:
        # Validated (shape, NaN) by the parent already: read it again, memory-mapped, unchecked.
        weights = _read_state_dict(Path(payload["path"]))
    return Checkpoint(path=Path(payload["path"]), sha256=payload["sha256"], config=payload["config"], weights=weights)


def _make(recipe: dict, ck, *, say):
    from parity.dumpers.registry import make_backend

    backend = make_backend(recipe["spec"], ck, cache_dir=recipe["cache_dir"], on_event=say, target=recipe["target"])
    if recipe.get("isolated") is None:
        return backend
    from parity.dumpers.isolated import TVMIsolatedBackend

    # The isolated run drives the very build the spec names (a mutant's, with its repeat check).
    iso = recipe["isolated"]
    return TVMIsolatedBackend(ck, reference_dump=Path(iso["reference_dump"]), target=recipe["target"],
                              model=backend.model, only_layer=iso.get("only_layer"), only_step=iso.get("only_step"))


def _watch_kernels(backend, send: _Sender) -> None:
    """Report each compiled kernel as it is entered, so a crash inside the VM names its kernel."""
    model = getattr(backend, "model", None)
    vm = getattr(model, "vm", None)
    if vm is None or getattr(model, "variant", None) != "debug":
        return  # the instrumented backend sets its own VM hook per call; it names kernels itself
    from tvm.runtime.vm import VMInstrumentReturnKind

    def hook(func, symbol, before_run, ret_value, *args):
        symbol = str(symbol)
        if before_run and not symbol.startswith("vm.builtin."):
            send("kernel", symbol)
        return VMInstrumentReturnKind.NO_OP

    vm.set_instrument(hook)


def _exception_report(exc: BaseException) -> dict:
    """Type, one-line message and the full traceback of ``exc``, including what it was raised from.

    The plug-in wrapper re-raises a plug-in's exception as a one-line ParityError ``from None``;
    the plug-in author needs the frames of their own code, so the suppressed context is shown too.
    """
    te = traceback.TracebackException.from_exception(exc)
    original = exc
    if exc.__context__ is not None and exc.__suppress_context__:
        te.__suppress_context__ = False
        original = exc.__context__
    message = " ".join(str(exc).split()) or type(exc).__name__
    # parity_error: our one-line refusal; wrapped: of an exception the backend's own code raised.
    return {"error_type": type(original).__name__, "message": message, "traceback": "".join(te.format()),
            "parity_error": isinstance(exc, ParityError), "wrapped": original is not exc}


def _child_main(conn, recipe: dict, payload: dict, plan, path: str | None, fault_log: str) -> None:
    import faulthandler

    send = _Sender(conn)
    # Ctrl-C reaches the whole process group: the parent decides when a worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A fatal signal (SIGSEGV, SIGABRT, ...) writes the Python stack to stderr, which the parent
    # pointed at a log file (``fault_log``) and reads after the child is gone.
    faulthandler.enable(all_threads=False)
    phase = "build"
    greedy = recipe.get("greedy")
    try:
        ck = _child_checkpoint(payload)
        backend = _make(recipe, ck, say=lambda msg: send("event", msg))
        # Building read the file's pages (the upcast, an embedding table folded with ln0); the
        # backend holds what it needs now, so this worker need not keep them resident.
        ck.release_file_pages()
        partial = None
        if greedy is None:
            from parity.dumpers.format import partial_dir_for

            partial = str(partial_dir_for(path))
        send("ready", {"name": backend.name, "partial": partial, "extra": _jsonable(backend.extra),
                       "torch": _torch_loaded(), "tvm_compiler": _tvm_compiler_loaded()})
        _watch_kernels(backend, send)
        if greedy is not None:
            phase = "run"
            send("greedy", _greedy_in_child(backend, greedy, send))
            send("finished", None)
            conn.close()
            return
        record = backend.record_step
        counter = [0]

        def record_step(ids, step):
            index = counter[0]
            counter[0] += 1
            send("step", index)
            record(ids, _ReportingStep(step, index=index, send=send))

        backend.record_step = record_step  # an instance attribute: Backend.dump calls self.record_step
        phase = "run"
        out = backend.dump(plan, path=Path(path), on_step=lambda name, i, n: send("done", i, n))
        send("finished", str(out))
    except BaseException as exc:  # noqa: BLE001 - everything the backend raises is reported, nothing escapes
        send("error", {**_exception_report(exc), "phase": phase})
        conn.close()
        os._exit(1)
    conn.close()


class _ReportingStepper:
    """Greedy decoding's stepper in a worker: each step started and finished is reported to the
    parent (numbered from 0, the prefill, in each run), as a dump's steps are."""

    def __init__(self, inner, *, steps: int, send: _Sender):
        self.inner, self.name, self.steps, self.send, self.k = inner, inner.name, steps, send, 0

    def reset(self) -> None:
        self.inner.reset()
        self.k = 0

    def step(self, ids):
        self.send("step", self.k)
        row = self.inner.step(ids)
        self.send("done", self.k, self.steps)
        self.k += 1
        return row


def _greedy_in_child(backend, job: dict, send: _Sender) -> dict:
    """``parity.greedy``'s runs of one backend, here: its own greedy tokens and logits rows, and,
    given the yardstick's tokens, its rows teacher-forced on them where its own tokens part from
    them (or always, ``forced_only``: its own run was done in an earlier worker)."""
    from parity.dumpers.stepping import BackendStepper, decode_run

    stepper = _ReportingStepper(BackendStepper(backend), steps=job["steps"], send=send)
    out = {"tokens": None, "rows": None, "forced_rows": None}
    yard = job.get("yardstick_tokens")
    if not job.get("forced_only"):
        out["tokens"], out["rows"] = decode_run(stepper, prompt_ids=job["prompt_ids"], steps=job["steps"])
    if yard is not None and (job.get("forced_only") or out["tokens"] != yard):
        _, out["forced_rows"] = decode_run(stepper, prompt_ids=job["prompt_ids"], steps=job["steps"], forced=yard)
    return out


def _torch_loaded() -> bool:
    import sys

    return sys.modules.get("torch") is not None


def _tvm_compiler_loaded() -> bool:
    """Whether this process mapped TVM's compiler library (not only the runtime's)."""
    try:
        return "libtvm_compiler" in Path("/proc/self/maps").read_text()
    except OSError:
        return False  # not Linux: unknown, said as not loaded


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return {}


# -- the parent -----------------------------------------------------------------------------------
def _torch_free(spec: str, *, target: str) -> bool:
    """Whether ``spec`` runs in a worker without torch: our compiled model (or a mutant of it) in
    fp32 or fp16 on the CPU, isolated or not, which needs the weights as fp32 (or fp16) arrays only;
    sparing torch's import also spares ~2.5 s of the ~4.5 s of CPU a worker's start costs. bf16 and
    quantised builds make their parameters with torch (numpy has no bfloat16; the quantisers are the
    reference's); a GPU build copies its fp32 parameters through torch's ``.numpy()``
    (parity/compiled/runtime.py)."""
    from parity.dumpers.registry import WEIGHT_FORMATS, split_dtype

    if target != "llvm":
        return False
    if spec.startswith("mutant/"):
        # A mutant of the compiled model is our build with one planted bug (TVMDebugBackend); it
        # computes in its own dtype, and the quantisation mutants quantise with the reference's code.
        from parity.mutants import get_mutant

        try:
            m = get_mutant(spec.split("/", 1)[1])
        except ParityError:
            return False
        return m.side == "compiled" and m.dtype in ("float32", "float16")
    try:
        base, dtype = split_dtype(spec)
    except ParityError:
        return False  # the child says what is wrong with it, as it always has
    word = spec.rpartition("@")[2] if "@" in spec else ""
    return base in ("tvm", "tvm-instrumented") and word not in WEIGHT_FORMATS and dtype in (None, "float32", "float16")


def _payload(ck, *, torch_free: bool = False) -> dict:
    """What the child needs to have the checkpoint: for a torch-free worker (``_torch_free``) where
    each tensor lies in the file (``file_locations``), else the weights themselves (small or in
    memory) or nothing (the child reads the file again, with torch)."""
    payload = {"path": str(ck.path), "sha256": ck.sha256, "config": ck.config, "weights": None, "mapped": None}
    if torch_free:
        from parity.checkpoint import file_locations

        payload["mapped"] = file_locations(ck)  # None: not sure where every tensor is; as before
        if payload["mapped"] is not None:
            return payload
    on_disk = Path(ck.path).exists()
    if not on_disk or ck.fp32_nbytes() <= _SEND_WEIGHTS_UP_TO:
        # Small, or built in memory: hand over the very tensors the parent holds.
        import torch

        buf = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in ck.weights.items()}, buf)
        payload["weights"] = buf.getvalue()
    return payload


def _signal_name(exitcode: int) -> str:
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def _child_entry() -> None:
    """``python -c 'from parity.dumpers.worker import _child_entry; _child_entry()' FD``: read the job
    (pickled) from stdin, report on file descriptor FD."""
    import pickle
    import sys

    if "no-torch" in sys.argv[2:]:
        # Before anything imports TVM: tvm_ffi imports torch whenever it can (for its DLPack
        # interop), which costs this process ~200 MB (more with CUDA torch) and buys a worker that
        # reads the weights with numpy nothing (issue 9). None in sys.modules: ``import torch``
        # raises ImportError, which tvm_ffi takes as "no torch".
        sys.modules["torch"] = None
    conn = multiprocessing.connection.Connection(int(sys.argv[1]), readable=False)
    job = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = job["sys_path"]  # the parent's: a plug-in importable there is importable here
    if "no-torch" in sys.argv[2:] and job["recipe"].get("target") == "llvm":
        _prefer_runtime_tvm()
    _child_main(conn, job["recipe"], job["payload"], job["plan"], job["path"], job["fault_log"])
    # Done and reported: leave without the interpreter's teardown (TVM's and torch's thread pools
    # have nothing left to do, and a teardown that hung would hold the parent).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _prefer_runtime_tvm() -> None:
    """Load TVM's runtime-only library in this worker when this machine's CPU name is known without
    LLVM (parity/compiled/host.py), i.e. a build for it can be found in the cache: our compiled model
    only loads a build and runs it. The compiler library is ~160 MB of resident pages and ~0.7 s of
    CPU to load (a 0.1B worker's peak 1.27 -> 1.09 GB, issue 9); on a cache miss a child process
    with the compiler makes the build (``COMPILE_IN_CHILD``), and its memory leaves with it."""
    import sys

    if "tvm" in sys.modules or "TVM_USE_RUNTIME_LIB" in os.environ:
        return  # already loaded, or chosen by whoever started us (the GPU bundle's runtime-only TVM)
    from parity.compiled import host

    if os.environ.get("PARITY_LLVM_CPU") or host.remembered(host.default_cache_dir()):
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
        os.environ[host.COMPILE_IN_CHILD] = "1"


def _start_child(job: dict):
    """A fresh interpreter (a spawn: TVM's thread pool and CUDA do not survive fork) running
    ``_child_entry``. Not multiprocessing's spawn: that re-imports the parent's __main__ in the
    child, which reruns a user's script that calls run_parity without a __main__ guard."""
    import pickle
    import sys

    read_fd, write_fd = os.pipe()
    # The child's stderr goes to a file: a native crash's own report (TVM's backtrace,
    # faulthandler's Python stack) becomes part of the failure instead of noise on the terminal.
    stderr = open(job["fault_log"], "wb")  # noqa: SIM115 - handed to the child, closed below
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from parity.dumpers.worker import _child_entry; _child_entry()", str(write_fd),
             *(["no-torch"] if job["payload"].get("mapped") is not None else [])],
            stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env, stderr=stderr,
        )
    finally:
        os.close(write_fd)
        stderr.close()  # the child holds the only writing end: EOF here means it is gone
    conn = multiprocessing.connection.Connection(read_fd, writable=False)
    try:
        proc.stdin.write(pickle.dumps({**job, "sys_path": list(sys.path)}))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died at once; its exit status says how
    return proc, conn


def run_in_worker(
    spec: str,
    ck,
    *,
    plan,
    path: Path,
    cache_dir: Path | None,
    target: str,
    timeout: float | None,
    on_event: Callable[[str], None] | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
    isolated: dict | None = None,
    greedy: dict | None = None,
) -> WorkerOutcome:
    """Build backend ``spec`` and dump ``plan`` to ``path`` in a child process; wait for it.

    ``greedy`` (parity/greedy.py: prompt_ids, steps, yardstick_tokens, forced_only): instead of a
    dump, greedy decoding on the backend; its runs come back in ``WorkerOutcome.greedy`` (``path``
    None, ``plan`` only names the steps' kinds), and a crash or hang in them is a failure as in a dump.

    ``timeout``: seconds the backend may take to finish one step (the prefill or one decode step),
    counted from when it is built — a compile is never cut short. None or 0: wait for ever.
    Errors that mean the backend could not be made at all (an unknown plug-in, a missing method,
    a compile failure) are raised as ParityError, as they would be in-process; anything the
    backend's own code does wrong once it runs comes back as ``WorkerOutcome.failure``.
    """
    say = on_event or (lambda msg: None)
    fd, fault_log = tempfile.mkstemp(prefix="parity-worker-", suffix=".log")
    os.close(fd)
    recipe = {"spec": spec, "cache_dir": cache_dir, "target": target, "isolated": isolated, "greedy": greedy}
    state: dict[str, Any] = {"name": spec, "partial": None, "step": None, "kind": None, "done": 0,
                             "last_stage": None, "kernel": None, "kernel_call": None, "calls": {}, "extra": {},
                             "torch": None, "tvm_compiler": None}
    steps = plan.steps()
    error: dict | None = None
    finished: str | None = None
    ended = False  # the child said "finished" (a dump's path; None for a greedy job)
    greedy_out: dict | None = None
    timed_out = False
    payload = _payload(ck, torch_free=_torch_free(spec, target=target))
    proc, receive = _start_child({"recipe": recipe, "payload": payload, "plan": plan,
                                  "path": None if path is None else str(path),
                                  "fault_log": fault_log})
    try:
        deadline = None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not multiprocessing.connection.wait([receive], timeout=wait):
                timed_out = True
                break
            try:
                msg = receive.recv()
            except (EOFError, OSError):
                break
            what = msg[0]
            if what == "event":
                say(msg[1])
            elif what == "ready":
                state.update(name=msg[1]["name"], partial=msg[1]["partial"], extra=msg[1]["extra"],
                             torch=msg[1].get("torch"), tvm_compiler=msg[1].get("tvm_compiler"))
                deadline = time.monotonic() + timeout if timeout else None
            elif what == "step":
                state.update(step=msg[1], kind=steps[msg[1]][0] if msg[1] < len(steps) else None, kernel=None,
                             kernel_call=None, calls={})
            elif what == "stage":
                state["last_stage"] = {"step": msg[1], "stage": msg[2]}
            elif what == "kernel":
                # The n-th call of a kernel in a step: for a per-layer kernel (wkv5), its layer + 1.
                state["calls"][msg[1]] = state["calls"].get(msg[1], 0) + 1
                state.update(kernel=msg[1], kernel_call=state["calls"][msg[1]])
            elif what == "done":
                state["done"] = msg[1] + 1
                state.update(kernel=None, kernel_call=None)
                deadline = time.monotonic() + timeout if timeout else None
                if on_step:
                    on_step(state["name"], msg[1], msg[2])
            elif what == "greedy":
                greedy_out = msg[1]
            elif what == "finished":
                finished, ended = msg[1], True
            elif what == "error":
                error = msg[1]
    finally:
        if proc.poll() is None and (timed_out or not ended):
            proc.terminate()
            try:
                proc.wait(_TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:  # it ignored SIGTERM
                proc.kill()
        try:
            proc.wait(_TERMINATE_GRACE_S if ended else None)
        except subprocess.TimeoutExpired:  # it reported its finished dump, then did not exit
            proc.kill()
            proc.wait()
        receive.close()
        fault_text = _read_fault_log(fault_log)  # and removed, also when a SIGTERM / Ctrl-C ends the wait
    exitcode = proc.returncode
    if ended:  # renamed into place and complete (or the greedy runs sent), whatever the exit after it
        if fault_text.strip():
            import sys

            sys.stderr.write(fault_text)  # what a healthy backend said on stderr (warnings) is not hidden
        return WorkerOutcome(path=None if finished is None else Path(finished), name=state["name"], extra=state["extra"],
                             torch_loaded=state["torch"], tvm_compiler_loaded=state["tvm_compiler"], greedy=greedy_out)
    refused = error is not None and error["parity_error"] and not error["wrapped"]
    if error is not None and (error["phase"] == "build" or (refused and state["step"] is None)):
        # It could not be made (an import error, a factory that raised), or refused its input
        # before running: bad input, one line and exit 2 as in-process; the traceback is kept for
        # PARITY_DEBUG=1.
        if error["parity_error"]:
            raise _with_traceback(ParityError(error["message"]), error["traceback"])
        raise WorkerBuildError(f"backend {spec} failed to start: {error['error_type']}: {error['message']}",
                               traceback_text=error["traceback"])
    if refused:
        # Our plug-in wrapper refused what the backend returned (no logits, a non-canonical
        # stage): the plug-in breaks its contract, a usage error with one line, as in-process.
        raise _with_traceback(ParityError(error["message"]), error["traceback"])
    partial = Path(state["partial"]) if state["partial"] and Path(state["partial"]).is_dir() else None
    failure = BackendFailure(
        backend=spec, name=state["name"], kind=TIMED_OUT if timed_out else CRASHED,
        error="", step=state["step"], step_kind=state["kind"], steps_completed=state["done"],
        last_stage=state["last_stage"], kernel=state["kernel"], kernel_call=state["kernel_call"], exitcode=exitcode,
        timeout_s=timeout if timed_out else None, partial_dump=str(partial) if partial else None,
    )
    if timed_out:
        failure.error = f"no step finished within {timeout:g} s"
    elif error is not None:
        message = error["message"]
        failure.error = message if error["error_type"] in message else f"{error['error_type']}: {message}"
        failure.error_type, failure.traceback = error["error_type"], error["traceback"]
    elif exitcode is not None and exitcode < 0:
        failure.signal = _signal_name(exitcode)
        failure.error = f"died with {failure.signal}"
        failure.traceback = fault_text or None
    else:
        failure.error = f"exited with code {exitcode} before finishing"
        failure.traceback = fault_text or None
    return WorkerOutcome(path=None, failure=failure, partial=partial, name=state["name"], extra=state["extra"],
                         torch_loaded=state["torch"], tvm_compiler_loaded=state["tvm_compiler"])


def _with_traceback(exc: ParityError, text: str) -> ParityError:
    exc.worker_traceback = text  # parity.cli prints it under PARITY_DEBUG=1
    return exc


class WorkerBuildError(RuntimeError):
    """A backend's constructor failed in its worker with something other than a ParityError: a bug
    (ours or the plug-in's) — the CLI's internal-error exit, with the child's traceback kept."""

    def __init__(self, message: str, *, traceback_text: str):
        super().__init__(message)
        self.traceback_text = traceback_text


def _read_fault_log(path: str) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return text[-_FAULT_LOG_CHARS:]


