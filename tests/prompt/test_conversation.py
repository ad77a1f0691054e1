import json

import pytest

from parity.errors import ParityError
from parity.prompt.conversation import Message, load_turns, render_ours, single_turn


def test_one_turn_is_the_scenario_template():
    # The same strings parity run uses: chatrwkv strips the message and ends at "Assistant:".
    assert render_ours("chatrwkv", single_turn("  Hi!\r\n\n\nWhat is RWKV?  ")) == "User: Hi!\nWhat is RWKV?\n\nAssistant:"
    assert render_ours("instruct", single_turn(" Sum 2+2 ")) == "Instruction: Sum 2+2\n\nResponse:"
    assert render_ours("raw", single_turn(" x ")) == " x "


def test_multi_turn_chatrwkv():
    msgs = (Message("system", " Be brief. "), Message("user", "Hi"), Message("assistant", " Hello!\n\nHow can I help?"),
            Message("user", "Bye"))
    assert render_ours("chatrwkv", msgs) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\nHow can I help?\n\nUser: Bye\n\nAssistant:"
    )


@pytest.mark.parametrize("messages, match", [
    ((Message("user", "a"), Message("assistant", "b")), "last message must be the user's"),
    ((Message("user", "a"), Message("system", "b"), Message("user", "c")), "only the first message"),
    ((Message("system", "a"),), "no user message"),
    ((), "no messages"),
    ((Message("user", "a"), Message("assistant", "  "), Message("user", "c")), "empty after stripping"),
])
def test_bad_conversations(messages, match):
    with pytest.raises(ParityError, match=match):
        render_ours("chatrwkv", messages)


def test_several_turns_need_the_chat_template():
    with pytest.raises(ParityError, match="needs --template chatrwkv"):
        render_ours("question", (Message("user", "a"), Message("assistant", "b"), Message("user", "c")))


def test_load_turns(tmp_path):
    path = tmp_path / "turns.json"
    path.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                {"role": "user", "content": "Bye"}]), encoding="utf-8")
    assert load_turns(path) == (Message("user", "Hi"), Message("assistant", "Yo"), Message("user", "Bye"))
    for data, match in [({"role": "user"}, "JSON list"), ([{"role": "bot", "content": "x"}], "role 'bot'"),
                        ([{"role": "user", "content": 3}], "string 'content'"),
                        ([{"role": "user", "content": "x", "name": "n"}], "unknown field 'name'")]:
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(ParityError, match=match):
            load_turns(path)
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(ParityError, match="not valid JSON"):
        load_turns(path)
