"""A CUDA decode step without most of its launch overhead: two ways, both measured by benchmarks/gpu.py.

A decode step of the plain CUDA build launches about 40 kernels a layer (950 in the 0.4B fp16
build, counted in its lowered Relax), each a Relax VM instruction plus a driver launch. Two ways
take most of them out:

``build_graph_model`` — the plain CUDA build compiled with Relax's own RewriteCUDAGraph (the
PassContext option ``relax.backend.use_cuda_graph``, which TVM 0.27's CUDA pipeline already
carries and leaves off). TVM lifts every run of kernels whose inputs are static (weights, memory
it planned itself) into a function it captures once and replays (``vm.builtin.cuda_graph.
run_or_capture``, in the runtime bundle too); kernels that read the step's inputs (ids, the
state) or write its outputs stay plain launches (0.4B fp16: 74 graph replays + about 230 launches).
Its own cache entry beside the plain build's (``...-plain-cudagraph-<same key>.so``). The parity
harness keeps the plain build: the VM instrument sees each kernel it runs, and a replayed graph's
kernels are invisible to it.

``GraphDecoder`` — the whole decode step of any CUDA build captured in one torch CUDA graph:
the VM's launches go to torch's capture stream (``tvm_ffi.use_torch_stream``), the new state is
copied back into the step's input buffers inside the graph, and a replay is one launch. This
relies on the VM allocating nothing new once warm (its pooled allocator hands the same blocks
back), which the capture checks for us: a cudaMalloc while capturing fails the capture. Its
replays write the step's intermediates into blocks that the pool (one per process, shared by
every VM) has taken back: while a GraphDecoder is in use, run nothing else on this process's CUDA
VMs — a benchmark's tool, not the harness's.

Neither changes a kernel: the GPU tests check that both give the plain build's logits and state
bit for bit (tests/compiled/test_gpu.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from parity.checkpoint import ModelConfig
from parity.errors import ParityError

GRAPH_CONFIG = {"relax.backend.use_cuda_graph": True}


def graph_entry_path(config: ModelConfig, *, dtype: str = "float32", cache_dir: Path | None = None) -> Path:
    """The graph build's library: the plain CUDA build's name with ``cudagraph`` for ``cuda``. Its
    key is the plain build's (every source, build.py and this file's option are the same), so it
    is rebuilt whenever the plain build would be."""
    from parity.compiled.build import entry_path

    plain = entry_path(config, variant="plain", target="cuda", dtype=dtype, cache_dir=cache_dir)
    return plain.with_name(plain.name.replace("-plain-cuda-", "-plain-cudagraph-"))


def build_graph_model(
    config: ModelConfig, *, dtype: str = "float32", cache_dir: Path | None = None,
    on_event: Callable[[str], None] | None = None,
):
    """The plain CUDA build with RewriteCUDAGraph on (a BuildArtifact; CompiledRWKV(artifact=...) runs it)."""
    import tvm

    from parity.cache_lock import build_once
    from parity.compiled import build

    say = on_event or (lambda msg: None)
    lib_path = graph_entry_path(config, dtype=dtype, cache_dir=cache_dir)
    meta_path = lib_path.with_suffix(".json")

    def ready():
        meta = build._read_sidecar(meta_path) if lib_path.exists() else None
        if meta is None or build._entry_fault(lib_path, meta) is not None:
            return None
        say(f"compile cache hit: {lib_path.name}")
        return build.BuildArtifact(library=lib_path, meta=meta, cached=True)

    def compile_it():
        # The option is read by RewriteCUDAGraph from the current PassContext, inside build.py's pipeline.
        with tvm.transform.PassContext(config=GRAPH_CONFIG):
            art = build._compile_entry(config, variant="plain", target="cuda", mutant=None, dtype=dtype,
                                       lib_path=lib_path, say=say)
        art.meta["cuda_graph"] = "relax RewriteCUDAGraph"
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(art.meta, indent=1))
        os.replace(tmp, meta_path)  # atomic, as build.py's own sidecar
        return art

    return build_once(lib_path, ready=ready, on_wait=say, build=compile_it)


class GraphDecoder:
    """One CompiledRWKV's decode step captured whole in a torch CUDA graph, state carried on the GPU.

    ``step(token)`` runs one decode step from the carried state and returns nothing (the logits
    stay on the GPU in ``logits``; ``state_numpy()`` and ``logits_numpy()`` copy them out).
    """

    def __init__(self, model, *, state=None):
        import torch
        import tvm_ffi

        if model.target != "cuda":
            raise ParityError("GraphDecoder captures a CUDA build; this one is for " + model.target)
        self.model = model
        self._torch = torch
        self.ids = model._ids([0])  # the graph's input token: written before each replay
        start = state or model.zero_state()
        # Buffers of the graph's own: the captured step reads these and writes the new state back into them.
        self.state = [model.state_from_canonical(model.state_to_canonical(start)).slots[n] for n in model.slot_names]
        self._ids_t = torch.from_dlpack(self.ids)
        self._state_t = [torch.from_dlpack(t) for t in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm-up on a side stream (as torch's graph docs ask): the VM's pool then holds every block
        # the step allocates, and each CUDA module is loaded. The input state is not modified.
        with tvm_ffi.use_torch_stream(torch.cuda.stream(side)):
            for _ in range(2):
                model.vm["decode"](self.ids, self.state, *model.params)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with tvm_ffi.use_torch_stream(torch.cuda.graph(self.graph)):
            out = model.vm["decode"](self.ids, self.state, *model.params)
            for dst, src in zip(self._state_t, list(out[1])):
                dst.copy_(torch.from_dlpack(src))
        # Held for the graph's lifetime: its replays write these blocks, which must not go back to the pool.
        self._out = out
        self.logits = out[0]

    def step(self, token: int) -> None:
        self._ids_t.fill_(int(token))
        self.graph.replay()

    def sync(self) -> None:
        self._torch.cuda.synchronize()

    def logits_numpy(self):
        self.sync()
        return self.logits.numpy()

    def state_numpy(self) -> dict:
        self.sync()
        return {n: t.numpy() for n, t in zip(self.model.slot_names, self.state)}
