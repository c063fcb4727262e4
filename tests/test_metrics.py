"""Metrics: Hungarian matching against brute force, clustering accuracy, NMI and ARI on cases
worked out by hand (scikit-learn's definitions), segmentation scores on constructed matrices."""

import itertools
import math

import numpy as np
import pytest
import torch

import common


def brute_force_min(cost):
    """Smallest total over every assignment of min(n, m) rows to distinct columns."""
    n, m = cost.shape
    if n <= m:
        return min(cost[range(n), list(p)].sum() for p in itertools.permutations(range(m), n))
    return min(cost[list(p), range(m)].sum() for p in itertools.permutations(range(n), m))


@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 2), (3, 3), (5, 5), (7, 7), (3, 6), (6, 3), (2, 7), (7, 4), (1, 5)]
)
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(5):
        # integer costs make ties common, which is where a wrong algorithm slips
        cost = rng.integers(0, 6, shape).astype(float) if trial % 2 else rng.normal(size=shape)
        rows, cols = common.linear_sum_assignment(cost)
        assert len(rows) == len(cols) == min(shape)
        assert np.all(np.diff(rows) > 0), "rows must come sorted and distinct"
        assert len(set(cols.tolist())) == len(cols)
        assert cost[rows, cols].sum() == pytest.approx(brute_force_min(cost), abs=1e-9)


def test_hungarian_known_answer_and_negative_costs():
    cost = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]])  # scipy's documentation example
    rows, cols = common.linear_sum_assignment(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    rows, cols = common.linear_sum_assignment(-np.eye(4)[::-1])  # maximise the anti-diagonal
    assert cols.tolist() == [3, 2, 1, 0]


def test_hungarian_rejects_bad_input():
    with pytest.raises(ValueError):
        common.linear_sum_assignment(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError):
        common.linear_sum_assignment(np.zeros(3))
    rows, cols = common.linear_sum_assignment(np.zeros((0, 3)))
    assert len(rows) == len(cols) == 0


def test_cluster_accuracy_is_invariant_to_relabelling():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))
    perm = rng.permutation(5)
    assert common.cluster_accuracy(y, perm[pred]) == common.cluster_accuracy(y, pred)
    assert common.cluster_accuracy(y, (perm[pred] + 1) * 17) == common.cluster_accuracy(y, pred)
    assert common.cluster_accuracy(y, perm[y]) == 1.0


def test_cluster_accuracy_with_extra_and_empty_clusters():
    y = np.array([0, 0, 0, 1, 1, 1])
    # cluster 7 takes one sample of class 0: only one of clusters 3 and 7 can be matched to it
    assert common.cluster_accuracy(y, [3, 3, 7, 5, 5, 5]) == pytest.approx(5 / 6)
    # fewer clusters than classes: the unmatched class is all wrong
    assert common.cluster_accuracy([0, 1, 2, 2], [0, 0, 0, 0]) == pytest.approx(2 / 4)
    # torch tensors work as well, and "empty" cluster ids (never used) play no part
    assert common.cluster_accuracy(torch.tensor(y), torch.tensor([9, 9, 9, 2, 2, 2])) == 1.0


def test_nmi_and_ari_hand_checked():
    y, p = [0, 0, 1, 1], [0, 0, 1, 2]
    # MI = ln 2; H(y) = ln 2; H(p) = 1.5 ln 2 -> arithmetic NMI = 1 / 1.25, geometric 1 / sqrt(1.5)
    assert common.nmi(y, p) == pytest.approx(0.8)
    assert common.nmi(y, p, average="geometric") == pytest.approx(1 / math.sqrt(1.5))
    # pairs: TP = 1 (the 0-0 pair), FN = 1, FP = 0, TN = 4 -> ARI = 2 (1*4 - 0) / (2*5 + 1*4) = 4/7
    assert common.ari(y, p) == pytest.approx(4 / 7)
    assert (
        common.nmi([0, 1, 0, 1], [5, 6, 5, 6]) == 1.0
        and common.ari([0, 1, 0, 1], [5, 6, 5, 6]) == 1.0
    )
    # independent labelings: no information, worse-than-chance ARI
    assert common.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0
    assert common.ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


