"""The on-disk dump format: one directory holding ``manifest.json`` and one safetensors file per step.

A dump must stay readable without this tool (plain ``json`` + ``safetensors.numpy``; see
docs/dump-format.md), so this module imports numpy and safetensors only — never torch or tvm. It
writes and reads the safetensors layout itself (``save_file``, ``_parse_header``), so that a step is
streamed to disk and a stage read back without mapping the file.

Writing is atomic: everything goes into a sibling ``<dir>.partial-<pid>`` directory, and only a
clean ``close()`` marks the manifest complete and renames that directory into place. A crashed or
killed run therefore never leaves a directory at the final path that reads as a complete dump.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError

from parity.compare.divergence import StepInfo
from parity.errors import ParityError

FORMAT_NAME = "rwkv-parity-dump"
# An integer major version: bump it for any change an older reader would misread. Readers refuse
# newer versions; optional fields added alongside existing ones do not bump it.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# While a dump is being written, each finished step is appended here (one JSON line) instead of
# rewriting the manifest: rewriting it after every step made an N-step dump cost O(N^2) (3000 decode
# steps of the 4-layer fixture: the last manifest is 7.5 MB and takes 0.45 s to encode, so ~700 s of
# encoding and ~11 GB written over the run; measured 2026-12-02). Only an unfinished dump has this file; close()
# writes every step into the manifest and removes it, so a complete dump is as before.
STEP_LOG_NAME = "steps.jsonl"
DTYPES = ("float32", "float16", "bfloat16", "float64")
STEP_KINDS = ("prefill", "decode")
_DAMAGED = "the dump is damaged; re-run the dump"

# Partial directories this process is writing now, so two writers for one path cannot collide
# (their partial names share our pid).
_ACTIVE_PARTIALS: set[Path] = set()


def step_file_name(index: int) -> str:
    return f"step-{index:04d}.safetensors"


def partial_dir_for(path: str | os.PathLike[str], *, pid: int | None = None) -> Path:
    """Where a writer for ``path`` stages its work (this process's unless ``pid`` is given)."""
    final = _absolute(path)
    return final.with_name(f"{final.name}.partial-{os.getpid() if pid is None else pid}")


# ---------------------------------------------------------------------------------------------
# Writing


# safetensors' dtype names for the numpy dtypes a step may hold.
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
    "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}


class StepWriter:
    """Collects one step's stages; the owning ``DumpWriter`` writes them when the step block exits.

    Each stage's bytes go to a spool file as it is added, not into memory:
    a 512-token prefill of a 0.1B model is ~0.6 GB of records, which a writer used to hold in full
    on top of the arrays its backend had just produced (issue 9). The spool is an unnamed file in
    the dump's partial directory (same disk; gone when closed, or when the process is killed).
    """

    # ``add`` has written the array's bytes when it returns and keeps no reference to it, so a
    # caller may hand it a view of a buffer that is reused right after (the TVM debug build's taps).
    writes_at_once = True

    def __init__(self, *, index: int, kind: str, ids: list[int], stage_order: list[str], extend: bool = False,
                 spool_dir: Path, failed):
        self.index = index
        self.kind = kind
        self.ids = ids
        self._order = stage_order  # the manifest's own list: extended in place when ``extend``
        self._extend = extend
        self._position = {name: i for i, name in enumerate(stage_order)}
        self._specs: dict[str, tuple[str, tuple[int, ...], int]] = {}  # name -> (dtype, shape, bytes), spool order
        self._spool_dir = spool_dir
        self._spool = None  # opened at the first add
        self._failed = failed  # DumpWriter._write_failed: a failed spool write aborts the dump like any write
        self._written = False

    def add(self, name: str, array: np.ndarray) -> None:
        """Record ``array`` as stage ``name`` of this step; its bytes are written (to the step's spool) now."""
        if self._written:
            raise ParityError(f"step {self.index} was already written; add stages inside its `with` block")
        if not isinstance(name, str) or not name:
            raise ParityError(f"stage name must be a non-empty string, got {name!r}")
        if name not in self._position and self._extend:
            self._position[name] = len(self._order)
            self._order.append(name)
        if name not in self._position:
            raise ParityError(
                f"stage {name!r} is not in this dump's stage_order; use a canonical stage name "
                "(parity/stages.py) or add it to stage_order when creating the DumpWriter"
            )
        if name in self._specs:
            raise ParityError(
                f"stage {name!r} added twice in step {self.index}; each stage is recorded once per step"
            )
        if not isinstance(array, np.ndarray):
            raise ParityError(
                f"stage {name!r}: expected a numpy array, got {type(array).__name__}; convert first "
                "(a torch tensor: t.detach().float().cpu().numpy())"
            )
        if array.dtype.kind not in "fiub":
            # numpy has no bfloat16; callers upcast it to float32 (lossless) and the manifest's
            # dtype still says bfloat16. Integer arrays are allowed for kernel records of
            # instrumented runs (shape functions, gathers' indices).
            raise ParityError(
                f"stage {name!r}: dtype {array.dtype} is not a float or integer dtype; store "
                "float16/float32/float64 (upcast bfloat16 to float32)"
            )
        # Written now, so later in-place updates by the caller (state buffers are reused across
        # steps) cannot change what was recorded; little-endian C order because safetensors stores
        # raw little-endian contiguous bytes. (A copy only when the array is not already that.)
        data = np.require(array.astype(array.dtype.newbyteorder("<"), copy=False), requirements="C")
        try:
            if self._spool is None:
                self._spool = tempfile.TemporaryFile(dir=self._spool_dir)
            # file.write, not ndarray.tofile: a full disk then reads "No space left on device".
            self._spool.write(data.reshape(-1).view(np.uint8))
        except OSError as e:  # a full disk
            self.discard()
            raise self._failed(f"step {self.index}", e) from None
        self._specs[name] = (data.dtype.name, tuple(int(n) for n in array.shape), int(data.nbytes))

    @property
    def stages(self) -> list[str]:
        """The stages added so far, in stage_order (not insertion) order."""
        return sorted(self._specs, key=self._position.__getitem__)

    def discard(self) -> None:
        """Close the spool, which frees its disk space (after the step file is written, or when it never will be)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None


class DumpWriter:
    """Writes a dump step by step; each stage goes to disk as it is added (see StepWriter).

    Use as a context manager; the dump appears at ``path`` only when the ``with`` block exits
    cleanly::

        with DumpWriter(path=out, backend="torch", mode="eager", dtype="float32", model=cfg,
                        stage_order=stage_order(n_layer=2), checkpoint=None,
                        tool_versions={"torch": "2.13"}) as writer:
            with writer.step(kind="prefill", ids=[1, 2, 3]) as step:
                step.add("emb", emb)  # (T, C)
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        backend: str,
        mode: str,
        dtype: str,
        model: Mapping[str, Any],
        stage_order: Sequence[str],
        checkpoint: Mapping[str, Any] | None = None,
        tool_versions: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        extend_stage_order: bool = False,
    ):
        # extend_stage_order: stages missing from stage_order are appended to it as they first
        # appear, for dumps whose names are only known at run time (instrumented kernel calls).
        self._extend_stage_order = extend_stage_order
        self.path = _absolute(path)
        if not self.path.name:
            raise ParityError(f"cannot write a dump at {path!s}: give a directory name")
        for field, value in (("backend", backend), ("mode", mode)):
            if not isinstance(value, str) or not value:
                raise ParityError(f"dump {field} must be a non-empty string, got {value!r}")
        if dtype not in DTYPES:
            raise ParityError(f"dump dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        order = list(stage_order)
        if not order or not all(isinstance(s, str) and s for s in order):
            raise ParityError("stage_order must be a non-empty list of stage names")
        if len(set(order)) != len(order):
            dups = sorted({s for s in order if order.count(s) > 1})
            raise ParityError(f"stage_order names a stage more than once: {', '.join(dups)}")
        # Checked now, not at close, so a bad target fails before the model runs.
        _check_replaceable(self.path)

        self.partial_path = partial_dir_for(self.path)
        self._manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "mode": mode,
            "dtype": dtype,
            "model": dict(model),
            "checkpoint": None if checkpoint is None else dict(checkpoint),
            "stage_order": order,
            "steps": [],
            "tool_versions": dict(tool_versions or {}),
            "extra": dict(extra or {}),
        }
        try:
            json.dumps(self._manifest)
        except (TypeError, ValueError) as e:
            raise ParityError(f"model/checkpoint/extra must be JSON-serialisable: {e}") from None
        self._state = "new"  # new -> open -> closed | aborted
        self._step_open = False
        self._logged_order = len(order)  # stage_order's length as the step log last recorded it

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> DumpWriter:
        if self._state != "new":
            raise ParityError(f"DumpWriter for {self.path} was already opened")
        if self.partial_path in _ACTIVE_PARTIALS:
            raise ParityError(f"another DumpWriter in this process is already writing {self.path}")
        try:
            if self.partial_path.exists():
                # Left by an earlier process that had our pid (common in containers); it can never
                # be resumed, and no writer of ours is using it.
                shutil.rmtree(self.partial_path)
            self.partial_path.mkdir(parents=True)
        except OSError as e:  # a parent that is a file, a read-only or full disk
            raise ParityError(f"cannot create the dump directory {self.partial_path}: {_reason(e)}") from None
        _ACTIVE_PARTIALS.add(self.partial_path)
        self._state = "open"
        self._write_manifest()
        return self

    def close(self) -> Path:
        """Mark the dump complete and move it to ``path``; returns that path."""
        self._require_open()
        if self._step_open:
            raise ParityError("close() called while a step is still open")
        try:
            _check_replaceable(self.path)  # again: something may have appeared there during the run
            self._manifest["complete"] = True
            self._write_manifest()
            (self.partial_path / STEP_LOG_NAME).unlink(missing_ok=True)  # the manifest lists every step now
            try:
                if self.path.exists() and (self.path / MANIFEST_NAME).is_file():
                    # Directories cannot be swapped atomically; move the old dump aside first so that
                    # the final path is, at every instant, absent, the old dump, or the new one.
                    old = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
                    if old.exists():
                        shutil.rmtree(old)
                    os.rename(self.path, old)
                    os.rename(self.partial_path, self.path)
                    shutil.rmtree(old)
                else:
                    # Absent or an empty directory: rename(2) replaces an empty directory.
                    os.replace(self.partial_path, self.path)
            except OSError as e:
                # Every step is written; only the move failed, so the finished dump is kept where it is.
                raise ParityError(f"cannot move the finished dump {self.partial_path} to {self.path}: {_reason(e)}; "
                                  "it is complete where it is") from None
        except BaseException:
            self._state = "aborted"
            raise
        finally:
            _ACTIVE_PARTIALS.discard(self.partial_path)
        self._state = "closed"
        _remove_stale_partials(self.path)
        return self.path

    def __enter__(self) -> DumpWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            # The partial directory stays for debugging; its manifest says complete: false and,
            # written once more now, lists the steps that finished (the step log has them too).
            self._state = "aborted"
            _ACTIVE_PARTIALS.discard(self.partial_path)
            if self.partial_path.is_dir():
                try:  # not _write_manifest: its failure path would remove what this keeps
                    self._replace_manifest()
                except OSError:
                    pass  # the disk failed too: the step log still lists the finished steps
        return False

    # -- steps ---------------------------------------------------------------------------------

    @contextmanager
    def step(self, *, kind: str, ids: Sequence[int]) -> Iterator[StepWriter]:
        """One step; its file is written when the block exits without an exception."""
        self._require_open()
        if self._step_open:
            raise ParityError("a step is already open; finish it before starting the next")
        if kind not in STEP_KINDS:
            raise ParityError(f"step kind must be one of {', '.join(STEP_KINDS)}, got {kind!r}")
        id_list = _as_ids(ids)
        if kind == "decode" and len(id_list) != 1:
            raise ParityError(f"a decode step takes exactly 1 token id, got {len(id_list)}")
        index = len(self._manifest["steps"])
        writer = StepWriter(
            index=index, kind=kind, ids=id_list, stage_order=self._manifest["stage_order"],
            extend=self._extend_stage_order, spool_dir=self.partial_path,
            failed=self._write_failed,
        )
        self._step_open = True
        try:
            yield writer
            self._write_step(writer)
        finally:
            writer.discard()
            self._step_open = False

    def _write_step(self, step: StepWriter) -> None:
        name = step_file_name(step.index)
        tmp = self.partial_path / f"{name}.tmp"
        # Repeated in the file header for someone who finds a lone step file; values must be strings.
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "step": str(step.index),
            "kind": step.kind,
        }
        try:
            save_file(step, tmp, metadata=metadata)
            os.replace(tmp, self.partial_path / name)
        except (SafetensorError, OSError) as e:  # safetensors reports a full disk as SafetensorError
            raise self._write_failed(f"step {step.index}", e) from None
        entry = {"index": step.index, "kind": step.kind, "ids": step.ids, "file": name, "stages": step.stages}
        self._manifest["steps"].append(entry)
        step._written = True
        step.discard()  # its bytes are in the step file now
        self._log_step(entry)

    def _log_step(self, entry: dict[str, Any]) -> None:
        """Append the finished step to the step log (after its file is in place, so a listed step is
        whole). One write of one line: a process killed mid-write leaves at most a torn last line,
        which the reader drops. Stages first seen in this step (extend_stage_order) go with it."""
        order = self._manifest["stage_order"]
        line: dict[str, Any] = {"step": entry}
        if len(order) != self._logged_order:
            line["stage_order"], self._logged_order = order, len(order)
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            fd = os.open(self.partial_path / STEP_LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._write_failed(STEP_LOG_NAME, e) from None

    def _replace_manifest(self) -> None:
        tmp = self.partial_path / f"{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(self._manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.partial_path / MANIFEST_NAME)

    def _write_manifest(self) -> None:
        try:
            self._replace_manifest()
        except OSError as e:
            raise self._write_failed(MANIFEST_NAME, e) from None

    def _write_failed(self, what: str, exc: BaseException) -> ParityError:
        """A write that failed (a full disk, a disk gone read-only): the dump can never be finished,
        so its directory is removed, which also gives back the space a full disk needs. The
        final path was never touched, so nothing there reads as a complete dump."""
        self._state = "aborted"
        _ACTIVE_PARTIALS.discard(self.partial_path)
        shutil.rmtree(self.partial_path, ignore_errors=True)
        return ParityError(f"cannot write the dump {self.path} ({what}): {_reason(exc)}; "
                           "the unfinished dump was removed")

    def _require_open(self) -> None:
        if self._state != "open":
            raise ParityError(
                f"DumpWriter for {self.path} is {self._state}, not open; use it as a context manager"
            )


def save_file(step: StepWriter, path: Path, *, metadata: dict[str, str]) -> None:
    """Write ``step``'s spooled stages to ``path`` as a safetensors file: the layout
    ``safetensors.numpy.save_file`` writes (little-endian u64 header length, JSON header padded
    with spaces to 8 bytes, then each tensor's bytes back to back), streamed from the spool in
    blocks, so the step is never in memory. (The name is the one this module used to import, so
    fault-injection tests that replace ``format.save_file`` still reach every step-file write.)"""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, nbytes) in step._specs.items():
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        if step._spool is not None:
            step._spool.flush()
            step._spool.seek(0)
            shutil.copyfileobj(step._spool, out, 16 << 20)


