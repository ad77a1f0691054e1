"""The result of a parity run, typed: what ``run_parity`` returns and every renderer reads.

One versioned JSON schema (docs/result-format.md). ``RunResult.to_dict()`` writes it;
``RunResult.from_dict()`` reads it back and refuses, in one line, a file that is not a result or
was written by a newer format version. The per-record metrics (``records``) stay plain dicts: they
are ``StageRecord.to_dict()`` of the diff engine, whose fields docs/result-format.md lists.

Pure Python: reports and the CLI read results on machines without torch or tvm.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
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


def _plain(value: Any) -> Any:
    """A typed value back as JSON-able data: typed blocks by their ``to_dict``, containers item by item."""
    if isinstance(value, _Block):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Block:
    """A typed part of a result that reads back exactly what it was given.

    Declared fields are attributes; keys a later (minor) version added, or an engine field no
    renderer needs by name, are kept in ``extra``; and the keys a block was read with are
    remembered, so a key that was absent is not written back (a pair's ``end_to_end`` has no
    ``per_step``; a first release's records lack ``min_atol``). ``NESTED`` names the fields that
    are typed blocks themselves (``[Record]``: a list of them; ``{OwnError}``: a dict of them).
    """

    NESTED: dict[str, Any] = {}
    NULLABLE = False  # as a value of a ``{T}`` dict: null stands for "not run" (``modes``)

    @classmethod
    def from_dict(cls, d: Any):
        if isinstance(d, cls):
            return d  # already typed (a block set on a RunResult as it is assembled)
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__.lower()} must be a JSON object, got {type(d).__name__}")
        names = cls._defaults()
        known = {k: v for k, v in d.items() if k in names}
        _read_nested(cls, known)
        obj = cls(**known)
        obj._keys = list(d)
        obj.extra = {k: v for k, v in d.items() if k not in known}
        return obj

    @classmethod
    def build(cls, d: dict):
        """A block made afresh from ``d`` (a run being assembled, not a file read back): every
        declared field is written, as for a block made with its constructor; unknown keys kept."""
        obj = cls.from_dict(d)
        obj._keys = None
        return obj

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        """Declared field -> its default, in declaration order (made once per class: records are many)."""
        cached = cls.__dict__.get("_DEFAULTS")
        if cached is None:
            cached = {f.name: f.default if f.default is not MISSING else f.default_factory()
                      for f in fields(cls) if f.name != "extra"}
            cls._DEFAULTS = cached
        return cached

    def to_dict(self) -> dict:
        keys = getattr(self, "_keys", None)
        defaults = self._defaults()
        extra = getattr(self, "extra", None) or {}
        out = {}
        # The keys it was read with, in their order; then a declared field set since (or every
        # declared field, for a block made in code); then what a later version added.
        for key in keys if keys is not None else defaults:
            if key in defaults:
                out[key] = _plain(getattr(self, key))
            elif key in extra:
                out[key] = extra[key]
        for key, default in defaults.items():
            if key not in out:
                value = getattr(self, key)
                if value != default:
                    out[key] = _plain(value)
        for key, value in extra.items():
            out.setdefault(key, value)
        return out



def _read_nested(cls, known: dict) -> None:
    """Type, in place, the nested blocks ``cls.NESTED`` names: ``[T]`` a list of T, ``{T}`` a dict of
    T by key, ``T`` one T; absent or null blocks stay as they are."""
    for name, kind in cls.NESTED.items():
        value = known.get(name)
        if value is None:
            continue
        if isinstance(kind, list):
            if not isinstance(value, list):
                raise TypeError(f"{name} must be a list, got {type(value).__name__}")
            known[name] = [kind[0].from_dict(v) for v in value]
        elif isinstance(kind, set):
            if not isinstance(value, dict):
                raise TypeError(f"{name} must be a JSON object, got {type(value).__name__}")
            (typ,) = kind
            # ``modes`` writes null for a mode that did not run: a block type says whether null is one of its values.
            known[name] = {k: None if v is None and typ.NULLABLE else typ.from_dict(v) for k, v in value.items()}
        else:
            known[name] = kind.from_dict(value)

@dataclass
class Record(_Block):
    """One compared (step, stage): StageRecord.to_dict() of the diff engine (docs/result-format.md)."""

    step: int | None = None
    step_kind: str | None = None  # "prefill" | "decode"
    stage: str | None = None
    layer: int | None = None
    passed: bool | None = None
    reason: str | None = None  # why it failed: "tolerance" | "nonfinite" | "shape" | ...
    shape: list[int] | None = None
    actual_shape: list[int] | None = None
    max_abs: float | str | None = None  # metrics: inf/nan are written as strings (strict JSON)
    max_rel: float | str | None = None
    rms_rel: float | str | None = None
    cosine: float | str | None = None
    mismatch_count: int | None = None
    numel: int | None = None
    mismatch_pct: float | str | None = None
    worst_index: list[int] | None = None
    worst_actual: float | str | None = None
    worst_expected: float | str | None = None
    min_atol: float | str | None = None  # the smallest atol that passes at this rtol
    min_rtol: float | str | None = None
    rows: list[int] | None = None  # the token rows compared, where one side holds only some
    rtol: float | None = None
    atol: float | None = None
    atol_base: float | None = None
    scale: float | None = None
    tolerance_reason: str | None = None
    nonfinite_side: str | None = None
    first_nonfinite_index: list[int] | None = None
    nonfinite_same_places: bool | None = None
    nonfinite_count_actual: int | None = None
    nonfinite_count_expected: int | None = None
    row: int | None = None  # the first token row with a finding
    extra: dict = field(default_factory=dict, repr=False)  # fields a later engine adds


@dataclass
class Divergence(Record):
    """Where a comparison first failed: its record, and how it was judged."""

    judged_by: str | None = None  # "replay" | "isolated" | "propagated" | "fp64 arbiter (tvm)" ...
    # The fp64 arbiter's divergence (reason "arbiter"): rms errors against fp64, and the multiplier.
    actual_error: float | None = None
    reference_error: float | None = None
    min_multiplier: float | None = None
    multiplier: float | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class Summary(_Block):
    records: int | None = None
    failed: int | None = None
    worst_logits_max_abs: float | str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class RunInfo(_Block):
    """The ``run`` block: what ran, on what, how (metadata; docs/result-format.md)."""

    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    model: dict | None = None
    backends: list[str] | None = None
    prefill_ids: list[int] | None = None
    decode_ids: list[int] | None = None
    command: str | None = None
    tool_versions: dict | None = None
    created: str | None = None
    dumps: dict | None = None
    backend_labels: dict | None = None  # spec -> how tables name it
    isolation: str | None = None
    timeout_s: float | None = None
    mode: str | None = None
    device: str | None = None
    # A text prompt (parity run --text/--prompt-file/--scenario; parity/scenarios.py run_keys) and greedy decoding
    scenario: dict | str | None = None  # {name, description, source}
    template: str | None = None
    text: str | None = None
    tokenizer_ids: list[int] | None = None
    model_ids: list[int] | None = None  # the ids the model ran: tokenizer ids folded id % V where they did not fit
    vocab_folded: bool | None = None
    warnings: list[str] | None = None
    greedy: dict | None = None  # parity/greedy.py: {steps, yardstick, backends, margins, comparisons, ...}
    extra: dict = field(default_factory=dict, repr=False)  # torch_math, known_differences, partial_dumps, ...

    def label(self, spec: str | None) -> str | None:
        labels = self.backend_labels if isinstance(self.backend_labels, dict) else {}
        return labels.get(spec, spec)


@dataclass
class EndToEnd(_Block):
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
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class Drift(_Block):
    """Propagated error as ratios against the dtype's depth envelope (parity/compare/verdict.py).
    A pair's drift (``comparisons``) holds status, worst_ratio and envelope only."""

    NESTED = {"first_over_tolerance": Divergence, "first_beyond_envelope": Divergence}

    status: str | None = None  # "none" | "within" | "beyond"
    worst_ratio: float | str | None = None
    envelope: float | None = None
    envelope_fraction: float | str | None = None
    envelope_per_layer: float | None = None
    envelope_reason: str | None = None
    worst_stage: str | None = None
    worst_step: int | None = None
    by_layer: list[dict] = field(default_factory=list)  # {layer, ratio, envelope}
    first_over_tolerance: Divergence | None = None  # the propagated comparison's first failing record
    first_beyond_envelope: Divergence | None = None  # step, step_kind, stage, layer, row, max_abs, min_atol, atol
    failed: int = 0
    floor: float | None = None  # the run's rounding floor at the worst record, where it was measured
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class OwnError(_Block):
    """The error each stage of one backend adds itself: a replay or an isolated comparison."""

    NESTED = {"first_divergence": Divergence}

    method: str | None = None  # "replay" | "isolated"
    verdict: str | None = None
    worst_ratio: float | str | None = None
    records: int = 0
    failed: int = 0
    judge: str | None = None  # what the own error is measured against
    backend: str | None = None
    worst_stage: str | None = None
    worst_step: int | None = None
    first_divergence: Divergence | None = None
    not_replayable: list[dict] = field(default_factory=list)  # {step, layer, missing}
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class ModeVerdict(_Block):
    """One capture mode's verdict in ``modes`` (propagated, replay, isolated), side by side."""

    NESTED = {"first_divergence": Divergence, "summary": Summary}
    NULLABLE = True  # a mode that did not run

    verdict: str | None = None
    first_divergence: Divergence | None = None  # that comparison's first failing record
    summary: Summary | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, key: str) -> Any:
        # Reading a mode by key, as code written for the JSON form does (m["first_divergence"]); attributes are the API.
        return getattr(self, key)


