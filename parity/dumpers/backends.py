"""Record a run of each backend into a dump, under the canonical stage names.

A backend here is "a model plus how it is observed": the torch reference with its recorder
hook; the TVM debug build, which returns every stage as an extra output; and the unmodified TVM
build watched through the Relax VM instrument hook. Each one walks the same ``RunPlan`` (same
ids, same steps) and writes one step at a time, so nothing but the current step is in memory.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from parity.checkpoint import Checkpoint
from parity.dumpers.format import DumpWriter, StepWriter
from parity.errors import ParityError
from parity.heap import trim_heap
from parity.stages import stage_order

# Called after each step: (backend name, step index, number of steps).
StepCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunPlan:
    """What every backend runs: one prefill of ``prefill_ids``, then one decode per ``decode_ids``.

    Decode ids are fixed up front (teacher forcing), so every backend sees the same tokens and a
    difference in one step cannot change the input of the next.
    """

    prefill_ids: tuple[int, ...]
    decode_ids: tuple[int, ...] = ()

    def steps(self) -> list[tuple[str, list[int]]]:
        return [("prefill", list(self.prefill_ids))] + [("decode", [i]) for i in self.decode_ids]

    def check(self, *, vocab_size: int) -> None:
        if not self.prefill_ids:
            raise ParityError("no prompt token ids given")
        for i in (*self.prefill_ids, *self.decode_ids):
            if not 0 <= i < vocab_size:
                raise ParityError(f"token id {i} is outside the model's vocabulary [0, {vocab_size})")


def tensor_to_numpy(value) -> np.ndarray:
    """A reference's recorded tensor as numpy, from any device (``.cpu()``: a no-op on the CPU). numpy has
    no bfloat16; fp32 holds every bf16 value exactly."""
    import torch

    value = value.detach()
    return (value.float() if value.dtype == torch.bfloat16 else value).cpu().numpy()


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("rwkv-parity", "torch", "apache-tvm", "numpy", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class StagesOfOneStep:
    """What ``record_step`` writes to, kept in memory: ``StepWriter.add``'s signature, for ``Backend.step``."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        self.arrays[name] = np.asarray(array)


@dataclass
class Backend:
    """Base of every backend: a name, a capture mode, a dtype, ``begin()`` and ``record_step(ids, step)``.

    The same object serves both ways a model is run: ``dump`` (teacher-forced, every step written
    to disk) and ``reset``/``step`` (one step at a time, its stages returned; greedy decoding reads
    the logits from there). Both call ``record_step``, so a backend is written once for both.
    """

    checkpoint: Checkpoint
    name: str = "backend"
    mode: str = "eager"
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)
    extend_stage_order: bool = False

    def canonical_order(self) -> list[str]:
        return stage_order(n_layer=self.checkpoint.config.n_layer, version=self.checkpoint.config.version.value)

    def dump(self, plan: RunPlan, *, path: Path, on_step: StepCallback | None = None) -> Path:
        plan.check(vocab_size=self.checkpoint.config.vocab_size)
        ck = self.checkpoint
        writer = DumpWriter(
            path=path,
            backend=self.name,
            mode=self.mode,
            dtype=self.dtype,
            model=ck.config.to_dict(),
            stage_order=self.canonical_order(),
            checkpoint={"path": str(ck.path), "sha256": ck.sha256},
            tool_versions=tool_versions(),
            extra=self.extra,
            extend_stage_order=self.extend_stage_order,
        )
        steps = plan.steps()
        with writer:
            self.begin()
            for index, (kind, ids) in enumerate(steps):
                with writer.step(kind=kind, ids=ids) as step:
                    self.record_step(ids, step)
                trim_heap()  # the step's arrays are gone; their pages go back (parity/heap.py)
                if on_step:
                    on_step(self.name, index, len(steps))
        return writer.path

    def begin(self) -> None:
        """Reset to the zero state before the first step."""
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the zero state: the start of a run driven step by step."""
        self.begin()

    def step(self, ids: list[int]) -> dict[str, np.ndarray]:
        """Run ``ids`` from the current state; every stage it observes, by name (``logits`` (T, V) always)."""
        stages = StagesOfOneStep()
        self.record_step([int(i) for i in ids], stages)
        return stages.arrays

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The pure-torch reference, observed through its recorder hook."""

    def __init__(self, checkpoint: Checkpoint, *, dtype: str = "float32", model=None, name: str = "reference",
                 weights: str | None = None, device: str = "cpu"):
        from parity.reference import make_reference

        super().__init__(checkpoint=checkpoint, name=name, mode="eager", dtype=dtype)
        # ``device``: where a model made here computes (cpu, cuda); a model handed in stays where it is.
        self.model = model if model is not None else make_reference(checkpoint, dtype=dtype, weights=weights, device=device)
        if weights:
            self.extra = {"weights": weights}  # int8 / q4: the replay quantises its reference the same way
        self.state = None

    def begin(self) -> None:
        self.state = self.model.zero_state()

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        import torch

        def record(stage: str, value: torch.Tensor) -> None:
            step.add(stage, tensor_to_numpy(value))

        _, self.state = self.model.forward(ids, self.state, record=record)


