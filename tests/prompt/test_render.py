from parity.prompt.against import resolve_against
from parity.prompt.check import compare_prompts
from parity.prompt.conversation import single_turn
from parity.prompt.render import describe_lines, markdown


def test_markdown_table_survives_pipes_and_backticks(world):
    messages = single_turn("a|b `c`")
    check = compare_prompts(template="raw", messages=messages, theirs=resolve_against("text:a|b `c` ", messages=messages),
                            tokenizer=world)
    md = markdown(check)
    assert md.startswith("### ❌") and check.verdict() in md
    for row in (line for line in md.splitlines() if line.startswith("| ")):
        cells = row.replace("\\|", "").split("|")
        assert len(cells) == 5, row  # "", label, ours, theirs, "": no cell split by the prompt's own "|"
        assert all(cell.count("`") % 2 == 0 for cell in cells), row
    assert "past the end of our prompt" in md


def test_console_lines_name_both_sides(world):
    messages = single_turn("Hi")
    check = compare_prompts(template="chatrwkv", messages=messages,
                            theirs=resolve_against("text:User: Hi\n\nAssistant:", messages=messages), tokenizer=world)
    lines = describe_lines(check)
    assert lines[0].startswith("ours:   chatrwkv template") and lines[1].startswith("theirs: literal prompt")
    assert "characters: the same" in lines and markdown(check).startswith("### ✅")
