"""rwkv-parity: run RWKV backends side by side and say where they first diverge."""

from __future__ import annotations

__all__ = ["load_result", "load_results"]


def __getattr__(name: str):
    # Lazy on purpose: every `import parity.<sub>` runs this file first, and parity.compare must stay
    # importable with numpy alone (no pandas, torch or tvm pulled in behind its back).
    if name in ("load_result", "load_results"):
        # load_result: one result file as the typed RunResult (parity/results.py); load_results:
        # many, as a pandas DataFrame with a row per record.
        from parity.report import frame

        return getattr(frame, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
