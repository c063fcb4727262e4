"""The one module the five scripts share (each imports only it, torch, torchvision and numpy), so
that all five evaluate, augment and log the same way.

- Metrics: Hungarian matching in numpy, clustering accuracy, NMI and ARI (scikit-learn's, to the
  bit), segmentation confusion matrices and mIoU. `kmeans`: greedy k-means++ and chunked Lloyd.
- Data: whole data sets as uint8 tensors (N, 3, H, W) (image folders memory-mapped from their
  decoded cache), the synthetic `shapes` and `shapes-seg` that need no files, segmentation sets
  as (image, label map) pairs.
- Augmentation on the device, batched, random parameters per sample: weak (flip + translate),
  strong (RandAugment + Cutout), photometric (colour jitter, grayscale, blur), geometric (random
  resized crop + flip, applied alike to images, label maps and feature maps).
- Several processes under torchrun: each takes its share of every global batch, gradients
  averaged, rank 0's decisions broadcast, rank 0 alone writes; all of it a no-op in one process.
- Run plumbing: command line from a dataclass, out-dir rules, device, the RunBook (timing, log,
  resume), atomic checkpoints, results.json, pictures. `python common.py` benchmarks this device."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import sys
import textwrap
import time
import typing
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class ConfigError(ValueError):
    """Bad input from the user; the message says what was wrong and what to do."""


# --------------------------------------------------------------------------------------------------
# Data set facts: task, classes, native size, normalisation statistics
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    task: str  # "classify" or "segment"
    num_classes: int | None  # None: read from the folder
    image_size: int | None  # native side; None: as the files are
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_STATS = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DATASETS = {
    "cifar10": DatasetInfo("classify", 10, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("classify", 100, 32, *CIFAR100_STATS),
    "cifar100-20": DatasetInfo("classify", 20, 32, *CIFAR100_STATS),
    "stl10": DatasetInfo("classify", 10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "mnist": DatasetInfo("classify", 10, 28, (0.1307,) * 3, (0.3081,) * 3),
    "svhn": DatasetInfo("classify", 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagefolder": DatasetInfo("classify", None, 32, IMAGENET_MEAN, IMAGENET_STD),
    # the synthetic sets' statistics, measured on their training splits
    "shapes": DatasetInfo("classify", 10, 32, (0.5011, 0.5024, 0.5044), (0.3169, 0.3162, 0.3132)),
    "camvid": DatasetInfo("segment", 11, None, IMAGENET_MEAN, IMAGENET_STD),
    "voc": DatasetInfo("segment", 21, None, IMAGENET_MEAN, IMAGENET_STD),
    "cityscapes": DatasetInfo("segment", 19, None, IMAGENET_MEAN, IMAGENET_STD),
    "cityscapes27": DatasetInfo("segment", 27, None, IMAGENET_MEAN, IMAGENET_STD),
    "cocostuff27": DatasetInfo("segment", 27, None, IMAGENET_MEAN, IMAGENET_STD),
    "segfolder": DatasetInfo("segment", None, None, IMAGENET_MEAN, IMAGENET_STD),
    "shapes-seg": DatasetInfo("segment", 5, 64, (0.4989, 0.4953, 0.4982), (0.2397, 0.2391, 0.2409)),
}


def dataset_info(name: str, task: str | None = None) -> DatasetInfo:
    """The facts of data set `name`, checking that it exists (and serves `task`, when given)."""
    known = [n for n, info in DATASETS.items() if task in (None, info.task)]
    if name not in known:
        kind = {"classify": "classification ", "segment": "segmentation "}.get(task, "")
        choices = ", ".join(known)
        raise ConfigError(f"{name!r} is not a known {kind}data set; choose one of: {choices}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------------------
# Metrics: Hungarian matching, clustering accuracy, NMI, ARI, segmentation scores
# --------------------------------------------------------------------------------------------------
def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment with scipy's contract: (row_ind, col_ind), rows sorted, min(n_rows,
    n_cols) pairs. The Hungarian algorithm as shortest augmenting paths with dual potentials
    (Jonker-Volgenant, O(n^2 m)): rows join one at a time; a Dijkstra-like search over reduced
    costs, vectorised over columns, finds the cheapest path to a free column."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or not np.isfinite(cost).all():
        raise ValueError(f"cost must be a finite 2-d matrix (shape {cost.shape})")
    transposed = cost.shape[0] > cost.shape[1]
    cost = cost.T if transposed else cost  # the search needs rows <= columns
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # dual potentials; index 0 is a virtual row/column
    row_of = np.zeros(m + 1, dtype=np.int64)  # 1-based row matched to column j; 0 = free
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest path
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        min_reduced, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while j0 == 0 or row_of[j0] != 0:  # until the path reaches a free column
            used[j0] = True
            i0 = row_of[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = ~used[1:] & (reduced < min_reduced[1:])
            min_reduced[1:][better], way[1:][better] = reduced[better], j0
            candidates = np.where(used, np.inf, min_reduced)
            j1 = int(candidates.argmin())
            delta = candidates[j1]
            u[row_of[used]] += delta
            v[used] -= delta
            min_reduced[~used] -= delta
            j0 = j1
        while j0:  # flip the matching along the path
            row_of[j0] = row_of[way[j0]]
            j0 = way[j0]
    cols = np.nonzero(row_of[1:])[0]
    rows = row_of[1:][cols] - 1
    rows, cols = (cols, rows) if transposed else (rows, cols)
    order = np.argsort(rows)
    return rows[order], cols[order]


def _contingency(y_true, y_pred) -> np.ndarray:
    """(n_classes, n_clusters) counts over the label values that occur (numpy or torch input)."""
    y_true, y_pred = (
        np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
        for y in (y_true, y_pred)
    )
    if len(y_true) != len(y_pred):
        raise ValueError(f"label arrays differ in length: {len(y_true)} vs {len(y_pred)}")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    shape = (t.max() + 1, p.max() + 1) if len(t) else (0, 0)
    return np.bincount(t * shape[1] + p, minlength=shape[0] * shape[1]).reshape(shape)


def cluster_accuracy(y_true, y_pred) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian algorithm
    on the contingency matrix); samples of unmatched clusters count as wrong."""
    counts = _contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / max(counts.sum(), 1))


def majority_accuracy(y_true, y_pred) -> float:
    """Accuracy under many-to-one matching: every cluster takes its most frequent class, so
    several clusters may share one (the overclustering evaluation, K above the number of
    classes). Never below `cluster_accuracy`; equal to it when the majority map is one-to-one."""
    counts = _contingency(y_true, y_pred)
    return float(counts.max(0).sum() / max(counts.sum(), 1)) if counts.size else 0.0


def size_balance(y_pred, num_clusters: int) -> float:
    """Label-free: the entropy of the cluster sizes over log K, 1 for equal sizes, 0 when every
    sample is in one cluster (`count_balance` of the sizes)."""
    labels = np.asarray(torch.as_tensor(y_pred).cpu()).reshape(-1)
    return count_balance(np.bincount(labels, minlength=num_clusters))


def count_balance(counts) -> float:
    """The entropy of K counts (cluster sizes, pixel counts) over log K: 1 when equal, 0 when all
    fall in one."""
    counts = np.asarray(torch.as_tensor(counts).cpu(), dtype=np.float64).reshape(-1)
    return _entropy(counts) / math.log(len(counts)) if len(counts) > 1 else 1.0


def _entropy(counts: np.ndarray) -> float:
    """Entropy of a labeling from its counts, in scikit-learn's arithmetic (bit-identical)."""
    pi = counts[counts > 0].astype(np.float64)
    if pi.size <= 1:
        return 0.0
    return float(-np.sum((pi / pi.sum()) * (np.log(pi) - math.log(pi.sum()))))


def nmi(y_true, y_pred, average: str = "arithmetic") -> float:
    """scikit-learn's normalized_mutual_info_score to the bit: MI over the arithmetic (default) or
    geometric (SPICE's code) mean of the entropies; two single clusters score 1, MI = 0 scores 0."""
    counts = _contingency(y_true, y_pred)
    if counts.shape[0] == counts.shape[1] <= 1:
        return 1.0
    if min(counts.shape) == 1:  # one side a single cluster: no information
        return 0.0
    rows, cols = np.nonzero(counts)
    values, pi, pj = counts[rows, cols].astype(np.float64), counts.sum(1), counts.sum(0)
    outer = pi[rows].astype(np.int64) * pj[cols].astype(np.int64)
    log_outer = -np.log(outer) + math.log(pi.sum()) + math.log(pj.sum())
    p = values / values.sum()
    # The MI terms, in scikit-learn's order of operations.
    mi = p * (np.log(values) - math.log(values.sum())) + p * log_outer
    mi = float(np.clip(np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi).sum(), 0.0, None))
    if mi == 0:
        return 0.0
    h_true, h_pred = _entropy(pi), _entropy(pj)
    means = {"arithmetic": (h_true + h_pred) / 2, "geometric": math.sqrt(h_true * h_pred)}
    if average not in means:
        raise ValueError(f"average must be one of {list(means)}, got {average!r}")
    return float(mi / max(means[average], np.finfo(np.float64).eps))


def ari(y_true, y_pred) -> float:
    """Adjusted Rand index, scikit-learn's, from the pair confusion matrix in Python ints."""
    counts = _contingency(y_true, y_pred).astype(object)
    n, sum_squares = int(counts.sum()), int((counts**2).sum())
    tp = sum_squares - n
    fp = int((counts @ counts.sum(0)).sum()) - sum_squares
    fn = int((counts.T @ counts.sum(1)).sum()) - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted kNN on L2-normalised features (Wu et al. 2018): each of the k most similar
    training images votes for its class with weight exp(cosine / T)."""
    num_classes = int(train_labels.max()) + 1
    correct = 0
    for i in range(0, len(test_features), chunk):
        similarities = test_features[i : i + chunk] @ train_features.T  # (chunk, N)
        sims, idx = similarities.topk(min(k, len(train_features)), dim=1)  # (chunk, k)
        votes = torch.zeros(len(idx), num_classes, device=idx.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[i : i + chunk]).sum())
    return correct / len(test_features)


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    num_clusters: int | None = None,
) -> torch.Tensor:
    """(num_classes, num_clusters) pixel counts (rows: true class, columns: prediction) on the
    tensors' device, `ignore_index` targets left out; num_clusters defaults to num_classes."""
    k = num_clusters or num_classes
    keep = target.reshape(-1) != ignore_index
    t, p = target.reshape(-1)[keep].long(), pred.reshape(-1)[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= k):
        targets = f"targets must lie in [0, {num_classes}) or be {ignore_index}"
        raise ValueError(f"{targets}, predictions in [0, {k})")
    return torch.bincount(t * k + p, minlength=num_classes * k).reshape(num_classes, k)


def segmentation_scores(conf, hungarian: bool = False) -> dict:
    """mIoU, pixel accuracy and per-class IoU from a (classes, clusters) confusion matrix. With
    `hungarian=True` clusters are first matched one-to-one to classes (maximum overlap); pixels
    of unmatched clusters count as wrong; `match[k]` is cluster k's class (-1: none). Classes
    absent from truth and prediction are left out of the mean."""
    conf = torch.as_tensor(conf).detach().cpu().double()
    num_classes, num_clusters = conf.shape
    if not hungarian and num_classes != num_clusters:
        raise ValueError("a non-square confusion matrix needs hungarian=True")
    if hungarian:
        clusters, classes = linear_sum_assignment(-conf.T.numpy())
    else:
        clusters = classes = np.arange(num_classes)
    matched = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    matched[:, torch.from_numpy(classes)] = conf[:, torch.from_numpy(clusters)]
    match = dict(zip(clusters.tolist(), classes.tolist(), strict=True))
    match = [match.get(k, -1) for k in range(num_clusters)]
    tp = matched.diag()
    union = conf.sum(1) + matched.sum(0) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), float("nan"))
    return {
        "miou": float(iou.nanmean()) if (union > 0).any() else 0.0,
        "pixel_acc": float(tp.sum() / conf.sum().clamp_min(1)),
        "iou": iou.tolist(),
        "match": match,
    }


def majority_segmentation_scores(conf) -> dict:
    """`segmentation_scores` after many-to-one matching (overclustering, K above the classes):
    every cluster (column of the (classes, clusters) confusion matrix) merged into the class it
    overlaps most, which maximises pixel accuracy; `match[k]` is cluster k's class."""
    conf = torch.as_tensor(conf).detach().cpu().double()
    target = conf.argmax(0)  # each cluster's majority class
    merged = torch.zeros(conf.shape[0], conf.shape[0], dtype=torch.float64)
    merged.index_add_(1, target, conf)
    return {**segmentation_scores(merged), "match": target.tolist()}


