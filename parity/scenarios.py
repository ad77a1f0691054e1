"""Text scenarios: a prompt as a user would type it, turned into the ``RunPlan`` every backend runs.

A scenario is a small JSON file (``fixtures/scenarios/*.json``)::

    {"name": "chat-hello", "template": "chatrwkv", "text": "Hi! What is RWKV?",
     "decode_steps": 4, "greedy_steps": 8, "checkpoint": "fixtures/rwkv5_2-L4-C128-H2.pth"}

The prompt is exactly one of ``text``, ``prompt_file`` (relative to the scenario file) or ``ids``.
Text goes through a chat template, then the World tokenizer, then ``fit_ids``.

Vocabulary folding: the World tokenizer emits ids up to 65529 while the bundled fixtures have
V = 1024 or 512. ``fit_ids`` maps each id to ``id % V`` so a text prompt can still drive a fixture;
the folded ids are no longer that text, so every result that used them carries
``"vocab_folded": true`` and a warning line. A real model (V = 65536) is never folded.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.dumpers.backends import RunPlan
from parity.errors import ParityError
from parity.tokenizer.world import read_utf8_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIO_DIR = REPO_ROOT / "fixtures" / "scenarios"
DEFAULT_IDS = "ones:10"  # what ``parity run`` feeds when no prompt is given at all
DEFAULT_DECODE_STEPS = 4

TEMPLATES: dict[str, str] = {
    "chatrwkv": "User: {text}\n\nAssistant:",
    "raw": "{text}",
    "instruct": "Instruction: {text}\n\nResponse:",
    "question": "Question: {text}\n\nAnswer:",
}


def _chatrwkv_message(text: str) -> str:
    # ChatRWKV's API_DEMO_CHAT.py: CRLF -> LF on the context, msg.strip(), runs of newlines -> one
    # (a blank line inside the message would read as the end of the user's turn).
    return re.sub(r"\n+", "\n", text.replace("\r\n", "\n").strip())


def apply_template(name: str, text: str) -> str:
    """The prompt text as the named chat template frames it.

    ``chatrwkv`` reproduces ChatRWKV's chat: it strips the message (and collapses runs of
    newlines, CRLF to LF) before framing it, and the template ends at ``"Assistant:"`` with NO
    trailing space — the model writes the space itself as part of its first token, and a trailing
    space in the prompt tokenizes differently (a lone " " token, then an unusual word token), so
    the model would be run on a context it was never trained on. ``instruct`` and ``question``
    strip the text, as ChatRWKV's instruction / QA demos do. ``raw`` keeps it byte for byte.
    """
    if name not in TEMPLATES:
        raise ParityError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}")
    if not isinstance(text, str):
        raise ParityError(f"template text must be a string, got {type(text).__name__}")
    if name == "chatrwkv":
        text = _chatrwkv_message(text)
    elif name != "raw":
        text = text.strip()
    # replace, not str.format: a prompt may itself contain braces.
    return TEMPLATES[name].replace("{text}", text)


def fit_ids(ids, vocab_size: int) -> tuple[int, ...]:
    """Tokenizer ids mapped into a model's vocabulary as ``id % vocab_size``.

    Deterministic and documented, so two backends fed the same text get the same ids. Only the
    small test fixtures need it; callers must record that it changed something (see
    ``fold_warning``), because folded ids no longer spell the text.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ParityError(f"vocabulary size must be a positive integer, got {vocab_size!r}")
    return tuple(int(i) % vocab_size for i in ids)


def fold_warning(*, tokenizer_ids, vocab_size: int) -> str:
    """The one line every folded result carries."""
    changed = sum(1 for i in tokenizer_ids if i >= vocab_size)
    return (
        f"vocab folded: the model has {vocab_size} token ids but the tokenizer gave ids up to "
        f"{max(tokenizer_ids)}; {changed} of {len(tokenizer_ids)} ids were mapped to id % {vocab_size}, "
        "so the backends are compared on ids that no longer spell the text"
    )


@dataclass(frozen=True)
class Scenario:
    """One prompt to run: text (templated + tokenized) or raw ids, plus how far to run it."""

    name: str
    text: str | None = None  # the user's text before templating (read from prompt_file if given)
    ids: tuple[int, ...] | None = None  # model ids as given; never templated or folded
    template: str = "raw"
    decode_steps: int = DEFAULT_DECODE_STEPS  # teacher-forced decode steps of the parity run
    greedy_steps: int = 0  # tokens of the greedy-decode comparison (0: none)
    checkpoint: Path | None = None  # absolute once loaded (the file gives it relative to the repo root)
    description: str = ""
    prompt_file: Path | None = None  # where ``text`` came from, kept for the record
    source: Path | None = None  # the scenario file itself

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ParityError("a scenario needs a non-empty string 'name'")
        if (self.text is None) == (self.ids is None):
            raise ParityError("give exactly one prompt: 'text', 'prompt_file' or 'ids'")
        if self.text is not None and not isinstance(self.text, str):
            raise ParityError(f"'text' must be a string, got {type(self.text).__name__}")
        if self.ids is not None:
            if not self.ids or not all(type(i) is int and i >= 0 for i in self.ids):
                raise ParityError("'ids' must be a non-empty list of non-negative integers")
            if self.template != "raw":
                raise ParityError(f"template {self.template!r} applies to text; an 'ids' scenario takes no template")
        if self.template not in TEMPLATES:
            raise ParityError(f"unknown template {self.template!r}; known templates: {', '.join(TEMPLATES)}")
        for key in ("decode_steps", "greedy_steps"):
            value = getattr(self, key)
            if type(value) is not int or value < 0:  # type(), not isinstance: JSON true is not a count
                raise ParityError(f"'{key}' must be an integer >= 0, got {value!r}")
        if not isinstance(self.description, str):
            raise ParityError("'description' must be a string")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": str(self.source) if self.source else None,
            "description": self.description,
            "prompt_file": str(self.prompt_file) if self.prompt_file else None,
        }


