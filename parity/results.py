"""The result of a parity run, typed: what ``run_parity`` returns and every renderer reads.

One versioned JSON schema (docs/result-format.md). ``RunResult.to_dict()`` writes it;
``RunResult.from_dict()`` reads it back and refuses, in one line, a file that is not a result or
was written by a newer format version. The per-record metrics (``records``) stay plain dicts: they
are ``StageRecord.to_dict()`` of the diff engine, whose fields docs/result-format.md lists.

Pure Python: reports and the CLI read results on machines without torch or tvm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from parity.errors import ParityError

RESULT_FORMAT = "rwkv-parity-result"
# 1: the first release (no "format" key). 2: verdict kinds, own_error(s), drift, end_to_end, pair.
# 3: a backend that crashed or hung is a verdict of its own ("crashed", "timed out"; crash,
# crashes); comparisons is always present (every pair, with its records); notes.
RESULT_VERSION = 3

VERDICTS = ("no divergence", "divergence", "drift beyond envelope", "crashed", "timed out")
FAILURE_VERDICTS = ("crashed", "timed out")


def _pick(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class EndToEnd:
    """Next-token metrics over the logits rows of one comparison (parity/compare/endtoend.py)."""

    rows: int = 0
    kl_mean: float | str | None = None  # nats; "inf" where a row is non-finite
    kl_max: float | str | None = None
    kl_p999: float | str | None = None
    top1_agreement: float | None = None  # near-ties count as agreement
    top1_flips: int = 0
    top1_ties: int = 0
    top5_overlap: float | None = None
    cosine_min: float | str | None = None
    per_step: list[dict] = field(default_factory=list)  # {step, rows, kl_max, top1_agreement, top1_flips}
    kl_rows: list[float | str] = field(default_factory=list)  # every row's KL, for corpus percentiles


@dataclass
class Drift:
    """Propagated error as ratios against the dtype's depth envelope (parity/compare/verdict.py)."""

    status: str  # "none" | "within" | "beyond"
    worst_ratio: float | str
    envelope: float
    envelope_fraction: float | str
    envelope_per_layer: float
    envelope_reason: str
    worst_stage: str | None = None
    worst_step: int | None = None
    by_layer: list[dict] = field(default_factory=list)  # {layer, ratio, envelope}
    first_over_tolerance: dict | None = None
    first_beyond_envelope: dict | None = None
    failed: int = 0
    floor: float | None = None  # the run's rounding floor at the worst record, where it was measured


@dataclass
class OwnError:
    """The error each stage of one backend adds itself: a replay or an isolated comparison."""

    method: str  # "replay" | "isolated"
    verdict: str | None
    worst_ratio: float | str
    records: int
    failed: int
    judge: str | None = None  # what the own error is measured against
    backend: str | None = None
    worst_stage: str | None = None
    worst_step: int | None = None
    first_divergence: dict | None = None
    not_replayable: list[dict] = field(default_factory=list)  # {step, layer, missing}


@dataclass
class PairResult:
    expected: str
    actual: str
    verdict: str
    first_divergence: dict | None
    summary: dict
    drift: dict | None = None  # status, worst_ratio, envelope
    end_to_end: dict | None = None  # EndToEnd without per_step / kl_rows
    records: list[dict] = field(default_factory=list)  # StageRecord.to_dict() of this pair's propagated comparison
    # The verdict of the steps compared; ``verdict`` is "crashed"/"timed out" when either side failed.
    compared_verdict: str | None = None


@dataclass
class Crash:
    """A backend that died or hung in its worker process (parity/dumpers/worker.py)."""

    backend: str  # the spec (--backends)
    name: str  # its own name, as tables show it
    kind: str  # "crashed" | "timed out"
    error: str  # one line: "died with SIGSEGV", "IndexError: ...", "no step finished within 5 s"
    step: int | None  # the step it was running (0 = prefill); None: before its first step
    step_kind: str | None
    steps_completed: int  # steps 0..steps_completed-1 were written whole and are compared
    last_stage: dict | None = None  # {step, stage}: the last stage it recorded
    kernel: str | None = None  # the compiled kernel it had entered last (TVM debug builds)
    kernel_call: int | None = None  # which call of that kernel in the step (1: the first; layer order)
    signal: str | None = None  # "SIGSEGV", "SIGABRT", ...
    exitcode: int | None = None
    error_type: str | None = None
    traceback: str | None = None  # Python traceback (exception) or faulthandler's stack (signal)
    timeout_s: float | None = None
    partial_dump: str | None = None  # its unfinished dump (complete: false), kept with --dump-dir
    compared: dict | None = None  # {against, steps, verdict, first_divergence}: its finished steps' verdict


