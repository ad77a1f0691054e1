"""Greedy decoding on every backend, each feeding back its OWN argmax, and where the tokens part.

A parity run is teacher-forced: every backend gets the same decode ids, so one wrong step cannot
change what the next step sees. Greedy decoding is what a user actually runs, and there a tiny
logit difference can flip an argmax and send the two texts apart. So the comparison reports both:

- per backend, the tokens it chose (and the text, when a tokenizer is given and ids are not folded);
- ``first_token_divergence``: the first step where the chosen tokens differ;
- the teacher-forced drift: every other backend re-run on the FIRST backend's tokens, with the max
  |logits_a − logits_b| per step, so equal tokens cannot hide logits that drift apart;
- the first backend's top-2 margin per step: a flip where the margin is tiny (and the drift is
  numerical noise) is legitimate; a flip with a large drift is a real divergence.

Step i chooses token i: step 0 is the prefill of the prompt, step i > 0 the decode of token i − 1.
Ties go to the lowest id (``np.argmax``), the same rule on every backend.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.errors import ParityError
from parity.heap import trim_heap

# fp32 logits of two correct backends differ by ~1e-5 on the fixtures and grow with depth and
# vocabulary; above this, a logit change is not rounding noise and an argmax flip is not a near-tie.
FLIP_ATOL = 1e-3


@runtime_checkable
class Stepper(Protocol):
    """A backend as greedy decoding needs it: a named model that carries its own state."""

    name: str

    def reset(self) -> None:
        """Back to the zero state."""

    def step(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` from the current state; return the LAST row of logits, shape (V,)."""


class BackendStepper:
    """Any backend (``parity.dumpers.registry``: built-in, mutant, hf, plug-in) as a ``Stepper``: the
    same object a teacher-forced dump drives, stepped one token at a time, its logits' last row read."""

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name

    def reset(self) -> None:
        self.backend.reset()

    def step(self, ids: Sequence[int]) -> np.ndarray:
        logits = self.backend.step(list(ids)).get("logits")
        if logits is None:
            raise ParityError(f"backend {self.name} recorded no 'logits' stage; greedy decoding needs them")
        return np.asarray(logits, dtype=np.float32).reshape(-1, np.shape(logits)[-1])[-1]


class ReferenceStepper(BackendStepper):
    """The torch reference; ``model`` lets a test pass a deliberately wrong subclass."""

    def __init__(self, checkpoint: Checkpoint, *, model=None, name: str = "reference"):
        from parity.dumpers.backends import ReferenceBackend

        super().__init__(ReferenceBackend(checkpoint, model=model, name=name))


def make_stepper(spec: str, checkpoint: Checkpoint, *, cache_dir: Path | None = None, on_event=None) -> Stepper:
    """Every backend name ``parity run --backends`` takes; unknown names fail as they do there."""
    from parity.dumpers.registry import make_backend

    return BackendStepper(make_backend(spec, checkpoint, cache_dir=cache_dir, on_event=on_event))


