"""k-means: exact recovery of separated blobs, monotone inertia, cosine mode, chunking."""

import pytest
import torch
import torch.nn.functional as F

import common


def blobs(n_per=100, k=8, dim=5, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 5
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def inertia(x, centroids, labels):
    return float(((x - centroids[labels]) ** 2).sum())


def test_recovers_separated_blobs_exactly():
    x, y = blobs()
    for seed in range(3):
        centroids, labels = common.kmeans(x, 8, seed=seed, n_init=3)
        assert common.cluster_accuracy(y, labels) == 1.0
        # each centroid is the mean of its blob
        for c in range(8):
            assert torch.allclose(centroids[c], x[labels == c].mean(0), atol=1e-5)


def test_inertia_does_not_increase_with_iterations():
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(1))  # no structure: many moves
    values = [inertia(x, *common.kmeans(x, 10, iters=t, tol=0.0, seed=3)) for t in range(0, 12)]
    assert all(b <= a + 1e-3 for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] < values[0] * 0.95  # and Lloyd did real work after the seeding


def test_restarts_keep_the_lowest_inertia():
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(2))
    improved = False
    for seed in range(4):  # the first restart is the single run with the same seed
        one = inertia(x, *common.kmeans(x, 12, seed=seed, iters=3))
        four = inertia(x, *common.kmeans(x, 12, seed=seed, iters=3, n_init=4))
        assert four <= one + 1e-3
        improved |= four < one - 1e-3
    assert improved


def test_chunked_equals_unchunked():
    x, _ = blobs(n_per=50, k=5, spread=1.0, seed=4)
    c1, l1 = common.kmeans(x, 5, seed=0)
    c2, l2 = common.kmeans(x, 5, seed=0, chunk_size=7)
    assert torch.equal(l1, l2) and torch.allclose(c1, c2, atol=1e-5)
    assert torch.equal(common.assign_to_centroids(x, c1, chunk_size=3), l1)


def test_cosine_clusters_by_direction_not_length():
    g = torch.Generator().manual_seed(5)
    directions = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    y = torch.arange(4).repeat_interleave(50)
    lengths = torch.rand(200, 1, generator=g) * 10 + 0.1  # lengths vary 100-fold
    x = (directions[y] + 0.05 * torch.randn(200, 16, generator=g)) * lengths
    centroids, labels = common.kmeans(x, 4, metric="cosine")
    assert common.cluster_accuracy(y, labels) == 1.0
    assert torch.allclose(centroids.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(common.assign_to_centroids(x * 3, centroids, metric="cosine"), labels)
    # Euclidean k-means on the same points splits them by length instead
    assert common.cluster_accuracy(y, common.kmeans(x, 4)[1]) < 0.9


def test_empty_clusters_are_reseeded():
    # 3 distinct points, k = 3, but many duplicates: every cluster must end up non-empty
    x = torch.tensor([[0.0, 0.0]] * 50 + [[10.0, 0.0]] * 3 + [[0.0, 10.0]] * 2)
    _, labels = common.kmeans(x, 3, seed=0)
    assert torch.bincount(labels, minlength=3).min() > 0


def test_plusplus_seeding_is_seeded_and_spreads_centres():
    x, y = blobs(n_per=30, k=6, spread=0.01, seed=6)
    c_a, _ = common.kmeans(x, 6, iters=0, seed=11)
    c_b, _ = common.kmeans(x, 6, iters=0, seed=11)
    assert torch.equal(c_a, c_b)
    # with 6 far-apart blobs, greedy k-means++ puts one centre in each blob before any Lloyd step
    assert len(set(y[torch.cdist(c_a, x).argmin(1)].tolist())) == 6


def test_bad_arguments():
    with pytest.raises(ValueError):
        common.kmeans(torch.randn(5, 2), 6)
    with pytest.raises(ValueError):
        common.kmeans(torch.randn(5, 2), 2, metric="manhattan")
