"""Name recorded kernel calls by the canonical stage they compute, by rules stated in a few lines.

A rule picks calls by kernel name (an fnmatch pattern) and, optionally, by output shape, and names
the calls it picks in call order, one entry per call::

    Rule("layer_norm*", ["emb", *layers(n, "L{l}.att.ln1", "L{l}.ffn.ln2"), "ln_out"])
    Rule("wkv*", layers(n, ("L{l}.att.wkv", "state.L{l}.att_kv")))   # a tuple: one name per output
    Rule("fused_matmul*", [...], shape=(None, None, vocab))          # only calls with this output shape

A rule names its calls only when exactly as many calls match as it has entries: a count that does
not add up means the rule does not describe this build (a fused kernel, a skipped layer), and a
wrong name is worse than none. Such a rule is reported in ``CallNamer.notes`` and its calls keep
their ``kernel.<n>.<symbol>`` names, like every call no rule names; nothing is dropped. Rules are
tried in order, and a call named by one is not seen by the next.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np

from parity.capture.record import KernelCall
from parity.errors import ParityError

Name = str | tuple[str | None, ...] | None


def layers(n_layer: int, *templates: Name) -> list[Name]:
    """Each template for layer 0, then each for layer 1, …: ``{l}`` is the layer (also inside tuples)."""
    out: list[Name] = []
    for layer in range(n_layer):
        for t in templates:
            if isinstance(t, tuple):
                out.append(tuple(None if s is None else s.format(l=layer) for s in t))
            else:
                out.append(None if t is None else t.format(l=layer))
    return out


def kernel_record_name(call: KernelCall, k: int) -> str:
    """What an unnamed output is called: ``kernel.<call index>.<symbol>`` (+ ``.out<k>`` past the first)."""
    return f"kernel.{call.index:03d}.{call.symbol}" + (f".out{k}" if k else "")


@dataclass(frozen=True)
class Rule:
    # The kernel's symbol: an fnmatch pattern ("wkv*", "fused_*layer_norm*"), a compiled regular
    # expression (re.compile(r"fused_matmul\d*_add\d*"), matched in full), or a tuple of either.
    kernel: str | re.Pattern | tuple
    names: Sequence[Name]  # per matching call in call order: a name (output 0), a tuple (outputs 0..), None (leave it)
    # Only calls whose first output has this shape: ints must match, None is any size; or a predicate.
    shape: tuple[int | None, ...] | Callable[[tuple[int, ...]], bool] | None = None
    # Applied to every output this rule names, before CallNamer.adapt (e.g. drop_batch).
    adapt: Callable[[np.ndarray], np.ndarray] | None = None

    def matches(self, call: KernelCall) -> bool:
        patterns = self.kernel if isinstance(self.kernel, tuple) else (self.kernel,)
        if not any(p.fullmatch(call.symbol) if isinstance(p, re.Pattern) else fnmatchcase(call.symbol, p)
                   for p in patterns):
            return False
        if self.shape is None:
            return True
        got = call.shape(0)
        if callable(self.shape):
            return bool(self.shape(got))
        return len(got) == len(self.shape) and all(s is None or s == g for s, g in zip(self.shape, got))


@dataclass
class CallNamer:
    """Apply ``rules`` to one recording; ``adapt`` converts named outputs to the canonical layout.

    ``adapt``: canonical-name pattern -> function(array) -> array. Every pattern that matches a name
    applies, in the order given, e.g. ``{"*": drop_batch, "L*.att.wkv": flatten_heads,
    "state.*.att_kv": hvk_to_hkv}``. Unnamed (kernel.*) records are kept as recorded.
    """

    rules: Sequence[Rule]
    adapt: Mapping[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)
    # strict: a rule whose count does not add up is an error (ParityError, exit 2) instead of a note.
    strict: bool = False
    notes: list[str] = field(default_factory=list)  # why a rule named nothing, from the last call

    def names(self, calls: Sequence[KernelCall]) -> dict[tuple[int, int], str]:
        """(call index, output index) -> canonical name, for the calls the rules name surely."""
        self.notes = []
        named: dict[tuple[int, int], str] = {}
        self._rule_of: dict[tuple[int, int], Rule] = {}
        claimed: set[int] = set()
        for rule in self.rules:
            picked = [c for c in calls if c.index not in claimed and rule.matches(c)]
            if len(picked) != len(rule.names):
                note = f"rule {rule.kernel!r}: {len(picked)} matching calls for {len(rule.names)} names; left as kernel.*"
                if self.strict:
                    raise ParityError(note.replace("; left as kernel.*", "; fix the rule for this build"))
                self.notes.append(note)
                continue
            for call, entry in zip(picked, rule.names):
                claimed.add(call.index)
                if entry is None:
                    continue
                for k, name in enumerate(entry if isinstance(entry, tuple) else (entry,)):
                    if name is None:
                        continue
                    if k >= len(call.outputs):
                        raise ParityError(
                            f"rule {rule.kernel!r} names output {k} of {call.symbol} (call {call.index}), "
                            f"which has {len(call.outputs)} recorded; give KernelRecorder outputs={{{call.symbol!r}: n}}"
                        )
                    if name in named.values():
                        raise ParityError(f"stage {name!r} is named by two kernel calls; check the rules")
                    named[(call.index, k)] = name
                    self._rule_of[(call.index, k)] = rule
        return named

    def __call__(self, calls: Sequence[KernelCall]) -> dict[str, np.ndarray]:
        """Every recorded output, by canonical name where a rule names it, else by kernel.<n>.<symbol>."""
        named = self.names(calls)
        out: dict[str, np.ndarray] = {}
        for call in calls:
            for k, value in enumerate(call.outputs):
                name = named.get((call.index, k))
                if name is None:
                    out[kernel_record_name(call, k)] = value
                    continue
                rule = self._rule_of[(call.index, k)]
                if rule.adapt is not None:
                    value = rule.adapt(value)
                for pattern, fn in self.adapt.items():
                    if fnmatchcase(name, pattern):
                        value = fn(value)
                out[name] = value
        return out
