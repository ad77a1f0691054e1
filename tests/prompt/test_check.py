"""Subtle template mistakes, each found at the right character and token.

Expected character positions are lengths of hand-written prefixes; expected token positions come
from the official tokenizer (tests/prompt/conftest.py), not from the code under test.
"""

import json

import pytest

from parity.prompt.against import resolve_against
from parity.prompt.check import char_diff, compare_prompts, first_difference, visible
from parity.prompt.conversation import Message, single_turn

from .conftest import REPO, first_token_difference

TEXT = "Hi! What is RWKV?"
OURS = "User: Hi! What is RWKV?\n\nAssistant:"
TURNS = (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye"))
OURS_TURNS = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant:"

# A port's prompt builders: one right, three with a subtle mistake each.
BUILDERS = '''
NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

def right(messages):
    if isinstance(messages, str):  # one user message comes as its text
        messages = [{"role": "user", "content": messages}]
    return "".join(NAMES[m["role"]] + ": " + m["content"].strip() + "\\n\\n" for m in messages) + "Assistant:"

def one_newline_after_replies(messages):
    # the port ends an assistant turn with "\\n", not with a blank line
    out = ""
    for m in messages:
        out += NAMES[m["role"]] + ": " + m["content"].strip() + ("\\n" if m["role"] == "assistant" else "\\n\\n")
    return out + "Assistant:"

def system_as_user(messages):
    # the port has no system role and sends the system prompt as a user turn
    return "".join(("User" if m["role"] == "system" else NAMES[m["role"]]) + ": " + m["content"].strip() + "\\n\\n"
                   for m in messages) + "Assistant:"

def trailing_space(text):
    return "User: " + text.strip() + "\\n\\nAssistant: "
'''


@pytest.fixture()
def port(tmp_path):
    path = tmp_path / "port.py"
    path.write_text(BUILDERS, encoding="utf-8")
    return path


def check(spec, *, messages, world):
    return compare_prompts(template="chatrwkv", messages=messages, theirs=resolve_against(spec, messages=messages),
                           tokenizer=world)


def test_right_builder_reports_nothing(port, world):
    for messages, ours in ((TURNS, OURS_TURNS), ((Message("user", "  Hi! What is RWKV?\n"),), OURS)):
        result = check(f"{port}:right", messages=messages, world=world)
        assert result.passed and bool(result)
        assert result.ours_text == ours
        assert result.chars.equal and result.tokens.equal and result.chars.index is None
        assert result.verdict() == f"prompts agree ({len(ours)} characters, {result.tokens.ours_count} tokens)"


def test_trailing_space_after_assistant(port, world, official):
    result = check(f"{port}:trailing_space", messages=single_turn(TEXT), world=world)
    assert not result.passed
    assert result.chars.index == len(OURS) == 35
    assert (result.chars.line, result.chars.column) == (3, len("Assistant:") + 1)
    assert (result.chars.ours_region, result.chars.theirs_region) == ("", " ")
    assert result.chars.where == "past the end of our prompt"
    assert result.chars.ours_snippet.endswith("Assistant:\u27e6\u27e7\u2403")  # ⟦⟧ then ␃: our prompt ends here
    assert result.chars.theirs_snippet.endswith("Assistant:\u27e6\u2420\u27e7\u2403")  # ⟦␠⟧
    t = first_token_difference(official, OURS, OURS + " ")
    assert result.tokens.index == t
    assert result.tokens.char_index == len(official.trie_tokenizer.decode(official.encode(OURS)[:t]))
    assert result.verdict() == f"PROMPTS DIFFER at character 35 (line 3, column 11), token {t}"


def test_missing_blank_line_between_turns(port, world, official):
    result = check(f"{port}:one_newline_after_replies", messages=TURNS, world=world)
    theirs = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\nUser: Bye\n\nAssistant:"
    assert result.theirs_text == theirs
    k = len("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n")
    assert result.chars.index == k
    # lines: System..., "", User: Hi, "", Assistant: Hello!, then our blank line 6 (the port has none)
    assert (result.chars.line, result.chars.column) == (6, 1)
    assert (result.chars.ours_region, result.chars.theirs_region) == ("\n", "")
    assert result.chars.where == "in the blank line that ends message 2 (assistant)"
    assert "Hello!\u23ce\u27e6\u23ce\u27e7User" in result.chars.ours_snippet  # Hello!⏎⟦⏎⟧User
    assert "Hello!\u23ce\u27e6\u27e7User" in result.chars.theirs_snippet
    t = first_token_difference(official, OURS_TURNS, theirs)
    assert result.tokens.index == t
    # the blank line is one "\n\n" token in ours; the port's "\n" token starts at the same character
    assert result.tokens.char_index == len("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!")


def test_system_prompt_in_the_wrong_role(port, world, official):
    result = check(f"{port}:system_as_user", messages=TURNS, world=world)
    theirs = "User: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant:"
    assert result.theirs_text == theirs
    assert (result.chars.index, result.chars.line, result.chars.column) == (0, 1, 1)
    assert result.chars.where == "in the role name of message 0 (system)"
    assert result.tokens.index == first_token_difference(official, OURS_TURNS, theirs) == 0


def test_system_prompt_as_mlc_rwkv_world_puts_it(world, official):
    # MLC's rwkv_world: the system prompt is a canned assistant reply, with no separator after it.
    spec = str(REPO / "fixtures" / "prompts" / "rwkv-world" / "mlc-chat-config.json")
    messages = (Message("system", "Be brief."), Message("user", "Hi"))
    result = check(spec, messages=messages, world=world)
    ours, theirs = "System: Be brief.\n\nUser: Hi\n\nAssistant:", "User: hi\n\nAssistant: Be brief.User: Hi\n\nAssistant: "
    assert (result.ours_text, result.theirs_text) == (ours, theirs)
    assert result.chars.index == 0
    assert result.tokens.index == first_token_difference(official, ours, theirs)
    assert result.against["mlc_template"]["name"] == "rwkv_world"


def test_mlc_does_not_strip_the_message(world, official):
    spec = "mlc:" + str(REPO / "fixtures" / "prompts" / "chatrwkv-conv-template.json")
    assert check(spec, messages=single_turn("Hi"), world=world).passed
    result = check(spec, messages=single_turn(" Hi "), world=world)
    theirs = "User:  Hi \n\nAssistant:"
    assert result.theirs_text == theirs
    assert result.chars.index == len("User: ")
    assert result.chars.where == "in message 0 (user)"
    # from the first difference to the common suffix "\n\nAssistant:": both extra spaces are inside
    assert (result.chars.ours_region, result.chars.theirs_region) == ("Hi", " Hi ")
    assert result.tokens.index == first_token_difference(official, "User: Hi\n\nAssistant:", theirs)


def test_ids_kinds(tmp_path, world, official):
    ours = "User: Hi\n\nAssistant:"
    right = tmp_path / "right.json"
    right.write_text(json.dumps(official.encode(ours)), encoding="utf-8")
    assert check(f"ids:{right}", messages=single_turn("Hi"), world=world).passed
    # The same text split into other tokens (a port's tokenizer bug): characters equal, tokens not.
    ids = official.encode(ours)
    k = ids.index(official.encode("istant")[0])
    split = ids[:k] + [official.encode(c)[0] for c in "istant"] + ids[k + 1:]
    other = tmp_path / "split.ids"
    other.write_text(" ".join(map(str, split)), encoding="utf-8")
    result = check(f"ids:{other}", messages=single_turn("Hi"), world=world)
    assert result.chars.equal and not result.tokens.equal and not result.passed
    assert result.tokens.index == k
    assert result.verdict() == f"PROMPTS DIFFER at the same characters, token {k}"
    assert any("the same text, different ids" in n for n in result.notes)
    # Ids that are not text: only tokens are compared.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ids[:-1] + [999999]), encoding="utf-8")
    result = check(f"ids:{bad}", messages=single_turn("Hi"), world=world)
    assert result.chars is None and result.tokens.index == len(ids) - 1
    assert "not in the vocabulary" in result.tokens.theirs_window[-1][1]


def test_stop_string_note(tmp_path, world):
    conf = json.loads((REPO / "fixtures" / "prompts" / "chatrwkv-conv-template.json").read_text(encoding="utf-8"))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({**conf, "stop_str": ["</s>"], "system_prefix_token_ids": [0]}), encoding="utf-8")
    result = check(str(path), messages=single_turn("Hi"), world=world)
    assert any("lacks '\\n\\n'" in n for n in result.notes)
    assert result.theirs_ids[0] == 0 and result.tokens.index == 0 and result.chars.equal


def test_helpers():
    assert visible(" a\n\t\r\x00\x85b") == "\u2420a\u23ce\u21e5\u240d\\x00\\x85b"
    assert first_difference("abc", "abc") is None and first_difference("ab", "abc") == 2
    d = char_diff("xAy", "xBBy")
    assert (d.index, d.ours_region, d.theirs_region) == (1, "A", "BB")
    d = char_diff("aa", "aaa")  # a repeated character: the region never runs before the first difference
    assert (d.index, d.ours_region, d.theirs_region) == (2, "", "a")
