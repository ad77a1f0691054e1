"""The dump format: round trips, atomic writes, and a reader that refuses anything damaged."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from parity.compare import RunView, StepInfo, TolerancePolicy, compare_runs
from parity.dumpers.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    STEP_LOG_NAME,
    DumpReader,
    DumpWriter,
    PartialDumpReader,
    partial_dir_for,
    step_file_name,
)
from parity.errors import ParityError
from parity.stages import stage_order

REPO = Path(__file__).resolve().parents[2]
ORDER = stage_order(n_layer=1)
C, H, N, V = 8, 2, 4, 16


def make_writer(path: Path, **overrides) -> DumpWriter:
    kwargs = dict(
        path=path,
        backend="torch",
        mode="eager",
        dtype="float32",
        model={"version": "5.2", "n_layer": 1, "n_embd": C, "n_head": H, "vocab_size": V},
        stage_order=ORDER,
        checkpoint={"path": "/ckpt/model.pth", "sha256": "ab" * 32},
        tool_versions={"torch": "2.13.0", "numpy": np.__version__},
        extra={"target": "cuda"},
    )
    kwargs.update(overrides)
    return DumpWriter(**kwargs)


def step_arrays(rng: np.random.Generator, *, t: int) -> dict[str, np.ndarray]:
    """A few stages of one step, mixing dtypes the way real backends do (fp16 activations, fp32 state)."""
    return {
        "emb": rng.standard_normal((t, C)).astype(np.float16),
        "L0.att.wkv": rng.standard_normal((t, C)).astype(np.float32),
        "logits": rng.standard_normal((t, V)).astype(np.float32),
        "state.L0.att_kv": rng.standard_normal((H, N, N)).astype(np.float32),
        "state.L0.att_x": rng.standard_normal((C,)).astype(np.float64),
    }


def write_run(path: Path, *, ids: list[int], n_decode: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    written = []
    with make_writer(path) as writer:
        for index in range(n_decode + 1):
            kind, step_ids = ("prefill", ids) if index == 0 else ("decode", [ids[-1] + index])
            arrays = step_arrays(rng, t=len(step_ids))
            with writer.step(kind=kind, ids=step_ids) as step:
                # Reverse order: the manifest must still list stages in stage_order.
                for name in reversed(list(arrays)):
                    step.add(name, arrays[name])
            written.append(arrays)
    return written


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    write_run(path, ids=[5, 6, 7], n_decode=2)
    return path


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_is_bit_exact_with_dtypes_kept(tmp_path: Path) -> None:
    path = tmp_path / "run"
    written = write_run(path, ids=[1, 2, 3, 4], n_decode=3)
    reader = DumpReader(path)

    assert reader.steps == [
        StepInfo(index=0, kind="prefill", ids=[1, 2, 3, 4]),
        StepInfo(index=1, kind="decode", ids=[5]),
        StepInfo(index=2, kind="decode", ids=[6]),
        StepInfo(index=3, kind="decode", ids=[7]),
    ]
    for index, arrays in enumerate(written):
        got = reader.read_step(index)
        assert list(got) == [n for n in ORDER if n in arrays]
        for name, want in arrays.items():
            assert got[name].dtype == want.dtype
            assert got[name].shape == want.shape
            assert got[name].tobytes() == want.tobytes(), (index, name)
            single = reader.read_stage(index, name)
            assert single.dtype == want.dtype and single.tobytes() == want.tobytes()


def test_reader_exposes_run_metadata(dump: Path) -> None:
    reader = DumpReader(dump)
    assert (reader.backend, reader.mode, reader.dtype) == ("torch", "eager", "float32")
    assert reader.model["n_embd"] == C
    assert reader.stage_order == ORDER
    assert reader.step_stages(1) == ["emb", "L0.att.wkv", "logits", "state.L0.att_x", "state.L0.att_kv"]
    described = reader.describe()
    assert described["path"] == str(dump)
    assert described["checkpoint"]["sha256"] == "ab" * 32
    assert described["extra"] == {"target": "cuda"}
    assert described["tool_versions"]["torch"] == "2.13.0"
    assert {"backend", "mode", "dtype"} <= described.keys()


def test_reader_is_a_run_view_the_compare_engine_accepts(tmp_path: Path) -> None:
    write_run(tmp_path / "a", ids=[5, 6, 7], n_decode=1, seed=0)
    write_run(tmp_path / "b", ids=[5, 6, 7], n_decode=1, seed=0)
    write_run(tmp_path / "c", ids=[5, 6, 7], n_decode=1, seed=1)
    a, b, c = (DumpReader(tmp_path / name) for name in "abc")
    assert isinstance(a, RunView)
    policy = TolerancePolicy(dtype=a.dtype)
    same = compare_runs(actual=a, expected=b, policy=policy)
    assert [s.index for s in same.steps] == [0, 1]
    assert len(same.records) == 10 and same.passed and same.complete
    differ = compare_runs(actual=c, expected=b, policy=policy)
    assert (differ.first_divergence.step, differ.first_divergence.stage) == (0, "emb")


def test_manifest_and_steps_readable_without_the_tool(dump: Path) -> None:
    manifest = json.loads((dump / MANIFEST_NAME).read_text())
    assert manifest["format"] == "rwkv-parity-dump"
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["complete"] is True
    assert manifest["created"].endswith("+00:00")
    files = ["step-0000.safetensors", "step-0001.safetensors", "step-0002.safetensors"]
    assert [s["file"] for s in manifest["steps"]] == files
    assert [s["kind"] for s in manifest["steps"]] == ["prefill", "decode", "decode"]
    assert manifest["steps"][0]["ids"] == [5, 6, 7]
    logits = load_file(dump / manifest["steps"][0]["file"])["logits"]
    assert logits.shape == (3, V)
    assert sorted(os.listdir(dump)) == [MANIFEST_NAME, *files]


def test_arrays_are_copied_at_add_time_and_stored_contiguous(tmp_path: Path) -> None:
    path = tmp_path / "run"
    state = np.arange(2 * C, dtype=np.float32).reshape(C, 2)
    with make_writer(path) as writer, writer.step(kind="prefill", ids=[1, 2]) as step:
        step.add("L0.att.k", state.T)  # a non-contiguous view
        state[:] = -1  # a backend reusing its buffer must not change what was recorded
    got = DumpReader(path).read_stage(0, "L0.att.k")
    np.testing.assert_array_equal(got, np.arange(2 * C, dtype=np.float32).reshape(C, 2).T)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    t=st.integers(min_value=1, max_value=5),
    big_endian=st.booleans(),
)
def test_round_trip_any_float_dtype_and_byte_order(dtype, t: int, big_endian: bool) -> None:
    values = np.random.default_rng(t).standard_normal((t, C)).astype(dtype)
    values[0, :3] = [np.inf, -0.0, np.nan]  # special values must survive bit for bit
    given_array = values.astype(values.dtype.newbyteorder(">")) if big_endian else values
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run"
        with make_writer(path) as writer, writer.step(kind="prefill", ids=list(range(t))) as step:
            step.add("emb", given_array)
        got = DumpReader(path).read_stage(0, "emb")
    assert got.dtype == values.dtype
    assert got.tobytes() == values.tobytes()


# ---------------------------------------------------------------------------------------------
# Writer validation


def test_duplicate_stage_in_one_step_is_refused(tmp_path: Path) -> None:
    with make_writer(tmp_path / "run") as writer, writer.step(kind="prefill", ids=[1]) as step:
        step.add("emb", np.zeros((1, C), np.float32))
        with pytest.raises(ParityError, match="'emb' added twice in step 0"):
            step.add("emb", np.ones((1, C), np.float32))


def test_same_stage_in_different_steps_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with make_writer(path) as writer:
        for index in range(2):
            with writer.step(kind="prefill" if index == 0 else "decode", ids=[index]) as step:
                step.add("emb", np.full((1, C), index, np.float32))
    assert DumpReader(path).read_stage(1, "emb")[0, 0] == 1.0


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("L0.att.nope", np.zeros((1, C), np.float32), "not in this dump's stage_order"),
        ("emb", np.zeros((1, C), np.complex64), "not a float or integer dtype"),
        ("emb", [[0.0] * C], "expected a numpy array"),
    ],
)
def test_bad_stage_is_refused(tmp_path: Path, name: str, array, message: str) -> None:
    with make_writer(tmp_path / "run") as writer, writer.step(kind="prefill", ids=[1]) as step:
        with pytest.raises(ParityError, match=message):
            step.add(name, array)


@pytest.mark.parametrize(
    ("kind", "ids", "message"),
    [
        ("decode", [1, 2], "exactly 1 token id"),
        ("verify", [1], "step kind"),
        ("prefill", [], "at least one"),
        ("prefill", [-1], "non-negative"),
    ],
)
def test_bad_step_is_refused(tmp_path: Path, kind: str, ids: list[int], message: str) -> None:
    with make_writer(tmp_path / "run") as writer:
        with pytest.raises(ParityError, match=message):
            with writer.step(kind=kind, ids=ids):
                pass


def test_bad_constructor_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="dtype must be one of"):
        make_writer(tmp_path / "a", dtype="fp32")
    with pytest.raises(ParityError, match="more than once: emb"):
        make_writer(tmp_path / "b", stage_order=["emb", "logits", "emb"])
    with pytest.raises(ParityError, match="JSON-serialisable"):
        make_writer(tmp_path / "c", extra={"target": object()})


# ---------------------------------------------------------------------------------------------
# Atomicity


def test_exception_in_with_block_leaves_only_a_partial_dir(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with pytest.raises(RuntimeError, match="backend crashed"):
        with make_writer(path) as writer:
            with writer.step(kind="prefill", ids=[1, 2]) as step:
                step.add("emb", np.zeros((2, C), np.float32))
            raise RuntimeError("backend crashed")

    assert not path.exists()
    partial = partial_dir_for(path)
    manifest = json.loads((partial / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False
    assert [s["stages"] for s in manifest["steps"]] == [["emb"]]  # the finished step is inspectable
    assert [s.ids for s in PartialDumpReader(partial).steps] == [[1, 2]]  # once, though the step log lists it too
    left = rf"no dump at .*run \(an unfinished run left run\.partial-{os.getpid()}"
    with pytest.raises(ParityError, match=left):
        DumpReader(path)
    with pytest.raises(ParityError, match="incomplete dump"):
        DumpReader(partial)


def test_exception_inside_a_step_does_not_write_that_step(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with pytest.raises(ValueError):
        with make_writer(path) as writer, writer.step(kind="prefill", ids=[1]) as step:
            step.add("emb", np.zeros((1, C), np.float32))
            raise ValueError("stage failed")
    partial = partial_dir_for(path)
    assert not (partial / step_file_name(0)).exists()
    assert json.loads((partial / MANIFEST_NAME).read_text())["steps"] == []


def test_killed_process_leaves_no_complete_dump(tmp_path: Path) -> None:
    path = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from parity.dumpers.format import DumpWriter
        w = DumpWriter(path={str(path)!r}, backend="tvm", mode="debug", dtype="float16",
                       model={{"n_layer": 1}}, stage_order=["emb", "logits"], checkpoint=None,
                       tool_versions={{}}, extra=None)
        w.open()
        with w.step(kind="prefill", ids=[1, 2, 3]) as step:
            step.add("emb", np.ones((3, 4), np.float16))
        with w.step(kind="decode", ids=[4]) as step:
            step.add("emb", np.ones((1, 4), np.float16))
            print(os.getpid(), flush=True)
            os._exit(1)  # as if killed mid-step: no cleanup, no finally blocks
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr
    child_pid = int(proc.stdout.strip())

    assert not path.exists()
    partial = partial_dir_for(path, pid=child_pid)
    assert sorted(os.listdir(partial)) == [MANIFEST_NAME, "step-0000.safetensors", STEP_LOG_NAME]
    assert json.loads((partial / MANIFEST_NAME).read_text())["complete"] is False
    # The step that finished is listed (in the step log: the manifest is not rewritten per step).
    assert [s.ids for s in PartialDumpReader(partial).steps] == [[1, 2, 3]]
    with pytest.raises(ParityError, match="unfinished run"):
        DumpReader(path)
    with pytest.raises(ParityError, match="incomplete dump.*re-run the dump"):
        DumpReader(partial)


def test_an_unfinished_dump_lists_its_finished_steps_from_the_step_log(tmp_path: Path) -> None:
    # A long run must not rewrite its manifest after every step (3000 steps: quadratic); the steps
    # go to an append-only log, which a crashed run's reader (crash isolation) reads back.
    path = tmp_path / "run"
    writer = make_writer(path, extend_stage_order=True).open()
    with writer.step(kind="prefill", ids=[1, 2]) as step:
        step.add("emb", np.zeros((2, C), np.float32))
    with writer.step(kind="decode", ids=[3]) as step:
        step.add("emb", np.zeros((1, C), np.float32))
        step.add("L0.att.kernel.x", np.zeros((1, C), np.float32))  # a stage first seen here
    partial = partial_dir_for(path)
    with open(partial / STEP_LOG_NAME, "ab") as f:
        f.write(b'{"step": {"index": 2, "ki')  # a writer killed mid-line
    reader = PartialDumpReader(partial)
    assert [s.ids for s in reader.steps] == [[1, 2], [3]]
    assert reader.stage_order[-1] == "L0.att.kernel.x"
    assert list(reader.read_step(1)) == ["emb", "L0.att.kernel.x"]
    with open(partial / STEP_LOG_NAME, "ab") as f:
        f.write(b"\nnot json\n")
    with pytest.raises(ParityError, match="step log is not a step"):
        PartialDumpReader(partial)
    writer.close()
    assert sorted(os.listdir(path)) == [MANIFEST_NAME, "step-0000.safetensors", "step-0001.safetensors"]
    assert [s.ids for s in DumpReader(path).steps] == [[1, 2], [3]]


def test_refuses_to_overwrite_a_non_dump_directory(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(ParityError, match="refusing to overwrite .*precious.*not a dump"):
        make_writer(path)
    assert (path / "notes.txt").read_text() == "keep me"


def test_refuses_a_non_dump_that_appears_during_the_run(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with pytest.raises(ParityError, match="refusing to overwrite"):
        with make_writer(path):
            path.mkdir()
            (path / "notes.txt").write_text("keep me")
    assert (path / "notes.txt").read_text() == "keep me"
    assert json.loads((partial_dir_for(path) / MANIFEST_NAME).read_text())["complete"] is False
    # The failed writer released the path, so a retry in this process can write it.
    (path / "notes.txt").unlink()
    with make_writer(path) as writer, writer.step(kind="prefill", ids=[1]) as step:
        step.add("emb", np.zeros((1, C), np.float32))
    assert DumpReader(path).steps[0].ids == [1]


def test_overwrites_an_older_dump(dump: Path) -> None:
    old_stamp = json.loads((dump / MANIFEST_NAME).read_text())["steps"]
    assert len(old_stamp) == 3
    with make_writer(dump, backend="tvm") as writer, writer.step(kind="prefill", ids=[9]) as step:
        step.add("logits", np.full((1, V), 2.0, np.float32))
    reader = DumpReader(dump)
    assert reader.backend == "tvm"
    assert reader.steps == [StepInfo(index=0, kind="prefill", ids=[9])]
    assert sorted(os.listdir(dump)) == [MANIFEST_NAME, "step-0000.safetensors"]  # no stale step files
    assert sorted(p.name for p in dump.parent.iterdir()) == ["run"]  # nothing left beside it


def test_writes_into_an_existing_empty_directory(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    with make_writer(path) as writer, writer.step(kind="prefill", ids=[1]) as step:
        step.add("emb", np.zeros((1, C), np.float32))
    assert DumpReader(path).step_stages(0) == ["emb"]


# ---------------------------------------------------------------------------------------------
# Reader refusals


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match=r"no dump at .*nowhere; check the path"):
        DumpReader(tmp_path / "nowhere")


def test_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="has no manifest.json, so it is not a dump"):
        DumpReader(tmp_path)


def test_truncated_manifest(dump: Path) -> None:
    text = (dump / MANIFEST_NAME).read_text()
    (dump / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ParityError, match=r"manifest\.json is not valid JSON .*re-run the dump"):
        DumpReader(dump)


def test_newer_format_version(dump: Path) -> None:
    manifest = json.loads((dump / MANIFEST_NAME).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (dump / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ParityError, match=r"format version 2, newer than this tool reads \(1\); upgrade"):
        DumpReader(dump)


def test_wrong_format_name(dump: Path) -> None:
    manifest = json.loads((dump / MANIFEST_NAME).read_text())
    manifest["format"] = "something-else"
    (dump / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ParityError, match="not an rwkv-parity-dump manifest"):
        DumpReader(dump)


def test_corrupt_step_file(dump: Path) -> None:
    file = dump / step_file_name(1)
    file.write_bytes(file.read_bytes()[:-7])  # truncated, as by a full disk
    with pytest.raises(ParityError, match=r"step-0001\.safetensors: corrupt step file .*re-run the dump"):
        DumpReader(dump)


def test_garbled_step_file_header(dump: Path) -> None:
    (dump / step_file_name(0)).write_bytes(b"\xff" * 64)
    with pytest.raises(ParityError, match="step-0000.safetensors: corrupt step file"):
        DumpReader(dump)


def test_missing_step_file(dump: Path) -> None:
    (dump / step_file_name(2)).unlink()
    with pytest.raises(ParityError, match=r"0002\.safetensors: step file listed in the manifest is missing"):
        DumpReader(dump)


def test_stage_listed_but_absent_from_file(dump: Path) -> None:
    file = dump / step_file_name(0)
    arrays = load_file(file)
    del arrays["logits"]
    save_file(arrays, file)
    with pytest.raises(ParityError, match=r"stage\(s\) logits listed in the manifest are missing"):
        DumpReader(dump)


def test_step_file_pointing_outside_the_dump_is_refused(dump: Path) -> None:
    manifest = json.loads((dump / MANIFEST_NAME).read_text())
    manifest["steps"][0]["file"] = "../elsewhere.safetensors"
    (dump / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ParityError, match=r"steps\[0\]\.file must be a file name inside the dump"):
        DumpReader(dump)


def test_unknown_step_or_stage_on_read(dump: Path) -> None:
    reader = DumpReader(dump)
    with pytest.raises(ParityError, match="has steps 0..2; there is no step 3"):
        reader.read_step(3)
    with pytest.raises(ParityError, match="'L0.ffn.k' was not recorded in step 1"):
        reader.read_stage(1, "L0.ffn.k")


def test_file_damaged_after_open_is_reported_on_read(dump: Path) -> None:
    reader = DumpReader(dump)
    (dump / step_file_name(1)).write_bytes(b"")
    with pytest.raises(ParityError, match="cannot read step file"):
        reader.read_step(1)
    with pytest.raises(ParityError, match="cannot read stage 'emb'"):
        reader.read_stage(1, "emb")


# ---------------------------------------------------------------------------------------------
# Reading without safe_open: each step file's header is parsed once (format._StepFile), each stage
# read with positioned reads into a fresh array.


def _step_file_parts(file: Path) -> tuple[dict, bytes]:
    """A step file's header (parsed here with plain json, not by the code under test) and its data."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_step_file(file: Path, header: dict | bytes, data: bytes, *, length: int | None = None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _edit_header(edit):
    def apply(file: Path) -> None:
        header, data = _step_file_parts(file)
        edit(header)
        _write_step_file(file, header, data)
    return apply