def _absolute(path: str | os.PathLike[str]) -> Path:
    # abspath, not resolve(): the partial dir must be a sibling of the path as the user wrote it.
    return Path(os.path.abspath(os.fspath(path)))


def _remove_stale_partials(path: Path) -> None:
    """Remove ``<path>.partial-<pid>`` directories whose writer is dead (a killed earlier run).

    Called once a complete dump is at ``path``: what a dead writer left there can never be
    finished, and a re-run into the same --dump-dir should not keep a killed run's gigabytes. A
    partial whose pid is alive (another process writing now, or a reused pid) is left alone.
    """
    for partial in path.parent.glob(f"{glob.escape(path.name)}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _reason(exc: BaseException) -> str:
    """An OS error's own words ("No space left on device"), without safetensors' wrapping."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text.removeprefix("Error while serializing: ").removeprefix("I/O error: ")


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        if not path.parent.is_dir() and path.parent.exists():
            raise ParityError(f"cannot write a dump at {path}: {path.parent} is not a directory; choose another path")
        return
    if not path.is_dir():
        raise ParityError(f"cannot write a dump at {path}: it is not a directory; choose another path")
    if (path / MANIFEST_NAME).is_file() or not any(path.iterdir()):
        return
    raise ParityError(
        f"refusing to overwrite {path}: it is a non-empty directory without {MANIFEST_NAME}, "
        "so not a dump; choose another path or remove it"
    )


def _as_ids(ids: Sequence[int]) -> list[int]:
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ParityError(f"token ids must be non-negative integers, got {i!r}")
        out.append(int(i))
    if not out:
        raise ParityError("a step needs at least one token id")
    return out


# ---------------------------------------------------------------------------------------------
# Reading
#
# Step files are read without safetensors' ``safe_open``: it parses the header and maps the file
# at every open, and a comparison looks stages up tens of thousands of times (a 9-step 0.4B dump
# pair: 22572 lookups, 13 s of a 27 s comparison at ~0.6 ms each; 0.7 s now, see
# benchmarks/results/read_speed-0.4b.md). Here each file's header is parsed once, with the checks
# safetensors makes, and kept (decode steps share one layout); each array is read with positioned
# reads into a fresh array. Nothing is mapped and no file stays open, so nothing stays resident
# beyond the arrays a caller holds (issue 9): reading a 592 MiB prefill step stage by stage peaks
# at its largest array (128 MiB), where safe_open peaked at twice that.

# Beyond this a header length is garbage, not a header (safetensors' own MAX_HEADER_SIZE).
_MAX_HEADER_BYTES = 100_000_000
# The dtypes a step file may hold: the writer's (_SAFETENSORS_DTYPES). numpy has no bfloat16, so a
# dump stores none (bfloat16 runs record float32); a file holding one was not written here.
_NUMPY_DTYPES = {code: np.dtype(name).newbyteorder("<") for name, code in _SAFETENSORS_DTYPES.items()}


class _Unreadable(Exception):
    """Why a step file cannot be read: the reason only; the caller names the file and adds _DAMAGED."""


class _Replaced(_Unreadable):
    """The file is a sound step file, but its own header says it is another step's."""


class _StepFile:
    """One step file's parsed header — each stage's dtype, shape and offset, nothing else — and
    reads of single stages from it, each opening the file, reading and closing it.

    Offsets are kept from the start of the data, so every decode step of a run has the same layout
    (only the header's step number differs), and a layout equal to ``like``'s is that one object:
    a reader of a 64-step dump keeps about two layouts, not 65.

    The header was parsed for one version of the file, known by (device, inode, size, mtime): a
    file found changed at a read (rewritten, truncated, replaced) is parsed and checked again
    before anything is read, so an array never comes from an old header's offsets in a new file's
    bytes; a file cut short between that check and the read is caught by the read coming up short.
    (A same-size rewrite in place within one mtime tick is not seen; nothing that writes dumps does that.)
    """

    __slots__ = ("path", "_index", "_kind", "_parsed")

    def __init__(self, path: Path, *, index: int, kind: str, like: _StepFile | None = None):
        self.path = path
        self._index, self._kind = index, kind
        with open(path, "rb", buffering=0) as f:
            self._load(f, os.fstat(f.fileno()), like=like)

    def keys(self) -> set[str]:
        return set(self._parsed[2])

    def check(self) -> None:
        """Raise _Unreadable/OSError if the file is no longer readable; parse it again if it changed."""
        if _identity(os.stat(self.path)) != self._parsed[0]:
            with open(self.path, "rb", buffering=0) as f:
                self._load(f, os.fstat(f.fileno()))

    def layout(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _ = self._parsed[2][name]
        return dtype, shape

    def read(self, name: str, *, first: int = 0, count: int | None = None) -> np.ndarray:
        """Stage ``name``'s array; with ``count``, only its flat elements [first, first + count), as
        a 1-D array (C order: a contiguous run of the file's bytes)."""
        with open(self.path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if _identity(st) != self._parsed[0]:
                self._load(f, st)
            _, data_start, layout = self._parsed
            try:
                dtype, shape, begin = layout[name]
            except KeyError:
                raise _Unreadable(f"the file changed after the dump was opened and no longer holds stage {name!r}") from None
            if count is not None:
                shape = (count,)
                begin += first * np.dtype(dtype).itemsize
            out = np.empty(shape, dtype)
            view = memoryview(out.reshape(-1).view(np.uint8))
            offset = data_start + begin
            f.seek(offset)
            done = 0
            while done < len(view):  # one read, unless the OS returns less (Linux caps a read at ~2 GiB)
                got = f.readinto(view[done:])
                if not got:
                    raise _Unreadable(
                        f"the file ends at byte {offset + done}, inside stage {name!r}'s data; "
                        "it was cut short after the dump was opened"
                    )
                done += got
        return out

    def _load(self, f, st: os.stat_result, *, like: _StepFile | None = None) -> None:
        data_start, layout, metadata = _parse_header(f, size=st.st_size)
        if like is not None and like._parsed[2] == layout:
            layout = like._parsed[2]
        # Each file repeats its step index and kind in its header (written by DumpWriter): a step
        # file swapped with another step's, or copied in from another run, shows here rather than
        # as a comparison of the wrong tokens.
        if metadata.get("format") == FORMAT_NAME and (
            metadata.get("step") != str(self._index) or metadata.get("kind") != self._kind
        ):
            raise _Replaced(
                f"the file holds step {metadata.get('step')} ({metadata.get('kind')}), the manifest lists it "
                f"as step {self._index} ({self._kind}); a step file was replaced"
            )
        self._parsed = (_identity(st), data_start, layout)  # one assignment: a read never sees half of it


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(f, *, size: int) -> tuple[int, dict[str, tuple[np.dtype, tuple[int, ...], int]], dict[str, str]]:
    """Where the data starts, the stages (name -> dtype, shape, offset of its bytes from the start
    of the data) and the metadata of the safetensors file open as ``f``, of ``size`` bytes.

    Checked as safetensors checks a file it opens: a sane header length, a JSON object, known
    dtypes, each stage's byte span matching its shape, the spans back to back from the end of the
    header to the end of the file (so a truncated or padded file is refused here, not mid-read)."""
    if size < 8:
        raise _Unreadable(f"{size} bytes, too short for a safetensors header")
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) != 8:
        raise _Unreadable(f"the file ends inside its header length ({len(prefix)} of 8 bytes read)")
    (length,) = struct.unpack("<Q", prefix)
    if length > _MAX_HEADER_BYTES or 8 + length > size:
        raise _Unreadable(f"the header length {length} does not fit a file of {size} bytes")
    raw = f.read(length)
    if len(raw) != length:
        raise _Unreadable(f"the file ends inside its header ({8 + len(raw)} of {size} bytes read)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Unreadable(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _Unreadable("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # optional; null is how safetensors writes none
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Unreadable("the header's __metadata__ is not an object of strings")
    data_start = 8 + length
    tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _Unreadable(f"stage {name!r}: its header entry is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = _NUMPY_DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise _Unreadable(f"stage {name!r} has dtype {code!r}, not one a dump stores ({', '.join(_NUMPY_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise _Unreadable(f"stage {name!r}: shape {shape!r} is not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
            raise _Unreadable(f"stage {name!r}: data_offsets {offsets!r} is not a [begin, end] pair")
        begin, end = offsets
        need = math.prod(shape) * dtype.itemsize  # Python ints: a garbage shape cannot overflow
        if end - begin != need:
            raise _Unreadable(f"stage {name!r}: data_offsets {offsets} span {end - begin} bytes, its shape {shape} "
                              f"of {code} needs {need}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, tuple(shape), begin)
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise _Unreadable(f"stage {name!r} starts at data byte {begin}, not {at}: the stages' bytes must be back to back")
        at = end
    if data_start + at != size:
        raise _Unreadable(f"the header accounts for {data_start + at} bytes, the file has {size}")
    return data_start, tensors, metadata


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _Unreadable) else _reason(exc)


# A record this large (a 512-token prompt's (512, 65536) fp32 logits: 128 MiB) is compared from the
# file a block at a time (StepArrays.stored): held whole on both sides it was +0.5 GB on the parity
# process's peak, the 0.1B 512-token scale row's 1.32x (issue 9).
STORED_BYTES = 32 << 20


class StoredArray:
    """A step file's record read on demand: shape, dtype, ndim, size and nbytes, and rows (slices of
    the leading axis, C order: contiguous bytes) read from the file when sliced. ``reshape`` gives
    another view of the same bytes; ``np.asarray`` reads it whole. The compare engine reads large
    records this way, one block at a time."""

    __slots__ = ("_read", "shape", "dtype")
    stored_record = True  # what the compare engine looks for (parity.compare.metrics.as_record), no import needed

    def __init__(self, read, *, shape: tuple[int, ...], dtype: np.dtype):
        self._read, self.shape, self.dtype = read, tuple(int(n) for n in shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def reshape(self, *shape) -> StoredArray:
        dims = [int(n) for n in (shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)]
        if -1 in dims and dims.count(-1) == 1:
            known = int(np.prod([n for n in dims if n != -1], dtype=np.int64))
            if known and self.size % known == 0:
                dims[dims.index(-1)] = self.size // known
        if min(dims, default=0) < 0 or int(np.prod(dims, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape a stored array of shape {self.shape} into {tuple(shape)}")
        return StoredArray(self._read, shape=tuple(dims), dtype=self.dtype)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1) or not self.shape:
            return np.asarray(self)[key]
        start, stop, _ = key.indices(self.shape[0])
        stop = max(start, stop)
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        return self._read(first=start * row, count=(stop - start) * row).reshape((stop - start, *self.shape[1:]))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(first=0, count=self.size).reshape(self.shape)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StoredArray(shape={self.shape}, dtype={self.dtype})"


class StepArrays(Mapping):
    """One step's records, a read-only mapping stage -> array that reads each array from the step
    file when it is looked up and keeps none: whoever holds a value holds its memory, so a
    comparison walking the stages in order holds one stage per side, not the whole step."""

    def __init__(self, *, source: _StepFile, stages: Sequence[str]):
        self._source = source  # the reader's parsed header of the step file
        self._file = source.path
        self._stages = list(stages)
        self._known = set(self._stages)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        try:
            return self._source.read(name)
        except (_Unreadable, OSError) as e:
            raise ParityError(f"{self._file}: cannot read stage {name!r} ({_why(e)}); {_DAMAGED}") from None

    def stored(self, name: str) -> np.ndarray | StoredArray:
        """``self[name]``, or for a record of STORED_BYTES or more a StoredArray that reads it from
        the file block by block as the comparison walks it."""
        if name not in self._known:
            raise KeyError(name)
        dtype, shape = self._source.layout(name)
        if int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize < STORED_BYTES:
            return self[name]

        def read(*, first: int, count: int) -> np.ndarray:
            try:
                return self._source.read(name, first=first, count=count)
            except (_Unreadable, OSError) as e:
                raise ParityError(f"{self._file}: cannot read stage {name!r} ({_why(e)}); {_DAMAGED}") from None

        return StoredArray(read, shape=shape, dtype=dtype)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)

    def __repr__(self) -> str:
        return f"StepArrays({str(self._file)!r}, {len(self._stages)} stages)"


class DumpReader:
    """A validated, complete dump; step files are read on demand.

    Satisfies the compare engine's RunView protocol (backend, mode, dtype, model, stage_order,
    steps, read_step, read_stage, describe).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = _absolute(path)
        self.manifest = _load_manifest(self.path)
        m = self.manifest
        self.backend: str = m["backend"]
        self.mode: str = m["mode"]
        self.dtype: str = m["dtype"]
        self.model: dict[str, Any] = m["model"]
        self.stage_order: list[str] = m["stage_order"]
        self.checkpoint: dict[str, Any] | None = m["checkpoint"]
        self.tool_versions: dict[str, str] = m["tool_versions"]
        self.extra: dict[str, Any] = m["extra"]
        self.steps: list[StepInfo] = [
            StepInfo(index=s["index"], kind=s["kind"], ids=list(s["ids"])) for s in m["steps"]
        ]
        # Each file's header is parsed now (and kept: see _StepFile) and checked against the file's
        # size: cheap, and it catches a truncated or garbled file now rather than mid-comparison.
        for s in m["steps"]:
            keys = self._open_keys(s)
            missing = [name for name in s["stages"] if name not in keys]
            if missing:
                raise ParityError(
                    f"{self.path / s['file']}: stage(s) {', '.join(missing)} listed in the manifest "
                    f"are missing from the file; {_DAMAGED}"
                )
        # A writer lists every step file it writes, so a step file the manifest does not list means
        # the manifest lost a step (edited by hand, or copied from a shorter run): reading on would
        # compare fewer steps than were recorded and call the shorter run a pass.
        listed = {s["file"] for s in m["steps"]}
        unlisted = sorted(p.name for p in self.path.glob("step-*.safetensors") if p.name not in listed)
        if unlisted:
            raise ParityError(
                f"{self.path / unlisted[0]}: step file not listed in the manifest's steps "
                f"({len(unlisted)} such file(s)); the manifest was edited or mixed with another run's; {_DAMAGED}"
            )

    def step_stages(self, index: int) -> list[str]:
        """The stages recorded in step ``index``, in stage_order."""
        return list(self._step_entry(index)["stages"])

    def read_step(self, index: int) -> StepArrays:
        """Step ``index``'s stages, in stage_order; each array is read from the file when looked up.

        Not all at once: a 512-token prefill of a 0.1B model is ~0.6 GB of records, and a
        comparison holds two steps (issue 9). The file is checked readable now, as before.
        """
        entry = self._step_entry(index)
        source = self._step_file(entry)
        try:
            source.check()
        except (_Unreadable, OSError) as e:
            raise ParityError(f"{source.path}: cannot read step file ({_why(e)}); {_DAMAGED}") from None
        return StepArrays(source=source, stages=entry["stages"])

    def read_stage(self, index: int, stage: str) -> np.ndarray:
        entry = self._step_entry(index)
        if stage not in entry["stages"]:
            raise ParityError(
                f"stage {stage!r} was not recorded in step {index} of {self.path} "
                f"({len(entry['stages'])} stages recorded; see the manifest's steps[{index}].stages)"
            )
        source = self._step_file(entry)
        try:
            return source.read(stage)
        except (_Unreadable, OSError) as e:
            raise ParityError(f"{source.path}: cannot read stage {stage!r} ({_why(e)}); {_DAMAGED}") from None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "dtype": self.dtype,
            "path": str(self.path),
            "checkpoint": self.checkpoint,
            "tool_versions": self.tool_versions,
            "extra": self.extra,
        }

    def __repr__(self) -> str:
        steps = len(self.steps)
        return f"DumpReader({str(self.path)!r}, backend={self.backend!r}, mode={self.mode!r}, steps={steps})"

    def _step_entry(self, index: int) -> dict[str, Any]:
        is_int = isinstance(index, (int, np.integer)) and not isinstance(index, bool)
        if not is_int or not 0 <= index < len(self.steps):
            raise ParityError(f"{self.path} has steps 0..{len(self.steps) - 1}; there is no step {index!r}")
        return self.manifest["steps"][int(index)]

    def _open_keys(self, entry: dict[str, Any]) -> set[str]:
        """Parse and check step ``entry``'s file (kept for its reads); the stages it holds."""
        file = self.path / entry["file"]
        if not file.is_file():
            raise ParityError(f"{file}: step file listed in the manifest is missing; {_DAMAGED}")
        files = self._step_files()
        try:
            source = _StepFile(file, index=entry["index"], kind=entry["kind"], like=files.get(entry["index"] - 1))
        except _Replaced as e:
            raise ParityError(f"{file}: {e}; {_DAMAGED}") from None
        except (_Unreadable, OSError) as e:
            raise ParityError(f"{file}: corrupt step file ({_why(e)}); {_DAMAGED}") from None
        files[entry["index"]] = source
        return source.keys()

    def _step_file(self, entry: dict[str, Any]) -> _StepFile:
        files = self._step_files()
        if entry["index"] not in files:  # a subclass that built itself without _open_keys
            self._open_keys(entry)
        return files[entry["index"]]

    def _step_files(self) -> dict[int, _StepFile]:
        # Made here, not in __init__: PartialDumpReader (worker.py) builds itself without it.
        try:
            return self._parsed_steps
        except AttributeError:
            self._parsed_steps: dict[int, _StepFile] = {}
            return self._parsed_steps


def _load_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        pattern = f"{glob.escape(path.name)}.partial-*"
        partials = sorted(p.name for p in path.parent.glob(pattern)) if path.parent.is_dir() else []
        hint = f" (an unfinished run left {partials[0]}: that run did not complete)" if partials else ""
        raise ParityError(f"no dump at {path}{hint}; check the path or re-run the dump")
    if not path.is_dir():
        raise ParityError(f"{path} is not a dump directory (a dump is a directory with {MANIFEST_NAME})")
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.is_file():
        raise ParityError(f"{path} has no {MANIFEST_NAME}, so it is not a dump; check the path")
    try:
        m = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ParityError(f"{manifest_file} is not valid JSON ({e}); {_DAMAGED}") from None

    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ParityError(f"{manifest_file} is not an {FORMAT_NAME} manifest (wrong or missing format field)")
    version = m.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ParityError(f"{manifest_file}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ParityError(
            f"{path} uses dump format version {version}, newer than this tool reads ({FORMAT_VERSION}); "
            "upgrade rwkv-parity to read it"
        )
    if m.get("complete") is not True:
        raise ParityError(
            f"{path} is an incomplete dump (the run that wrote it did not finish); re-run the dump"
        )
    _validate_fields(m, where=manifest_file)
    return m


def _validate_fields(m: dict[str, Any], *, where: Path) -> None:
    def bad(what: str) -> ParityError:
        return ParityError(f"{where}: {what}; {_DAMAGED}")

    for field in ("backend", "mode", "dtype"):
        if not isinstance(m.get(field), str):
            raise bad(f"{field!r} must be a string")
    if m["dtype"] not in DTYPES:
        raise bad(f"dtype {m['dtype']!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(m.get("model"), dict):
        raise bad("'model' must be an object")
    if m.get("checkpoint") is not None and not isinstance(m["checkpoint"], dict):
        raise bad("'checkpoint' must be an object or null")
    for field in ("tool_versions", "extra"):
        if not isinstance(m.get(field), dict):
            raise bad(f"{field!r} must be an object")
    order = m.get("stage_order")
    if not isinstance(order, list) or not all(isinstance(s, str) for s in order):
        raise bad("'stage_order' must be a list of stage names")
    known = set(order)
    steps = m.get("steps")
    if not isinstance(steps, list):
        raise bad("'steps' must be a list")
    for i, s in enumerate(steps):
        if not isinstance(s, dict) or s.get("index") != i:
            raise bad(f"steps[{i}] must be an object with index {i}")
        if s.get("kind") not in STEP_KINDS:
            raise bad(f"steps[{i}].kind must be one of {', '.join(STEP_KINDS)}")
        ids = s.get("ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad(f"steps[{i}].ids must be a list of integers")
        file = s.get("file")
        # A bare file name only: a manifest must not point a reader outside its own directory.
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise bad(f"steps[{i}].file must be a file name inside the dump directory")
        stages = s.get("stages")
        if not isinstance(stages, list) or not all(isinstance(n, str) for n in stages):
            raise bad(f"steps[{i}].stages must be a list of stage names")
        unknown = [n for n in stages if n not in known]
        if unknown:
            raise bad(f"steps[{i}] records stage(s) not in stage_order: {', '.join(unknown)}")


# -- reading what a dead worker left --------------------------------------------------------------
def _is_partial(path: Path) -> bool:
    return ".partial-" in Path(path).name


def open_dump(path: str | os.PathLike[str]):
    """A reader for ``path``: a complete dump, or the completed steps of a crashed backend's
    ``<dir>.partial-<pid>``."""
    return PartialDumpReader(path) if _is_partial(Path(path)) else DumpReader(path)


def _read_step_log(path: Path, *, into: dict[str, Any]) -> None:
    """Add the steps an unfinished writer logged (DumpWriter._log_step) to its manifest ``into``."""
    if not isinstance(into.get("steps"), list):
        return  # _validate_fields names the damage
    try:
        lines = path.read_bytes().split(b"\n") if path.is_file() else []
    except OSError as e:
        raise ParityError(f"{path}: cannot read the unfinished dump's step log ({_reason(e)})") from None
    for raw in lines[:-1]:  # the part after the last newline is empty, or a line the writer never finished
        try:
            line = json.loads(raw)
            entry = line["step"]
        except (ValueError, TypeError, KeyError) as e:
            raise ParityError(f"{path}: a line of the step log is not a step ({_why(e)}); {_DAMAGED}") from None
        if "stage_order" in line:
            into["stage_order"] = line["stage_order"]
        if isinstance(entry, dict) and isinstance(entry.get("index"), int) and entry["index"] < len(into["steps"]):
            continue  # listed already: a writer that failed cleanly wrote its manifest once more (DumpWriter.__exit__)
        into["steps"].append(entry)


class PartialDumpReader(DumpReader):
    """The steps a crashed or killed writer finished, from its ``<dir>.partial-<pid>`` directory.

    The writer (parity/dumpers/format.py) renames each step file into place *before* it lists the
    step in its step log (one appended line per step), so every step the log lists is whole; the
    step being written when the process died is absent. The manifest keeps
    ``complete: false`` on disk — this reader never makes the directory read as a finished dump.
    Reads like ``DumpReader`` (the compare engine's RunView); only the completeness check differs.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = _absolute(path)
        manifest_file = self.path / MANIFEST_NAME
        try:
            m = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ParityError(f"{manifest_file}: cannot read the unfinished dump's manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise ParityError(f"{manifest_file} is not an {FORMAT_NAME} manifest")
        version = m.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise ParityError(f"{manifest_file}: unreadable format_version {version!r}")
        _read_step_log(self.path / STEP_LOG_NAME, into=m)
        _validate_fields(m, where=manifest_file)
        self.manifest = m
        self.backend, self.mode, self.dtype = m["backend"], m["mode"], m["dtype"]
        self.model, self.stage_order, self.checkpoint = m["model"], m["stage_order"], m["checkpoint"]
        self.tool_versions, self.extra = m["tool_versions"], m["extra"]
        self.steps = [StepInfo(index=s["index"], kind=s["kind"], ids=list(s["ids"])) for s in m["steps"]]
        for s in m["steps"]:
            keys = self._open_keys(s)
            if any(name not in keys for name in s["stages"]):
                raise ParityError(f"{self.path / s['file']}: stages listed in the manifest are missing from the file")

    def describe(self) -> dict:
        return {**super().describe(), "complete": False, "steps_recorded": len(self.steps)}
