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


def test_empty_clusters_are_reseeded(monkeypatch):
    # A centre that no point is nearest to (seeded far away) is empty after the first assignment:
    # it must move to the point worst served by the other centres, not stay where it was.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g) + 10])
    far = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1000.0, 1000.0]])
    monkeypatch.setattr(common, "_kmeans_plusplus", lambda x, k, generator: far.clone())
    centroids, labels = common.kmeans(x, 3, iters=1, tol=0.0)
    served = torch.cdist(x, far[:2]).min(1).values
    assert torch.equal(centroids[2], x[served.argmax()]), "re-seeded at the worst-served point"
    _, labels = common.kmeans(x, 3, tol=0.0)
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


def test_lloyd_runs_to_a_fixed_point():
    # With tol 0 and iterations to spare, every centre is the mean of the points nearest to it
    # (a run stopped after one Lloyd step is not, on overlapping clusters).
    x = torch.randn(600, 2, generator=torch.Generator().manual_seed(1))
    centroids, labels = common.kmeans(x, 8, iters=500, tol=0.0)
    means = torch.stack([x[labels == c].mean(0) for c in range(8)])
    assert torch.allclose(centroids, means, atol=1e-5)
    assert torch.equal(common.assign_to_centroids(x, centroids), labels)


def test_plusplus_seeding_is_greedy():
    # Three blobs of 300 points and 20 far outliers: D^2 sampling draws an outlier more often than
    # a blob, but a blob's centre lowers the potential far more, so the best of 2 + ln k
    # candidates lands in a blob. Measured over these 40 seeds (iters=0, seeding only): 104 of
    # the 120 centres in a blob; one candidate per centre (plain k-means++) 80; the worst
    # candidate instead of the best 52.
    blob_centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    in_blobs = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        blobs = blob_centres.repeat_interleave(300, 0) + torch.randn(900, 2, generator=g)
        outliers = (torch.rand(20, 2, generator=g) - 0.5) * 300
        centroids, _ = common.kmeans(torch.cat([blobs, outliers]), 3, iters=0, seed=seed)
        in_blobs += int((torch.cdist(centroids, blob_centres).min(1).values < 5).sum())
    assert in_blobs >= 95
