"""GPU speed: the CUDA build vs torch on the same GPU, at released RWKV-5.2 shapes, fp32 and fp16.

    python benchmarks/gpu.py --out DIR [--shapes 0.4b,1.5b] [--dtypes float32,float16] [--cache-dir DIR] [--commit SHA]

For each shape and dtype (random weights: speed does not depend on their values): decode ms/token
(the mean of --decode-steps steps after a warm-up, state carried, no host copies inside the timed
loop) and prefill tokens/s (one --prefill-len prompt), for
    tvm-cuda           the plain CUDA build of parity/compiled (DLight + the hand-scheduled wkv5),
                       each kernel a Relax VM call and a launch
    tvm-relax-graph    the same model built with Relax's RewriteCUDAGraph (parity/compiled/
                       cuda_graph.py): static runs of kernels captured once and replayed
    tvm-step-graph     the plain build's whole decode step captured in one torch CUDA graph
                       (cuda_graph.GraphDecoder)
    torch-eager        a plain torch RWKV-5.2 (below) in the dtype, TF32 off
    torch-cuda-graph   the same torch decode step captured once in a CUDA graph and replayed
and the effective bandwidth of each decode as a fraction of the HBM roofline: the bytes of every
weight the TVM build's decode step reads, in the dtype it binds each one in (all but the fp32
embedding table, of which it reads one row) / decode time / --hbm-tbs. Also, at the first shape
in fp32, the harness's own overhead: a full-dump `reference,tvm` parity run on CUDA ÷ (a bare
torch reference run + a bare CUDA-build run) of the same plan, from a checkpoint file, with the
run's event timeline (where the time goes): `parity run` and two bare scripts as fresh processes
(what a user waits for), and run_parity called in this process, with worker processes and without.

Writes DIR/gpu-bench.json and DIR/gpu-bench.md (with the date, commit, GPU name and command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parity.checkpoint import Checkpoint, expected_shapes  # noqa: E402
from parity.dumpers.backends import pin_torch_math, torch_math_settings  # noqa: E402
from parity.synth import shape_config  # noqa: E402


def random_weights(config, *, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """fp32 weights of the right shapes with sane magnitudes (finite everything, decays in (0, 1)),
    drawn on ``device`` and returned on the CPU (drawing 1.5B values is seconds on a GPU, tens of
    seconds on a busy CPU; speed does not depend on which values)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in expected_shapes(config).items():
        if key.endswith("time_decay"):
            t = torch.rand(shape, generator=gen, device=device) * 5 - 6
        elif "time_mix" in key:
            t = torch.rand(shape, generator=gen, device=device)
        elif key.startswith(("ln", "blocks")) and (".ln" in key or key.startswith("ln")):
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen, device=device) * (0.1 if "time_" in key else 1 / math.sqrt(shape[-1]))
        out[key] = t.float().cpu().contiguous()
    return out


