"""MLC templates rendered as MLC's conversation protocol joins them; expected prompts written by hand."""

import json

import pytest

from parity.errors import ParityError
from parity.prompt.conversation import Message
from parity.prompt.mlc import load_conversation, parse_conversation

# The field values of MLC-LLM's public rwkv_world template (conversation_template/rwkv.py).
RWKV_WORLD = {
    "name": "rwkv_world",
    "system_template": "User: hi\n\nAssistant: {system_message}",
    "system_message": "Hi. I am your assistant and I will provide expert full response in full details. "
                      "Please feel free to ask any question and I will always answer it.",
    "roles": {"user": "User", "assistant": "Assistant"},
    "seps": ["\n\n"],
    "role_content_sep": ": ",
    "role_empty_sep": ": ",
    "stop_str": ["\n\n"],
    "stop_token_ids": [0],
}
USER = (Message("user", "Hi!"),)


def test_rwkv_world_one_turn():
    conv = parse_conversation(RWKV_WORLD, where="t")
    # system part, no separator after it; user turn + seps[0]; the reply slot: role + role_empty_sep.
    assert conv.render(USER) == "User: hi\n\nAssistant: " + RWKV_WORLD["system_message"] + "User: Hi!\n\nAssistant: "


def test_system_message_of_the_conversation_replaces_the_templates():
    conv = parse_conversation(RWKV_WORLD, where="t")
    got = conv.render((Message("system", "Be brief."), Message("user", "Hi!")))
    assert got == "User: hi\n\nAssistant: Be brief.User: Hi!\n\nAssistant: "


def test_two_seps_and_history():
    conv = parse_conversation({**RWKV_WORLD, "system_template": "", "seps": ["\n\n", "\n"]}, where="t")
    msgs = (Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2"))
    # seps[0] after a user message, seps[1] after an assistant's; content used as given (no strip).
    assert conv.render(msgs) == "User: Q1\n\nAssistant: A1\nUser: Q2\n\nAssistant: "
    assert conv.render((Message("user", " Q "),)) == "User:  Q \n\nAssistant: "


def test_role_templates_function_string_and_no_role_after_system():
    conv = parse_conversation({
        "system_template": "[SYS {system_message}]{function_string}", "system_message": "s",
        "roles": {"user": "U", "assistant": "A"}, "role_templates": {"user": "<<{user_message}>>"},
        "seps": ["|"], "role_content_sep": "=", "role_empty_sep": "~", "add_role_after_system_message": False,
        "function_string": "F",
    }, where="t")
    assert conv.render((Message("user", "q"), Message("assistant", "a"), Message("user", "r"))) == \
        "[SYS s]F<<q>>|A=a|U=<<r>>|A~"


def test_mlc_chat_config_and_errors(tmp_path):
    path = tmp_path / "mlc-chat-config.json"
    path.write_text(json.dumps({"model_type": "rwkv5", "conv_template": RWKV_WORLD}), encoding="utf-8")
    assert load_conversation(path).name == "rwkv_world"
    path.write_text(json.dumps({"conv_template": "rwkv_world"}), encoding="utf-8")
    with pytest.raises(ParityError, match="name 'rwkv_world' of a template built into MLC"):
        load_conversation(path)
    for bad, match in [({k: v for k, v in RWKV_WORLD.items() if k != "seps"}, "no 'seps'"),
                       ({**RWKV_WORLD, "seps": []}, "1 or 2 strings"),
                       ({**RWKV_WORLD, "roles": ["User", "Assistant"]}, "'roles' must be an object"),
                       ({**RWKV_WORLD, "roles": {"user": "User"}}, "no 'assistant' entry"),
                       ({**RWKV_WORLD, "stop_token_ids": [True]}, "non-negative integers"),
                       ({**RWKV_WORLD, "sepz": 1}, "unknown conversation template field 'sepz'"),
                       ({**RWKV_WORLD, "messages": [["user", "x"]]}, "already holds 'messages'")]:
        with pytest.raises(ParityError, match=match):
            parse_conversation(bad, where="t")
    path.write_text("{", encoding="utf-8")
    with pytest.raises(ParityError, match="not valid JSON"):
        load_conversation(path)
