"""Backend: HuggingFace transformers ``RwkvForCausalLM`` (RWKV-4 only), observed by forward hooks.

The checkpoint's tensors are renamed once (parity/hf_names.py) and loaded strictly, so HF runs
exactly our weights. Hooks only read module outputs, so they cannot change HF's math. Recorded:
``emb`` (pre_ln output), ``L.att.ln1`` / ``L.ffn.ln2``, ``L.att.k`` / ``L.att.v`` (the Linear
outputs), ``L.att.out``, ``L.ffn.out``, ``L.x_out`` (block output), ``logits`` (all rows), and
the state after each step, adapted from HF's five (B, C, L) tensors [ffn_x, att_x, num, den, max]
to the canonical slots (att_x, aa, bb, pp, ffn_x).

Where HF's math legitimately differs from ChatRWKV's it is declared in ``KNOWN_DIFFERENCES`` and
carried into every report, so a user sees a named difference rather than an unexplained one.
"""

from __future__ import annotations

import re

from parity.checkpoint import Checkpoint, ModelVersion
from parity.dumpers.backends import Backend
from parity.dumpers.format import StepWriter
from parity.errors import ParityError

RESCALE_EVERY = 6  # HF's default, and what RwkvConfig gets here: the model as HF users run it


def known_differences(*, n_layer: int) -> list[dict]:
    rescale_applies = n_layer > RESCALE_EVERY
    return [
        {
            "name": "rescale_every",
            "applies": rescale_applies,
            "detail": (
                f"in eval HF divides att.output and ffn.value of layer l by 2^(l//{RESCALE_EVERY}) and halves x "
                f"after every {RESCALE_EVERY}th layer (in any dtype; ChatRWKV only in fp16): att.out, ffn.out and "
                f"x_out of layers >= {RESCALE_EVERY} come out scaled by 2^-(l//{RESCALE_EVERY}). The hf backend "
                "multiplies those recorded stages back by 2^(l//6) (exact in binary floating point), so they compare "
                "in canonical units; what remains is the LayerNorm-eps effect of the smaller activations (~6e-5 relative)"
                + ("" if rescale_applies else f"; this model has {n_layer} layers, so it changes nothing here")
            ),
        },
        {
            "name": "ln0_at_run_time",
            "applies": True,
            "detail": "HF applies ln0 (pre_ln) to the embedding at run time in the model dtype; ChatRWKV folds it "
            "into the table at load. Identical in fp32; in fp16/bf16 the rounding differs",
        },
        {
            "name": "logits_dtype",
            "applies": False,
            "detail": "HF returns logits in the model dtype; ChatRWKV in fp32. This run is fp32, so no difference",
        },
    ]


class HFBackend(Backend):
    """transformers' RwkvForCausalLM, fp32, eval mode, on our weights."""

    def __init__(self, checkpoint: Checkpoint):
        if checkpoint.config.version != ModelVersion.V4:
            raise ParityError(
                f"the hf backend is RWKV-4 only (transformers' RwkvForCausalLM); checkpoint is RWKV-{checkpoint.config.version.value}"
            )
        try:
            import transformers
            from transformers import RwkvConfig, RwkvForCausalLM
        except ImportError:
            raise ParityError("the hf backend needs transformers: pip install transformers") from None
        import torch

        from parity.hf_names import chatrwkv_to_hf, hf_config

        cfg = checkpoint.config
        super().__init__(
            checkpoint=checkpoint, name="hf", mode="hooks", dtype="float32",
            extra={"package": f"transformers {transformers.__version__}", "known_differences": known_differences(n_layer=cfg.n_layer)},
        )
        hc = hf_config(cfg)
        hc["rescale_every"] = RESCALE_EVERY
        hc.pop("architectures")
        hc.pop("model_type")
        # Built on the meta device (no random init, no memory) and given the checkpoint's one shared
        # fp32 copy (Checkpoint.fp32_weights) as its parameters (assign=True): no fp32 copy of its
        # own (issue 9: at 0.4B the hf run was 2.76x the weights + file, this copy among the cause).
        with torch.device("meta"):
            self.model = RwkvForCausalLM(RwkvConfig(**hc))
        self.model.eval()
        state = {chatrwkv_to_hf(k): v for k, v in checkpoint.fp32_weights().items()}
        # HF divides these two weights of every layer l >= RESCALE_EVERY by 2^(l // RESCALE_EVERY)
        # in place at its first eval forward (RwkvModel._rescale_layers): they get copies of their
        # own, so the shared tensors (which the reference reads, in-process) are never written.
        for layer in range(RESCALE_EVERY, cfg.n_layer):
            for key in (f"rwkv.blocks.{layer}.attention.output.weight", f"rwkv.blocks.{layer}.feed_forward.value.weight"):
                if key in state:
                    state[key] = state[key].clone()
        missing, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        left_on_meta = [n for n, t in (*self.model.named_parameters(), *self.model.named_buffers()) if t.is_meta]
        if missing or unexpected or left_on_meta:
            raise ParityError(f"HF RWKV parameters do not match the checkpoint: missing {(missing or left_on_meta)[:3]}, "
                              f"unexpected {unexpected[:3]}")
        self.torch = torch
        self.state = None
        self._capture: dict = {}
        self._hook()

    def _hook(self) -> None:
        def keep(name, pick=lambda out: out):
            def hook(module, args, out):
                self._capture[name] = pick(out).detach()[0].float()  # drop the batch axis

            return hook

        first = lambda out: out[0]  # noqa: E731 - modules that return (tensor, state)
        rwkv = self.model.rwkv
        rwkv.blocks[0].pre_ln.register_forward_hook(keep("emb"))
        for i, block in enumerate(rwkv.blocks):
            block.ln1.register_forward_hook(keep(f"L{i}.att.ln1"))
            block.ln2.register_forward_hook(keep(f"L{i}.ffn.ln2"))
            block.attention.key.register_forward_hook(keep(f"L{i}.att.k"))
            block.attention.value.register_forward_hook(keep(f"L{i}.att.v"))
            block.attention.register_forward_hook(keep(f"L{i}.att.out", first))
            block.feed_forward.register_forward_hook(keep(f"L{i}.ffn.out", first))
            block.register_forward_hook(keep(f"L{i}.x_out", first))

    def begin(self) -> None:
        self.state = None

    def record_step(self, ids: list[int], step: StepWriter) -> None:
        torch = self.torch
        self._capture.clear()
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), state=self.state, use_cache=True)
        self.state = out.state
        captured = dict(self._capture)
        # Undo HF's eval-time rescaling in what we record (see KNOWN_DIFFERENCES): layer l's
        # att.out, ffn.out and x_out are 2^-(l//6) of ChatRWKV's. A power of two: exact.
        for name in list(captured):
            m = re.fullmatch(r"L(\d+)\.(att\.out|ffn\.out|x_out)", name)
            if m:
                captured[name] = captured[name] * float(2 ** (int(m.group(1)) // RESCALE_EVERY))
        captured["logits"] = out.logits[0].float()
        # HF state: five (B, C, L) tensors [ffn_x, att_x, num, den, max] -> canonical per layer.
        ffn_x, att_x, num, den, mx = (s[0] for s in out.state)
        for layer in range(self.checkpoint.config.n_layer):
            for slot, src in (("att_x", att_x), ("aa", num), ("bb", den), ("pp", mx), ("ffn_x", ffn_x)):
                captured[f"state.L{layer}.{slot}"] = src[:, layer].float()
        order = {n: i for i, n in enumerate(self.canonical_order())}
        for name in sorted(captured, key=order.__getitem__):
            step.add(name, captured[name].contiguous().numpy())
