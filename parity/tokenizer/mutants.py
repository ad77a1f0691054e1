"""Deliberately wrong tokenizers, kept so the parity check can prove it catches real bugs.

``FirstMissTokenizer`` reproduces a bug from a C++ port of the World tokenizer: while extending
a match it stops at the first byte prefix that is not itself a token. 35,118 of the 65,529 World
tokens have such a prefix (docs/RWKV.md §5) -- e.g. every 3-byte CJK character whose 2-byte
prefix is not a token -- so the mutant emits single byte tokens where the real encoder emits
whole characters and words. Never use it for anything but testing the checker.
"""

from __future__ import annotations

from parity.tokenizer.world import WorldTokenizer


class FirstMissTokenizer(WorldTokenizer):
    """MUTANT (deliberately wrong): greedy match that gives up at the first non-token prefix."""

    name = "first-miss"

    def _longest_match(self, data: bytes, start: int) -> tuple[int, int]:
        children, node_id = self.vocab.children, self.vocab.node_id
        node, pos, n = 0, start, len(data)
        best_end, best_id = start, -1
        while pos < n:
            node = children[node].get(data[pos], -1)
            if node < 0 or node_id[node] < 0:  # the bug: a non-token prefix ends the search
                break
            pos += 1
            best_end, best_id = pos, node_id[node]
        return best_end, best_id
