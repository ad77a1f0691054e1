"""The catalogue of known porting bugs, each one plantable into the torch reference.

A hypothesis is a small named function that patches *one part* of a fresh copy of the reference
(parity/reference/): a replaceable method (``_wkv``, ``_receptance``, ``layer``), a weight of one
layer, the embedding table, or — for the parts written inline — the module globals (``F``,
``torch``) seen while one method runs. The copy has its own attributes and its own list of layers
but shares their tensors (engine.Context.reference): a hypothesis replaces a tensor or a layer's
entry, never writes into one. The engine (engine.py) replays the faulty layer with each
planted and keeps the hypotheses that reproduce the candidate.

``stages``: the short stage names (``att.wkv``, ``emb``, ``att_kv`` for ``state.L{l}.att_kv``)
where the bug first shows — the family a first divergence there selects. ``versions``: the RWKV
versions it exists in; elsewhere it is listed as not applicable, with why. ``weights``: for a bug of
a quantised port's dequantisation, the weight formats it exists in (``int8``, ``q4``: the format the
candidate's dump names); empty for every other bug.

Add your own as ``module:attr`` or ``file.py:attr`` (``parity explain --hypothesis``): ``attr`` is a
``Hypothesis``, e.g. made by the ``@hypothesis(...)`` decorator below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

V5 = ("5.0", "5.1", "5.2")
V4 = ("4",)
GATED = ("5.1", "5.2")


@dataclass(frozen=True)
class Hypothesis:
    name: str  # short id: groupnorm-eps, decay-exp, ...
    title: str  # what a reader sees: "GroupNorm eps"
    stages: tuple[str, ...]
    versions: tuple[str, ...]
    fix: str  # one line
    doc: str
    # plant(model, ctx) patches ``model`` in place; returns a detail for the report (e.g. the
    # fitted eps) or None. ctx: engine.Context (checkpoint, candidate arrays, step, layer).
    plant: Callable
    # Quantised-weight bugs only: the candidate weight formats they exist in (() = any candidate).
    weights: tuple[str, ...] = ()


CATALOGUE: dict[str, Hypothesis] = {}


def hypothesis(*, name: str, title: str, stages: tuple[str, ...], versions: tuple[str, ...] = V5, fix: str,
               register: bool = True, weights: tuple[str, ...] = ()):
    """Decorator: a plant(model, ctx) function becomes a named, documented Hypothesis."""

    def wrap(fn) -> Hypothesis:
        h = Hypothesis(name=name, title=title, stages=tuple(stages), versions=tuple(versions), fix=fix,
                       doc=" ".join((fn.__doc__ or title).split()), plant=fn, weights=tuple(weights))
        if register:
            CATALOGUE[name] = h
        return h

    return wrap


# -- planting helpers ---------------------------------------------------------------------------
def _wrap(model, method: str, fn) -> None:
    """Replace ``model.method`` (this instance only) by ``fn(original, *args, **kw)``."""
    original = getattr(model, method)
    setattr(model, method, functools.partial(fn, original))


@contextlib.contextmanager
def _module_globals(module, **values):
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def _with_globals(model, method: str, module_name: str, **values) -> None:
    """While ``model.method`` runs, the reference module sees ``values`` for its globals — how
    a hypothesis reaches a call written inline (the GroupNorm in ``_att``, the shift's cat)."""
    module = sys.modules[module_name]

    def call(original, *a, **kw):
        with _module_globals(module, **values):
            return original(*a, **kw)

    _wrap(model, method, call)


class _Delegate:
    """A stand-in for a module (``F`` or ``torch``): one function replaced, the rest delegated."""

    def __init__(self, base, **replaced):
        self._base = base
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _candidate_tensor(ctx, name: str, *, like: torch.Tensor) -> torch.Tensor:
    """The candidate's recorded ``att.<name>`` of the layer at the step being replayed, shaped and
    typed like ``like``; ``like`` itself where the candidate did not record it."""
    step = getattr(ctx, "current_step", None)
    if step is None or ctx.layer is None:
        return like
    value = ctx.candidate_arrays(step).get(f"L{ctx.layer}.att.{name}")
    if value is None or value.size != like.numel():
        return like
    return torch.as_tensor(value).to(like.dtype).reshape(like.shape)


def _ref_module(ctx) -> str:
    return "parity.reference.rwkv4" if ctx.version == "4" else "parity.reference.rwkv5"


def _group_norm_is(model, group_norm) -> None:
    _with_globals(model, "_att", "parity.reference.rwkv5", F=_Delegate(F, group_norm=group_norm))


def _each_layer(model, **changes) -> None:
    for i, p in enumerate(model.layers):
        new = {k: (f(p, i) if callable(f) else f) for k, f in changes.items()}
        model.layers[i] = {**p, **new} if isinstance(p, dict) else dataclasses.replace(p, **new)


def _per_channel(t: torch.Tensor, ctx) -> torch.Tensor:
    """A decay/bonus vector as the reference holds it: (H, N) for v5 (per head in 5.0/5.1)."""
    H, N = ctx.config.n_head, ctx.config.head_size
    t = t.reshape(-1)
    return (t.reshape(H, 1).expand(H, N) if t.numel() == H else t.reshape(H, N)).contiguous()


# -- GroupNorm (ln_x) ---------------------------------------------------------------------------
def _group_norm_eps(x, num_groups, weight=None, bias=None, eps=1e-5, *, use_eps):
    return F.group_norm(x, num_groups, weight, bias, use_eps)


def fit_group_norm_eps(wkv: torch.Tensor, ln_x: torch.Tensor, *, groups: int, weight, bias) -> float:
    """The eps that makes GroupNorm(wkv) closest to ``ln_x``: a log-grid, then a golden-section
    refinement in log eps (the error is unimodal in eps near its minimum)."""
    wkv, ln_x = wkv.double(), ln_x.double()
    weight, bias = weight.double(), bias.double()

    def err(log_eps: float) -> float:
        y = F.group_norm(wkv, groups, weight, bias, math.exp(log_eps))
        return float((y - ln_x).abs().max())

    grid = [math.log(10.0) * (-10 + 0.25 * i) for i in range(41)]  # 1e-10 .. 1
    best = min(range(len(grid)), key=lambda i: err(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if err(a) < err(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


@hypothesis(name="groupnorm-eps", title="GroupNorm eps", stages=("att.ln_x",),
            fix="use eps = 64e-5 in the ln_x GroupNorm (training's eps 1e-5 on x / head_size_divisor 8: 1e-5 x 8^2)")
def groupnorm_eps(model, ctx):
    """The ln_x GroupNorm with another eps than 64e-5 (older ports: 1e-5). The eps is fitted by a
    1-D search on the candidate's own recorded wkv and ln_x at the faulty step."""
    from parity.reference.rwkv5 import LN_X_EPS

    eps, fitted, how = 1e-5, None, "not fitted (the candidate recorded no wkv/ln_x there); tried 1e-5"
    arrays = ctx.candidate_arrays(ctx.step)
    wkv, ln_x = arrays.get(f"L{ctx.layer}.att.wkv"), arrays.get(f"L{ctx.layer}.att.ln_x")
    if wkv is not None and ln_x is not None:
        p = model.layers[ctx.layer]
        eps = fitted = fit_group_norm_eps(torch.as_tensor(wkv), torch.as_tensor(ln_x), groups=ctx.config.n_head,
                                          weight=p.lnx_w, bias=p.lnx_b)
        how = f"fitted eps {fitted:.3g}"
        if abs(fitted / 1e-5 - 1) < 0.1:  # within the fit's spread of the classic value: name it
            eps, how = 1e-5, f"eps 1e-5, the older ports' value (fitted {fitted:.3g})"
    _group_norm_is(model, functools.partial(_group_norm_eps, use_eps=eps))
    return {"detail": f"{how}; the reference uses {LN_X_EPS:g}", "eps": eps, "fitted_eps": fitted}


@hypothesis(name="groupnorm-variance-formula", title="GroupNorm variance as E[x^2] - E[x]^2", stages=("att.ln_x",),
            fix="compute the variance as E[(x - mean)^2] (two passes, or Welford), not E[x^2] - E[x]^2")
def groupnorm_variance_formula(model, ctx):
    """One-pass variance E[x²]−E[x]² in fp32: cancellation where a head's mean is large against
    its spread (negative variances become NaN)."""

    def gn(x, num_groups, weight=None, bias=None, eps=1e-5):
        T, C = x.shape
        g = x.reshape(T, num_groups, C // num_groups).float()
        mean = g.mean(-1, keepdim=True)
        var = (g * g).mean(-1, keepdim=True) - mean * mean  # BUG
        return ((g - mean) / torch.sqrt(var + eps)).reshape(T, C) * weight + bias

    _group_norm_is(model, gn)


@hypothesis(name="groupnorm-over-time", title="GroupNorm normalised over time", stages=("att.ln_x",),
            fix="take the ln_x statistics per token and head over the head's N channels only, never over T")
def groupnorm_over_time(model, ctx):
    """ln_x statistics per head over (T, N): over the time axis too. A decode (T = 1) is exact."""

    def gn(x, num_groups, weight=None, bias=None, eps=1e-5):
        T, C = x.shape
        g = x.reshape(T, num_groups, C // num_groups)
        mean = g.mean(dim=(0, 2), keepdim=True)
        var = ((g - mean) ** 2).mean(dim=(0, 2), keepdim=True)
        return ((g - mean) / torch.sqrt(var + eps)).reshape(T, C) * weight + bias

    _group_norm_is(model, gn)


@hypothesis(name="groupnorm-channel-axis", title="GroupNorm over the wrong axis", stages=("att.ln_x",),
            fix="split the channels as (T, H, N) — head-major — before the GroupNorm, not (T, N, H)")
def groupnorm_channel_axis(model, ctx):
    """ln_x groups formed from (T, N, H) instead of (T, H, N): each group takes every H-th channel."""

    def gn(x, num_groups, weight=None, bias=None, eps=1e-5):
        T, C = x.shape
        g = x.reshape(T, C // num_groups, num_groups).transpose(1, 2)
        mean = g.mean(-1, keepdim=True)
        var = ((g - mean) ** 2).mean(-1, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + eps)).transpose(1, 2).reshape(T, C)
        return y * weight + bias

    _group_norm_is(model, gn)


# -- decay and bonus ----------------------------------------------------------------------------
def _decay(model, ctx, fn) -> None:
    w = ctx.weights
    _each_layer(model, w=lambda p, i: _per_channel(fn(w[f"blocks.{i}.att.time_decay"].to(model.acc)), ctx))


@hypothesis(name="decay-exp", title="decay w = exp(time_decay)", stages=("att.wkv",),
            fix="decay w = exp(-exp(time_decay))")
def decay_exp(model, ctx):
    """The decay taken as exp(time_decay): > 1 for most channels, so the state grows."""
    _decay(model, ctx, torch.exp)


@hypothesis(name="decay-neg-exp", title="decay w = -exp(time_decay)", stages=("att.wkv",),
            fix="decay w = exp(-exp(time_decay)); -exp(time_decay) is v4's log-space decay")
def decay_neg_exp(model, ctx):
    """v4's log-space decay -exp(time_decay) used as the v5 multiplier."""
    _decay(model, ctx, lambda t: -torch.exp(t))


@hypothesis(name="decay-as-given", title="decay w = time_decay as given", stages=("att.wkv",),
            fix="decay w = exp(-exp(time_decay)); the checkpoint holds its log-log form")
def decay_as_given(model, ctx):
    """time_decay used as the multiplier without either exp."""
    _decay(model, ctx, lambda t: t)


@hypothesis(name="bonus-exp-vs-raw", title="bonus u: exp(time_first) vs raw", stages=("att.wkv",),
            fix="5.2: u = time_faaaa as stored; 5.0/5.1: u = exp(time_first)")
def bonus_exp_vs_raw(model, ctx):
    """The bonus the other version's way: exp() applied to 5.2's time_faaaa, or 5.0/5.1's
    time_first used raw."""
    w = ctx.weights
    if ctx.version == "5.2":
        _each_layer(model, u=lambda p, i: _per_channel(torch.exp(w[f"blocks.{i}.att.time_faaaa"].to(model.acc)), ctx))
    else:
        _each_layer(model, u=lambda p, i: _per_channel(w[f"blocks.{i}.att.time_first"].to(model.acc), ctx))


# -- the wkv scan and its state -----------------------------------------------------------------
@hypothesis(name="head-split-transposed", title="head split (N, H) instead of (H, N)", stages=("att.wkv",),
            fix="reshape r, k, v (T, A) as (T, H, N) — head-major — and the wkv output back the same way")
def head_split_transposed(model, ctx):
    """r, k, v viewed as (T, N, H) and transposed: channel c is taken as head c % H."""

    def wkv(original, r, k, v, *, w, u, s):
        T, H, N = r.shape

        def split(x):
            return x.reshape(T, N, H).transpose(1, 2).contiguous()

        out, s = original(split(r), split(k), split(v), w=w, u=u, s=s)
        return out.transpose(1, 2).reshape(T, H, N), s

    _wrap(model, "_wkv", wkv)


@hypothesis(name="state-transposed", title="wkv state stored transposed", stages=("att.wkv",),
            fix="keep the wkv state as [head, k, v]; a kernel written for [h, v, k] needs the transpose around its call")
def state_transposed(model, ctx):
    """The state read as [h, v, k] where it is [h, k, v]: a prefill from zero is exact, the next step is not."""
    _wrap(model, "_wkv", lambda original, r, k, v, *, w, u, s: original(r, k, v, w=w, u=u, s=s.transpose(1, 2).contiguous()))


@hypothesis(name="state-not-written-back", title="wkv state not written back", stages=("att.wkv", "att_kv"),
            fix="return the scan's final state as the layer's new att_kv")
def state_not_written_back(model, ctx):
    """The step's outputs are right, but the state after the step is the state before it."""

    def wkv(original, r, k, v, *, w, u, s):
        out, _ = original(r, k, v, w=w, u=u, s=s)
        return out, s

    _wrap(model, "_wkv", wkv)


@hypothesis(name="state-from-first-token", title="wkv state written from the first token", stages=("att.wkv", "att_kv"),
            fix="write back the state after the *last* token of the step, not the first")
def state_from_first_token(model, ctx):
    """The new state is the state after row 0 of a prefill, not after its last row."""

    def wkv(original, r, k, v, *, w, u, s):
        out, _ = original(r, k, v, w=w, u=u, s=s)
        _, s1 = original(r[:1], k[:1], v[:1], w=w, u=u, s=s)
        return out, s1

    _wrap(model, "_wkv", wkv)


@hypothesis(name="wkv-time-not-recurrent", title="time axis not a recurrence", stages=("att.wkv",),
            fix="scan t in order, each token reading the state the previous token wrote")
def time_not_recurrent(model, ctx):
    """Every token reads the step's input state (t treated as a parallel axis); the new state is
    the last token's update of the input state."""

    def wkv(original, r, k, v, *, w, u, s):
        rows, new = [], s
        for t in range(r.shape[0]):
            o, new = original(r[t:t + 1], k[t:t + 1], v[t:t + 1], w=w, u=u, s=s)
            rows.append(o)
        return torch.cat(rows), new

    _wrap(model, "_wkv", wkv)


@hypothesis(name="wkv-time-parallel", title="time axis not a recurrence for the outputs (state advanced right)",
            stages=("att.wkv",), fix="each token's output must read the state after the previous token, not the step's input state")
def time_parallel_outputs(model, ctx):
    """The outputs computed in parallel over time, every token reading the step's input state,
    while the state itself is still advanced token by token (a CPU schedule parallel over t)."""

    def wkv(original, r, k, v, *, w, u, s):
        rows = [original(r[t:t + 1], k[t:t + 1], v[t:t + 1], w=w, u=u, s=s)[0] for t in range(r.shape[0])]
        _, new = original(r, k, v, w=w, u=u, s=s)
        return torch.cat(rows), new

    _wrap(model, "_wkv", wkv)


@hypothesis(name="wkv-fp16-accumulator", title="fp16 rounding at att.wkv (fp16 accumulator)", stages=("att.wkv",),
            fix="accumulate the wkv sum over the key index in fp32")
def wkv_fp16_accumulator(model, ctx):
    """The wkv output's sum over the key index accumulated in fp16, rounded after every term."""

    def wkv(original, r, k, v, *, w, u, s):
        # fp16 rounding after every term is chaotic: a last-bit difference in a term (the
        # reference's matmul vs the port's) flips roundings. So the scan takes the candidate's own
        # recorded r, k, v where it has them — the stage's inputs, as the replay takes the layer's.
        r, k, v = (_candidate_tensor(ctx, n, like=x) for n, x in (("r", r), ("k", k), ("v", v)))
        T, H, N = r.shape
        out = torch.empty_like(r)
        for t in range(T):
            kv = k[t].unsqueeze(2) * v[t].unsqueeze(1)
            terms = r[t].unsqueeze(2) * ((u.unsqueeze(2) * k[t].unsqueeze(2)) * v[t].unsqueeze(1) + s)  # (H, i, j)
            acc = torch.zeros(H, N, dtype=torch.float16)
            for i in range(N):
                acc = acc + terms[:, i, :].half()
            out[t] = acc.float()
            s = kv + w.unsqueeze(2) * s
        return out, s

    _wrap(model, "_wkv", wkv)


@hypothesis(name="kernel-writes-input-state", title="wkv kernel writes its input state", stages=("att.wkv",),
            fix="write the new state to its own output buffer; never into the input state")
def kernel_writes_input_state(model, ctx):
    """The scan also stores its final state into its *input* buffer, so a second evaluation of
    the same step (a debug build taps the kernel twice) starts from the state after the step."""

    def wkv(original, r, k, v, *, w, u, s):
        _, after = original(r, k, v, w=w, u=u, s=s)
        return original(r, k, v, w=w, u=u, s=after)

    _wrap(model, "_wkv", wkv)


# -- token shift, embedding, receptance, weights ------------------------------------------------
def _cat_off_by_one(tensors, *a, **kw):
    # The shift is cat(last, xx[:-1]); off by one it is cat(last, last, xx[:-2]) (rows 0, 1 take last).
    if isinstance(tensors, (tuple, list)) and len(tensors) == 2 and tensors[0].shape[:1] == (1,):
        last, rows = tensors
        return torch.cat((last, last, rows[:-1]), *a, **kw)[: 1 + rows.shape[0]]
    return torch.cat(tensors, *a, **kw)


@hypothesis(name="token-shift-off-by-one", title="token shift off by one", stages=("att.shift", "ffn.shift"),
            versions=V5 + V4, fix="row t of the shift is row t-1 (row 0: the carried state), not t-2")
def token_shift_off_by_one(model, ctx):
    """The shifted rows taken from t-2 instead of t-1, in both the attention and the FFN shift."""
    _with_globals(model, "layer", _ref_module(ctx), torch=_Delegate(torch, cat=_cat_off_by_one))


def _ln0(model, ctx, x):
    from parity.reference.rwkv5 import LN_EPS

    w = ctx.weights
    return F.layer_norm(x.to(model.acc), (ctx.config.n_embd,), w["blocks.0.ln0.weight"].to(model.acc),
                        w["blocks.0.ln0.bias"].to(model.acc), LN_EPS).to(model.dtype)


@hypothesis(name="emb-without-ln0", title="ln0 missing", stages=("emb",), versions=V5 + V4,
            fix="apply blocks.0.ln0 to the embedding (or fold it into the table at load, once)")
def emb_without_ln0(model, ctx):
    """The embedding rows used as stored, without blocks.0.ln0."""
    model.emb = ctx.weights["emb.weight"].to(model.dtype)


@hypothesis(name="emb-ln0-twice", title="ln0 applied twice", stages=("emb",), versions=V5 + V4,
            fix="apply ln0 once: either fold it into the table at load or apply it at run time, not both")
def emb_ln0_twice(model, ctx):
    """ln0 folded into the table at load and applied again at run time."""
    model.emb = _ln0(model, ctx, model.emb)


@hypothesis(name="sigmoid-r", title="sigmoid on r", stages=("att.r",),
            fix="RWKV-5 uses r = xr @ Wr as is; the sigmoid on r is RWKV-4's")
def sigmoid_r(model, ctx):
    """sigmoid applied to the receptance in RWKV-5 (a v4 habit)."""
    _wrap(model, "_receptance", lambda original, xr, p: torch.sigmoid(original(xr, p)))


@hypothesis(name="swapped-k-v", title="weights of att.key and att.value swapped", stages=("att.k",),
            versions=V5 + V4, fix="load att.key.weight into k and att.value.weight into v")
def swapped_k_v(model, ctx):
    """Two equal-shaped matrices loaded into each other's place: att.key <-> att.value."""
    if ctx.version == "4":
        _each_layer(model, Wk=lambda p, i: p["Wv"], Wv=lambda p, i: p["Wk"])
    else:
        _each_layer(model, Wk=lambda p, i: p.Wv, Wv=lambda p, i: p.Wk)


@hypothesis(name="swapped-r-g", title="weights of att.receptance and att.gate swapped", stages=("att.r",),
            versions=GATED, fix="load att.receptance.weight into r and att.gate.weight into g")
def swapped_r_g(model, ctx):
    """Two equal-shaped matrices loaded into each other's place: att.receptance <-> att.gate."""
    _each_layer(model, Wr=lambda p, i: p.Wg, Wg=lambda p, i: p.Wr)


# -- rounding at a named tensor -----------------------------------------------------------------
def _rounding(stage: str, dtype: torch.dtype, label: str) -> Hypothesis:
    def plant(model, ctx):
        if stage == "emb":
            model.emb = model.emb.to(dtype).to(model.dtype)
        elif stage == "att.r":
            _wrap(model, "_receptance", lambda original, xr, p: original(xr, p).to(dtype).to(model.dtype))
        elif stage == "att.wkv":
            def wkv(original, *a, **kw):
                out = original(*a, **kw)
                return (out[0].to(dtype).to(out[0].dtype), *out[1:])
            _wrap(model, "_wkv", wkv)
        elif stage == "att.ln_x":
            _group_norm_is(model, lambda *a, **kw: F.group_norm(*a, **kw).to(dtype).float())
        elif stage == "logits":
            def head(original, x, *, record=None):
                # The logits rounded where the port hands them over: recorded and returned rounded.
                def rounded(name, value):
                    return value.to(dtype).to(value.dtype) if name == "logits" else value

                logits = original(x, record=lambda name, value: (record or (lambda *_: None))(name, rounded(name, value)))
                return rounded("logits", logits)
            _wrap(model, "head", head)

    plant.__doc__ = f"The tensor {stage} rounded to {label} (a cast, or a kernel that stores it in {label})."
    versions = V5 + V4 if stage in ("emb", "att.wkv", "logits") else V5
    return hypothesis(name=f"{label}-at-{stage}", title=f"{label} rounding at {stage}", stages=(stage,),
                      versions=versions, fix=f"keep {stage} in the model dtype (fp32 here); no {label} round trip")(plant)


for _stage in ("emb", "att.r", "att.wkv", "att.ln_x", "logits"):
    for _dt, _label in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        _rounding(_stage, _dt, _label)


# -- precision traps (docs/RWKV.md §3): what a low-precision port gets wrong -----------------------
# The engine plants these into a reference computing in the candidate's dtype (an fp16 candidate:
# the fp16 reference, rescaled as the official package), so fp16's own rounding is no part of the
# reproduction error and only the trap is. Bugs that round one named tensor (logits, the wkv
# accumulator) are the rounding family above and wkv-fp16-accumulator.
def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


@hypothesis(name="decay-in-bf16", title="decay w kept in bf16", stages=("att.wkv", "att.ln_x"),
            fix="compute w = exp(-exp(time_decay)) in fp32 and keep it fp32 (bf16 rounds every w above 1 - 2^-9 to 1.0)")
def decay_in_bf16(model, ctx):
    """The decay w = exp(-exp(time_decay)) stored in bf16 (8 mantissa bits): w near 1 becomes 1.0
    (no decay), the rest move by up to 0.4%, compounded every token. In an fp16 port the wkv's own
    error stays inside fp16's allowance for a step, so the GroupNorm (ln_x) often shows it first."""
    _decay(model, ctx, lambda t: _round_bf16(torch.exp(-torch.exp(_round_bf16(t)))))


@hypothesis(name="groupnorm-variance-fp16", title="GroupNorm variance E[x^2] - E[x]^2 in fp16", stages=("att.ln_x",),
            fix="compute the ln_x statistics in fp32, the variance as E[(x - mean)^2]")
def groupnorm_variance_fp16(model, ctx):
    """The ln_x variance as E[x²]−E[x]² in fp16: where a head's |mean| exceeds its spread the two
    terms agree to most of fp16's 11 bits and the variance keeps only their rounding. Computed
    on the candidate's own recorded wkv (as the fp16 accumulator hypothesis does): which way each
    fp16 sum rounds flips with a last-bit change of its input."""

    def gn(x, num_groups, weight=None, bias=None, eps=1e-5):
        x = _candidate_tensor(ctx, "wkv", like=x)
        T, C = x.shape
        g = x.reshape(T, num_groups, C // num_groups).float()
        mean = g.mean(-1, keepdim=True)
        x16, m16 = g.half(), mean.half()
        sq = torch.zeros_like(m16)
        for i in range(g.shape[-1]):  # an fp16 accumulator, rounded after every term, in index order
            sq = sq + x16[..., i:i + 1] * x16[..., i:i + 1]
        var = torch.clamp((sq * (1.0 / (C // num_groups)) - m16 * m16).float(), min=0.0)
        return ((g - mean) / torch.sqrt(var + eps)).reshape(T, C) * weight + bias

    _group_norm_is(model, gn)


@hypothesis(name="fp16-without-rescale", title="fp16 without the residual rescale",
            stages=("att.out", "x_after_att", "ffn.out", "x_out"), versions=V5 + V4,
            fix="in fp16 halve the residual stream after every 6th layer and divide att.output and ffn.value "
                "of layer l by 2^(l // 6) at load (the official package's RESCALE_LAYER)")
def fp16_without_rescale(model, ctx):
    """An fp16 port without the official package's rescale: the residual stream, whole, past
    65,504 becomes Inf. The reference's rescale undone: the divided weights multiplied back
    (exact, powers of two) and the stream never halved."""
    if not model.rescale_layer:
        return f"a {model.dtype_name} model is never rescaled: nothing to undo"
    scale = {i: model.layer_scale(i) for i in range(ctx.config.n_layer)}
    if ctx.version == "4":
        _each_layer(model, Wo=lambda p, i: p["Wo"] * scale[i], ffn_Wv=lambda p, i: p["ffn_Wv"] * scale[i])
    else:
        _each_layer(model, Wo=lambda p, i: p.Wo * scale[i], ffn_Wv=lambda p, i: p.ffn_Wv * scale[i])
    model.rescale_layer = 0
    return None


# -- RWKV-4 -------------------------------------------------------------------------------------
@hypothesis(name="v4-wkv-without-max", title="RWKV-4 wkv without the running max, in fp16", stages=("att.wkv",),
            versions=V4, fix="use the stable scan: subtract the running max exponent pp before every exp (and keep fp32)")
def v4_wkv_without_max(model, ctx):
    """The textbook v4 wkv (a + e^(u+k) v) / (b + e^(u+k)) without the running-max subtraction, in
    fp16: exp overflows above 11.09; pp passed through unchanged."""

    def wkv(k, v, *, w, u, aa, bb, pp):
        h = torch.float16
        out = torch.empty_like(k)
        for t in range(k.shape[0]):
            ek = torch.exp((u + k[t]).to(h))
            out[t] = ((aa.to(h) + ek * v[t].to(h)) / (bb.to(h) + ek)).float()
            decay, e2 = torch.exp(w.to(h)), torch.exp(k[t].to(h))
            aa = (decay * aa.to(h) + e2 * v[t].to(h)).float()
            bb = (decay * bb.to(h) + e2).float()
        return out, aa, bb, pp

    model._wkv = wkv


@hypothesis(name="v4-rescale-off-by-one", title="RWKV-4 rescale off by one", stages=("att.wkv",), versions=V4,
            fix="store pp = the max the state was rescaled by in this update, not the previous one")
def v4_rescale_off_by_one(model, ctx):
    """aa and bb rescaled by this update's max exponent, while pp keeps the previous step's."""

    def wkv(k, v, *, w, u, aa, bb, pp):
        out = torch.empty_like(k)
        for t in range(k.shape[0]):
            kk, vv = k[t], v[t]
            q = torch.maximum(pp, u + kk)
            e1, e2 = torch.exp(pp - q), torch.exp(u + kk - q)
            out[t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
            q = torch.maximum(w + pp, kk)
            e1, e2 = torch.exp(w + pp - q), torch.exp(kk - q)
            aa, bb = e1 * aa + e2 * vv, e1 * bb + e2  # BUG: pp not moved to q
        return out, aa, bb, pp

    model._wkv = wkv


# -- quantised weights: a dequantisation kernel's indexing mistakes ---------------------------------
# A quantised candidate (tvm@fp16i8, tvm@q4f16_1, a port of ChatRWKV's int8 or MLC's q4f16_1) is
# replayed by the reference that dequantises the same codes (parity/reference/int8.py, q4.py; the
# compiled build binds codes made by those same quantisers). A hypothesis here re-dequantises those
# codes the wrong way and puts the result in place of the faulty layer's matrices (or the head's), so
# quantisation error is shared and only the kernel's mistake is left to reproduce. Every matmul of
# the layer shows it; in both families the first is att.r (layer 0's receptance).
QUANT_STAGES = ("att.r", "att.k", "att.v", "att.g", "att.out", "ffn.r", "ffn.k", "ffn.out", "logits")
# The reference's matrix attributes (a v5 _Layer's field, a v4 layer dict's key) -> checkpoint key.
_MATRICES = (("Wr", "att.receptance.weight"), ("Wk", "att.key.weight"), ("Wv", "att.value.weight"),
             ("Wg", "att.gate.weight"), ("Wo", "att.output.weight"), ("ffn_Wk", "ffn.key.weight"),
             ("ffn_Wr", "ffn.receptance.weight"), ("ffn_Wv", "ffn.value.weight"))
_RESCALED = ("att.output.weight", "ffn.value.weight")  # divided by 2^(l // 6) in fp16, before quantising


def _requantized(model, ctx, dequantize) -> None:
    """The faulty layer's matrices (the head's, for ln_out/logits) replaced by ``dequantize(weight)``:
    the fp32 weight prepared as the reference prepares it (rescaled in fp16), quantised by the
    reference's own quantiser, dequantised the wrong way; ``dequantize`` returns (out, in) or None
    (the bug cannot apply to that matrix: it keeps the reference's correct one)."""
    w = ctx.weights

    def redo(key: str, scale: float):
        new = dequantize(w[key] / scale if scale != 1.0 else w[key])
        return None if new is None else new.to(model.dtype)

    if ctx.layer is None:
        new = redo("head.weight", 1.0)
        if new is not None:
            model.head_weight = new
        return
    i, p = ctx.layer, model.layers[ctx.layer]
    changes = {}
    for attr, suffix in _MATRICES:
        key = f"blocks.{i}.{suffix}"
        if key not in w:  # 5.0 and RWKV-4: no gate
            continue
        new = redo(key, model.layer_scale(i) if suffix in _RESCALED else 1.0)
        if new is not None:
            changes[attr] = new
    model.layers[i] = {**p, **changes} if isinstance(p, dict) else dataclasses.replace(p, **changes)


def _int8_parts(weight: torch.Tensor, dtype: torch.dtype):
    """ChatRWKV's codes and ranges of one (out, in) weight (parity/reference/int8.py), in the
    package's (in, out) layout: q (N, M); my, ry (N, 1) per input row; mx, rx (M,) per output column."""
    from parity.reference import int8

    p = int8.quantize(weight)
    return p["q"].to(dtype), *(p[k].to(dtype) for k in ("mx", "rx", "my", "ry"))


def _int8_square(fn):
    """A dequantisation that indexes a per-input vector by output (or back): in bounds only when
    in = out, so a port with it reads out of bounds, or crashes, on the other matrices; here those
    keep their correct dequantisation, as the bug zoo's int8-scales-swapped does."""

    def dequantize(weight, *, dtype):
        return fn(weight, dtype=dtype) if weight.shape[0] == weight.shape[1] else None

    return dequantize


@hypothesis(name="int8-scales-swapped", title="int8 row and column scales swapped", stages=QUANT_STAGES,
            versions=V5 + V4, weights=("int8",),
            fix="dequantise as (q + 0.5) * ry[in] * rx[out] + my[in] + mx[out]: ry/my are per input row, "
                "rx/mx per output column")
def int8_scales_swapped(model, ctx):
    """ChatRWKV's int8 dequantisation with the row and column scales indexed by each other's axis:
    (q + 0.5) * ry[out] * rx[in] for ry[in] * rx[out] (the offsets right) — every weight moves by
    the ratio of its row's and its column's range. Square matrices only (see _int8_square)."""

    def dq(weight, *, dtype):
        q, mx, rx, my, ry = _int8_parts(weight, dtype)
        return ((q + 0.5) * ry.reshape(1, -1) * rx.reshape(-1, 1) + my + mx).t()  # BUG: ry by out, rx by in

    _requantized(model, ctx, functools.partial(_int8_square(dq), dtype=model.dtype))
    return "square matrices; the others would be read out of bounds"


@hypothesis(name="int8-offsets-swapped", title="int8 row and column offsets swapped", stages=QUANT_STAGES,
            versions=V5 + V4, weights=("int8",),
            fix="dequantise as (q + 0.5) * ry[in] * rx[out] + my[in] + mx[out]: my is the input row's "
                "minimum, mx the output column's")
def int8_offsets_swapped(model, ctx):
    """ChatRWKV's int8 dequantisation with the row and column offsets (minima) indexed by each
    other's axis: + my[out] + mx[in] for + my[in] + mx[out] (the scales right). Square matrices only."""

    def dq(weight, *, dtype):
        q, mx, rx, my, ry = _int8_parts(weight, dtype)
        return ((q + 0.5) * ry * rx + my.reshape(1, -1) + mx.reshape(-1, 1)).t()  # BUG: my by out, mx by in

    _requantized(model, ctx, functools.partial(_int8_square(dq), dtype=model.dtype))
    return "square matrices; the others would be read out of bounds"


@hypothesis(name="int8-offsets-dropped", title="int8 offsets dropped", stages=QUANT_STAGES,
            versions=V5 + V4, weights=("int8",),
            fix="add the row and column minima back: (q + 0.5) * ry * rx + my + mx, not (q + 0.5) * ry * rx")
def int8_offsets_dropped(model, ctx):
    """ChatRWKV's int8 dequantisation without its offsets (the row and column minima subtracted
    before scaling): every weight is shifted by my[in] + mx[out]."""

    def dq(weight):
        q, mx, rx, my, ry = _int8_parts(weight, model.dtype)
        return ((q + 0.5) * ry * rx).t()  # BUG: + my + mx missing

    _requantized(model, ctx, dq)


def _q4_dequantized(weight: torch.Tensor, *, scale_of) -> torch.Tensor:
    """MLC's q4f16_1 weight (parity/reference/q4.py) dequantised with ``scale_of(scale)`` for its
    (out, groups) fp16 scales: (code - 7) * scale in fp16, as the reference and MLC's kernel compute it."""
    from parity.reference import q4

    parts = q4.quantize(weight)
    return q4.dequantize({"q": parts["q"], "scale": scale_of(parts["scale"])}, in_features=weight.shape[1])


@hypothesis(name="q4-group-off-by-one", title="4-bit group boundary off by one", stages=QUANT_STAGES,
            versions=V5 + V4, weights=("q4",),
            fix="element i of a row belongs to group i // 32: dequantise it with scale[out, i // 32]")
def q4_group_off_by_one(model, ctx):
    """q4f16_1's dequantisation with each group of 32 taking the previous group's scale (group 0 its
    own): a group index off by one, every weight but the first group's scaled by its neighbour's range."""
    _requantized(model, ctx, functools.partial(
        _q4_dequantized, scale_of=lambda s: torch.cat((s[:, :1], s[:, :-1]), dim=1)))  # BUG: group g - 1


@hypothesis(name="q4-scale-as-bf16", title="q4 scales read in the wrong dtype (fp16 bits as bf16)",
            stages=QUANT_STAGES, versions=V5 + V4, weights=("q4",),
            fix="declare the q4f16_1 scale buffer float16, the dtype it is stored in (q4bf16 is another scheme)")
def q4_scale_as_bf16(model, ctx):
    """q4f16_1's fp16 scales read by a kernel that declares them bfloat16: the same 16 bits, another
    exponent and mantissa split, so every scale (and weight) is wrong by a large, irregular factor."""
    _requantized(model, ctx, functools.partial(
        _q4_dequantized, scale_of=lambda s: s.view(torch.int16).view(torch.bfloat16).float().to(torch.float16)))
