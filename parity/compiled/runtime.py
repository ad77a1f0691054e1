"""Run a compiled RWKV model: bind checkpoint weights, carry state, call prefill/decode.

State crosses the boundary in the canonical layout (docs/RWKV.md §2): ``state.L{l}.att_kv`` is
[head, k-index, v-index], which is also what our wkv5 kernel keeps, and v4's (aa, bb, pp) are
per channel, so the adapter is the identity here — a port whose kernel keeps [h, v, k] would
transpose in ``state_from_canonical`` and ``state_to_canonical``, and nowhere else.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine, VMInstrumentReturnKind

from parity.checkpoint import SUPPORTED_VERSIONS, Checkpoint
from parity.compiled.build import BuildArtifact, build_model
from parity.compiled.dtypes import split_scheme
from parity.errors import ParityError
from parity.heap import trim_heap

# (function symbol, call index within this run, output index, array) for every kernel output.
KernelObserver = Callable[[str, int, int, np.ndarray], None]
# (canonical stage, array) for each debug tap, one at a time, while the compiled function runs. On
# the CPU the array views the VM's buffer, which the function reuses for later values once the
# call returns: a consumer writes the bytes away (StepWriter.add) or copies them before returning.
TapConsumer = Callable[[str, np.ndarray], None]

# The packed function the debug build's prefill and decode hand each tap to as it is made
# (common.py's Taps; the same name there: common.py needs TVM's compiler, this file must not).
TAP_SINK = "parity.tap_sink"
_SINK = threading.local()  # .consumer: the TapConsumer of the call running in this thread
_TOKEN: list = []  # the one 0-d token every sink call returns (made at the first call)


def _tap_sink(name, tensor, *prev):
    consumer = getattr(_SINK, "consumer", None)
    if consumer is None:
        # Only a debug build called outside CompiledRWKV.forward gets here.
        raise RuntimeError(f"{TAP_SINK}: a debug build's tap {name!r} arrived with no consumer set")
    consumer(str(name), tensor)
    if not _TOKEN:
        _TOKEN.append(tvm.runtime.tensor(np.zeros((), "int32")))
    return _TOKEN[0]


tvm.register_global_func(TAP_SINK, _tap_sink, override=True)


_QUANT_PART = re.compile(r"^(.+\.weight)_(q|mx|rx|my|ry|scale)$")


def source_key(param: str) -> str:
    """The checkpoint key a build parameter is made from: itself, or for a quantised Linear's part
    (``blocks.0.att.key.weight_q`` ...; parity/compiled/common.py) the weight it quantises."""
    m = _QUANT_PART.match(param)
    return m.group(1) if m else param


def quantized_parts(weight, *, weights: str, dtype: str) -> dict[str, np.ndarray]:
    """One fp32 (out, in) weight (already divided by its rescale factor) as a quantised build binds
    it, made by the reference's own quantiser so both sides hold the same codes:
    int8 (parity/reference/int8.py): q (out, in) uint8 — the package's (in, out) codes transposed, so
    the matmul reads them along the input axis — and mx, rx (out,), my, ry (in,) in ``dtype``;
    q4 (parity/reference/q4.py): q (out, words) uint32, scale (out, groups) fp16."""
    import torch

    if weights == "int8":
        from parity.reference import int8

        p = int8.quantize(weight)
        out = {"q": p["q"].t().contiguous().numpy()}
        for name in ("mx", "rx", "my", "ry"):
            out[name] = p[name].reshape(-1).to(getattr(torch, dtype)).numpy()
        return out
    from parity.reference import q4

    p = q4.quantize(weight)
    return {"q": p["q"].numpy().astype(np.uint32), "scale": p["scale"].numpy()}


@dataclass
class CompiledState:
    """The recurrent state as device tensors, in the build's slot order (named, never indexed)."""

    slots: dict[str, tvm.runtime.Tensor]

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {name: t.numpy() for name, t in self.slots.items()}


@dataclass
class StepOutput:
    logits: np.ndarray  # (T, V) fp32
    state: CompiledState
    taps: dict[str, np.ndarray]  # debug build only: canonical stage -> value


