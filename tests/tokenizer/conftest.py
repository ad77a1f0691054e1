"""Shared tokenizers: loading the official one takes ~2 s, so every test in the session reuses one."""

from pathlib import Path

import pytest

from parity.tokenizer import FirstMissTokenizer, OfficialWorldTokenizer, WorldTokenizer

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "text" / "corpus.txt"


@pytest.fixture(scope="session")
def corpus() -> str:
    # Bytes, not text mode: the corpus holds \r and other characters that newline translation
    # or str.splitlines would eat.
    return CORPUS.read_bytes().decode("utf-8")


@pytest.fixture(scope="session")
def world() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="session")
def official() -> OfficialWorldTokenizer:
    return OfficialWorldTokenizer()


@pytest.fixture(scope="session")
def first_miss(world) -> FirstMissTokenizer:
    return FirstMissTokenizer(vocabulary=world.vocab)