def _set(stage: str, field: str, value):
    return _edit_header(lambda h: h[stage].__setitem__(field, value))


def _overlap(header: dict) -> None:
    # emb is float16 (C*2 bytes for one row), L0.att.wkv float32: point emb at the first half of
    # wkv's bytes, so two stages claim the same bytes and emb's own go unclaimed.
    begin = header["L0.att.wkv"]["data_offsets"][0]
    header["emb"]["data_offsets"] = [begin, begin + C * 2]


# (damage to step 1's file, words the one line must hold, whether safetensors refuses it too)
MALFORMED = {
    "header length past the end": (
        lambda f: f.write_bytes(struct.pack("<Q", f.stat().st_size) + f.read_bytes()[8:]), "does not fit a file of", True),
    "header not JSON": (lambda f: _write_step_file(f, b"{not json}      ", b""), "the header is not JSON", True),
    "header not UTF-8": (lambda f: _write_step_file(f, b'{"\xff": 1}      ', b""), "the header is not JSON", True),
    "header a list": (lambda f: _write_step_file(f, b"[]      ", b""), "not a JSON object", True),
    "a bfloat16 stage": (_set("logits", "dtype", "BF16"), "has dtype 'BF16', not one a dump stores", False),
    "an unknown dtype": (_set("logits", "dtype", "F128"), "has dtype 'F128'", True),
    "shape not matching the bytes": (_set("logits", "shape", [1, V + 1]), "needs 68", True),
    "shape of strings": (_set("logits", "shape", ["1", V]), "is not a list of sizes", True),
    "negative offsets": (_set("logits", "data_offsets", [-4, 60]), "is not a [begin, end] pair", True),
    "two stages on the same bytes": (_edit_header(_overlap), "must be back to back", True),
    "bytes past the last stage": (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 8), "the file has", True),
    "metadata not strings": (_edit_header(lambda h: h["__metadata__"].__setitem__("step", 1)), "__metadata__ is not an object of strings", True),
    "metadata a list": (_edit_header(lambda h: h.__setitem__("__metadata__", [])), "__metadata__ is not an object of strings", True),
    "shorter than a header length": (lambda f: f.write_bytes(b"\x10\0\0"), "3 bytes, too short", True),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_step_file_is_refused_in_one_line(dump: Path, name: str) -> None:
    damage, words, safetensors_refuses = MALFORMED[name]
    file = dump / step_file_name(1)
    damage(file)
    with pytest.raises(ParityError) as info:
        DumpReader(dump)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{file}: corrupt step file (") and "re-run the dump" in message, message
    assert words in message, message
    # The checks are safetensors' own: the library refuses the same file (it knows bfloat16, which
    # a dump never stores, since numpy has none).
    from safetensors import safe_open

    if safetensors_refuses:
        with pytest.raises(Exception):
            with safe_open(file, "np") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_files_safetensors_wrote_are_read_bit_exact(dump: Path) -> None:
    # Its own save_file pads the header and orders the data by alignment, not by name: the reader
    # must follow the offsets, not assume the writer's layout. Every dtype the writer stores.
    rng = np.random.default_rng(3)
    arrays = {
        "emb": rng.standard_normal((1, C)).astype(np.float16),
        "L0.att.wkv": rng.integers(-9, 9, (1, C)).astype(np.int8),
        "logits": rng.standard_normal((1, V)),  # float64
        "state.L0.att_x": rng.integers(0, 2**40, (C,), dtype=np.uint64),
        "state.L0.att_kv": rng.standard_normal((H, N, N)) > 0,  # bool
    }
    save_file(arrays, dump / step_file_name(1), metadata={"format": "rwkv-parity-dump", "format_version": "1",
                                                          "step": "1", "kind": "decode"})
    reader = DumpReader(dump)
    step = reader.read_step(1)
    for name, want in arrays.items():
        for got in (step[name], reader.read_stage(1, name)):
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), name


