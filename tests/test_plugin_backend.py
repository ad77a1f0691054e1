"""Backends from outside the package, named as ``path/to/file.py:attribute`` or ``module:attribute``.

The numpy port in examples/ must agree with the reference on both 5.2 fixtures; a port with a
planted bug must be caught at the stage and step where it is planted; a bad plug-in must be
refused with one line and exit 2. The passing runs and one broken run go through the real
command in subprocesses, started before the first test (each costs ~1.5 s of torch start-up);
everything else calls ``parity.cli.main`` in-process meanwhile, where torch is already imported.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint
from parity.cli import main
from parity.dumpers.plugin import load_plugin_backend
from parity.errors import ParityError
from parity.stages import stage_order
from parity_cli import REPO, Pending, cli_env

EXAMPLE = "examples/numpy_rwkv5.py"  # relative, as docs/backends.md writes it; runs use cwd=REPO
FIXTURE_L4 = "fixtures/rwkv5_2-L4-C128-H2.pth"  # the demo model
FIXTURE_HN = "fixtures/rwkv5_2-L2-C144-H12.pth"  # H = N = 12: (H, N) / (N, H) mix-ups keep every shape

# A port of someone else's, outside the package: it wraps the numpy example and plants one bug
# per factory, or breaks the plug-in contract in one way per factory.
PORT_SOURCE = '''
import importlib.util

import numpy as np

_spec = importlib.util.spec_from_file_location("numpy_rwkv5_under_test", {example!r})
numpy_rwkv5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(numpy_rwkv5)

good = numpy_rwkv5.make_backend


class _Wrapped:
    def __init__(self, checkpoint, change):
        self.inner, self.change, self.index = numpy_rwkv5.make_backend(checkpoint), change, 0

    def reset(self):
        self.inner.reset()
        self.index = 0

    def step(self, ids):
        out = self.change(self.inner.step(ids), self.index)
        self.index += 1
        return out


def _nudge_decode_logits(stages, index):
    # Decode steps only: the prefill must stay exact, so the verdict has to name step 1.
    if index > 0:
        logits = stages["logits"]
        logits[:, 7] += 0.01 * np.abs(logits).max() + 1e-3
    return stages


def _state_as_h_v_k(stages, index):
    # The classic port bug: the kernel's [head, v, k] state recorded without its transpose.
    for name in [n for n in stages if n.endswith(".att_kv")]:
        stages[name] = np.ascontiguousarray(stages[name].swapaxes(-1, -2))
    return stages


def nudged_logits(checkpoint):
    return _Wrapped(checkpoint, _nudge_decode_logits)


def transposed_state(checkpoint):
    return _Wrapped(checkpoint, _state_as_h_v_k)


class _NoStep:
    def reset(self):
        pass


def no_step(checkpoint):
    return _NoStep()


def no_logits(checkpoint):
    return _Wrapped(checkpoint, lambda stages, index: {{"emb": stages["emb"]}})


def odd_stage_name(checkpoint):
    return _Wrapped(checkpoint, lambda stages, index: {{**stages, "L0.att.wkv_out": stages["L0.att.wkv"]}})


not_callable = 42


def _last_row(stages, index):
    # What a real port's prefill returns: the last token's logits only, (1, V).
    stages["logits"] = stages["logits"][-1:].copy()
    return stages


def last_row_logits(checkpoint):
    return _Wrapped(checkpoint, _last_row)


def _last_row_nudged(stages, index):
    stages = _last_row(stages, index)
    if index == 0:
        stages["logits"][0, 5] += 0.01 * np.abs(stages["logits"]).max() + 1e-3
    return stages


def last_row_nudged(checkpoint):
    return _Wrapped(checkpoint, _last_row_nudged)


def _early_rows(stages, index):
    # Rows 0..T-2 of the prefill logits only, declared (an extra entry point of the port, say).
    if index == 0:
        stages["logits"] = stages["logits"][:-1].copy()
        stages["rows"] = {{"logits": list(range(len(stages["logits"])))}}
    return stages


def early_rows(checkpoint):
    return _Wrapped(checkpoint, _early_rows)


class _Named(_Wrapped):
    name = "their-port"
    notes = ["rows 0..T-2 of the prefill come from an extra entry point"]


def named_with_notes(checkpoint):
    return _Named(checkpoint, lambda stages, index: {{**stages, "kernel.000.their_fused_kernel": stages["emb"] * 2}})


def bad_rows_order(checkpoint):
    return _Wrapped(checkpoint, lambda stages, index: {{**stages, "rows": {{"emb": [1, 0]}}}})


def rows_for_a_state(checkpoint):
    return _Wrapped(checkpoint, lambda stages, index: {{**stages, "rows": {{"state.L0.att_x": [0]}}}})


def rows_wrong_count(checkpoint):
    return _Wrapped(checkpoint, lambda stages, index: {{**stages, "rows": {{"emb": [0]}}}})


def notes_not_a_list(checkpoint):
    port = _Wrapped(checkpoint, lambda stages, index: stages)
    port.notes = "one string"
    return port
'''


def write_port(directory: Path, *, module: str) -> None:
    (directory / f"{module}.py").write_text(PORT_SOURCE.format(example=str(REPO / EXAMPLE)))


# -- refusals, in-process -----------------------------------------------------------------------


@pytest.fixture
def port(tmp_path, monkeypatch):
    """``outside_port_inproc`` importable as a module (sys.path), and forgotten afterwards."""
    module = "outside_port_inproc"
    write_port(tmp_path, module=module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(REPO)
    yield module
    sys.modules.pop(module, None)


def run_inproc(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["run", "-q", "--ids", "ones:3", "--decode-steps", "1", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_module_attribute_form_runs_in_process(port, capsys) -> None:
    rc, out, err = run_inproc(capsys, "--checkpoint", FIXTURE_L4, "--backends", f"reference,{port}:good")
    assert rc == 0 and out.startswith("no divergence"), out + err


def test_a_transposed_state_is_caught_at_the_state_slot(port, capsys, tmp_path) -> None:
    # H = N: the transpose keeps the shape, so only the values can give it away.
    rc, out, _ = run_inproc(capsys, "--checkpoint", FIXTURE_HN, "--backends", f"reference,{port}:transposed_state",
                            "--json", str(tmp_path / "r.json"))
    fd = json.loads((tmp_path / "r.json").read_text())["first_divergence"]
    assert rc == 1 and (fd["step"], fd["stage"]) == (0, "state.L0.att_kv"), out
    assert out.startswith("DIVERGENCE: first divergence: prefill, layer 0, stage state.L0.att_kv"), out


def _records(path: Path, stage: str) -> dict[int, dict]:
    return {r["step"]: r for r in json.loads(path.read_text())["records"] if r["stage"] == stage}


def test_last_row_logits_are_compared_on_that_row(port, capsys, tmp_path) -> None:
    # ones:3 is a 3-token prefill: the port's (1, V) logits are token row 2's.
    rc, out, err = run_inproc(capsys, "--checkpoint", FIXTURE_L4, "--backends", f"reference,{port}:last_row_logits",
                              "--mode", "propagated", "--json", str(tmp_path / "r.json"))
    assert rc == 0 and out.startswith("no divergence"), out + err
    logits = _records(tmp_path / "r.json", "logits")
    assert logits[0]["rows"] == [2] and logits[0]["shape"] == [1, 1024] and logits[0]["passed"], logits[0]
    assert logits[1]["rows"] is None  # a decode step's one row is every row
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["end_to_end"]["per_step"][0]["rows"] == 1


def test_a_wrong_last_row_is_found_at_its_token_row(port, capsys, tmp_path) -> None:
    rc, out, err = run_inproc(capsys, "--checkpoint", FIXTURE_L4, "--backends", f"reference,{port}:last_row_nudged",
                              "--json", str(tmp_path / "r.json"))
    fd = json.loads((tmp_path / "r.json").read_text())["first_divergence"]
    assert rc == 1 and (fd["step"], fd["stage"], fd["row"]) == (0, "logits", 2), out + err
    assert fd["worst_index"] == [2, 5], fd


def test_declared_rows_are_compared_and_stored_beside_the_stage(port, capsys, tmp_path) -> None:
    from parity.dumpers.format import DumpReader

    rc, out, err = run_inproc(capsys, "--checkpoint", FIXTURE_L4, "--backends", f"reference,{port}:early_rows",
                              "--mode", "propagated", "--json", str(tmp_path / "r.json"), "--dump-dir", str(tmp_path / "d"))
    assert rc == 0, out + err
    assert _records(tmp_path / "r.json", "logits")[0]["rows"] == [0, 1]
    dump = DumpReader(tmp_path / "d" / f"{port}-early_rows")
    np.testing.assert_array_equal(dump.read_stage(0, "rows.logits"), [0, 1])
    assert "rows.logits" not in dump.step_stages(1)  # the decode step holds its one row


def test_no_common_rows_is_not_comparable_not_a_divergence(port, capsys, tmp_path) -> None:
    # The yardstick holds prefill logits rows 0..1, the other port row 2 only: nothing to judge.
    rc, out, err = run_inproc(capsys, "--checkpoint", FIXTURE_L4, "--backends", f"{port}:early_rows,{port}:last_row_logits",
                              "--mode", "propagated", "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and result["verdict"] == "no divergence", out + err
    assert result["not_comparable"] == [{"step": 0, "stage": "logits", "actual_rows": [2], "expected_rows": [0, 1]}]
    assert 0 not in _records(tmp_path / "r.json", "logits")  # no record: neither passed nor failed
    assert [s["step"] for s in result["end_to_end"]["per_step"]] == [1]  # the decode step's one row


def test_name_notes_and_kernel_records_reach_the_dump(port, capsys, tmp_path) -> None:
    from parity.dumpers.format import DumpReader

    rc, out, err = run_inproc(capsys, "--checkpoint", FIXTURE_L4, "--backends", f"reference,{port}:named_with_notes",
                              "--mode", "propagated", "--json", str(tmp_path / "r.json"), "--dump-dir", str(tmp_path / "d"))
    assert rc == 0, out + err
    dumps = [DumpReader(p) for p in (tmp_path / "d").iterdir() if p.name != "reference"]
    assert [d.backend for d in dumps] == ["their-port"]
    assert dumps[0].extra["notes"] == ["rows 0..T-2 of the prefill come from an extra entry point"]
    # A kernel record is kept, and listed as one-sided (the reference has none), never dropped.
    assert "kernel.000.their_fused_kernel" in dumps[0].step_stages(0)
    missing = json.loads((tmp_path / "r.json").read_text())["missing"]
    assert {"step": 0, "stage": "kernel.000.their_fused_kernel", "missing_in": "expected"} in missing


@pytest.mark.parametrize(
    "factory, message",
    [
        ("{module}_missing:make_backend", "cannot import backend module '{module}_missing'"),
        ("examples/no_such_port.py:make_backend", "backend module file not found: examples/no_such_port.py"),
        (EXAMPLE + ":no_such_factory", "has no callable 'no_such_factory'"),
        ("{module}:not_callable", "has no callable 'not_callable'"),
        ("{module}:no_step", "has no step() method"),
        ("{module}:no_logits", "at least 'logits'"),
        ("{module}:odd_stage_name", "non-canonical stage 'L0.att.wkv_out'"),
        ("{module}:bad_rows_order", "rows of 'emb' must be distinct ascending indices in [0, 3), got [1, 0]"),
        ("{module}:rows_for_a_state", "a state slot, which has no token rows"),
        ("{module}:rows_wrong_count", "'emb' has shape [3, 128] but its rows name 1 rows"),
        ("{module}:notes_not_a_list", "notes must be a list of strings"),
    ],
)
def test_a_bad_plugin_is_one_line_and_exit_2(port, capsys, factory: str, message: str) -> None:
    spec = factory.format(module=port)
    # The plug-in first: it is refused before the reference spends any time.
    rc, out, err = run_inproc(capsys, "--checkpoint", FIXTURE_L4, "--backends", f"{spec},reference")
    assert rc == 2, (out, err)
    assert err.strip().splitlines() == [err.strip()], err  # exactly one line, no traceback
    assert err.startswith("parity: error:") and message.format(module=port) in err, err


@pytest.mark.parametrize("fixture", ["fixtures/rwkv4-L2-C64.pth", "fixtures/rwkv5_1-L2-C64-H8.pth"])
def test_the_numpy_port_refuses_other_versions(port, capsys, fixture: str) -> None:
    rc, _, err = run_inproc(capsys, "--checkpoint", fixture, "--backends", f"{EXAMPLE}:make_backend,reference")
    assert rc == 2 and err.count("\n") == 1 and "runs RWKV-5.2 only" in err, err


# -- the example's own contract -----------------------------------------------------------------


@pytest.fixture(scope="module")
def numpy_port():
    ck = load_checkpoint(REPO / FIXTURE_HN)
    return ck, load_plugin_backend(f"{REPO / EXAMPLE}:make_backend", ck).impl


def test_numpy_port_shapes_follow_the_dump_format(numpy_port) -> None:
    ck, impl = numpy_port
    cfg = ck.config
    impl.reset()
    prefill = impl.step([3, 1, 4, 1, 5])
    decode = impl.step([9])
    assert prefill["logits"].shape == (5, cfg.vocab_size) and decode["logits"].shape == (1, cfg.vocab_size)
    assert prefill["L1.att.wkv"].shape == (5, cfg.dim_att)
    assert prefill["state.L1.att_kv"].shape == (cfg.n_head, cfg.head_size, cfg.head_size)
    assert prefill["state.L0.att_x"].shape == (cfg.n_embd,)
    assert {v.dtype for v in prefill.values()} == {np.dtype(np.float32)}
    # State slots hold the state after the step: the last ln1 row; and the state moves on per step.
    np.testing.assert_array_equal(prefill["state.L0.att_x"], prefill["L0.att.ln1"][-1])
    assert not np.array_equal(prefill["state.L0.att_kv"], decode["state.L0.att_kv"])


def test_numpy_port_reset_starts_from_the_zero_state(numpy_port) -> None:
    _, impl = numpy_port
    impl.reset()
    first = impl.step([7, 8])["logits"]
    impl.step([2])
    impl.reset()
    np.testing.assert_array_equal(impl.step([7, 8])["logits"], first)


def test_numpy_port_refusal_is_a_parity_error() -> None:
    ck = load_checkpoint(REPO / "fixtures" / "rwkv5_0-L2-C64-H2.pth")
    with pytest.raises(ParityError, match="RWKV-5.2 only; this checkpoint is RWKV-5.0"):
        load_plugin_backend(f"{REPO / EXAMPLE}:make_backend", ck)


# -- the real command, in subprocesses ----------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory):
    """Started before the first test of the file, so the in-process tests run while they do."""
    tmp = tmp_path_factory.mktemp("plugin-runs")
    write_port(tmp, module="outside_port")
    env = cli_env(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")])))
    commands = {
        "demo model": ["--checkpoint", FIXTURE_L4, "--backends", f"reference,{EXAMPLE}:make_backend"],
        # T = H = N = 12 in the prefill: a (T, C) -> (H, T, N) mix-up would keep every shape too.
        "H = N model": ["--checkpoint", FIXTURE_HN, "--backends", f"reference,{EXAMPLE}:make_backend",
                        "--ids", "random:12:3"],
        "nudged logits": ["--checkpoint", FIXTURE_L4, "--backends", "reference,outside_port:nudged_logits"],
    }
    pending = {name: Pending(["run", *args, "--json", tmp / f"{i}.json"], env=env)
               for i, (name, args) in enumerate(commands.items())}
    yield pending
    for p in pending.values():
        p.stop()


@pytest.mark.parametrize("name", ["demo model", "H = N model"])
def test_numpy_port_agrees_with_the_reference(runs, name: str) -> None:
    cli = runs[name].get()
    assert cli.rc == 0, cli
    assert "no divergence" in cli.stdout, cli
    # Every canonical stage was compared, not just the logits: the port records all of them.
    model = cli.result["run"]["model"]
    n_stages = len(stage_order(n_layer=model["n_layer"], version=model["version"]))
    assert cli.result["summary"]["records"] == n_stages * len(cli.result["steps"]), cli
    assert not cli.result.get("missing"), cli


def test_a_broken_port_is_caught_where_the_bug_is(runs) -> None:
    cli = runs["nudged logits"].get()
    assert cli.rc == 1, cli
    fd = cli.result["first_divergence"]
    assert (fd["step"], fd["stage"]) == (1, "logits"), cli  # the prefill was left exact
    verdict = cli.stdout.strip().splitlines()[-1]
    assert verdict.startswith("DIVERGENCE: first divergence: decode step 1, stage logits"), cli


def test_the_console_says_which_rows_were_compared_and_which_were_not(port, capsys, tmp_path) -> None:
    rc = main(["run", "--ids", "ones:3", "--decode-steps", "1", "--checkpoint", FIXTURE_L4, "--mode", "propagated",
               "--backends", f"{port}:early_rows,{port}:last_row_logits"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "not comparable: logits at step 0: the sides hold rows [0, 1] and [2], none in common" in out, out
    rc = main(["run", "--ids", "ones:3", "--decode-steps", "1", "--checkpoint", FIXTURE_L4, "--mode", "propagated",
               "--backends", f"reference,{port}:last_row_logits"])
    out = capsys.readouterr().out
    assert rc == 0 and "compared on the token rows both sides hold, e.g. logits at step 0 on row(s) 2" in out, out
