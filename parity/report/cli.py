"""``parity report SOURCE``: re-render a saved result (or re-compare saved dumps) as HTML, Markdown, CSV.

    parity report result.json --html report.html --markdown - --csv records.csv
    parity report dumps/                 # the --dump-dir of a run: reference + one other backend

SOURCE is a result JSON (``parity run --json`` / ``parity diff --json``), a directory holding
``result.json``, or the ``--dump-dir`` of a two-backend run (subdirectories ``reference`` and one
other dump), which is compared afresh with the reference as the yardstick. ``-`` as a PATH writes
to stdout; the verdict then goes to stderr so the output can be piped.

Exit codes as for every ``parity`` command: 0 no divergence, 1 divergence, 2 unreadable input
(a ``ParityError``, turned into one line by ``parity.cli.main`` or ``main`` below).

Wired into ``parity`` by ``parity/cli.py``: ``add_report_parser(sub)`` and ``"report": cmd_report``.
Also runnable alone: ``python -m parity.report.cli SOURCE ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from parity.errors import ParityError
from parity.report.verdict import console_width
from parity.report.verdict import diverged as _diverged
from parity.report.verdict import verdict_line as _verdict_line

__all__ = ["add_report_args", "add_report_parser", "cmd_report", "load_source", "main", "refuse_overwrite"]

# The same codes as parity.cli, which imports this module (arrows point from parity.cli down to here).
EXIT_OK, EXIT_DIVERGED, EXIT_USAGE = 0, 1, 2
STDOUT = "-"
_PARTIAL_MARK = ".partial-"  # an unfinished dump's staging directory (parity.dumpers.format)


def add_report_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``report`` options, shared by ``parity report`` and ``python -m parity.report.cli``."""
    p.add_argument("source", metavar="SOURCE",
                   help="result JSON (parity run/diff --json), a directory holding result.json, "
                        "or a --dump-dir with dumps 'reference' and one other backend (re-compared)")
    p.add_argument("--html", metavar="PATH", help="write the self-contained HTML report ('-': stdout)")
    p.add_argument("--markdown", metavar="PATH", help="write a short Markdown summary for a PR comment ('-': stdout)")
    p.add_argument("--csv", metavar="PATH", help="write one row per (step, stage) record as CSV ('-': stdout)")
    p.add_argument("--html-link", metavar="URL", default=None,
                   help="where the Markdown summary links the HTML report (default: the placeholder "
                        "{HTML_REPORT_URL}, for CI to substitute)")
    p.add_argument("--force", action="store_true", help="overwrite --html/--markdown/--csv files that exist")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the verdict line")
    return p


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on the ``parity`` command's subparsers; returns the new parser."""
    p = subparsers.add_parser(
        "report", help="re-render a saved result (or re-compare a --dump-dir) as HTML, Markdown or CSV",
        description="Re-render a saved comparison result offline, or re-compare the dumps of a --dump-dir.",
    )
    return add_report_args(p)


def load_source(source: str | os.PathLike) -> dict:
    """The comparison result that SOURCE holds or, for a --dump-dir, yields when re-compared."""
    from parity.report.frame import RESULT_FILE_NAME, load_result_dict

    path = Path(source)
    if not path.exists():
        raise ParityError(f"no such file or directory: {path}; give a result .json (parity run --json) "
                          "or the --dump-dir of a run")
    if path.is_file() or (path / RESULT_FILE_NAME).is_file():
        return load_result_dict(path)
    if (path / "manifest.json").is_file():
        raise ParityError(f"{path} is a single dump, and a report compares two; pass the directory that holds "
                          "both (the run's --dump-dir), or use `parity diff EXPECTED ACTUAL --html PATH`")
    dumps = sorted(
        d for d in path.iterdir()
        if d.is_dir() and _PARTIAL_MARK not in d.name and (d / "manifest.json").is_file()
    )
    others = [d for d in dumps if d.name != "reference"]
    if len(dumps) != 2 or len(others) != 1:
        found = ", ".join(d.name for d in dumps) or "none"
        raise ParityError(
            f"{path} holds neither {RESULT_FILE_NAME} nor exactly two dumps named 'reference' and one other "
            f"(dumps found: {found}); for other pairs use `parity diff EXPECTED ACTUAL`"
        )
    from parity.session import compare_dumps

    return compare_dumps(path / "reference", others[0])