@dataclass
class RunResult:
    """Top level: the pair judged first to fail (else the first pair), with its comparison."""

    verdict: str
    first_divergence: dict | None
    expected: dict  # dump descriptions: backend, mode, dtype, path, ...
    actual: dict
    policy: dict
    steps: list[dict]
    records: list[dict]  # StageRecord.to_dict() of the comparison shown (own error's, or propagated)
    summary: dict
    missing: list[dict] = field(default_factory=list)
    unmatched_steps: list[dict] = field(default_factory=list)
    mode: str = "propagated"  # which comparison ``records`` is: propagated | replay | isolated
    pair: dict | None = None  # {expected, actual}: the backend specs of this pair
    end_to_end: EndToEnd | None = None
    drift: Drift | None = None
    own_error: OwnError | None = None
    own_errors: dict[str, OwnError] = field(default_factory=dict)
    comparisons: list[PairResult] = field(default_factory=list)
    crash: Crash | None = None  # the first backend that crashed or hung; the verdict is its kind
    crashes: list[Crash] = field(default_factory=list)
    notes: list[dict] | None = None  # {backend, note}: what backends say about themselves
    odd_one_out: dict | None = None
    modes: dict | None = None
    arbiter: list[dict] | None = None
    tolerance_verdict: dict | None = None
    known_differences: list[dict] | None = None
    first_divergence_detail: dict | None = None
    repro: str | None = None
    run: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # keys a later minor addition wrote; kept, not lost

    @property
    def passed(self) -> bool:
        return self.first_divergence is None and self.verdict not in FAILURE_VERDICTS

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"format": {"name": RESULT_FORMAT, "version": RESULT_VERSION}}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in ("first_divergence",):
                continue
            if f.name == "own_errors":
                value = {k: asdict(v) for k, v in value.items()}
                if not value:
                    continue
            elif f.name == "comparisons":
                value = [asdict(c) for c in value]  # always written, also empty: every pair, always
            elif f.name == "crashes":
                value = [asdict(c) for c in value]
                if not value:
                    continue
            elif hasattr(value, "__dataclass_fields__"):
                value = asdict(value)
            out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        if not isinstance(d, dict) or "verdict" not in d or "records" not in d:
            raise ParityError("not a parity result: a result JSON has 'verdict' and 'records' (docs/result-format.md)")
        fmt = d.get("format") or {"name": RESULT_FORMAT, "version": 1}
        if not isinstance(fmt, dict) or fmt.get("name") != RESULT_FORMAT or not isinstance(fmt.get("version"), int):
            raise ParityError(f"not a parity result: unknown format {fmt!r}")
        if fmt["version"] > RESULT_VERSION:
            raise ParityError(f"this result was written by a newer rwkv-parity (result format {fmt['version']}); "
                              f"this one reads formats up to {RESULT_VERSION}: upgrade rwkv-parity")
        try:
            known = _pick(cls, d)
            for name, typ in (("end_to_end", EndToEnd), ("drift", Drift), ("own_error", OwnError), ("crash", Crash)):
                if isinstance(known.get(name), dict):
                    known[name] = typ(**_pick(typ, known[name]))
            known["own_errors"] = {k: OwnError(**_pick(OwnError, v)) for k, v in (d.get("own_errors") or {}).items()}
            known["comparisons"] = [PairResult(**_pick(PairResult, c)) for c in d.get("comparisons") or []]
            known["crashes"] = [Crash(**_pick(Crash, c)) for c in d.get("crashes") or []]
            extra = {k: v for k, v in d.items() if k not in known and k != "format"}
            return cls(**known, extra=extra)
        except (TypeError, AttributeError, ValueError) as e:
            raise ParityError(f"a malformed parity result: {e}") from None
