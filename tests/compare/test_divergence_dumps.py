"""compare_runs over two real dumps (DumpReader) holds one stage per side, not whole steps (issue 9:
a 512-token prefill of a 0.1B model is ~0.6 GB of records per side)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from parity.compare import TolerancePolicy, compare_runs, metrics
from parity.dumpers.format import DumpReader, DumpWriter
from parity.errors import ParityError
from parity.stages import stage_order

ORDER = stage_order(n_layer=2)
STAGES = ["emb", "L0.att.wkv", "L0.x_out", "L1.att.wkv", "L1.x_out"]
ROWS, C = 64, 4096  # 1 MiB per fp32 record, 5 MiB per step


def _dump(path: Path, *, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    writer = DumpWriter(path=path, backend="test", mode="eager", dtype="float32",
                        model={"n_layer": 2}, stage_order=ORDER)
    with writer:
        with writer.step(kind="prefill", ids=list(range(ROWS))) as step:
            for name in STAGES:
                step.add(name, rng.standard_normal((ROWS, C)).astype(np.float32))
    return path


def test_a_step_reads_each_stage_when_looked_up(tmp_path):
    reader = DumpReader(_dump(tmp_path / "a", seed=0))
    arrays = reader.read_step(0)
    assert list(arrays) == STAGES and len(arrays) == len(STAGES)
    assert "emb" in arrays and "logits" not in arrays
    assert np.array_equal(arrays["L1.x_out"], reader.read_stage(0, "L1.x_out"))
    with pytest.raises(KeyError):
        arrays["logits"]
    (tmp_path / "a" / reader.manifest["steps"][0]["file"]).write_bytes(b"")
    with pytest.raises(ParityError, match="cannot read stage 'emb'"):
        arrays["emb"]  # damaged after read_step: reported on the look-up, as read_stage does


def test_comparison_holds_one_stage_per_side(tmp_path, monkeypatch):
    a, e = DumpReader(_dump(tmp_path / "a", seed=0)), DumpReader(_dump(tmp_path / "e", seed=1))
    # Small float64 blocks (128 KiB), so what the comparison holds is the records themselves.
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1 << 14)
    tracemalloc.start()
    try:
        result = compare_runs(actual=a, expected=e, policy=TolerancePolicy.for_dtype("float32"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.stage for r in result.records] == STAGES and not any(r.metrics.passed for r in result.records)
    # One record per side (2 MiB), a transient copy while one is read, and the float64 blocks
    # (about 1.3 MiB): measured 4.2 MB. Both whole steps, as read_step once held them, are 10.5 MB.
    one_record = ROWS * C * 4
    assert peak < 6 * one_record, f"peak {peak / 1e6:.1f} MB; both steps are {2 * len(STAGES) * one_record / 1e6:.1f} MB"


def test_a_step_is_written_without_holding_it(tmp_path):
    # The other half of a comparison's memory: each writer (the reference's dump, every replay)
    # used to hold a whole step before writing it. 20 stages of 10 MB: the writer streams them.
    stages = [f"s{i}" for i in range(20)]
    one_record = 512 * 5000 * 4
    tracemalloc.start()
    try:
        with DumpWriter(path=tmp_path / "big", backend="test", mode="eager", dtype="float32",
                        model={"n_layer": 1}, stage_order=stages) as writer:
            with writer.step(kind="prefill", ids=[1]) as step:
                for i, name in enumerate(stages):
                    step.add(name, np.full((512, 5000), i, np.float32))  # the caller drops each one after adding it
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One record being added and the 16 MiB copy buffer: measured 33.6 MB; the step is 205 MB.
    assert peak < 5 * one_record, f"peak {peak / 1e6:.1f} MB"
    arrays = DumpReader(tmp_path / "big").read_step(0)
    assert all(float(arrays[name][-1, -1]) == i for i, name in enumerate(stages))
