"""``parity explain RESULT.json``, and the ``--explain`` option of ``parity run`` / ``parity bisect``.

    parity explain RESULT.json [--checkpoint PATH] [--hypothesis MODULE:ATTR ...] [--json PATH] [-q]

RESULT.json: a ``parity run --json`` result of a run that kept its dumps (``--dump-dir``). Exit 0
when the first divergence is explained (or there is none), 1 when it is not explained by any
known porting bug, 2 on bad input. ``--json`` writes the result with an ``explanation`` key, which
``parity report`` renders as the "likely cause".
Wired into ``parity`` by ``parity/cli.py``: ``add_explain_parser(sub)`` and ``"explain": cmd_explain``.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

from parity.errors import ParityError
from parity.report.verdict import as_result
from parity.results import RunResult

EXIT_OK, EXIT_UNEXPLAINED = 0, 1
TOP = 5  # hypotheses listed in the console; the JSON has them all


def add_explain_parser(subparsers):
    p = subparsers.add_parser(
        "explain", help="name the likely porting bug behind a result's first divergence by reproducing it",
    )
    p.add_argument("result", type=Path, help="a parity run --json result (run with --dump-dir, so the dumps are kept)")
    p.add_argument("--checkpoint", type=Path, help="the checkpoint the run used (default: the one the result names)")
    add_hypothesis_arg(p)
    p.add_argument("--json", metavar="PATH", type=Path, help="write the result with its explanation as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="only the one-line summary")


def add_hypothesis_arg(p) -> None:
    p.add_argument("--hypothesis", action="append", default=[], metavar="MODULE:ATTR",
                   help="add your own hypothesis (a parity.explain.hypotheses.Hypothesis); repeatable")


def _fmt(r) -> str:
    if r is None:
        return "-"
    return "inf" if math.isinf(r) else f"{r:.3g}x"


def print_explanation(console, explanation: dict, *, quiet: bool = False) -> None:
    console.print(f"likely cause: {explanation['summary']}", highlight=False, markup=False)
    if quiet:
        return
    if explanation.get("fix"):
        console.print(f"  fix: {explanation['fix']}", highlight=False, markup=False)
    for line in explanation.get("evidence") or []:
        console.print(f"  evidence: {line}", highlight=False, markup=False)
    hyps = explanation.get("hypotheses") or []
    if hyps:
        console.print("  hypotheses, best first (reproduction error: worst ratio to tolerance; <= 1 reproduces):", markup=False)
        for i, h in enumerate(hyps[:TOP], 1):
            detail = f" — {h['detail']}" if h.get("detail") else ""
            console.print(f"    {i}. {h['name']}: {_fmt(h['worst_ratio'])} (at the stage {_fmt(h['stage_ratio'])}){detail}",
                          highlight=False, markup=False)
        if len(hyps) > TOP:
            console.print(f"    ... {len(hyps) - TOP} more in the JSON", markup=False)
    clean = explanation.get("clean")
    if clean:
        console.print(f"  clean reference: {_fmt(clean['worst_ratio'])}", highlight=False, markup=False)
    for na in explanation.get("not_applicable") or []:
        console.print(f"  not applicable: {na['name']} ({na['reason']})", highlight=False, markup=False)


def _hypotheses(specs: list[str]):
    from parity.explain.engine import load_hypothesis

    return [load_hypothesis(s) for s in specs]


def cmd_explain(args, console) -> int:
    from parity.explain.engine import EXPLAINED, NOTHING, explain_result

    extra = _hypotheses(args.hypothesis)
    try:
        result = json.loads(args.result.read_text())
    except FileNotFoundError:
        raise ParityError(f"result file not found: {args.result}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParityError(f"{args.result} is not a parity result JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(result, dict) or "first_divergence" not in result:
        raise ParityError(f"{args.result} is not a parity run result (no first_divergence)")
    explanation = explain_result(as_result(result), checkpoint=args.checkpoint, extra_hypotheses=extra)
    if args.json:  # the file as it was read, plus its explanation
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "explanation": explanation}, indent=1, default=str) + "\n")
    print_explanation(console, explanation, quiet=args.quiet)
    return EXIT_OK if explanation["status"] in (EXPLAINED, NOTHING) else EXIT_UNEXPLAINED


# -- --explain on run and bisect -----------------------------------------------------------------
@contextlib.contextmanager
def kept_dumps(args):
    """The dump directory a run with --explain needs: --dump-dir, or a temporary one kept until
    the explanation is made."""
    if not getattr(args, "explain", False) or args.dump_dir is not None:
        yield args.dump_dir
        return
    with tempfile.TemporaryDirectory(prefix="parity-explain-") as tmp:
        yield Path(tmp)


def attach_explanation(result: RunResult | dict, *, checkpoint, hypotheses: list[str] = ()) -> dict | None:
    """``parity run --explain``: explain the result's first divergence (if any) in place: the typed
    result's ``explanation``, or the key of its JSON form."""
    from parity.explain.engine import explain_result

    typed = as_result(result)
    if typed.first_divergence is None:
        return None
    explanation = explain_result(typed, checkpoint=checkpoint, extra_hypotheses=_hypotheses(list(hypotheses)))
    if isinstance(result, dict):
        result["explanation"] = explanation
    else:
        result.explanation = explanation
    return explanation


def explain_bisect(checkpoint, *, backends: list[str], plan, found: dict, cache_dir=None, hypotheses=()) -> dict:
    """``parity bisect --explain``: one replayed run to record the suspect's tensors, explained at
    the stage the bisection found."""
    from parity.explain.engine import explain_dump
    from parity.session import run_parity

    with tempfile.TemporaryDirectory(prefix="parity-explain-") as tmp:
        out = run_parity(checkpoint, backends=backends, plan=plan, dump_dir=Path(tmp), cache_dir=cache_dir)
        if out.crashed:
            from parity.report.verdict import crash_line

            raise ParityError(crash_line(as_result(out.typed if out.typed is not None else out.result).crash))
        return explain_dump(checkpoint, candidate_dump=out.dumps[backends[1]], first_divergence=found,
                            extra_hypotheses=_hypotheses(list(hypotheses)))


def add_explain_flags(p) -> None:
    """``--explain`` (and ``--hypothesis``) on ``parity run`` and ``parity bisect``."""
    p.add_argument("--explain", action="store_true",
                   help="after the verdict, name the likely porting bug at the first divergence (parity explain)")
    add_hypothesis_arg(p)