def test_nmi_and_ari_degenerate_labelings_follow_scikit_learn():
    # both sides one cluster: a perfect match (sklearn returns 1.0 for both)
    assert common.nmi([1, 1, 1], [0, 0, 0]) == 1.0 and common.ari([1, 1, 1], [0, 0, 0]) == 1.0
    # one side a single cluster, the other split: MI = 0 -> NMI 0, and ARI 0
    assert (
        common.nmi([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
        and common.ari([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    )
    assert (
        common.nmi([0, 1, 2, 3], [0, 0, 0, 0]) == 0.0
        and common.ari([0, 1, 2, 3], [0, 0, 0, 0]) == 0.0
    )
    # every sample its own cluster on both sides: perfect
    assert common.ari([0, 1, 2], [2, 1, 0]) == 1.0 and common.nmi([0, 1, 2], [2, 1, 0]) == 1.0
    with pytest.raises(ValueError):
        common.nmi([0, 1, 0, 1], [0, 1, 0, 1], average="harmonic-ish")


def test_ari_does_not_overflow_on_large_sets():
    y = np.repeat(np.arange(2), 3_000_000)  # n^2 is 3.6e13: fine; its products would overflow int64
    assert common.ari(y, y) == 1.0
    assert common.ari(y, np.roll(y, 1_500_000)) == pytest.approx(0.0, abs=1e-6)


def test_confusion_matrix_counts_and_ignores():
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = torch.tensor([[0, 1, 255], [2, 1, 0]])
    conf = common.confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert common.confusion_matrix(pred, target, 3, num_clusters=5).shape == (3, 5)
    with pytest.raises(ValueError):
        common.confusion_matrix(pred, torch.tensor([[0, 1, 7], [2, 1, 0]]), 3)


def test_segmentation_scores_plain_and_hungarian():
    conf = torch.tensor([[8, 2], [1, 9]])
    s = common.segmentation_scores(conf)
    assert s["pixel_acc"] == pytest.approx(17 / 20)
    assert s["iou"] == pytest.approx([8 / 11, 9 / 12])
    assert s["miou"] == pytest.approx((8 / 11 + 9 / 12) / 2)
    # clusters are the classes with swapped ids: Hungarian matching undoes the swap
    swapped = common.segmentation_scores(conf.flip(1), hungarian=True)
    assert swapped["miou"] == pytest.approx(s["miou"]) and swapped["match"] == [1, 0]
    # three clusters for two classes: cluster 2 is matched to nothing, its pixels count as wrong
    over = common.segmentation_scores(torch.tensor([[5, 0, 3], [0, 6, 0]]), hungarian=True)
    assert over["match"] == [0, 1, -1]
    assert over["pixel_acc"] == pytest.approx(11 / 14)
    assert over["iou"] == pytest.approx([5 / 8, 1.0])
    # a class absent from both truth and prediction is left out of the mean
    absent = common.segmentation_scores(torch.tensor([[4, 0, 0], [0, 0, 0], [1, 0, 5]]))
    assert absent["miou"] == pytest.approx((4 / 5 + 5 / 6) / 2)
    with pytest.raises(ValueError):
        common.segmentation_scores(torch.zeros(2, 3))


def test_majority_accuracy_is_the_best_many_to_one_map_and_never_below_hungarian():
    g = np.random.default_rng(0)
    for trial in range(30):
        k, c = int(g.integers(1, 5)), int(g.integers(1, 4))
        y_true = g.integers(0, c, 12)
        y_pred = g.integers(0, k, 12)
        clusters, classes = np.unique(y_pred), np.unique(y_true)
        best = max(  # every map of the clusters to classes, several clusters to one class allowed
            np.mean(
                [
                    dict(zip(clusters, m, strict=True)).get(p) == t
                    for p, t in zip(y_pred, y_true, strict=True)
                ]
            )
            for m in itertools.product(classes, repeat=len(clusters))
        )
        majority = common.majority_accuracy(y_true, y_pred)
        assert majority == pytest.approx(best), trial
        assert majority >= common.cluster_accuracy(y_true, y_pred) - 1e-12
    # K = classes and a one-to-one majority map: the two matchings agree
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 1])
    y_pred = np.array([2, 2, 1, 0, 0, 1, 1, 1, 0])
    assert common.majority_accuracy(y_true, y_pred) == common.cluster_accuracy(y_true, y_pred)
    assert common.majority_accuracy(y_true, y_pred) == pytest.approx(8 / 9)
    # two clusters of one class: many-to-one counts both, one-to-one only one
    assert common.majority_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == 1.0
    assert common.cluster_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == 0.75


def test_size_balance_is_the_normalised_entropy_of_the_cluster_sizes():
    assert common.size_balance(torch.tensor([0, 1, 2, 0, 1, 2]), 3) == pytest.approx(1.0)
    assert common.size_balance(torch.tensor([1, 1, 1, 1]), 3) == 0.0
    half = common.size_balance(torch.tensor([0, 0, 1, 1]), 4)
    assert half == pytest.approx(math.log(2) / math.log(4)), "two of four clusters used, equally"


def test_majority_segmentation_scores_merge_each_cluster_into_its_best_class():
    g = np.random.default_rng(1)
    for trial in range(20):
        conf = torch.from_numpy(g.integers(0, 9, (3, 5)))  # 3 classes, 5 clusters
        scores = common.majority_segmentation_scores(conf)
        best = max(  # every map of the 5 clusters to the 3 classes
            sum(int(conf[c, k]) for k, c in enumerate(m))
            for m in itertools.product(range(3), repeat=5)
        )
        assert scores["pixel_acc"] == pytest.approx(best / int(conf.sum())), trial
        merged = torch.zeros(3, 3, dtype=torch.long)
        for k, c in enumerate(scores["match"]):
            merged[:, c] += conf[:, k]
        assert scores["miou"] == pytest.approx(common.segmentation_scores(merged)["miou"])
        one_to_one = common.segmentation_scores(conf, hungarian=True)
        assert scores["pixel_acc"] >= one_to_one["pixel_acc"] - 1e-12
