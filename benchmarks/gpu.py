"""GPU speed: the CUDA build vs torch eager on the same GPU, at released RWKV-5.2 shapes, fp32.

    python benchmarks/gpu.py --out DIR [--shapes 0.4b,1.5b] [--cache-dir DIR] [--commit SHA]

For each shape (random weights: speed does not depend on their values): decode ms/token (the mean
of --decode-steps steps after a warm-up, state carried, no host copies inside the timed loop),
prefill tokens/s (one --prefill-len prompt), for
    tvm-cuda           the CUDA build of parity/compiled (DLight + the hand-scheduled wkv5), called
                       through the Relax VM
    torch-eager        a plain torch RWKV-5.2 (below), fp32, TF32 off
    torch-cuda-graph   the same decode step captured once in a CUDA graph and replayed
and the effective bandwidth of each decode as a fraction of the HBM roofline: the bytes of every
weight a decode step reads (all but the embedding table, of which it reads one row) / decode
time / --hbm-tbs. Also, at the first shape, the harness's own overhead: a full-dump `reference,tvm`
parity run on CUDA ÷ (a bare torch reference run + a bare CUDA-build run) of the same plan.

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


def random_weights(config, *, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the right shapes with sane magnitudes (finite everything, decays in (0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in expected_shapes(config).items():
        if key.endswith("time_decay"):
            t = torch.rand(shape, generator=gen) * 5 - 6
        elif "time_mix" in key:
            t = torch.rand(shape, generator=gen)
        elif key.startswith(("ln", "blocks")) and (".ln" in key or key.startswith("ln")):
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * (0.1 if "time_" in key else 1 / math.sqrt(shape[-1]))
        out[key] = t.float().contiguous()
    return out


class TorchRWKV5:
    """RWKV-5.2 in plain torch on one device: the decode step a port would write, eager."""

    def __init__(self, w: dict[str, torch.Tensor], config, device: str):
        self.c = config
        self.w = {k: v.to(device) for k, v in w.items()}
        L = config.n_layer
        self.decay = [torch.exp(-torch.exp(self.w[f"blocks.{i}.att.time_decay"])).view(config.n_head, config.head_size, 1) for i in range(L)]
        self.u = [self.w[f"blocks.{i}.att.time_faaaa"].view(config.n_head, config.head_size, 1) for i in range(L)]
        self.device = device

    def zero_state(self):
        C, H, N = self.c.n_embd, self.c.n_head, self.c.head_size
        z = lambda *s: torch.zeros(*s, device=self.device)  # noqa: E731
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


def bench_torch(w, config, *, prefill_len: int, steps: int) -> dict:
    m = TorchRWKV5(w, config, "cuda")
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


def bench_tvm(w, config, *, prefill_len: int, steps: int, cache_dir: Path) -> dict:
    import tvm

    from parity.compiled.runtime import CompiledRWKV

    ck = Checkpoint(path=Path(f"random-{config.n_layer}x{config.n_embd}"), sha256="-", config=config, weights=w)
    t0 = time.perf_counter()
    model = CompiledRWKV(ck, variant="plain", target="cuda", cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    dev = model.device
    ids = model._ids(np.random.default_rng(0).integers(0, config.vocab_size, prefill_len))
    one = model._ids([1])
    state = [model.zero_state().slots[n] for n in model.slot_names]
    box = {"state": state}

    def decode():
        box["state"] = list(model.vm["decode"](one, box["state"], *model.params)[1])

    decode_s = _timed(decode, sync=dev.sync, repeat=steps)
    prefill_s = _timed(lambda: model.vm["prefill"](ids, state, *model.params), sync=dev.sync, repeat=1)
    out = {"decode_ms": decode_s * 1e3, "prefill_tok_s": prefill_len / prefill_s, "load_s": load_s,
           "compile_seconds_on_build_machine": model.artifact.meta.get("compile_seconds")}
    del model
    return out


def harness_overhead(config, w, *, cache_dir: Path) -> dict:
    """(full-dump reference,tvm parity run on CUDA) ÷ (bare reference run + bare CUDA run), same plan."""
    from parity.compiled.runtime import CompiledRWKV
    from parity.dumpers.backends import RunPlan
    from parity.reference import make_reference
    from parity.session import run_parity

    ck = Checkpoint(path=Path("random"), sha256="-", config=config, weights=w)
    plan = RunPlan(prefill_ids=tuple(range(1, 17)), decode_ids=(5, 9, 13, 17))
    steps = [list(plan.prefill_ids)] + [[i] for i in plan.decode_ids]
    t0 = time.perf_counter()
    ref = make_reference(ck)
    s = ref.zero_state()
    for ids in steps:
        _, s = ref.forward(ids, s)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    tvm_model = CompiledRWKV(ck, variant="plain", target="cuda", cache_dir=cache_dir)
    st = tvm_model.zero_state()
    for ids in steps:
        st = tvm_model.forward(ids, st).state
    t_tvm = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = run_parity(ck, backends=["reference", "tvm"], plan=plan, dump_dir=Path(tmp), cache_dir=cache_dir,
                         mode="propagated", device="cuda")
        t_parity = time.perf_counter() - t0
    return {"bare_reference_s": t_ref, "bare_tvm_cuda_s": t_tvm, "parity_run_s": t_parity,
            "ratio": t_parity / (t_ref + t_tvm), "verdict": out.result["verdict"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="0.4b,1.5b")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=50)
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth of the GPU in TB/s (H200: 4.8)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--no-overhead", action="store_true", help="skip the harness-overhead measurement")
    args = ap.parse_args()
    from parity.compiled.build import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    pin_torch_math()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "torch_math": torch_math_settings(),
        "command": shlex.join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
        "dtype": "float32",
        "hbm_tbs": args.hbm_tbs,
    }
    rows = []
    for i, shape in enumerate(s.strip() for s in args.shapes.split(",")):
        config = shape_config(shape, version="5.2")
        w = random_weights(config, seed=0)
        weight_bytes = sum(t.numel() * 4 for k, t in w.items() if k != "emb.weight")
        roofline_ms = weight_bytes / (args.hbm_tbs * 1e12) * 1e3
        row = {"shape": shape, "config": config.describe(), "decode_weight_bytes": weight_bytes, "roofline_ms": roofline_ms}
        row["tvm_cuda"] = bench_tvm(w, config, prefill_len=args.prefill_len, steps=args.decode_steps, cache_dir=cache_dir)
        row["torch"] = bench_torch(w, config, prefill_len=args.prefill_len, steps=args.decode_steps)
        for name, ms in (("tvm_cuda", row["tvm_cuda"]["decode_ms"]), ("torch_eager", row["torch"]["decode_ms"]),
                         ("torch_cuda_graph", row["torch"]["graph_decode_ms"])):
            row[f"roofline_fraction_{name}"] = roofline_ms / ms
        if i == 0 and not args.no_overhead:
            row["harness_overhead"] = harness_overhead(config, w, cache_dir=cache_dir)
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
        del w
        torch.cuda.empty_cache()
    (args.out / "gpu-bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float) + "\n")
    lines = [f"# GPU benchmark, {meta['gpu']}, {meta['date']}, commit {meta['commit']}", "",
             f"`{meta['command']}` — fp32, TF32 off, random weights, prefill of {args.prefill_len} tokens, "
             f"decode mean of {args.decode_steps} steps; roofline = decode weight bytes / {args.hbm_tbs} TB/s.", "",
             "| shape | roofline ms | TVM CUDA decode ms (roofline) | torch eager ms (roofline) | torch CUDA graph ms (roofline) "
             "| TVM prefill tok/s | torch prefill tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t, p = r["tvm_cuda"], r["torch"]
        lines.append(
            f"| {r['shape']} | {r['roofline_ms']:.2f} | {t['decode_ms']:.2f} ({r['roofline_fraction_tvm_cuda']:.0%}) "
            f"| {p['decode_ms']:.2f} ({r['roofline_fraction_torch_eager']:.0%}) "
            f"| {p['graph_decode_ms']:.2f} ({r['roofline_fraction_torch_cuda_graph']:.0%}) "
            f"| {t['prefill_tok_s']:.0f} | {p['prefill_tok_s']:.0f} |")
    if rows and "harness_overhead" in rows[0]:
        h = rows[0]["harness_overhead"]
        lines += ["", f"Harness overhead at {rows[0]['shape']}: full-dump parity run {h['parity_run_s']:.2f} s ÷ bare runs "
                      f"({h['bare_reference_s']:.2f} s reference + {h['bare_tvm_cuda_s']:.2f} s CUDA build) = {h['ratio']:.2f}× "
                      f"(verdict: {h['verdict']})"]
    (args.out / "gpu-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
