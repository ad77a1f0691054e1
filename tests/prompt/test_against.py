"""Every SPEC kind of --against, with and without its prefix."""

import json

import pytest

from parity.errors import ParityError
from parity.prompt.against import parse_ids_text, resolve_against
from parity.prompt.conversation import Message, single_turn

ONE = single_turn("Hi")
RIGHT = "User: Hi\n\nAssistant:"

BUILDERS = '''
def chat(arg):
    if isinstance(arg, str):
        return "User: " + arg.strip() + "\\n\\nAssistant:"
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "".join(names[m["role"]] + ": " + m["content"].strip() + "\\n\\n" for m in arg) + "Assistant:"

def ids(arg):
    return [24281, 59, 3880]

def broken(arg):
    raise KeyError("no template")

def wrong_type(arg):
    return 3.5

NOT_CALLABLE = "x"
'''


@pytest.fixture()
def builders(tmp_path, monkeypatch):
    path = tmp_path / "port_builders.py"
    path.write_text(BUILDERS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))  # for the MODULE:ATTR form
    return path


def test_literal_text(tmp_path):
    p = resolve_against("text:" + RIGHT, messages=ONE)
    assert (p.kind, p.text, p.ids, p.guessed) == ("text", RIGHT, None, False)
    p = resolve_against("User: Hi", messages=ONE)  # no prefix, no such file, no such module
    assert (p.kind, p.text, p.guessed) == ("text", "User: Hi", True)
    p = resolve_against("text:file:x", messages=ONE)  # the prefix wins over what follows
    assert (p.kind, p.text) == ("text", "file:x")
    for literal in ("x" * 300, "a\x00b", "User: " + "w/" * 200):  # no valid path: still a literal, no OSError
        assert resolve_against(literal, messages=ONE).text == literal


def test_prompt_file_kept_byte_for_byte(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"User: Hi\r\n\r\nAssistant: ")
    for spec in (f"file:{path}", str(path)):
        p = resolve_against(spec, messages=ONE)
        assert (p.kind, p.text) == ("file", "User: Hi\r\n\r\nAssistant: ")
    path.write_bytes(b"\xff")
    with pytest.raises(ParityError, match="not valid UTF-8"):
        resolve_against(f"file:{path}", messages=ONE)
    with pytest.raises(ParityError, match="cannot read"):
        resolve_against(f"file:{tmp_path / 'missing.txt'}", messages=ONE)


def test_ids_files(tmp_path):
    js, plain = tmp_path / "p.json", tmp_path / "p.ids"
    js.write_text("[24281, 59, 3880]", encoding="utf-8")
    plain.write_text("24281 59\n3880,", encoding="utf-8")
    for spec in (f"ids:{js}", str(js), f"ids:{plain}", str(plain)):
        p = resolve_against(spec, messages=ONE)
        assert (p.kind, p.ids, p.text) == ("ids", (24281, 59, 3880), None)
    assert parse_ids_text("1, 2 ,3", where="w") == (1, 2, 3)
    for bad, match in [("1 x 3", "'x' is not a token id"), ("[1, -2]", "non-negative"), ("[true]", "non-negative"),
                       ("", "no token ids"), ("[1,", "not valid JSON")]:
        with pytest.raises(ParityError, match=match):
            parse_ids_text(bad, where="w")


def test_builders(builders):
    for spec in (f"builder:{builders}:chat", f"{builders}:chat", "builder:port_builders:chat", "port_builders:chat"):
        p = resolve_against(spec, messages=ONE)
        assert (p.kind, p.text, p.ids) == ("builder", RIGHT, None), spec
    turns = (Message("system", "S"), Message("user", "Q"))
    assert resolve_against("port_builders:chat", messages=turns).text == "System: S\n\nUser: Q\n\nAssistant:"
    assert resolve_against("port_builders:ids", messages=ONE).ids == (24281, 59, 3880)
    for spec, match in [("port_builders:broken", r"broken\(\) raised KeyError"),
                        ("port_builders:wrong_type", "must return the prompt string or a non-empty list"),
                        ("port_builders:NOT_CALLABLE", "no callable 'NOT_CALLABLE'"),
                        ("builder:no_such_module_xyz:f", "cannot import"),
                        ("builder:Hi there", "MODULE:ATTRIBUTE")]:
        with pytest.raises(ParityError, match=match):
            resolve_against(spec, messages=ONE)


def test_mlc(tmp_path):
    conf = {"conv_template": {"roles": {"user": "User", "assistant": "Assistant"}, "seps": ["\n\n"],
                              "role_content_sep": ": ", "role_empty_sep": ":"}}
    path = tmp_path / "mlc-chat-config.json"
    path.write_text(json.dumps(conf), encoding="utf-8")
    for spec in (f"mlc:{path}", str(path)):
        p = resolve_against(spec, messages=ONE)
        assert (p.kind, p.text) == ("mlc", RIGHT)
    path.write_text(json.dumps({"a": 1}), encoding="utf-8")
    with pytest.raises(ParityError, match="list of token ids or an MLC conversation template"):
        resolve_against(str(path), messages=ONE)


@pytest.mark.parametrize("kind", ["file", "ids", "mlc"])
def test_nul_in_a_path_is_an_input_error(kind):
    with pytest.raises(ParityError, match="NUL"):
        resolve_against(f"{kind}:a\x00b", messages=ONE)


def test_empty_spec():
    with pytest.raises(ParityError, match="needs a SPEC"):
        resolve_against("", messages=ONE)
