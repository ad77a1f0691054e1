"""MLC-LLM conversation templates read as data, rendered the way MLC renders them.

MLC ships a model's chat format as data: the ``conv_template`` object of ``mlc-chat-config.json``
(or a template JSON of the same fields). How MLC's conversation protocol
(``mlc_llm/protocol/conversation_protocol.py``, ``Conversation.as_prompt``) and its chat
request handling (``serve/engine_base.py``) join them, as facts; the code below is ours:

- a ``system`` message of the request replaces ``system_message``; every other message is
  appended as (role, content), then ("assistant", None) for the reply to be written;
- the system part is ``system_template`` with ``{system_message}`` replaced; it is emitted only
  when non-empty, and NO separator follows it (a template must carry its own);
- a message with content is ``roles[role] + role_content_sep + role_templates[role] (with
  {user_message} / {assistant_message} replaced) + sep``, where sep is ``seps[0]`` after a user
  message and ``seps[-1]`` after an assistant's (one sep: used after both);
  with ``add_role_after_system_message: false`` the first message after a system part gets no
  role prefix;
- the empty assistant slot at the end is ``roles["assistant"] + role_empty_sep``;
- ``{function_string}`` placeholders are replaced by ``function_string`` (last one) or removed;
- ``system_prefix_token_ids``, when given, are prepended to the tokenized prompt;
- ``stop_str`` / ``stop_token_ids`` end generation (they do not change the prompt).

Message content is used as given: MLC strips nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from parity.errors import ParityError

SYSTEM_PLACEHOLDER = "{system_message}"
FUNCTION_PLACEHOLDER = "{function_string}"
ROLE_PLACEHOLDERS = {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"}
_STR_FIELDS = ("name", "system_template", "system_message", "role_content_sep", "role_empty_sep", "function_string")
_KNOWN_FIELDS = set(_STR_FIELDS) | {
    "system_prefix_token_ids", "add_role_after_system_message", "roles", "role_templates", "messages", "seps",
    "stop_str", "stop_token_ids", "use_function_calling",
}


@dataclass(frozen=True)
class MLCConversation:
    """The fields of an MLC conversation template that shape the prompt (defaults as MLC's)."""

    roles: dict[str, str]  # role key ("user", "assistant") -> the name written in the prompt
    seps: tuple[str, ...]  # 1 or 2: after a user message, after an assistant message
    name: str | None = None
    system_template: str = SYSTEM_PLACEHOLDER
    system_message: str = ""
    system_prefix_token_ids: tuple[int, ...] | None = None
    add_role_after_system_message: bool = True
    role_templates: dict[str, str] = field(default_factory=lambda: dict(ROLE_PLACEHOLDERS))
    role_content_sep: str = ""
    role_empty_sep: str = ""
    stop_str: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    function_string: str = ""
    source: str = "<template>"

    def render(self, messages) -> str:
        """The prompt text MLC builds for ``messages`` (``Message`` objects), ending at the reply slot."""
        system_message = self.system_message
        turns: list[tuple[str, str | None]] = []
        for m in messages:
            if m.role == "system":
                system_message = m.content
            else:
                turns.append((m.role, m.content))
        turns.append(("assistant", None))
        system = self.system_template.replace(SYSTEM_PLACEHOLDER, system_message)
        after_user, after_assistant = self.seps[0], self.seps[-1]
        parts = [system] if system else []
        for k, (role, content) in enumerate(turns):
            if role not in self.roles:
                raise ParityError(f"MLC template {self.source}: role {role!r} is not in its roles ({', '.join(self.roles)})")
            if content is None:
                parts.append(self.roles[role] + self.role_empty_sep)
                continue
            if not self.add_role_after_system_message and system and k == 0:
                prefix = ""
            else:
                prefix = self.roles[role] + self.role_content_sep
            placeholder = ROLE_PLACEHOLDERS.get(role, "{" + role + "_message}")
            body = self.role_templates.get(role, placeholder).replace(placeholder, content)
            parts.append(prefix + body + (after_assistant if role == "assistant" else after_user))
        prompt = "".join(parts)
        head, found, tail = prompt.rpartition(FUNCTION_PLACEHOLDER)
        if found:
            prompt = head + self.function_string + tail
        return prompt.replace(FUNCTION_PLACEHOLDER, "")

    def to_dict(self) -> dict:
        return {
            "name": self.name, "source": self.source, "system_template": self.system_template,
            "system_message": self.system_message, "roles": dict(self.roles), "seps": list(self.seps),
            "role_content_sep": self.role_content_sep, "role_empty_sep": self.role_empty_sep,
            "stop_str": list(self.stop_str), "stop_token_ids": list(self.stop_token_ids),
            "system_prefix_token_ids": list(self.system_prefix_token_ids) if self.system_prefix_token_ids is not None else None,
        }


def _ints(value, *, key: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(i) is int and i >= 0 for i in value):
        raise ParityError(f"{where}: '{key}' must be a list of non-negative integers")
    return tuple(value)


def parse_conversation(data, *, where: str) -> MLCConversation:
    """An ``MLCConversation`` from a template object; anything malformed is one ParityError naming ``where``."""
    if not isinstance(data, dict):
        raise ParityError(f"{where}: a conversation template must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _KNOWN_FIELDS)
    if unknown:
        raise ParityError(f"{where}: unknown conversation template field {unknown[0]!r}")
    for key in ("roles", "seps"):
        if key not in data:
            raise ParityError(f"{where}: the conversation template has no '{key}'")
    roles = data["roles"]
    if not isinstance(roles, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items()):
        raise ParityError(f"{where}: 'roles' must be an object of role -> name strings, e.g. "
                          '{"user": "User", "assistant": "Assistant"}')
    for role in ("user", "assistant"):
        if role not in roles:
            raise ParityError(f"{where}: 'roles' has no {role!r} entry")
    seps = data["seps"]
    if not isinstance(seps, list) or not 1 <= len(seps) <= 2 or not all(isinstance(s, str) for s in seps):
        raise ParityError(f"{where}: 'seps' must be a list of 1 or 2 strings")
    kwargs: dict = {"roles": dict(roles), "seps": tuple(seps), "source": where}
    for key in _STR_FIELDS:
        if key in data and data[key] is not None:
            if not isinstance(data[key], str):
                raise ParityError(f"{where}: '{key}' must be a string, got {type(data[key]).__name__}")
            kwargs[key] = data[key]
    if "role_templates" in data:
        templates = data["role_templates"]
        if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
            raise ParityError(f"{where}: 'role_templates' must be an object of role -> template strings")
        kwargs["role_templates"] = {**ROLE_PLACEHOLDERS, **templates}
    if "add_role_after_system_message" in data:
        if not isinstance(data["add_role_after_system_message"], bool):
            raise ParityError(f"{where}: 'add_role_after_system_message' must be true or false")
        kwargs["add_role_after_system_message"] = data["add_role_after_system_message"]
    if data.get("system_prefix_token_ids") is not None:
        kwargs["system_prefix_token_ids"] = _ints(data["system_prefix_token_ids"], key="system_prefix_token_ids", where=where)
    if "stop_token_ids" in data:
        kwargs["stop_token_ids"] = _ints(data["stop_token_ids"], key="stop_token_ids", where=where)
    if "stop_str" in data:
        stop = data["stop_str"]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ParityError(f"{where}: 'stop_str' must be a list of strings")
        kwargs["stop_str"] = tuple(stop)
    if data.get("messages"):
        raise ParityError(f"{where}: the template already holds 'messages'; give the conversation with --text or --turns")
    return MLCConversation(**kwargs)


def looks_like_mlc(data) -> bool:
    """True for an ``mlc-chat-config.json`` object or a bare conversation template object."""
    return isinstance(data, dict) and ("conv_template" in data or ("roles" in data and "seps" in data))


def load_conversation(path: str | Path, *, data=None) -> MLCConversation:
    """A conversation template JSON file, or an ``mlc-chat-config.json`` (its ``conv_template``)."""
    where = str(path)
    if data is None:
        from parity.prompt.conversation import read_text_file

        raw = read_text_file(path, what="MLC template")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ParityError(f"MLC template {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(data, dict) and "conv_template" in data:
        conv = data["conv_template"]
        if isinstance(conv, str):
            # Older configs name a template built into MLC's code; only the data form can be read here.
            raise ParityError(f"{where}: conv_template is the name {conv!r} of a template built into MLC, not the "
                              "template itself; paste its fields as a conv_template object (see fixtures/prompts/)")
        return parse_conversation(conv, where=f"{where} (conv_template)")
    return parse_conversation(data, where=where)