_FIELDS = ("name", "text", "prompt_file", "ids", "template", "decode_steps", "greedy_steps", "checkpoint", "description")


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario JSON file, or a bundled one by name (``chat-hello`` is
    fixtures/scenarios/chat-hello.json); any problem is one ParityError line naming the file."""
    path = Path(path)
    bundled = SCENARIO_DIR / f"{path.name}.json"
    if not path.exists() and path.name == str(path) and path.suffix != ".json":
        if not bundled.is_file():
            names = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.json")))
            raise ParityError(f"no scenario file {path} and no bundled scenario of that name; bundled: {names}")
        path = bundled
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParityError(f"cannot read scenario {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ParityError(f"scenario {path} is not valid UTF-8") from None
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ParityError(f"scenario {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ParityError(f"scenario {path} must hold a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ParityError(f"scenario {path}: unknown field {unknown[0]!r}; known fields: {', '.join(_FIELDS)}")
    if "name" not in data:
        raise ParityError(f"scenario {path}: missing the 'name' field")
    sources = [k for k in ("text", "prompt_file", "ids") if k in data]
    if len(sources) != 1:
        got = ", ".join(sources) if sources else "none"
        raise ParityError(f"scenario {path}: give exactly one of 'text', 'prompt_file', 'ids' (got {got})")
    for key in ("prompt_file", "checkpoint", "template"):
        if key in data and not isinstance(data[key], str):
            raise ParityError(f"scenario {path}: '{key}' must be a string, got {type(data[key]).__name__}")
    if "ids" in data and not isinstance(data["ids"], list):
        raise ParityError(f"scenario {path}: 'ids' must be a list of integers")

    kwargs = {k: v for k, v in data.items() if k not in ("prompt_file", "ids", "checkpoint")}
    kwargs["source"] = path
    if "prompt_file" in data:
        prompt = path.parent / data["prompt_file"]
        kwargs["text"] = read_utf8_file(prompt, what=f"scenario {path}: prompt file")
        kwargs["prompt_file"] = prompt
    if "ids" in data:
        kwargs["ids"] = tuple(data["ids"])
    if "checkpoint" in data:
        kwargs["checkpoint"] = REPO_ROOT / data["checkpoint"]
    try:
        return Scenario(**kwargs)
    except ParityError as exc:
        raise ParityError(f"scenario {path}: {exc}") from None


def scenario_plan(scenario: Scenario, *, tokenizer=None, vocab_size: int, decode_ids=None) -> tuple[RunPlan, dict]:
    """The run plan of ``scenario`` for a model of ``vocab_size`` ids, and what produced it.

    ``info`` (JSON-able) has the scenario name, the template, the text after templating, the
    tokenizer's ids, the model's ids, ``vocab_folded``, the greedy step count and ``warnings``
    (lines a CLI should print). ``tokenizer`` defaults to the World tokenizer for text prompts.
    ``decode_ids`` replaces the seeded default decode tokens.
    """
    from parity.session import default_decode_ids

    warnings: list[str] = []
    if scenario.ids is not None:
        bad = next((i for i in scenario.ids if i >= vocab_size), None)
        if bad is not None:
            # Given ids are the user's exact intent: fail rather than fold them silently.
            where = f"scenario {scenario.name!r}: " if scenario.source is not None else ""  # else the user's --ids
            raise ParityError(f"{where}token id {bad} is outside the model's vocabulary [0, {vocab_size})")
        text = tokenizer_ids = None
        model_ids = tuple(scenario.ids)
        folded = False
    else:
        if tokenizer is None:
            from parity.tokenizer import WorldTokenizer

            tokenizer = WorldTokenizer()
        text = apply_template(scenario.template, scenario.text)
        tokenizer_ids = tuple(tokenizer.encode(text))
        if not tokenizer_ids:
            raise ParityError(f"scenario {scenario.name!r}: the prompt is empty after the {scenario.template!r} template")
        model_ids = fit_ids(tokenizer_ids, vocab_size)
        folded = model_ids != tokenizer_ids
        if folded:
            warnings.append(fold_warning(tokenizer_ids=tokenizer_ids, vocab_size=vocab_size))
    if decode_ids is None:
        decode_ids = default_decode_ids(steps=scenario.decode_steps, vocab_size=vocab_size)
    plan = RunPlan(prefill_ids=model_ids, decode_ids=tuple(decode_ids))
    plan.check(vocab_size=vocab_size)
    info = {
        "scenario": scenario.to_dict() if scenario.source else None,
        "template": scenario.template if text is not None else None,
        "text": text,
        "tokenizer_ids": list(tokenizer_ids) if tokenizer_ids is not None else None,
        "model_ids": list(model_ids),
        "vocab_folded": folded,
        "greedy_steps": scenario.greedy_steps,
        "warnings": warnings,
    }
    return plan, info


# -- CLI glue (``parity run``) --------------------------------------------------------------------
def add_text_args(parser: argparse.ArgumentParser) -> None:
    """``--text | --prompt-file | --scenario``, ``--template``, ``--greedy`` on the ``run`` parser.

    Call it after ``--ids`` / ``--decode-steps`` exist: it resets their defaults to None so
    ``plan_from_args`` can tell "not given" (a scenario's own value applies, or the usual
    ``ones:10`` / 4) from "given" (the flag wins over the scenario).
    """
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--text", help="prompt text (tokenized with the World tokenizer; see --template)")
    src.add_argument("--prompt-file", type=Path, metavar="PATH", help="read the prompt text from a UTF-8 file, bytes kept as-is")
    src.add_argument("--scenario", type=Path, metavar="FILE|NAME",
                     help="a scenario JSON file, or a bundled one by name (chat-hello: fixtures/scenarios/chat-hello.json)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="chat template for --text/--prompt-file (default raw; chatrwkv = 'User: TEXT\\n\\nAssistant:')")
    parser.add_argument("--greedy", type=int, metavar="N", default=None,
                        help="also decode N tokens greedily on each backend, each feeding back its own argmax")
    parser.set_defaults(ids=None, decode_steps=None)


def resolve_checkpoint(args) -> Path:
    """``--checkpoint`` if given, else the scenario's ``checkpoint``."""
    if getattr(args, "checkpoint", None) is not None:
        return Path(args.checkpoint)
    if getattr(args, "scenario", None) is not None:
        scenario = load_scenario(args.scenario)
        if scenario.checkpoint is not None:
            return scenario.checkpoint
        raise ParityError(f"scenario {args.scenario} names no checkpoint; pass --checkpoint PATH")
    raise ParityError("no checkpoint: pass --checkpoint PATH (or a --scenario that names one)")


