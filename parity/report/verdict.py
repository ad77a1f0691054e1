"""Verdicts as text: the one-paragraph account of a first divergence, and the closing verdict line.

Both command lines (``parity`` in parity/cli.py and ``parity report`` in parity/report/cli.py)
and the parity suite print these, so they live here, below all of them: this module imports
only parity.results (the typed result, pure data), and an arrow into it never closes a circle.
Each function reads the typed result (``RunResult``, ``Divergence``, ``Crash``); given the JSON
form of one instead (a dict, as older callers and saved files hold it), it types it first.
"""

from __future__ import annotations

from parity.results import FAILURE_VERDICTS, Crash, Divergence, Drift, RunResult

__all__ = ["as_result", "console_width", "crash_line", "describe_divergence", "fmt", "fmt6", "verdict_line"]


def as_result(source: RunResult | dict) -> RunResult:
    """The typed result of ``source``: itself, or its JSON form read back (``RunResult.from_dict``).

    A hand-made or first-release dict may lack ``verdict`` (it follows from ``first_divergence``)
    or ``records``; a malformed field is refused in one line (ParityError)."""
    if isinstance(source, RunResult):
        return source
    if isinstance(source, dict) and ("verdict" not in source or "records" not in source):
        source = {"verdict": "no divergence" if source.get("first_divergence") is None else "divergence",
                  "records": [], **source}
    return RunResult.from_dict(source)


