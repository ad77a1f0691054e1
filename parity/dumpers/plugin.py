"""Backends from outside the package, named on the command line as ``module:attribute``.

The contract (docs/backends.md) is deliberately small: ``attribute`` is a callable taking the
loaded ``Checkpoint`` and returning an object with
    reset() -> None                       start from the zero state
    step(ids: list[int]) -> dict          canonical stage name -> numpy array, for one step
and optionally ``name`` (default: the spec), ``mode`` (default "plugin"), ``dtype`` (default
"float32") and ``notes`` (a list of strings kept in the dump manifest's ``extra.notes``). Return
whichever canonical stages you can observe — at least ``logits``; the diff engine compares what
both sides have and lists the rest. ``module`` may be a dotted module path on sys.path or a path
to a ``.py`` file.

Partial rows: a per-token stage may hold fewer than the step's T token rows. One row in a step of
T > 1 tokens is the last token's (what a real port's ``prefill`` returns); any other subset is
declared under the key ``"rows"``: ``{"rows": {"L3.x_out": [0, 1, 2]}, ...}``. Each declaration
is stored beside its stage as ``rows.<stage>`` (parity/compare/divergence.py), so the comparison
uses the rows both sides hold. ``kernel.<n>.<name>`` records (parity.capture) are kept as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np

from parity.checkpoint import Checkpoint
from parity.compare.divergence import ROWS_PREFIX
from parity.dumpers.backends import Backend
from parity.dumpers.format import StepWriter
from parity.errors import ParityError


def import_plugin_module(module: str):
    """A dotted module on sys.path, or a ``.py`` file by path; import failures become ParityError."""
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ParityError(f"backend module file not found: {path}")
        name = f"parity_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            raise ParityError(f"backend module {path} failed to import: {type(exc).__name__}: {exc}") from None
        return mod
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise ParityError(f"cannot import backend module {module!r}: {type(exc).__name__}: {exc}") from None


class PluginBackend(Backend):
    def __init__(self, checkpoint: Checkpoint, *, impl, spec: str):
        for method in ("reset", "step"):
            if not callable(getattr(impl, method, None)):
                raise ParityError(f"backend {spec} has no {method}() method; see docs/backends.md")
        extra = {"plugin": spec}
        notes = getattr(impl, "notes", None)
        if notes is not None:
            if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
                raise ParityError(f"backend {spec}: notes must be a list of strings")
            extra["notes"] = list(notes)
        name = getattr(impl, "name", spec)
        if not isinstance(name, str) or not name:
            raise ParityError(f"backend {spec}: name must be a non-empty string, got {name!r}")
        super().__init__(
            checkpoint=checkpoint, name=name, mode=getattr(impl, "mode", "plugin"),
            dtype=getattr(impl, "dtype", "float32"), extra=extra,
            # kernel.<n>.<name> records and rows.<stage> declarations join the stage order as they appear.
            extend_stage_order=True,
        )
        self.impl = impl
        self.spec = spec

    def begin(self) -> None:
        try:
            self.impl.reset()
        except ParityError:
            raise
        except Exception as exc:
            raise ParityError(f"backend {self.spec}: reset() raised {type(exc).__name__}: {exc}") from None

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        try:
            stages = self.impl.step(list(ids))
        except ParityError:
            raise
        except Exception as exc:  # the plug-in's bug, not a divergence and not ours: say whose
            raise ParityError(f"backend {self.spec}: step({ids}) raised {type(exc).__name__}: {exc}") from None
        if not isinstance(stages, dict) or "logits" not in stages:
            raise ParityError(f"backend {self.spec}: step() must return a dict of stage -> array with at least 'logits'")
        stages = dict(stages)
        declared = stages.pop("rows", None) or {}
        if not isinstance(declared, dict):
            raise ParityError(f"backend {self.spec}: step()'s 'rows' must map stage name -> list of token rows")
        order = {n: i for i, n in enumerate(self.canonical_order())}
        unknown = [n for n in stages if n not in order and not KERNEL_RECORD.match(n)]
        if unknown:
            raise ParityError(
                f"backend {self.spec} returned non-canonical stage {unknown[0]!r}; use the names of "
                "docs/dump-format.md, or kernel.<n>.<name> for a kernel call"
            )
        values = {}
        for name, raw in stages.items():
            value = np.asarray(raw)
            if value.dtype.kind != "f":
                value = value.astype(np.float32)
            values[name] = value
        rows = token_rows(values, declared=declared, n_tokens=len(ids), spec=self.spec)
        # Canonical stages in execution order, then kernel records in call order (their <n>).
        for name in sorted(values, key=lambda n: (order.get(n, len(order)), n)):
            step.add(name, values[name])
            if name in rows:
                step.add(ROWS_PREFIX + name, np.asarray(rows[name], dtype=np.int64))


KERNEL_RECORD = re.compile(r"^kernel\.\d+\.[^\s]+$")


def token_rows(values: dict[str, np.ndarray], *, declared: dict, n_tokens: int, spec: str) -> dict[str, list[int]]:
    """Stage -> the token rows it holds, for every per-token stage that does not hold all T rows.

    A stage of one row in a step of T > 1 tokens is the last token's row unless declared
    otherwise; any other subset must be declared. Bad declarations are the plug-in's error (exit 2).
    """
    out: dict[str, list[int]] = {}
    for stage, rows in declared.items():
        if stage not in values:
            raise ParityError(f"backend {spec}: 'rows' names {stage!r}, which step() did not return")
        if stage.startswith("state."):
            raise ParityError(f"backend {spec}: 'rows' names {stage!r}, a state slot, which has no token rows")
        try:
            listed = [int(r) for r in rows]
        except (TypeError, ValueError):
            raise ParityError(f"backend {spec}: rows of {stage!r} must be a list of token row indices") from None
        if listed != sorted(set(listed)) or any(not 0 <= r < n_tokens for r in listed):
            raise ParityError(
                f"backend {spec}: rows of {stage!r} must be distinct ascending indices in [0, {n_tokens}), got {listed}"
            )
        held = values[stage].shape
        if not held or held[0] != len(listed):
            raise ParityError(f"backend {spec}: {stage!r} has shape {list(held)} but its rows name {len(listed)} rows")
        out[stage] = listed
    for stage, value in values.items():
        if stage in out or stage.startswith("state.") or KERNEL_RECORD.match(stage):
            continue
        if n_tokens > 1 and value.ndim and value.shape[0] == 1:
            out[stage] = [n_tokens - 1]  # a port's last-token output (prefill returning (1, V) logits)
    return {stage: rows for stage, rows in out.items() if rows != list(range(n_tokens))}


def load_plugin_backend(spec: str, checkpoint: Checkpoint) -> Backend:
    module, _, attribute = spec.rpartition(":")
    if not module or not attribute:
        raise ParityError(f"bad backend {spec!r}: use module:attribute, e.g. my_port.parity:make_backend")
    factory = getattr(import_plugin_module(module), attribute, None)
    if factory is None or not callable(factory):
        raise ParityError(f"{module} has no callable {attribute!r}")
    try:
        impl = factory(checkpoint)
    except ParityError:
        raise
    except Exception as exc:
        raise ParityError(f"backend {spec}: {attribute}(checkpoint) raised {type(exc).__name__}: {exc}") from None
    return PluginBackend(checkpoint, impl=impl, spec=spec)
