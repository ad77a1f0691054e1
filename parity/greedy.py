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
from typing import Callable, Sequence

import numpy as np

from parity.checkpoint import Checkpoint, load_checkpoint
from parity.dumpers.stepping import BackendStepper, Stepper, decode_run  # noqa: F401 (greedy's API)
from parity.errors import ParityError
from parity.heap import trim_heap

# fp32 logits of two correct backends differ by ~1e-5 on the fixtures and grow with depth and
# vocabulary; above this, a logit change is not rounding noise and an argmax flip is not a near-tie.
FLIP_ATOL = 1e-3


class ReferenceStepper(BackendStepper):
    """The torch reference; ``model`` lets a test pass a deliberately wrong subclass."""

    def __init__(self, checkpoint: Checkpoint, *, model=None, name: str = "reference"):
        from parity.dumpers.backends import ReferenceBackend

        super().__init__(ReferenceBackend(checkpoint, model=model, name=name))


def make_stepper(spec: str, checkpoint: Checkpoint, *, cache_dir: Path | None = None, on_event=None) -> Stepper:
    """Every backend name ``parity run --backends`` takes; unknown names fail as they do there."""
    from parity.dumpers.registry import make_backend

    return BackendStepper(make_backend(spec, checkpoint, cache_dir=cache_dir, on_event=on_event))


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
    in_process: bool | None = None,
    timeout: float | None = None,
) -> dict:
    """Greedy-decode ``steps`` tokens from ``prompt_ids`` on every backend; compare with the first.

    ``backends`` are names (any that ``parity run --backends`` takes, plug-ins included) or ready
    ``Stepper`` objects. Returns a JSON-able dict: ``backends`` (tokens, text), ``margins`` (the
    first backend's top-2 margin per step), ``comparisons`` (per other backend: its first token
    divergence and the teacher-forced max |Δlogits| per step) and the earliest
    ``first_token_divergence`` over all of them (None when every backend chose the same tokens).

    Our compiled builds (tvm, tvm-instrumented, compiled mutants) decode in a worker process each,
    as ``parity run`` runs them (``in_process``: default PARITY_IN_PROCESS; ``timeout``: seconds a
    step may take there, default parity.session.DEFAULT_TIMEOUT). One that crashes or hangs is
    listed in ``crashes`` and its first unfinished step is the ``first_token_divergence`` (it chose
    no token there), with ``crash`` set; the others are compared as usual.
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
    from parity.dumpers.worker import in_process_requested

    isolate = not (in_process if in_process is not None else in_process_requested())
    in_worker = [isolate and isinstance(b, str) and _compiled(b) for b in backends]
    if timeout is None:
        from parity.dumpers.worker import DEFAULT_TIMEOUT

        timeout = DEFAULT_TIMEOUT

    # One backend alive at a time: each decodes (and, where its tokens part from the yardstick's, is
    # teacher-forced on them) and goes before the next is made. Built all at once, a real-size
    # model's backends held their weights side by side: chatrwkv's own fp32 copy beside ours was
    # the parent's peak in a scenario run at 0.4B (issue 9).
    #
    # Our compiled builds decode in a worker process each (parity/dumpers/worker.py), first, while
    # this process holds no fp32 copy of the weights: a worker holds its own (the torch-free TVM
    # worker: the model's fp32 weights and TVM, ~0.9 GB at 0.1B), so ours beside it would be a
    # second one; and in here TVM's libraries, its compile and its copy of the folded embedding
    # were the parent's peak (0.1B scenario:chat-hello, 64 decode steps: 1.75 GB, 1.39x of fp32
    # weights + file; 1.54 GB after; benchmarks/results/memory-*-m3-*). A build that crashes or hangs there is reported (``crashes``),
    # not the end of the run. The other backends run here after them, on the checkpoint's shared
    # fp32 copy, made again.
    names: dict[int, str] = {}  # index in ``backends`` -> the backend's name
    runs: dict[str, tuple[list[int], np.ndarray]] = {}
    forced: dict[str, np.ndarray] = {}  # name -> its logits rows teacher-forced on the yardstick's tokens
    failures: dict[str, object] = {}  # name -> BackendFailure (parity/dumpers/worker.py)
    callers = any(not isinstance(b, str) for b in backends)

    def yard_tokens() -> list[int] | None:
        return runs[names[0]][0] if names.get(0) in runs else None

    def add_name(i: int, name: str) -> None:
        if name in names.values():
            raise ParityError(f"backend listed twice: {','.join([*names.values(), name])}")
        names[i] = name

    def in_worker_run(i: int, *, forced_only: bool = False) -> None:
        spec = backends[i]
        yard = yard_tokens() if i else None
        say(f"teacher-forcing {names[i]} on {names[0]}'s tokens (in a worker process)" if forced_only else
            f"greedy decoding {steps} tokens on {spec} (in a worker process)")
        out = _run_greedy_worker(spec, ck, prompt_ids=prompt_ids, steps=steps, yardstick_tokens=yard,
                                 forced_only=forced_only, cache_dir=cache_dir, timeout=timeout, on_event=say)
        if not forced_only:
            add_name(i, out.name or spec)
        name = names[i]
        if out.failure is not None:
            say(f"{name} {out.failure.kind} in greedy decoding: {out.failure.error} {out.failure.where()}")
            failures[name] = out.failure
            runs.pop(name, None)
            return
        if not forced_only:
            runs[name] = (list(out.greedy["tokens"]), np.asarray(out.greedy["rows"], dtype=np.float32))
        if out.greedy["forced_rows"] is not None:
            forced[name] = np.asarray(out.greedy["forced_rows"], dtype=np.float32)

    if any(in_worker):
        _let_go(ck, keep=callers)
        for i in range(len(backends)):
            if in_worker[i]:
                in_worker_run(i)
    for i, b in enumerate(backends):
        if in_worker[i]:
            continue
        s = b if not isinstance(b, str) else make_stepper(b, ck, cache_dir=cache_dir, on_event=say)
        if isinstance(b, str):
            ck.release_file_pages()  # the file's pages its build read (the embedding ln0 is folded into)
        add_name(i, s.name)
        say(f"greedy decoding {steps} tokens on {s.name}")
        runs[s.name] = decode_run(s, prompt_ids=prompt_ids, steps=steps)
        yard = yard_tokens()
        if i and yard is not None and runs[s.name][0] != yard:
            # Its own run saw its own tokens after the split; re-run it on the yardstick's.
            say(f"teacher-forcing {s.name} on {names[0]}'s tokens")
            _, forced[s.name] = decode_run(s, prompt_ids=prompt_ids, steps=steps, forced=yard)
        if isinstance(b, str):
            del s  # ours to drop (a Stepper handed in is the caller's)
            # Dropping the last reference frees nothing where the backend sits in a reference
            # cycle, and tvm's, chatrwkv's and hf's do (weakrefs on the v4 fixture: all three alive
            # after ``del``, gone after a collection): long-lived by then, they stayed until a full
            # collection, beside the next backend, and trim_heap could give nothing back (issue 9:
            # the RWKV-4 0.4B scenario row, 4.10 GB -> 3.66 GB, benchmarks/results/memory-*-m2-*).
            gc.collect()
            trim_heap()
    # A compiled build that decoded before the yardstick's tokens were known, and chose others:
    # teacher-forced on them now, in a worker again (rare: only where the tokens part).
    late = [i for i in range(1, len(backends)) if in_worker[i] and not in_worker[0]
            and names.get(i) in runs and yard_tokens() is not None and runs[names[i]][0] != yard_tokens()]
    if late:
        _let_go(ck, keep=callers)
        for i in late:
            in_worker_run(i, forced_only=True)
    order = [names[i] for i in sorted(names)]
    yard = order[0] if order and names.get(0) == order[0] else None
    yard_tokens_, yard_rows = runs[yard] if yard in runs else (None, None)
    margins = top2_margins(yard_rows) if yard_rows is not None else []

    comparisons = []
    for name in order[1:]:
        if name not in runs or yard_rows is None:
            continue
        tokens, rows = runs[name]
        rows = forced.get(name, rows)
        drift = [_finite(float(d)) for d in np.max(np.abs(rows.astype(np.float64) - yard_rows), axis=1)]
        first = next((i for i, (a, b) in enumerate(zip(yard_tokens_, tokens)) if a != b), None)
        divergence = None
        if first is not None:
            d = drift[first]
            near_tie = d is not None and d <= flip_atol
            divergence = {
                "step": first,
                "expected": yard,
                "actual": name,
                "expected_token": yard_tokens_[first],
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
    for name in order:
        entry: dict = {"tokens": runs[name][0] if name in runs else [], "text": None}
        if name in failures:
            entry["crashed"] = f"{failures[name].kind}: {failures[name].error} {failures[name].where()}"
        elif tokenizer is not None and not vocab_folded:
            entry["text"], note = _decode_text(tokenizer, runs[name][0])
            if note:
                entry["text_error"] = note
        per_backend[name] = entry

    divergences = [c["first_token_divergence"] for c in comparisons if c["first_token_divergence"] is not None]
    crashes = [_crash_entry(name, failures[name], yard=yard if yard != name else None, yard_tokens=yard_tokens_,
                            margins=margins) for name in order if name in failures]
    divergences += crashes  # a backend that died at step s gave no token there: the texts part at s
    warnings = []
    if vocab_folded:
        warnings.append("vocab folded: the prompt ids were mapped id % V into the model's vocabulary; "
                        "continuations are compared as ids, not decoded to text")
    return {
        "prompt_ids": prompt_ids,
        "steps": steps,
        "yardstick": names.get(0),
        "backends": per_backend,
        "margins": margins,
        "comparisons": comparisons,
        "first_token_divergence": min(divergences, key=lambda d: d["step"]) if divergences else None,
        "crashes": [c["crash"] for c in crashes],
        "flip_atol": flip_atol,
        "vocab_folded": vocab_folded,
        "warnings": warnings,
    }


def _compiled(spec: str) -> bool:
    """Whether backend ``spec`` is one of our compiled builds: tvm (any dtype or weight format),
    tvm-instrumented or a compiled mutant — greedy decodes those in a worker process."""
    from parity.dumpers.registry import split_dtype

    try:
        base = split_dtype(spec)[0]
    except ParityError:
        return False
    if base in ("tvm", "tvm-instrumented"):
        return True
    if spec.startswith("mutant/"):
        from parity.mutants import get_mutant

        return get_mutant(spec.split("/", 1)[1]).side == "compiled"
    return False


def _let_go(ck: Checkpoint, *, keep: bool) -> None:
    """Before a worker decodes: this process gives back what it need not hold meanwhile — the
    shared fp32 copy (made again by the next backend built here; kept when a Stepper of the
    caller's may hold it, or the next would make a second), the file's pages, the free heap."""
    if not keep:
        ck.drop_fp32_copy()
    gc.collect()
    ck.release_file_pages()
    trim_heap()


def _run_greedy_worker(spec: str, ck: Checkpoint, *, prompt_ids, steps: int, yardstick_tokens, forced_only: bool,
                       cache_dir, timeout: float, on_event):
    from parity.dumpers.backends import RunPlan
    from parity.dumpers.worker import run_in_worker

    # The plan only names each step's kind for a failure (0: the prefill, then decode steps).
    plan = RunPlan(prefill_ids=tuple(prompt_ids), decode_ids=(0,) * (steps - 1))
    job = {"prompt_ids": list(prompt_ids), "steps": steps, "yardstick_tokens": yardstick_tokens,
           "forced_only": forced_only}
    return run_in_worker(spec, ck, plan=plan, path=None, cache_dir=cache_dir, target="llvm", timeout=timeout,
                         on_event=on_event, greedy=job)


def _crash_entry(name: str, failure, *, yard: str | None, yard_tokens, margins) -> dict:
    """A backend that died in greedy decoding, as a first token divergence: at the step it did not finish."""
    step = failure.step if failure.step is not None else 0
    known = yard_tokens is not None and step < len(yard_tokens)
    return {
        "step": step,
        "expected": yard,
        "actual": name,
        "expected_token": yard_tokens[step] if known else None,
        "actual_token": None,
        "margin": margins[step] if known and step < len(margins) else None,
        "actual_margin": None,
        "logit_drift": None,
        "near_tie": False,
        "explanation": f"{name} {failure.kind} in greedy decoding {failure.where()}: {failure.error}",
        "crash": {"backend": name, "kind": failure.kind, "error": failure.error, "step": failure.step,
                  "where": failure.where(), "signal": failure.signal, "kernel": failure.kernel,
                  "traceback": failure.traceback},
    }


def _fmt(x) -> str:
    return "non-finite" if x is None else f"{x:.3g}"


def run_greedy(checkpoint: Checkpoint, *, backends: Sequence[str], info: dict, cache_dir: Path | None = None,
               on_event=None, in_process: bool | None = None, timeout: float | None = None) -> dict | None:
    """``parity run --greedy N``: the greedy comparison of the prompt ``plan_from_args`` built (None when N = 0);
    ``in_process`` and ``timeout`` as the run's own (``--in-process``, ``--timeout``)."""
    steps = info.get("greedy_steps") or 0
    if steps == 0:
        return None
    tokenizer = None
    if info.get("text") is not None and not info["vocab_folded"]:
        from parity.tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
    return greedy_compare(
        checkpoint, backends=list(backends), prompt_ids=info["model_ids"], steps=steps, cache_dir=cache_dir,
        tokenizer=tokenizer, vocab_folded=info["vocab_folded"], on_event=on_event, in_process=in_process, timeout=timeout,
    )
