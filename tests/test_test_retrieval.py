import numpy as np
import pytest
import torch

import test_retrieval


def brute_force_recall(q, g, q_labels, g_labels, ks, exclude=None):
    """Full-matrix reference: argsort every row, TIRG style."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = {}
    sims = q @ g.T
    order = []
    for i in range(len(q)):
        s = sims[i].copy()
        ranked = [j for j in np.argsort(-s, kind="stable") if exclude is None or j != exclude[i]]
        order.append(ranked)
    for k in ks:
        out[k] = float(
            np.mean([any(g_labels[j] == q_labels[i] for j in order[i][:k]) for i in range(len(q))])
        )
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_recall_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(17, 8)), rng.normal(size=(23, 8))
    g_labels = rng.integers(0, 6, size=23)  # labels shared by many gallery items
    q_labels = rng.integers(0, 7, size=17)  # label 6 never occurs: never a hit
    exclude = rng.integers(-1, 23, size=17)
    ks = (1, 5, 10)
    ours = test_retrieval.recall_at_k(
        q, g, q_labels, g_labels, ks, exclude, chunk_size=chunk_size or 17
    )
    assert ours == pytest.approx(brute_force_recall(q, g, q_labels, g_labels, ks, exclude))
    no_exclude = test_retrieval.recall_at_k(
        torch.tensor(q), torch.tensor(g), q_labels, g_labels, ks, chunk_size=chunk_size
    )
    assert no_exclude == pytest.approx(brute_force_recall(q, g, q_labels, g_labels, ks))


def test_excluded_item_never_counts_even_when_k_covers_the_gallery():
    g = np.eye(3)
    q = np.array([[1.0, 0.0, 0.0]])
    # the only item with the target's label is the excluded source
    r = test_retrieval.recall_at_k(q, g, [7], [7, 1, 2], ks=(1, 3, 10), exclude_indices=[0])
    assert r == {1: 0.0, 3: 0.0, 10: 0.0}
    r = test_retrieval.recall_at_k(q, g, [7], [7, 1, 2], ks=(1,), exclude_indices=[-1])
    assert r == {1: 1.0}


def test_recall_checks_shapes():
    with pytest.raises(ValueError):
        test_retrieval.recall_at_k(np.ones((2, 3)), np.ones((4, 3)), [0], [0, 1, 2, 3], (1,))
