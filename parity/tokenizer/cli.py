"""``parity tokenize``: our World tokenizer against the official one (or the first-miss mutant).

    parity tokenize (--text TEXT | --file PATH) [--against official|first-miss] [--json PATH] [--quiet]

Exit 0 when both tokenizations agree and our round trip holds, 1 otherwise; input errors raise
ParityError (the main CLI turns that into one line and exit 2). The lead wires this in with
``add_tokenize_parser(sub)`` and ``"tokenize": cmd_tokenize``.
"""

from __future__ import annotations

import json
from pathlib import Path

from parity.errors import ParityError

AGAINST = ("official", "first-miss")


def add_tokenize_parser(subparsers):
    p = subparsers.add_parser(
        "tokenize", help="encode text with our World tokenizer and the official one; show the first difference",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to encode")
    src.add_argument("--file", type=Path, metavar="PATH", help="read the text from a UTF-8 file (bytes kept as-is, CRLF included)")
    p.add_argument("--against", default="official", metavar="official|first-miss|MODULE:ATTR",
                   help="what to compare ours with: the official rwkv tokenizer (default), the deliberately wrong "
                        "first-miss mutant, or any other tokenizer as module:attribute or file.py:attribute "
                        "(a zero-argument factory returning an object with encode(str) -> list[int])")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the comparison as JSON (with the full id lists)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the verdict line")
    return p


def _load_tokenizer(spec: str):
    """Another tokenizer to check, named like a plug-in backend (see parity/dumpers/plugin.py)."""
    from parity.dumpers.plugin import import_plugin_module

    module, _, attribute = spec.rpartition(":")
    factory = getattr(import_plugin_module(module), attribute, None)
    if not callable(factory):
        raise ParityError(f"{module} has no callable {attribute!r}")
    try:
        tokenizer = factory()
    except Exception as exc:
        raise ParityError(f"tokenizer {spec}: {attribute}() raised {type(exc).__name__}: {exc}") from None
    if not callable(getattr(tokenizer, "encode", None)):
        raise ParityError(f"tokenizer {spec} has no encode(str) method")
    return tokenizer


def cmd_tokenize(args, console) -> int:
    from parity.tokenizer.check import OfficialWorldTokenizer, compare_tokenizers
    from parity.tokenizer.mutants import FirstMissTokenizer
    from parity.tokenizer.world import WorldTokenizer, read_utf8_file

    text = read_utf8_file(args.file, what="--file") if args.file is not None else args.text
    ours = WorldTokenizer()
    if args.against == "official":
        theirs = OfficialWorldTokenizer()
    elif args.against == "first-miss":
        theirs = FirstMissTokenizer(vocabulary=ours.vocab)
    elif ":" in args.against:
        theirs = _load_tokenizer(args.against)
    else:
        raise ParityError(f"--against must be one of {', '.join(AGAINST)} or module:attribute, got {args.against!r}")
    diff = compare_tokenizers(text, ours=ours, theirs=theirs)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(diff.to_dict(include_ids=True), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if not args.quiet:
            console.print(f"JSON result: {args.json}")
    if not args.quiet:
        console.print(diff.describe(), markup=False)
    if diff.passed:
        verdict = f"tokenizers agree ({len(diff.ours_ids)} tokens)"
    elif not diff.equal:
        verdict = f"TOKENIZERS DIFFER at token {diff.first_diff_token} (byte {diff.byte_offset})"
    else:
        verdict = f"ROUND TRIP FAILS at character {diff.round_trip_first_bad_char}"
    if not diff.round_trip_ok and not diff.equal:
        verdict += f"; round trip also fails at character {diff.round_trip_first_bad_char}"
    console.print(verdict, markup=False, style=None if args.quiet else ("green" if diff.passed else "bold red"))
    return 0 if diff.passed else 1