def fmt(x) -> str:
    """Three significant digits for floats, ``-`` for a missing value."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def fmt6(x) -> str:
    return f"{x:.6g}" if isinstance(x, float) else fmt(x)


def describe_divergence(fd: Divergence | dict) -> str:
    """One paragraph: where, how badly, and what tolerance would have passed."""
    if not isinstance(fd, Divergence):
        fd = Divergence.from_dict(fd)
    if fd.step_kind is None or fd.stage is None:
        raise KeyError("step_kind" if fd.step_kind is None else "stage")
    where = "prefill" if fd.step_kind == "prefill" else f"decode step {fd.step}"
    row = f", token row {fd.row}" if fd.row is not None and fd.step_kind == "prefill" else ""
    layer = f"layer {fd.layer}, " if fd.layer is not None else ""
    if fd.reason == "arbiter":
        return (f"first divergence ({fd.judged_by}): {where}, {layer}stage {fd.stage}: rms error against fp64 "
                f"{fmt(fd.actual_error)} vs the fp32 reference's {fmt(fd.reference_error)} "
                f"(needs multiplier {fmt(fd.min_multiplier)}, allowed {fmt(fd.multiplier)})")
    if fd.reason == "shape":
        how = f"shape {fd.actual_shape} vs expected {fd.shape}"
    elif fd.reason == "nonfinite":
        how = f"non-finite values in {fd.nonfinite_side}, first at {fd.first_nonfinite_index}"
    else:
        how = (
            f"max abs {fmt(fd.max_abs)}, rms-rel {fmt(fd.rms_rel)}, "
            f"{fd.mismatch_count}/{fd.numel} elements ({fmt(fd.mismatch_pct)}%) out of tolerance, "
            f"worst at {fd.worst_index} (actual {fmt6(fd.worst_actual)}, expected {fmt6(fd.worst_expected)}); "
            f"passes only with atol >= {fmt(fd.min_atol)} (allowed {fmt(fd.atol)})"
        )
    return f"first divergence: {where}, {layer}stage {fd.stage}{row}: {how}"


def diverged(result: RunResult | dict) -> bool:
    """Whether the result fails: a divergence, or a backend that crashed or hung (exit 1 either way)."""
    return as_result(result).failed


def _steps_text(n: int) -> str:
    return "no step" if n <= 0 else "step 0" if n == 1 else f"steps 0-{n - 1}"


def crash_line(crash: Crash | dict) -> str:
    """``CRASHED: tvm died with SIGSEGV at decode step 3 in kernel wkv5 after L1.att.wkv (steps 0-2
    compared against reference: no divergence)`` — one line for a backend that crashed or hung
    (parity/dumpers/worker.py); the last stage named is of the same step unless it says which."""
    if not isinstance(crash, Crash):
        crash = Crash.from_dict(crash)
    name = crash.name or crash.backend
    step, last = crash.step, crash.last_stage
    step_name = None if step is None else "prefill" if step == 0 else f"decode step {step}"
    detail = ""
    if crash.kernel:
        detail += f" in kernel {crash.kernel}" + (f" (call {crash.kernel_call} of the step)" if crash.kernel_call else "")
    if isinstance(last, dict):
        detail += f" after {last.get('stage')}" + ("" if last.get("step") == step else f" of step {last.get('step')}")
    if crash.kind == "timed out":
        limit = crash.timeout_s
        head = (f"TIMED OUT: {name} stuck at {step_name or 'its first step'}{detail}"
                + (f" for {limit:g} s" if isinstance(limit, (int, float)) else "") + "; stopped")
    else:
        where = "before its first step" if step is None else f"at {step_name}{detail}"
        head = (f"CRASHED: {name} died with {crash.signal} {where}" if crash.signal
                else f"CRASHED: {name} failed {where}: {crash.error}")
    compared = crash.compared
    n = crash.steps_completed or 0
    if not isinstance(compared, dict) or n == 0:
        return f"{head} (no step finished, nothing compared)"
    fd = compared.get("first_divergence")
    found = "no divergence" if not isinstance(fd, dict) else \
        f"first divergence at {'prefill' if fd.get('step') == 0 else 'decode step ' + str(fd.get('step'))} {fd.get('stage')}"
    return f"{head} ({_steps_text(n)} compared against {compared.get('against')}: {found})"


def verdict_line(result: RunResult | dict) -> str:
    """``no divergence (...)`` or ``DIVERGENCE: first divergence: ...``; tolerant of a hand-edited or
    older result (``parity report`` reads saved files), so a missing field never raises."""
    result = as_result(result)
    first = result.first_divergence
    if result.verdict in FAILURE_VERDICTS and result.crash is not None:
        return crash_line(result.crash)
    if first is not None and result.verdict == "drift beyond envelope":
        # No stage adds error out of tolerance; the propagated trajectory left its envelope.
        drift = result.drift or Drift()
        beyond = drift.first_beyond_envelope if drift.first_beyond_envelope is not None else first
        return (f"DRIFT BEYOND ENVELOPE: no stage adds error out of tolerance, but the propagated error reaches "
                f"{fmt(drift.envelope_fraction)}x its envelope; first beyond it at step {beyond.step} "
                f"{beyond.stage} (max abs {fmt(beyond.max_abs)})")
    if first is not None:
        try:
            return "DIVERGENCE: " + describe_divergence(first)
        except KeyError:  # a result missing a field describe_divergence needs
            return f"DIVERGENCE: first divergence at step {first.step}, stage {first.stage}"
    if result.failed:
        return "DIVERGENCE: the result names no first divergence; see its failing records"
    records = result.summary.records if result.summary.records is not None else len(result.records)
    return f"no divergence ({records} records; worst logits error {fmt(result.summary.worst_logits_max_abs)})"


# Through a pipe (a CI log) there is no terminal to measure, and rich would assume 80 columns: the
# selftest table lost its last columns and numbers were cut ("0.0008…"). A log has no width, so
# tables get room for every column; where COLUMNS is set, or on a terminal, rich measures as usual.
PIPE_WIDTH = 240


def console_width(stream) -> int | None:
    """The width for a rich Console writing to ``stream``: None (rich decides) on a terminal or
    where COLUMNS is set, else PIPE_WIDTH."""
    import os

    try:
        is_tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        is_tty = False
    return None if is_tty or os.environ.get("COLUMNS") else PIPE_WIDTH


def model_check_lines(result: RunResult | dict) -> list[str]:
    """The own-error, drift and end-to-end lines under a run's table (rich markup in the drift status)."""
    result = as_result(result)
    lines = []
    own, drift, e2e = result.own_error, result.drift, result.end_to_end
    if own:
        lines.append(f"own error ({own.method}, {result.label(own.backend)}): worst {own.worst_ratio:.3g}x its allowance"
                     + (f" at step {own.worst_step} {own.worst_stage}" if own.worst_stage else "")
                     + (f"; {len(own.not_replayable)} (step, layer) pairs not replayable" if own.not_replayable else ""))
    if drift:
        status = {"none": "none (every stage within its allowance)", "within": "within the envelope (a pass)",
                  "beyond": "[bold]BEYOND the envelope[/]",
                  "not judged": "not judged (quantised weights on one side only: the end-to-end line says what "
                                "quantisation costs)"}[drift.status]
        lines.append(f"propagated drift: worst {drift.worst_ratio:.3g}x the per-stage allowance"
                     + (f" at step {drift.worst_step} {drift.worst_stage}" if drift.worst_stage else "")
                     + f", {drift.envelope_fraction:.2g} of the envelope there ({drift.envelope:g}x): {status}")
    if e2e and e2e.rows:
        lines.append(f"end to end ({e2e.rows} logits rows): KL max {fmt(e2e.kl_max)} nats, mean {fmt(e2e.kl_mean)}, "
                     f"p99.9 {fmt(e2e.kl_p999)}; top-1 agreement {100 * e2e.top1_agreement:.4g}% "
                     f"({e2e.top1_flips} flips, {e2e.top1_ties} near-ties); top-5 overlap "
                     f"{100 * e2e.top5_overlap:.4g}%; min cosine {fmt(e2e.cosine_min)}")
    return lines