class TorchRWKV5:
    """RWKV-5.2 in plain torch on one device: the decode step a port would write, eager."""

    def __init__(self, w: dict[str, torch.Tensor], config, device: str, dtype: torch.dtype = torch.float32):
        self.c = config
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in w.items()}
        self.dtype = dtype
        L = config.n_layer
        self.decay = [torch.exp(-torch.exp(self.w[f"blocks.{i}.att.time_decay"])).view(config.n_head, config.head_size, 1) for i in range(L)]
        self.u = [self.w[f"blocks.{i}.att.time_faaaa"].view(config.n_head, config.head_size, 1) for i in range(L)]
        self.device = device

    def zero_state(self):
        C, H, N = self.c.n_embd, self.c.n_head, self.c.head_size
        z = lambda *s: torch.zeros(*s, device=self.device, dtype=self.dtype)  # noqa: E731
        return [[z(C), z(H, N, N), z(C)] for _ in range(self.c.n_layer)]

    def _ln(self, x, p):
        return F.layer_norm(x, (x.shape[-1],), self.w[p + ".weight"], self.w[p + ".bias"], 1e-5)

    def forward(self, ids: torch.Tensor, state) -> torch.Tensor:
        """ids (T,) on the device; the state is updated in place (so a CUDA graph can own it)."""
        c, w = self.c, self.w
        H, N, C = c.n_head, c.head_size, c.n_embd
        x = self._ln(w["emb.weight"][ids], "blocks.0.ln0")
        T = x.shape[0]
        for i in range(c.n_layer):
            p = f"blocks.{i}."
            att_x, kv, ffn_x = state[i]
            xx = self._ln(x, p + "ln1")
            sx = torch.cat([att_x.view(1, C), xx[:-1]])
            mix = lambda name: xx * w[p + f"att.time_mix_{name}"].view(C) + sx * (1 - w[p + f"att.time_mix_{name}"].view(C))  # noqa: E731
            r = (mix("r") @ w[p + "att.receptance.weight"].T).view(T, H, 1, N)
            k = (mix("k") @ w[p + "att.key.weight"].T).view(T, H, N, 1)
            v = (mix("v") @ w[p + "att.value.weight"].T).view(T, H, 1, N)
            g = F.silu(mix("g") @ w[p + "att.gate.weight"].T)
            outs = []
            s = kv
            for t in range(T):
                a = k[t] @ v[t]  # (H, N, N)
                outs.append(r[t] @ (self.u[i] * a + s))
                s = a + self.decay[i] * s
            kv.copy_(s)
            att_x.copy_(xx[-1])
            y = torch.cat(outs).view(T, C)
            y = F.group_norm(y, H, w[p + "att.ln_x.weight"], w[p + "att.ln_x.bias"], 64e-5)
            x = x + (y * g) @ w[p + "att.output.weight"].T
            xx = self._ln(x, p + "ln2")
            sx = torch.cat([ffn_x.view(1, C), xx[:-1]])
            xk = xx * w[p + "ffn.time_mix_k"].view(C) + sx * (1 - w[p + "ffn.time_mix_k"].view(C))
            xr = xx * w[p + "ffn.time_mix_r"].view(C) + sx * (1 - w[p + "ffn.time_mix_r"].view(C))
            kk = torch.relu(xk @ w[p + "ffn.key.weight"].T) ** 2
            x = x + torch.sigmoid(xr @ w[p + "ffn.receptance.weight"].T) * (kk @ w[p + "ffn.value.weight"].T)
            ffn_x.copy_(xx[-1])
        return self._ln(x, "ln_out") @ w["head.weight"].T


def _timed(fn, *, sync, repeat: int) -> float:
    """Mean seconds per call of fn over ``repeat`` calls, after two warm-up calls."""
    fn()
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def bench_torch(w, config, *, prefill_len: int, steps: int, dtype: str) -> dict:
    m = TorchRWKV5(w, config, "cuda", getattr(torch, dtype))
    sync = torch.cuda.synchronize
    ids = torch.randint(0, config.vocab_size, (prefill_len,), device="cuda")
    one = ids[:1].clone()
    state = m.zero_state()
    with torch.no_grad():
        decode_s = _timed(lambda: m.forward(one, state), sync=sync, repeat=steps)
        prefill_s = _timed(lambda: m.forward(ids, m.zero_state()), sync=sync, repeat=1)
        graph = torch.cuda.CUDAGraph()
        gstate = m.zero_state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            m.forward(one, gstate)  # warm-up on a side stream, as torch's graph docs require
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            m.forward(one, gstate)
        graph_s = _timed(graph.replay, sync=sync, repeat=steps)
    del m
    torch.cuda.empty_cache()
    return {"decode_ms": decode_s * 1e3, "prefill_tok_s": prefill_len / prefill_s, "graph_decode_ms": graph_s * 1e3}


def _param_bytes(meta: dict, w: dict) -> int:
    """Bytes the build's decode reads from its weights: each parameter in the dtype it is bound in,
    all but the embedding table (a decode reads one row of it)."""
    size = {"float32": 4, "float16": 2, "bfloat16": 2}
    dtypes = meta.get("param_dtypes") or ["float32"] * len(meta["params"])
    groups = meta.get("param_groups", {})  # a stacked parameter (the grouped CUDA build): its sources' sizes
    return sum(sum(w[k].numel() for k in groups.get(n, [n])) * size[d]
               for n, d in zip(meta["params"], dtypes) if n != "emb.weight")


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def _profile_and_step_graph(model, out: dict, *, steps: int, profile: bool) -> None:
    """The decode's per-kernel profile (if asked) and the whole step under one CUDA graph, into ``out``;
    a failure of either is recorded, not fatal: the other rows still count."""
    from parity.compiled.cuda_graph import GraphDecoder

    if profile:  # before the GraphDecoder: nothing else may run on the VMs while one replays
        try:
            out["profile"] = profile_decode(model)
        except Exception as e:  # noqa: BLE001
            out["profile_error"] = _err(e)
    try:
        g = GraphDecoder(model)
        out["step_graph_decode_ms"] = _timed(lambda: g.step(1), sync=g.sync, repeat=steps) * 1e3
        del g
    except Exception as e:  # noqa: BLE001
        out["step_graph_error"] = _err(e)


