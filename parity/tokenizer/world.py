"""The RWKV World tokenizer: greedy longest match over UTF-8 bytes (docs/RWKV.md §5).

Our own implementation; the official ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` is only an oracle
(``parity.tokenizer.check``). The vocabulary file has one token per line, ``id literal byte_len``,
where ``literal`` is a Python str or bytes literal (a str stands for its UTF-8 encoding). The
official loader ``eval``s each literal; we accept only a single str/bytes constant, so a vocabulary
file can never run code.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from parity.errors import ParityError


def read_utf8_file(path: str | os.PathLike, *, what: str = "prompt file") -> str:
    """A UTF-8 text file's contents, byte for byte (a final newline is part of the text)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ParityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParityError(f"{what} {path} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from None

VOCAB_FILENAME = "rwkv_vocab_v20230424.txt"
# A module attribute rather than a literal so a test can simulate "package not installed".
_RWKV_PACKAGE = "rwkv"
DECODE_ERRORS = ("strict", "replace")


def default_vocab_path() -> Path:
    """The vocabulary shipped inside the installed ``rwkv`` package, found without importing it."""
    spec = importlib.util.find_spec(_RWKV_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / VOCAB_FILENAME
        if path.is_file():
            return path
    raise ParityError(
        f"no tokenizer vocabulary given and the '{_RWKV_PACKAGE}' package (which ships {VOCAB_FILENAME}) "
        "is not installed; pass a vocabulary path or `pip install rwkv==0.8.32`"
    )


@dataclass(frozen=True)
class Vocabulary:
    """Parsed vocabulary tables plus the byte trie; immutable, so tokenizers share one instance."""

    path: Path
    id_to_bytes: dict[int, bytes]
    # The trie as flat lists indexed by node number (node 0 is the root): far smaller and faster
    # to build than one object per node, and the encode loop only does dict lookups.
    children: list[dict[int, int]]
    node_id: list[int]  # token id that ends at this node, or -1 when the path is not a token
    max_token_bytes: int

    def __len__(self) -> int:
        return len(self.id_to_bytes)


def _parse_literal(text: str, *, lineno: int, where: str) -> bytes:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise ParityError(f"{where}:{lineno}: token literal {text.strip()[:60]!r} is not a Python literal ({exc.msg if isinstance(exc, SyntaxError) else exc})") from None
    node = tree.body
    # Only a bare constant: no calls, names, operators or f-strings, so nothing can execute.
    if not isinstance(node, ast.Constant) or not isinstance(node.value, (str, bytes)):
        raise ParityError(f"{where}:{lineno}: token literal {text.strip()[:60]!r} must be a single str or bytes literal")
    if isinstance(node.value, bytes):
        return node.value
    try:
        return node.value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParityError(f"{where}:{lineno}: token literal {text.strip()[:60]!r} contains a lone surrogate and has no UTF-8 form") from None


def parse_vocabulary(text: str, *, where: str = "<vocab>") -> dict[int, bytes]:
    """``id literal byte_len`` lines -> {id: token bytes}; any malformed line is a ParityError naming it."""
    id_to_bytes: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    # Split on "\n" only: str.splitlines would also split on \x1c, \x85, \u2028 ... The shipped
    # file has CRLF endings, hence the rstrip of "\r".
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        first, last = line.find(" "), line.rfind(" ")
        if first < 0 or last <= first:
            raise ParityError(f"{where}:{lineno}: expected 'id literal byte_len', got {line[:60]!r}")
        id_text, literal, len_text = line[:first], line[first + 1:last], line[last + 1:]
        if not id_text.isdigit() or not len_text.isdigit():
            raise ParityError(f"{where}:{lineno}: id and byte_len must be non-negative integers, got {line[:60]!r}")
        token_id, byte_len = int(id_text), int(len_text)
        token = _parse_literal(literal, lineno=lineno, where=where)
        if len(token) != byte_len:
            raise ParityError(f"{where}:{lineno}: token {literal.strip()[:60]} is {len(token)} bytes but the line says {byte_len}")
        if not token:
            raise ParityError(f"{where}:{lineno}: empty token")
        if token_id in id_to_bytes:
            raise ParityError(f"{where}:{lineno}: id {token_id} appears twice")
        if token in seen:
            raise ParityError(f"{where}:{lineno}: token {token!r} already has id {seen[token]}")
        id_to_bytes[token_id] = token
        seen[token] = token_id
    if not id_to_bytes:
        raise ParityError(f"{where}: the vocabulary is empty")
    return id_to_bytes


def _build_vocabulary(path: Path, id_to_bytes: dict[int, bytes]) -> Vocabulary:
    children: list[dict[int, int]] = [{}]
    node_id = [-1]
    for token_id, token in id_to_bytes.items():
        node = 0
        for byte in token:
            nxt = children[node].get(byte)
            if nxt is None:
                nxt = len(children)
                children[node][byte] = nxt
                children.append({})
                node_id.append(-1)
            node = nxt
        node_id[node] = token_id
    return Vocabulary(
        path=path, id_to_bytes=id_to_bytes, children=children, node_id=node_id,
        max_token_bytes=max(map(len, id_to_bytes.values())),
    )


@functools.lru_cache(maxsize=8)
def _load_cached(path: Path, mtime_ns: int, size: int) -> Vocabulary:  # stat in the key: edits invalidate
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ParityError(f"cannot read vocabulary {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParityError(f"vocabulary {path} is not valid UTF-8 (byte offset {exc.start})") from None
    return _build_vocabulary(path, parse_vocabulary(text, where=str(path)))


def load_vocabulary(path: str | os.PathLike | None = None) -> Vocabulary:
    """Parse (once per file version) the vocabulary at ``path``, default: the ``rwkv`` package's copy."""
    path = Path(path) if path is not None else default_vocab_path()
    try:
        st = path.stat()
    except OSError as exc:
        raise ParityError(f"cannot read vocabulary {path}: {exc.strerror or exc}") from None
    return _load_cached(path.resolve(), st.st_mtime_ns, st.st_size)


class WorldTokenizer:
    """Greedy longest-match tokenizer over UTF-8 bytes.

    At every position it emits the longest vocabulary token that is a prefix of the remaining
    bytes, walking the trie past byte prefixes that are not tokens themselves (most multi-byte
    tokens have such prefixes; see ``parity.tokenizer.mutants`` for the encoder that doesn't).
    Tokens may split a UTF-8 character, so a slice of ids need not decode to valid text.
    """

    name = "world"

    def __init__(self, vocab_path: str | os.PathLike | None = None, *, vocabulary: Vocabulary | None = None):
        self.vocab = vocabulary if vocabulary is not None else load_vocabulary(vocab_path)
        self._id_to_bytes = self.vocab.id_to_bytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.vocab.path)!r}, {len(self.vocab)} tokens)"

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the file (the model's embedding may have more rows, e.g. 65536)."""
        return len(self.vocab)

    # -- encoding ------------------------------------------------------------------------------
    def _longest_match(self, data: bytes, start: int) -> tuple[int, int]:
        """(end, id) of the longest token starting at ``start``; end == start when none does."""
        children, node_id = self.vocab.children, self.vocab.node_id
        node, pos, n = 0, start, len(data)
        best_end, best_id = start, -1
        while pos < n:
            node = children[node].get(data[pos], -1)
            if node < 0:
                break
            pos += 1
            if node_id[node] >= 0:
                best_end, best_id = pos, node_id[node]
        return best_end, best_id

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (need not be valid UTF-8)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ParityError(f"encode_bytes() takes bytes, got {type(data).__name__}")
        data = bytes(data)
        ids: list[int] = []
        pos, n = 0, len(data)
        match = self._longest_match
        while pos < n:
            end, token_id = match(data, pos)
            if end == pos:  # only a vocabulary without all 256 single bytes gets here
                raise ParityError(f"byte 0x{data[pos]:02x} at offset {pos} starts no token of {self.vocab.path}")
            ids.append(token_id)
            pos = end
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``'s UTF-8 bytes. Lone surrogates (no UTF-8 form) raise ParityError."""
        if not isinstance(text, str):
            raise ParityError(f"encode() takes str, got {type(text).__name__}; use encode_bytes() for bytes")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParityError(
                f"text has a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}; "
                "it cannot be UTF-8 encoded (was the input decoded with surrogateescape?)"
            ) from None
        return self.encode_bytes(data)

    # -- decoding ------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated token bytes; ids not in the vocabulary raise ParityError."""
        ids = list(ids)
        try:
            return b"".join([self._id_to_bytes[i] for i in ids])
        except (KeyError, TypeError):
            pass
        for pos, i in enumerate(ids):
            try:
                self._id_to_bytes[i]
            except (KeyError, TypeError):
                raise ParityError(f"token id {i!r} at position {pos} is not in the vocabulary ({self.vocab.path})") from None
        raise AssertionError("unreachable: a failed join must have a bad id")

    def decode(self, ids: Iterable[int], *, errors: str = "strict") -> str:
        """Text of ``ids``.

        The byte stream may be invalid UTF-8 (ids cut mid-character, or raw byte tokens). With
        ``errors="strict"`` that raises ParityError naming the first bad byte's offset (and the
        token holding it); with ``errors="replace"`` each maximal invalid subsequence becomes
        U+FFFD, Python's standard UTF-8 replacement. (The official tokenizer instead returns a
        single U+FFFD for the whole text.)
        """
        if errors not in DECODE_ERRORS:
            raise ParityError(f"decode errors must be one of {DECODE_ERRORS}, got {errors!r}")
        ids = list(ids)
        data = self.decode_bytes(ids)
        if errors == "replace":
            return data.decode("utf-8", errors="replace")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            token_pos, offset = 0, 0
            for token_pos, i in enumerate(ids):
                offset += len(self._id_to_bytes[i])
                if offset > exc.start:
                    break
            raise ParityError(
                f"ids do not decode to valid UTF-8: bad byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
                f"(in token {token_pos}, id {ids[token_pos]}; {exc.reason}); use errors='replace' to substitute U+FFFD"
            ) from None
