"""Debug taps handed over one at a time (``forward(on_tap=...)``): the same arrays, in the same
order, as the taps ``forward`` returns whole, and no second copy of them in memory (issue 9: a
512-token prefill's taps are ~0.6 GB at 0.1B, and the TVM debug worker used to hold them twice)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parity.checkpoint import Checkpoint
from parity.compiled.runtime import CompiledRWKV

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
STEPS = ([3, 1, 4, 1, 5, 9, 2, 6], [11], [42])  # a prefill, then two decode steps


@pytest.fixture(scope="module")
def debug(checkpoint: Checkpoint, compile_cache: Path) -> CompiledRWKV:
    return CompiledRWKV(checkpoint, variant="debug", cache_dir=compile_cache)


def test_streamed_taps_are_the_returned_taps_bit_for_bit_in_order(debug) -> None:
    whole_state = streamed_state = debug.zero_state()
    for ids in STEPS:
        whole = debug.forward(ids, whole_state)
        handed: list[tuple[str, bytes, tuple]] = []
        streamed = debug.forward(ids, streamed_state,
                                 on_tap=lambda name, a: handed.append((name, a.tobytes(), a.shape)))
        assert streamed.taps == {}  # handed over instead
        assert [name for name, _, _ in handed] == list(whole.taps) == debug.tap_names
        for name, data, shape in handed:
            assert shape == whole.taps[name].shape, name
            assert data == whole.taps[name].tobytes(), f"{name} differs at ids {ids}"
        assert streamed.logits.tobytes() == whole.logits.tobytes()
        whole_canon, streamed_canon = debug.state_to_canonical(whole.state), debug.state_to_canonical(streamed.state)
        assert all(whole_canon[n].tobytes() == streamed_canon[n].tobytes() for n in whole_canon)
        whole_state, streamed_state = whole.state, streamed.state


def test_a_kept_tap_stays_valid_after_the_next_step(debug) -> None:
    # A consumer that keeps the arrays (Backend.step's StagesOfOneStep does) must not see them
    # change when the VM runs again: on the CPU they view the VM's outputs.
    kept: dict = {}
    first = debug.forward([5, 6, 7], on_tap=kept.__setitem__)
    copy = {name: a.copy() for name, a in kept.items()}
    logits = first.logits.copy()
    for ids in ([8, 9, 10], [1] * 12):
        debug.forward(ids, first.state, on_tap=lambda *a: None)
    assert all(kept[name].tobytes() == copy[name].tobytes() for name in copy)
    assert first.logits.tobytes() == logits.tobytes()


# One process per way of writing: load the fixture's debug build (from the session's compile
# cache), run the prefill twice so the VM's allocator pool holds its buffers, reset the peak RSS
# counter, then run it again writing every tap to a dump step; print the peak's rise in bytes.
_MEASURE = r"""
import json, sys, tempfile
from pathlib import Path
from parity.checkpoint import load_checkpoint
from parity.compiled.runtime import CompiledRWKV
from parity.dumpers.format import DumpWriter

mode, fixture, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = CompiledRWKV(load_checkpoint(Path(fixture)), variant="debug")
ids = [(7 * i) % model.config.vocab_size for i in range(tokens)]
for _ in range(2):  # the pool's buffers settle over two calls (measured: the second still grows it)
    warm = model.forward(ids)
    taps_bytes = sum(a.nbytes for a in warm.taps.values())
    del warm

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

with tempfile.TemporaryDirectory() as tmp:
    writer = DumpWriter(path=Path(tmp) / "d", backend="tvm", mode="debug", dtype="float32", model={},
                        stage_order=model.tap_names, checkpoint={}, tool_versions={}, extra={})
    with writer:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        base = kib("VmHWM")
        with writer.step(kind="prefill", ids=ids) as step:
            if mode == "stream":
                model.forward(ids, on_tap=step.add)
            else:
                out = model.forward(ids)
                for name, value in out.taps.items():
                    step.add(name, value)
        rise = (kib("VmHWM") - base) * 1024
print(json.dumps({"rise": rise, "taps_bytes": taps_bytes}))
"""


def _peak_rise(mode: str, *, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, mode, str(FIXTURES / "rwkv5_2-L4-C128-H2.pth"), str(tokens)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_streaming_the_taps_holds_no_second_copy_of_them(compile_cache: Path) -> None:
    # 3072 tokens of the L4 C128 fixture: ~200 MB of taps, so a second copy stands far above the
    # noise of a Python process and the dump writer's own buffers (below).
    whole = _peak_rise("whole", tokens=3072)
    stream = _peak_rise("stream", tokens=3072)
    taps = whole["taps_bytes"]
    assert taps > 150e6
    # The measurement sees a copy when there is one: converting every tap first raises the peak
    # by about the taps' size (the writer spools each tap to a file, never holding the step).
    assert whole["rise"] > 0.8 * taps, whole
    # Handed over one at a time as views of the VM's outputs: what is left is the writer's own,
    # which copies the spool into the step file 16 MB at a time (format.py; two such buffers can
    # be alive at once: measured 33 MB), plus 10 % of the taps (18 MB) for the rest: far below a
    # copy of the taps, though above the largest single tap (the logits, 12.6 MB).
    assert stream["rise"] < 2 * (16 << 20) + 0.1 * taps, stream
