"""Shared fixtures. Expected token positions come from the OFFICIAL tokenizer (the rwkv package's
TRIE_TOKENIZER) and a plain loop, never from the code under test, which uses our World tokenizer."""

from pathlib import Path

import pytest

from parity.tokenizer import OfficialWorldTokenizer, WorldTokenizer

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth"  # V = 1024: tokenizer ids are folded id % 1024


@pytest.fixture(scope="session")
def world() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="session")
def official() -> OfficialWorldTokenizer:
    return OfficialWorldTokenizer()


def first_token_difference(official, ours: str, theirs: str) -> int:
    """Index of the first differing token of the two texts, by the official tokenizer."""
    a, b = official.encode(ours), official.encode(theirs)
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    assert a != b, "the texts tokenize the same"
    return k
