"""``--against SPEC``: the prompt a port builds, from whatever form the port keeps it in.

SPEC is one of (a prefix says which; without one, the form is guessed as listed):

- ``mlc:PATH``      an MLC conversation template JSON or an ``mlc-chat-config.json``
                    (guessed for a ``.json`` file holding an object);
- ``ids:PATH``      the token ids the port feeds: a JSON list, or integers separated by
                    whitespace or commas (guessed for a ``.json`` file holding a list, or ``*.ids``);
- ``file:PATH``     the prompt text, UTF-8, byte for byte (guessed for any other existing file);
- ``builder:MODULE:ATTR`` / ``builder:FILE.py:ATTR``  a callable, given the user's text (one
                    turn) or the list of ``{"role", "content"}`` messages (``--turns``), that
                    returns the prompt string or its token ids (guessed when MODULE is an
                    existing ``.py`` file or an importable module);
- ``text:STRING``   the prompt itself (anything else is taken as this).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from parity.errors import ParityError
from parity.prompt.conversation import Message, read_text_file
from parity.prompt.mlc import MLCConversation, load_conversation, looks_like_mlc

KINDS = ("text", "file", "ids", "builder", "mlc")
_BUILDER = re.compile(r"(?P<module>.+\.py|[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_]\w*)")


@dataclass(frozen=True)
class TheirPrompt:
    """What the port builds: its text, or its ids, or both (ids given + their decoded text)."""

    kind: str  # one of KINDS
    spec: str
    description: str  # one line for the report: what was read and how
    text: str | None = None  # None when the port gave ids only (decoded later, if they decode)
    ids: tuple[int, ...] | None = None  # None when the port gave text (encoded with our tokenizer)
    guessed: bool = False  # the kind was guessed (no prefix)
    conversation: MLCConversation | None = None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "spec": self.spec, "description": self.description, "guessed": self.guessed,
            "mlc_template": self.conversation.to_dict() if self.conversation is not None else None,
        }


def parse_ids_text(raw: str, *, where: str) -> tuple[int, ...]:
    """Token ids from a JSON list or from integers separated by whitespace / commas."""
    stripped = raw.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ParityError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        return _ids_list(data, where=where)
    words = [w for w in re.split(r"[\s,]+", stripped) if w]
    bad = next((w for w in words if not w.isdigit()), None)
    if bad is not None:
        raise ParityError(f"{where}: {bad[:30]!r} is not a token id (non-negative integer)")
    if not words:
        raise ParityError(f"{where} holds no token ids")
    return tuple(int(w) for w in words)


def _ids_list(data, *, where: str) -> tuple[int, ...]:
    # type() is int, not isinstance: JSON true is not a token id.
    if not isinstance(data, list) or not data or not all(type(i) is int and i >= 0 for i in data):
        raise ParityError(f"{where} must be a non-empty list of non-negative integer token ids")
    return tuple(data)


def _builder_result(value, *, spec: str) -> tuple[str | None, tuple[int, ...] | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, (list, tuple)) and value and all(type(i) is int and i >= 0 for i in value):
        return None, tuple(value)
    raise ParityError(f"builder {spec} must return the prompt string or a non-empty list of token ids, "
                      f"got {type(value).__name__}")


def _call_builder(spec: str, *, messages: tuple[Message, ...]) -> TheirPrompt:
    from parity.dumpers.plugin import import_plugin_module

    m = _BUILDER.fullmatch(spec)
    if m is None:
        raise ParityError(f"builder {spec!r} must be MODULE:ATTRIBUTE or FILE.py:ATTRIBUTE")
    module, attr = m.group("module"), m.group("attr")
    fn = getattr(import_plugin_module(module), attr, None)
    if not callable(fn):
        raise ParityError(f"{module} has no callable {attr!r}")
    one_turn = len(messages) == 1 and messages[0].role == "user"
    arg = messages[0].content if one_turn else [msg.to_dict() for msg in messages]
    try:
        value = fn(arg)
    except ParityError:
        raise
    except Exception as exc:  # the port's builder failed: say whose bug, in one line
        raise ParityError(f"builder {spec}: {attr}() raised {type(exc).__name__}: {exc}") from None
    text, ids = _builder_result(value, spec=spec)
    given = "the user's text" if one_turn else f"{len(messages)} messages"
    return TheirPrompt(kind="builder", spec=spec, text=text, ids=ids,
                       description=f"builder {spec} called with {given}, returned {'a string' if ids is None else 'token ids'}")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a literal prompt is often no valid path: too long, NUL, ...
        return False


def _importable(module: str) -> bool:
    if module.endswith(".py"):
        return _is_file(module)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _from_mlc(path: str, *, messages, data=None, guessed: bool = False, spec: str) -> TheirPrompt:
    conv = load_conversation(path, data=data)
    name = f" {conv.name!r}" if conv.name else ""
    return TheirPrompt(kind="mlc", spec=spec, text=conv.render(messages), ids=None, guessed=guessed, conversation=conv,
                       description=f"MLC conversation template{name} from {path}, rendered for {len(messages)} message(s)")


def resolve_against(spec: str, *, messages: tuple[Message, ...]) -> TheirPrompt:
    """The port's prompt for ``messages`` as SPEC gives it (see the module docstring)."""
    if not isinstance(spec, str) or spec == "":
        raise ParityError("--against needs a SPEC: text:STRING, file:PATH, ids:PATH, builder:MODULE:ATTR or mlc:PATH")
    kind, _, rest = spec.partition(":")
    if kind in KINDS and _:
        if kind == "text":
            return TheirPrompt(kind="text", spec=spec, text=rest, description=f"literal prompt ({len(rest)} characters)")
        if kind == "file":
            return TheirPrompt(kind="file", spec=spec, text=read_text_file(rest, what="prompt file"),
                               description=f"prompt text file {rest}")
        if kind == "ids":
            ids = parse_ids_text(read_text_file(rest, what="ids file"), where=f"ids file {rest}")
            return TheirPrompt(kind="ids", spec=spec, ids=ids, description=f"token ids file {rest} ({len(ids)} ids)")
        if kind == "builder":
            return _call_builder(rest, messages=messages)
        return _from_mlc(rest, messages=messages, spec=spec)

    # No prefix: guess, and say so in the description.
    path = Path(spec)
    if "\n" not in spec and _is_file(spec):
        if path.suffix == ".json":
            raw = read_text_file(path, what="--against file")
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ParityError(f"--against {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
            if isinstance(data, list):
                ids = _ids_list(data, where=f"ids file {path}")
                return TheirPrompt(kind="ids", spec=spec, ids=ids, guessed=True,
                                   description=f"token ids file {path} ({len(ids)} ids)")
            if looks_like_mlc(data):
                return _from_mlc(str(path), messages=messages, data=data, guessed=True, spec=spec)
            raise ParityError(f"--against {path}: a JSON file must hold a list of token ids or an MLC conversation "
                              "template (an object with 'roles' and 'seps', or an mlc-chat-config.json with 'conv_template')")
        if path.suffix == ".ids":
            ids = parse_ids_text(read_text_file(path, what="ids file"), where=f"ids file {path}")
            return TheirPrompt(kind="ids", spec=spec, ids=ids, guessed=True, description=f"token ids file {path} ({len(ids)} ids)")
        return TheirPrompt(kind="file", spec=spec, text=read_text_file(path, what="prompt file"), guessed=True,
                           description=f"prompt text file {path}")
    m = _BUILDER.fullmatch(spec)
    if m is not None and _importable(m.group("module")):
        return dataclasses.replace(_call_builder(spec, messages=messages), guessed=True)
    return TheirPrompt(kind="text", spec=spec, text=spec, guessed=True,
                       description=f"literal prompt ({len(spec)} characters; no file or builder by that name)")
