"""A conversation to check, and the chat prompt WE build from it.

A conversation is a list of messages, each ``{"role": "system" | "user" | "assistant",
"content": "..."}`` (the shape of an OpenAI / MLC chat request). ``--text`` is the one-message
conversation ``[{"role": "user", "content": TEXT}]``; ``--turns FILE`` reads a longer one, so the
separators between turns and the system prompt get checked too, not just the last line.

Our chat prompt for a conversation, template ``chatrwkv`` (ChatRWKV's chat format)::

    System: SYSTEM\n\nUser: Q1\n\nAssistant: A1\n\nUser: Q2\n\nAssistant:

Every message is cleaned as ``parity.scenarios.apply_template`` cleans a chat message (stripped,
CRLF to LF, runs of newlines to one), because a blank line inside a message would read as the end
of its turn; a turn ends with one blank line; the prompt ends at "Assistant:" with no trailing
space (scenarios.py says why). The "System:" role is our convention for a system prompt (the role
name RWKV World chat data uses); a port that puts the system prompt elsewhere, e.g. as a canned
first "User: hi / Assistant: ..." exchange, differs from it and this check says where.
The other templates (``raw``, ``instruct``, ``question``) frame one user message only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from parity.errors import ParityError
from parity.scenarios import TEMPLATES, _chatrwkv_message, apply_template
from parity.tokenizer.world import read_utf8_file

ROLES = ("system", "user", "assistant")
CHATRWKV_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHATRWKV_TURN_END = "\n\n"  # also where ChatRWKV stops a reply: the blank line that ends a turn


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def read_text_file(path, *, what: str) -> str:
    """``read_utf8_file`` that also turns a NUL in the path (a ValueError from os) into a ParityError."""
    if "\x00" in str(path):
        raise ParityError(f"cannot read {what} {str(path)!r}: a path cannot contain a NUL character")
    return read_utf8_file(path, what=what)


def single_turn(text: str) -> tuple[Message, ...]:
    if not isinstance(text, str):
        raise ParityError(f"the message must be a string, got {type(text).__name__}")
    return (Message(role="user", content=text),)


def check_conversation(messages, *, where: str = "conversation") -> tuple[Message, ...]:
    """Validate the order: at most one system message (first), then user/assistant, ending with a user's."""
    messages = tuple(messages)
    if not messages:
        raise ParityError(f"{where}: no messages")
    for k, m in enumerate(messages):
        if m.role == "system" and k != 0:
            raise ParityError(f"{where}: message {k} is a system message; only the first message may be one")
    if all(m.role == "system" for m in messages):
        raise ParityError(f"{where}: no user message")
    if messages[-1].role != "user":
        raise ParityError(f"{where}: the last message must be the user's (the prompt asks for the assistant's reply), "
                          f"got {messages[-1].role!r}")
    return messages


def parse_turns(data, *, where: str) -> tuple[Message, ...]:
    if not isinstance(data, list):
        raise ParityError(f"{where} must hold a JSON list of {{\"role\": ..., \"content\": ...}} messages, "
                          f"got {type(data).__name__}")
    out = []
    for k, item in enumerate(data):
        if not isinstance(item, dict):
            raise ParityError(f"{where}: message {k} must be an object with 'role' and 'content', got {type(item).__name__}")
        unknown = sorted(set(item) - {"role", "content"})
        if unknown:
            raise ParityError(f"{where}: message {k} has unknown field {unknown[0]!r}; fields: role, content")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ParityError(f"{where}: message {k} has role {role!r}; roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ParityError(f"{where}: message {k} needs a string 'content', got {type(content).__name__}")
        out.append(Message(role=role, content=content))
    return check_conversation(out, where=where)


def load_turns(path: str | Path) -> tuple[Message, ...]:
    """``--turns FILE``: a JSON list of messages."""
    raw = read_text_file(path, what="--turns file")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ParityError(f"--turns file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return parse_turns(data, where=f"--turns file {path}")


def render_parts(template: str, messages) -> list[tuple[str, str]]:
    """Our prompt as (what this part is, its text) pairs; joined, they are ``render_ours``.

    The labels let a report say where a difference falls: a role name, a message, the blank line
    after a turn, or the reply slot at the end.
    """
    messages = check_conversation(messages)
    if template not in TEMPLATES:
        raise ParityError(f"unknown template {template!r}; known templates: {', '.join(TEMPLATES)}")
    if template != "chatrwkv":
        if len(messages) != 1:
            raise ParityError(f"template {template!r} frames one user message; a conversation with several turns "
                              "needs --template chatrwkv")
        return [(f"the {template} template around message 0 (user)", apply_template(template, messages[0].content))]
    parts = []
    for k, m in enumerate(messages):
        content = _chatrwkv_message(m.content)
        if not content:
            # "User: \n\n" would put a trailing space and an empty turn in front of the model.
            raise ParityError(f"message {k} ({m.role}) is empty after stripping")
        name = CHATRWKV_ROLE_NAMES[m.role]
        parts += [(f"the role name of message {k} ({m.role})", f"{name}: "),
                  (f"message {k} ({m.role})", content),
                  (f"the blank line that ends message {k} ({m.role})", CHATRWKV_TURN_END)]
    parts.append(("the reply slot 'Assistant:' at the end", CHATRWKV_ROLE_NAMES["assistant"] + ":"))
    return parts


def render_ours(template: str, messages) -> str:
    """Our prompt for the conversation under ``template`` (see the module docstring)."""
    return "".join(text for _, text in render_parts(template, messages))


def part_at(parts: list[tuple[str, str]], index: int) -> str:
    """Where character ``index`` of our prompt falls: "in <the part's label>", or past its end."""
    pos = 0
    for label, text in parts:
        if index < pos + len(text):
            return f"in {label}"
        pos += len(text)
    return "past the end of our prompt"