class TVMDebugBackend(Backend):
    """The TVM debug build: the compiled graph also returns every canonical stage."""

    def __init__(
        self, checkpoint: Checkpoint, *, target: str = "llvm", cache_dir: Path | None = None, on_event=None,
        mutant: str | None = None, repeat: bool = False, dtype: str | None = None,
    ):
        from parity.compiled.runtime import CompiledRWKV

        self.model = CompiledRWKV(
            checkpoint, variant="debug", target=target, cache_dir=cache_dir, on_event=on_event, mutant=mutant, repeat=repeat,
            dtype=dtype,
        )
        super().__init__(
            checkpoint=checkpoint, name=self.model.backend_name, mode="debug", dtype=self.model.dtype,
            extra={"target": target, "library": self.model.artifact.library.name, "cached": self.model.artifact.cached,
                   "repeat_check": repeat},
        )
        if self.model.weights_format:  # a quantised build: its replay quantises the reference the same way
            self.extra["weights"] = self.model.weights_format
        self.state = None

    def begin(self) -> None:
        self.state = self.model.zero_state()

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        # Each tap goes to the step as the compiled function makes it, so a long prefill's taps are
        # never all alive at once (issue 9). The array views a buffer the function reuses once the
        # tap is handed over: a StepWriter (also behind the worker's wrapper) puts the bytes on disk
        # at once; anything else (Backend.step's StagesOfOneStep keeps what it is given) gets a copy.
        add = step.add if getattr(step, "writes_at_once", False) else (lambda name, value: step.add(name, value.copy()))
        out = self.model.forward(ids, self.state, on_tap=add)
        self.state = out.state
        for name, value in self.model.state_to_canonical(out.state).items():
            step.add(name, value)


_LAYER_NORM = re.compile(r"^(fused_)?layer_norm\d*$")
_TOKEN_SHIFT = re.compile(r"^(fused_)?token_shift\d*$")
_LAST_ROW = re.compile(r"^(fused_)?last_row\d*$")
_WKV = re.compile(r"^wkv[45]\d*$")


def map_kernel_calls(
    calls: list[tuple[str, int, int, np.ndarray]], *, n_layer: int, n_embd: int
) -> dict[str, np.ndarray]:
    """Name each recorded kernel output: canonical where the mapping is sure, else by kernel.

    Sure mappings rest on kernels that compute exactly one canonical stage and appear exactly
    as often as that stage does, so call order gives the layer: wkv5 (out 0: att.wkv, out 1:
    the new att_kv state) or wkv4 (out 0: att.wkv, outs 1-3: aa, bb, pp), unfused layer_norm (emb, then ln1 / ln2 per layer, then ln_out),
    token_shift (att.shift / ffn.shift per layer) and last_row (the att_x / ffn_x state); where the
    layers' LayerNorms are fused into their GEMVs, the two unfused ones outside the scans (emb, ln_out). A
    kernel fused with anything else no longer computes one stage, so it keeps its own name.
    """
    by_kind: dict[str, list[tuple[str, int, int, np.ndarray]]] = {"ln": [], "shift": [], "last": [], "wkv": []}
    for call in calls:
        symbol = call[0]
        for kind, pattern in (("ln", _LAYER_NORM), ("shift", _TOKEN_SHIFT), ("last", _LAST_ROW), ("wkv", _WKV)):
            if pattern.match(symbol):
                by_kind[kind].append(call)
    names: dict[tuple[int, int], str] = {}
    wkv_calls = sorted({(c[1], c[0]) for c in by_kind["wkv"]})
    if len(wkv_calls) == n_layer:
        for layer, (call_index, symbol) in enumerate(wkv_calls):
            outs = ("aa", "bb", "pp") if symbol.startswith("wkv4") else ("att_kv",)
            names[(call_index, 0)] = f"L{layer}.att.wkv"
            for k, slot in enumerate(outs, start=1):
                names[(call_index, k)] = f"state.L{layer}.{slot}"
    if len(by_kind["ln"]) == 2 * n_layer + 2:
        ln_names = ["emb"] + [f"L{l}.{s}" for l in range(n_layer) for s in ("att.ln1", "ffn.ln2")] + ["ln_out"]
        for name, call in zip(ln_names, by_kind["ln"]):
            names[(call[1], call[2])] = name
    elif len(by_kind["ln"]) == 2 and n_layer >= 2 and len(wkv_calls) == n_layer:
        # Every layer's LayerNorms inside the GEMVs they feed (our CUDA decode step: gemv_cuda.py):
        # the two left are ln0 before the first scan (emb) and ln_out after the last. Only when they
        # sit there: of the layers' own, only L0's ln1 could come before every scan and only the last
        # layer's ln2 after.
        (first, last), scans = by_kind["ln"], [index for index, _ in wkv_calls]
        if first[1] < scans[0] and last[1] > scans[-1]:
            names[(first[1], first[2])], names[(last[1], last[2])] = "emb", "ln_out"
    if len(by_kind["shift"]) == 2 * n_layer:
        shift_names = [f"L{l}.{s}" for l in range(n_layer) for s in ("att.shift", "ffn.shift")]
        for name, call in zip(shift_names, by_kind["shift"]):
            names[(call[1], call[2])] = name
    if len(by_kind["last"]) == 2 * n_layer:
        last_names = [f"state.L{l}.{s}" for l in range(n_layer) for s in ("att_x", "ffn_x")]
        for name, call in zip(last_names, by_kind["last"]):
            names[(call[1], call[2])] = name

    out: dict[str, np.ndarray] = {}
    for symbol, call_index, k, value in calls:
        name = names.get((call_index, k))
        if name is None:
            name = f"kernel.{call_index:03d}.{symbol}" + (f".out{k}" if k else "")
        elif name.endswith("att.wkv"):
            value = value.reshape(value.shape[0], -1)  # wkv5's (T, H, N) -> canonical (T, A)
        out[name] = value
    return out