# --------------------------------------------------------------------------------------------------
# k-means in torch: greedy k-means++ seeding, Lloyd iterations in chunks
# --------------------------------------------------------------------------------------------------
def _nearest(x, centroids, metric, chunk_size=None):
    """Nearest centroid of every row of x and the distance to it (squared Euclidean, or
    1 - cosine for normalised rows), in blocks of ~16M distances (64 MB) whatever N and K."""
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), device=x.device)
    c_sq = (centroids * centroids).sum(1)
    step = chunk_size or max(1, (1 << 24) // len(centroids))
    for s in range(0, len(x), step):
        xs = x[s : s + step]
        if metric == "cosine":
            best, labels[s : s + step] = (xs @ centroids.T).max(1)  # (chunk, K) -> (chunk,)
            dist[s : s + step] = 1 - best
        else:  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; the argmin needs no |x|^2; one fused addmm
            best, labels[s : s + step] = torch.addmm(c_sq, xs, centroids.T, alpha=-2).min(1)
            dist[s : s + step] = (best + (xs * xs).sum(1)).clamp_min(0)
    return labels, dist


def assign_to_centroids(
    x: torch.Tensor,
    centroids: torch.Tensor,
    metric: str = "euclidean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Labels of new points under given centroids (both L2-normalised for cosine)."""
    x, centroids = x.float(), centroids.float()
    if metric == "cosine":
        x, centroids = F.normalize(x, dim=1), F.normalize(centroids, dim=1)
    return _nearest(x, centroids, metric, chunk_size)[0]


def _kmeans_plusplus(x, k, generator):
    """Greedy k-means++ as scikit-learn does it: each new centre is the best of 2 + ln(k)
    candidates drawn with probability proportional to D(x)^2, the best being the one that
    lowers the potential (total squared distance to the nearest centre) the most."""
    n, trials = len(x), 2 + int(math.log(k))
    x_sq = (x * x).sum(1)

    def sq_dist(idx):  # (len(idx), N)
        return torch.addmm(x_sq[idx, None], x[idx], x.T, alpha=-2).add_(x_sq[None]).clamp_min_(0)

    chosen = [torch.randint(n, (1,), generator=generator, device=x.device)]
    closest = sq_dist(chosen[0])[0]
    potential = closest.sum()
    for _ in range(1, k):
        uniform = torch.rand(trials, generator=generator, device=x.device, dtype=torch.float64)
        draws = uniform * potential
        candidates = torch.searchsorted(torch.cumsum(closest.double(), 0), draws).clamp_(max=n - 1)
        dist = torch.minimum(closest[None], sq_dist(candidates))  # (trials, N)
        best = dist.sum(1).argmin()
        potential, closest = dist[best].sum(), dist[best]
        chosen.append(candidates[best, None])
    return x[torch.cat(chosen)].clone()


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 100,
    metric: str = "euclidean",
    seed: int = 0,
    tol: float = 1e-4,
    n_init: int = 1,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the rows of x (N, D), on x's device -> centroids (k, D), labels (N,): greedy
    k-means++ seeding, then Lloyd iterations until the centres move less than `tol` x the mean
    feature variance (scikit-learn's rule) or `iters` run out; the best of `n_init` restarts
    (lowest inertia) wins. Distances in blocks (N x K never in memory), cluster sums by index_add_,
    empty clusters re-seeded at the worst-served points. metric="cosine": spherical k-means."""
    if metric not in ("euclidean", "cosine") or not 1 <= k <= len(x):
        raise ValueError(
            f"kmeans needs metric euclidean or cosine (got {metric}) and 1 <= k <= N = {len(x)} "
            f"(got {k})"
        )
    x = F.normalize(x.float(), dim=1) if metric == "cosine" else x.float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    tol = tol * float(x.var(0).mean()) if len(x) > 1 else 0.0
    best = None
    for _ in range(n_init):
        centroids = _kmeans_plusplus(x, k, generator)
        for _ in range(iters):
            labels, dist = _nearest(x, centroids, metric, chunk_size)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            new = sums / counts.clamp_min(1)[:, None]
            empty = torch.nonzero(counts == 0).squeeze(1)
            new[empty] = x[dist.topk(len(empty)).indices]  # re-seed empty clusters
            new = F.normalize(new, dim=1) if metric == "cosine" else new
            shift, centroids = float(((new - centroids) ** 2).sum()), new
            if shift <= tol:
                break
        labels, dist = _nearest(x, centroids, metric, chunk_size)
        if best is None or float(dist.double().sum()) < best[0]:
            best = (float(dist.double().sum()), centroids, labels)
    return best[1], best[2]


# --------------------------------------------------------------------------------------------------
# Classification data: whole data sets as uint8 tensors
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 where unknown (STL-10's unlabeled split)
    classes: list[str]
    split: str  # the split read ("val" where an image folder has no "test")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# The 20 CIFAR-100 super-classes of the clustering literature, each with its 5 classes.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "people": "baby boy girl man woman",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
IMAGE_EXTENSIONS = set(".jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm".split())
_OFFLINE_HINT = "or try the script offline on --dataset shapes"
MAX_LISTED = 20  # bad files named in one message; the rest are counted


class _BadFiles(ConfigError):
    """Files that cannot be used, each with why (`problems`), named together in one message (the
    first MAX_LISTED, then a count) so that one rerun finds them all, not one per rerun. `fix`:
    what to do (default: replace or delete them)."""

    def __init__(self, problems: list[str], fix: str | None = None, what: str = "bad files"):
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(f"{problems[0]}. {fix or 'Replace or delete the file and rerun.'}")
            return
        lines = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            lines.append(f"... and {len(problems) - MAX_LISTED} more")
        listed = "".join(f"\n  {line}" for line in lines)
        fix = fix or "Replace or delete them and rerun."
        super().__init__(f"{len(problems)} {what}:{listed}\n{fix}")


def _read_all(read, items) -> list:
    """[read(item) for item in items], reading on past bad files to name them all in one error."""
    results, problems = [], []
    for item in items:
        try:
            results.append(read(item))
        except _BadFiles as e:
            problems += e.problems
    if problems:
        raise _BadFiles(problems)
    return results


def resolve_split(root: Path, split: str) -> str:
    """Folders evaluate on `test`, or on `val` where there is no `test`."""
    if split == "test" and not (root / "test").is_dir() and (root / "val").is_dir():
        return "val"
    return split


def _read_image(path: Path, size: int | None = None) -> torch.Tensor:
    """An image file as uint8 (3, H, W) RGB (grayscale, RGBA converted); with `size`, shorter
    side resized to it and the centre cropped to a square."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                scale = size / min(im.size)
                w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
                left, top = (w - size) // 2, (h - size) // 2
                im = im.resize((w, h), Image.BILINEAR).crop((left, top, left + size, top + size))
            return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        raise _BadFiles([f"cannot read image {path}: {e}"]) from None


def load_image_folder(root, split: str = "train", image_size: int = 32, cache_dir=None) -> ImageSet:
    """`<root>/<split>/<class>/<image>` as uint8 tensors at image_size, the class indices those of
    the training split's class names (sorted) in every split. Decoded once into a uint8 array
    file (numpy's .npy) in `cache_dir` (default ~/.cache/unlabelled-refs, never in the data
    folder) under a key of the folder, the size and every file's name, size and mtime. The
    images returned are that file memory-mapped: a folder larger than memory is read a batch at a
    time (`place_images` decides what goes to the device whole)."""
    split = resolve_split(Path(root), split)
    folder = Path(root) / split
    if not folder.is_dir():
        raise ConfigError(
            f"image folder {folder} not found: expected <data-dir>/{split}/<class>/<image> "
            f"(evaluation reads 'test', or 'val' where there is no 'test'), {_OFFLINE_HINT}"
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    # Indices by the training split's names: a test split without test/bird must not give "cat"
    # the index training gives "bird". (No train/ folder: the split's own names.)
    train = Path(root) / "train"
    classes = sorted(d.name for d in train.iterdir() if d.is_dir()) if train.is_dir() else found
    extra = [name for name in found if name not in classes]
    if extra:
        raise ConfigError(
            f"the {split!r} split has class folders that the training split {train} lacks: "
            f"{', '.join(extra)} (in {folder}); class indices come from the training split's "
            "class folders, so give those classes training images or move them out of "
            f"{folder}"
        )
    index = {name: c for c, name in enumerate(classes)}
    files = []  # (path, class index)
    for name in found:
        paths = sorted((folder / name).iterdir())
        files += [(p, index[name]) for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        expected = f"{folder}/<class>/<image>.<jpg, png, ...>"
        raise ConfigError(f"no images under {folder}: expected {expected}")
    key = hashlib.sha1(f"{folder.resolve()}|{image_size}".encode())
    for p, _ in files:
        key.update(f"|{p.relative_to(folder)}|{p.stat().st_size}|{p.stat().st_mtime_ns}".encode())
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache_dir = Path(cache_dir or cache_home / "unlabelled-refs")
    cache = cache_dir / f"imagefolder-{key.hexdigest()[:20]}.npy"
    # The labels are not taken from the cache: they depend on train/'s class folders too, which
    # the key of a test split does not cover.
    labels = torch.tensor([c for _, c in files])
    if not cache.exists():
        print(f"decoding {len(files)} images from {folder} (once; cached in {cache})", flush=True)
        _decode_to_map([p for p, _ in files], image_size, cache)
    # Copy-on-write: the tensor may be written in memory, the file never is.
    images = torch.from_numpy(np.load(cache, mmap_mode="c"))
    return ImageSet(images, labels, classes, split)


def _decode_to_map(paths: list[Path], image_size: int, cache: Path) -> None:
    """Decode the images one by one into a .npy array file of uint8 (N, 3, S, S), so that no
    more than one image is in memory; written beside `cache` and renamed onto it when complete
    (a crash leaves no half cache; processes decoding at once each write whole files)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        shape = (len(paths), 3, image_size, image_size)
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

        def write(item):
            i, path = item
            array[i] = _read_image(path, image_size).numpy()

        _read_all(write, list(enumerate(paths)))
        array.flush()
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)


def place_images(
    images: torch.Tensor, device, memmap: str = "auto", name: str = ""
) -> torch.Tensor:
    """Where a data set's images live for training: on the device whole (as every small set), or,
    for `memmap="on"` or a set too large ("auto": more than half of the device's free memory; of
    the machine's available memory on the CPU), left on the CPU, memory-mapped when it was read
    from an image folder's cache; then each batch is gathered from it (`take`). Says which. On
    the CPU a map is used as it is (the system keeps what fits in memory) unless "off"."""
    device = torch.device(device)
    size = images.numel() * images.element_size()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    mapped = memmap == "on" or (memmap == "auto" and size > free / 2)
    where = "kept on the CPU, batches gathered from it" if mapped else f"on {device}"
    print(
        f"data{' ' + name if name else ''}: {size / 2**30:.2f} GiB ({len(images)} images), "
        f"{free / 2**30:.1f} GiB free on {device}: {where} (--memmap {memmap})",
        flush=True,
    )
    if mapped:
        return images
    if images.device == device:  # on the CPU: "off" reads a memory-mapped set into memory
        return images.clone() if memmap == "off" else images
    return images.to(device)


def take(images: torch.Tensor, indices: torch.Tensor, device) -> torch.Tensor:
    """images[indices] on `device`, wherever `images` live (`place_images`)."""
    return images[indices.to(images.device)].to(device, non_blocking=True)


def _torchvision_set(name: str, root: Path, split: str, download: bool) -> ImageSet:
    from torchvision import datasets

    # torchvision's class is the name in capitals: CIFAR10, CIFAR100, MNIST, SVHN, STL10.
    kind = getattr(datasets, "CIFAR100" if name == "cifar100-20" else name.upper())
    where = {"split": split} if name in ("svhn", "stl10") else {"train": split == "train"}
    try:
        ds = kind(root, download=download, **where)
    except ImportError as e:  # torchvision reads SVHN's .mat files with scipy, not a dependency
        how = f"pip install {e.name}, or use an image-folder copy"
        raise ConfigError(f"torchvision reads {name} with {e.name}: {how}") from None
    except RuntimeError as e:
        how = "the download failed (offline?)" if download else "rerun with --download to fetch it"
        raise ConfigError(
            f"{name} not found under {root.resolve()} ({e}); {how}, or pass --data-dir with the "
            f"folder holding it (an image-folder copy <data-dir>/{split}/<class>/<image> works "
            f"too), {_OFFLINE_HINT}"
        ) from None
    images = torch.as_tensor(np.asarray(ds.data))
    if images.ndim == 3:  # MNIST (N, 28, 28): grayscale repeated to RGB, as for image folders
        images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    elif images.shape[-1] == 3:  # CIFAR stores (N, H, W, 3)
        images = images.permute(0, 3, 1, 2).contiguous()
    targets = ds.targets if hasattr(ds, "targets") else ds.labels  # SVHN and STL-10: labels
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return ImageSet(images, labels, list(getattr(ds, "classes", map(str, range(10)))), split)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir=None,
    download: bool = False,
    image_size: int | None = None,
    cache_dir=None,
) -> ImageSet:
    """A classification data set as uint8 tensors; splits "train", "test" (and stl10's
    "unlabeled"). torchvision's sets read `data_dir` (default ./data), downloading only when
    asked; an image-folder copy (`<data_dir>/<split>/<class>/`) is read as such."""
    info = dataset_info(name, "classify")
    size = image_size or info.image_size
    if name == "shapes":
        n = 5000 if split == "train" else 1000
        images, labels = make_shapes(n, seed=int(split != "train"), size=size)
        return ImageSet(images, labels, list(SHAPE_NAMES), split)
    if name == "imagefolder" and data_dir is None:
        layout = "a folder of train/<class>/<image>"
        raise ConfigError(f"--dataset imagefolder needs --data-dir: {layout}, {_OFFLINE_HINT}")
    root = Path(data_dir or "data")
    if name == "imagefolder" or (root / resolve_split(root, split)).is_dir():
        data = load_image_folder(root, split, size, cache_dir)
        if name not in ("imagefolder", "cifar100-20") and len(data.classes) != info.num_classes:
            found = f"{len(data.classes)} class folders"
            raise ConfigError(f"{root / data.split}: {found}, {name} has {info.num_classes}")
    else:
        data = _torchvision_set(name, root, split, download)
        if data.images.shape[-1] != size:  # another side than the set's own: resized, as folders
            images = F.interpolate(data.images.float(), size=(size, size), mode="bilinear")
            images = images.round().clamp(0, 255).to(torch.uint8)
            data = ImageSet(images, data.labels, data.classes, data.split)
    if name == "cifar100-20":  # fine classes -> their super-class, matched by name
        coarse = {}
        for c, group in enumerate(CIFAR100_SUPERCLASSES.values()):
            coarse.update(dict.fromkeys(group.split(), c))
        lut = torch.tensor([coarse[fine] for fine in data.classes])
        data = ImageSet(data.images, lut[data.labels], list(CIFAR100_SUPERCLASSES), data.split)
    return data


# --------------------------------------------------------------------------------------------------
# Segmentation data: (image, label map) pairs, decoded and resized on demand or held in memory
# --------------------------------------------------------------------------------------------------
# CamVid's 11 classes; its label 11 (void) becomes 255.
CAMVID_CLASSES = tuple(
    "sky building pole road pavement tree sign_symbol fence car pedestrian bicyclist".split()
)
VOC_CLASSES = tuple(
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor".split()
)
# Cityscapes label ids 7..33 are PiCIE's 27 classes (ids 0-6 ignored); CITYSCAPES_19_IDS are the
# ids of the usual 19 training classes, in trainId order.
CITYSCAPES_27 = tuple(
    "road sidewalk parking rail_track building wall fence guard_rail bridge tunnel pole polegroup "
    "traffic_light traffic_sign vegetation terrain sky person rider car truck bus caravan trailer "
    "train motorcycle bicycle".split()
)
CITYSCAPES_19_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# COCO-Stuff-27: the 182 fine ids of the stuffthingmaps PNGs grouped by COCO-Stuff supercategory
# (12 "things" then 15 "stuff", IIC's order, which PiCIE's fine_to_coarse file follows).
COCOSTUFF_27 = {
    "electronic": "71-76",
    "appliance": "77-82",
    "food-things": "51-60",
    "furniture-things": "61-70",
    "indoor": "83-90",
    "kitchen": "43-50",
    "accessory": "25-32",
    "animal": "15-24",
    "outdoor": "9-14",
    "person": "0",
    "sports": "33-42",
    "vehicle": "1-8",
    "ceiling": "101-102",
    "floor": "100 113-117",
    "food-stuff": "120-121 152 169",
    "furniture-stuff": "97 106-107 109 111 122 129 132 155 160 164",
    "rawmaterial": "99 131 138 142",
    "textile": "91-92 103-104 108 130 136 140 151 166-167",
    "wall": "170-176",
    "window": "179-180",
    "building": "94-95 127 150 157 165",
    "ground": "110 124-125 135 139 143-144 146 148 153 158",
    "plant": "93 96 118 123 128 133 141 162 168",
    "sky": "105 156",
    "solid": "126 134 149 159 161 181",
    "structural": "98 112 137 145 163",
    "water": "119 147 154 177-178",
}


def _lut(mapping: dict[int, int] | int) -> torch.Tensor:
    """A lookup table raw label -> class (an int n: the identity below n); other labels -> 255."""
    if isinstance(mapping, int):
        mapping = {i: i for i in range(mapping)}
    lut = torch.full((256,), 255, dtype=torch.long)
    lut[list(mapping)] = torch.tensor(list(mapping.values()))
    return lut


def _cocostuff_lut() -> torch.Tensor:  # COCOSTUFF_27's spans of fine ids -> their coarse index
    coarse = {}
    for c, group in enumerate(COCOSTUFF_27.values()):
        for span in group.split():  # "71-76" or "0"
            lo, _, hi = span.partition("-")
            coarse.update(dict.fromkeys(range(int(lo), int(hi or lo) + 1), c))
    return _lut(coarse)


class SegmentationSet(torch.utils.data.Dataset):
    """(image uint8 (3, H, W), label int64 (H, W), 255 = ignore) pairs, held in memory or read from
    `pairs` of files: raw labels mapped through `lut`, shorter side resized to `image_size` (labels
    nearest). Large sets stream through a DataLoader (`collate_fn=pad_collate`); `tensors()`
    decodes a small one whole."""

    def __init__(
        self, classes, split, pairs=(), lut=None, image_size=None, images=None, labels=None
    ):
        self.classes, self.num_classes, self.split = list(classes), len(classes), split
        self.pairs, self.lut, self.image_size = list(pairs), lut, image_size
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.pairs)

    def __getitem__(self, i):
        if self.images is not None:
            return self.images[i], self.labels[i]
        from torchvision.transforms.functional import InterpolationMode, resize

        image_path, label_path = self.pairs[i]
        image = _read_image(image_path)
        if label_path is None:  # an unlabelled split (Cityscapes' train_extra)
            label = torch.full(image.shape[1:], 255, dtype=torch.long)
        else:
            label = self.lut[_read_label(label_path).long()]
            if label.shape != image.shape[1:]:
                shapes = f"{tuple(label.shape)}, its image {tuple(image.shape)}"
                raise _BadFiles([f"label map {label_path}: {shapes}"])
        if self.image_size:
            image = resize(image, self.image_size, antialias=True)
            label = resize(label[None], self.image_size, InterpolationMode.NEAREST)[0]
        return image, label

    def in_memory(self) -> tuple[torch.Tensor, torch.Tensor] | SegmentationSet:
        """The whole set decoded once: (N, 3, H, W) uint8 and (N, H, W) int64 tensors where every
        image has one size; else the set itself, holding the decoded images and uint8 labels as
        lists, for `segmentation_batches` to pad batch by batch (`pad_collate`)."""
        if self.images is None:
            print(f"decoding {len(self.pairs)} image/label pairs ({self.split})", flush=True)
            pairs = _read_all(self.__getitem__, range(len(self.pairs)))
            self.images = [image for image, _ in pairs]
            self.labels = [label.to(torch.uint8) for _, label in pairs]  # classes < 255 fit
            if len({image.shape for image in self.images}) == 1:
                self.images = torch.stack(self.images)
                self.labels = torch.stack(self.labels).long()
        if isinstance(self.images, list):
            return self
        return self.images, self.labels

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set as (N, 3, H, W) uint8 and (N, H, W) int64, decoded once; its images must
        share one size (else use `in_memory`)."""
        decoded = self.in_memory()
        if decoded is self:
            sizes = sorted({tuple(image.shape[1:]) for image in self.images})
            raise ConfigError(
                f"the {self.split} images differ in size ({sizes[0]} to {sizes[-1]}): resize "
                f"or crop them to one size"
            )
        return decoded


def pad_collate(batch):
    """Stack (image, label) pairs padded bottom and right to the largest: images 0, labels 255."""
    h = max(im.shape[1] for im, _ in batch)
    w = max(im.shape[2] for im, _ in batch)
    images = [F.pad(im, (0, w - im.shape[2], 0, h - im.shape[1])) for im, _ in batch]
    labels = [F.pad(lb, (0, w - lb.shape[1], 0, h - lb.shape[0]), value=255) for _, lb in batch]
    return torch.stack(images), torch.stack(labels)


def _collate_with_sizes(batch):  # pad_collate, plus each image's true (h, w)
    return (*pad_collate(batch), torch.tensor([list(image.shape[1:]) for image, _ in batch]))


def segmentation_batches(source, index_batches, device, workers: int = 0):
    """(uint8 images (B, 3, H, W), int64 labels (B, H, W), true sizes (B, 2) = (h, w)) of each
    batch of indices in `index_batches` (1-D tensors; an endless iterable is fine), on `device`.
    `source` is (images, labels) held in memory, or a SegmentationSet decoded by DataLoader
    workers, its images of different sizes padded to the largest (`pad_collate`: 0 / 255)."""
    device = torch.device(device)
    if isinstance(source, tuple):
        images, labels = source
        for idx in index_batches:
            idx = idx.to(images.device)
            sizes = torch.tensor(images.shape[-2:], device=device).expand(len(idx), 2)
            yield images[idx].to(device), labels[idx].to(device).long(), sizes
        return
    loader = torch.utils.data.DataLoader(
        source,
        batch_sampler=(idx.tolist() for idx in index_batches),
        num_workers=workers,
        collate_fn=_collate_with_sizes,
        pin_memory=device.type == "cuda",
    )
    for images, labels, sizes in loader:
        yield images.to(device, non_blocking=True), labels.to(device).long(), sizes.to(device)


def _read_label(path: Path) -> torch.Tensor:
    """A one-channel label map (palette or gray PNG) as uint8 (H, W)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            raw = np.array(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise _BadFiles([f"cannot read label map {path}: {e}"]) from None
    if raw.ndim != 2:
        channels = f"has {raw.shape[-1]} channels; expected one class index per pixel"
        raise _BadFiles([f"label map {path} {channels}"])
    return torch.from_numpy(raw)


def _pairs_by_stem(image_dir: Path, label_dir: Path) -> list:
    """Every image with the .png label map of the same stem, whatever the image's extension."""
    if not image_dir.is_dir():
        raise ConfigError(f"folder {image_dir} not found")
    images = [p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    pairs = [(p, label_dir / f"{p.stem}.png") for p in images]
    for image, label in pairs:
        if not label.exists():
            raise ConfigError(f"image {image} has no label map {label}")
    if not pairs:
        raise ConfigError(f"no images in {image_dir}")
    return pairs


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise ConfigError(f"list file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _seg_pairs(name: str, root: Path, split: str):
    """(pairs, lut, classes) of one split stored under root, in each data set's own layout."""
    if name == "camvid":  # SegNet's: <split>/<stem>.<ext> and <split>annot/<stem>.png
        return _pairs_by_stem(root / split, root / f"{split}annot"), _lut(11), CAMVID_CLASSES
    if name == "voc":  # VOCdevkit/VOC2012 with its ImageSets/Segmentation lists
        base = root / "VOCdevkit" / "VOC2012" if (root / "VOCdevkit").is_dir() else root
        lists = base / "ImageSets" / "Segmentation"
        labels = base / "SegmentationClass"
        augmented = (lists / "train_aug.txt").exists() and (base / "SegmentationClassAug").is_dir()
        if split == "train" and augmented:  # VOC + SBD: 10,582 images, as CPS trains on
            split = "train_aug"
            labels = base / "SegmentationClassAug"
        elif split == "train":
            missing = f"no SegmentationClassAug + train_aug.txt in {base}"
            print(f"voc: {missing}: training on VOC's 1,464 images", flush=True)
        # The list files hold ids or paths.
        ids = [Path(line.split()[0]).stem for line in _read_lines(lists / f"{split}.txt")]
        pairs = [(base / "JPEGImages" / f"{i}.jpg", labels / f"{i}.png") for i in ids]
        return pairs, _lut(21), VOC_CLASSES
    if name in ("cityscapes", "cityscapes27"):  # leftImg8bit/<split>/<city>/, gtFine/ alike
        folder = root / "leftImg8bit" / split
        images = sorted(folder.glob("*/*_leftImg8bit.png"))
        if not images:
            raise ConfigError(f"no images in {folder}/<city>/*_leftImg8bit.png")
        gt = root / "gtFine" / split
        pairs = []
        for p in images:
            label = gt / p.parent.name / p.name.replace("leftImg8bit", "gtFine_labelIds")
            pairs.append((p, None if split == "train_extra" else label))  # train_extra: no labels
        if name == "cityscapes27":
            return pairs, _lut({i: i - 7 for i in range(7, 34)}), CITYSCAPES_27
        classes = [CITYSCAPES_27[i - 7] for i in CITYSCAPES_19_IDS]
        return pairs, _lut(dict(zip(CITYSCAPES_19_IDS, range(19), strict=True))), classes
    if name == "cocostuff27":  # images/, annotations/ (stuffthingmaps) and IIC's curated lists
        ids = _read_lines(root / "curated" / f"{split}2017" / "Coco164kFull_Stuff_Coarse_7.txt")
        images = root / "images" / f"{split}2017"
        labels = root / "annotations" / f"{split}2017"
        pairs = [(images / f"{i}.jpg", labels / f"{i}.png") for i in ids]
        return pairs, _cocostuff_lut(), list(COCOSTUFF_27)
    # segfolder: <split>/images/*, <split>/masks/<stem>.png, optional classes.txt ("<index> <name>")
    pairs = _pairs_by_stem(root / split / "images", root / split / "masks")
    found = _label_values(pairs)
    classes, source = _segfolder_classes(root, found if split == "train" else None)
    # Every split's labels checked at load, not at the first evaluation after training.
    problems = []
    for (_, mask), values in zip(pairs, found, strict=True):
        outside = values[(values >= len(classes)) & (values != 255)].tolist()
        if outside:
            labels = "labels" if len(outside) > 1 else "label"
            problems.append(f"{mask} holds {labels} {', '.join(map(str, outside))}")
    if problems:
        raise _BadFiles(
            problems,
            fix=f"The valid labels are 0 to {len(classes) - 1} ({source}) and 255 (ignore): "
            "relabel those pixels, or name every class in classes.txt.",
            what=f"masks of the {split!r} split hold labels outside the classes",
        )
    return pairs, _lut(len(classes)), classes


def _segfolder_classes(root: Path, train_values=None) -> tuple[list[str], str]:
    """(class names, where they come from) of a segfolder, the same for every split: the lines
    of classes.txt, else the indices up to the largest label in the TRAINING masks (their
    `_label_values`, read here when not given)."""
    names = root / "classes.txt"
    if names.exists():
        lines = [line.split(maxsplit=1) for line in _read_lines(names)]
        entries = {int(line[0]): line[1] for line in lines if len(line) == 2 and line[0].isdigit()}
        if not lines or sorted(entries) != list(range(len(lines))):
            how = "one line per class: its index (0, 1, 2, ... each once), a space, its name"
            raise ConfigError(f"{names}: expected {how}")
        return [entries[i] for i in range(len(entries))], f"the {len(lines)} classes of {names}"
    train = root / "train"
    if train_values is None:  # cost: the training masks are read again for this split
        train_values = _label_values(_pairs_by_stem(train / "images", train / "masks"))
    largest = max(int(v[v != 255].max(initial=0)) for v in train_values)
    where = f"the classes of {train / 'masks'}, whose largest label is {largest}"
    return [str(c) for c in range(largest + 1)], where


def _label_values(pairs) -> list[np.ndarray]:
    """The label values present in each pair's mask, sorted, the unreadable masks all named in
    one error. Cost: one PNG decode per mask, 2.5 ms for a 512 x 512 one (measured on a busy
    2-core CPU): half a minute for 10,000 masks, little beside training."""
    return _read_all(
        lambda pair: np.flatnonzero(np.bincount(_read_label(pair[1]).numpy().ravel())), pairs
    )


def load_segmentation(
    name: str,
    split: str = "train",
    data_dir=None,
    download: bool = False,
    image_size: int | None = None,
) -> SegmentationSet:
    """A segmentation data set read from `data_dir` (camvid, voc, cityscapes, cityscapes27,
    cocostuff27, segfolder; layouts in `_seg_pairs`) or generated (shapes-seg); shorter side
    resized to `image_size` (None: as stored); split "a+b" joins two splits."""
    info = dataset_info(name, "segment")
    if name == "shapes-seg":
        n = 1000 if split == "train" else 200
        size = image_size or info.image_size
        images, labels = make_shapes_seg(n, seed=int(split != "train"), size=size)
        return SegmentationSet(SHAPES_SEG_CLASSES, split, images=images, labels=labels)
    if name == "segfolder" and data_dir is None:
        layout = "(with train/images, train/masks)"
        raise ConfigError(f"--dataset segfolder needs --data-dir {layout}, {_OFFLINE_HINT}-seg")
    root = Path(data_dir or Path("data") / name)
    if name == "voc" and download:
        from torchvision.datasets import VOCSegmentation

        VOCSegmentation(root, year="2012", image_set="trainval", download=True)
    if not root.is_dir():
        how = "pass --data-dir with its folder (layouts: common._seg_pairs)"
        raise ConfigError(f"{name} not found at {root.resolve()}: {how}, {_OFFLINE_HINT}-seg")
    split = resolve_split(root, split) if name == "segfolder" else split
    parts = [_seg_pairs(name, root, part) for part in split.split("+")]
    pairs = [pair for part_pairs, _, _ in parts for pair in part_pairs]
    _, lut, classes = parts[0]
    return SegmentationSet(classes, split, pairs, lut, image_size)


# --------------------------------------------------------------------------------------------------
# Synthetic data sets: generated from a seed, no files
# --------------------------------------------------------------------------------------------------
# The ten `shapes` classes: inside tests in the shape's own coordinates (u, v), radius about 1,
# r = |(u, v)|, box = max(|u|, |v|). Every class stays itself under rotation.
SHAPES = {
    "circle": lambda u, v, r, box: r < 0.8,
    "square": lambda u, v, r, box: box < 0.7,
    "triangle": lambda u, v, r, box: (v > -0.5) & (v < 1 - math.sqrt(3) * u.abs()),
    "plus": lambda u, v, r, box: (torch.minimum(u.abs(), v.abs()) < 0.3) & (box < 0.9),
    "ring": lambda u, v, r, box: (r > 0.5) & (r < 0.9),
    "star": lambda u, v, r, box: r < 0.55 + 0.4 * torch.cos(5 * torch.atan2(v, u)),
    "crescent": lambda u, v, r, box: (r < 0.85) & ((u - 0.45) ** 2 + v * v > 0.49),
    "half_disc": lambda u, v, r, box: (u * u + (v + 0.35) ** 2 < 0.81) & (v > -0.35),
    "frame": lambda u, v, r, box: (box < 0.8) & (box > 0.45),
    "ellipse": lambda u, v, r, box: (u / 0.9) ** 2 + (v / 0.4) ** 2 < 1,
}
SHAPE_NAMES = tuple(SHAPES)
SHAPES_SEG_CLASSES = ("background", "speckle", "stripes", "checks", "dots")


def _two_tone(n, g):
    """Two colours per sample, one dark and one light in random order: a shape always stands out
    from its background, and its colour says nothing about its class."""
    dark, light = torch.rand(n, 3, generator=g) * 0.4, 0.6 + torch.rand(n, 3, generator=g) * 0.4
    swap = torch.rand(n, 1, generator=g) < 0.5
    return torch.where(swap, light, dark), torch.where(swap, dark, light)


def _smooth_noise(n, size, g):  # (n, size, size) in [0, 1], varying over a quarter of the image
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic")[:, 0].clamp(0, 1)


def make_shapes(
    n: int, seed: int = 0, size: int = 32, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shapes`: n images (n, 3, size, size) of one shape each, classes balanced, with random
    colour (one dark, one light: no class information), size, position and rotation on a textured
    background (stripes of random frequency and angle mixed with smooth noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    fg, bg = _two_tone(n, g)
    bg2 = (bg + (torch.rand(n, 3, generator=g) - 0.5) * 0.3).clamp(0, 1)  # second background tone
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle, freq, phase, mix = torch.rand(4, n, 1, 1, generator=g)
    across = x * torch.cos(math.pi * angle) + y * torch.sin(math.pi * angle)  # across the stripes
    stripes = 0.5 + 0.5 * torch.sin((2 + 4 * freq) * math.pi * across + 2 * math.pi * phase)
    texture = mix * stripes + (1 - mix) * _smooth_noise(n, size, g)
    images = bg[:, :, None, None] + (bg2 - bg)[:, :, None, None] * texture[:, None]
    fine = torch.linspace(-1, 1, 2 * size)
    y, x = torch.meshgrid(fine, fine, indexing="ij")
    # Shapes fill most of the frame, as CIFAR's objects do, so that strong augmentation leaves them.
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 0.4
    scale = 0.6 + 0.25 * torch.rand(n, generator=g)
    theta = 2 * math.pi * torch.rand(n, generator=g)
    # The shapes are drawn at twice the size, then averaged: anti-aliased.
    mask = torch.zeros(n, 1, 2 * size, 2 * size)
    for k in range(num_classes):
        i = torch.nonzero(labels == k).squeeze(1)
        x0 = (x - centre[i, 0, None, None]) / scale[i, None, None]
        y0 = (y - centre[i, 1, None, None]) / scale[i, None, None]
        c = torch.cos(theta[i])[:, None, None]
        s = torch.sin(theta[i])[:, None, None]
        u = c * x0 + s * y0  # rotated; v points up
        v = s * x0 - c * y0
        r, box = torch.sqrt(u * u + v * v), torch.maximum(u.abs(), v.abs())
        mask[i, 0] = SHAPES[SHAPE_NAMES[k]](u, v, r, box).float()
    mask = F.avg_pool2d(mask, 2)
    noise = 0.03 * torch.randn(n, 3, size, size, generator=g)
    images = images * (1 - mask) + fg[:, :, None, None] * mask + noise
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def make_shapes_seg(n: int, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`shapes-seg`: n images (n, 3, size, size) of 1-4 regions and label maps (n, size, size). A
    region's class is its texture (speckle, stripes, checks, dots; random period and angle), never
    its colour or outline (disc, square or diamond); class 0 is the smooth, mottled background."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    c1, c2 = _two_tone(n, g)
    mottle = _smooth_noise(n, size, g)[:, None]  # (n, 1, size, size)
    images = c1[:, :, None, None] + (c2 - c1)[:, :, None, None] * 0.5 * mottle
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for p_present in (1.0, 0.9, 0.7, 0.5):  # later regions paint over earlier ones
        present = torch.rand(n, generator=g) < p_present
        cls = torch.randint(1, 5, (n,), generator=g)
        cx, cy = (torch.rand(n, 2, generator=g) * size).unbind(1)
        r = (size * (0.15 + 0.15 * torch.rand(n, generator=g)))[:, None, None]
        dx, dy = (x - cx[:, None, None]).abs(), (y - cy[:, None, None]).abs()
        disc = dx**2 + dy**2 < r**2
        square = torch.maximum(dx, dy) < 0.8 * r
        diamond = dx + dy < r
        outline = torch.stack([disc, square, diamond], 1)  # (n, 3, size, size)
        kind = torch.randint(0, 3, (n, 1, 1, 1), generator=g).expand(-1, 1, size, size)
        inside = outline.gather(1, kind)[:, 0] & present[:, None, None]
        period = 5 + 4 * torch.rand(n, 1, 1, generator=g)
        angle = math.pi * torch.rand(n, 1, 1, generator=g)
        pu = (x * torch.cos(angle) + y * torch.sin(angle)) / period  # pattern coordinates
        pv = (-x * torch.sin(angle) + y * torch.cos(angle)) / period
        fu, fv = pu - pu.floor(), pv - pv.floor()  # position within a period, in [0, 1)
        grain = torch.rand(n, 1, size // 2, size // 2, generator=g)  # 2 x 2 px speckles
        speckle = F.interpolate(grain, scale_factor=2)[:, 0].round()
        stripes = (fu < 0.5).float()
        checks = ((pu.floor() + pv.floor()) % 2).float()
        dots = ((fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.09).float()
        patterns = torch.stack([speckle, stripes, checks, dots], 1)  # (n, 4, size, size)
        pattern = patterns[torch.arange(n), cls - 1]  # (n, size, size): each region's own
        a1, a2 = _two_tone(n, g)
        region = a1[:, :, None, None] + (a2 - a1)[:, :, None, None] * pattern[:, None]
        images = torch.where(inside[:, None], region, images)
        labels = torch.where(inside, cls[:, None, None], labels)
    images = images + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


# --------------------------------------------------------------------------------------------------
# Augmentation on the device: batched, independent random parameters for every sample
# --------------------------------------------------------------------------------------------------
# Each function takes a batch (B, C, H, W), uint8 in [0, 255] or float in [0, 1], on any device,
# returns the same dtype, and draws from `generator` (a torch.Generator on the batch's device)
# when given. Per-sample choices are (B, ...) tensors; Python loops run over op kinds only.
def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _to_float(x: torch.Tensor) -> torch.Tensor:  # a copy in [0, 1], so ops may write into it
    return x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)


def _restore(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # back to the input's dtype
    if dtype == torch.uint8:
        return y.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return y.clamp_(0, 1).to(dtype)


def weak_augment(
    x: torch.Tensor,
    flip: bool = True,
    translate: float = 0.125,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FixMatch's weak view: horizontal flip (p = 0.5) and a translation by up to `translate` of
    the size (4 px at 32 px) filled by reflection, i.e. a random crop of the reflect-padded
    image; done as one gather of per-sample reflected indices, exact in any dtype."""
    b, c, h, w = x.shape
    py, px = round(translate * h), round(translate * w)
    oy = torch.randint(-py, py + 1, (b, 1), generator=generator, device=x.device)
    ox = torch.randint(-px, px + 1, (b, 1), generator=generator, device=x.device)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip:
        cols = torch.where(_rand((b, 1), generator, x.device) < 0.5, w - 1 - cols, cols)

    def reflect(i: torch.Tensor, n: int) -> torch.Tensor:  # indices outside [0, n) mirrored in
        return torch.where(i.abs() > n - 1, 2 * (n - 1) - i.abs(), i.abs())

    rows = reflect(oy + torch.arange(h, device=x.device), h)  # (B, H) source rows
    cols = reflect(ox + cols, w)  # (B, W) source columns
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


def cutout(
    x: torch.Tensor,
    size: float = 16,
    random_size: bool = False,
    generator: torch.Generator | None = None,
    fill: float | tuple = 0.5,
    scan_sides: bool = False,
) -> torch.Tensor:
    """Per sample a square of side `size` px, anywhere, clipped at the border, filled with `fill`
    (a grey level, or a colour per channel, in [0, 1]). random_size: the side is U[0, size]
    (SPICE-Semi's official Cutout, size half the image); scan_sides: SCAN's, SPICE-Self's
    official one (spice/data/augment.py, `Cutout`): side 2 floor(L / 2), L uniform in 1..size,
    about an integer centre."""
    b, _, h, w = x.shape
    side = torch.full((b,), float(size), device=x.device)
    if random_size:
        side = size * _rand(b, generator, x.device)
    if scan_sides:
        drawn = torch.randint(1, int(size) + 1, (b,), generator=generator, device=x.device)
        side = (2 * (drawn // 2)).float()
    cy = _rand(b, generator, x.device) * h
    cx = _rand(b, generator, x.device) * w
    if scan_sides:  # np.random.randint(h): the square covers whole pixels
        cy = cy.floor()
        cx = cx.floor()

    def inside(n: int, centre: torch.Tensor) -> torch.Tensor:  # (B, n): pixel centres in the square
        return (torch.arange(n, device=x.device) + 0.5 - centre[:, None]).abs() < side[:, None] / 2

    mask = (inside(h, cy)[:, :, None] & inside(w, cx)[:, None, :])[:, None]  # (B, 1, H, W)
    mask = mask.to(x.dtype)
    colour = torch.tensor(fill, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    if x.dtype == torch.uint8:
        colour = (colour * 255).round()
    colour = colour.to(x.dtype)
    # arithmetic, not torch.where: several times faster on CPU
    return x * (1 - mask) + colour * mask


def _grayscale(x):  # ITU-R 601 luma, as PIL's convert("L")
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(degenerate, x, factor):  # PIL's ImageEnhance: degenerate + f (x - degenerate)
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 1)


GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _geometric(x, kind, m, corner=False, mode="bilinear", fill=0.5):
    """Rotate (m degrees, about the centre), shear (m) and translate (m of the size) each sample
    by its own op (`kind` indexes GEOMETRIC_OPS), in one resampling. Shears run about the centre,
    or with `corner` about the image's top-left corner, as PIL's transform (1, m, 0, 0, 1, 0)."""
    h, w = x.shape[-2:]
    a = torch.deg2rad(m) * (kind == 0)  # rotation in pixel space, written in normalised coords
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = torch.cos(a), torch.cos(a)
    theta[:, 0, 1] = (-torch.sin(a) + m * (kind == 1)) * h / w
    theta[:, 1, 0] = (torch.sin(a) + m * (kind == 2)) * w / h
    theta[:, 0, 2], theta[:, 1, 2] = 2 * m * (kind == 3), 2 * m * (kind == 4)
    if corner:  # x' = x + m y with y from the top edge: normalised, x' = x + m (y + 1) h / w
        theta[:, 0, 2] += m * (kind == 1) * h / w
        theta[:, 1, 2] += m * (kind == 2) * w / h
    return _warp(x, theta, mode, fill)


def _warp(x, theta, mode, fill, size=None):
    """Sample x (B, C, H, W) at theta @ (output coords), normalised coords (align_corners=False):
    points beyond the image's outer edge get `fill`; inside it, the edge pixels extend (as PIL and
    a crop + resize do), so no fill bleeds in. Grid by broadcasting (F.affine_grid's is slow)."""
    h, w = size or x.shape[-2:]
    ys = (2 * torch.arange(h, device=x.device, dtype=x.dtype) + 1) / h - 1
    xs = (2 * torch.arange(w, device=x.device, dtype=x.dtype) + 1) / w - 1
    t = theta.to(x.dtype)[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    grid = t[:, :, 0] * xs[None, None, None, :] + t[:, :, 1] * ys[None, None, :, None] + t[:, :, 2]
    grid = grid.permute(0, 2, 3, 1)  # (B, H, W, 2) as (x, y)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.masked_fill((grid.abs() > 1).any(-1)[:, None], fill)


def _autocontrast(x, m):  # per sample and channel, stretch min..max to 0..1; flat channels kept
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)


def _equalize(x, m):
    """PIL's ImageOps.equalize, all B x C channels at once: 256-bin histograms, then
    lut[i] = (step // 2 + #pixels below i) // step, step = (#pixels - last bin's count) // 255."""
    b, c, h, w = x.shape
    q = (x * 255).round().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, q, torch.ones_like(q))
    last = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255  # (B*C, 1)
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return (lut.gather(1, q).float() / 255).view(b, c, h, w)


def _sharpness(x, m):
    """PIL's ImageEnhance.Sharpness: blend with the degenerate image, PIL's SMOOTH filter
    [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, whose border pixels stay as they are."""
    # 3x3 box sums, separably (faster than avg_pool2d on the CPU).
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    smooth = x.clone()
    boxes = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth[..., 1:-1, 1:-1] = (boxes + 4 * x[..., 1:-1, 1:-1]) / 13
    return _blend(smooth, x, m)


def _posterize(x, m):  # keep the top m bits of each 8-bit value
    shift = (8 - m.floor().long()).view(-1, 1, 1, 1)
    return (((x * 255).round().long() >> shift) << shift).float() / 255


def _enhance_factor(level):  # float_parameter(L, 1.8) + 0.1: 0.28, 0.46, .., 1.72 (1 at L = 5)
    return level * 1.8 / 10 + 0.1


# The official code's RandAugment, the default (google-research/fixmatch, libml/augment.py:
# AugmentPoolRAMC, the `rac` of ablation/ab_fixmatch_ra.py, the paper's RandAugment runs; each op
# in third_party/auto_augment/augmentations.py). Per sample 2 of these 14 ops, drawn with
# replacement, each applied with p = 0.5 at an integer level L drawn from 1..9 (randint(1, 10),
# PARAMETER_MAX = 10). Per op: its magnitude at level L (a long tensor; None: no magnitude), and
# whether a coin flips its sign (`random.random() > 0.5` in the official op).
RANDAUGMENT_OPS = {
    "identity": (None, False),
    "autocontrast": (None, False),
    "equalize": (None, False),
    "rotate": (lambda level: level * 30 // 10, True),  # degrees, 3..27 (int_parameter(L, 30))
    # threshold 231..26 of 255: values >= it are inverted (256 - int_parameter(L, 256))
    "solarize": (lambda level: (256 - level * 256 // 10) / 255, False),
    # enhancement factors 0.28..1.72, both sides of 1 (1: the image, 0: the degenerate image)
    "color": (_enhance_factor, False),
    "contrast": (_enhance_factor, False),
    "brightness": (_enhance_factor, False),
    "sharpness": (_enhance_factor, False),
    "shear_x": (lambda level: level * 0.3 / 10, True),  # 0.03..0.27, about the top-left corner
    "translate_x": (lambda level: level, True),  # pixels, 1..9 at any size (int_parameter(L, 10))
    "translate_y": (lambda level: level, True),
    "posterize": (lambda level: 4 - level * 4 // 10, False),  # bits kept: 4 (L = 1, 2) .. 1 (8, 9)
    "shear_y": (lambda level: level * 0.3 / 10, True),
}
# The FixMatch paper's table (Sohn et al. 2020, Table 12), variant="paper": (op, magnitude range),
# each magnitude uniform in its range; rotate and shear about the centre, bilinear, translate in
# fractions of the size.
RANDAUGMENT_PAPER_OPS = (
    ("identity", 0, 0),
    ("autocontrast", 0, 0),
    ("equalize", 0, 0),
    ("rotate", -30, 30),  # degrees
    ("solarize", 0, 1),  # threshold: values >= it are inverted
    # enhancement factors (1: the image, 0: the degenerate image): darker only
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("brightness", 0.05, 0.95),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("translate_x", -0.3, 0.3),
    ("translate_y", -0.3, 0.3),  # fractions of the image size
    ("posterize", 4, 9),  # bits: the floor of U[4, 9), i.e. 4..8
)
# SPICE's official strong views (niuchuangnn/SPICE), the same table with PIL's geometry (shear
# about the top-left corner, nearest): SPICE-Semi's "spice-semi" (fixmatch/datasets/augmentation/
# randaugment.py) takes posterize 4..7 bits (int of U[4, 8)); SPICE-Self's "scan" (SCAN's, in
# spice/data/augment.py `augment_list`) also shears and translates by at most 0.1, not 0.3.
_SPICE_SEMI_OPS = tuple(
    (name, 4, 8) if name == "posterize" else (name, lo, hi)
    for name, lo, hi in RANDAUGMENT_PAPER_OPS
)
_SCAN_OPS = tuple(
    (name, -0.1, 0.1) if name.startswith(("shear", "translate")) else (name, lo, hi)
    for name, lo, hi in _SPICE_SEMI_OPS
)
RANDAUGMENT_TABLES = {
    "paper": RANDAUGMENT_PAPER_OPS,
    "spice-semi": _SPICE_SEMI_OPS,
    "scan": _SCAN_OPS,
}
RANDAUGMENT_VARIANTS = ("official", *RANDAUGMENT_TABLES)
_RANDAUGMENT_FNS = {  # the non-geometric ops; the geometric ones run together in _geometric
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": lambda x, m: torch.where(x >= m.view(-1, 1, 1, 1), 1 - x, x),
    "color": lambda x, m: _blend(_grayscale(x), x, m),
    "contrast": lambda x, m: _blend(
        (_grayscale(x).mean((1, 2, 3), keepdim=True) * 255).round() / 255, x, m
    ),
    "brightness": lambda x, m: _blend(torch.zeros_like(x), x, m),
}


def draw_randaugment(
    b: int,
    num_ops: int = 2,
    prob: float = 0.5,
    variant: str = "official",
    size: tuple[int, int] = (32, 32),
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandAugment's random choices for b samples of `size` (H, W): the op names, and (b, num_ops)
    op indices into them, apply flags (each with probability `prob`) and magnitudes in the units
    the ops take (translations in fractions of the size)."""
    if variant not in RANDAUGMENT_VARIANTS:
        raise ConfigError(f"RandAugment variant {variant!r}: choose from {RANDAUGMENT_VARIANTS}")
    shape = (b, num_ops)
    table = RANDAUGMENT_TABLES.get(variant)
    names = tuple(RANDAUGMENT_OPS) if table is None else tuple(row[0] for row in table)
    ops = torch.randint(len(names), shape, generator=generator, device=device)
    applied = _rand(shape, generator, device) < prob
    if table is not None:  # a table of ranges: each magnitude uniform in its op's
        level = _rand(shape, generator, device)
        ranges = torch.tensor([row[1:] for row in table], device=device)
        lo, hi = ranges[ops].unbind(-1)
        return names, ops, applied, lo + (hi - lo) * level
    level = torch.randint(1, 10, shape, generator=generator, device=device)
    sign = torch.where(_rand(shape, generator, device) < 0.5, -1.0, 1.0)
    side = {"translate_x": size[1], "translate_y": size[0]}  # official pixels -> fractions
    per_op = []  # (14, b, num_ops): every op's magnitude at the drawn levels, then the drawn op's
    for name, (magnitude, signed) in RANDAUGMENT_OPS.items():
        m = torch.zeros(shape, device=device) if magnitude is None else magnitude(level).float()
        m = m * sign if signed else m
        per_op.append(m / side.get(name, 1))
    return names, ops, applied, torch.stack(per_op).gather(0, ops[None])[0]


def randaugment(
    x: torch.Tensor,
    num_ops: int = 2,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
    variant: str = "official",
) -> torch.Tensor:
    """Per sample, `num_ops` ops drawn with replacement, each applied with probability `prob` at
    its own random magnitude (`draw_randaugment`): variant "official" (RANDAUGMENT_OPS, the
    official code's; geometric ops by nearest neighbour, as PIL's default there), "paper"
    (RANDAUGMENT_PAPER_OPS, bilinear), or SPICE's "spice-semi" and "scan" (RANDAUGMENT_TABLES,
    PIL's geometry). Samples that drew the same op run together."""
    dtype, x = x.dtype, _to_float(x)
    names, ops, applied, magnitude = draw_randaugment(
        len(x), num_ops, prob, variant, x.shape[-2:], generator, x.device
    )
    kinds = [GEOMETRIC_OPS.index(n) if n in GEOMETRIC_OPS else -1 for n in names]
    geometric = torch.tensor(kinds, device=x.device)[ops]  # (B, num_ops): -1 if not geometric
    pil_geometry = variant != "paper"
    for slot in range(num_ops):
        idx = torch.nonzero(applied[:, slot] & (geometric[:, slot] >= 0)).squeeze(1)
        if len(idx):  # all geometric ops of this slot in one resampling
            x[idx] = _geometric(
                x[idx],
                geometric[idx, slot],
                magnitude[idx, slot],
                corner=pil_geometry,
                mode="nearest" if pil_geometry else "bilinear",
            )
        for k, name in enumerate(names):
            if name in _RANDAUGMENT_FNS:
                idx = torch.nonzero((ops[:, slot] == k) & applied[:, slot]).squeeze(1)
                if len(idx):
                    x[idx] = _RANDAUGMENT_FNS[name](x[idx], magnitude[idx, slot])
    return _restore(x, dtype)


def strong_augment(
    x: torch.Tensor,
    num_ops: int = 2,
    prob: float = 0.5,
    cutout_size: float = 16,
    random_cutout: bool = False,
    flip: bool = True,
    generator: torch.Generator | None = None,
    variant: str = "official",
) -> torch.Tensor:
    """FixMatch's strong view as the official code makes it: the weak view, then RandAugment
    (2 ops, p = 0.5 each, `variant`), then a grey 16 px Cutout at any image size (cutout_numpy's
    default size in third_party/auto_augment/augmentations.py); random_cutout: a Cutout of side
    U[0, cutout_size]."""
    x = weak_augment(x, flip=flip, generator=generator)
    x = randaugment(x, num_ops, prob, generator, variant)
    return cutout(x, cutout_size, random_cutout, generator)


def _adjust_hue(x, shift):
    """Rotate the hue of RGB images (B, 3, H, W) by `shift` (B,), in turns, through HSV."""
    r, g, b = x.unbind(1)
    val = x.amax(1)
    delta = x.amax(1) - x.amin(1)
    rc, gc, bc = ((val - c) / delta.clamp_min(1e-8) for c in (r, g, b))
    # The hue in sixths of a turn: red's, green's or blue's sector, whichever channel is largest.
    sixths = torch.where(val == r, bc - gc, torch.where(val == g, 2 + rc - bc, 4 + gc - rc))
    hue = sixths * (delta > 0) / 6
    hue = (hue + shift.view(-1, 1, 1)) % 1
    sat = delta / val.clamp_min(1e-8)
    sector = (hue * 6).floor()
    f = hue * 6 - (hue * 6).floor()
    p = val * (1 - sat)
    q = val * (1 - sat * f)
    t = val * (1 - sat * (1 - f))
    # HSV -> RGB: each of the six sectors takes its (R, G, B) from (val, p, q, t).
    sectors = ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q))
    table = torch.stack([torch.stack(rgb, 1) for rgb in sectors], 1)  # (B, 6, 3, H, W)
    return table.gather(1, (sector.long() % 6)[:, None, None].expand(-1, 1, 3, -1, -1))[:, 0]


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur, a sigma per sample (half-width 3 sigma), reflect-padded, grouped."""
    b, c, h, w = x.shape
    half = max(1, min(math.ceil(3 * float(sigma.max())), h - 1, w - 1))
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.view(b, c, h, w)


def draw_photometric(
    n: int,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    jitter_p: float = 0.8,
    jitter_each: bool = False,
    random_order: bool = True,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    generator=None,
    device=None,
) -> dict:
    """Photometric parameters for n images, MoCo v2's by default: colour jitter with probability
    jitter_p (factors 1 +/- strength, hue shift +/- hue; `jitter_each`: one coin per op, as
    PiCIE), ops in random order (torchvision's ColorJitter), grayscale, Gaussian blur. Drawn
    apart from `apply_photometric` so a method can fix them per image (PiCIE: once an epoch)."""

    def uniform(*shape):  # U[0, 1) of this shape
        return _rand(shape, generator, device)

    coin = uniform(n) < jitter_p
    on = (lambda: uniform(n) < jitter_p) if jitter_each else (lambda: coin)
    strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
    params = {}
    for name, strength in strengths.items():  # factor 1 +/- strength, or 1 where jitter is off
        params[name] = torch.where(on(), 1 + strength * (2 * uniform(n) - 1), 1.0)
    params["hue"] = torch.where(on(), hue * (2 * uniform(n) - 1), 0.0)
    in_order = torch.arange(4, device=device).expand(n, 4)
    params["order"] = uniform(n, 4).argsort(1) if random_order else in_order
    params["grayscale"] = uniform(n) < grayscale_p
    blurred = uniform(n) < blur_p
    lo, hi = blur_sigma
    params["sigma"] = torch.where(blurred, lo + (hi - lo) * uniform(n), 0.0)
    return params


_JITTER = (
    ("brightness", _RANDAUGMENT_FNS["brightness"]),  # torchvision's ColorJitter, in its order
    ("contrast", lambda x, f: _blend(_grayscale(x).mean((1, 2, 3), keepdim=True), x, f)),
    ("saturation", _RANDAUGMENT_FNS["color"]),
    ("hue", _adjust_hue),
)


def apply_photometric(x: torch.Tensor, params: dict) -> torch.Tensor:
    """Colour jitter in each image's order, then grayscale, then blur (MoCo v2's order)."""
    dtype, x = x.dtype, _to_float(x)
    for slot in range(4):
        for k, (name, fn) in enumerate(_JITTER):
            idx = torch.nonzero(params["order"][:, slot] == k).squeeze(1)
            if len(idx):
                x[idx] = fn(x[idx], params[name][idx])
    x = torch.where(params["grayscale"].view(-1, 1, 1, 1), _grayscale(x).expand_as(x), x)
    idx = torch.nonzero(params["sigma"] > 0).squeeze(1)
    if len(idx):
        x[idx] = _gaussian_blur(x[idx], params["sigma"][idx])
    return _restore(x, dtype)


def photometric_augment(x: torch.Tensor, generator=None, **kwargs) -> torch.Tensor:
    """MoCo v2: jitter (0.4, 0.4, 0.4, 0.1) p = 0.8, grayscale p = 0.2, blur sigma 0.1-2 p = 0.5."""
    params = draw_photometric(len(x), generator=generator, device=x.device, **kwargs)
    return apply_photometric(x, params)


def draw_crops(
    n: int,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip_p: float = 0.5,
    aspect: float = 1.0,
    generator=None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crops as torchvision draws them (area fraction in `scale`, log-uniform
    ratio in `ratio`, the first of 10 tries that fits, else the whole image) for images of
    width / height = `aspect`: boxes (n, 4) = (x0, y0, w, h) in fractions, and flips (n,)."""
    area = scale[0] + (scale[1] - scale[0]) * _rand((n, 10), generator, device)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    log_r = log_lo + (log_hi - log_lo) * _rand((n, 10), generator, device)
    w = torch.sqrt(area * log_r.exp() / aspect)
    h = torch.sqrt(area / log_r.exp() * aspect)
    fits = (w <= 1) & (h <= 1)
    first, ok = fits.float().argmax(1, keepdim=True), fits.any(1)
    w, h = (torch.where(ok, side.gather(1, first)[:, 0], 1.0) for side in (w, h))
    x0, y0 = _rand(n, generator, device) * (1 - w), _rand(n, generator, device) * (1 - h)
    return torch.stack([x0, y0, w, h], 1), _rand(n, generator, device) < flip_p


def resized_crop(
    x: torch.Tensor,
    boxes: torch.Tensor,
    flip: torch.Tensor,
    size,
    mode: str = "bilinear",
    fill: float = 0.0,
) -> torch.Tensor:
    """Crop each sample to its box (x0, y0, w, h in fractions, may reach outside: `fill`), flip
    where `flip`, resize to `size`, as one affine resampling: the same boxes move images
    (bilinear), label maps (B, H, W) (mode="nearest", fill=255) and feature maps alike."""
    labels = x.ndim == 3
    xf = (x[:, None] if labels else x).float()
    size = (size, size) if isinstance(size, int) else tuple(size)
    x0, y0, w, h = boxes.float().unbind(1)
    zero = torch.zeros_like(w)
    # The affine map from output to input coordinates in [-1, 1]: (B, 2, 3).
    row_x = torch.stack([torch.where(flip, -w, w), zero, 2 * x0 + w - 1], 1)
    row_y = torch.stack([zero, h, 2 * y0 + h - 1], 1)
    theta = torch.stack([row_x, row_y], 1)
    out = _warp(xf, theta, mode, fill, size)
    if labels:
        out = out[:, 0]
    return out.to(x.dtype) if x.is_floating_point() else out.round().to(x.dtype)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (or float in [0, 1]) images -> float, standardised per channel."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def normalize_padded(images: torch.Tensor, sizes: torch.Tensor, mean, std) -> torch.Tensor:
    """`normalize` uint8 (B, 3, H, W), then 0 (the mean colour) in the padding beyond each
    image's true `sizes` (B, 2) = (h, w), such as `segmentation_batches` pads."""
    x = normalize(images, mean, std)
    rows = torch.arange(x.shape[2], device=x.device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(x.shape[3], device=x.device)[None, None, :] < sizes[:, 1, None, None]
    return x * (rows & cols)[:, None]


# --------------------------------------------------------------------------------------------------
# Several processes: torchrun, one process per GPU, on one machine or several
# --------------------------------------------------------------------------------------------------
# `torchrun --nproc_per_node 8 fixmatch.py ...` starts 8 copies of the script with RANK,
# LOCAL_RANK and WORLD_SIZE in their environment. Every copy holds the whole data set and the
# same networks; each step, every process draws the same global batch of indices and trains on its
# own slice of it (`share`), and the gradients are averaged over the processes before the
# optimiser step (`synchronize`), so that every process takes the same step. Rank 0 alone prints
# and writes files. Without torchrun all of this is a no-op: one process, rank 0 of 1.
def rank() -> int:
    """This process's index among the run's processes (0 without torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    """How many processes share the run (1 without torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_writer() -> bool:
    """Whether this process writes the run's files and prints its log: rank 0 only."""
    return rank() == 0


def start_processes(device_name: str = "auto") -> torch.device:
    """The run's device, as `select_device`; under torchrun, also join the process group: GPU
    `LOCAL_RANK` with NCCL when the machine has a GPU per process, else gloo (the CPU, or several
    processes sharing one GPU). Processes other than rank 0 print nothing."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        return select_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = select_device(device_name)
    count = torch.cuda.device_count()
    spread = device.type == "cuda" and device.index is None  # auto or cuda: GPU LOCAL_RANK
    if spread:
        device = torch.device("cuda", local_rank % count)
    if not torch.distributed.is_initialized():
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
        # NCCL wants a GPU of its own per process; processes that share one talk through gloo
        nccl = spread and count >= local_processes
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
        if device.type == "cuda" and not nccl and is_writer():
            shared = f"{count} GPU(s)" if spread else f"GPU {device.index}"
            hint = ""
            if count >= local_processes:
                hint = "; --device cuda gives each process a GPU of its own"
            print(
                f"--device {device_name}: the {local_processes} processes on this machine share "
                f"{shared}, so they talk through gloo (slower than NCCL){hint}",
                flush=True,
            )
    if not is_writer():
        sys.stdout = open(os.devnull, "w")  # for the life of the process
    return device


def check_batches(batches: dict[str, int]) -> None:
    """Each global batch (`{"--batch-size": 64}`) must split evenly among the processes."""
    processes = world_size()
    for name, size in batches.items():
        if size % processes:
            raise ConfigError(
                f"{name} {size} is the batch over all {processes} processes and must divide "
                f"evenly among them: choose a multiple of {processes}, or another number of "
                f"processes (torchrun --nproc_per_node)"
            )


def share(indices: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a global batch of indices (all of it in one process):
    the union of the slices is the batch one process would draw (`check_batches` first)."""
    return indices.view(world_size(), -1)[rank()]


def synchronize(*modules: torch.nn.Module) -> None:
    """Between backward and the optimiser step: average every gradient over the processes and
    give every process rank 0's buffers (batch-norm statistics), so that all take the same step
    and hold the same networks. This is what DistributedDataParallel does (apex's, which the
    official CPS uses, does exactly this after backward); done here in one call so that a loop
    may run its networks in several passes, in parts and with frozen pieces, as the methods do."""
    if world_size() == 1:
        return
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
    for m in modules:
        for b in m.buffers():
            torch.distributed.broadcast(b, 0)


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` in every process, in place: for what is computed in every process but
    decides the training (k-means centroids, chosen samples), so that no rounding can part them."""
    if world_size() > 1:
        torch.distributed.broadcast(tensor, 0)
    return tensor


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` (the same shape in each), concatenated in rank order along dim 0:
    e.g. a step's features and indices from all processes, for a memory every process updates
    alike."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def agree(value):
    """Rank 0's `value` (any picklable object) in every process: for a decision that must be the
    same everywhere though each process could reach it alone (it is time to checkpoint)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, 0)
    return box[0]


def rank_generator(seed: int, device) -> torch.Generator:
    """A generator for this process's augmentations: seeded `seed` in rank 0 (the one-process
    run's stream) and differently in every other rank, so that the processes' images are not
    augmented alike. Its state goes into checkpoints through `generator_state`."""
    return torch.Generator(device=device).manual_seed(seed + 7919 * rank())


def generator_state(generator: torch.Generator):
    """For a checkpoint: the generator's state; under torchrun, the list of every process's."""
    if world_size() == 1:
        return generator.get_state()
    states = [None] * world_size()
    torch.distributed.all_gather_object(states, generator.get_state())
    return states


def restore_generator(generator: torch.Generator, saved) -> None:
    """The inverse of `generator_state`, in the process whose state it was."""
    if isinstance(saved, torch.Tensor):
        saved = [saved]
    if len(saved) != world_size():
        raise ConfigError(
            f"this checkpoint was written by {len(saved)} processes and this run has "
            f"{world_size()}: resume it with the same number (torchrun --nproc_per_node "
            f"{len(saved)}; without torchrun for 1)"
        )
    generator.set_state(saved[rank()].cpu())


def weights_checksum(*modules: torch.nn.Module) -> list[float]:
    """Every process's sum of its networks' parameters and buffers, in rank order: all equal when
    the processes hold the same networks (results.json keeps it, as evidence)."""
    total = sum(t.double().sum() for m in modules for t in m.state_dict().values())
    return gather(torch.as_tensor(total, dtype=torch.float64).reshape(1)).tolist()


# --------------------------------------------------------------------------------------------------
# Run plumbing: command line, out dir, device, logging, checkpoints, results, pictures
# --------------------------------------------------------------------------------------------------
# The flags every script shares (DESIGN.md, Runs), in this order. Where the help is given, each
# script's Args must use exactly it; the others are method-specific (tests check both).
SHARED_ARGS = {
    "dataset": "data set name",
    "data_dir": "folder holding the data set (default: ./data for torchvision's sets)",
    "out_dir": "run folder (default: runs/<script>-<dataset>-<seed>)",
    "download": "download the data set with torchvision if it is missing",
    "seed": "random seed (labelled split, initialisation, augmentation)",
    "device": "auto, cpu, cuda or cuda:N",
    "threads": "CPU threads for torch (default: torch's choice, one per core; 1 is often faster "
    "on a busy or small machine)",
    "batch_size": None,
    "eval_every": None,
    "resume": "continue the run in --out-dir from its checkpoint",
    "amp": "bfloat16 autocast on CUDA (ignored on the CPU)",
    "compile": "torch.compile the network(s)",
}


# Fields on which a resumed run may differ from its start: they change how it is watched or where
# it runs, never what it computes. Any other change is refused on --resume (`prepare_out_dir`).
MAY_CHANGE_ON_RESUME = (
    "resume",
    "predict",
    "overwrite",
    "out_dir",
    "device",
    "threads",
    "workers",
    "eval_every",
    "log_every",
    "compile",
    "download",
    "memmap",
)


def arg(default, *, at_least=None, above=None, at_most=None, below=None):
    """An `Args` field whose valid range `parse_args` checks: `batch_size: int = arg(64,
    at_least=1)`, `threshold: float = arg(0.95, at_least=0, at_most=1)`. None is always valid."""
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    bounds = {k: v for k, v in bounds.items() if v is not None}
    return dataclasses.field(default=default, metadata={"range": bounds})


def range_error(value, bounds: dict) -> str | None:
    """What is wrong with `value` under `arg`'s `bounds` ("must be at least 1"), or None."""
    checks = {
        "at_least": ("at least", lambda v, b: v >= b),
        "above": ("above", lambda v, b: v > b),
        "at_most": ("at most", lambda v, b: v <= b),
        "below": ("below", lambda v, b: v < b),
    }
    if value is None or not bounds:
        return None
    valid = all(checks[k][1](value, b) for k, b in bounds.items())  # NaN fails every comparison
    if valid:
        return None
    return "must be " + " and ".join(f"{checks[k][0]} {b}" for k, b in bounds.items())


def _field_help(cls) -> dict[str, str]:
    """The string under each dataclass field is its help text (as CleanRL's)."""
    body = []  # the statements of each dataclass in the hierarchy, base classes first
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            body += ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
    helps = {}
    for field, doc in zip(body, body[1:], strict=False):
        is_string = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
        if isinstance(field, ast.AnnAssign) and is_string:
            helps[field.target.id] = " ".join(doc.value.value.split())
    return helps


def _number(text: str) -> float:  # a float flag that also takes fractions such as 1/8
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        expected = "expected a number or a fraction such as 1/8"
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None


def _as_flag(
    name: str, value
) -> str:  # ("flip", False) -> "--no-flip", ("steps", 9) -> "--steps 9"
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _epilog(task: str | None, dataset_defaults: dict) -> str:
    """--help's closing lines: the data set names, and the defaults that each data set changes."""
    names = [n for n, info in DATASETS.items() if task in (None, info.task)]
    lines = [textwrap.fill("data sets (--dataset): " + ", ".join(names), 96), ""]
    if dataset_defaults:
        lines.append("some data sets change the defaults above (a flag given still wins):")
    for dataset, changes in dataset_defaults.items():
        flags = " ".join(_as_flag(k, v) for k, v in changes.items())
        lines.append(
            textwrap.fill(flags, 96, initial_indent=f"  {dataset}: ", subsequent_indent="    ")
        )
    return "\n".join(lines)


def parse_args(
    cls,
    argv=None,
    dataset_defaults: dict | None = None,
    description: str | None = None,
    script: str | None = None,
    task: str | None = None,
):
    """An instance of dataclass `cls` from the command line: every field a flag (`num_labeled` ->
    `--num-labeled`), its help the string under the field; booleans are `--x/--no-x`, floats take
    fractions (`1/8`), Literal fields list their choices. `dataset_defaults[name]` overrides the
    class defaults for data set `name`; flags given on the command line override both.

    Before anything else runs: the data set must be a known one (for `task`, when given), every
    value must lie in its field's `arg` range, `--threads` is applied, and a missing `--out-dir`
    becomes `runs/<script>-<dataset>-<seed>`."""
    hints, helps = typing.get_type_hints(cls), _field_help(cls)
    parser = argparse.ArgumentParser(
        prog=f"{script}.py" if script else None,
        description=description,
        epilog=_epilog(task, dataset_defaults or {}),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in fields.values()
    }
    for name, default in defaults.items():
        kind, flag = hints[name], "--" + name.replace("_", "-")
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is not typing.Literal and len(options) == 1:  # X | None
            kind = options[0]
        text = helps.get(name, "")
        bounds = fields[name].metadata.get("range", {})
        valid = " and ".join(f"{k.replace('_', ' ')} {v}" for k, v in bounds.items())
        if "default:" not in text:  # a help that explains its default says it once
            text += f" (default: {default}{'; ' + valid if valid else ''})"
        elif valid:
            text += f" ({valid})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=options, type=type(options[0]), help=text)
        else:
            convert = _number if kind is float else kind
            parser.add_argument(flag, type=convert, help=text, metavar=kind.__name__.upper())
    given = vars(parser.parse_args(argv))
    dataset = given.get("dataset", defaults.get("dataset"))
    values = {**defaults, **(dataset_defaults or {}).get(dataset, {}), **given}
    if "dataset" in values:
        try:
            dataset_info(values["dataset"], task)
        except ConfigError as e:
            parser.error(f"argument --dataset: {e}")
    for name, value in values.items():
        problem = range_error(value, fields[name].metadata.get("range", {}))
        if problem:
            parser.error(f"argument --{name.replace('_', '-')}: {value} is out of range: {problem}")
    if values.get("predict") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--predict runs in one process: run it without torchrun")
    if values.get("threads"):
        torch.set_num_threads(values["threads"])
    if script and "out_dir" in values and values["out_dir"] is None:
        values["out_dir"] = f"runs/{script}-{values['dataset']}-{values['seed']}"
    return cls(**values)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """auto (CUDA if there is one), cpu, cuda or cuda:N, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(f"--device {name}: torch sees {count} CUDA GPUs here; use --device cpu")
    return device


def prepare_out_dir(out_dir, resume: bool = False, args=None) -> Path:
    """Create the run folder and write args.json, once per run. A new or empty folder is fine; one
    holding a checkpoint or results is refused unless `resume` (which needs the checkpoint). A
    resumed run must have the arguments it started with, but for MAY_CHANGE_ON_RESUME: any other
    change would alter its result (another --steps bends the schedule), so it is refused."""
    out = Path(out_dir)
    previous = [n for n in ("checkpoint.pt", "results.json") if (out / n).exists()]
    checkpoint = out / "checkpoint.pt"
    if resume and not checkpoint.exists():
        raise ConfigError(f"--resume: no checkpoint at {checkpoint}; run without --resume to start")
    if previous and not resume:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(previous)}): pass --resume to continue it, "
            f"or choose another --out-dir"
        )
    if resume:
        if args is not None:
            _check_resume_args(out / "args.json", _plain(dataclasses.asdict(args)))
        return out
    if not is_writer():
        return out  # under torchrun, rank 0 alone writes
    out.mkdir(parents=True, exist_ok=True)
    # A folder without a checkpoint holds at most a run stopped before its first one: start over.
    (out / "log.jsonl").unlink(missing_ok=True)
    if args is not None:
        text = json.dumps(_plain(dataclasses.asdict(args)), indent=2)
        _atomic_write(out / "args.json", text.encode())
    return out


def _check_resume_args(path: Path, now: dict) -> None:
    """Refuse a --resume whose flags differ from the run's args.json where the result depends."""
    try:
        started = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no readable args.json (a run from before it was kept): nothing to compare
    changed = [
        f"--{name.replace('_', '-')} {started[name]} (now {now[name]})"
        for name in now
        if name in started and name not in MAY_CHANGE_ON_RESUME and started[name] != now[name]
    ]
    if changed:
        raise ConfigError(
            f"--resume: this run started with {', '.join(changed)}; a resumed run must keep the "
            f"flags that decide its result (see {path}). Resume with them, or start a new run "
            f"in another --out-dir"
        )


def _plain(value):  # tensors, numpy values, paths -> plain Python values, by a JSON round trip
    text = json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    return json.loads(text)


CHECKPOINT_SECONDS = 600  # at most this much training is lost to a crash between evaluations


@contextlib.contextmanager
def user_errors(script: str, out_dir=None):
    """Around a script's run: bad input (ConfigError) ends in one line `script: error: ...`, and
    Ctrl-C in one line saying where the last checkpoint is and how to go on from it. Under
    torchrun, rank 0 alone says it, and the process group is closed at the end."""
    try:
        yield
        if world_size() > 1:  # every process done before the group closes (gloo aborts else)
            torch.distributed.barrier()
    except ConfigError as e:
        raise SystemExit(f"{script}: error: {e}" if is_writer() else 2) from None
    except KeyboardInterrupt:
        checkpoint = Path(out_dir or ".") / "checkpoint.pt"
        if out_dir is not None and checkpoint.exists():
            saved = time.strftime("%H:%M:%S", time.localtime(checkpoint.stat().st_mtime))
            message = (
                f"{script}: interrupted. The last checkpoint is {checkpoint} (saved at {saved}): "
                f"run the same command with --resume to continue from it"
            )
        else:
            message = (
                f"{script}: interrupted before the first checkpoint, nothing to resume: run the "
                f"same command again to start over"
            )
        if is_writer():
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(130) from None  # 128 + SIGINT, the shell's status for Ctrl-C
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class RunBook:
    """The bookkeeping that every training loop repeats, kept out of the loops: wall time and
    training time over the whole run (a resumed run carries on from its checkpoint), the images
    trained on (throughput), the log, and the checkpoint with the run's arguments. Every script
    uses it the same way:

        book = common.RunBook(out, args, device)  # loads the checkpoint when args.resume
        model.load_state_dict(book.checkpoint["model"])  # only when resuming; {} for a new run
        start = book.checkpoint.get("step", 0)
        book.start_log(total=args.steps, start=start)  # the ETA counts from here
        for step in range(start, args.steps):
            with book.timed(images=len(batch)):  # counts as training time and images
                ...  # the method's step
            book.log(step + 1, {"train/loss": loss})  # with the throughput since the last line
            book.save({"model": model.state_dict(), "step": step + 1})  # atomically
        results = {"acc": acc, **book.figures()}  # seconds, images_per_second
    """

    def __init__(self, out_dir, args, device=None, totals: dict | None = None):
        self.out = Path(out_dir)
        self.args = dataclasses.asdict(args)
        self.device = torch.device(device or "cpu")
        self.checkpoint = {}
        if args.resume:
            self.checkpoint = load_checkpoint(self.out / "checkpoint.pt", map_location=device)
        # The totals so far: the checkpoint's when resuming, else those handed over (a later
        # stage of a pipeline carries on from the file of the earlier one), else none.
        self.totals = dict(self.checkpoint.get("totals") or totals or {})
        self.totals.setdefault("seconds", 0.0)
        self.totals.setdefault("train_seconds", 0.0)
        self.totals.setdefault("images", 0)
        self._images_since_log = 0
        self._wall_clock = self._last_save = time.perf_counter()
        # The log reads as one run: a resumed run drops the lines that its checkpoint did not keep
        # (those an interrupted attempt wrote after its last save).
        self._log_lines = self.checkpoint.get("log_lines", 0)
        log = self.out / "log.jsonl"
        if args.resume and "log_lines" in self.checkpoint and log.exists():
            kept = log.read_text().splitlines(keepends=True)[: self._log_lines]
            _atomic_write(log, "".join(kept).encode())

    def start_log(self, total: int | None = None, start: int = 0) -> None:
        """A log whose ETA counts from `start` to `total` (steps or epochs of this loop)."""
        self._log_total = total
        self._log_start = start
        self._log_t0 = self._log_last = time.perf_counter()

    @contextlib.contextmanager
    def timed(self, images: int = 0):
        """The block's time is training time; `images` are added when it ends (see `count`)."""
        t = time.perf_counter()
        yield
        self.totals["train_seconds"] += time.perf_counter() - t
        self.count(images)

    def count(self, images: int) -> None:  # images trained on, for the throughput
        self.totals["images"] += images
        self._images_since_log += images

    def log(self, step, metrics: dict) -> dict:
        """One `key=value` line on stdout, the same record appended to <out>/log.jsonl: the
        metrics, the throughput of the images counted since the last line, the time and the ETA."""
        now = time.perf_counter()
        elapsed = now - self._log_t0
        record = {"step": step, **_plain(metrics)}
        if self._images_since_log:
            record["perf/img_per_s"] = self._images_since_log / max(now - self._log_last, 1e-9)
        record["perf/elapsed_s"] = elapsed
        if self._log_total and step > self._log_start:
            record["perf/eta_s"] = elapsed / (step - self._log_start) * (self._log_total - step)
        self._log_last = now
        self._images_since_log = 0
        fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        print(" ".join(fields), flush=True)
        if is_writer():
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self._log_lines += 1
        return record

    def save_due(self, evaluated: bool = False) -> bool:
        """Whether to checkpoint now: after every evaluation, and at least every
        CHECKPOINT_SECONDS of wall time, so that a crash loses little. Under torchrun, rank 0's
        clock decides for all: every process must take part in a save (`generator_state`)."""
        return agree(evaluated or time.perf_counter() - self._last_save >= CHECKPOINT_SECONDS)

    def tick(self) -> dict:
        """The totals, with the wall time brought up to now."""
        now = time.perf_counter()
        self.totals["seconds"] += now - self._wall_clock
        self._wall_clock = now
        return dict(self.totals)

    def save(self, state: dict, name: str = "checkpoint.pt") -> None:
        """`state` with the totals, the arguments and torch's global random states (the CPU's,
        and the run's GPU's on CUDA; see `restore_global_rng`), atomically to <out>/<name>."""
        rng = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        book = {"totals": self.tick(), "args": self.args, "log_lines": self._log_lines}
        save_checkpoint(self.out / name, {**state, **rng, **book})
        self._last_save = time.perf_counter()

    def restore_global_rng(self) -> None:
        """torch's global random states as the resumed checkpoint saved them, for a loop that draws
        from them (dropout): it then draws what the uninterrupted run would."""
        torch.set_rng_state(self.checkpoint["torch_rng"].cpu())
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.checkpoint["cuda_rng"].cpu(), self.device)

    def figures(self) -> dict:
        """What results.json always holds besides the method's figures."""
        totals = self.tick()
        return {
            "seconds": totals["seconds"],
            "images_per_second": totals["images"] / max(totals["train_seconds"], 1e-9),
        }


def _atomic_write(path: Path, data) -> None:
    """Write a temporary file beside `path`, flush it to disk, rename it over `path`: a crash at
    any moment leaves the old file or the new one, never half of one. Under torchrun only rank 0
    writes (the others return at once), so that every run file has one writer."""
    if not is_writer():
        return
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, state: dict) -> None:
    """torch.save, atomically."""
    _atomic_write(path, state)


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load of tensors and plain values only: no code in the file runs. A file that is not
    a whole checkpoint (truncated by a full disk, a half-finished copy) is a ConfigError naming
    it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except Exception as e:  # torch raises RuntimeError, EOFError or an unpickling error
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{path} cannot be read as a checkpoint ({reason}): the file is damaged or "
            f"incomplete. Restore a good copy, or start a new run in another --out-dir"
        ) from None


def print_table(rows: dict[str, dict]) -> None:
    """Evaluations side by side, one row each (e.g. the baselines and the trained network): a
    column per figure that any row has, blank where a row lacks it."""
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    width = max(len(name) for name in rows)
    print(" " * width + "".join(f" {c:>10}" for c in columns), flush=True)
    for name, row in rows.items():
        cells = (f" {row[c]:>10.4f}" if c in row else " " * 11 for c in columns)
        print(name.ljust(width) + "".join(cells), flush=True)


def load_results(out_dir) -> dict:
    """A finished run's results.json."""
    return json.loads((Path(out_dir) / "results.json").read_text())


def write_results(out_dir, results: dict) -> dict:
    """results.json, atomically. Accuracy-like figures (acc, nmi, ari, miou, pixel_acc and keys
    ending in them) must be fractions in [0, 1] (ARI, below chance, to -1): percentages refused."""
    results = _plain(results)
    lowest = {"acc": 0.0, "nmi": 0.0, "miou": 0.0, "ari": -1.0}
    for key, value in results.items():
        low = lowest.get(key.split("_")[-1])  # acc, self_nmi, baseline_pixel_acc, ...
        if low is not None and isinstance(value, float) and not low <= value <= 1.0:
            raise ValueError(f"results[{key!r}] = {value} is not a fraction in [{low:g}, 1]")
    _atomic_write(Path(out_dir) / "results.json", json.dumps(results, indent=2).encode())
    return results


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """Label maps (B, H, W) -> images (B, 3, H, W) in [0, 1] in Pascal VOC's palette, where bits
    0, 3, 6 of the class index set R's high bits, 1, 4, 7 G's and 2, 5 B's (255: void)."""
    i = torch.arange(256)
    channels = [sum(((i >> (3 * b + ch)) & 1) << (7 - b) for b in range(3)) for ch in range(3)]
    palette = torch.stack(channels, 1)  # (256, 3)
    return palette.to(labels.device)[labels.long().clamp(0, 255)].permute(0, 3, 1, 2).float() / 255


def save_cluster_grid(
    path,
    images: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None = None,
    per_row: int = 10,
    num_clusters: int | None = None,
) -> None:
    """A PNG, a row per cluster: its `per_row` images of highest `scores` (confidence), or blank.
    Only the images shown are read (`images` may be a memory-mapped set); rank 0 writes it."""
    from torchvision.utils import save_image

    if not is_writer():
        return
    labels = labels.cpu()
    scores = torch.zeros(len(labels)) if scores is None else scores.cpu()
    grid = torch.zeros(num_clusters or int(labels.max()) + 1, per_row, *images.shape[1:])
    for c in range(len(grid)):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[scores[idx].argsort(descending=True, stable=True)][:per_row]
        grid[c, : len(idx)] = _to_float(images[idx.to(images.device)].cpu())
    save_image(grid.flatten(0, 1), path, nrow=per_row, padding=1)


def save_segmentation_rows(
    path, images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor
) -> None:
    """A PNG of rows image | ground truth | prediction (all one size), labels in VOC colours."""
    from torchvision.utils import save_image

    if not is_writer():
        return
    rows = torch.stack([_to_float(images.cpu()), colorize(targets.cpu()), colorize(preds.cpu())], 1)
    save_image(rows.flatten(0, 1), path, nrow=3, padding=2)


# --------------------------------------------------------------------------------------------------
# Using a finished run: --predict FOLDER writes <run>/predictions
# --------------------------------------------------------------------------------------------------
def finished_run(out_dir, cls):
    """The arguments (an instance of the script's `cls`, from the checkpoint, which holds them)
    and the final checkpoint of the finished run in `out_dir`; a folder without one is a
    ConfigError."""
    out = Path(out_dir)
    if not (out / "results.json").exists():
        raise ConfigError(
            f"--predict needs a finished run: {out} holds no results.json. Pass the --out-dir "
            f"of a run that ended (and the script's --dataset and --seed find its default one)"
        )
    state = load_checkpoint(out / "checkpoint.pt")
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in state["args"].items() if k in names}), state


def read_new_images(folder, size: int | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """Every image under `folder` (recursively, in sorted order; any format Pillow reads,
    grayscale and RGBA as RGB), with `size` resized and centre-cropped as the training images
    (`_read_image`), else as stored: their paths relative to `folder` and uint8 (3, H, W)
    tensors. A file that is not a readable image is reported and skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--predict {folder}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    paths, images = [], []
    for i, path in enumerate(files):
        try:
            images.append(_read_image(path, size))
        except _BadFiles:
            print(f"skipped {path}: not a readable image", flush=True)
            continue
        paths.append(path.relative_to(root).as_posix())
        if (i + 1) % 1000 == 0:
            print(f"read {i + 1} of {len(files)} files", flush=True)
    if not images:
        raise ConfigError(f"--predict {folder}: no readable image in it")
    return paths, images


def predictions_dir(run_dir, overwrite: bool = False) -> Path:
    """<run_dir>/predictions, refused if it already holds predictions (unless `overwrite`)."""
    out = Path(run_dir) / "predictions"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out} already holds predictions: pass --overwrite to replace them, or move them"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_csv(path, header: list[str], rows) -> None:
    """A CSV file: the header, then one line per row."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_class_predictions(
    out: Path, paths, images, preds, confidence, names=None, num_clusters=None
) -> dict:
    """predictions.csv (path, class or cluster id, its name where the run knows one, confidence)
    and predictions.png (the images grouped by prediction, most confident first); returns the
    label-free summary: the image count, the size balance and the mean confidence."""
    preds, confidence = preds.cpu(), confidence.cpu()
    rows = []
    for path, p, c in zip(paths, preds.tolist(), confidence.tolist(), strict=True):
        rows.append([path, p, names[p] if names else "", f"{c:.4f}"])
    write_csv(out / "predictions.csv", ["path", "prediction", "name", "confidence"], rows)
    k = num_clusters or (len(names) if names else int(preds.max()) + 1)
    save_cluster_grid(out / "predictions.png", images, preds, confidence, num_clusters=k)
    summary = {
        "images": len(paths),
        "size_balance": size_balance(preds, k),
        "mean_confidence": float(confidence.mean()),
    }
    print(f"predictions of {len(paths)} images in {out}: " + json.dumps(summary), flush=True)
    return summary


def write_mask_predictions(out: Path, paths, images, masks, names=None, num_classes=None) -> dict:
    """Per image (uint8 (3, H, W)) and its mask (H, W) of class or cluster indices at the image's
    own size: masks/<path>.png (the indices as 8-bit grey levels), overlays/<path>.png (the
    image blended half and half with the VOC palette), and shares.csv (each index's share of the
    image's pixels); returns the label-free summary (images, size balance of all pixels)."""
    from PIL import Image
    from torchvision.utils import save_image

    k = num_classes or (len(names) if names else int(max(int(m.max()) for m in masks)) + 1)
    columns = names or [str(c) for c in range(k)]
    rows = []
    total = torch.zeros(k)
    for path, image, mask in zip(paths, images, masks, strict=True):
        mask = mask.cpu()
        stem = Path(path).with_suffix(".png")
        for sub in ("masks", "overlays"):
            (out / sub / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.numpy().astype(np.uint8), mode="L").save(out / "masks" / stem)
        overlay = 0.5 * _to_float(image.cpu()) + 0.5 * colorize(mask[None])[0]
        save_image(overlay, out / "overlays" / stem)
        counts = torch.bincount(mask.flatten().long(), minlength=k)[:k].float()
        total += counts
        rows.append([path, *(f"{v:.4f}" for v in (counts / counts.sum()).tolist())])
    write_csv(out / "shares.csv", ["path", *columns], rows)
    shares = total / total.sum()
    summary = {
        "images": len(paths),
        "size_balance": count_balance(total),
        "pixel_shares": [round(v, 4) for v in shares.tolist()],
    }
    print(f"predictions of {len(paths)} images in {out}: " + json.dumps(summary), flush=True)
    return summary


# --------------------------------------------------------------------------------------------------
# Self-benchmark: python common.py
# --------------------------------------------------------------------------------------------------
def benchmark(device: str = "auto") -> dict:
    """Augmentation throughput (batches of 512 at 32x32), k-means (100,000 x 64, K = 100, 20
    iterations with the seeding) and Hungarian (1000 x 1000) times on one device (medians)."""
    dev = select_device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    batch = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def seconds(fn, reps):  # median over reps after a warm-up: robust to a busy neighbour
        times = []
        for _ in range(reps + 1):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times[1:]))

    points = torch.randn(100_000, 64, generator=torch.Generator().manual_seed(0)).to(dev)
    cost = np.random.default_rng(0).random((1000, 1000))
    return {
        "device": str(dev),
        "weak_aug_img_per_s": 512 / seconds(lambda: weak_augment(batch, generator=g), 50),
        "strong_aug_img_per_s": 512 / seconds(lambda: strong_augment(batch, generator=g), 20),
        "kmeans_s": seconds(lambda: kmeans(points, 100, iters=20, tol=0.0), 2),
        "hungarian_s": seconds(lambda: linear_sum_assignment(cost), 2),
    }


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    for key, value in benchmark(sys.argv[1] if len(sys.argv) > 1 else "auto").items():
        print(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