def refuse_overwrite(paths, *, force: bool) -> None:
    """Refuse, in one line, to write over an existing file or non-empty directory unless ``force``.

    Every writer of user files (--json, --html, --markdown, --csv, --dump-dir, convert's DEST)
    checks its destinations here before any work starts, so a long run never ends by silently
    replacing a file the user meant to keep. '-' (stdout) and an empty directory are never refused.
    """
    if force:
        return
    for path in paths:
        if path is None or str(path) == STDOUT:
            continue
        path = Path(path)
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists() or path.is_symlink():
            kind = "a directory" if path.is_dir() else "a file"
            raise ParityError(f"{path} exists ({kind}); pass --force to overwrite it, or choose another path")


def _to_stdout(write) -> None:
    """Call ``write(stream)`` on stdout, tolerating a reader that stops early (``| head``)."""
    try:
        write(sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader's choice, not a fault of the result: the exit code stays the verdict. stdout
        # goes to devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _write_text(text: str, path: str, *, what: str) -> None:
    if path == STDOUT:
        _to_stdout(lambda stream: stream.write(text))
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ParityError(f"cannot write the {what} to {target}: {e.strerror or e}") from None


def cmd_report(args, console) -> int:
    """Render what was asked for; 0 when the result has no divergence, 1 when it has one."""
    outputs = {"html": args.html, "markdown": args.markdown, "csv": args.csv}
    to_stdout = [name for name, path in outputs.items() if path == STDOUT]
    if len(to_stdout) > 1:
        raise ParityError(f"only one output can go to stdout ('-'), got --{' and --'.join(to_stdout)}")
    if to_stdout:
        from rich.console import Console

        # stdout carries the document; anything else would corrupt it.
        console = Console(stderr=True, highlight=False, soft_wrap=True, width=console_width(sys.stderr))

    refuse_overwrite(outputs.values(), force=args.force)
    result = load_source(args.source)
    try:
        return _render(args, console, result, outputs=outputs)
    except (TypeError, KeyError, ValueError, AttributeError, IndexError, OverflowError) as e:
        # A result that loaded but holds fields of the wrong type (edited by hand, or by another tool).
        raise ParityError(f"{args.source}: a malformed parity result ({type(e).__name__}: {e}); "
                          "re-create it with parity run --json") from None


def _render(args, console, result, *, outputs) -> int:
    written: list[tuple[str, str]] = []
    if args.html:
        from parity.report.html import render_html, write_html

        if args.html == STDOUT:
            _write_text(render_html(result), STDOUT, what="HTML report")
        else:
            try:
                write_html(result, args.html)
            except OSError as e:
                raise ParityError(f"cannot write the HTML report to {args.html}: {e.strerror or e}") from None
        written.append(("HTML report", args.html))
    if args.markdown:
        from parity.report.markdown import HTML_LINK_PLACEHOLDER, render_markdown

        link = args.html_link if args.html_link is not None else HTML_LINK_PLACEHOLDER
        _write_text(render_markdown(result, html_link=link), args.markdown, what="Markdown summary")
        written.append(("Markdown summary", args.markdown))
    if args.csv:
        from parity.report.frame import records_to_csv

        if args.csv == STDOUT:
            _to_stdout(lambda stream: records_to_csv(result, stream))
        else:
            records_to_csv(result, args.csv)
        written.append(("CSV records", args.csv))

    if not written and not args.quiet:
        # Reading a result back only for its verdict is allowed, but usually the flag was forgotten.
        print("parity report: nothing written; add --html PATH, --markdown PATH or --csv PATH ('-' writes to stdout)",
              file=sys.stderr)
    if not args.quiet:
        for what, path in written:
            if path != STDOUT:
                console.print(f"{what}: {path}", markup=False)
    diverged = _diverged(result)
    style = None if args.quiet else ("bold red" if diverged else "green")
    console.print(_verdict_line(result), style=style, markup=False)
    return EXIT_DIVERGED if diverged else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m parity.report.cli``: the same command without the rest of ``parity``."""
    from rich.console import Console

    args = add_report_args(argparse.ArgumentParser(prog="parity report")).parse_args(argv)
    console = Console(highlight=False, soft_wrap=True, width=console_width(sys.stdout))
    try:
        return cmd_report(args, console)
    except ParityError as exc:
        print(f"parity: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
