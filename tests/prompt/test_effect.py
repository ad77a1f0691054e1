"""The model comparison, recomputed here with torch from the reference's logits."""

import math

import pytest
import torch

from parity.checkpoint import load_checkpoint
from parity.prompt.effect import kl_divergence, model_effect
from parity.reference import make_reference

from .conftest import FIXTURE

OURS = "User: Hi! What is RWKV?\n\nAssistant:"


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(FIXTURE)


def greedy(model, ids, steps):
    logits, state = model.forward(list(ids), None)
    out = []
    for _ in range(steps):
        out.append(int(torch.argmax(logits[-1])))
        logits, state = model.forward([out[-1]], state)
    return out


def test_trailing_space_changes_the_next_token(checkpoint, world):
    ours_ids, theirs_ids = world.encode(OURS), world.encode(OURS + " ")
    effect = model_effect(checkpoint, ours_ids=ours_ids, theirs_ids=theirs_ids, tokenizer=world, greedy_steps=6)
    V = checkpoint.config.vocab_size
    assert V == 1024 and effect.vocab_folded and effect.warnings and "vocab folded" in effect.warnings[0]
    assert effect.ours_model_ids == tuple(i % V for i in ours_ids)
    assert all(t is None for _, _, t in effect.ours_top)  # folded ids spell nothing: no token text

    model = make_reference(checkpoint)
    lo = model.forward(list(effect.ours_model_ids), None)[0][-1].double()
    lt = model.forward(list(effect.theirs_model_ids), None)[0][-1].double()
    p, q = torch.softmax(lo, 0), torch.softmax(lt, 0)
    kl = float(torch.sum(p * (torch.log(p) - torch.log(q))))
    assert kl > 0
    assert effect.kl_nats == pytest.approx(kl, rel=1e-6)  # the same fp64 formula; only summation order differs
    top_o, top_t = torch.topk(p, 5), torch.topk(q, 5)
    assert [i for i, _, _ in effect.ours_top] == top_o.indices.tolist()
    assert [i for i, _, _ in effect.theirs_top] == top_t.indices.tolist()
    assert [pp for _, pp, _ in effect.ours_top] == pytest.approx(top_o.values.tolist(), rel=1e-9)
    assert effect.same_top1 == (top_o.indices[0] == top_t.indices[0])

    go = greedy(model, effect.ours_model_ids, 6)
    gt = greedy(model, effect.theirs_model_ids, 6)
    assert list(effect.ours_greedy) == go and list(effect.theirs_greedy) == gt
    part = next((k for k, (a, b) in enumerate(zip(go, gt)) if a != b), None)
    assert effect.part_at == part


def test_same_prompt_same_distribution(checkpoint, world):
    ids = world.encode(OURS)
    effect = model_effect(checkpoint, ours_ids=ids, theirs_ids=ids, tokenizer=world, greedy_steps=3)
    assert effect.kl_nats == 0.0 and effect.part_at is None and effect.same_top1
    d = effect.to_dict()
    assert d["ours_top"] == d["theirs_top"] and d["same_top1"] is True


def test_kl_divergence_edges():
    import numpy as np

    p = np.array([0.5, 0.5, 0.0])
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence(p, np.array([0.25, 0.25, 0.5])) == pytest.approx(math.log(2))
    assert kl_divergence(p, np.array([1.0, 0.0, 0.0])) == math.inf


def test_full_vocabulary_is_not_folded(tmp_path, world):
    """A model with the World vocabulary (V = 65536): ids run as they are, and tokens show as text."""
    from parity.synthetic import make_config, make_weights

    cfg = make_config(n_layer=1, n_embd=16, head_size=8, vocab_size=65536, version="5.2")
    path = tmp_path / "world-vocab.pth"
    torch.save(make_weights(cfg, seed=0), path)
    ours_ids, theirs_ids = world.encode(OURS), world.encode(OURS + " ")
    effect = model_effect(path, ours_ids=ours_ids, theirs_ids=theirs_ids, tokenizer=world, greedy_steps=3)
    assert not effect.vocab_folded and effect.warnings == ()
    assert effect.ours_model_ids == tuple(ours_ids)
    for token_id, _, text in effect.ours_top + effect.theirs_top:
        if token_id in world.vocab.id_to_bytes:  # the model's rows past the vocabulary file have no text
            assert text == world.decode_bytes([token_id]).decode("utf-8", errors="backslashreplace") \
                .replace(" ", "\u2420").replace("\n", "\u23ce")
    model = make_reference(load_checkpoint(path))
    assert list(effect.ours_greedy) == greedy(model, ours_ids, 3)