def decode_run(stepper: Stepper, *, prompt_ids: Sequence[int], steps: int,
               forced: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(chosen tokens, logits rows (steps, V)): greedy, or fed ``forced`` tokens when given.

    With ``forced``, row i is what the stepper predicts after the prompt and ``forced[:i]`` —
    the same context the forcing backend had — while the returned tokens are its own argmaxes.
    """
    stepper.reset()
    logits = stepper.step(prompt_ids)
    chosen: list[int] = []
    rows = []
    for i in range(steps):
        rows.append(np.asarray(logits, dtype=np.float32).reshape(-1))
        chosen.append(int(np.argmax(rows[-1])))
        if i + 1 < steps:  # the last chosen token needs no forward pass: nothing reads its logits
            logits = stepper.step([forced[i] if forced is not None else chosen[-1]])
    return chosen, np.stack(rows)


def top2_margins(rows: np.ndarray) -> list[float | None]:
    """Per row, top-1 minus top-2 logit (None where not finite)."""
    if rows.shape[1] < 2:
        return [None] * rows.shape[0]
    top2 = np.partition(rows.astype(np.float64), -2, axis=1)[:, -2:]
    return [_finite(float(t[1] - t[0])) for t in top2]


def _finite(x: float) -> float | None:
    # JSON results are written with allow_nan=False; None says "not a number" there.
    return x if math.isfinite(x) else None


def _decode_text(tokenizer, tokens: list[int]) -> tuple[str | None, str | None]:
    try:
        return tokenizer.decode(tokens, errors="replace"), None
    except ParityError as exc:  # e.g. id 0 or an id past the vocabulary file's last token
        return None, str(exc)


def greedy_compare(
    checkpoint: Checkpoint | str | Path,
    *,
    backends: Sequence[str | Stepper],
    prompt_ids: Sequence[int],
    steps: int,
    cache_dir: Path | None = None,
    tokenizer=None,
    vocab_folded: bool = False,
    on_event: Callable[[str], None] | None = None,
    flip_atol: float = FLIP_ATOL,
) -> dict:
    """Greedy-decode ``steps`` tokens from ``prompt_ids`` on every backend; compare with the first.

    ``backends`` are names (any that ``parity run --backends`` takes, plug-ins included) or ready
    ``Stepper`` objects. Returns a JSON-able dict: ``backends`` (tokens, text), ``margins`` (the
    first backend's top-2 margin per step), ``comparisons`` (per other backend: its first token
    divergence and the teacher-forced max |Δlogits| per step) and the earliest
    ``first_token_divergence`` over all of them (None when every backend chose the same tokens).
    """
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    vocab_size = ck.config.vocab_size
    if type(steps) is not int or steps < 1:
        raise ParityError(f"greedy steps must be an integer >= 1, got {steps!r}")
    if len(backends) < 2:
        raise ParityError("greedy comparison needs at least two backends, e.g. reference,tvm")
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ParityError("no prompt token ids given")
    bad = next((i for i in prompt_ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ParityError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    say = on_event or (lambda msg: None)

    from parity.dumpers.registry import check_backend_spec

    for b in backends:  # every name checked before anything is built or compiled
        if isinstance(b, str):
            check_backend_spec(b)
    specs = [b for b in backends if isinstance(b, str)]
    if len(set(specs)) != len(specs):
        raise ParityError(f"backend listed twice: {','.join(specs)}")

    # One backend alive at a time: each decodes (and, where its tokens part from the yardstick's, is
    # teacher-forced on them) and goes before the next is made. Built all at once, a real-size
    # model's backends held their weights side by side: chatrwkv's own fp32 copy beside ours was
    # the parent's peak in a scenario run at 0.4B (issue 9).
    names: list[str] = []
    runs: dict[str, tuple[list[int], np.ndarray]] = {}
    forced: dict[str, np.ndarray] = {}  # name -> its logits rows teacher-forced on the yardstick's tokens
    for b in backends:
        s = b if not isinstance(b, str) else make_stepper(b, ck, cache_dir=cache_dir, on_event=say)
        if s.name in runs:
            raise ParityError(f"backend listed twice: {','.join(names + [s.name])}")
        names.append(s.name)
        say(f"greedy decoding {steps} tokens on {s.name}")
        runs[s.name] = decode_run(s, prompt_ids=prompt_ids, steps=steps)
        if len(names) > 1 and runs[s.name][0] != runs[names[0]][0]:
            # Its own run saw its own tokens after the split; re-run it on the yardstick's.
            say(f"teacher-forcing {s.name} on {names[0]}'s tokens")
            _, forced[s.name] = decode_run(s, prompt_ids=prompt_ids, steps=steps, forced=runs[names[0]][0])
        if isinstance(b, str):
            del s  # ours to drop (a Stepper handed in is the caller's)
            # Dropping the last reference frees nothing where the backend sits in a reference
            # cycle, and tvm's, chatrwkv's and hf's do (weakrefs on the v4 fixture: all three alive
            # after ``del``, gone after a collection): long-lived by then, they stayed until a full
            # collection, beside the next backend, and trim_heap could give nothing back (issue 9:
            # the RWKV-4 0.4B scenario row, 4.10 GB -> 3.66 GB, benchmarks/results/memory-*-m2-v4-*).
            gc.collect()
            trim_heap()
    yard = names[0]
    yard_tokens, yard_rows = runs[yard]
    margins = top2_margins(yard_rows)

    comparisons = []
    for name in names[1:]:
        tokens, rows = runs[name]
        rows = forced.get(name, rows)
        drift = [_finite(float(d)) for d in np.max(np.abs(rows.astype(np.float64) - yard_rows), axis=1)]
        first = next((i for i, (a, b) in enumerate(zip(yard_tokens, tokens)) if a != b), None)
        divergence = None
        if first is not None:
            d = drift[first]
            near_tie = d is not None and d <= flip_atol
            divergence = {
                "step": first,
                "expected": yard,
                "actual": name,
                "expected_token": yard_tokens[first],
                "actual_token": tokens[first],
                "margin": margins[first],
                "actual_margin": top2_margins(rows[first : first + 1])[0],
                "logit_drift": d,
                "near_tie": near_tie,
                "explanation": (
                    f"near-tie: {yard}'s top-2 margin is {_fmt(margins[first])} and the logits differ by only "
                    f"{_fmt(d)} (<= {flip_atol:g}), so rounding alone can flip this argmax"
                    if near_tie else
                    f"the logits differ by {_fmt(d)} at this step (> {flip_atol:g}), more than rounding explains: "
                    f"a real divergence, not a near-tie"
                ),
            }
        finite = [d for d in drift if d is not None]
        comparisons.append({
            "expected": yard,
            "actual": name,
            "tokens_equal": first is None,
            "first_token_divergence": divergence,
            "teacher_forced_max_abs": drift,
            "max_abs": max(finite) if len(finite) == len(drift) else None,
        })

    per_backend = {}
    for name in names:
        entry: dict = {"tokens": runs[name][0], "text": None}
        if tokenizer is not None and not vocab_folded:
            entry["text"], note = _decode_text(tokenizer, runs[name][0])
            if note:
                entry["text_error"] = note
        per_backend[name] = entry

    divergences = [c["first_token_divergence"] for c in comparisons if c["first_token_divergence"] is not None]
    warnings = []
    if vocab_folded:
        warnings.append("vocab folded: the prompt ids were mapped id % V into the model's vocabulary; "
                        "continuations are compared as ids, not decoded to text")
    return {
        "prompt_ids": prompt_ids,
        "steps": steps,
        "yardstick": yard,
        "backends": per_backend,
        "margins": margins,
        "comparisons": comparisons,
        "first_token_divergence": min(divergences, key=lambda d: d["step"]) if divergences else None,
        "flip_atol": flip_atol,
        "vocab_folded": vocab_folded,
        "warnings": warnings,
    }


def _fmt(x) -> str:
    return "non-finite" if x is None else f"{x:.3g}"


def run_greedy(checkpoint: Checkpoint, *, backends: Sequence[str], info: dict, cache_dir: Path | None = None,
               on_event=None) -> dict | None:
    """``parity run --greedy N``: the greedy comparison of the prompt ``plan_from_args`` built (None when N = 0)."""
    steps = info.get("greedy_steps") or 0
    if steps == 0:
        return None
    tokenizer = None
    if info.get("text") is not None and not info["vocab_folded"]:
        from parity.tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
    return greedy_compare(
        checkpoint, backends=list(backends), prompt_ids=info["model_ids"], steps=steps, cache_dir=cache_dir,
        tokenizer=tokenizer, vocab_folded=info["vocab_folded"], on_event=on_event,
    )
