"""Task-nearest anchor selection (safecl/safety/selection.py): share 0 is the random draw bit
for bit, the centred-cosine score against a hand computation, a prompt identical to the task's
ranks first on a real (tiny) model, and the pooled states do not depend on the batch."""

import random

import pytest
import torch

from safecl.data.formatting import user_text
from safecl.safety.selection import mean_states, nearest_scores, pick_anchors, task_scores, top


def test_share_zero_is_the_random_draw_every_anchor_had_before():
    for n, limit, seed in [(100, 64, 17), (10, 64, 3), (2483, 64, 1019)]:
        assert pick_anchors(n, limit, seed) == sorted(random.Random(seed).sample(range(n), min(limit, n)))
        assert pick_anchors(n, limit, seed, torch.randn(n), share=0.0) == pick_anchors(n, limit, seed)


def test_share_takes_the_best_scores_then_random_and_never_twice():
    scores = torch.arange(50, dtype=torch.float32)  # row 49 best
    picks = pick_anchors(50, 10, 0, scores, share=0.5)
    assert len(picks) == len(set(picks)) == 10 and picks == sorted(picks)
    assert {45, 46, 47, 48, 49} <= set(picks)
    assert pick_anchors(50, 10, 0, scores, share=1.0) == list(range(40, 50))
    assert pick_anchors(50, 10, 0, scores, share=0.5) == picks  # seeded
    assert top(torch.tensor([0.1, 0.9, 0.9, 0.2]), 2) == [1, 2]  # ties: the lower index first


def test_task_score_is_the_centred_cosine_to_the_task_centroid():
    g = torch.Generator().manual_seed(0)
    pool, task = torch.randn(7, 5, generator=g) + 3.0, torch.randn(3, 5, generator=g) + 3.0
    mu = pool.mean(0)
    c = sum((t - mu) / (t - mu).norm() for t in task) / 3
    want = torch.stack([((p - mu) / (p - mu).norm()) @ c for p in pool])
    assert torch.allclose(task_scores(pool, task), want, atol=1e-6)
    # the common offset (+3 on every coordinate) does not decide: shifting everything changes nothing
    assert torch.allclose(task_scores(pool + 10, task + 10), want, atol=1e-5)


def test_a_pool_prompt_identical_to_the_task_ranks_first_on_a_real_model(tiny):
    model, tok = tiny
    msg = lambda s: [{"role": "user", "content": s}]  # noqa: E731
    task = [msg("Write a Python function that sorts a list of numbers.")] * 4
    pool = [msg(s) for s in ["How do I bake bread?", "Name three rivers in Europe.", "Tell me a joke about cats.",
                             "Write a Python function that sorts a list of numbers.", "What is 7 times 8?",
                             "Describe the water cycle in two sentences."]]
    scores = nearest_scores(model, tok, pool, task)
    assert top(scores, 1) == [3]
    assert scores[3] == pytest.approx(1.0, abs=1e-4)  # the same text: the same centred state


def test_pooled_states_do_not_depend_on_the_batch(tiny):
    model, tok = tiny
    texts = ["a", "a much longer text with many more tokens in it than the first", "medium length text"]
    one = mean_states(model, tok, texts, batch_size=1)
    all3 = mean_states(model, tok, texts, batch_size=3)
    assert one.shape == (3, model.config.hidden_size) and torch.allclose(one, all3, atol=1e-5)
    assert user_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "u"
