"""The quantisation bugs of the zoo (parity/mutants/quant.py): each found at its first matmul.

Until parity/mutants/compiled.py's ``model_class`` looks in quant_models.py and the catalogue
includes QUANT_CATALOGUE (the integration asked for in the commit that added them), the fixture
below puts them there for the test, in process (worker processes would not see the patch).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import parity.mutants as mutants
from parity.checkpoint import load_checkpoint
from parity.compiled.dtypes import QUANT_SCHEMES
from parity.dumpers.backends import RunPlan
from parity.mutants.quant import QUANT_CATALOGUE
from parity.selftest import run_mutant
from parity.session import default_decode_ids, parse_ids, run_parity

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture
def registered(monkeypatch):
    from parity.mutants import compiled, quant_models

    for name, m in QUANT_CATALOGUE.items():
        monkeypatch.setitem(mutants.CATALOGUE, name, m)
        monkeypatch.setitem(compiled.MODELS, name, quant_models.MODELS[name])
    monkeypatch.setenv("PARITY_IN_PROCESS", "1")


def test_entries_are_quantised_builds_with_their_own_names() -> None:
    from parity.mutants.crash import CRASH_CATALOGUE
    from parity.mutants.precision import PRECISION_CATALOGUE

    others = {**mutants.CATALOGUE, **mutants.GPU_CATALOGUE, **CRASH_CATALOGUE, **PRECISION_CATALOGUE}
    for name, m in QUANT_CATALOGUE.items():
        assert m.side == "compiled" and m.dtype in QUANT_SCHEMES
        assert name not in others or others[name] is m


@pytest.mark.parametrize("name", list(QUANT_CATALOGUE))
def test_selftest_localises_it_in_both_modes(name: str, registered, tmp_path: Path, compile_cache: Path) -> None:
    row = run_mutant(QUANT_CATALOGUE[name], cache_dir=compile_cache, work=tmp_path)
    assert row.passed, row.to_dict()


@pytest.mark.parametrize("mode", ["replay", "isolated"])
@pytest.mark.parametrize("name", list(QUANT_CATALOGUE))
def test_found_against_the_reference_with_the_same_codes(name: str, mode: str, registered, tmp_path: Path,
                                                       compile_cache: Path) -> None:
    # Judged by the reference that dequantises the same codes, quantisation error is shared, so the
    # finding is the kernel's indexing mistake alone (a correct build shows no divergence here:
    # tests/compiled/test_quant.py).
    m = QUANT_CATALOGUE[name]
    ck = load_checkpoint(FIXTURES / f"{m.fixture}.pth")
    plan = RunPlan(prefill_ids=parse_ids(m.ids, vocab_size=ck.config.vocab_size),
                   decode_ids=default_decode_ids(steps=m.decode_steps, vocab_size=ck.config.vocab_size))
    result = run_parity(ck, backends=[f"reference@{m.dtype}", f"mutant/{name}"], plan=plan, dump_dir=tmp_path / "d",
                        cache_dir=compile_cache, mode=mode).result
    fd = result["first_divergence"]
    assert fd is not None and (fd["step"], fd["layer"], fd["stage"]) == (0, 0, "L0.att.r"), fd
