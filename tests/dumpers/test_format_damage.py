"""Dumps edited by hand, and dumps written to a full disk (issue 12).

A reader given a damaged dump raises one ParityError of one line that names the file and what is
wrong; it never gives a traceback, and it never compares something other than what was recorded
as if it were (a step missing from the manifest, a step file swapped for another step's). A
writer that runs out of space says so in one line and leaves nothing at the dump's path.

Full disk is tested two ways: the writes raise ENOSPC by monkeypatching (always runs), and a real
64 KiB tmpfs (runs where the test may mount one: root in a container that allows it; skipped
elsewhere).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from parity.compare import TolerancePolicy, compare_runs
from parity.dumpers import format as fmt
from parity.dumpers.format import MANIFEST_NAME, DumpReader, partial_dir_for, step_file_name
from parity.errors import ParityError

from .test_format import make_writer, write_run


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    write_run(path, ids=[5, 6, 7], n_decode=2)  # steps 0 (prefill, 3 tokens), 1 and 2 (decode)
    return path


def edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / MANIFEST_NAME).read_text())
    edit(m)
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def refused(path: Path) -> str:
    """The one line DumpReader refuses ``path`` with."""
    with pytest.raises(ParityError) as info:
        DumpReader(path)
    message = str(info.value)
    assert "\n" not in message and message, message
    return message


def _replace_step_with(src: int, dst: int):
    def edit(path: Path) -> None:
        shutil.copyfile(path / step_file_name(src), path / step_file_name(dst))
    return edit


def _truncate(path: Path) -> None:
    f = path / step_file_name(1)
    f.write_bytes(f.read_bytes()[:-10])


def _stage_missing_from_file(path: Path) -> None:
    arrays = load_file(path / step_file_name(1))
    del arrays["logits"]
    save_file(arrays, path / step_file_name(1), metadata={"format": fmt.FORMAT_NAME, "format_version": "1",
                                                          "step": "1", "kind": "decode"})


# (edit to the dump directory, what the one line must say)
HAND_EDITS = {
    "step file deleted": (lambda p: (p / step_file_name(1)).unlink(), "step-0001.safetensors: step file listed in the manifest is missing"),
    "step file truncated": (_truncate, "step-0001.safetensors: corrupt step file"),
    "step file emptied": (lambda p: (p / step_file_name(2)).write_bytes(b""), "step-0002.safetensors: corrupt step file"),
    "step file replaced by a directory": (
        lambda p: ((p / step_file_name(2)).unlink(), (p / step_file_name(2)).mkdir()), "step file listed in the manifest is missing"),
    # Two decode steps have the same shapes: swapped, only the file's own header tells them apart.
    "decode step file replaced by another decode step's": (_replace_step_with(1, 2), "the file holds step 1 (decode), the manifest lists it as step 2 (decode); a step file was replaced"),
    "decode step file replaced by the prefill's": (_replace_step_with(0, 1), "holds step 0 (prefill), the manifest lists it as step 1 (decode)"),
    "a stage removed from a step file": (_stage_missing_from_file, "stage(s) logits listed in the manifest are missing from the file"),
    # The manifest loses its last step but the file stays: reading on would compare fewer steps
    # than were recorded and pass.
    "last step removed from the manifest": (
        lambda p: edit_manifest(p, lambda m: m["steps"].pop()), "step-0002.safetensors: step file not listed in the manifest's steps"),
    "every step removed from the manifest": (
        lambda p: edit_manifest(p, lambda m: m.__setitem__("steps", [])), "step file not listed in the manifest's steps (3 such file(s))"),
    "a stray step file added": (_replace_step_with(2, 7), "step-0007.safetensors: step file not listed"),
    "steps reordered in the manifest": (
        lambda p: edit_manifest(p, lambda m: m["steps"].reverse()), "steps[0] must be an object with index 0"),
    "a step index changed": (
        lambda p: edit_manifest(p, lambda m: m["steps"][1].__setitem__("index", 5)), "steps[1] must be an object with index 1"),
    "complete set to false": (lambda p: edit_manifest(p, lambda m: m.__setitem__("complete", False)), "is an incomplete dump"),
    "complete removed": (lambda p: edit_manifest(p, lambda m: m.pop("complete")), "is an incomplete dump"),
    "dtype changed to one we do not know": (
        lambda p: edit_manifest(p, lambda m: m.__setitem__("dtype", "int8")), "dtype 'int8' is not one of float32"),
    "a stage dropped from stage_order": (
        lambda p: edit_manifest(p, lambda m: m["stage_order"].remove("logits")), "records stage(s) not in stage_order: logits"),
    "a stage listed that the file lacks": (
        lambda p: edit_manifest(p, lambda m: m["steps"][0]["stages"].append("L0.att.r")), "stage(s) L0.att.r listed in the manifest are missing"),
    "a step file pointing outside the dump": (
        lambda p: edit_manifest(p, lambda m: m["steps"][0].__setitem__("file", "../run/step-0000.safetensors")), "must be a file name inside"),
    "ids made non-integers": (
        lambda p: edit_manifest(p, lambda m: m["steps"][0].__setitem__("ids", ["5", 6, 7])), "steps[0].ids must be a list of integers"),
    "format_version from the future": (
        lambda p: edit_manifest(p, lambda m: m.__setitem__("format_version", 99)), "newer than this tool reads"),
    "manifest emptied": (lambda p: (p / MANIFEST_NAME).write_text(""), "is not valid JSON"),
    "manifest replaced by a list": (lambda p: (p / MANIFEST_NAME).write_text("[]"), "is not an rwkv-parity-dump manifest"),
    "manifest deleted": (lambda p: (p / MANIFEST_NAME).unlink(), "has no manifest.json, so it is not a dump"),
}


@pytest.mark.parametrize("name", list(HAND_EDITS))
def test_a_dump_edited_by_hand_is_refused_in_one_line(dump: Path, name: str) -> None:
    edit, expected = HAND_EDITS[name]
    edit(dump)
    message = refused(dump)
    assert expected in message, message


def test_files_that_are_not_steps_are_ignored(dump: Path) -> None:
    # Notes, a README, an editor's backup: a dump directory may hold them; only step-*.safetensors
    # files are the dump's own.
    (dump / "notes.txt").write_text("run on the CI box")
    (dump / "manifest.json~").write_text("{}")
    (dump / "extra").mkdir()
    reader = DumpReader(dump)
    assert [s.index for s in reader.steps] == [0, 1, 2]


def _other(tmp_path: Path) -> DumpReader:
    path = tmp_path / "other"
    write_run(path, ids=[5, 6, 7], n_decode=2)
    return DumpReader(path)


def test_changed_ids_are_refused_when_compared(dump: Path, tmp_path: Path) -> None:
    # A manifest whose ids were edited still reads (ids are data); comparing it with a run of the
    # real prompt names the step, instead of comparing different tokens as if they matched.
    edit_manifest(dump, lambda m: m["steps"][1].__setitem__("ids", [99]))
    with pytest.raises(ParityError, match=r"^step 1 differs between the runs: expected decode ids \[8\], actual decode ids \[99\]"):
        compare_runs(actual=DumpReader(dump), expected=_other(tmp_path), policy=TolerancePolicy.for_dtype("float32"))


def test_a_stage_array_of_the_wrong_shape_is_a_shape_finding(dump: Path, tmp_path: Path) -> None:
    # A stage rewritten with a row too many reads fine (shape is data) and is a finding of its own
    # kind where it is compared, never a crash and never a pass.
    arrays = load_file(dump / step_file_name(1))
    arrays["L0.att.wkv"] = np.zeros((2, arrays["L0.att.wkv"].shape[1]), np.float32)
    save_file(arrays, dump / step_file_name(1), metadata={"format": fmt.FORMAT_NAME, "format_version": "1",
                                                          "step": "1", "kind": "decode"})
    out = compare_runs(actual=DumpReader(dump), expected=_other(tmp_path), policy=TolerancePolicy.for_dtype("float32"))
    bad = [r for r in out.records if r.step == 1 and r.stage == "L0.att.wkv"]
    assert len(bad) == 1 and not bad[0].metrics.passed and bad[0].metrics.reason == "shape", bad


def test_a_stage_array_of_another_dtype_is_compared_by_value(dump: Path, tmp_path: Path) -> None:
    # Stage dtypes are free (fp16 activations beside fp32 state; numpy has no bfloat16, so those
    # are stored as fp32). An array rewritten in another float dtype is compared by its values:
    # made exactly representable, it passes; perturbed, it fails. Neither case is silent.
    def rewrite(value: float) -> None:
        arrays = load_file(dump / step_file_name(1))
        arrays["logits"] = np.full(arrays["logits"].shape, value, np.float64)
        save_file(arrays, dump / step_file_name(1), metadata={"format": fmt.FORMAT_NAME, "format_version": "1",
                                                              "step": "1", "kind": "decode"})

    other = tmp_path / "other"
    write_run(other, ids=[5, 6, 7], n_decode=2)
    theirs = load_file(other / step_file_name(1))
    theirs["logits"][:] = 0.5
    save_file(theirs, other / step_file_name(1), metadata={"format": fmt.FORMAT_NAME, "format_version": "1",
                                                           "step": "1", "kind": "decode"})
    for value, passed in ((0.5, True), (0.75, False)):
        rewrite(value)
        out = compare_runs(actual=DumpReader(dump), expected=DumpReader(other), policy=TolerancePolicy.for_dtype("float32"))
        rec = next(r for r in out.records if r.step == 1 and r.stage == "logits")
        assert rec.metrics.passed is passed, (value, rec.metrics)


# -- full disk -------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["a step file", "the manifest at close", "the first manifest"])
def test_a_full_disk_is_one_line_and_leaves_nothing_that_reads_as_a_dump(tmp_path: Path, monkeypatch, where) -> None:
    path = tmp_path / "run"
    writer = make_writer(path)
    if where == "the first manifest":
        monkeypatch.setattr(fmt.Path, "write_text", _enospc)
    with pytest.raises(ParityError) as info:
        with writer:
            with writer.step(kind="prefill", ids=[1, 2]) as step:
                step.add("emb", np.ones((2, 8), np.float32))
            if where == "a step file":
                monkeypatch.setattr(fmt, "save_file", _enospc)
                with writer.step(kind="decode", ids=[3]) as step:
                    step.add("emb", np.ones((1, 8), np.float32))
            elif where == "the manifest at close":
                monkeypatch.setattr(fmt.Path, "write_text", _enospc)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and str(path) in message, message
    assert not path.exists()  # nothing at the dump's path ...
    assert not partial_dir_for(path).exists()  # ... and the unfinished one is gone: the space is back
    assert "re-run" in refused(path) or "no dump at" in refused(path)


def test_a_full_disk_keeps_the_previous_dump(dump: Path, monkeypatch) -> None:
    before = (dump / MANIFEST_NAME).read_text()
    writer = make_writer(dump)
    monkeypatch.setattr(fmt, "save_file", _enospc)
    with pytest.raises(ParityError, match="No space left on device"):
        with writer, writer.step(kind="prefill", ids=[1]) as step:
            step.add("emb", np.ones((1, 8), np.float32))
    monkeypatch.undo()
    assert (dump / MANIFEST_NAME).read_text() == before and len(DumpReader(dump).steps) == 3


def test_a_dump_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ParityError, match=r"a-file is not a directory; choose another path$"):
        make_writer(tmp_path / "a-file" / "run")


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 64 KiB tmpfs, where this process may mount one."""
    mount = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the monkeypatched ENOSPC tests stand in")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_real_full_disk(tiny_disk: Path) -> None:
    path = tiny_disk / "run"
    writer = make_writer(path)
    with pytest.raises(ParityError) as info:
        with writer:
            for index in range(100):  # 100 x 32 KiB: the 64 KiB disk fills at the second or third step
                with writer.step(kind="prefill" if index == 0 else "decode", ids=[1] if index else [1, 2]) as step:
                    step.add("logits", np.ones((2 if index == 0 else 1, 8192), np.float32))
    message = str(info.value)
    assert "No space left on device" in message and "\n" not in message, message
    assert sorted(p.name for p in tiny_disk.iterdir()) == []  # no dump, no partial, no .tmp


def test_a_finished_dump_removes_what_a_dead_writer_left_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is no longer running: a killed earlier run's
    stale = partial_dir_for(path, pid=dead.pid)
    stale.mkdir()
    (stale / MANIFEST_NAME).write_text('{"complete": false}')
    live = partial_dir_for(path, pid=1)  # pid 1 is alive: a writer at work must be left alone
    live.mkdir()
    write_run(path, ids=[1], n_decode=1)
    assert not stale.exists() and live.exists() and len(DumpReader(path).steps) == 2
