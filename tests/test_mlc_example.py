"""The worked example of docs/backends.md: an MLC-style RWKV-5 port checked through parity.capture.

The port (examples/mlc_rwkv5/model.py) differs from our compiled model in every way a real port
does — names, entry points, a batch axis, last-token logits, [head, v, k] wkv state, load-time
decay transform — and the glue (examples/mlc_rwkv5/glue.py) is all a user writes. The correct
port must agree with the reference on every canonical stage; the planted copy (ln_x eps 1e-5)
must be localised to an ln_x stage; and the state adapter must matter (H = N: only values tell).
"""

from __future__ import annotations

import json
import sys

import pytest

from parity.cli import main
from parity.stages import stage_order
from parity_cli import REPO

FIXTURE = "fixtures/rwkv5_2-L2-C144-H12.pth"  # the smallest 5.2 fixture; H = N = 12
GLUE = "examples/mlc_rwkv5/glue.py"
PLANTED = "examples/mlc_rwkv5/planted.py"
PROMPT = ["--ids", "random:6:3", "--decode-steps", "2"]


def run(capsys, tmp_path, backend: str, *extra: str) -> tuple[int, dict, str]:
    out = tmp_path / f"{abs(hash(backend))}.json"
    rc = main(["run", "-q", "--checkpoint", FIXTURE, "--backends", f"reference,{backend}", *PROMPT,
               "--json", str(out), *extra])
    captured = capsys.readouterr()
    return rc, json.loads(out.read_text()), captured.out + captured.err


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the backend specs are relative paths, as the docs write them


def test_the_glue_is_at_most_100_lines() -> None:
    # The bar for "a few lines of glue"; every line counted, docstring and comments included.
    assert len((REPO / GLUE).read_text().splitlines()) <= 100


def test_the_mlc_style_port_agrees_on_every_stage(capsys, tmp_path) -> None:
    rc, result, out = run(capsys, tmp_path, f"{GLUE}:make_backend")
    assert rc == 0 and out.startswith("no divergence"), out
    # Every canonical stage of the 2-layer model was named from kernel calls (or the returned
    # state and logits) and compared, in every step.
    n_stages = len(stage_order(n_layer=2, version="5.2"))
    assert result["summary"]["records"] == n_stages * 3, result["summary"]
    logits = [r for r in result["records"] if r["stage"] == "logits"]
    # Prefill: the port returns the last token's logits only; compared on token row 5 of 6.
    assert logits[0]["rows"] == [5] and logits[0]["shape"][0] == 1
    assert all(r["rows"] is None for r in logits[1:])
    # The unnamed kernel calls are shown as one-sided records, never dropped.
    kernels = [m for m in result["missing"] if m["stage"].startswith("kernel.")]
    assert kernels and all(m["missing_in"] == "expected" for m in kernels)
    assert result["actual"]["backend"] == "mlc-style-rwkv5"
    assert result["actual"]["extra"]["notes"][0].startswith("prefill returns the last token's logits")


def test_the_planted_eps_is_localised_to_ln_x(capsys, tmp_path) -> None:
    rc, result, out = run(capsys, tmp_path, f"{PLANTED}:make_backend")
    fd = result["first_divergence"]
    assert rc == 1, out
    # eps enters GroupNorm only: the first stage out of tolerance is an ln_x, in the prefill.
    assert fd["step"] == 0 and fd["stage"] in ("L0.att.ln_x", "L1.att.ln_x"), fd
    assert out.strip().splitlines()[-1].startswith(f"DIVERGENCE: first divergence: prefill, layer {fd['layer']}, stage {fd['stage']}")


# A user who forgets the [h, v, k] -> [h, k, v] adapter: the shapes still match (N x N per head).
NO_ADAPTER = '''
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("mlc_glue_under_test", {glue!r})
glue = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(glue)


class NoAdapter(glue.MLCStylePort):
    def step(self, ids):
        stages = super().step(ids)
        for name in [n for n in stages if n.endswith(".att_kv")]:
            stages[name] = stages[name].swapaxes(-1, -2).copy()  # undo the glue's hvk_to_hkv
        return stages


def make_backend(checkpoint):
    return NoAdapter(checkpoint)
'''


def test_without_the_state_adapter_the_state_diverges(capsys, tmp_path) -> None:
    (tmp_path / "no_adapter.py").write_text(NO_ADAPTER.format(glue=str(REPO / GLUE)))
    try:
        rc, result, out = run(capsys, tmp_path, f"{tmp_path / 'no_adapter.py'}:make_backend", "--mode", "propagated")
    finally:
        sys.modules.pop("mlc_glue_under_test", None)
    fd = result["first_divergence"]
    assert rc == 1 and (fd["step"], fd["stage"]) == (0, "state.L0.att_kv"), out


FUSED = "examples/mlc_rwkv5/fused.py"


def test_the_fused_build_is_checked_on_the_stages_its_kernels_still_show(capsys, tmp_path) -> None:
    rc, result, out = run(capsys, tmp_path, f"{FUSED}:make_backend")
    assert rc == 0 and out.startswith("no divergence"), out
    # Per layer: ln1, ln2, two shifts, wkv, ln_x, gated, x_after_att, ffn.k, x_out; plus emb,
    # ln_out, logits and the 6 state slots. Fusion swallowed the rest (r, k, v, the lerps, ...).
    assert result["summary"]["records"] == (2 * 10 + 3 + 6) * 3, result["summary"]
    compared = {r["stage"] for r in result["records"]}
    assert {"L0.att.ln_x", "L1.x_after_att", "L1.ffn.k"} <= compared and "L0.att.r" not in compared


def test_the_planted_eps_in_the_fused_build_is_still_localised_to_ln_x(capsys, tmp_path) -> None:
    rc, result, out = run(capsys, tmp_path, f"{FUSED}:make_planted")
    fd = result["first_divergence"]
    assert rc == 1 and fd["step"] == 0 and fd["stage"] in ("L0.att.ln_x", "L1.att.ln_x"), out
