"""ODC: online deep clustering for unsupervised representation learning.

Paper: Xiaohang Zhan, Jiahao Xie, Ziwei Liu, Yew-Soon Ong, Chen Change Loy, "Online Deep
Clustering for Unsupervised Representation Learning", CVPR 2020, arXiv:2006.10645.
Official code: open-mmlab/OpenSelfSup, now github.com/open-mmlab/mmselfsup (ODC model, memory,
hook).

The idea: DeepCluster alternates "cluster the whole data set" and "train on the cluster labels",
and its labels jump between epochs. ODC keeps a memory of every sample's feature and cluster
label and updates both a batch at a time, so that labels and centroids move smoothly while the
network learns to predict them.

Algorithm (each name is a function or method below):
1. `OdcMemory.initialise` (called by `baseline_and_memory`): neck features of the randomly
   initialised network (its batch-norm statistics recomputed on the training images,
   `recompute_batch_norm`), or of a backbone trained by another self-supervised method
   (`--init-from`, `backbone_weights`: the paper's ODC as fine-tuning) with a fresh neck, for
   every training image, without augmentation, L2-normalised, k-means with C clusters: the
   sample memory (features and labels) and the centroid memory.
2. For a batch of indices I (`epoch_indices`: drawn with replacement): forward one augmented
   view (`augment`) -> 256-d neck feature -> C logits; `odc_loss`: cross-entropy against the
   memory labels of I as they were *before* this step, class weights w_c ~ (n_c + 1e-5)^(-1/2)
   (`class_weights`).
3. `OdcMemory.update_samples`: f_I <- normalise((1 - m) f_I + m normalise(z)), m = 0.5, then
   label_I <- argmax_c <centroid_c, f_I>; the fraction of changed labels is logged.
4. Backward and SGD step (no momentum on the head, whose targets move). Steps 2-4 are
   `train_step`.
5. `refresh_memory`: `OdcMemory.update_centroids` every 10 steps; `handle_small_clusters`
   every step: clusters under `min_cluster` are dissolved into their nearest remaining
   centroids, and each freed id is refilled by splitting the largest cluster with 2-means (C
   stays constant); the class weights again. `train_epoch` runs steps 2-5 over an epoch.
6. `evaluate` of the frozen backbone: a linear probe (`linear_probe`), weighted kNN accuracy
   (`common.knn_accuracy`, k = 200 and 20, T = 0.07), k-means with K = number of classes (ACC,
   NMI with the arithmetic normalisation, ARI), and the memory's clusters (`memory_figures`), beside
   the same figures for the untrained network and for the --init-from network before ODC.

Usage:
    python odc.py --dataset cifar10                   # the CIFAR-scale recipe below (GPU: hours)
    torchrun --nproc_per_node 8 odc.py --dataset cifar10  # 8 GPUs; --batch-size stays the total
    python odc.py --dataset shapes                    # a small complete run on a CPU
    python odc.py --dataset imagefolder --data-dir DIR --image-size 64 \\
        --num-clusters 200 --min-cluster 20
    python spice.py --dataset cifar10 --stage moco --out-dir runs/moco   # MoCo first, then
    python odc.py --dataset cifar10 --init-from runs/moco/moco.pt        # ODC from its backbone

Defaults: ODC published no CIFAR recipe. These CIFAR-scale settings are ours, scaled from the
ImageNet one (ResNet-50, batch 512, lr 0.06, C = 10,000, 440 epochs with lr x0.4 at 400): a
CIFAR ResNet-18, C = 100, min_cluster 75 (about 0.15 N / C), batch 256, lr 0.03, weight decay
1e-5, 200 epochs with lr x0.4 for the last 9%.

Expected (the official model zoo, ResNet-50 on ImageNet): 57.70% linear-probe top-1 (res5),
39.1% kNN top-1 (k = 20). No CIFAR or clustering-accuracy figures are published.
This file on a 2-core CPU (CPU smoke figures; commands in the README), kNN top-1 % (k = 200):
    CIFAR-10, width-16 ResNet-18, 6 epochs: 31.4 (untrained network 27.7), before the sampling
    with replacement, not re-measured
    shapes, 16 px, 20 epochs, 3 seeds: 50.1-57.3 (untrained network 18.6-23.8); linear probe
    48.2-58.7 (untrained 18.5-19.6)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --------------------------------------------------------------------------------------------------
# Arguments: our CIFAR-scale recipe (see the docstring)
# --------------------------------------------------------------------------------------------------
# Deviation: ODC published only an ImageNet recipe; these CIFAR-scale defaults are ours, scaled
# from it (see the module docstring).
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
    batch_size: int = common.arg(256, at_least=2)
    """images per step (at least 2: the neck's batch norm needs two values per channel)"""
    eval_every: int = common.arg(20, at_least=1)
    """epochs between evaluations of the frozen backbone (each is also a checkpoint)"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on the CPU)"""
    compile: bool = False
    """torch.compile the network(s)"""
    predict: str | None = None
    """a folder of new images: the finished run in --out-dir puts each in its memory cluster
    (the nearest centroid of its neck feature) into <out-dir>/predictions, instead of training"""
    overwrite: bool = False
    """with --predict: replace the predictions already in <out-dir>/predictions"""
    init_from: str | None = None
    """start the backbone from this file instead of random weights: spice.py's moco.pt (or the
    run folder holding it), odc.py's checkpoint.pt, or a saved state_dict of this CIFAR ResNet-18
    (the neck, head and memory start fresh)"""
    epochs: int = common.arg(200, at_least=1)
    """training epochs (passes over the training images)"""
    num_clusters: int = common.arg(100, at_least=2)
    """clusters in the memory, C (10 x the classes)"""
    min_cluster: int = common.arg(75, at_least=0)
    """clusters smaller than this are dissolved and their id refilled (about 0.15 N / C)"""
    backbone_width: int = common.arg(64, at_least=1)
    """base width of the CIFAR ResNet-18 (64: the standard one, 512-d features)"""
    lr: float = common.arg(0.03, above=0)
    """learning rate (0.06 at batch 512 on ImageNet, scaled linearly)"""
    lr_drop: float = common.arg(0.91, at_least=0, at_most=1)
    """fraction of training after which the learning rate drops by --lr-drop-factor (400 of 440
    epochs)"""
    lr_drop_factor: float = common.arg(0.4, above=0, at_most=1)
    """factor the learning rate is multiplied by after --lr-drop (the official ImageNet step)"""
    sgd_momentum: float = common.arg(0.9, at_least=0, below=1)
    """SGD momentum of the backbone and the neck (the head has none: its targets move)"""
    weight_decay: float = common.arg(1e-5, at_least=0)
    """weight decay (all parameters, as the official config)"""
    memory_momentum: float = common.arg(0.5, above=0, at_most=1)
    """m in f <- normalise((1 - m) f + m z): how fast memory features follow the network"""
    centroid_every: int = common.arg(10, at_least=1)
    """steps between recomputations of all centroids"""
    image_size: int = common.arg(32, at_least=8)
    """image side: image folders are resized to it, shapes drawn at it (at least 8)"""
    memmap: Literal["auto", "on", "off"] = "auto"
    """keep the training and test images on the CPU (an image folder memory-mapped from its
    cache) and gather each batch from there: auto when they would fill over half the device"""
    log_every: int = common.arg(50, at_least=1)
    """steps between log lines"""


# Per-data-set departures. The synthetic `shapes` (5,000 images) gets a narrow network, fewer
# clusters (min_cluster again 0.15 N / C) and a schedule that a CPU finishes in minutes.
DATASET_DEFAULTS = {
    "cifar100": {"num_clusters": 1000, "min_cluster": 8},
    "stl10": {"image_size": 96, "min_cluster": 150},  # trains on train + unlabeled: 105,000 images
    "shapes": {
        "backbone_width": 16,
        "num_clusters": 50,
        "min_cluster": 15,
        "batch_size": 128,
        "epochs": 10,
        "eval_every": 5,
        "log_every": 10,
    },
}


# --------------------------------------------------------------------------------------------------
# The paper's pieces: the memories, the class weights, the loss, the view, one step
# --------------------------------------------------------------------------------------------------
class OdcMemory:
    """The sample memory (`features` (N, 256), L2-normalised, and `labels` (N,)) and the centroid
    memory (`centroids` (C, 256), mean memory features, not re-normalised), on one device."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, num_clusters: int, momentum: float = 0.5
    ) -> None:
        self.features = F.normalize(features, dim=1)
        self.labels = labels.clone()
        self.num_clusters = num_clusters
        self.momentum = momentum
        self.centroids = torch.zeros(num_clusters, features.shape[1], device=features.device)
        self.update_centroids()

    @classmethod
    def initialise(
        cls, features: torch.Tensor, num_clusters: int, momentum: float = 0.5, seed: int = 0
    ) -> OdcMemory:
        """k-means (20 iterations) on the normalised features of the untrained network."""
        # Deviation: k-means++ seeding, stopping early once the centres settle; the official
        # runs faiss k-means from random centres for 20 iterations (`third_party/clustering.py`).
        features = F.normalize(features, dim=1)
        _, labels = common.kmeans(features, num_clusters, iters=20, seed=seed)
        common.broadcast_(features)  # under torchrun: rank 0's features and clusters everywhere
        memory = cls(features, labels, num_clusters, momentum)
        memory.agree()
        return memory

    def agree(self) -> None:
        """Under torchrun, rank 0's labels and centroids in every process: every process computes
        them alike, but k-means and the index sums behind the centroids may round differently
        on GPUs (atomic adds), and the processes must hold one memory (no-op in one process)."""
        common.broadcast_(self.labels)
        common.broadcast_(self.centroids)

    def update_samples(self, idx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """f_I <- normalise((1 - m) f_I + m normalise(z)); label_I <- nearest centroid (largest
        dot product). Returns the fraction of the batch whose label changed."""
        # an image drawn twice in a batch: its first view alone updates (repeated writes race)
        order = torch.arange(len(idx), device=idx.device)
        first = torch.full_like(self.labels, len(idx)).scatter_reduce_(0, idx, order, "amin")
        keep = first[idx] == order
        idx, z = idx[keep], z[keep]
        z = F.normalize(z.detach().float(), dim=1)
        f = (1 - self.momentum) * self.features[idx] + self.momentum * z
        self.features[idx] = F.normalize(f, dim=1)
        new = (self.features[idx] @ self.centroids.T).argmax(1)
        changed = (new != self.labels[idx]).float().mean()
        self.labels[idx] = new
        return changed

    def update_centroids(self, clusters: torch.Tensor | None = None) -> None:
        """Centroid c = mean memory feature of cluster c (all clusters, or the given ones); an
        empty cluster keeps its centroid."""
        counts = torch.bincount(self.labels, minlength=self.num_clusters)
        sums = torch.zeros_like(self.centroids).index_add_(0, self.labels, self.features)
        fresh = sums / counts.clamp_min(1)[:, None]
        keep = counts == 0
        if clusters is not None:
            keep = keep | ~torch.isin(torch.arange(self.num_clusters, device=keep.device), clusters)
        self.centroids = torch.where(keep[:, None], self.centroids, fresh)

    def handle_small_clusters(self, min_cluster: int, seed: int = 0) -> int:
        """Dissolve every cluster with fewer than `min_cluster` members into the most similar
        remaining centroids, then refill each freed id by splitting the currently largest
        cluster in two with 2-means on its memory features. Returns the number of clusters
        handled; C stays constant.

        Where 2-means cuts off fewer than `min_cluster` members, the cut moves along the
        2-means margin until both halves hold `min_cluster` (ours: the official code only falls
        back to random halves when a side is empty, so a split could leave a small cluster for
        the next step). No cluster is then left small as long as the largest cluster holds
        2 x `min_cluster`, which N / C >= 2 x min_cluster guarantees (defaults: 500 and 150)."""
        counts = torch.bincount(self.labels, minlength=self.num_clusters)
        small = torch.nonzero(counts < min_cluster).squeeze(1)
        if len(small) == 0:
            return 0
        kept = torch.nonzero(counts >= min_cluster).squeeze(1)
        members = torch.nonzero(torch.isin(self.labels, small)).squeeze(1)
        if len(members):
            self.labels[members] = kept[(self.features[members] @ self.centroids[kept].T).argmax(1)]
        for freed in small.tolist():
            largest = int(torch.bincount(self.labels, minlength=self.num_clusters).argmax())
            idx = torch.nonzero(self.labels == largest).squeeze(1)
            f = self.features[idx]
            centres, side = common.kmeans(f, 2, iters=20, seed=seed)
            # how much closer each member is to centre 1 than to centre 0 (squared distances)
            margin = (
                2 * f @ (centres[1] - centres[0])
                + centres[0].square().sum()
                - centres[1].square().sum()
            )
            if len(idx) >= 2 * min_cluster:
                # Deviation: the cut moves along the 2-means margin until both halves hold
                # min_cluster (the official code takes random halves only when a side is empty).
                take = min(max(int(side.sum()), min_cluster), len(idx) - min_cluster)
            else:
                # too small for two halves of min_cluster: halved, the next step handles it again
                take = len(idx) // 2
            self.labels[idx[margin.topk(take).indices]] = freed
            self.update_centroids(torch.tensor([largest, freed], device=idx.device))
        return len(small)

    def state_dict(self) -> dict:
        return {"features": self.features, "labels": self.labels, "centroids": self.centroids}

    def load_state_dict(self, state: dict) -> None:
        self.features = state["features"]
        self.labels = state["labels"]
        self.centroids = state["centroids"]

    @classmethod
    def from_state_dict(cls, state: dict, momentum: float = 0.5) -> OdcMemory:
        """The memory of a checkpoint, its centroids as they were (not recomputed)."""
        memory = cls(state["features"], state["labels"], len(state["centroids"]), momentum)
        memory.load_state_dict(state)
        return memory


def class_weights(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """w_c proportional to (n_c + 1e-5)^(-1/2), n_c the size of cluster c, normalised to sum 1:
    small clusters weigh more, so the large ones cannot swallow the rest."""
    w = (torch.bincount(labels, minlength=num_clusters).float() + 1e-5) ** -0.5
    return w / w.sum()


def odc_loss(
    logits: torch.Tensor, memory_labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Class-weighted cross-entropy of the head's logits (B, C) against the memory labels (B,),
    read before this step's memory update."""
    return F.cross_entropy(logits.float(), memory_labels, weight=weights)


def step_lr(epoch: int, args: Args) -> float:
    """The official step schedule: lr, times lr_drop_factor (0.4) from epoch int(lr_drop x
    epochs) on (400 of 440 epochs on ImageNet)."""
    if epoch >= int(args.lr_drop * args.epochs):
        return args.lr * args.lr_drop_factor
    return args.lr


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ODC's single view: random resized crop (scale 0.2-1) + flip, colour jitter (0.4, 0.4,
    1.0, 0.5) always, grayscale p = 0.2."""
    # Deviation: no +/- 2 degree rotation (the official pipeline has one).
    # Deviation: crop scale 0.2-1; the official RandomResizedCrop keeps torchvision's 0.08-1.
    boxes, flip = common.draw_crops(
        len(images), scale=(0.2, 1.0), generator=generator, device=images.device
    )
    x = common.resized_crop(images, boxes, flip, images.shape[-2:])
    return common.photometric_augment(
        x,
        generator=generator,
        brightness=0.4,
        contrast=0.4,
        saturation=1.0,
        hue=0.5,
        jitter_p=1.0,
        grayscale_p=0.2,
        blur_p=0.0,
    )


def train_step(
    model: nn.Module,
    memory: OdcMemory,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4, in the paper's order: forward, the loss against the memory labels as they were
    before this step, the memory update (features, then labels), the optimiser step. Returns the
    loss and the fraction of the batch whose label changed. Under torchrun, `x` and `idx` are
    this process's share of the batch: the loss is on the share, the memory update on all of it."""
    # Deviation: under torchrun, batch norm normalises each process's share (the official config
    # uses SyncBN, which gloo on the CPU lacks); `common.synchronize` keeps rank 0's statistics.
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        z, logits = model(x)  # (B, 256), (B, C); B: this process's share under torchrun
    # a copy of the labels: the memory update below moves them
    loss = odc_loss(logits, memory.labels[idx].clone(), weights)
    # Every process's features and indices, in rank order (the global batch), so that every
    # process updates its memory alike, as the official `ODCMemory._gather` (all_gather; it then
    # keeps the features in rank 0 alone and broadcasts the batch's new ones: the same figures).
    changed = memory.update_samples(common.gather(idx), common.gather(z.detach()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    common.synchronize(model)  # under torchrun: backbone, neck and head gradients averaged
    optimizer.step()
    return loss.detach(), changed


# --------------------------------------------------------------------------------------------------
# The networks: CIFAR ResNet-18, ODC's neck and head
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


class ODC(nn.Module):
    """Backbone -> neck (Linear(d, 512) -> BatchNorm1d without affine, momentum 0.001 -> ReLU ->
    Dropout(0.5) -> Linear(512, 256) -> ReLU; Kaiming init) -> head (Linear(256, C), N(0, 0.01))."""

    def __init__(self, num_clusters: int, width: int = 64):
        super().__init__()
        # Deviation: Kaiming fan-out init of the backbone's convolutions (the official: fan-in).
        self.backbone = ResNet18(width)
        self.neck = nn.Sequential(
            nn.Linear(self.backbone.dim, 512),
            nn.BatchNorm1d(512, affine=False, momentum=0.001),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(512, 256),
            nn.ReLU(),
        )
        self.head = nn.Linear(256, num_clusters)
        for m in self.neck:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):  # -> (neck feature (N, 256), logits (N, C))
        z = self.neck(self.backbone(x))
        return z, self.head(z)


# --------------------------------------------------------------------------------------------------
# Data: the images ODC clusters, the labelled splits, each epoch's order
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OdcData:
    """The images ODC clusters and the labelled splits the frozen backbone is evaluated on,
    uint8 (N, 3, H, W) images and int64 labels, all on the device."""

    images: torch.Tensor  # what ODC clusters: the training split (STL-10: + its unlabelled)
    train_images: torch.Tensor  # the labelled training split: the first rows of `images`
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    test_split: str  # the name of the split evaluated on
    num_classes: int
    stats: tuple  # the data set's (mean, std) for common.normalize


def load_data(args: Args, device: torch.device) -> OdcData:
    """The training and test splits, moved to the device, once --num-clusters and --min-cluster
    are checked against the number of training images (before anything is written)."""
    info = common.dataset_info(args.dataset, "classify")
    options = dict(data_dir=args.data_dir, download=args.download, image_size=args.image_size)
    train_set = common.load_dataset(args.dataset, "train", **options)
    test_set = common.load_dataset(args.dataset, "test", **options)
    images = train_set.images
    if args.dataset == "stl10":
        # Deviation: STL-10's 100,000 unlabelled images (made for this) are clustered too; kNN
        # and k-means evaluation use the labelled train split (ODC has no STL-10 recipe).
        unlabeled = common.load_dataset("stl10", "unlabeled", **options)
        images = torch.cat([images, unlabeled.images])
    n = len(images)
    if args.num_clusters > n:
        raise common.ConfigError(
            f"--num-clusters {args.num_clusters} exceeds the {n} training images"
        )
    if args.num_clusters * args.min_cluster > n:
        raise common.ConfigError(
            f"--num-clusters {args.num_clusters} x --min-cluster {args.min_cluster} exceeds the "
            f"{n} training images: the clusters cannot hold their minimum size; lower one of them"
        )
    images = common.place_images(images, device, args.memmap, "training")
    return OdcData(
        images=images,
        train_images=images[: len(train_set)],  # the labelled split: the first rows, not a copy
        train_labels=train_set.labels.to(device),
        test_images=common.place_images(test_set.images, device, args.memmap, "test"),
        test_labels=test_set.labels.to(device),
        test_split=test_set.split,
        num_classes=train_set.num_classes,
        stats=(info.mean, info.std),
    )


def augmented_view(data: OdcData, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The network's input for the images `idx`: one augmented view, normalised with the data
    set's statistics (B, 3, H, W), channels-last on CUDA (faster convolutions)."""
    x = common.take(data.images, idx, data.train_labels.device)  # the run's device
    x = common.normalize(augment(x, generator), *data.stats)
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def epoch_indices(n: int, batch_size: int, epoch: int, seed: int, device) -> torch.Tensor:
    """The images of `epoch`'s ceil(n / batch_size) steps, drawn with replacement as the official
    sampler (OpenSelfSup `datasets/loader/sampler.py`, `DistributedSampler.generate_new_list`,
    `sampling_replace=True`), a function of the seed and the epoch alone (resumable)."""
    # Deviation: the draws fill whole batches (the official draws n, its last batch partial): a
    # batch of one image would crash the neck's batch norm, a small one sway the running stats.
    steps = math.ceil(n / batch_size)
    # seed x 1,000,003 (a prime) + epoch: different (seed, epoch) pairs never share a generator
    # seed as long as there are fewer than 1,000,003 epochs
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randint(n, (steps, batch_size), generator=generator).to(device)


# --------------------------------------------------------------------------------------------------
# Evaluation: the frozen backbone, the memory
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


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches) -> None:
    """Replace the running statistics of every batch-norm layer by their exact average over
    `batches`, an iterable of normalised training batches (a no-gradient pass in train mode), so
    that an untrained network is not judged on default statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all batches
    model.train()
    for x in batches:
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    steps: int = 100,
    seed: int = 0,
) -> float:
    """Test accuracy of a linear classifier on frozen features, as mmselfsup's `resnet50_linear-
    8xb32-steplr-100e_in1k.py` benchmark: weights from N(0, 0.01), SGD with momentum 0.9, no
    weight decay, lr x 0.1 at 60% and 80%; its own generator (dropout's global one untouched)."""
    # Deviation: the linear probe: features computed once (no crops or flips), standardised, 100
    # full-batch steps of a stable size (official: augmented batches of 256, lr 30, 100 epochs).
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_x = (train_features - mean) / std
    test_x = (test_features - mean) / std
    # steps of 1 / the top covariance eigenvalue (over twice the curvature): stable, reproducible
    lr = 1.0 / float(torch.linalg.eigvalsh(train_x.T @ train_x / len(train_x))[-1])
    num_classes = int(train_labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    weight = 0.01 * torch.randn(train_x.shape[1], num_classes, generator=generator)
    weight = weight.to(train_x.device).requires_grad_()
    bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9, weight_decay=0.0)
    for step in range(steps):
        drops = (step >= 0.6 * steps) + (step >= 0.8 * steps)
        optimizer.param_groups[0]["lr"] = lr * 0.1**drops
        loss = F.cross_entropy(train_x @ weight + bias, train_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    predicted = (test_x @ weight + bias).argmax(1)
    return float((predicted == test_labels).float().mean())


def evaluate(model: ODC, data: OdcData, seed: int, amp: bool = False) -> dict:
    """The frozen backbone's pooled features, test images against the labelled training images:
    the linear probe's accuracy, kNN accuracies (k = 200 and 20, L2-normalised features) and
    k-means ACC / NMI / ARI (K = the classes, fit on the training features)."""
    train_raw = network_outputs(model.backbone, data.train_images, data.stats, amp)
    test_raw = network_outputs(model.backbone, data.test_images, data.stats, amp)
    train_f = F.normalize(train_raw, dim=1)
    test_f = F.normalize(test_raw, dim=1)
    centroids, _ = common.kmeans(train_f, data.num_classes, seed=seed)
    predicted = common.assign_to_centroids(test_f, centroids)
    probe = linear_probe(train_raw, data.train_labels, test_raw, data.test_labels, seed=seed)
    return {
        "linear_acc": probe,
        "knn_acc": common.knn_accuracy(train_f, data.train_labels, test_f, data.test_labels, k=200),
        "knn20_acc": common.knn_accuracy(
            train_f, data.train_labels, test_f, data.test_labels, k=20
        ),
        "acc": common.cluster_accuracy(data.test_labels, predicted),
        "nmi": common.nmi(data.test_labels, predicted),
        "ari": common.ari(data.test_labels, predicted),
    }


def memory_figures(memory: OdcMemory, data: OdcData) -> dict:
    """The memory's C clusters against the true labels of the labelled training images (the
    memory's first rows): NMI and many-to-one (majority) accuracy, C being above the number of
    classes; and, label-free, the size balance of all its clusters."""
    labels = memory.labels[: len(data.train_labels)]
    return {
        "memory_nmi": common.nmi(data.train_labels, labels),
        "memory_majority_acc": common.majority_accuracy(data.train_labels, labels),
        "memory_size_balance": common.size_balance(memory.labels, memory.num_clusters),
    }


def save_cluster_picture(path, memory: OdcMemory, images: torch.Tensor, rows: int = 16) -> None:
    """The `rows` largest memory clusters, a row each: their images closest to the centroid."""
    rows = min(rows, memory.num_clusters)
    sizes = torch.bincount(memory.labels, minlength=memory.num_clusters)
    rank = torch.full_like(sizes, -1)  # a cluster's row in the picture, -1: not shown
    rank[sizes.argsort(descending=True)[:rows]] = torch.arange(rows, device=sizes.device)
    closeness = (memory.features * memory.centroids[memory.labels]).sum(1)
    common.save_cluster_grid(path, images, rank[memory.labels], closeness, num_clusters=rows)


@torch.no_grad()
def memory_clusters(
    model: ODC, centroids: torch.Tensor, images: torch.Tensor, stats
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's memory cluster as step 3 assigns one, argmax_c <centroid_c, f> of its
    L2-normalised neck feature f (unaugmented, eval mode), and the cosine to that centroid."""
    neck = nn.Sequential(model.backbone, model.neck)
    features = F.normalize(network_outputs(neck, images, stats), dim=1)
    clusters = (features @ centroids.T).argmax(1)
    return clusters, (features * F.normalize(centroids, dim=1)[clusters]).sum(1)


def predict(args: Args) -> dict:
    """--predict FOLDER: the finished run in --out-dir (its network and memory centroids) puts
    every image under FOLDER, read at the run's image size, in its memory cluster
    (`memory_clusters`), into <out-dir>/predictions (a CSV and a picture)."""
    run, state = common.finished_run(args.out_dir, Args)
    device = common.select_device(args.device)
    info = common.dataset_info(run.dataset, "classify")
    model = ODC(run.num_clusters, run.backbone_width).to(device)
    model.load_state_dict(state["model"])
    centroids = state["memory"]["centroids"].to(device)
    out = common.predictions_dir(args.out_dir, args.overwrite)
    paths, images = common.read_new_images(args.predict, run.image_size)
    images = torch.stack(images).to(device)
    clusters, cosine = memory_clusters(model, centroids, images, (info.mean, info.std))
    return common.write_class_predictions(
        out, paths, images, clusters, cosine, num_clusters=run.num_clusters
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def build_optimizer(model: ODC, args: Args) -> torch.optim.SGD:
    """SGD with weight decay on all parameters (as the official config) and no momentum on the
    head: its targets, the memory labels, move."""
    head = list(model.head.parameters())
    rest = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    groups = [{"params": rest, "momentum": args.sgd_momentum}, {"params": head, "momentum": 0.0}]
    return torch.optim.SGD(groups, lr=args.lr, weight_decay=args.weight_decay)


def build_model(args: Args, device: torch.device) -> tuple[ODC, torch.optim.SGD, nn.Module]:
    """The network (channels-last on CUDA), its optimizer and the forward that training calls."""
    model = ODC(args.num_clusters, args.backbone_width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    forward = torch.compile(model) if args.compile else model
    return model, optimizer, forward


def backbone_weights(path: str, backbone: ResNet18) -> dict:
    """The CIFAR ResNet-18 weights in the file `path` (--init-from), checked against `backbone`:
    spice.py's hand-over (moco.pt, or a run folder holding it; self.pt fits too), odc.py's
    checkpoint.pt, or a state_dict of that network or of the whole ODC model. Anything else is a
    ConfigError saying what the file holds and what was expected."""
    file = Path(path)
    if file.is_dir():
        file = file / "moco.pt"
    state = common.load_checkpoint(file)
    if isinstance(state.get("backbone"), dict):
        weights = state["backbone"]
        holds = f"spice.py's {state.get('stage', 'unknown')}-stage hand-over"
    elif isinstance(state.get("model"), dict):
        weights = state["model"]
        holds = "an odc.py checkpoint"
    else:
        weights = state
        holds = "a state_dict"
    if any(str(name).startswith("backbone.") for name in weights):  # the whole ODC model
        weights = {
            name.removeprefix("backbone."): tensor
            for name, tensor in weights.items()
            if name.startswith("backbone.")
        }
    expected = backbone.state_dict()
    if set(weights) != set(expected):
        found = ", ".join(map(str, list(weights)[:3])) or "nothing"
        wanted = ", ".join(list(expected)[:3])
        raise common.ConfigError(
            f"--init-from {file}: {holds} with {len(weights)} entries ({found}, ...), not "
            f"odc.py's CIFAR ResNet-18 ({len(expected)} entries: {wanted}, ...). Pass the "
            f"moco.pt of a spice.py run, an odc.py checkpoint.pt or a state_dict of that network"
        )
    width = weights["stem.0.weight"].shape[0]
    if width != backbone.stem[0].out_channels:
        raise common.ConfigError(
            f"--init-from {file}: {holds} of a ResNet-18 of width {width}; this run builds "
            f"width {backbone.stem[0].out_channels}: pass --backbone-width {width}"
        )
    for name, tensor in expected.items():
        if weights[name].shape != tensor.shape:
            raise common.ConfigError(
                f"--init-from {file}: its {name} has shape {tuple(weights[name].shape)}, this "
                f"run's network expects {tuple(tensor.shape)}"
            )
    print(f"backbone from {file} ({holds})", flush=True)
    return weights


def baseline_and_memory(
    model: ODC, data: OdcData, args: Args, amp: bool = False, init: dict | None = None
) -> tuple[dict, dict, OdcMemory]:
    """The rows before training and the initial memory (step 1): the random network, its batch-
    norm statistics recomputed on the training images (the baseline), then, with --init-from, the
    loaded backbone (`init`; the row is {} without). The memory comes from the neck features of
    the last network evaluated."""
    n = len(data.images)
    batch_size = 256  # images per no-gradient pass; the statistics average over all of them

    def batches():
        for i in range(0, n, batch_size):
            x = data.images[i : i + batch_size].to(data.train_labels.device)
            yield common.normalize(x, *data.stats)

    # Deviation: the memory starts from the network with recomputed batch-norm statistics (the
    # same network is the baseline); the official code uses the initial statistics.
    recompute_batch_norm(model, batches())
    baseline = evaluate(model, data, args.seed, amp)
    loaded = {}
    if init is not None:
        model.backbone.load_state_dict(init)
        model.backbone.eval()
        # the loaded backbone keeps its own batch-norm statistics, as the trained network does;
        # only the fresh neck's are recomputed, on the loaded backbone's features
        recompute_batch_norm(model.neck, (model.backbone(x) for x in batches()))
        loaded = evaluate(model, data, args.seed, amp)
    neck = nn.Sequential(model.backbone, model.neck)
    features = F.normalize(network_outputs(neck, data.images, data.stats, amp), dim=1)
    memory = OdcMemory.initialise(features, args.num_clusters, args.memory_momentum, args.seed)
    first_row = loaded if init is not None else baseline
    first_row.update(memory_figures(memory, data))
    return baseline, loaded, memory


def resume_from(
    book: common.RunBook,
    model: ODC,
    optimizer: torch.optim.SGD,
    augment_rng: torch.Generator,
    args: Args,
) -> tuple[dict, dict, OdcMemory, dict]:
    """Restores the network, optimiser and random states of the checkpoint (the augmentation's
    generator and torch's global one, which the neck's dropout draws from); returns the rows of
    its random and loaded networks, its memory and its last evaluation."""
    state = book.checkpoint
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    memory = OdcMemory.from_state_dict(state["memory"], args.memory_momentum)
    common.restore_generator(augment_rng, state["augment_rng"])
    book.restore_global_rng()  # dropout's: the same in every process (one seed, equal draws)
    print(f"resumed after epoch {state['epoch']}", flush=True)
    return state["baseline"], state.get("loaded", {}), memory, state["result"]


def interval_metrics(
    losses: list, changes: list, handled: int, memory: OdcMemory, lr: float
) -> dict:
    """The training log line: means over the steps since the last line, the memory's cluster
    sizes now."""
    sizes = torch.bincount(memory.labels, minlength=memory.num_clusters)
    return {
        "train/loss": torch.stack(losses).mean(),
        "train/label_change": torch.stack(changes).mean(),
        "train/min_cluster": sizes.min(),
        "train/max_cluster": sizes.max(),
        "train/small_handled": handled,
        "train/lr": lr,
    }


def refresh_memory(memory: OdcMemory, step: int, args: Args) -> tuple[int, torch.Tensor]:
    """Step 5 after `step` (from 0): all centroids every --centroid-every steps, small clusters
    every step (a seed per step). Returns the clusters handled and the next step's weights."""
    if (step + 1) % args.centroid_every == 0:
        memory.update_centroids()
    seed = args.seed * 1_000_003 + step
    handled = memory.handle_small_clusters(args.min_cluster, seed=seed)
    # Under torchrun, rank 0's re-clustering in every process, every step: a broadcast whether or
    # not anything moved, so that no rounding difference can decide it (the labels: 8 bytes an
    # image; the official broadcasts rank 0's splits and dissolutions, and its centroids).
    memory.agree()
    return handled, class_weights(memory.labels, args.num_clusters)


def train_epoch(
    forward: nn.Module,
    optimizer: torch.optim.SGD,
    memory: OdcMemory,
    data: OdcData,
    weights: torch.Tensor,
    epoch: int,
    augment_rng: torch.Generator,
    book: common.RunBook,
    args: Args,
    amp: bool = False,
) -> torch.Tensor:
    """One epoch of steps 2-5, logged every --log-every steps; takes and returns the weights."""
    device = data.train_labels.device  # the run's (the images may be kept on the CPU)
    batches = epoch_indices(len(data.images), args.batch_size, epoch, args.seed, device)
    handled = 0
    losses = []
    changes = []
    for b, idx in enumerate(batches):
        with book.timed(images=len(idx)):  # the global batch, all processes together
            mine = common.share(idx)  # under torchrun, this process's slice of the batch
            x = augmented_view(data, mine, augment_rng)
            # steps 2-4: forward, loss on the old labels, memory update, SGD step
            loss, changed = train_step(forward, memory, optimizer, x, mine, weights, amp)
            done, weights = refresh_memory(memory, epoch * len(batches) + b, args)  # step 5
        handled += done
        losses.append(loss)  # under torchrun, the loss on rank 0's share (the one that logs)
        changes.append(changed)
        if (b + 1) % args.log_every == 0 or b + 1 == len(batches):
            lr = optimizer.param_groups[0]["lr"]
            metrics = interval_metrics(losses, changes, handled, memory, lr)
            book.log(epoch + (b + 1) / len(batches), metrics)
            handled = 0
            losses = []
            changes = []
    return weights


def train(args: Args) -> dict:
    device = common.start_processes(args.device)  # under torchrun, this process's device
    common.check_batches({"--batch-size": args.batch_size})
    if args.batch_size // common.world_size() < 2:
        raise common.ConfigError(
            f"--batch-size {args.batch_size} gives each of the {common.world_size()} processes "
            f"fewer than 2 images: the neck's batch norm needs two values per channel"
        )
    common.set_seed(args.seed)
    data = load_data(args, device)
    n = len(data.images)
    model, optimizer, forward = build_model(args, device)
    init = None
    if args.init_from and not args.resume:  # checked before anything is written
        init = backbone_weights(args.init_from, model.backbone)
    out = common.prepare_out_dir(args.out_dir, args.resume, args)
    print(
        f"odc: {args.dataset} on {device}, {n} training and {len(data.test_images)} test images "
        f"({data.test_split}), C = {args.num_clusters}, ResNet-18 width {args.backbone_width}",
        flush=True,
    )
    amp = args.amp and device.type == "cuda"
    augment_rng = common.rank_generator(args.seed, device)  # another stream in each process
    book = common.RunBook(out, args, device)
    start = book.checkpoint.get("epoch", 0)
    book.start_log(total=args.epochs, start=start)
    if args.resume:
        baseline, loaded, memory, result = resume_from(book, model, optimizer, augment_rng, args)
    else:
        baseline, loaded, memory = baseline_and_memory(model, data, args, amp, init)  # step 1
        result = {}
        book.log(0, {f"baseline/{k}": v for k, v in baseline.items()})
        if loaded:
            book.log(0, {f"init/{k}": v for k, v in loaded.items()})

    weights = class_weights(memory.labels, args.num_clusters)
    for epoch in range(start, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = step_lr(epoch, args)
        model.train()
        weights = train_epoch(
            forward, optimizer, memory, data, weights, epoch, augment_rng, book, args, amp
        )
        evaluated = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
        if evaluated:
            result = evaluate(model, data, args.seed, amp)  # step 6
            result.update(memory_figures(memory, data))
            book.log(epoch + 1, {f"eval/{k}": v for k, v in result.items()})
        # due at every evaluation and on the clock, checked at epoch ends (where a run resumes)
        if book.save_due(evaluated):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "memory": memory.state_dict(),
                "augment_rng": common.generator_state(augment_rng),  # every process's, torchrun
                "epoch": epoch + 1,
                "baseline": baseline,
                "loaded": loaded,
                "result": result,
            }
            book.save(state)

    save_cluster_picture(out / "clusters.png", memory, data.images)
    rows = {"random network (baseline)": baseline}
    if loaded:
        rows[f"loaded network, before ODC ({args.init_from})"] = loaded
    rows["after ODC"] = result
    common.print_table(rows)
    baseline_results = {f"baseline_{k}": v for k, v in baseline.items()}
    loaded_results = {f"init_{k}": v for k, v in loaded.items()}
    results = {**result, **baseline_results, **loaded_results, **book.figures()}
    print("results: " + " ".join(f"{k}={v:.4g}" for k, v in results.items()), flush=True)
    results["split"] = data.test_split  # the split of every figure but the memory's (train)
    # one per process, equal when they agree: the network, and the memory (features, labels,
    # centroids: its state_dict of tensors sums as a network's does)
    results["weights_checksum"] = common.weights_checksum(model)
    results["memory_checksum"] = common.weights_checksum(memory)
    return common.write_results(out, results)


def main(argv: list[str] | None = None) -> dict:
    torch.set_flush_denormal(True)  # denormal floats slow CPU training many times over
    description = __doc__.split("\n")[0]
    args = common.parse_args(Args, argv, DATASET_DEFAULTS, description, "odc", "classify")
    with common.user_errors("odc.py", args.out_dir):
        if args.predict:
            return predict(args)
        return train(args)


if __name__ == "__main__":
    main()
