"""Verdicts as text: the one-paragraph account of a first divergence, and the closing verdict line.

Both command lines (``parity`` in parity/cli.py and ``parity report`` in parity/report/cli.py)
and the parity suite print these, so they live here, below all of them: this module imports
nothing from the package, and an arrow into it never closes a circle.
"""

from __future__ import annotations

__all__ = ["console_width", "crash_line", "describe_divergence", "fmt", "fmt6", "verdict_line"]

FAILURE_VERDICTS = ("crashed", "timed out")  # parity/results.py: a backend died or hung


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


def describe_divergence(fd: dict) -> str:
    """One paragraph: where, how badly, and what tolerance would have passed."""
    where = "prefill" if fd["step_kind"] == "prefill" else f"decode step {fd['step']}"
    row = f", token row {fd['row']}" if fd.get("row") is not None and fd["step_kind"] == "prefill" else ""
    layer = f"layer {fd['layer']}, " if fd.get("layer") is not None else ""
    if fd.get("reason") == "arbiter":
        return (f"first divergence ({fd.get('judged_by')}): {where}, {layer}stage {fd['stage']}: rms error against fp64 "
                f"{fmt(fd.get('actual_error'))} vs the fp32 reference's {fmt(fd.get('reference_error'))} "
                f"(needs multiplier {fmt(fd.get('min_multiplier'))}, allowed {fmt(fd.get('multiplier'))})")
    if fd.get("reason") == "shape":
        how = f"shape {fd.get('actual_shape')} vs expected {fd.get('shape')}"
    elif fd.get("reason") == "nonfinite":
        how = f"non-finite values in {fd.get('nonfinite_side')}, first at {fd.get('first_nonfinite_index')}"
    else:
        how = (
            f"max abs {fmt(fd.get('max_abs'))}, rms-rel {fmt(fd.get('rms_rel'))}, "
            f"{fd.get('mismatch_count')}/{fd.get('numel')} elements ({fmt(fd.get('mismatch_pct'))}%) out of tolerance, "
            f"worst at {fd.get('worst_index')} (actual {fmt6(fd.get('worst_actual'))}, expected {fmt6(fd.get('worst_expected'))}); "
            f"passes only with atol >= {fmt(fd.get('min_atol'))} (allowed {fmt(fd.get('atol'))})"
        )
    return f"first divergence: {where}, {layer}stage {fd['stage']}{row}: {how}"


def diverged(result: dict) -> bool:
    """Whether the result fails: a divergence, or a backend that crashed or hung (exit 1 either way)."""
    return (result.get("first_divergence") is not None or result.get("verdict") == "divergence"
            or result.get("verdict") in FAILURE_VERDICTS)


def _steps_text(n: int) -> str:
    return "no step" if n <= 0 else "step 0" if n == 1 else f"steps 0-{n - 1}"


def crash_line(crash: dict) -> str:
    """``CRASHED: tvm died with SIGSEGV at decode step 3 in kernel wkv5 after L1.att.wkv (steps 0-2
    compared against reference: no divergence)`` — one line for a backend that crashed or hung
    (parity/dumpers/worker.py); the last stage named is of the same step unless it says which."""
    name = crash.get("name") or crash.get("backend")
    step, last = crash.get("step"), crash.get("last_stage")
    step_name = None if step is None else "prefill" if step == 0 else f"decode step {step}"
    detail = ""
    if crash.get("kernel"):
        detail += f" in kernel {crash['kernel']}" + (f" (call {crash['kernel_call']} of the step)"
                                                     if crash.get("kernel_call") else "")
    if isinstance(last, dict):
        detail += f" after {last.get('stage')}" + ("" if last.get("step") == step else f" of step {last.get('step')}")
    if crash.get("kind") == "timed out":
        limit = crash.get("timeout_s")
        head = (f"TIMED OUT: {name} stuck at {step_name or 'its first step'}{detail}"
                + (f" for {limit:g} s" if isinstance(limit, (int, float)) else "") + "; stopped")
    else:
        where = "before its first step" if step is None else f"at {step_name}{detail}"
        head = (f"CRASHED: {name} died with {crash['signal']} {where}" if crash.get("signal")
                else f"CRASHED: {name} failed {where}: {crash.get('error')}")
    compared = crash.get("compared")
    n = crash.get("steps_completed") or 0
    if not isinstance(compared, dict) or n == 0:
        return f"{head} (no step finished, nothing compared)"
    fd = compared.get("first_divergence")
    found = "no divergence" if not isinstance(fd, dict) else \
        f"first divergence at {'prefill' if fd.get('step') == 0 else 'decode step ' + str(fd.get('step'))} {fd.get('stage')}"
    return f"{head} ({_steps_text(n)} compared against {compared.get('against')}: {found})"