@dataclass
class PairResult(_Block):
    NESTED = {"first_divergence": Divergence, "summary": Summary, "drift": Drift, "end_to_end": EndToEnd,
              "records": [Record]}

    expected: str | None = None
    actual: str | None = None
    verdict: str | None = None
    first_divergence: Divergence | None = None
    summary: Summary | None = None
    drift: Drift | None = None  # status, worst_ratio, envelope
    end_to_end: EndToEnd | None = None  # without per_step / kl_rows
    records: list[Record] = field(default_factory=list)  # this pair's propagated comparison
    # The verdict of the steps compared; ``verdict`` is "crashed"/"timed out" when either side failed.
    compared_verdict: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class Crash(_Block):
    """A backend that died or hung in its worker process (parity/dumpers/worker.py)."""

    backend: str | None = None  # the spec (--backends)
    name: str | None = None  # its own name, as tables show it
    kind: str | None = None  # "crashed" | "timed out"
    error: str | None = None  # one line: "died with SIGSEGV", "IndexError: ...", "no step finished within 5 s"
    step: int | None = None  # the step it was running (0 = prefill); None: before its first step
    step_kind: str | None = None
    steps_completed: int = 0  # steps 0..steps_completed-1 were written whole and are compared
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
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class RunResult:
    """Top level: the pair judged first to fail (else the first pair), with its comparison."""

    NESTED = {"first_divergence": Divergence, "summary": Summary, "records": [Record], "end_to_end": EndToEnd,
              "drift": Drift, "own_error": OwnError, "own_errors": {OwnError}, "comparisons": [PairResult],
              "crash": Crash, "crashes": [Crash], "run": RunInfo, "modes": {ModeVerdict}}

    verdict: str
    first_divergence: Divergence | None
    expected: dict  # dump descriptions: backend, mode, dtype, path, ...
    actual: dict
    policy: dict
    steps: list[dict]
    records: list[Record]  # the comparison shown (own error's, or propagated)
    summary: Summary
    missing: list[dict] = field(default_factory=list)
    unmatched_steps: list[dict] = field(default_factory=list)
    not_comparable: list[dict] | None = None  # {step, stage, actual_rows, expected_rows}: no common token row
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
    modes: dict[str, ModeVerdict | None] | None = None  # propagated / replay / isolated -> its verdict, null: not run
    arbiter: list[dict] | None = None
    tolerance_verdict: dict | None = None
    known_differences: list[dict] | None = None
    first_divergence_detail: dict | None = None
    repro: str | None = None
    run: RunInfo = field(default_factory=RunInfo)
    # parity explain / --explain: the likely porting bug (status, summary, fix, evidence, hypotheses, ...)
    explanation: dict | None = None
    extra: dict = field(default_factory=dict)  # keys a later minor addition wrote; kept, not lost

    def __setattr__(self, name: str, value: Any) -> None:
        # A block assembled as plain data (session.py sets ``modes`` as dicts) is typed as it is set,
        # so every reader sees attributes; read as from_dict reads a file: its keys, in their order.
        if name in RunResult.NESTED and value is not None and not isinstance(value, _Block):
            known = {name: value}
            _read_nested(RunResult, known)
            value = known[name]
        object.__setattr__(self, name, value)

    @property
    def passed(self) -> bool:
        return self.first_divergence is None and self.verdict not in FAILURE_VERDICTS

    @property
    def failed(self) -> bool:
        """A divergence, or a backend that crashed or hung: exit 1 either way."""
        return self.first_divergence is not None or self.verdict == "divergence" or self.verdict in FAILURE_VERDICTS

    def label(self, spec: str | None) -> str | None:
        """How tables name backend ``spec``: its ``run.backend_labels`` entry, else the spec."""
        return self.run.label(spec)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"format": {"name": RESULT_FORMAT, "version": RESULT_VERSION}}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in ("first_divergence",):
                continue
            if f.name in ("own_errors", "crashes") and not value:
                continue  # comparisons, by contrast, is always written, also empty: every pair, always
            out[f.name] = _plain(value)
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
            known.setdefault("first_divergence", None)
            known.setdefault("summary", {})
            for name in ("expected", "actual", "policy"):
                known.setdefault(name, {})
            known.setdefault("steps", [])
            _read_nested(cls, known)
            extra = {k: v for k, v in d.items() if k not in known and k != "format"}
            return cls(**known, extra=extra)
        except (TypeError, AttributeError, ValueError) as e:
            raise ParityError(f"a malformed parity result: {e}") from None