def test_integer_and_empty_stages_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run"
    values = {"emb": np.zeros((0, C), np.float32), "logits": np.arange(V, dtype=np.int64).reshape(1, V)}
    with make_writer(path) as writer, writer.step(kind="prefill", ids=[1]) as step:
        for name, array in values.items():
            step.add(name, array)
    reader = DumpReader(path)
    for name, want in values.items():
        got = reader.read_stage(0, name)
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def test_reading_maps_nothing_and_leaves_no_file_open(dump: Path) -> None:
    # A held safe_open handle keeps the file mapped, its pages resident (issue 9); a read here is
    # open, read, close: afterwards the process neither maps a step file nor holds one open.
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc: cannot see this process's mappings")
    reader = DumpReader(dump)
    held = [reader.read_step(i) for i in range(3)]
    arrays = [step[name] for step in held for name in step] + [reader.read_stage(2, "logits")]
    assert len(arrays) == 16
    assert str(dump) not in Path("/proc/self/maps").read_text()
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in open_files if f.startswith(str(dump))], open_files


def test_a_file_rewritten_after_open_is_read_from_its_new_header(dump: Path, tmp_path: Path) -> None:
    # The new file's header is longer and its stages sit elsewhere: stale offsets would read other
    # stages' bytes. The reader sees the file changed and parses it again.
    reader = DumpReader(dump)
    step = reader.read_step(1)
    file = dump / step_file_name(1)
    header, _ = _step_file_parts(file)
    logits = np.linspace(-1, 1, V, dtype=np.float64).reshape(1, V)  # float64: twice the bytes it had
    arrays = {name: np.ones(header[name]["shape"], np.float32) for name in header if name != "__metadata__"}
    arrays["logits"] = logits
    save_file(arrays, file, metadata={**header["__metadata__"], "note": "rewritten" * 20})
    assert step["logits"].tobytes() == logits.tobytes()
    assert reader.read_stage(1, "logits").tobytes() == logits.tobytes()
    np.testing.assert_array_equal(reader.read_stage(1, "emb"), np.ones((1, C), np.float32))