def verdict_line(result: dict) -> str:
    """``no divergence (...)`` or ``DIVERGENCE: first divergence: ...``; tolerant of a hand-edited or
    older result (``parity report`` reads saved files), so a missing field never raises."""
    first = result.get("first_divergence")
    if result.get("verdict") in FAILURE_VERDICTS and isinstance(result.get("crash"), dict):
        return crash_line(result["crash"])
    if isinstance(first, dict) and result.get("verdict") == "drift beyond envelope":
        # No stage adds error out of tolerance; the propagated trajectory left its envelope.
        drift = result.get("drift") if isinstance(result.get("drift"), dict) else {}
        beyond = drift.get("first_beyond_envelope") if isinstance(drift.get("first_beyond_envelope"), dict) else first
        return (f"DRIFT BEYOND ENVELOPE: no stage adds error out of tolerance, but the propagated error reaches "
                f"{fmt(drift.get('envelope_fraction'))}x its envelope; first beyond it at step {beyond.get('step')} "
                f"{beyond.get('stage')} (max abs {fmt(beyond.get('max_abs'))})")
    if isinstance(first, dict):
        try:
            return "DIVERGENCE: " + describe_divergence(first)
        except KeyError:  # a result missing a field describe_divergence needs
            return f"DIVERGENCE: first divergence at step {first.get('step')}, stage {first.get('stage')}"
    if diverged(result):
        return "DIVERGENCE: the result names no first divergence; see its failing records"
    summary = result.get("summary") if isinstance(result.get("summary"), dict) else {}
    records = summary.get("records", len(result.get("records") or []))
    return f"no divergence ({records} records; worst logits error {fmt(summary.get('worst_logits_max_abs'))})"


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


def model_check_lines(result: dict) -> list[str]:
    """The own-error, drift and end-to-end lines under a run's table (rich markup in the drift status)."""
    lines = []
    own, drift, e2e = result.get("own_error"), result.get("drift"), result.get("end_to_end")
    run = result.get("run") if isinstance(result.get("run"), dict) else {}
    labels = run.get("backend_labels") if isinstance(run.get("backend_labels"), dict) else {}
    if own:
        lines.append(f"own error ({own['method']}, {labels.get(own['backend'], own['backend'])}): worst {own['worst_ratio']:.3g}x its allowance"
                     + (f" at step {own['worst_step']} {own['worst_stage']}" if own.get("worst_stage") else "")
                     + (f"; {len(own['not_replayable'])} (step, layer) pairs not replayable" if own.get("not_replayable") else ""))
    if drift:
        status = {"none": "none (every stage within its allowance)", "within": "within the envelope (a pass)",
                  "beyond": "[bold]BEYOND the envelope[/]"}[drift["status"]]
        lines.append(f"propagated drift: worst {drift['worst_ratio']:.3g}x the per-stage allowance"
                     + (f" at step {drift['worst_step']} {drift['worst_stage']}" if drift.get("worst_stage") else "")
                     + f", {drift['envelope_fraction']:.2g} of the envelope there ({drift['envelope']:g}x): {status}")
    if e2e and e2e.get("rows"):
        lines.append(f"end to end ({e2e['rows']} logits rows): KL max {fmt(e2e['kl_max'])} nats, mean {fmt(e2e['kl_mean'])}, "
                     f"p99.9 {fmt(e2e['kl_p999'])}; top-1 agreement {100 * e2e['top1_agreement']:.4g}% "
                     f"({e2e['top1_flips']} flips, {e2e['top1_ties']} near-ties); top-5 overlap "
                     f"{100 * e2e['top5_overlap']:.4g}%; min cosine {fmt(e2e['cosine_min'])}")
    return lines