class CompiledRWKV:
    """A TVM-compiled RWKV (v4 or v5.x) with explicit state. ``variant="debug"`` also returns every stage."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        variant: str = "plain",
        target: str = "llvm",
        cache_dir: Path | None = None,
        on_event: Callable[[str], None] | None = None,
        artifact: BuildArtifact | None = None,
        mutant: str | None = None,
        repeat: bool = False,
        dtype: str | None = None,
    ):
        """``dtype``: what the build computes in (float32, float16, bfloat16); a mutant's own by default."""
        cfg = checkpoint.config
        if dtype is None:
            if mutant is not None:
                from parity.mutants import get_mutant

                dtype = get_mutant(mutant).dtype
            else:
                dtype = "float32"
        if cfg.version not in SUPPORTED_VERSIONS:
            raise ParityError(f"no compiled model for RWKV-{cfg.version.value}")
        self.config = cfg
        self.variant = variant
        self.target = target
        if target != "llvm":
            from parity.compiled.build import default_cache_dir
            from parity.compiled.cuda import ensure_cuda_runtime

            # Before any build: no GPU is a one-line error, not minutes of compiling first. The
            # fatbin cache the loader reads is the compile cache's (cuda.py).
            ensure_cuda_runtime(cache_dir=Path(cache_dir or default_cache_dir()))
        self.artifact = artifact or build_model(
            cfg, variant=variant, target=target, cache_dir=cache_dir, on_event=on_event, mutant=mutant, dtype=dtype
        )
        if not self.artifact.cached:
            # A compile here (the first run of a model) frees its IR and LLVM's memory into the C
            # heap, which keeps it: hand it back before the weights come in (parity/heap.py). Seen
            # as the first run's peak, a 0.1B worker at 1.47 GB with a 512-token prompt (issue 9).
            trim_heap()
        # A quantisation scheme (fp16i8, q4f16_1 ...) computes in its activation dtype: that is the
        # build's ``dtype`` to everything that judges it; ``weights_format`` says how it stores weights.
        self.scheme = self.artifact.meta.get("dtype", "float32")
        self.dtype, self.weights_format = split_scheme(self.scheme)
        suffix = {"float32": "", "float16": "@fp16", "bfloat16": "@bf16"}.get(self.scheme, f"@{self.scheme}")
        self.backend_name = f"mutant/{mutant}" if mutant else f"tvm{suffix}"
        # repeat: run every call twice from the same inputs and keep the second — a kernel that
        # writes into its input buffers then shows as a divergence (a pure one cannot).
        self.repeat = repeat
        meta = self.artifact.meta
        if target == "llvm":
            self.device = tvm.cpu()
        else:
            from parity.compiled.cuda import ensure_cuda_runtime

            self.device = ensure_cuda_runtime(cache_dir=self.artifact.library.parent)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.artifact.library)), self.device)
        groups = meta.get("param_groups", {})  # stacked parameters (build.py): name -> checkpoint keys
        missing = [k for n in meta["params"] for k in groups.get(n, [source_key(n)]) if k not in checkpoint.weights]
        if missing:
            raise ParityError(f"checkpoint {checkpoint.path} lacks {missing[0]!r}, which the compiled model needs")
        # The compiled model is fp32 throughout (weights stored bf16 on disk). On the CPU it binds
        # the checkpoint's one shared fp32 copy zero-copy through DLPack (the reference reads the
        # same tensors; the compiled functions never write their params); a GPU needs its own copy.
        fp32 = checkpoint.fp32_weights()
        for n, keys in groups.items():
            # The plain CUDA build's grouped attention (rwkv5_model.group_projections): its checkpoint
            # tensors stacked along a new first axis, in fp32, then bound as any other parameter.
            parts = [fp32[k] for k in keys]
            if isinstance(parts[0], np.ndarray):
                fp32[n] = np.stack(parts)
            else:
                import torch

                fp32[n] = torch.stack(parts)
        if self.scheme == "float32":
            if target == "llvm":
                self.params = [tvm.runtime.from_dlpack(fp32[n]) for n in meta["params"]]
            else:
                self.params = [tvm.runtime.tensor(fp32[n].numpy(), self.device) for n in meta["params"]]
        elif self.weights_format is None:
            self.params = [self._low_precision_param(fp32[n], dtype=d, scale=meta["param_scales"].get(n, 1.0))
                           for n, d in zip(meta["params"], meta["param_dtypes"])]
        else:
            parts: dict[str, dict[str, np.ndarray]] = {}  # source weight -> its quantised parts, made once
            self.params = []
            for n, d in zip(meta["params"], meta["param_dtypes"]):
                key = source_key(n)
                scale = meta["param_scales"].get(key, 1.0)
                if key == n:
                    self.params.append(self._low_precision_param(fp32[n], dtype=d, scale=scale))
                    continue
                if key not in parts:
                    parts[key] = quantized_parts(fp32[key] / scale if scale != 1.0 else fp32[key],
                                                 weights=self.weights_format, dtype=self.dtype)
                value = parts[key][n[len(key) + 1:]]
                if str(value.dtype) != d:
                    raise ParityError(f"{n}: the build expects {d}, the quantiser made {value.dtype}")
                self.params.append(tvm.runtime.tensor(value, self.device))
        self.slot_names: list[str] = meta["state_slots"]
        self.tap_names: list[str] = meta["tap_names"]
        self.kernel_outputs: dict[str, list[int]] = meta["kernel_outputs"]

    def _low_precision_param(self, weight, *, dtype: str, scale: float) -> tvm.runtime.Tensor:
        """One parameter of an fp16/bf16 build, made as the torch reference makes it: divided by its
        rescale factor in fp32 (a power of two), then rounded to the build's dtype once. Its own copy
        (the shared fp32 one is never written); bf16 goes through DLPack (numpy has no bfloat16).
        ``weight`` is a torch tensor, or in a torch-free worker (MappedCheckpoint) a numpy array,
        rounded by numpy then: the same IEEE division and round-to-nearest-even (tests/compiled)."""
        if isinstance(weight, np.ndarray):
            from parity.checkpoint import aligned_empty

            t = aligned_empty(weight.shape, dtype)  # numpy's 16-byte alignment is not TVM's 64
            with np.errstate(over="ignore"):  # beyond fp16's range is inf, as torch makes it (silently)
                t[...] = weight / np.float32(scale) if scale != 1.0 else weight
        else:
            import torch

            t = weight / scale if scale != 1.0 else weight
            t = t.to(getattr(torch, dtype)).contiguous()
        host = tvm.runtime.from_dlpack(t)
        if self.target == "llvm":
            return host  # the DLPack capsule keeps ``t`` alive
        out = tvm.runtime.empty(t.shape, dtype, self.device)
        out.copyfrom(host)
        return out

    # -- state ----------------------------------------------------------------------------------
    def zero_state(self) -> CompiledState:
        meta = self.artifact.meta
        return CompiledState({
            n: tvm.runtime.tensor(np.full(shape, fill, "float32"), self.device)
            for n, shape, fill in zip(self.slot_names, meta["state_shapes"], meta["state_fill"])
        })

    def state_from_canonical(self, arrays: dict[str, np.ndarray]) -> CompiledState:
        return CompiledState(
            {n: tvm.runtime.tensor(np.ascontiguousarray(arrays[n], dtype="float32"), self.device) for n in self.slot_names}
        )

    def state_to_canonical(self, state: CompiledState) -> dict[str, np.ndarray]:
        return state.to_numpy()

    # -- running --------------------------------------------------------------------------------
    def _ids(self, ids) -> tvm.runtime.Tensor:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise ParityError("no token ids given")
        bad = arr[(arr < 0) | (arr >= self.config.vocab_size)]
        if bad.size:
            # The compiled gather does no bounds check: an out-of-range id would read arbitrary memory.
            raise ParityError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")
        return tvm.runtime.tensor(arr.astype("int32"), self.device)

    def forward(self, ids, state: CompiledState | None = None, *, observe: KernelObserver | None = None,
                on_tap: TapConsumer | None = None) -> StepOutput:
        """Run T tokens: ``prefill`` for T > 1, ``decode`` for T = 1. The input state is not modified.

        The debug build hands each tap to ``TAP_SINK`` while the function runs, in ``tap_names``
        order, and reuses its buffer after its last use in the graph (common.py's Taps), so a
        long prefill's taps (~0.6 GB at 512 tokens of a 0.1B model) are never all alive at once
        (issue 9). ``on_tap`` receives each as it comes: on the CPU a zero-copy view of the VM's
        buffer, valid only until ``on_tap`` returns (see TapConsumer), on a GPU a copy; the
        returned ``taps`` is then empty and ``logits`` a view of the function's output. Without
        ``on_tap`` each tap is copied into ``taps``.
        """
        tids = self._ids(ids)
        state = state or self.zero_state()
        fn = "decode" if tids.shape[0] == 1 else "prefill"
        taps: dict[str, np.ndarray] = {}
        streamed = on_tap is not None
        if on_tap is None:
            def on_tap(name: str, value: np.ndarray) -> None:
                taps[name] = np.array(value)  # a copy: the VM may reuse a buffer the view shows

        def hand_over(name: str, tensor: tvm.runtime.Tensor) -> None:
            on_tap(name, self._host_view(tensor))

        if observe is not None:
            self.vm.set_instrument(self._instrument(observe))
        try:
            args = (tids, [state.slots[n] for n in self.slot_names], *self.params)
            if self.repeat:
                _SINK.consumer = lambda name, tensor: None  # the first run's taps are not the step's
                self.vm[fn](*args)
            _SINK.consumer = hand_over
            out = self.vm[fn](*args)
        finally:
            _SINK.consumer = None
            if observe is not None:
                self.vm.set_instrument(lambda *a: VMInstrumentReturnKind.NO_OP)
        new_state = CompiledState(dict(zip(self.slot_names, list(out[1]))))
        # Streamed, the logits come back as a view, not a copy: a (T, V) copy at T = 512 is another
        # 134 MB at 0.1B (the same array as the "logits" tap the consumer was handed).
        logits = self._host_view(out[0]) if streamed else out[0].numpy()
        return StepOutput(logits=logits, state=new_state, taps=taps)

    def _host_view(self, tensor: tvm.runtime.Tensor) -> np.ndarray:
        """A host array of ``tensor``: on the CPU a zero-copy view (DLPack; it keeps the tensor
        alive while it lives), on a GPU a copy."""
        if self.target == "llvm":
            return np.from_dlpack(tensor)
        return tensor.numpy()

    # -- isolated (teacher-forced) pieces: debug build only -----------------------------------
    def _require_pieces(self) -> None:
        if self.variant != "debug":
            raise ParityError("isolated runs need the debug build (variant='debug'), which exports the model in pieces")

    def _tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.ascontiguousarray(array, dtype="float32"), self.device)

    def iso_embed(self, ids) -> dict[str, np.ndarray]:
        self._require_pieces()
        out = self.vm["iso_embed"](self._ids(ids), *self.params)
        return dict(zip(self.artifact.meta["function_taps"]["iso_embed"], (t.numpy() for t in out[1])))

    def iso_layer(self, layer: int, x: np.ndarray, layer_state: dict[str, np.ndarray]):
        """Layer ``layer`` alone on input ``x`` (T, C) and its state slots (canonical names without
        the ``state.L<l>.`` prefix). Returns (taps incl. every L<layer>.* stage, new state by canonical name)."""
        self._require_pieces()
        slots = [n.split(".", 2)[2] for n in self.slot_names if n.startswith(f"state.L{layer}.")]
        args = (self._tensor(x), [self._tensor(layer_state[s]) for s in slots], *self.params)
        if self.repeat:
            self.vm[f"iso_layer_{layer}"](*args)
        out = self.vm[f"iso_layer_{layer}"](*args)
        taps = dict(zip(self.artifact.meta["function_taps"][f"iso_layer_{layer}"], (t.numpy() for t in out[2])))
        new_state = {f"state.L{layer}.{s}": t.numpy() for s, t in zip(slots, list(out[1]))}
        return taps, new_state

    def iso_head(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self._require_pieces()
        out = self.vm["iso_head"](self._tensor(x), *self.params)
        return dict(zip(self.artifact.meta["function_taps"]["iso_head"], (t.numpy() for t in out[1])))

    def _instrument(self, observe: KernelObserver):
        counter = [0]
        outputs = self.kernel_outputs

        def hook(func, symbol, before_run, ret_value, *args):
            symbol = str(symbol)
            if before_run or symbol.startswith("vm.builtin.") or symbol not in outputs:
                return VMInstrumentReturnKind.NO_OP
            for k, i in enumerate(outputs[symbol]):
                if i < len(args) and hasattr(args[i], "numpy"):
                    # Copy now: the VM reuses these buffers for later kernels.
                    observe(symbol, counter[0], k, args[i].numpy().copy())
            counter[0] += 1
            return VMInstrumentReturnKind.NO_OP

        return hook