class TVMInstrumentedBackend(Backend):
    """The unmodified (plain) TVM build, every kernel call observed by the VM instrument hook."""

    def __init__(self, checkpoint: Checkpoint, *, target: str = "llvm", cache_dir: Path | None = None, on_event=None):
        from parity.compiled.runtime import CompiledRWKV

        self.model = CompiledRWKV(checkpoint, variant="plain", target=target, cache_dir=cache_dir, on_event=on_event)
        super().__init__(
            checkpoint=checkpoint, name="tvm", mode="instrumented", dtype="float32",
            extra={"target": target, "library": self.model.artifact.library.name, "cached": self.model.artifact.cached},
            extend_stage_order=True,
        )
        self.state = None

    def begin(self) -> None:
        self.state = self.model.zero_state()

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        calls: list[tuple[str, int, int, np.ndarray]] = []
        out = self.model.forward(ids, self.state, observe=lambda *call: calls.append(call))
        self.state = out.state
        cfg = self.checkpoint.config
        named = map_kernel_calls(calls, n_layer=cfg.n_layer, n_embd=cfg.n_embd)
        # The function's own outputs are sure: logits and every state slot.
        named["logits"] = out.logits
        for name, value in self.model.state_to_canonical(out.state).items():
            named.setdefault(name, value)
        order = {name: i for i, name in enumerate(self.canonical_order())}
        for name in sorted(named, key=lambda n: (order.get(n, len(order)), n)):
            step.add(name, named[name])


DEVICES = {"cpu": "llvm", "cuda": "cuda"}  # --device -> the compiled model's TVM target


def target_for_device(device: str) -> str:
    if device not in DEVICES:
        raise ParityError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda":
        pin_torch_math()
    return DEVICES[device]


def pin_torch_math() -> None:
    """Full-precision fp32 math for torch on a GPU: no TF32 matmuls or convolutions, no reduced-
    precision fp16/bf16 reductions. A "parity bug" that is really TF32 is not one this tool reports."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")


def torch_math_settings() -> dict:
    """The torch math settings in force, for the run metadata."""
    import torch

    m = torch.backends.cuda.matmul
    return {
        "cuda.matmul.allow_tf32": bool(m.allow_tf32),
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda.matmul.allow_fp16_reduced_precision_reduction": bool(m.allow_fp16_reduced_precision_reduction),
        "cuda.matmul.allow_bf16_reduced_precision_reduction": bool(m.allow_bf16_reduced_precision_reduction),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def reference_device_info(device: str) -> dict:
    """Where the torch reference ran, for the run metadata: ``reference_device``, and on a GPU
    ``reference_gpu`` (its name, as torch reports it)."""
    out = {"reference_device": device}
    if device == "cuda":
        import torch

        out["reference_gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return out