def test_a_file_replaced_after_open_by_another_steps_is_refused_on_read(dump: Path) -> None:
    reader = DumpReader(dump)
    (dump / step_file_name(1)).write_bytes((dump / step_file_name(2)).read_bytes())
    with pytest.raises(ParityError, match=r"step-0001\.safetensors: cannot read stage 'logits' \(the file holds step 2 "
                                          r"\(decode\), the manifest lists it as step 1 \(decode\); a step file was replaced\)"):
        reader.read_stage(1, "logits")
    with pytest.raises(ParityError, match=r"cannot read step file \(the file holds step 2"):
        reader.read_step(1)


def test_a_file_truncated_after_open_is_refused_on_read(dump: Path) -> None:
    reader = DumpReader(dump)
    step = reader.read_step(0)
    file = dump / step_file_name(0)
    file.write_bytes(file.read_bytes()[:-10])  # the last stage's bytes cut short, as by a full disk
    for read in (lambda: step["state.L0.att_x"], lambda: reader.read_stage(0, "emb"), lambda: reader.read_step(0)):
        with pytest.raises(ParityError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{file}: cannot read ") and "the file has" in message, message


def test_a_file_cut_short_between_the_check_and_the_read_is_refused(dump: Path, monkeypatch) -> None:
    # The race the size check cannot see: the file shrinks after the reader looked at it. Made
    # here by letting the reader's fstat report the file as it was before the cut.
    reader = DumpReader(dump)
    file = dump / step_file_name(0)
    header, _ = _step_file_parts(file)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    before = os.stat(file)
    file.write_bytes(file.read_bytes()[:-10])  # the last stage's bytes are the ones cut
    monkeypatch.setattr(os, "fstat", lambda fd: before)
    with pytest.raises(ParityError) as info:
        reader.read_stage(0, last)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{file}: cannot read stage {last!r} (the file ends at byte"), message
    assert "cut short after the dump was opened" in message, message


def test_decode_steps_share_one_parsed_layout(tmp_path: Path) -> None:
    # What a reader keeps per step file must not grow with the stages times the steps: decode
    # steps, which differ only in the step number in their header, share one parsed layout.
    from parity.dumpers import format as fmt

    path = tmp_path / "run"
    write_run(path, ids=[5, 6, 7], n_decode=4)
    reader = DumpReader(path)
    layouts = {id(reader._step_file(entry)._parsed[2]) for entry in reader.manifest["steps"]}
    assert len(layouts) == 2  # the prefill's, and the decode steps' one
    assert isinstance(reader._step_file(reader.manifest["steps"][3]), fmt._StepFile)