def profile_decode(model, *, steps: int = 3) -> dict:
    """Where a plain decode step's GPU time goes: every kernel CUPTI sees over ``steps`` VM decode
    steps (torch.profiler), per step: how many kernels, the sum of their GPU times (the step's
    time without launch gaps), and the kernels that take the most."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    one = model._ids([1])
    st = [model.zero_state().slots[n] for n in model.slot_names]
    model.vm["decode"](one, st, *model.params)
    model.device.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            st = list(model.vm["decode"](one, st, *model.params)[1])
        model.device.sync()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by = {}
    for e in kernels:
        n, us = by.get(e.name, (0, 0.0))
        by[e.name] = (n + 1, us + e.device_time)
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:12]
    return {"kernels_per_step": len(kernels) / steps, "gpu_busy_ms_per_step": sum(e.device_time for e in kernels) / steps / 1e3,
            "top": [{"kernel": k[:80], "per_step": n / steps, "ms_per_step": us / steps / 1e3} for k, (n, us) in top]}


def bench_gemv_variant(ck, *, gemv: str, steps: int, cache_dir: Path, dtype: str, want_logits) -> dict:
    """The plain build under another CUDA GEMV schedule (gemv_cuda.py, $PARITY_CUDA_GEMV; built by
    scripts/gpu-job --prepare): decode ms through the VM and in one step graph, and how far its logits
    after one decode step are from the default build's (same state, same token)."""
    import os

    from parity.compiled.runtime import CompiledRWKV

    before = os.environ.get("PARITY_CUDA_GEMV")
    os.environ["PARITY_CUDA_GEMV"] = gemv
    try:
        model = CompiledRWKV(ck, variant="plain", target="cuda", cache_dir=cache_dir, dtype=dtype)
    finally:
        if before is None:
            os.environ.pop("PARITY_CUDA_GEMV")
        else:
            os.environ["PARITY_CUDA_GEMV"] = before
    one = model._ids([1])
    out = {"library": model.artifact.library.name}
    st = [model.zero_state().slots[n] for n in model.slot_names]
    got = model.vm["decode"](one, st, *model.params)[0].numpy().astype(np.float64)
    out["logits_max_abs_vs_default"] = float(np.max(np.abs(got - want_logits)))
    out["logits_max_abs_default"] = float(np.max(np.abs(want_logits)))
    box = {"state": [model.zero_state().slots[n] for n in model.slot_names]}

    def decode():
        box["state"] = list(model.vm["decode"](one, box["state"], *model.params)[1])

    out["decode_ms"] = _timed(decode, sync=model.device.sync, repeat=steps) * 1e3
    _profile_and_step_graph(model, out, steps=steps, profile=True)
    del model
    return out


