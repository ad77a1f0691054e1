"""The RWKV World tokenizer (our own), a deliberate mutant, and a parity check against the official one."""

from parity.tokenizer.check import OfficialWorldTokenizer, TokenizerDiff, compare_tokenizers
from parity.tokenizer.mutants import FirstMissTokenizer
from parity.tokenizer.world import Vocabulary, WorldTokenizer, default_vocab_path, load_vocabulary, parse_vocabulary

__all__ = [
    "FirstMissTokenizer",
    "OfficialWorldTokenizer",
    "TokenizerDiff",
    "Vocabulary",
    "WorldTokenizer",
    "compare_tokenizers",
    "default_vocab_path",
    "load_vocabulary",
    "parse_vocabulary",
]