def plan_from_args(args, checkpoint) -> tuple[RunPlan, dict]:
    """The ``RunPlan`` (and info, see ``scenario_plan``) that ``parity run``'s arguments ask for."""
    from parity.session import parse_ids

    vocab_size = checkpoint.config.vocab_size
    text_source = args.text is not None or args.prompt_file is not None or args.scenario is not None
    if args.ids is not None and text_source:
        raise ParityError("--ids cannot be combined with --text, --prompt-file or --scenario; give one prompt")
    if args.decode_steps is not None and args.decode_steps < 0:
        raise ParityError("--decode-steps must be >= 0")
    if args.greedy is not None and args.greedy < 0:
        raise ParityError("--greedy must be >= 0")
    overrides = {}
    if args.decode_steps is not None:
        overrides["decode_steps"] = args.decode_steps
    if args.greedy is not None:
        overrides["greedy_steps"] = args.greedy
    if args.template is not None:
        if not text_source:
            raise ParityError("--template applies to --text, --prompt-file or --scenario, not to --ids")
        overrides["template"] = args.template

    if args.scenario is not None:
        base = load_scenario(args.scenario)
        fields = {k: getattr(base, k) for k in _FIELDS if k not in ("prompt_file", "checkpoint")}
        fields.update(prompt_file=base.prompt_file, checkpoint=base.checkpoint, source=base.source)
        try:
            scenario = Scenario(**{**fields, **overrides})
        except ParityError as exc:
            raise ParityError(f"scenario {args.scenario} with the command-line flags: {exc}") from None
    elif args.text is not None or args.prompt_file is not None:
        text = args.text if args.text is not None else read_utf8_file(args.prompt_file, what="--prompt-file")
        scenario = Scenario(name="command line", text=text, prompt_file=args.prompt_file, **overrides)
    else:
        ids = parse_ids(args.ids or DEFAULT_IDS, vocab_size=vocab_size)
        scenario = Scenario(name="command line", ids=ids, **overrides)

    decode_ids = parse_ids(args.decode_ids, vocab_size=vocab_size) if getattr(args, "decode_ids", None) else None
    return scenario_plan(scenario, vocab_size=vocab_size, decode_ids=decode_ids)


def run_keys(info: dict) -> dict:
    """What ``parity run`` adds to the result's ``run`` block (greedy comes separately)."""
    return {k: info[k] for k in ("scenario", "template", "text", "tokenizer_ids", "model_ids", "vocab_folded", "warnings")}