def bench_tvm(w, config, *, prefill_len: int, steps: int, cache_dir: Path, dtype: str, gemvs=(), profile=False,
              relax_graph: bool = True) -> dict:
    """The plain build through the VM, then the Relax-graph build and the whole-step torch graph,
    each guarded: a way that fails records its one-line error instead of ending the benchmark."""
    from parity.compiled.cuda_graph import build_graph_model
    from parity.compiled.runtime import CompiledRWKV

    ck = Checkpoint(path=Path(f"random-{config.n_layer}x{config.n_embd}"), sha256="-", config=config, weights=w)
    t0 = time.perf_counter()
    model = CompiledRWKV(ck, variant="plain", target="cuda", cache_dir=cache_dir, dtype=dtype)
    load_s = time.perf_counter() - t0
    dev = model.device
    ids = model._ids(np.random.default_rng(0).integers(0, config.vocab_size, prefill_len))
    one = model._ids([1])
    state = [model.zero_state().slots[n] for n in model.slot_names]

    def vm_decode(m):
        box = {"state": [m.zero_state().slots[n] for n in m.slot_names]}

        def decode():
            box["state"] = list(m.vm["decode"](one, box["state"], *m.params)[1])

        return decode

    decode_s = _timed(vm_decode(model), sync=dev.sync, repeat=steps)
    zero = [model.zero_state().slots[n] for n in model.slot_names]
    want_logits = model.vm["decode"](one, zero, *model.params)[0].numpy().astype(np.float64)
    prefill_s = _timed(lambda: model.vm["prefill"](ids, state, *model.params), sync=dev.sync, repeat=1)
    out = {"decode_ms": decode_s * 1e3, "prefill_tok_s": prefill_len / prefill_s, "load_s": load_s,
           "compile_seconds_on_build_machine": model.artifact.meta.get("compile_seconds"),
           "weight_bytes": _param_bytes(model.artifact.meta, w)}
    _profile_and_step_graph(model, out, steps=steps, profile=profile)
    del model
    for gemv in gemvs:  # before the Relax-graph build: the figures the decode speed work asks for first
        try:
            out.setdefault("gemv", {})[gemv] = bench_gemv_variant(ck, gemv=gemv, steps=steps, cache_dir=cache_dir,
                                                                  dtype=dtype, want_logits=want_logits)
        except Exception as e:  # noqa: BLE001
            out.setdefault("gemv", {})[gemv] = {"error": _err(e)}
        print(json.dumps({"gemv": gemv, **{k: v for k, v in out["gemv"][gemv].items() if k != "profile"}}, default=float), flush=True)
    if not relax_graph:
        return out
    try:
        art = build_graph_model(config, dtype=dtype, cache_dir=cache_dir)
        gm = CompiledRWKV(ck, variant="plain", target="cuda", cache_dir=cache_dir, dtype=dtype, artifact=art)
        out["relax_graph_decode_ms"] = _timed(vm_decode(gm), sync=dev.sync, repeat=steps) * 1e3
        out["relax_graph_prefill_tok_s"] = prefill_len / _timed(
            lambda: gm.vm["prefill"](ids, [gm.zero_state().slots[n] for n in gm.slot_names], *gm.params),
            sync=dev.sync, repeat=1)
        del gm
    except Exception as e:  # noqa: BLE001
        out["relax_graph_error"] = _err(e)
    return out


_STEPS = "[list(range(1, 17)), [5], [9], [13], [17]]"  # the plan below, as the bare scripts run it
_BARE = {
    "reference": "import sys; from pathlib import Path; from parity.checkpoint import load_checkpoint; "
                 "from parity.reference import make_reference; ck = load_checkpoint(Path(sys.argv[1])); "
                 "ref = make_reference(ck); s = ref.zero_state()\n"
                 f"for ids in {_STEPS}: _, s = ref.forward(ids, s)",
    "tvm": "import sys; from pathlib import Path; from parity.checkpoint import load_checkpoint; "
           "from parity.compiled.runtime import CompiledRWKV; ck = load_checkpoint(Path(sys.argv[1])); "
           "m = CompiledRWKV(ck, variant='plain', target='cuda', cache_dir=Path(sys.argv[2])); s = m.zero_state()\n"
           f"for ids in {_STEPS}: s = m.forward(ids, s).state",  # forward copies the logits out: each step synced
}


