"""``parity prompt``: check the chat prompt a port builds against ours.

    parity prompt (--text TEXT | --text-file PATH | --turns FILE) [--template chatrwkv] --against SPEC
                  [--checkpoint PATH [--greedy N]] [--json PATH] [--markdown PATH|-] [-q]

SPEC: see ``parity.prompt.against``. Exit 0 when the port's prompt is ours (the same characters
and the same World tokenizer ids), 1 when it differs, 2 on bad input (a ParityError, one line).
The model comparison (``--checkpoint``) only explains a difference; it never changes the exit code.
Wired into ``parity`` by ``parity/cli.py``: ``add_prompt_parser(sub)`` and ``"prompt": cmd_prompt``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from parity.errors import ParityError

STDOUT = "-"


def add_prompt_parser(subparsers):
    p = subparsers.add_parser(
        "prompt", help="check a port's chat prompt against ours: first difference in characters and tokens, "
                       "and what it does to the model",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the user's message (one turn)")
    src.add_argument("--text-file", type=Path, metavar="PATH", help="read the user's message from a UTF-8 file")
    src.add_argument("--turns", type=Path, metavar="FILE",
                     help='a conversation: JSON list of {"role": "system"|"user"|"assistant", "content": ...}, '
                          "ending with a user message")
    from parity.scenarios import TEMPLATES

    p.add_argument("--template", choices=sorted(TEMPLATES), default="chatrwkv",
                   help="our template (default chatrwkv: 'User: TEXT\\n\\nAssistant:', no trailing space)")
    p.add_argument("--against", required=True, metavar="SPEC",
                   help="the port's prompt: text:STRING | file:PATH | ids:PATH | builder:MODULE:ATTR (or FILE.py:ATTR) "
                        "| mlc:PATH (a conversation template JSON or mlc-chat-config.json); without a prefix the kind "
                        "is guessed from what exists")
    p.add_argument("--checkpoint", type=Path, help="also run the reference on both prompts: next-token KL, top-1, "
                                                   "top-5 and the greedy continuations")
    p.add_argument("--greedy", type=int, default=None, metavar="N",
                   help="greedy tokens to decode from each prompt with --checkpoint (default 8)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the check as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a Markdown summary, e.g. for a PR comment ('-': stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the verdict line")
    return p


def run_prompt_check(args):
    """The ``PromptCheck`` that the parsed arguments ask for."""
    from parity.prompt.against import resolve_against
    from parity.prompt.check import compare_prompts
    from parity.prompt.conversation import load_turns, read_text_file, single_turn
    from parity.tokenizer import WorldTokenizer

    if args.greedy is not None and args.checkpoint is None:
        raise ParityError("--greedy needs --checkpoint (it decodes from both prompts with the reference)")
    if args.turns is not None:
        messages = load_turns(args.turns)
    elif args.text_file is not None:
        messages = single_turn(read_text_file(args.text_file, what="--text-file"))
    else:
        messages = single_turn(args.text)
    tokenizer = WorldTokenizer()
    theirs = resolve_against(args.against, messages=messages)
    check = compare_prompts(template=args.template, messages=messages, theirs=theirs, tokenizer=tokenizer)
    if args.checkpoint is not None:
        from parity.prompt.effect import DEFAULT_GREEDY_STEPS, model_effect

        effect = model_effect(args.checkpoint, ours_ids=check.ours_ids, theirs_ids=check.theirs_ids, tokenizer=tokenizer,
                              greedy_steps=args.greedy if args.greedy is not None else DEFAULT_GREEDY_STEPS)
        check = dataclasses.replace(check, model=effect)
    return check


def _write(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def cmd_prompt(args, console) -> int:
    from parity.prompt.render import describe_lines, markdown

    check = run_prompt_check(args)
    if check.model is not None:
        for line in check.model.warnings:
            print(f"parity: warning: {line}", file=sys.stderr)
    to_stdout = args.markdown == STDOUT
    if args.json is not None:
        _write(args.json, json.dumps(check.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    if args.markdown is not None and not to_stdout:
        _write(args.markdown, markdown(check))
    if to_stdout:
        sys.stdout.write(markdown(check))
    elif not args.quiet:
        for line in describe_lines(check):
            console.print(line, markup=False)
    # With the Markdown on stdout the verdict goes to stderr, so the Markdown can be piped.
    style = None if args.quiet else ("green" if check.passed else "bold red")
    if to_stdout:
        print(check.verdict(), file=sys.stderr)
    else:
        console.print(check.verdict(), markup=False, style=style)
    return 0 if check.passed else 1
