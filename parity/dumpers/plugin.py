"""Backends from outside the package, named on the command line as ``module:attribute``.

The contract (docs/backends.md) is deliberately small: ``attribute`` is a callable taking the
loaded ``Checkpoint`` and returning an object with
    reset() -> None                       start from the zero state
    step(ids: list[int]) -> dict          canonical stage name -> numpy array, for one step
and optionally ``name`` (default: the spec), ``mode`` (default "plugin") and ``dtype`` (default
"float32"). Return whichever canonical stages you can observe — at least ``logits`` (T, V); the
diff engine compares what both sides have and lists the rest. ``module`` may be a dotted module
path on sys.path or a path to a ``.py`` file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

from parity.checkpoint import Checkpoint
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
        super().__init__(
            checkpoint=checkpoint, name=getattr(impl, "name", spec), mode=getattr(impl, "mode", "plugin"),
            dtype=getattr(impl, "dtype", "float32"), extra={"plugin": spec},
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
        order = {n: i for i, n in enumerate(self.canonical_order())}
        unknown = [n for n in stages if n not in order]
        if unknown:
            raise ParityError(f"backend {self.spec} returned non-canonical stage {unknown[0]!r}; see docs/dump-format.md")
        for name in sorted(stages, key=order.__getitem__):
            value = np.asarray(stages[name])
            if value.dtype.kind != "f":
                value = value.astype(np.float32)
            step.add(name, value)


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