def harness_overhead(config, *, cache_dir: Path, workdir: Path, how: str, mode: str = "propagated") -> dict:
    """(full-dump reference,tvm parity run on CUDA) ÷ (bare reference run + bare CUDA run), same plan,
    from a checkpoint file (as a user runs it: a worker reads the file, nothing is pickled across).

    how: "workers" / "in-process" — run_parity called here (the default worker processes, or every
    backend in this process), the bare runs here too, every event of the parity run timestamped;
    "processes" — what a user waits for: `parity run` as a command against the two bare runs as
    scripts, each a fresh Python process (imports and checkpoint loading on both sides).

    mode: the parity run's --mode. "propagated" (the figures before 2026-11-30-4) runs each backend
    once and judges every stage strictly: at 0.4B inherited drift crosses that verdict at depth (the
    0.4B test records it, prefill L15.att.ln_x), so its "divergence" there is no finding. "replay"
    is what `parity run` does by default (each layer replayed by the reference on the build's own
    inputs, drift judged against the dtype's envelope): more work, and a verdict that means one."""
    import os
    import subprocess

    from parity.checkpoint import load_checkpoint
    from parity.compiled.runtime import CompiledRWKV
    from parity.dumpers.backends import RunPlan
    from parity.reference import make_reference
    from parity.session import run_parity
    from parity.synth import synthesize

    path = workdir / f"bench-{config.n_layer}x{config.n_embd}.safetensors"
    if not path.exists():
        synthesize(path, shape=SHAPE_OF.get((config.n_layer, config.n_embd), "0.4b"), version="5.2", seed=0)
    plan = RunPlan(prefill_ids=tuple(range(1, 17)), decode_ids=(5, 9, 13, 17))
    if how == "processes":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

        def wall(cmd):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode not in (0, 1):  # 1: a divergence, still a finished run
                raise RuntimeError(f"{cmd[1:3]} exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
            return time.perf_counter() - t0, proc

        t_ref, _ = wall([sys.executable, "-c", _BARE["reference"], str(path)])
        t_tvm, _ = wall([sys.executable, "-c", _BARE["tvm"], str(path), str(cache_dir)])
        t_parity, proc = wall([sys.executable, "-m", "parity.cli", "run", "--checkpoint", str(path), "--backends", "reference,tvm",
                               "--ids", ",".join(map(str, plan.prefill_ids)), "--decode-ids", ",".join(map(str, plan.decode_ids)),
                               "--decode-steps", str(len(plan.decode_ids)), "--mode", mode, "--device", "cuda",
                               "--cache-dir", str(cache_dir), "-q"])
        return {"how": how, "mode": mode, "bare_reference_s": t_ref, "bare_tvm_cuda_s": t_tvm, "parity_run_s": t_parity,
                "ratio": t_parity / (t_ref + t_tvm), "verdict": "no divergence" if proc.returncode == 0 else "divergence"}
    steps = [list(plan.prefill_ids)] + [[i] for i in plan.decode_ids]
    t0 = time.perf_counter()
    ck = load_checkpoint(path)
    ref = make_reference(ck)
    s = ref.zero_state()
    for ids in steps:
        _, s = ref.forward(ids, s)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck = load_checkpoint(path)
    tvm_model = CompiledRWKV(ck, variant="plain", target="cuda", cache_dir=cache_dir)
    st = tvm_model.zero_state()
    for ids in steps:
        st = tvm_model.forward(ids, st).state
    t_tvm = time.perf_counter() - t0
    del tvm_model, ref
    events = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()

        def note(msg):
            events.append((round(time.perf_counter() - t0, 3), str(msg)[:160]))

        out = run_parity(load_checkpoint(path), backends=["reference", "tvm"], plan=plan, dump_dir=Path(tmp),
                         cache_dir=cache_dir, mode=mode, device="cuda", in_process=how == "in-process",
                         on_event=note, on_step=lambda *a: note("step " + " ".join(map(str, a))))
        t_parity = time.perf_counter() - t0
    # What follows the backends' last step (comparing the dumps, judging, the result): no event
    # marks it, so it is the run's end minus the last event.
    after = t_parity - max((t for t, _ in events), default=0.0)
    return {"how": how, "mode": mode, "bare_reference_s": t_ref, "bare_tvm_cuda_s": t_tvm, "parity_run_s": t_parity,
            "after_last_event_s": after, "ratio": t_parity / (t_ref + t_tvm), "verdict": out.result["verdict"],
            "first_divergence": _where(out.result.get("first_divergence")), "events": events}


def _where(fd) -> str | None:
    if not fd:
        return None
    return f"{'prefill' if fd.get('step') == 0 else 'decode ' + str(fd.get('step'))} {fd.get('stage')}"


SHAPE_OF = {(24, 1024): "0.4b", (24, 2048): "1.5b"}


def _ms(d: dict, key: str, roofline_ms: float) -> str:
    if key not in d:
        # "failed" only where the row says so (an error beside it); else it was not measured (e.g.
        # --no-relax-graph), which the 2026-11-30-4 table printed as "failed"
        prefix = key.removesuffix("decode_ms")
        return "failed" if any(k.endswith("error") and k.startswith(prefix) for k in d) else "not run"
    return f"{d[key]:.2f} ({roofline_ms / d[key]:.0%})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="0.4b,1.5b")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=50)
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth of the GPU in TB/s (H200: 4.8)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--no-overhead", action="store_true", help="skip the harness-overhead measurement")
    ap.add_argument("--overhead-shape", default="0.4b", help="the shape the harness overhead is measured at")
    ap.add_argument("--overhead-how", default="processes,workers,in-process",
                    help="which overhead measurements (harness_overhead's how), in order; HOW:MODE runs the "
                         "parity run in that --mode (default propagated)")
    ap.add_argument("--gemv", default="", help="comma-separated CUDA GEMV variants (gemv_cuda.GEMV_CONFIGS) measured "
                                             "beside the default build, at the shapes/dtypes of --gemv-at")
    ap.add_argument("--gemv-at", default="1.5b:float16", help="shape:dtype pairs the --gemv variants are measured at")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU times of the plain build's decode (torch.profiler)")
    ap.add_argument("--no-relax-graph", action="store_true", help="skip the Relax-graph build's rows")
    args = ap.parse_args()
    from parity.compiled.build import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    pin_torch_math()
    args.out.mkdir(parents=True, exist_ok=True)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "torch_math": torch_math_settings(),
        "command": shlex.join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
        "dtypes": dtypes,
        "hbm_tbs": args.hbm_tbs,
    }
    rows, overhead = [], []
    gemv_at = {tuple(p.split(":")) for p in args.gemv_at.split(",") if p}
    gemvs = [g.strip() for g in args.gemv.split(",") if g.strip()]
    meta["gemv_variants"] = gemvs
    for shape in (s.strip() for s in args.shapes.split(",") if s.strip()):  # --shapes "": the overhead only
        config = shape_config(shape, version="5.2")
        t0 = time.perf_counter()
        w = random_weights(config, seed=0, device="cuda")
        print(f"{shape}: random weights in {time.perf_counter() - t0:.1f} s", flush=True)
        for dtype in dtypes:
            row = {"shape": shape, "dtype": dtype, "config": config.describe()}
            try:
                row["tvm_cuda"] = bench_tvm(w, config, prefill_len=args.prefill_len, steps=args.decode_steps,
                                            cache_dir=cache_dir, dtype=dtype, profile=args.profile,
                                            gemvs=gemvs if (shape, dtype) in gemv_at else (),
                                            relax_graph=not args.no_relax_graph)
            except Exception as e:  # noqa: BLE001 - a missing build or a failure: recorded, the torch rows still run
                row["tvm_cuda"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            torch.cuda.empty_cache()
            row["torch"] = bench_torch(w, config, prefill_len=args.prefill_len, steps=args.decode_steps, dtype=dtype)
            torch.cuda.empty_cache()
            # The roofline of the TVM build's weights as bound (fp32 decay/bonus/ln_x stay fp32 in an
            # fp16 build); without a TVM row, every weight in the dtype.
            nbytes = row["tvm_cuda"].get("weight_bytes") or sum(
                t.numel() * torch.empty(0, dtype=getattr(torch, dtype)).element_size() for k, t in w.items() if k != "emb.weight")
            row["decode_weight_bytes"] = nbytes
            row["roofline_ms"] = nbytes / (args.hbm_tbs * 1e12) * 1e3
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)
            _write(args, meta, rows, overhead)  # after every row: a timeout keeps what was measured
        del w
        torch.cuda.empty_cache()
    if not args.no_overhead:
        config = shape_config(args.overhead_shape, version="5.2")
        with tempfile.TemporaryDirectory() as work:
            for item in args.overhead_how.split(","):
                how, _, mode = item.partition(":")
                mode = mode or "propagated"
                try:
                    overhead.append(harness_overhead(config, cache_dir=cache_dir, workdir=Path(work), how=how, mode=mode))
                except Exception as e:  # noqa: BLE001
                    overhead.append({"how": how, "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]})
                print(json.dumps({k: v for k, v in overhead[-1].items() if k != "events"}, default=float), flush=True)
                _write(args, meta, rows, overhead)
    print(_write(args, meta, rows, overhead))
    return 0


def _write(args, meta: dict, rows: list, overhead: list) -> str:
    """gpu-bench.json and gpu-bench.md from what has been measured so far; returns the table."""
    (args.out / "gpu-bench.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "harness_overhead": overhead}, indent=1, default=float) + "\n")
    lines = [f"# GPU benchmark, {meta['gpu']}, {meta['date']}, commit {meta['commit']}", "",
             f"`{meta['command']}` — TF32 off, random weights, prefill of {args.prefill_len} tokens, "
             f"decode mean of {args.decode_steps} steps; roofline = the TVM build's decode weight bytes / {args.hbm_tbs} TB/s; "
             "(%) = roofline ÷ time.", "",
             "| shape | dtype | roofline ms | TVM CUDA decode ms | TVM + Relax CUDA graph | TVM step in one CUDA graph "
             "| torch eager | torch CUDA graph | TVM prefill tok/s | torch prefill tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, p, rl = r["tvm_cuda"], r["torch"], r["roofline_ms"]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {rl:.2f} | {_ms(t, 'decode_ms', rl)} | {_ms(t, 'relax_graph_decode_ms', rl)} "
            f"| {_ms(t, 'step_graph_decode_ms', rl)} | {_ms(p, 'decode_ms', rl)} | {_ms(p, 'graph_decode_ms', rl)} "
            f"| {t.get('prefill_tok_s', float('nan')):.0f} | {p['prefill_tok_s']:.0f} |")
    errors = [(r["shape"], r["dtype"], k, v) for r in rows for k, v in r["tvm_cuda"].items() if k.endswith("error")]
    for shape, dtype, k, v in errors:
        lines.append(f"\n{shape} {dtype} {k}: {v}")
    for r in rows:
        t, rl = r["tvm_cuda"], r["roofline_ms"]
        for g, v in (t.get("gemv") or {}).items():
            if "error" in v:
                lines.append(f"\n{r['shape']} {r['dtype']} GEMV {g}: failed: {v['error']}")
                continue
            lines.append(f"\n{r['shape']} {r['dtype']} GEMV {g}: decode {_ms(v, 'decode_ms', rl)}, step graph "
                         f"{_ms(v, 'step_graph_decode_ms', rl)} ms; logits after one step differ from the default build's "
                         f"by {v['logits_max_abs_vs_default']:.2e} at most (largest logit {v['logits_max_abs_default']:.2e})")
        for name, p in [("default", t.get("profile"))] + [(g, v.get("profile")) for g, v in (t.get("gemv") or {}).items()]:
            if p:
                lines.append(f"\n{r['shape']} {r['dtype']} {name} build, profile: {p['kernels_per_step']:.0f} kernels a step, "
                             f"{p['gpu_busy_ms_per_step']:.3f} ms of kernel time a step; most: "
                             + "; ".join(f"{k['kernel']} x{k['per_step']:.0f} {k['ms_per_step']:.3f} ms" for k in p["top"][:5]))
    for h in overhead:
        how = {"processes": "as a user waits (`parity run` vs two bare scripts, each a fresh process)",
               "workers": "run_parity here, backends in worker processes (the default)",
               "in-process": "run_parity here, every backend in this process"}[h["how"]]
        mode = h.get("mode", "propagated")
        if "error" in h:
            lines += ["", f"Harness overhead ({how}, --mode {mode}): failed: {h['error']}"]
            continue
        after = f"; {h['after_last_event_s']:.2f} s of it after the last step" if "after_last_event_s" in h else ""
        where = f" at {h['first_divergence']}" if h.get("first_divergence") else ""
        lines += ["", f"Harness overhead at {args.overhead_shape}, {how}, --mode {mode}: full-dump parity run "
                      f"{h['parity_run_s']:.2f} s ÷ bare runs ({h['bare_reference_s']:.2f} s reference + "
                      f"{h['bare_tvm_cuda_s']:.2f} s CUDA build) = {h['ratio']:.2f}× (verdict: {h['verdict']}{where}{after})"]
    (args.out / "gpu-bench.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
