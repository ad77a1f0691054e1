"""Choosing a backend's dtype (``NAME@DTYPE``) and what each low-precision backend records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_checkpoint
from parity.dumpers.backends import RunPlan
from parity.dumpers.format import DumpReader
from parity.dumpers.registry import check_backend_spec, dump_dir_name, make_backend, split_dtype
from parity.errors import ParityError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PLAN = RunPlan(prefill_ids=(3, 1, 4, 1, 5, 9), decode_ids=(2, 6))


@pytest.mark.parametrize(("spec", "want"), [
    ("tvm@fp16", ("tvm", "float16")), ("reference@bf16", ("reference", "bfloat16")),
    ("chatrwkv@float16", ("chatrwkv", "float16")), ("reference@fp64", ("reference", "float64")),
    ("tvm", ("tvm", None)), ("mutant/sigmoid-r", ("mutant/sigmoid-r", None)),
])
def test_split_dtype(spec: str, want) -> None:
    check_backend_spec(spec)
    assert split_dtype(spec) == want


@pytest.mark.parametrize(("spec", "message"), [
    ("tvm@fp64", "tvm runs fp32, fp16, bf16"),
    ("hf@fp16", "'hf' runs in one dtype only"),
    ("mutant/sigmoid-r@fp16", "a mutant computes in its own dtype"),
    ("pkg.mod:attr@fp16", "runs in one dtype only"),
    ("tvm@fp8", "unknown dtype 'fp8'"),
    ("@fp16", "write NAME@DTYPE"),
    ("tvm@", "write NAME@DTYPE"),
    ("tmv@fp16", "unknown backend 'tmv'; did you mean 'tvm'?"),
])
def test_bad_dtype_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(ParityError, match=message.replace("(", r"\(").replace("?", r"\?")) as e:
        check_backend_spec(spec)
    assert "\n" not in str(e.value)


def test_dump_dir_names_stay_apart_from_the_arbiter() -> None:
    # The fp64 arbiter's dump is "reference-fp64"; an fp64 reference asked for by name is not it.
    assert dump_dir_name("reference@fp64") != "reference-fp64"
    assert dump_dir_name("tvm@fp16") != dump_dir_name("tvm@bf16") != dump_dir_name("tvm")


@pytest.mark.parametrize("short,dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
@pytest.mark.parametrize("base", ["reference", "tvm", "chatrwkv"])
def test_dump_records_the_dtype(base: str, short: str, dtype: str, tmp_path: Path) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv4-L2-C64.pth")
    path = make_backend(f"{base}@{short}", ck).dump(PLAN, path=tmp_path / "dump")
    reader = DumpReader(path)
    assert reader.dtype == dtype
    assert reader.backend == f"{base}@{short}"
    logits = reader.read_stage(0, "logits")
    assert logits.dtype == np.float32 and np.isfinite(logits).all() and np.abs(logits).max() > 0
