"""What a prompt difference does to the model: the reference's next token and greedy continuation.

Both prompts run through the pure-torch reference from the zero state. Reported: the next-token
distributions P_ours and P_theirs (softmax of the last logits, in float64), KL(P_ours ‖ P_theirs)
in nats (how surprised a model trained on our format is by what it now predicts), the top-5 of
each side by side, and both greedy continuations up to the first token where they part.

Vocabulary folding: the bundled fixtures have V = 1024, so tokenizer ids are mapped to id % V as
``parity run`` does (``parity.scenarios.fit_ids``); folded ids no longer spell the text, so the
result says ``vocab_folded`` and shows ids, not token strings. A real model (V = 65536) is never
folded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from parity.errors import ParityError

TOP_K = 5
DEFAULT_GREEDY_STEPS = 8


@dataclass(frozen=True)
class ModelEffect:
    checkpoint: str
    model: str  # ModelConfig.describe()
    vocab_folded: bool
    warnings: tuple[str, ...]
    ours_model_ids: tuple[int, ...]
    theirs_model_ids: tuple[int, ...]
    kl_nats: float  # KL(P_ours ‖ P_theirs) of the next token
    ours_top: tuple[tuple[int, float, str | None], ...]  # (id, probability, token text or None when folded)
    theirs_top: tuple[tuple[int, float, str | None], ...]
    greedy_steps: int
    ours_greedy: tuple[int, ...]
    theirs_greedy: tuple[int, ...]
    part_at: int | None  # first greedy step where the chosen tokens differ (None: same for all steps)
    ours_greedy_text: str | None  # decoded continuation; None when folded
    theirs_greedy_text: str | None

    @property
    def same_top1(self) -> bool:
        return self.ours_top[0][0] == self.theirs_top[0][0]

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for key in ("ours_top", "theirs_top"):
            d[key] = [{"id": i, "p": p, "token": t} for i, p, t in d[key]]
        for key in ("warnings", "ours_model_ids", "theirs_model_ids", "ours_greedy", "theirs_greedy"):
            d[key] = list(d[key])
        d["same_top1"] = self.same_top1
        if not math.isfinite(self.kl_nats):  # JSON results are written with allow_nan=False
            d["kl_nats"] = "inf"
        return d


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) in nats; terms with p = 0 contribute 0."""
    mask = p > 0
    # q underflows to 0 only for logits ~745 nats below the max; report that as infinite, not NaN.
    with np.errstate(divide="ignore"):
        return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def _top(p: np.ndarray, *, k: int, texts) -> tuple[tuple[int, float, str | None], ...]:
    order = np.argsort(-p, kind="stable")[:k]  # stable: ties go to the lower id, as np.argmax does
    return tuple((int(i), float(p[i]), texts(int(i))) for i in order)


def model_effect(checkpoint, *, ours_ids, theirs_ids, tokenizer, greedy_steps: int = DEFAULT_GREEDY_STEPS) -> ModelEffect:
    """Run the reference on both prompts' ids (``checkpoint``: a path or a loaded ``Checkpoint``)."""
    from parity.checkpoint import Checkpoint, load_checkpoint
    from parity.greedy import ReferenceStepper, decode_run
    from parity.prompt.check import token_text
    from parity.scenarios import fit_ids

    if type(greedy_steps) is not int or greedy_steps < 1:
        raise ParityError(f"--greedy must be an integer >= 1, got {greedy_steps!r}")
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    vocab = ck.config.vocab_size
    ours_model, theirs_model = fit_ids(ours_ids, vocab), fit_ids(theirs_ids, vocab)
    folded = ours_model != tuple(ours_ids) or theirs_model != tuple(theirs_ids)
    warnings = []
    if folded:
        every = tuple(ours_ids) + tuple(theirs_ids)
        changed = sum(1 for i in every if i >= vocab)
        warnings.append(f"vocab folded: the model has {vocab} token ids but the prompts' ids go up to {max(every)}; "
                        f"{changed} of {len(every)} ids were mapped to id % {vocab}, so the model runs on ids that no "
                        "longer spell either prompt")
        if ours_model == theirs_model:
            warnings.append("the two prompts fold to the same ids: on this model their difference cannot show")

    stepper = ReferenceStepper(ck)
    ours_tokens, ours_rows = decode_run(stepper, prompt_ids=list(ours_model), steps=greedy_steps)
    theirs_tokens, theirs_rows = decode_run(stepper, prompt_ids=list(theirs_model), steps=greedy_steps)
    p, q = _softmax64(ours_rows[0]), _softmax64(theirs_rows[0])
    texts = (lambda i: None) if folded else (lambda i: token_text(tokenizer, i))
    part = next((k for k, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), None)

    def continuation(tokens):
        if folded:
            return None
        try:
            return tokenizer.decode(tokens, errors="replace")
        except ParityError:  # an id past the vocabulary file (the model's V may be larger)
            return None

    kl = kl_divergence(p, q)
    return ModelEffect(
        checkpoint=str(ck.path), model=ck.config.describe(), vocab_folded=folded, warnings=tuple(warnings),
        ours_model_ids=ours_model, theirs_model_ids=theirs_model,
        kl_nats=kl if math.isfinite(kl) else float("inf"),
        ours_top=_top(p, k=TOP_K, texts=texts), theirs_top=_top(q, k=TOP_K, texts=texts),
        greedy_steps=greedy_steps, ours_greedy=tuple(ours_tokens), theirs_greedy=tuple(theirs_tokens), part_at=part,
        ours_greedy_text=continuation(ours_tokens), theirs_greedy_text=continuation(theirs_tokens),
    )
