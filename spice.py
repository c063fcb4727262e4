"""SPICE: semantic pseudo-labelling for image clustering, in three stages.

Paper: Chuang Niu, Hongming Shan, Ge Wang, "SPICE: Semantic Pseudo-Labeling for Image
Clustering", IEEE Transactions on Image Processing 31, 2022, arXiv:2103.09382.
Official code: github.com/niuchuangnn/SPICE.

The idea: near cluster borders an image's neighbours in an embedding often belong to another
class, so instead of pulling neighbours together (SCAN), SPICE labels images by their similarity
to cluster *prototypes* built from a classifier's most confident images, trains cheap heads on
those labels, then keeps only the labels that are confident and agree with their whole
neighbourhood, and finishes with semi-supervised learning on them.

Algorithm (each name is a function below; `--stage moco|self|semi|all`, hand-over by file):
Stage 1, MoCo v2 (`train_moco`): the backbone learns by instance discrimination.
 1. Two views per image (`moco_augment`): the query encoder sees one, its momentum copy
    (`momentum_update`) the other, on shuffled groups (`shuffled_key_forward`: shuffle-BN on one
    device, so batch norm cannot tell which key belongs to which query; under torchrun across the
    processes, `distributed_key_forward`, as the official code does across GPUs).
 2. `moco_loss`: InfoNCE of each query against its key and the `MocoQueue` of earlier keys.
 3. `network_outputs`: the backbone feature of every image, unaugmented, in order, then
    L2-normalised: the embedding of stages 2 and 3 and of the k-means baseline
    (`kmeans_baseline`).
Stage 2, SPICE-Self (`train_self`): 10 heads on the frozen backbone, 30 epochs of draws of N
images, more where that makes fewer than the official CIFAR-10 run's 300 (`self_schedule`);
per draw:
 4. Every head scores the weak views: P (N x K).
 5. `prototype_pseudo_labels`: prototype c = mean embedding of the 0.5 N / K images with the
    highest P[:, c]; the N / K images most similar to it get label c.
 6. `train_heads`: each head fits its labels (`head_loss`) on the official strong views
    (`scan_strong_augment`); `head_diagnostics` logs label-free signs of a stuck head.
 7. `select_head`: step 5 over the whole split for every head after each epoch; the lowest loss
    over all epochs wins (no labels), with its weights of that epoch.
Stage 3, SPICE-Semi (`train_semi`):
 8. `reliable_samples`: the predicted cluster is shared by 99 of the 100 nearest neighbours
    (`knn_indices`; k capped at a tenth of the expected cluster size, `neighbour_count`) and the
    confidence exceeds 0.99; balanced to the smallest cluster's count.
 9. FixMatch (`fixmatch_loss`, `cosine_lr`, `parameter_groups`, `semi_strong_augment`) trains a
    new WRN-28-2: reliable images labelled with their clusters, every training image
    unlabelled; the final EMA model is the result (`evaluate`).

Usage:
    python spice.py --dataset cifar10                      # the paper's recipe (GPU: days)
    torchrun --nproc_per_node 4 spice.py --dataset cifar10 # 4 GPUs, as the official MoCo stage
    python spice.py --dataset shapes                       # all three stages on a CPU in minutes
    python spice.py --stage self --init-from runs/spice-cifar10-0/moco.pt --out-dir runs/self
    python spice.py --dataset imagefolder --data-dir DIR --image-size 64 --protocol all

Expected, ACC / NMI / ARI % (the paper's rows with a ResNet-18 for both stages; its row with a
WideResNet for stage 3, as the official train_semi.py and these defaults, reads 91.7 with a
ResNet-34 SPICE-Self):
    CIFAR-10, split (train -> test)   SPICE-Self 84.5 / 73.9 / 70.9   SPICE 91.8 / 85.0 / 83.6
    CIFAR-10, all (train + test)      SPICE-Self 83.8 / 73.4 / 70.5   SPICE 92.6 / 86.5 / 85.2
    STL-10 (all) SPICE 93.8 / 87.2 / 87.0; CIFAR-100-20 (all) SPICE 53.8 / 56.7 / 38.7
This file on a 2-core CPU: `shapes` figures in the README (Results), with their commands.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --------------------------------------------------------------------------------------------------
# Arguments: defaults are the paper's recipe for CIFAR-10
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    dataset: str = "cifar10"
    """data set name"""
    data_dir: str | None = None
    """folder holding the data set (default: ./data for torchvision's sets)"""
    out_dir: str | None = None
    """run folder (default: runs/<script>-<dataset>-<seed>)"""
    download: bool = False
    """download the data set with torchvision if it is missing"""
    seed: int = 0
    """random seed (labelled split, initialisation, augmentation)"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    threads: int | None = common.arg(None, at_least=1)
    """CPU threads for torch (default: torch's choice, one per core; 1 is often faster on a busy
    or small machine)"""
    batch_size: int = common.arg(128, at_least=1)
    """MoCo images per step"""
    eval_every: int = common.arg(1024, at_least=1)
    """SPICE-Semi steps between evaluations and checkpoints (SPICE-Self: every epoch)"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on the CPU)"""
    compile: bool = False
    """torch.compile the network(s)"""
    predict: str | None = None
    """a folder of new images: the finished run in --out-dir clusters them (its last evaluated
    model) into <out-dir>/predictions, instead of training"""
    overwrite: bool = False
    """with --predict: replace the predictions already in <out-dir>/predictions"""
    stage: Literal["all", "moco", "self", "semi"] = "all"
    """all, or one stage: moco, self (--init-from moco.pt) or semi (--init-from self.pt)"""
    init_from: str | None = None
    """the previous stage's hand-over file (moco.pt or self.pt) or the run folder holding it"""
    protocol: Literal["split", "all"] = "split"
    """split: train on train, evaluate on test (SCAN's); all: train and evaluate on train + test"""
    num_clusters: int | None = common.arg(None, at_least=2)
    """clusters, K (default: the number of classes)"""
    backbone_width: int = common.arg(64, at_least=1)
    """base width of the CIFAR ResNet-18 (64: the standard one, 512-d features)"""
    image_size: int = common.arg(32, at_least=8)
    """image side: image folders are resized to it, shapes drawn at it"""
    memmap: Literal["auto", "on", "off"] = "auto"
    """keep the training and test images on the CPU (an image folder memory-mapped from its
    cache) and gather each batch from there: auto when they would fill over half the device"""
    moco_epochs: int = common.arg(1000, at_least=1)
    """MoCo epochs (the official CIFAR-10 command)"""
    moco_lr: float = common.arg(0.015, above=0)
    """MoCo learning rate, cosine-decayed over the epochs"""
    moco_momentum: float = common.arg(0.999, at_least=0, below=1)
    """momentum of the MoCo key encoder (short runs need less: the keys must follow the network)"""
    moco_queue: int = common.arg(12800, at_least=1)
    """MoCo queue of negative keys (capped at half the images on small data sets)"""
    bn_groups: int = common.arg(4, at_least=1)
    """groups the MoCo batch is split into for batch norm (shuffle-BN; 4 x 32 at batch 128); under
    torchrun each process is one group, as each GPU in the official code"""
    moco_weight_decay: float = common.arg(1e-4, at_least=0)
    """MoCo SGD weight decay (MoCo v2's)"""
    moco_temperature: float = common.arg(0.2, above=0)
    """temperature T of MoCo's InfoNCE loss (MoCo v2's)"""
    self_epochs: int | None = common.arg(None, at_least=1)
    """SPICE-Self epochs (default: the official 30, more on a data set too small for the official
    CIFAR-10 run's 300 draws of --self-batch images, `SELF_DRAWS`)"""
    self_batch: int = common.arg(5000, at_least=1)  # Deviation: the official N (paper: 1000)
    """SPICE-Self images per draw, N (the paper's text: 1000; the official configuration: 5000)"""
    num_heads: int = common.arg(10, at_least=1)
    """SPICE-Self heads"""
    double_softmax: bool = True
    """cross-entropy on the heads' softmax outputs, as official (--no-double-softmax: on logits)"""
    self_lr: float = common.arg(0.005, above=0)
    """SPICE-Self Adam learning rate, no weight decay (the official configuration)"""
    self_passes: int = common.arg(8, at_least=1)
    """SPICE-Self passes over each draw's pseudo-labels, in mini-batches of 128"""
    consistency_ratio: float = common.arg(0.99, at_least=0, at_most=1)
    """share of the --num-neighbours nearest neighbours that must agree for a label to be
    reliable"""
    confidence: float = common.arg(0.99, at_least=0, below=1)
    """top probability a label needs to be reliable"""
    num_neighbours: int = common.arg(100, at_least=1)
    """nearest neighbours k of a reliable label (the paper's 100; capped at a tenth of the
    expected cluster size N / K, `NEIGHBOUR_SHARE`)"""
    semi_steps: int = common.arg(2**20, at_least=1)
    """SPICE-Semi (FixMatch) steps"""
    semi_batch_size: int = common.arg(64, at_least=1)
    """SPICE-Semi labelled images per step (the unlabelled batch is --semi-mu times it)"""
    semi_mu: int = common.arg(7, at_least=1)
    """SPICE-Semi unlabelled images per labelled one"""
    semi_depth: int = common.arg(28, at_least=10)
    """SPICE-Semi WideResNet depth (6 n + 4)"""
    semi_widen_factor: int = common.arg(2, at_least=1)
    """SPICE-Semi WideResNet width multiplier"""
    semi_bn_momentum: float = common.arg(0.001, above=0, at_most=1)
    """SPICE-Semi batch-norm momentum (PyTorch's convention); short runs need more"""
    ema_decay: float = common.arg(0.999, at_least=0, below=1)
    """decay of the exponential moving average of the SPICE-Semi weights that is evaluated"""
    semi_lr: float = common.arg(0.03, above=0)
    """SPICE-Semi learning rate eta of SGD, decayed as eta cos(7 pi k / 16 K) (FixMatch's)"""
    semi_weight_decay: float = common.arg(5e-4, at_least=0)
    """SPICE-Semi weight decay, not on batch norm or biases (FixMatch's CIFAR-10 value)"""
    log_every: int = common.arg(50, at_least=1)
    """steps between log lines"""


# Per-data-set departures: the paper's N and head epochs for CIFAR-100-20 and STL-10, its ratio
# 0.9 for STL-10 and the ImageNet subsets (image folders too); `shapes`: small, for a CPU.
DATASET_DEFAULTS = {
    "cifar100-20": {"self_batch": 10000, "self_epochs": 100},
    "stl10": {"image_size": 96, "self_epochs": 100, "consistency_ratio": 0.9},
    "imagefolder": {"consistency_ratio": 0.9},
    "shapes": {  # Deviation: our synthetic set, with networks and schedules for a CPU
        "backbone_width": 8,
        "image_size": 16,
        "moco_epochs": 32,
        "moco_lr": 0.06,
        "moco_momentum": 0.99,
        "moco_queue": 2048,
        "self_batch": 1000,
        "semi_steps": 800,
        "semi_batch_size": 32,
        "semi_mu": 3,
        "semi_depth": 10,
        "semi_widen_factor": 1,
        "semi_bn_momentum": 0.1,
        "ema_decay": 0.99,
        "eval_every": 200,
        "log_every": 20,
        "consistency_ratio": 0.9,
        "confidence": 0.95,
    },
}


# SPICE-Self's schedule in draws of N images: the official CIFAR-10 run makes 30 epochs x
# (50,000 / 5,000) = 300 (configs/cifar10/spice_self.py). A smaller data set makes fewer draws an
# epoch, so its default epochs grow until it makes as many prototype rounds; a larger one keeps
# the official 30 epochs.
# Deviation: at least about 300 draws on any data set (official: 30 epochs, however many draws).
SELF_DRAWS = 300
SELF_EPOCHS = 30
# The paper's k = 100 neighbours are 2% of a CIFAR-10 cluster (5,000 images) and 7.7% of an STL-10
# one (1,300). A cluster with fewer than ratio x k images can never be reliable, so k is capped at
# this share of the expected cluster size N / K: small data sets keep a k their clusters can pass.
# Deviation: the cap (official: k = 100 at any size).
NEIGHBOUR_SHARE = 0.1


# --------------------------------------------------------------------------------------------------
# The paper's pieces: stage 1, MoCo v2
# --------------------------------------------------------------------------------------------------
class MocoQueue:
    """The last `size` keys (size, dim), the negatives of `moco_loss`; at first random ones."""

    def __init__(self, size: int, dim: int, device=None):
        self.keys = F.normalize(torch.randn(size, dim, device=device), dim=1)
        self.ptr = 0

    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest len(keys) entries, wrapping around the end."""
        idx = (self.ptr + torch.arange(len(keys), device=self.keys.device)) % len(self.keys)
        self.keys[idx] = keys.detach().to(self.keys.dtype)
        self.ptr = (self.ptr + len(keys)) % len(self.keys)


def moco_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE (MoCo Eq. 1): logits [q.k+, q.queue] / T, cross-entropy towards index 0. Returns the
    loss and the share of queries whose own key scores highest."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), (logits.argmax(1) == 0).float().mean()


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, encoder: nn.Module, momentum: float = 0.999) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q; the key encoder keeps its batch-norm statistics."""
    for pk, pq in zip(key_encoder.parameters(), encoder.parameters(), strict=True):
        pk.lerp_(pq.detach(), 1 - momentum)


def grouped_forward(encoder: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """The encoder on consecutive chunks: batch-norm statistics per chunk, as per GPU."""
    return torch.cat([encoder(chunk) for chunk in x.chunk(groups)])


def shuffled_key_forward(
    key_encoder: nn.Module, x: torch.Tensor, groups: int, generator=None
) -> torch.Tensor:
    """Shuffle-BN on one device: shuffle the key batch, run it in groups (statistics per group,
    each group a random mix of the query groups' images), restore the original order."""
    # Deviation: shuffle-BN by groups on one device (the official code shuffles across GPUs).
    perm = torch.randperm(len(x), generator=generator, device=x.device)
    return grouped_forward(key_encoder, x[perm], groups)[perm.argsort()]


def distributed_key_forward(
    key_encoder: nn.Module, x: torch.Tensor, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN across the processes under torchrun (the official `_batch_shuffle_ddp` and
    `_batch_unshuffle_ddp`): gather every process's key images (B, 3, H, W), shuffle them by rank
    0's permutation, run the key encoder on this process's share of the shuffled batch (batch
    norm over a random mix of every process's images), gather the keys and undo the shuffle.
    Returns this process's keys (B / processes, dim) and the whole batch's (B, dim), for the
    queue. In one process: the key encoder on the whole batch, one group, and its keys twice."""
    everyone = common.gather(x)  # (B, 3, H, W), in rank order: process r's share is slice r
    perm = torch.randperm(len(everyone), generator=generator, device=x.device)
    common.broadcast_(perm)  # rank 0's shuffle in every process
    keys = common.gather(key_encoder(everyone[common.share(perm)]))[perm.argsort()]  # (B, dim)
    return keys.chunk(common.world_size())[common.rank()], keys


def moco_augment(images: torch.Tensor, generator=None) -> torch.Tensor:
    """MoCo v2's view: random resized crop (scale 0.2-1) + flip, colour jitter (0.4, 0.4, 0.4,
    0.1) with p = 0.8, grayscale p = 0.2, Gaussian blur sigma 0.1-2 with p = 0.5."""
    boxes, flip = common.draw_crops(
        len(images), scale=(0.2, 1.0), generator=generator, device=images.device
    )
    x = common.resized_crop(images, boxes, flip, images.shape[-2:])
    return common.photometric_augment(x, generator=generator)


# --------------------------------------------------------------------------------------------------
# The paper's pieces: stage 2, SPICE-Self
# --------------------------------------------------------------------------------------------------
def prototype_pseudo_labels(
    probs: torch.Tensor, embedding: torch.Tensor, center_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5 for one head: probs (N, K), embedding (N, d) L2-normalised. The top images are taken
    per column (one may serve several prototypes) and per prototype, not by argmax per image (one
    picked twice is listed twice, once per label). Returns (indices, labels), K x (N // K) long."""
    n, k = probs.shape
    per_cluster = n // k
    centres = prototypes(probs, embedding, center_ratio)
    picked = (embedding @ centres.T).topk(per_cluster, dim=0).indices  # (N / K, K)
    labels = torch.arange(k, device=probs.device).repeat_interleave(per_cluster)
    return picked.T.reshape(-1), labels


def prototypes(probs: torch.Tensor, embedding: torch.Tensor, center_ratio: float = 0.5):
    """The K prototypes of step 5 (K, d): the mean embedding of the center_ratio x N / K images
    with the highest probability in each column of probs (N, K), not re-normalised."""
    n, k = probs.shape
    top = probs.topk(max(1, int(center_ratio * (n // k))), dim=0).indices  # (M, K)
    return embedding[top].mean(0)  # (M, K, d) -> (K, d)


@torch.no_grad()
def head_diagnostics(probs: torch.Tensor, embedding: torch.Tensor, picked: torch.Tensor) -> dict:
    """Label-free signs of a head stuck with two prototypes on one cluster (README: SPICE), for
    one head's probs (N, K) and its picks (`prototype_pseudo_labels`' indices): the share of
    distinct images among the picks (below 1: images carry two labels), the smallest and the
    largest predicted cluster's share of the draw, and the largest cosine between two
    prototypes (near 1: two prototypes on one cluster)."""
    k = probs.shape[1]
    centres = F.normalize(prototypes(probs, embedding), dim=1)
    cosines = centres @ centres.T - 2 * torch.eye(k, device=probs.device)  # no self-pairs
    shares = torch.bincount(probs.argmax(1), minlength=k).float() / len(probs)
    return {
        "distinct": picked.unique().numel() / picked.numel(),
        "cluster_share_min": float(shares.min()),
        "cluster_share_max": float(shares.max()),
        "prototype_cos_max": float(cosines.max()),
    }


def head_loss(
    logits: torch.Tensor, labels: torch.Tensor, double_softmax: bool = True
) -> torch.Tensor:
    """Cross-entropy against the pseudo-labels. The official heads end in a softmax and the loss
    applies another one to those probabilities ("double softmax", the default here)."""
    logits = logits.float()
    return F.cross_entropy(logits.softmax(-1) if double_softmax else logits, labels)


def select_head(
    logits: torch.Tensor, embedding: torch.Tensor, double_softmax: bool = True
) -> tuple[int, torch.Tensor]:
    """Step 7 on the heads' logits (heads, N, K) over the whole split; returns (best, losses)."""
    losses = []
    for head_logits in logits:
        idx, labels = prototype_pseudo_labels(head_logits.softmax(-1), embedding)
        losses.append(head_loss(head_logits[idx], labels, double_softmax))
    losses = torch.stack(losses)
    return int(losses.argmin()), losses  # Deviation: no labels (official: the ground truth)


def scan_strong_augment(images: torch.Tensor, mean, generator=None) -> torch.Tensor:
    """SPICE-Self's strong view, the official one (`aug_type="scan"` in configs/cifar10/
    spice_self.py, built in spice/data/transformations.py): flip, RandomCrop to the image's own
    size (no padding: nothing), 4 ops of SCAN's table always applied (variant "scan"), and a
    Cutout of side 2 floor(L / 2), L uniform in 1..half the side, in the data set's `mean`
    colour (0 after the normalisation, as the official)."""
    x = common.weak_augment(images, translate=0.0, generator=generator)  # the flip alone
    x = common.randaugment(x, num_ops=4, prob=1.0, generator=generator, variant="scan")
    half = images.shape[-1] // 2  # the official 16 at 32 px
    # Deviation: both strong views cut out in the data set's mean colour (official: SPICE-Self 0
    # after its normalisation, SPICE-Semi (125, 123, 114)).
    return common.cutout(x, half, generator=generator, fill=mean, scan_sides=True)


def train_heads(
    heads: Heads,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    targets: list,
    passes: int = 8,
    double_softmax: bool = True,
    generator=None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Step 6: `passes` shuffled passes of mini-batches over each head's (index, label) pairs,
    features (N, d) of the strong views; the heads' losses are summed (each head owns its
    parameters, so Adam trains them independently). Returns the mean loss per head."""
    total = torch.zeros(len(targets), device=features.device)
    steps = 0
    for _ in range(passes):
        order = torch.randperm(len(targets[0][0]), generator=generator, device=generator.device)
        order = order.to(features.device)
        for b in range(0, len(order), batch_size):
            pos = order[b : b + batch_size]
            losses = []
            for head, (idx, labels) in zip(heads.heads, targets, strict=True):
                losses.append(head_loss(head(features[idx[pos]]), labels[pos], double_softmax))
            losses = torch.stack(losses)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            # Under torchrun every process trains the heads on the same whole draw: averaging
            # their equal gradients changes nothing, and keeps the heads equal come what may.
            common.synchronize(heads)
            optimizer.step()
            total = total + losses.detach()
            steps += 1
    return total / steps


# --------------------------------------------------------------------------------------------------
# The paper's pieces: stage 3, SPICE-Semi
# --------------------------------------------------------------------------------------------------
def semi_strong_augment(images: torch.Tensor, mean, generator=None) -> torch.Tensor:
    """SPICE-Semi's strong view, the official one (fixmatch/datasets/dataset_robust.py inserts
    RandAugment(3) before the weak transform): 3 ops always applied (variant "spice-semi"), a
    Cutout of side U[0, 0.5) x the image's in the data set's `mean` colour (the official fills
    (125, 123, 114), CIFAR-10's), then the weak view (flip, translation by up to 1/8)."""
    x = common.randaugment(images, num_ops=3, prob=1.0, generator=generator, variant="spice-semi")
    x = common.cutout(x, images.shape[-1] / 2, random_size=True, generator=generator, fill=mean)
    # Deviation: the translation pads by reflection (official: RandomCrop(32, padding=4), zeros).
    return common.weak_augment(x, generator=generator)


@torch.no_grad()
def knn_indices(embedding: torch.Tensor, k: int = 100, chunk: int = 1024) -> torch.Tensor:
    """The k most cosine-similar rows of each row of the L2-normalised embedding (itself
    included), in chunks of rows: (N, k) without an N x N matrix."""
    rows = []
    for i in range(0, len(embedding), chunk):
        rows.append((embedding[i : i + chunk] @ embedding.T).topk(k, dim=1).indices)
    return torch.cat(rows)


def reliable_mask(
    preds: torch.Tensor,
    confidence: torch.Tensor,
    neighbours: torch.Tensor,
    ratio: float = 0.99,
    threshold: float = 0.99,
) -> torch.Tensor:
    """Step 8's test (N,) bool: `ratio` x k of an image's k neighbours (itself among them) share
    its predicted cluster, and its confidence exceeds `threshold`."""
    agree = (preds[neighbours] == preds[:, None]).sum(1)
    return (agree >= math.ceil(ratio * neighbours.shape[1] - 1e-6)) & (confidence > threshold)


def neighbour_count(k: int, n: int, num_clusters: int) -> int:
    """--num-neighbours, capped at NEIGHBOUR_SHARE of the expected cluster size n / K (at least
    1)."""
    return max(1, min(k, int(NEIGHBOUR_SHARE * n / num_clusters), n))


def reliable_samples(
    preds: torch.Tensor,
    confidence: torch.Tensor,
    neighbours: torch.Tensor,
    num_clusters: int,
    ratio: float = 0.99,
    threshold: float = 0.99,
    generator=None,
) -> torch.Tensor:
    """Step 8: the indices of the reliable images (`reliable_mask`), balanced by random subsets
    to the smallest cluster's count."""
    reliable = reliable_mask(preds, confidence, neighbours, ratio, threshold)
    counts = torch.bincount(preds[reliable], minlength=num_clusters)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).squeeze(1).tolist()
        sizes = torch.bincount(preds, minlength=num_clusters)[empty].tolist()
        k = neighbours.shape[1]
        raise common.ConfigError(
            f"no reliable image in cluster(s) {empty} (predicted sizes {sizes}; "
            f"{int(reliable.sum())} reliable in all, {counts.tolist()} per cluster): lower "
            f"--consistency-ratio (now {ratio}), --confidence (now {threshold}) or "
            f"--num-neighbours (k = {k} here), or train the earlier stages longer (self.pt is "
            f"kept: --stage semi --init-from it)"
        )
    n_min = int(counts.min())
    keep = []
    for c in range(num_clusters):
        members = torch.nonzero(reliable & (preds == c)).squeeze(1)
        chosen = torch.randperm(len(members), generator=generator)[:n_min]
        keep.append(members[chosen.to(members.device)])
    return torch.cat(keep)


def fixmatch_loss(
    logits_x: torch.Tensor,
    targets_x: torch.Tensor,
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    threshold: float = 0.95,
    lambda_u: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FixMatch objective, Eq. 2-4: l_s + lambda_u l_u with
    l_s = mean cross-entropy of the labelled batch (B, C),
    l_u = (1 / mu B) sum_b 1[max q_b >= tau] CE(argmax q_b, strong logits_b), q_b = softmax of the
    weak logits (no gradient, hard labels, no temperature). Returns the total, l_s, l_u, the mask
    (mu B,) and the pseudo-labels (mu B,)."""
    loss_s = F.cross_entropy(logits_x.float(), targets_x)
    confidence, pseudo = torch.softmax(logits_weak.detach().float(), dim=1).max(1)
    mask = (confidence >= threshold).float()
    per_image = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")
    loss_u = (per_image * mask).mean()  # divided by all mu B images, confident or not
    return loss_s + lambda_u * loss_u, loss_s, loss_u, mask, pseudo


def cosine_lr(step: int, total_steps: int, lr: float) -> float:
    """eta cos(7 pi k / 16 K): no warm-up; ends at eta cos(7 pi / 16), about 0.2 eta."""
    return lr * math.cos(7 * math.pi * step / (16 * total_steps))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of convolutions and linear layers (tensors of 2+ dimensions),
    none on batch-norm parameters and biases, as the official code groups them."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) model for the parameters; the batch-norm buffers (running
    statistics) are copied from the trained network: a port that forgot them stalled near 93% at
    4000 CIFAR-10 labels (method note)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


# --------------------------------------------------------------------------------------------------
# The networks: CIFAR ResNet-18 and MoCo's projector (stage 1), heads (stage 2), WRN-28-2 (stage 3)
# --------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet's basic block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the input (through a 1x1
    convolution and BN where the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 convolution, stride 1, no max-pool); widths w, 2w, 4w,
    8w; returns the globally average-pooled 8w-d feature (512-d for w = 64)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, c_in = [], width
        for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2  # stages 2-4 halve the resolution
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # (N, 3, H, W) -> (N, 8w)
        return self.layers(self.stem(x)).mean((2, 3))


class MoCo(nn.Module):
    """Backbone -> projector MLP (d -> d -> ReLU -> 128), L2-normalised (MoCo v2)."""

    def __init__(self, width: int = 64, dim: int = 128):
        super().__init__()
        self.backbone = ResNet18(width)
        d = 8 * width
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, dim))

    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)


class Heads(nn.Module):
    """SPICE-Self's independent clustering heads, each Linear(d, d) -> ReLU -> Linear(d, K)."""

    def __init__(self, num_heads: int, dim: int, num_clusters: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_clusters))
            for _ in range(num_heads)
        )

    def forward(self, features):  # (N, d) -> logits (num_heads, N, K)
        return torch.stack([head(features) for head in self.heads])


class WideBlock(nn.Module):
    """Pre-activation residual block: BN -> LeakyReLU(0.1) -> conv3x3 -> BN -> LeakyReLU -> conv3x3,
    plus the input, through a 1x1 convolution where the shape changes. The first block of the
    network passes the activated input to its shortcut (`activate_before_residual`)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        activate_before_residual: bool = False,
        bn_momentum: float = 0.001,
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        out = F.leaky_relu(self.bn1(x), 0.1)
        if self.activate_before_residual:
            x = out
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(out)), 0.1))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return out + x


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: a 16-channel 3x3 stem, three stages of (depth - 4) / 6 blocks of
    widths 16k, 32k, 64k (stride 2 entering stages 2 and 3), BN, LeakyReLU, global average pool,
    linear. No dropout. WRN-28-2 has 1.47 M parameters with 10 classes."""

    def __init__(
        self, num_classes: int, depth: int = 28, widen_factor: int = 2, bn_momentum: float = 0.001
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WideResNet has depth 6 n + 4 (10, 16, 22, 28, ...), not {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, c_in = [], 16
        for stage, c_out in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1  # stages 2 and 3 halve the resolution
                first = stage == 0 and i == 0
                blocks.append(WideBlock(c_in, c_out, stride, first, bn_momentum))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in, momentum=bn_momentum)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # He (fan-out) for convolutions, Xavier for the classifier
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (N, 3, H, W) normalised -> (N, num_classes) logits
        x = F.leaky_relu(self.bn(self.blocks(self.stem(x))), 0.1)
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------------------------------
# Data: whole data sets on the device as uint8 tensors, the hand-over files, the batch draws
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    """The images (N, 3, H, W) uint8 and labels (N,) of a run, on the device."""

    images: torch.Tensor  # what is clustered: the training split (--protocol all: + test)
    labels: torch.Tensor
    eval_images: torch.Tensor  # what is scored: the test split (--protocol all: the same tensors)
    eval_labels: torch.Tensor
    pretrain: torch.Tensor  # MoCo's images (STL-10: plus its 100,000 unlabelled ones)
    num_classes: int


def load_data(args: Args, device: torch.device) -> Data:
    """The data set on the device, checked against the arguments."""
    options = dict(data_dir=args.data_dir, download=args.download, image_size=args.image_size)
    train_set = common.load_dataset(args.dataset, "train", **options)
    test_set = common.load_dataset(args.dataset, "test", **options)
    images, labels = train_set.images, train_set.labels.to(device)  # what is clustered
    eval_images, eval_labels = test_set.images, test_set.labels.to(device)
    if args.protocol == "all":  # the paper's main table: cluster and evaluate train + test
        images, labels = torch.cat([images, eval_images]), torch.cat([labels, eval_labels])
    # On the device whole, or kept on the CPU (--memmap): batches are gathered (`common.take`).
    images = common.place_images(images, device, args.memmap, "clustered")
    if args.protocol == "all":
        eval_images, eval_labels = images, labels  # aliases, no copies
    else:
        eval_images = common.place_images(eval_images, device, args.memmap, "evaluation")
    pretrain = images  # MoCo's images; STL-10 adds its 100,000 unlabelled ones, made for this
    # Deviation: STL-10: MoCo on train + unlabeled, stage 3 on WRN-28-2 (FixMatch's: WRN-37-2)
    if args.dataset == "stl10":
        unlabeled = common.load_dataset("stl10", "unlabeled", **options)
        everything = torch.cat([images.cpu(), unlabeled.images])
        pretrain = common.place_images(everything, device, args.memmap, "MoCo's")
    num_clusters = args.num_clusters or train_set.num_classes
    if not 2 <= num_clusters <= min(len(images), args.self_batch):
        raise common.ConfigError(
            f"--num-clusters {num_clusters}: need 2 to min(images {len(images)}, "
            f"--self-batch {args.self_batch}) clusters"
        )
    if not 1 <= args.bn_groups <= args.batch_size <= len(pretrain):
        raise common.ConfigError(
            f"need 1 <= --bn-groups ({args.bn_groups}) <= --batch-size ({args.batch_size}) <= "
            f"the {len(pretrain)} training images"
        )
    return Data(images, labels, eval_images, eval_labels, pretrain, train_set.num_classes)


def load_handover(args: Args) -> dict:
    """The previous stage's file for --stage self / semi, checked against this run's settings."""
    wanted = {"self": "moco.pt", "semi": "self.pt"}[args.stage]
    path = Path(args.init_from)
    if path.is_dir():
        path = path / wanted
    if not path.is_file():
        raise common.ConfigError(
            f"--init-from {args.init_from}: no {wanted} there; --stage {args.stage} starts from "
            f"the {wanted} that an earlier run's previous stage wrote into its --out-dir"
        )
    state = common.load_checkpoint(path)
    if state.get("stage") != wanted.removesuffix(".pt"):
        raise common.ConfigError(
            f"--init-from {path} is a {state.get('stage')!r} hand-over; --stage {args.stage} "
            f"needs {wanted}"
        )
    for key in ("dataset", "protocol", "backbone_width", "image_size", "num_clusters"):
        if state["args"][key] != getattr(args, key):
            raise common.ConfigError(
                f"--init-from {path} was made with --{key.replace('_', '-')} "
                f"{state['args'][key]}, this run has {getattr(args, key)}: pass the same value"
            )
    return state


def uniform_indices(n: int, batch_size: int, step: int, seed: int, device) -> torch.Tensor:
    """Uniform indices (with replacement), a function of the step: a resumed run redraws them."""
    # Deviation: SPICE-Semi draws uniform batches per step (exact resume), not shuffled epochs.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (batch_size,), generator=generator).to(device)


def augment_stream(shared: torch.Generator, seed: int) -> torch.Generator:
    """The generator of this process's augmentations in an epoch whose `shared` generator (seeded
    `seed`) draws the order: `shared` itself in one process, as ever; under torchrun, one of this
    process's own (`common.rank_generator`), so that the processes' shares are augmented
    differently while `shared` goes on drawing alike in all of them."""
    if common.world_size() == 1:
        return shared
    return common.rank_generator(seed + 1, shared.device)  # + 1: not the order's own stream


# --------------------------------------------------------------------------------------------------
# Evaluation: ACC, NMI and ARI of the clusters on the evaluated split
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def network_outputs(
    model: nn.Module, images: torch.Tensor, stats, amp: bool = False, batch_size: int = 512
) -> torch.Tensor:
    """`model`'s outputs in eval mode for uint8 images (N, 3, H, W), without augmentation, in
    their order: (N, ...) float, e.g. a backbone's (N, d) features. The images may be kept on
    the CPU (a memory-mapped folder): each batch goes to the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = common.normalize(images[i : i + batch_size].to(device), *stats)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out.append(model(x).float())
    outputs = torch.cat(out)
    assert len(outputs) == len(images), "one row per image, in order"
    return outputs


def clusters_of(
    model: nn.Module, images: torch.Tensor, run: Run
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster and confidence of every image under a classifier in eval mode."""
    confidence, preds = network_outputs(model, images, run.stats, run.amp).softmax(1).max(1)
    return preds, confidence


def scores(labels: torch.Tensor, preds: torch.Tensor, prefix: str = "") -> dict:
    """ACC (Hungarian), NMI with the geometric normalisation (the official code's), ARI."""
    return {
        f"{prefix}acc": common.cluster_accuracy(labels, preds),
        f"{prefix}nmi": common.nmi(labels, preds, average="geometric"),
        f"{prefix}ari": common.ari(labels, preds),
    }


def evaluate(model: nn.Module, data: Data, run: Run, prefix: str = "", picture=None) -> dict:
    """The `scores` of a classifier's clusters (`clusters_of`) on the evaluated split, keys after
    `prefix`, with many-to-one accuracy where K is not the number of classes and two label-free
    figures (the size balance of the clusters, the mean confidence); with `picture` (a file in
    the run folder), each cluster's most confident images."""
    images = data.eval_images
    preds, confidence = clusters_of(model, images, run)
    if picture:
        path = run.book.out / picture
        common.save_cluster_grid(path, images, preds, confidence, num_clusters=run.num_clusters)
    figures = scores(data.eval_labels, preds, prefix)
    if run.num_clusters != data.num_classes:
        figures[f"{prefix}majority_acc"] = common.majority_accuracy(data.eval_labels, preds)
    figures[f"{prefix}size_balance"] = common.size_balance(preds, run.num_clusters)
    figures[f"{prefix}mean_confidence"] = float(confidence.mean())
    return figures


def predict(args: Args) -> dict:
    """--predict FOLDER: the finished run in --out-dir clusters every image under FOLDER, read at
    its image size, with the model it evaluated last (SPICE-Semi's final EMA network, or
    SPICE-Self's selected head on the backbone where stage 3 did not run), into
    <out-dir>/predictions (a CSV and a picture)."""
    out_dir = Path(args.out_dir)
    run_args, state = common.finished_run(out_dir, Args)
    device = common.select_device(args.device)
    info = common.dataset_info(run_args.dataset, "classify")
    k = run_args.num_clusters
    if state.get("stage") == "semi":
        model = WideResNet(
            k, run_args.semi_depth, run_args.semi_widen_factor, run_args.semi_bn_momentum
        )
        model.load_state_dict(state["ema"])
    elif (out_dir / "self.pt").exists():
        handover = common.load_checkpoint(out_dir / "self.pt")
        backbone = ResNet18(run_args.backbone_width)
        backbone.load_state_dict(handover["backbone"])
        head = Heads(1, backbone.dim, k).heads[0]
        head.load_state_dict(handover["head"])
        model = nn.Sequential(backbone, head)
    else:
        raise common.ConfigError(
            f"--predict: the run in {out_dir} made no clusters (a MoCo stage alone): predict with "
            f"a run that reached SPICE-Self"
        )
    run = Run(None, device, (info.mean, info.std), False, k)
    out = common.predictions_dir(out_dir, args.overwrite)
    paths, images = common.read_new_images(args.predict, run_args.image_size)
    images = torch.stack(images).to(device)
    preds, confidence = clusters_of(model.to(device), images, run)
    return common.write_class_predictions(out, paths, images, preds, confidence, num_clusters=k)


# --------------------------------------------------------------------------------------------------
# Training: one function per stage, each ending in a hand-over file (moco.pt, self.pt)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What every stage needs besides the arguments: the bookkeeping (`common.RunBook`: timing,
    log, checkpoint and resume state), the device, the data set's statistics, autocast, K."""

    book: common.RunBook
    device: torch.device
    stats: tuple  # the data set's channel mean and std (ImageNet's for image folders)
    amp: bool  # bfloat16 autocast (CUDA only)
    num_clusters: int

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised floats (channels-last on CUDA)."""
        x = common.normalize(images, *self.stats)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device (channels-last on CUDA)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.device.type == "cuda" else model

    def resume(self, stage: str, parts: dict) -> dict:
        """The checkpoint when resuming in `stage` (else {}), `parts` restored from it by key."""
        state = self.book.checkpoint if self.book.checkpoint.get("stage") == stage else {}
        if state:
            for name, part in parts.items():
                part.load_state_dict(state[name])
        return state

    def save(self, stage: str, parts: dict, **progress) -> None:
        """The stage's checkpoint: the state dicts of `parts` (modules, optimizers), `progress`."""
        states = {name: part.state_dict() for name, part in parts.items()}
        self.book.save({"stage": stage, **states, **progress})


def start_run(args: Args) -> tuple[Args, Run, Data, dict]:
    """The checked arguments (K filled in), the run, its data, the hand-over file (stage 1: {})."""
    if (args.semi_depth - 4) % 6:
        raise common.ConfigError(
            f"--semi-depth {args.semi_depth}: a WideResNet has depth 6 n + 4 (10, 16, 22, 28, ...)"
        )
    if (args.init_from is None) == (args.stage in ("self", "semi")):
        raise common.ConfigError(
            "--init-from goes with --stage self (moco.pt) or --stage semi (self.pt), and only "
            f"with them (here: --stage {args.stage}, --init-from {args.init_from})"
        )
    device = common.start_processes(args.device)  # under torchrun, this process's device
    common.set_seed(args.seed)
    info = common.dataset_info(args.dataset, "classify")
    data = load_data(args, device)
    # Every batch is the global one, shared among the processes (SPICE-Self's N: its draw).
    b = args.semi_batch_size
    common.check_batches(
        {
            "--batch-size": args.batch_size,
            "--self-batch (or the images, if fewer)": min(args.self_batch, len(data.images)),
            "--semi-batch-size": b,
            "--semi-mu x --semi-batch-size": args.semi_mu * b,
        }
    )
    args = dataclasses.replace(args, num_clusters=args.num_clusters or data.num_classes)
    handover = load_handover(args) if args.init_from else {}
    out = common.prepare_out_dir(args.out_dir, args.resume, args)
    print(
        f"spice: {args.dataset} on {device}, stage {args.stage}, protocol {args.protocol}: "
        f"{len(data.images)} images into {args.num_clusters} clusters, evaluated on "
        f"{len(data.eval_images)}",
        flush=True,
    )
    # The totals: the checkpoint's when resuming, else the hand-over file's, else none.
    book = common.RunBook(out, args, device, totals=handover.get("totals"))
    amp = args.amp and device.type == "cuda"
    return args, Run(book, device, (info.mean, info.std), amp, args.num_clusters), data, handover


def train_moco(args: Args, run: Run, images: torch.Tensor, data: Data | None = None) -> dict:
    """Stage 1 (steps 1-2) on uint8 `images`; returns the backbone's weights. With `data`, a
    tenth of the way through and at the end, the kNN accuracy of the embedding is logged: a
    diagnostic against the true labels (`oracle/moco_knn_acc`) that chooses nothing."""
    torch.manual_seed(args.seed)  # every stage seeds itself: a stage run alone repeats the same run
    model = run.place(MoCo(args.backbone_width))
    key_encoder = copy.deepcopy(model).requires_grad_(False)
    n = len(images)
    steps = n // args.batch_size  # the last partial batch is dropped
    queue_size = args.moco_queue if n >= 2 * args.moco_queue else n // 2
    if queue_size != args.moco_queue:  # else every image meets its own stale keys as negatives
        print(f"moco: queue capped at {queue_size} keys, half the {n} images", flush=True)
    queue = MocoQueue(queue_size, 128, run.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.moco_lr, momentum=0.9, weight_decay=args.moco_weight_decay
    )
    forward = torch.compile(model) if args.compile else model
    parts = {"model": model, "key_encoder": key_encoder, "optimizer": optimizer}
    state = run.resume("moco", parts)
    if state:
        queue.keys = state["queue"]
        queue.ptr = state["queue_ptr"]
    start = state.get("epoch", 0)
    one_process = common.world_size() == 1
    # batch-norm groups: --bn-groups in one process; under torchrun, each process is one group
    groups = args.bn_groups if one_process else 1
    run.book.start_log(total=args.moco_epochs, start=start)
    for epoch in range(start, args.moco_epochs):
        lr = args.moco_lr * 0.5 * (1 + math.cos(math.pi * epoch / args.moco_epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed = args.seed * 1_000_003 + epoch
        order_rng = torch.Generator(run.device).manual_seed(seed)
        order = torch.randperm(n, generator=order_rng, device=run.device)  # alike in every process
        rng = augment_stream(order_rng, seed)
        model.train()
        key_encoder.train()
        losses, accs = [], []
        for b in range(steps):
            with run.book.timed(images=2 * args.batch_size):  # the global batch's images
                batch = common.share(order[b * args.batch_size : (b + 1) * args.batch_size])
                x = common.take(images, batch, run.device)
                x_q = run.inputs(moco_augment(x, rng))  # step 1: two views
                x_k = run.inputs(moco_augment(x, rng))
                with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
                    q = grouped_forward(forward, x_q, groups)
                    with torch.no_grad():
                        momentum_update(key_encoder, model, args.moco_momentum)
                        if one_process:
                            k = all_keys = shuffled_key_forward(key_encoder, x_k, groups, rng)
                        else:
                            k, all_keys = distributed_key_forward(key_encoder, x_k, rng)
                loss, acc = moco_loss(q.float(), k.float(), queue.keys, args.moco_temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # Under torchrun: the gradient averaged over the processes, and rank 0's batch-norm
                # statistics in both encoders, so that every process holds the same networks.
                # Deviation: the key encoder's statistics are rank 0's in every process (official:
                # each GPU keeps its own; they are never used, keys are computed in train mode).
                common.synchronize(model, key_encoder)
                optimizer.step()
                queue.enqueue(all_keys)  # every process's keys: the queue is alike in all of them
            losses.append(loss.detach())
            accs.append(acc)
            if (b + 1) % args.log_every == 0 or b + 1 == steps:
                metrics = {
                    "moco/loss": torch.stack(losses).mean(),
                    "moco/instance_acc": torch.stack(accs).mean(),
                    "moco/lr": lr,
                }
                run.book.log(epoch + (b + 1) / steps, metrics)
                losses, accs = [], []
        every = max(1, args.moco_epochs // 10)
        if data is not None and ((epoch + 1) % every == 0 or epoch + 1 == args.moco_epochs):
            knn = moco_knn_accuracy(model.backbone, data, run)
            run.book.log(epoch + 1, {"oracle/moco_knn_acc": knn})
        if run.book.save_due(epoch + 1 == args.moco_epochs):  # at epoch ends (resumable), the last
            run.save("moco", parts, epoch=epoch + 1, queue=queue.keys, queue_ptr=queue.ptr)
    return model.backbone.state_dict()


def moco_knn_accuracy(backbone: nn.Module, data: Data, run: Run) -> float:
    """Weighted kNN accuracy (k = 20, T = 0.07) of the evaluated split's embedding against the
    training split's labels: how much class structure stage 1 has learned so far."""
    train = F.normalize(network_outputs(backbone, data.images, run.stats, run.amp), dim=1)
    test = F.normalize(network_outputs(backbone, data.eval_images, run.stats, run.amp), dim=1)
    return common.knn_accuracy(train, data.labels, test, data.eval_labels, k=20)


def kmeans_baseline(args: Args, run: Run, backbone: nn.Module, data: Data) -> dict:
    """k-means with K clusters on the stage-1 embedding of the training images, applied to the
    evaluated split's embedding: the baseline that SPICE-Self must beat."""
    train_features = network_outputs(backbone, data.images, run.stats, run.amp)
    train_embedding = F.normalize(train_features, dim=1)
    eval_embedding = train_embedding
    if data.eval_images is not data.images:
        eval_features = network_outputs(backbone, data.eval_images, run.stats, run.amp)
        eval_embedding = F.normalize(eval_features, dim=1)
    centroids, _ = common.kmeans(train_embedding, args.num_clusters, seed=args.seed)
    preds = common.assign_to_centroids(eval_embedding, centroids)
    return scores(data.eval_labels, preds, "kmeans_")


def self_schedule(n: int, args: Args) -> tuple[int, int, int]:
    """SPICE-Self's draw size N (--self-batch, at most the n images), draws per epoch and epochs:
    --self-epochs, or the official SELF_EPOCHS, more where that makes fewer than SELF_DRAWS."""
    size = min(args.self_batch, n)
    if size < args.self_batch:
        note = f"self: N = {size}, all the images (fewer than --self-batch {args.self_batch})"
        print(note, flush=True)
    draws = n // size
    epochs = args.self_epochs or max(SELF_EPOCHS, math.ceil(SELF_DRAWS / draws))
    if args.self_epochs is None:
        print(f"self: {epochs} epochs of {draws} draws (about {SELF_DRAWS} draws)", flush=True)
    return size, draws, epochs


def train_self(args: Args, run: Run, backbone: nn.Module, data: Data) -> tuple[nn.Module, dict]:
    """Stage 2 (steps 4-7) on the frozen backbone; returns the selected head and its figures."""
    images = data.images
    torch.manual_seed(args.seed + 1)
    backbone.eval().requires_grad_(False)  # Deviation: eval mode (official: train, BN drifts)
    features = network_outputs(backbone, images, run.stats, run.amp)  # (n, d), for selection
    common.broadcast_(features)  # under torchrun: rank 0's, it decides the labels and the head
    embedding = F.normalize(features, dim=1)  # prototypes and similarities live here
    heads = Heads(args.num_heads, backbone.dim, args.num_clusters).to(run.device)
    optimizer = torch.optim.Adam(heads.parameters(), lr=args.self_lr)
    n = len(images)
    size, draws, epochs = self_schedule(n, args)
    parts = {"heads": heads, "optimizer": optimizer}
    state = run.resume("self", parts)
    start = state.get("epoch", 0)
    # the head of lowest selection loss over all epochs so far, and its weights then (official:
    # checkpoint_select.pth.tar in tools/train_self_v2.py)
    best = state.get("best", 0)
    best_loss = state.get("best_loss", math.inf)
    best_weights = state.get("best_weights")
    run.book.start_log(total=epochs, start=start)
    for epoch in range(start, epochs):
        seed = args.seed * 1_000_003 + 500_000 + epoch
        rng = torch.Generator(run.device).manual_seed(seed)  # alike in every process
        order = torch.randperm(n, generator=rng, device=run.device)
        augment_rng = augment_stream(rng, seed)
        for d in range(draws):
            with run.book.timed(images=2 * size):  # the global draw's images
                draw = order[d * size : (d + 1) * size]
                # Under torchrun, each process runs the backbone on its share of the draw's views
                # and gathers the features: the heads then see the whole draw in every process.
                mine = common.take(images, common.share(draw), run.device)
                weak_views = common.weak_augment(mine, generator=augment_rng)
                weak = network_outputs(backbone, weak_views, run.stats, run.amp)  # (N, d)
                strong_views = scan_strong_augment(mine, run.stats[0], generator=augment_rng)
                strong = network_outputs(backbone, strong_views, run.stats, run.amp)
                weak, strong = common.gather(weak), common.gather(strong)
                with torch.no_grad():
                    probs = heads(weak).softmax(-1)  # step 4: (heads, N, K)
                targets = [prototype_pseudo_labels(p, embedding[draw]) for p in probs]  # step 5
                for idx, _ in targets:  # under torchrun: rank 0's picks, in every process
                    common.broadcast_(idx)
                losses = train_heads(  # step 6
                    heads, optimizer, strong, targets, args.self_passes, args.double_softmax, rng
                )
            metrics = {"self/loss": losses.mean(), "self/loss_min": losses.min()}
            # the heads' means of `head_diagnostics`: label-free signs of a stuck head
            diagnostics = [
                head_diagnostics(p, embedding[draw], idx)
                for p, (idx, _) in zip(probs, targets, strict=True)
            ]
            for key in diagnostics[0]:
                metrics[f"diag/{key}"] = sum(d[key] for d in diagnostics) / len(diagnostics)
            run.book.log(epoch + (d + 1) / draws, metrics)
        with torch.no_grad():
            logits = heads(features)
        chosen, selection = select_head(logits, embedding, args.double_softmax)  # step 7
        # under torchrun, rank 0's choice everywhere (on the CPU: a CUDA tensor would unpickle
        # onto rank 0's GPU in every process)
        chosen, selection = common.agree((chosen, selection.cpu()))
        if float(selection[chosen]) < best_loss:
            best, best_loss = chosen, float(selection[chosen])
            best_weights = {k: v.clone() for k, v in heads.heads[best].state_dict().items()}
        # against the true labels: a diagnostic that chooses nothing
        oracle = [common.cluster_accuracy(data.labels, h.argmax(1)) for h in logits]
        metrics = {
            "self/selected_head": chosen,
            "self/selection_loss": selection[chosen],
            "self/best_selection_loss": best_loss,
            "oracle/selected_head_acc": oracle[chosen],
            "oracle/best_head_acc": max(oracle),
        }
        run.book.log(epoch + 1, metrics)
        progress = dict(best=best, best_loss=best_loss, best_weights=best_weights)
        run.save("self", parts, epoch=epoch + 1, **progress)  # after every selection
    head = heads.heads[best]
    head.load_state_dict(best_weights)
    figures = evaluate(nn.Sequential(backbone, head), data, run, "self_", "self_clusters.png")
    return head, {**figures, "selected_head": best, "self_selection_loss": best_loss}


def train_semi(
    args: Args, run: Run, backbone: nn.Module, head: nn.Module, data: Data
) -> tuple[dict, nn.Module]:
    """Stage 3 (steps 8-9); returns the final EMA model's figures with the reliable count, and the
    model."""
    images = data.images
    torch.manual_seed(args.seed + 2)
    embedding = F.normalize(network_outputs(backbone, images, run.stats, run.amp), dim=1)
    preds, confidence = clusters_of(nn.Sequential(backbone, head), images, run)
    k = neighbour_count(args.num_neighbours, len(images), args.num_clusters)
    if k != args.num_neighbours:
        print(
            f"semi: k = {k} neighbours, capped from --num-neighbours {args.num_neighbours} at a "
            f"tenth of the expected cluster size ({len(images)} images / {args.num_clusters} "
            f"clusters)",
            flush=True,
        )
    neighbours = knn_indices(embedding, k=k)
    # Under torchrun: rank 0's clusters, confidences and neighbours, which choose the labelled set
    for chosen in (preds, confidence, neighbours):
        common.broadcast_(chosen)
    ratio = args.consistency_ratio
    passed = reliable_mask(preds, confidence, neighbours, ratio, args.confidence)
    per_cluster = torch.bincount(preds[passed], minlength=run.num_clusters).tolist()
    print(f"semi: reliable images per cluster before balancing: {per_cluster}", flush=True)
    subset_rng = torch.Generator().manual_seed(args.seed)  # draws the balanced subsets
    reliable = reliable_samples(  # step 8
        preds, confidence, neighbours, run.num_clusters, ratio, args.confidence, subset_rng
    )
    # a diagnostic against the true labels: it chooses nothing
    oracle = common.cluster_accuracy(data.labels[reliable], preds[reliable])
    print(
        f"semi: {len(reliable)} reliable images ({len(reliable) // args.num_clusters} per "
        f"cluster), oracle accuracy of their cluster labels {oracle:.4f}",
        flush=True,
    )
    x_images = common.take(images, reliable, run.device)  # on the device: a few per cluster
    x_labels = preds[reliable]  # the clusters are the labels
    model = WideResNet(
        args.num_clusters, args.semi_depth, args.semi_widen_factor, args.semi_bn_momentum
    )
    model = run.place(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    groups = parameter_groups(model, args.semi_weight_decay)
    optimizer = torch.optim.SGD(groups, lr=args.semi_lr, momentum=0.9, nesterov=True)
    forward = torch.compile(model) if args.compile else model
    rng = common.rank_generator(args.seed, run.device)  # another stream in each process
    parts = {"model": model, "ema": ema, "optimizer": optimizer}
    state = run.resume("semi", parts)
    if state:
        common.restore_generator(rng, state["rng"])
    start = state.get("step", 0)
    run.book.start_log(total=args.semi_steps, start=start)
    b = args.semi_batch_size
    for step in range(start, args.semi_steps):  # step 9
        model.train()
        with run.book.timed(images=(1 + 2 * args.semi_mu) * b):  # the global batches' images
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, args.semi_steps, args.semi_lr)
            xi = uniform_indices(len(x_images), b, step, args.seed, run.device)
            ui = uniform_indices(len(images), args.semi_mu * b, step, args.seed + 1, run.device)
            xi, ui = common.share(xi), common.share(ui)  # under torchrun, this process's shares
            u = common.take(images, ui, run.device)
            x = common.weak_augment(x_images[xi], generator=rng)
            u_weak = common.weak_augment(u, generator=rng)
            u_strong = semi_strong_augment(u, run.stats[0], generator=rng)
            inputs = torch.cat([x, u_weak, u_strong])
            with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
                logits = forward(run.inputs(inputs)).float()
            logits_x, logits_weak, logits_strong = logits.split([len(xi), len(ui), len(ui)])
            loss, _, loss_u, mask, _ = fixmatch_loss(
                logits_x, x_labels[xi], logits_weak, logits_strong
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            common.synchronize(model)  # under torchrun: the gradient averaged over processes
            optimizer.step()
            ema_update(ema, model, args.ema_decay)
        if (step + 1) % args.log_every == 0 or step + 1 == args.semi_steps:
            metrics = {
                "semi/loss": loss,
                "semi/loss_u": loss_u,
                "semi/mask": mask.mean(),
                "semi/lr": optimizer.param_groups[0]["lr"],
            }
            run.book.log(step + 1, metrics)
        evaluated = (step + 1) % args.eval_every == 0 or step + 1 == args.semi_steps
        if evaluated:
            figures = evaluate(ema, data, run)
            run.book.log(step + 1, {f"eval/{k}": v for k, v in figures.items()})
        if run.book.save_due(evaluated):
            run.save("semi", parts, step=step + 1, rng=common.generator_state(rng))
    # the final EMA model, never a chosen one
    figures = evaluate(ema, data, run, picture="clusters.png")
    return {**figures, "num_reliable": len(reliable), "oracle_reliable_acc": oracle}, ema


def train(args: Args) -> dict:
    args, run, data, handover = start_run(args)
    book = run.book
    results = dict(handover.get("results", {}))
    backbone = ResNet18(args.backbone_width).to(run.device)
    if handover:
        backbone.load_state_dict(handover["backbone"])
    final = None  # SPICE-Semi's EMA model, once trained: what --predict uses
    for stage in ["moco", "self", "semi"] if args.stage == "all" else [args.stage]:
        finished = book.out / f"{stage}.pt"
        if args.resume and finished.exists():  # finished before the interruption
            handover = common.load_checkpoint(finished, map_location=run.device)
            results = handover["results"]
            # the totals: this file's or the later checkpoint's, whichever counts more time
            book.totals = max(book.totals, handover["totals"], key=lambda t: t["seconds"])
            backbone.load_state_dict(handover["backbone"])
            continue
        if stage == "moco":  # steps 1-3, then the k-means baseline on the embedding
            # the kNN diagnostic needs a test split apart from the training one (protocol split)
            diagnosed = data if args.protocol == "split" else None
            backbone.load_state_dict(train_moco(args, run, data.pretrain, diagnosed))
            results.update(kmeans_baseline(args, run, backbone, data))
            print("baseline: " + " ".join(f"{k}={v:.4g}" for k, v in results.items()), flush=True)
            handover = {"backbone": backbone.state_dict()}
        elif stage == "self":  # steps 4-7
            head, figures = train_self(args, run, backbone, data)
            results.update(figures)
            handover = {"backbone": backbone.state_dict(), "head": head.state_dict()}
        else:  # steps 8-9
            head = Heads(1, backbone.dim, args.num_clusters).heads[0].to(run.device)
            head.load_state_dict(handover["head"])
            try:
                figures, final = train_semi(args, run, backbone, head, data)
                results.update(figures)
            except common.ConfigError as e:  # no reliable images: keep what stages 1-2 measured
                results.update(stopped_at="semi", stopped_because=str(e))
        if stage != "semi":  # the hand-over file, with the totals and the arguments
            book.save({**handover, "stage": stage, "results": results}, f"{stage}.pt")
    results.update(book.figures())
    results["split"] = "test" if args.protocol == "split" else "train+test"  # every figure's
    text = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())
    print("results: " + " ".join(text), flush=True)
    if final is None:  # no SPICE-Semi model: SPICE-Self's head on the backbone, or MoCo's backbone
        final = backbone
        if "head" in handover:
            head = Heads(1, backbone.dim, args.num_clusters).heads[0].to(run.device)
            head.load_state_dict(handover["head"])
            final = nn.Sequential(backbone, head)
    results["weights_checksum"] = common.weights_checksum(final)  # one per process: equal
    results = common.write_results(book.out, results)
    if "stopped_at" in results:  # a run that could not finish: its figures so far, status 1
        written = book.out / "results.json"
        raise common.ConfigError(f"{results['stopped_because']} (the figures so far: {written})")
    return results


def main(argv: list[str] | None = None) -> dict:
    torch.set_flush_denormal(True)  # denormal floats slow CPU training many times over
    description = __doc__.split("\n")[0]
    args = common.parse_args(Args, argv, DATASET_DEFAULTS, description, "spice", "classify")
    with common.user_errors("spice.py", args.out_dir):
        if args.predict:
            return predict(args)
        return train(args)


if __name__ == "__main__":
    main()
