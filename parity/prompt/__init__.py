"""Checking a port's chat prompt against ours (``parity prompt``).

conversation.py  the conversation (--text / --turns) and the prompt our template builds from it
mlc.py           MLC-LLM conversation templates as data, rendered the way MLC renders them
against.py       --against SPEC: literal, file, ids, builder or MLC template -> the port's prompt
check.py         first difference in characters (whitespace made visible) and in tokens
effect.py        what the difference does to the reference model: next-token KL, top-5, greedy
render.py, cli.py  console lines, Markdown, the subcommand
"""

from parity.prompt.against import TheirPrompt, resolve_against
from parity.prompt.check import CharDiff, PromptCheck, TokenDiff, compare_prompts, visible
from parity.prompt.conversation import Message, load_turns, render_ours, single_turn
from parity.prompt.mlc import MLCConversation, load_conversation, parse_conversation

__all__ = [
    "CharDiff", "MLCConversation", "Message", "PromptCheck", "TheirPrompt", "TokenDiff", "compare_prompts",
    "load_conversation", "load_turns", "parse_conversation", "render_ours", "resolve_against", "single_turn", "visible",
]
