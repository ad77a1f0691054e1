"""Backends in worker processes (parity/dumpers/worker.py) and every pair, always (issues 12, 15).

The crash verdicts themselves are tests/test_crash.py; here: a healthy backend in a worker gives
the same dump as in-process, a partial dump reads back its finished steps only, every pair is in
the result also with two backends, plug-ins are named by their ``name``, and a backend's notes
reach every report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import ReferenceBackend, RunPlan
from parity.dumpers.format import DumpReader, DumpWriter
from parity.dumpers.worker import PartialDumpReader, open_dump, run_in_worker
from parity.errors import ParityError
from parity.session import backend_labels, run_parity
from parity_cli import REPO

FIXTURE = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"
PLAN = RunPlan(prefill_ids=(1, 2, 3), decode_ids=(4, 5))
PORT = str(REPO / "examples" / "numpy_rwkv5.py") + ":make_backend"


@pytest.fixture(scope="module")
def ck():
    return load_checkpoint(FIXTURE)


def test_a_worker_dump_is_the_in_process_dump(ck, tmp_path):
    # The same plug-in (our reference, wrapped) in a worker and here: bit-identical stages.
    # The numpy port of examples/, as a user names it: its name, not its path, labels it.
    steps = []
    out = run_in_worker(PORT, ck, plan=PLAN, path=tmp_path / "w", cache_dir=None, target="llvm", timeout=60,
                        on_step=lambda name, i, n: steps.append((name, i, n)))
    assert out.failure is None and out.path == tmp_path / "w" and out.name == "numpy-rwkv5"
    assert steps == [("numpy-rwkv5", 0, 3), ("numpy-rwkv5", 1, 3), ("numpy-rwkv5", 2, 3)]  # progress, step by step
    from parity.dumpers.plugin import load_plugin_backend

    here = load_plugin_backend(PORT, ck).dump(PLAN, path=tmp_path / "h")
    a, b = DumpReader(out.path), DumpReader(here)
    assert [s.index for s in a.steps] == [0, 1, 2] and a.backend == b.backend
    for index in range(3):
        sa, sb = a.read_step(index), b.read_step(index)
        assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_a_partial_dump_reads_its_finished_steps_only(ck, tmp_path):
    # A writer killed in its third step: what the manifest lists is readable, and never as complete.
    writer = DumpWriter(path=tmp_path / "d", backend="b", mode="eager", dtype="float32", model=ck.config.to_dict(),
                        stage_order=["logits"])
    writer.open()
    for ids in ([1, 2], [3]):
        with writer.step(kind="prefill" if len(ids) > 1 else "decode", ids=ids) as step:
            step.add("logits", np.full((len(ids), 4), float(ids[0]), "float32"))
    partial = writer.partial_path
    with pytest.raises(ParityError, match="incomplete dump"):
        DumpReader(partial)
    reader = open_dump(partial)
    assert isinstance(reader, PartialDumpReader) and [s.index for s in reader.steps] == [0, 1]
    assert reader.read_stage(1, "logits").tolist() == [[3.0] * 4]
    assert reader.describe()["complete"] is False
    assert json.loads((partial / "manifest.json").read_text())["complete"] is False  # untouched on disk


def test_a_bad_timeout_is_a_usage_error(ck):
    with pytest.raises(ParityError, match="--timeout"):
        run_parity(ck, backends=["reference", "reference"], plan=PLAN, timeout=-1)


def test_labels_are_backend_names_unless_two_share_one():
    names = {"reference": "reference", "my_port.py:make": "my-port", "tvm": "tvm", "tvm-instrumented": "tvm"}
    assert backend_labels(list(names), names) == {
        "reference": "reference", "my_port.py:make": "my-port", "tvm": "tvm", "tvm-instrumented": "tvm-instrumented"}


class _NotedReference(ReferenceBackend):
    """Our reference under another name, carrying notes in its manifest's extra (a plug-in's notes
    land there: docs/backends.md)."""

    def __init__(self, checkpoint):
        super().__init__(checkpoint, name="noted-port")
        self.extra = {"notes": ["rows 0..T-2 come from an extra entry point"]}


def test_every_pair_is_in_the_result_with_two_backends_and_notes_are_shown(ck, tmp_path, monkeypatch):
    import parity.session as session

    real = session.make_backend
    monkeypatch.setattr(session, "make_backend",
                        lambda spec, *a, **k: _NotedReference(ck) if spec == "noted:port" else real(spec, *a, **k))
    outcome = run_parity(ck, backends=["reference", "noted:port"], plan=PLAN, in_process=True, mode="propagated",
                         command="test")
    result = outcome.result
    (pair,) = result["comparisons"]
    assert (pair["expected"], pair["actual"], pair["verdict"]) == ("reference", "noted:port", "no divergence")
    assert pair["records"] == result["records"] and pair["summary"]["worst_logits_max_abs"] == 0.0
    assert result["run"]["backend_labels"] == {"reference": "reference", "noted:port": "noted-port"}
    assert result["notes"] == [{"backend": "noted:port", "note": "rows 0..T-2 come from an extra entry point"}]
    assert result["run"]["isolation"] == "in process"

    from parity.report.html import render_html
    from parity.report.markdown import render_markdown

    html = render_html(result)
    assert 'id="pairs"' in html and "<code>noted-port</code>" in html and "rows 0..T-2 come from an extra entry point" in html
    assert "- `noted-port`: rows 0..T-2 come from an extra entry point" in render_markdown(result)


def test_three_backends_all_agreeing_list_every_pair_by_name(tmp_path, capsys):
    from parity.cli import main

    port = PORT
    rc = main(["run", "--checkpoint", str(FIXTURE), "--backends", f"reference,{port},chatrwkv", "--ids", "ones:3",
               "--decode-steps", "1", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [(c["expected"], c["actual"]) for c in result["comparisons"]] == [
        ("reference", port), ("reference", "chatrwkv"), (port, "chatrwkv")]
    assert all(c["verdict"] == "no divergence" and c["records"] for c in result["comparisons"])
    label = result["run"]["backend_labels"][port]
    assert label != port and label in out and port not in out.split("every pair")[1], out


def test_in_process_is_the_opt_out(ck, monkeypatch):
    monkeypatch.setenv("PARITY_IN_PROCESS", "1")
    outcome = run_parity(ck, backends=["reference", "chatrwkv"], plan=PLAN, mode="propagated", command="test")
    assert outcome.result["run"]["isolation"] == "in process" and not outcome.crashed
    monkeypatch.delenv("PARITY_IN_PROCESS")
    outcome = run_parity(ck, backends=["reference", "chatrwkv"], plan=PLAN, mode="propagated", command="test")
    assert outcome.result["run"]["isolation"] == "worker processes" and outcome.result["verdict"] == "no divergence"
    assert outcome.result["run"]["timeout_s"] == 1800.0


NOTED_PORT = '''
import importlib.util

_spec = importlib.util.spec_from_file_location("numpy_rwkv5_noted", {example!r})
numpy_rwkv5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(numpy_rwkv5)


def make_backend(checkpoint):
    port = numpy_rwkv5.make_backend(checkpoint)
    port.notes = ["rows 0..T-2 come from an extra entry point"]
    return port
'''


def test_a_plugins_notes_reach_the_result_and_the_console(tmp_path, capsys):
    # Through a worker: the notes travel in the dump manifest (extra.notes), not in this process.
    from parity.cli import main

    (tmp_path / "noted.py").write_text(NOTED_PORT.format(example=str(REPO / "examples" / "numpy_rwkv5.py")))
    spec = f"{tmp_path / 'noted.py'}:make_backend"
    rc = main(["run", "--checkpoint", str(FIXTURE), "--backends", f"reference,{spec}", "--ids", "ones:3",
               "--decode-steps", "1", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["notes"] == [{"backend": spec, "note": "rows 0..T-2 come from an extra entry point"}]
    assert "note from numpy-rwkv5: rows 0..T-2 come from an extra entry point" in out


def test_which_backends_run_in_a_worker_without_torch():
    # Our compiled model in fp32/fp16 on the CPU reads numpy arrays only -- so do its mutants and its
    # isolated entry points (parity/dumpers/isolated.py, numpy); anything that makes its parameters or
    # runs its model with torch keeps it (parity/dumpers/worker.py, _torch_free).
    from parity.dumpers.worker import _torch_free

    for spec in ("tvm", "tvm-instrumented", "tvm@fp32", "tvm@fp16", "mutant/state-transposed", "mutant/decay-in-bf16",
                 "mutant/crash-oob-gather"):
        assert _torch_free(spec, target="llvm"), spec
    for spec in ("tvm@bf16", "tvm@fp16i8", "tvm@q4f16_1", "reference", "chatrwkv", "hf", "mutant/reference-sigmoid-r",
                 "mutant/int8-scales-swapped", "mutant/q4-group-off-by-one", "mutant/no-such-bug", PORT):
        assert not _torch_free(spec, target="llvm"), spec
    assert not _torch_free("tvm", target="cuda") and not _torch_free("mutant/state-transposed", target="cuda")


def test_a_tvm_worker_maps_the_weights_without_torch_and_dumps_what_torch_weights_give(ck, tmp_path, compile_cache):
    # issue 9: torch in the TVM worker (tvm_ffi imports it whenever it can) costs ~200 MB and buys
    # nothing; the worker maps the file with numpy instead. Its dump must be the one the same
    # build on the torch-loaded checkpoint (fp32_weights, in this process) writes, bit for bit.
    # It loads TVM's runtime-only library too, once this machine's CPU name is in the cache (asking
    # LLVM here puts it there): the compiler library is ~160 MB it would never use (parity/compiled/host.py).
    from parity.compiled.build import llvm_cpu
    from parity.dumpers.registry import make_backend

    llvm_cpu()
    free = run_in_worker("tvm", ck, plan=PLAN, path=tmp_path / "free", cache_dir=compile_cache, target="llvm",
                         timeout=120)
    assert free.failure is None and free.torch_loaded is False and free.tvm_compiler_loaded is False
    here = make_backend("tvm", ck, cache_dir=compile_cache).dump(PLAN, path=tmp_path / "here")
    a, b = DumpReader(free.path), DumpReader(here)
    assert [s.index for s in a.steps] == [0, 1, 2]
    for index in range(3):
        sa, sb = a.read_step(index), b.read_step(index)
        assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa), index


def test_a_worker_that_reads_the_file_with_torch_says_so(ck, tmp_path):
    # The flag the test above relies on is the child's own word, not a constant: a plug-in worker imports torch.
    out = run_in_worker(PORT, ck, plan=PLAN, path=tmp_path / "w", cache_dir=None, target="llvm", timeout=60)
    assert out.failure is None and out.torch_loaded is True
    assert out.tvm_compiler_loaded is False  # nor is it told to load TVM: a plug-in takes what it imports
