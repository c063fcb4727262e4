"""PiCIE: unsupervised semantic segmentation by clustering with invariance and equivariance.

Paper: Jang Hyun Cho, Utkarsh Mall, Kavita Bala, Bharath Hariharan, "PiCIE: Unsupervised Semantic
Segmentation using Invariance and Equivariance in Clustering", CVPR 2021, arXiv:2103.17070.
Official code: github.com/janghyuncho/PiCIE.

The idea: cluster pixel features with k-means and train the network to predict the cluster
labels (DeepCluster for pixels). Two views of every image make the labels mean something: the
colours of the views differ (the features must be invariant to them) and the second view's
crop and flip are applied to its *feature map* (the features must be equivariant to them), and
each view is also trained on the other view's clusters.

One epoch (each name is a function below):
1. `draw_epoch_transforms`: per training image, two photometric transforms P1, P2 (colour
   jitter, grayscale, blur), one square crop and one flip bit, fixed for the whole epoch.
2. `view_features`: view 1 = crop + flip of P1(x), resized -> network -> Z1; view 2 = P2(x)
   resized -> network -> the same crop + flip applied to its feature map (`geometric`) -> Z2.
   Z1 and Z2 are aligned pixel for pixel; both L2-normalised along channels.
3. `cluster_pixels`: per view, k-means with K clusters on a sample of pixel features (network in
   eval mode) -> centroids mu_1, mu_2.
4. `assign_labels`: every pixel of every image gets its nearest centroid, per view; the labels
   stay in memory. `cluster_weights` from the cluster sizes.
5. `picie_loss`: frozen dot-product classifiers mu_1, mu_2 (`cluster_logits`); class-weighted
   cross-entropy within each view and across the views (view 1 against view 2's labels and back).
6. `train_step`: Adam over the training images in random order, then the next epoch clusters anew.
7. `evaluate`: fresh k-means on features of un-augmented training images, prediction = argmax of
   z . mu, one confusion matrix over the evaluation split, Hungarian matching of clusters to
   classes, pixel accuracy and mIoU; the untrained network first, as the baseline.

Usage:
    # the paper's recipe (GPU; official log: 1.5 h an epoch)
    python picie.py --dataset cocostuff27 --data-dir DIR
    # 27 classes, trains on test + train_extra
    python picie.py --dataset cityscapes --data-dir DIR
    # on 8 GPUs: --batch-size stays the batch of all 8 processes together
    torchrun --nproc_per_node 8 picie.py --dataset cocostuff27 --data-dir DIR
    # a small complete run on a CPU
    python picie.py --dataset shapes-seg
    python picie.py --dataset camvid --data-dir DIR --weights none --image-size 128 --epochs 3 \
        --batch-size 32 --lr 1e-3

Expected, pixel accuracy / mIoU % (the paper's, ResNet-18 FPN from ImageNet weights):
    COCO-Stuff-27  PiCIE 48.09 / 13.84   Modified DeepCluster 32.2 / 9.8    IIC 21.8 / 6.7
    Cityscapes-27  PiCIE 65.50 / 12.31   Modified DeepCluster 40.7 / 7.1    IIC 47.9 / 6.4
This file on a 2-core CPU (CPU smoke figures; commands in the README), random initialisation,
mIoU / pixel accuracy after training (the untrained network, batch norm recomputed, in brackets):
    shapes-seg, 32 px, 6 epochs, 3 seeds: 0.131-0.177 / 0.400-0.558 (0.076-0.107 / 0.235-0.298)
    CamVid, 128 px, batch 32, lr 1e-3, 3 epochs, seed 0: 0.175 / 0.498 (0.127 / 0.365)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common


# --------------------------------------------------------------------------------------------------
# Arguments: defaults are the paper's recipe for COCO-Stuff-27
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    dataset: str = "cocostuff27"
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
    """images per training step (the clustering, labelling and evaluation passes use it too)"""
    eval_every: int = common.arg(1, at_least=1)
    """epochs between evaluations, each followed by a checkpoint (as is any epoch that ends 10
    minutes after the last one)"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on the CPU)"""
    compile: bool = False
    """torch.compile the network(s)"""
    predict: str | None = None
    """a folder of new images: the finished run in --out-dir segments them into its clusters
    (the last evaluation's centroids) into <out-dir>/predictions, instead of training"""
    overwrite: bool = False
    """with --predict: replace the predictions already in <out-dir>/predictions"""
    epochs: int = common.arg(10, at_least=1)
    """training epochs, each of which clusters the features anew"""
    # The labels are held as uint8.
    num_clusters: int | None = common.arg(None, at_least=2, at_most=256)
    """clusters K (default: the number of classes, 27 for COCO-Stuff-27 and Cityscapes)"""
    # At least a 4 x 4 feature map (stride 4), so that view 2's crop spans more than one feature.
    image_size: int = common.arg(320, at_least=16)
    """training and evaluation resolution, the network's input (decoded at 2x for view 1's crops)"""
    weights: Literal["imagenet", "none"] = "imagenet"
    """ResNet-18 initialisation: torchvision's ImageNet weights (the paper) or random"""
    balance: Literal["proportional", "inverse", "none"] = "proportional"
    """cross-entropy class weights from cluster sizes: proportional (the official code's; it
    weighs large clusters more), inverse (the paper's stated aim: every cluster alike), none"""
    lr: float = common.arg(1e-4, above=0)
    """Adam learning rate (1e-3 for Cityscapes), no weight decay"""
    min_scale: float = common.arg(0.5, above=0, at_most=1)
    """smallest crop side as a fraction of the image side (the side is uniform in [min_scale, 1])"""
    kmeans_images: int = common.arg(5120, at_least=1)
    """training images whose pixel features k-means sees (the official 20 batches of 256)"""
    kmeans_pixels: int = common.arg(32_768_000, at_least=1)
    """pixel features k-means sees, spread evenly over those images (default: every pixel of 5120
    80 x 80 maps)"""
    kmeans_iters: int = common.arg(20, at_least=1)
    """Lloyd iterations of each k-means"""
    workers: int = common.arg(4, at_least=0)
    """DataLoader workers that decode the streamed data sets (COCO-Stuff, Cityscapes)"""
    log_every: int = common.arg(50, at_least=1)
    """training steps between log lines"""


# Per-data-set departures: Cityscapes trains with lr 1e-3 (the official script). The synthetic
# `shapes-seg` (1,000 training images) gets a small resolution and schedule that a CPU runs in
# minutes, offline: random initialisation, hence Cityscapes' larger learning rate, and batch 32.
DATASET_DEFAULTS = {
    "cityscapes": {"lr": 1e-3},
    "cityscapes27": {"lr": 1e-3},
    # Deviation: not in the paper: 32 px, random weights, batch 32, lr 1e-3, 6 epochs.
    "shapes-seg": {
        "image_size": 32,
        "weights": "none",
        "epochs": 6,
        "eval_every": 3,
        "batch_size": 32,
        "lr": 1e-3,
        "kmeans_images": 1000,
        "log_every": 10,
    },
}
# Splits: Cityscapes follows the official protocol (train on the unlabelled test + train_extra
# images, evaluate on train + val); the others train on train and evaluate on test (or val).
SPLITS = {"cityscapes27": ("test+train_extra", "val+train"), "cocostuff27": ("train", "val")}
# Too large for memory: decoded from disk by DataLoader workers.
STREAMED = ("cocostuff27", "cityscapes27")


def choose_num_clusters(args: Args, num_classes: int, num_fit: int) -> int:
    """K: --num-clusters, or the number of classes; checked against what the labels and k-means
    can hold (`num_fit` training images feed k-means)."""
    num_clusters = args.num_clusters or num_classes
    if not 2 <= num_clusters <= 256:  # only the default can be out of range here (`Args`)
        raise common.ConfigError(
            f"--num-clusters {num_clusters}: choose 2 to 256 (the data set has {num_classes} "
            f"classes)"
        )
    # `cluster_pixels`' sample: per image --kmeans-pixels / num_fit, at most all of its features.
    per_image = max(1, args.kmeans_pixels // num_fit)
    sample = num_fit * min(per_image, math.ceil(args.image_size / 4) ** 2)
    if num_clusters > sample:
        raise common.ConfigError(
            f"--num-clusters {num_clusters} exceeds the {sample} pixel features k-means sees; "
            f"raise --kmeans-pixels or --kmeans-images, or lower --num-clusters"
        )
    return num_clusters


# --------------------------------------------------------------------------------------------------
# The paper's pieces: the epoch's transforms, the two views, clustering, labels, weights, loss
# --------------------------------------------------------------------------------------------------
# MoCo v2's photometric transforms with PiCIE's strengths (Sec. 4; data/custom_transforms.py): each
# jitter op on its own coin (p = 0.8), factors 1 +/- 0.3, hue +/- 0.1, in a fixed order, then
# grayscale and blur.
PHOTOMETRIC = dict(
    brightness=0.3,
    contrast=0.3,
    saturation=0.3,
    hue=0.1,
    jitter_p=0.8,
    jitter_each=True,
    random_order=False,
    # Deviation: grayscale applied (official: never, it checks for "gray", its flag adds "grey").
    grayscale_p=0.2,
    # Deviation: blur sigma U[0.1, 2] (official: a radius from the coin itself, never in [0.1, 2]).
    blur_p=0.5,
    blur_sigma=(0.1, 2.0),
)


def draw_epoch_transforms(n: int, min_scale: float = 0.5, generator=None, device=None) -> dict:
    """The random transforms of one epoch for n images, drawn once so that the clustering pass, the
    labelling pass and the training pass all see the same views of image i: photometric parameters
    `p1`, `p2` (dicts of (n, ...) tensors), square crop `boxes` (n, 4) = (x0, y0, side, side) in
    fractions of the image (side uniform in [min_scale, 1], position uniform), `flip` (n,)."""
    p1 = common.draw_photometric(n, **PHOTOMETRIC, generator=generator, device=device)
    p2 = common.draw_photometric(n, **PHOTOMETRIC, generator=generator, device=device)
    side = min_scale + (1 - min_scale) * torch.rand(n, generator=generator, device=device)
    x0 = torch.rand(n, generator=generator, device=device) * (1 - side)
    y0 = torch.rand(n, generator=generator, device=device) * (1 - side)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return {"p1": p1, "p2": p2, "boxes": torch.stack([x0, y0, side, side], 1), "flip": flip}


def pick(params: dict, idx: torch.Tensor) -> dict:
    """The rows of a batch's images `idx` from per-image parameters (nested dicts of tensors)."""
    return {k: pick(v, idx) if isinstance(v, dict) else v[idx] for k, v in params.items()}


def geometric(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size=None) -> torch.Tensor:
    """Crop each map of x (B, C, H, W) to its box, flip where `flip`, resize to `size` (default:
    x's own size), bilinear: view 1's transform of an image, and view 2's of a feature map.
    Sample points within half a pixel of the edge read the edge, as the official crop +
    F.interpolate does."""
    # Deviation: continuous boxes, one resampling (official: integer boxes, then F.interpolate).
    return common.resized_crop(x, boxes, flip, size or x.shape[-2:])


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [0, 1] images (B, 3, H, W) -> float [0, 1] at size x size, bilinear, antialiased."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def pixel_features(
    model: nn.Module, x: torch.Tensor, stats, amp: bool = False, unit: bool = True
) -> torch.Tensor:
    """Features (B, 128, H/4, W/4) of [0, 1] images, L2-normalised along channels unless `unit`
    is False; every use of a feature (k-means, labels, loss, evaluation) sees it normalised (the
    official metric "cosine")."""
    x = common.normalize(x, *stats)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        z = model(x).float()
    return F.normalize(z, dim=1) if unit else z


def view_features(
    model: nn.Module,
    images: torch.Tensor,
    transforms: dict,
    view: int,
    size: int,
    stats,
    amp: bool = False,
) -> torch.Tensor:
    """Z_v (B, 128, size/4, size/4) of uint8 images (B, 3, 2 size, 2 size) under their epoch
    `transforms` (`pick`ed for the batch). View 1: P1, then crop + flip of the image to size.
    View 2: P2, resized to size, then the same crop + flip of the feature map (Sec. 3.3)."""
    x = images.float() / 255
    boxes = transforms["boxes"]
    flip = transforms["flip"]
    if view == 1:
        # P1 in every pass, as the official COCO training set (`coco_train_dataset.py`). Its
        # Cityscapes one (and early COCO versions) computes P1(x) and then feeds x itself.
        x1 = geometric(common.apply_photometric(x, transforms["p1"]), boxes, flip, size)
        return pixel_features(model, x1, stats, amp)
    x2 = shrink(common.apply_photometric(x, transforms["p2"]), size)
    z = pixel_features(model, x2, stats, amp, unit=False)
    return F.normalize(geometric(z, boxes, flip), dim=1)  # resampled, then normalised (official)


def sample_pixels(z: torch.Tensor, per_image: int, generator=None) -> torch.Tensor:
    """`per_image` random pixel features of each map z (B, C, h, w), or all of them if fewer:
    (B * per_image, C)."""
    b, c, h, w = z.shape
    flat = z.flatten(2).transpose(1, 2)  # (B, h w, C)
    if per_image >= h * w:
        return flat.reshape(-1, c)
    positions = torch.rand(b, h * w, generator=generator, device=z.device).argsort(1)[:, :per_image]
    return flat.gather(1, positions[:, :, None].expand(-1, -1, c)).reshape(-1, c)


@torch.no_grad()
def cluster_pixels(
    features_of, source, idx: torch.Tensor, num_clusters: int, seed: int, args: Args
) -> tuple[torch.Tensor, float]:
    """k-means (K = num_clusters) on --kmeans-pixels pixel features spread evenly over the images
    `idx` of `source` (`features_of(idx, images)`: a batch's feature maps). Returns the centroids
    (K, C) and the mean squared distance of the sample to them (the k-means loss)."""
    generator = torch.Generator(device=idx.device).manual_seed(seed)
    per_image = max(1, args.kmeans_pixels // len(idx))
    sample = []
    for batch_idx, images, _ in batches(source, idx, args.batch_size, args.workers):
        sample.append(sample_pixels(features_of(batch_idx, images), per_image, generator))
    sample = torch.cat(sample)
    # Deviation: one k-means on the sample (official: on all pixels of 20 batches, then running
    # means of the centroids over every other batch).
    centroids, labels = common.kmeans(sample, num_clusters, iters=args.kmeans_iters, seed=seed)
    return centroids, float((sample - centroids[labels]).square().sum(1).mean())


def assign_labels(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (Euclidean) of every pixel of z (B, C, h, w) -> (B, h, w): the argmax of
    2 z . mu_k - |mu_k|^2 (the official compute_negative_euclidean; centroids not normalised)."""
    squared_norms = centroids.square().sum(1)[None, :, None, None]
    return (2 * cluster_logits(z, centroids) - squared_norms).argmax(1)


def cluster_weights(counts: torch.Tensor, balance: str = "proportional") -> torch.Tensor:
    """Cross-entropy class weights (K,) from the cluster sizes n_k of one view, summing to 1.
    "proportional": w_k = n_k / sum n (the official code, which produced the published numbers:
    large clusters weigh *more*); "inverse": w_k ~ 1 / n_k (the paper's stated aim, that small
    clusters are not drowned; questioned in the official issue 28); "none": uniform. Empty
    clusters weigh 0 (no pixel carries their label)."""
    counts = counts.double()
    if balance == "proportional":
        w = counts
    elif balance == "inverse":
        w = torch.where(counts > 0, 1 / counts.clamp_min(1), 0.0)
    elif balance == "none":
        w = torch.ones_like(counts)
    else:
        raise ValueError(f"balance must be proportional, inverse or none, got {balance!r}")
    return (w / w.sum()).float()


def cluster_logits(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The frozen classifier of Sec. 3.2: a 1x1 convolution whose weights are the centroids and
    whose bias is 0, logits_k = z . mu_k: (B, C, h, w), (K, C) -> (B, K, h, w)."""
    return torch.einsum("bchw,kc->bkhw", z, centroids.to(z.dtype))


def picie_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    y1: torch.Tensor,
    y2: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PiCIE objective (Eq. 5-7): with CE_v the cross-entropy weighted by w_v (mean over
    pixels, weighted as torch's `weight`), features Z (B, C, h, w), labels y (B, h, w),
    L_within = [CE_1(mu_1 . Z1, y1) + CE_2(mu_2 . Z2, y2)] / 2,
    L_cross  = [CE_2(mu_2 . Z1, y2) + CE_1(mu_1 . Z2, y1)] / 2,
    L = (L_within + L_cross) / 2. Returns L, L_within, L_cross."""

    def ce(z, mu, y, w):
        return F.cross_entropy(cluster_logits(z.float(), mu), y.long(), weight=w)

    within = (ce(z1, mu1, y1, w1) + ce(z2, mu2, y2, w2)) / 2
    cross = (ce(z1, mu2, y2, w2) + ce(z2, mu1, y1, w1)) / 2
    return (within + cross) / 2, within, cross


# --------------------------------------------------------------------------------------------------
# The networks: ResNet-18 and a top-down FPN (128-d, stride 4)
# --------------------------------------------------------------------------------------------------
def imagenet_resnet(name: str, weights: str = "imagenet") -> nn.Module:
    """torchvision's ResNet `name` (resnet18, resnet50, ...): with ImageNet weights from torch.hub's
    cache (downloaded there once when online), or random (torchvision's initialisation) for
    weights "none". Offline without the file, a message says where to put it."""
    net = getattr(torchvision.models, name)()
    if weights == "imagenet":
        url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        try:
            state = torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
        except (OSError, RuntimeError) as e:  # offline (URLError is an OSError) or a corrupt file
            raise common.ConfigError(
                f"--weights imagenet needs {path.name}, which is not in {path.parent} (where "
                f"torchvision looks for it; $TORCH_HOME moves it) and could not be downloaded "
                f"from {url} ({e}). Put the file there, or run with --weights none (random "
                f"initialisation)"
            ) from None
        net.load_state_dict(state)
    return net


class PiCIENet(nn.Module):
    """ResNet-18 without pooling and fc, giving res2..res5 (64/128/256/512 channels, strides
    4/8/16/32), and the official FPN decoder: a 1x1 convolution (with bias) per level to 128
    channels; from res5 down, upsample bilinearly to the next finer level and add its projection.
    Output: the stride-4 sum, (B, 128, H/4, W/4) (128 x 80 x 80 for 320 x 320). No extra
    convolutions, batch norm or ReLU in the decoder."""

    def __init__(self, weights: str = "imagenet", dim: int = 128):
        super().__init__()
        net = imagenet_resnet("resnet18", weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)  # stride 4
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.lateral = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in (64, 128, 256, 512)])

    def forward(self, x):  # (B, 3, H, W) -> (B, 128, H/4, W/4)
        x = self.stem(x)
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)  # res2 (stride 4), res3, res4, res5 (stride 32)
        out = self.lateral[3](levels[3])
        for lateral, level in zip(self.lateral[2::-1], levels[2::-1], strict=True):
            size = level.shape[-2:]
            upsampled = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            out = upsampled + lateral(level)
        return out


# --------------------------------------------------------------------------------------------------
# Data: square images at twice the working size, in memory or streamed from disk
# --------------------------------------------------------------------------------------------------
class Squares(torch.utils.data.Dataset):
    """A segmentation set (shorter side already at `side`) centre-cropped to side x side, the
    official BaseTransform; items (index, image uint8 (3, side, side), label (side, side))."""

    def __init__(self, data: common.SegmentationSet, side: int):
        self.data = data
        self.side = side

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        top = (image.shape[1] - self.side) // 2
        left = (image.shape[2] - self.side) // 2
        rows = slice(top, top + self.side)
        cols = slice(left, left + self.side)
        return index, image[:, rows, cols], label[rows, cols]


def loader_name(dataset: str) -> str:
    """--dataset cityscapes means PiCIE's 27 classes (common's cityscapes27)."""
    return "cityscapes27" if dataset == "cityscapes" else dataset


def load_split(args: Args, split: str, device) -> tuple:
    """(source, number of images, class names) of one split decoded at twice --image-size (the
    official res2 = 640 for 320). source: (images, labels) on the device, or a `Squares` set
    decoded on demand (STREAMED sets)."""
    name = loader_name(args.dataset)
    data_dir = args.data_dir
    if data_dir is None and name not in ("shapes-seg", "segfolder"):
        data_dir = f"data/{args.dataset}"
    data = common.load_segmentation(name, split, data_dir, image_size=2 * args.image_size)
    squares = Squares(data, 2 * args.image_size)
    if name in STREAMED:
        return squares, len(squares), data.classes
    print(f"decoding {len(squares)} {split} images", flush=True)
    _, images, labels = torch.utils.data.default_collate([squares[i] for i in range(len(squares))])
    return (images.to(device), labels.to(device)), len(images), data.classes


@dataclasses.dataclass
class PicieData:
    """The run's data (`load_data`): both splits as `batches` sources, the class count, K, the
    normalisation statistics, and `fit_idx`, the --kmeans-images training images whose features
    every evaluation's k-means sees (drawn once from the seed)."""

    train_source: tuple | Squares
    eval_source: tuple | Squares
    num_train: int
    num_eval: int
    num_classes: int
    num_clusters: int
    stats: tuple
    fit_idx: torch.Tensor
    description: str
    classes: list = dataclasses.field(default_factory=list)  # their names, for --predict
    eval_split: str = "test"  # the split every figure is on


def load_data(args: Args, device) -> PicieData:
    """The run's `PicieData` (SPLITS), the input checked before anything is written."""
    info = common.dataset_info(args.dataset, "segment")
    train_split, eval_split = SPLITS.get(loader_name(args.dataset), ("train", "test"))
    train_source, num_train, classes = load_split(args, train_split, device)
    eval_source, num_eval, _ = load_split(args, eval_split, device)
    fit_generator = torch.Generator().manual_seed(args.seed)
    fit_idx = torch.randperm(num_train, generator=fit_generator)[: args.kmeans_images].to(device)
    num_clusters = choose_num_clusters(args, len(classes), len(fit_idx))
    # Batch norm in train mode needs more than one value per channel: res5 is 1 x 1 up to 32 px.
    # Under torchrun, each process normalises its own share of the batch.
    processes = common.world_size()
    if min(args.batch_size, num_train) < 2 * processes and args.image_size <= 32:
        each = f" ({processes} processes: one image each)" if processes > 1 else ""
        raise common.ConfigError(
            f"--batch-size {args.batch_size} with {num_train} training images makes batches of "
            f"one image{each}, which batch norm cannot take at --image-size {args.image_size}: "
            f"use a batch of at least {2 * processes}, or --image-size above 32"
        )
    description = f"{num_train} training ({train_split}) and {num_eval} evaluation ({eval_split})"
    return PicieData(
        train_source=train_source,
        eval_source=eval_source,
        num_train=num_train,
        num_eval=num_eval,
        num_classes=len(classes),
        num_clusters=num_clusters,
        stats=(info.mean, info.std),
        fit_idx=fit_idx,
        description=description,
        classes=list(classes),
        eval_split=eval_split,
    )


def without_lone_image(idx: torch.Tensor, batch_size: int, processes: int = 1) -> torch.Tensor:
    """`idx` less its last image where that image would make a batch of its own: batch norm in
    train mode cannot take one value per channel. Under torchrun (`processes` > 1), the last,
    partial batch is cut to a multiple of the processes, and left out where that would give each
    process one image."""
    # Deviation: under torchrun up to `processes` images an epoch are left out (official: one
    # process, nn.DataParallel splits any batch; DDP's DistributedSampler would repeat images).
    last = len(idx) % batch_size
    cut = last % processes
    if last - cut == processes and len(idx) > processes:
        cut = last
    return idx[: len(idx) - cut]


def process_share(idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's share (`common.share`) of every batch of `idx`, `batch_size` at a time, in
    order: batches of `batch_size // common.world_size()` (the last one smaller); all of `idx` in
    one process. The last batch must split evenly (`without_lone_image`)."""
    starts = range(0, len(idx), batch_size)
    return torch.cat([common.share(idx[start : start + batch_size]) for start in starts])


def batches(source, idx: torch.Tensor, batch_size: int, workers: int = 0):
    """(indices, uint8 images, labels) of the images `idx` in that order, `batch_size` at a time,
    on idx's device: slices of in-memory tensors, or decoded from disk by DataLoader workers."""
    if isinstance(source, tuple):
        images, labels = source
        for start in range(0, len(idx), batch_size):
            batch = idx[start : start + batch_size]
            yield batch, images[batch], labels[batch]
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source, idx.tolist()),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=idx.is_cuda,
    )
    for batch, images, labels in loader:
        yield (
            batch.to(idx.device),
            images.to(idx.device, non_blocking=True),
            labels.to(idx.device, non_blocking=True),
        )


# --------------------------------------------------------------------------------------------------
# Evaluation: fresh k-means, Hungarian matching, pixel accuracy and mIoU
# --------------------------------------------------------------------------------------------------
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


@torch.no_grad()
def evaluate(
    model: nn.Module, data: PicieData, args: Args, amp: bool = False, show: int = 6
) -> tuple[dict, tuple]:
    """Step 7: k-means (`cluster_pixels`) on the un-augmented images `data.fit_idx`, logits resized
    bilinearly to the label size. Returns the scores (miou, pixel_acc, per-class iou) and `show`
    images spread evenly over the split, their labels and matched predictions (255 where a cluster
    matched no class). Every network is judged with batch-norm statistics recomputed on those
    un-augmented images (`clean_batch_norm`), as the official evaluation re-estimates them."""
    with clean_batch_norm(model, data, args):
        scores, pictures = evaluate_as_is(model, data, args, amp, show)
        # the statistics it was judged with, kept with its centroids for --predict
        scores["batch_norm"] = {
            name.removeprefix("_orig_mod."): buffer.clone()
            for name, buffer in model.state_dict().items()
            if "running_" in name
        }
    return scores, pictures


@torch.no_grad()
def evaluate_as_is(
    model: nn.Module, data: PicieData, args: Args, amp: bool = False, show: int = 6
) -> tuple[dict, tuple]:
    """`evaluate` with the network's batch-norm statistics as they are."""
    model.eval()
    size = args.image_size

    def features_of(idx, images):
        return pixel_features(model, shrink(images, size), data.stats, amp)

    fit_idx = data.fit_idx
    centroids, _ = cluster_pixels(
        features_of, data.train_source, fit_idx, data.num_clusters, args.seed, args
    )
    # Under torchrun every process evaluates the whole split (rank 0 alone writes); rank 0's
    # centroids, so that all hold the clusters that are reported and kept for --predict.
    common.broadcast_(centroids)
    conf = torch.zeros(data.num_classes, data.num_clusters, dtype=torch.long, device=fit_idx.device)
    shown = []
    picks = set(torch.linspace(0, data.num_eval - 1, show).round().long().tolist())
    eval_idx = torch.arange(data.num_eval, device=fit_idx.device)
    for idx, images, labels in batches(data.eval_source, eval_idx, args.batch_size, args.workers):
        x = shrink(images, size)
        y = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        logits = cluster_logits(pixel_features(model, x, data.stats, amp), centroids)
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        conf += common.confusion_matrix(pred, y, data.num_classes, num_clusters=data.num_clusters)
        keep = [j for j, i in enumerate(idx.tolist()) if i in picks]
        shown.append((x[keep], y[keep], pred[keep]))
    scores = common.segmentation_scores(conf, hungarian=True)
    if data.num_clusters != data.num_classes:  # overclustering: many-to-one beside one-to-one
        many = common.majority_segmentation_scores(conf)
        scores["majority_miou"] = many["miou"]
        scores["majority_pixel_acc"] = many["pixel_acc"]
    scores["centroids"] = centroids  # the clusters, for --predict
    # label-free: how evenly the evaluated pixels fill the K clusters
    scores["size_balance"] = common.count_balance(conf.sum(0))
    match = torch.tensor([c if c >= 0 else 255 for c in scores["match"]], device=conf.device)
    x, y, pred = (torch.cat(part) for part in zip(*shown, strict=True))
    return scores, (x, y, match[pred])


def fit_batch_norm(model: nn.Module, data: PicieData, args: Args) -> None:
    """`recompute_batch_norm` on the un-augmented training images `data.fit_idx`."""
    fit_even = without_lone_image(data.fit_idx, args.batch_size)
    fit_batches = batches(data.train_source, fit_even, args.batch_size, args.workers)
    inputs = (common.normalize(shrink(x, args.image_size), *data.stats) for _, x, _ in fit_batches)
    recompute_batch_norm(model, inputs)
    # Under torchrun every process fits the same images; rank 0's statistics, so that no rounding
    # can part them (the baseline's are those training starts from).
    for buffer in model.buffers():
        common.broadcast_(buffer)


@contextlib.contextmanager
def clean_batch_norm(model: nn.Module, data: PicieData, args: Args):
    """Within the block, `model`'s batch-norm statistics are those of the clean training images
    (`fit_batch_norm`); after it, the statistics training left are back, so an evaluation does
    not change the run (its eval-mode clustering reads them)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    fit_batch_norm(model, data, args)
    try:
        yield
    finally:
        for bn, (mean, var) in zip(bns, saved, strict=True):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)


def untrained_baseline(model: nn.Module, forward, data: PicieData, args: Args, amp: bool) -> dict:
    """Step 7 on the untrained network (`forward`: as the passes call it), its batch-norm statistics
    first recomputed on the images `data.fit_idx`; training starts from this network."""
    # Deviation: batch norm recomputed at the start (official: ImageNet's statistics).
    fit_batch_norm(model, data, args)
    scores, _ = evaluate_as_is(forward, data, args, amp)
    return scores


@torch.no_grad()
def constant_baseline(data: PicieData, args: Args) -> dict:
    """The scores of putting every pixel in one cluster, under the same Hungarian matching and at
    the same label size as `evaluate`: the answer a method must beat to have learned anything
    (its pixel accuracy is the largest class's share)."""
    size = args.image_size
    conf = torch.zeros(data.num_classes, data.num_clusters, dtype=torch.long)
    conf = conf.to(data.fit_idx.device)
    eval_idx = torch.arange(data.num_eval, device=data.fit_idx.device)
    for _, _, labels in batches(data.eval_source, eval_idx, args.batch_size, args.workers):
        y = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        one_cluster = torch.zeros_like(y)
        conf += common.confusion_matrix(
            one_cluster, y, data.num_classes, num_clusters=data.num_clusters
        )
    return common.segmentation_scores(conf, hungarian=True)


@torch.no_grad()
def cluster_mask(
    model: nn.Module, image: torch.Tensor, centroids, stats, size: int
) -> torch.Tensor:
    """The cluster mask (H, W) of one uint8 image (3, H, W) at its own size, as `evaluate`
    predicts: the image with its shorter side at --image-size, argmax of z . mu with the logits
    upsampled bilinearly (here to the image's own size)."""
    from torchvision.transforms.functional import resize

    model.eval()
    x = resize(image[None], size, antialias=True).float() / 255
    logits = cluster_logits(pixel_features(model, x, stats), centroids)
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


def predict(args: Args) -> dict:
    """--predict FOLDER: the finished run in --out-dir segments every image under FOLDER into
    its K clusters (`cluster_mask`) with the network as its last evaluation judged it (those batch-
    norm statistics and centroids), into <out-dir>/predictions: a mask and an overlay per image
    at its own size, and each image's cluster shares, each cluster named by its matched class."""
    run, state = common.finished_run(args.out_dir, Args)
    result = state["result"]
    if "centroids" not in result:
        raise common.ConfigError(
            f"--predict: {args.out_dir} was trained before runs kept their clusters; train anew"
        )
    device = common.select_device(args.device)
    info = common.dataset_info(loader_name(run.dataset), "segment")
    model = PiCIENet("none").to(device)
    model.load_state_dict({**state["model"], **result["batch_norm"]})
    classes = common.load_results(args.out_dir).get("classes")
    names = []
    for k, c in enumerate(result["match"]):
        names.append(f"{k} {classes[c] if classes and c >= 0 else 'unmatched'}")
    out = common.predictions_dir(args.out_dir, args.overwrite)
    paths, images = common.read_new_images(args.predict)  # each at its own size
    centroids = result["centroids"].to(device)
    masks = []
    for i, image in enumerate(images):
        masks.append(
            cluster_mask(model, image.to(device), centroids, (info.mean, info.std), run.image_size)
        )
        if (i + 1) % 100 == 0:
            print(f"segmented {i + 1} of {len(images)} images", flush=True)
    return common.write_mask_predictions(out, paths, images, masks, names, len(names))


def log_scores(prefix: str, scores: dict) -> dict:
    """The log record of an evaluation: <prefix>/miou and <prefix>/pixel_acc."""
    return {f"{prefix}/miou": scores["miou"], f"{prefix}/pixel_acc": scores["pixel_acc"]}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def picie_net_and_optimizer(args: Args, device) -> tuple:
    """PiCIENet (built first: it checks the ImageNet weights before anything is written), its Adam
    optimizer, and the network the passes call (compiled with --compile)."""
    model = PiCIENet(args.weights).to(device)
    # Channels-last weights, except when compiled: torch 2.11's inductor failed a stride check in
    # conv backward with them.
    if device.type == "cuda" and not args.compile:
        model = model.to(memory_format=torch.channels_last)
    # No weight decay (official: Adam, lr only).
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    forward = torch.compile(model) if args.compile else model
    return model, optimizer, forward


def restore(book: common.RunBook, model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Network, optimizer and torch's global random states from a resumed run's checkpoint;
    returns its baseline and last evaluation scores."""
    model.load_state_dict(book.checkpoint["model"])
    optimizer.load_state_dict(book.checkpoint["optimizer"])
    book.restore_global_rng()
    return book.checkpoint["baseline"], book.checkpoint["result"]


@torch.no_grad()
def label_view(features, data: PicieData, transforms: dict, view: int, centroids, args: Args):
    """Step 4 for one view: every pixel of every training image gets its nearest centroid
    (uint8 (n, h, w), in memory); also the cluster sizes and, as a diagnostic never used in
    training, the confusion of the labels with the truth moved by the same crop and flip."""
    labels = None
    counts = torch.zeros(len(centroids), dtype=torch.long, device=centroids.device)
    conf = 0
    all_idx = torch.arange(data.num_train, device=centroids.device)
    for idx, images, truth in batches(data.train_source, all_idx, args.batch_size, args.workers):
        y = assign_labels(features(idx, images, transforms, view), centroids)
        if labels is None:
            # Deviation: labels in memory (official: one file per image, view and epoch).
            labels = torch.empty(data.num_train, *y.shape[1:], dtype=torch.uint8, device=y.device)
        labels[idx] = y.to(torch.uint8)
        counts += torch.bincount(y.flatten(), minlength=len(centroids))
        # both views' labels lie in the crop's frame (view 2's through its feature map)
        boxes = transforms["boxes"][idx]
        flip = transforms["flip"][idx]
        truth = common.resized_crop(truth, boxes, flip, y.shape[1:], mode="nearest", fill=255)
        conf += common.confusion_matrix(y, truth, data.num_classes, num_clusters=len(centroids))
    return labels, counts, common.segmentation_scores(conf, hungarian=True)["miou"]


@torch.no_grad()
def cluster_and_label(features, data: PicieData, fit_idx, transforms: dict, seed: int, args: Args):
    """Steps 3-4, in the official order: both views' k-means on the images `fit_idx`, then both
    label passes over all images (`features(idx, images, transforms, view)`: a batch's Z_v). Returns
    `clusters` (per view the centroids, labels and `cluster_weights`) and the epoch's log record
    (k-means losses, cluster sizes, label mIoU)."""
    record = {}
    centroids = []
    for view in (1, 2):
        features_of = functools.partial(features, transforms=transforms, view=view)
        mu, inertia = cluster_pixels(
            features_of, data.train_source, fit_idx, data.num_clusters, seed + view, args
        )
        # Under torchrun every process clusters the same features; rank 0's centroids decide, so
        # that no rounding can part the processes' labels.
        centroids.append(common.broadcast_(mu))
        record[f"cluster/kmeans_loss{view}"] = inertia
    labels = []
    weights = []
    for view in (1, 2):
        y, counts, label_miou = label_view(
            features, data, transforms, view, centroids[view - 1], args
        )
        # rank 0's labels and weights too: they are the targets of every process's share
        labels.append(common.broadcast_(y))
        weights.append(common.broadcast_(cluster_weights(counts, args.balance)))
        sizes = counts.float() / counts.sum()
        record[f"cluster/min_size{view}"] = sizes.min()
        record[f"cluster/max_size{view}"] = sizes.max()
        record[f"diag/label_miou{view}"] = label_miou
    return (centroids, labels, weights), record


def train_step(
    model: nn.Module, features, optimizer, idx, images, transforms: dict, clusters: tuple
) -> torch.Tensor:
    """Steps 5-6 on one batch: `picie_loss` on both views against the epoch's `clusters`, one Adam
    step of `model` (`features` runs it). Returns L, L_within, L_cross, detached. Under torchrun
    the batch is this process's share, and the gradient is averaged over the processes."""
    centroids, labels, weights = clusters
    z1 = features(idx, images, transforms, 1)
    z2 = features(idx, images, transforms, 2)
    loss, within, cross = picie_loss(z1, z2, *centroids, labels[0][idx], labels[1][idx], *weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Under torchrun: the average of the processes' gradients (each a mean over its own share, as
    # DistributedDataParallel's), and rank 0's batch-norm statistics. The centroids are frozen.
    common.synchronize(model)
    optimizer.step()
    return torch.stack([loss.detach(), within.detach(), cross.detach()])


def report(
    out,
    result: dict,
    baseline: dict,
    constant: dict,
    num_clusters: int,
    args: Args,
    figures,
    weights: list[float],
) -> dict:
    """results.json, and its floats printed: the last evaluation beside the untrained network
    (`baseline_*`) and the one-cluster answer (`constant_*`) (`iou`: None for a class never
    present), K, the epochs and the run's `figures` (`common.RunBook.figures`); and `weights`,
    the network's checksum in each process (`common.weights_checksum`)."""
    rows = {"constant answer (one cluster)": constant, "untrained network": baseline}
    rows["after PiCIE"] = result
    common.print_table(
        {name: {k: row[k] for k in ("miou", "pixel_acc")} for name, row in rows.items()}
    )
    results = {
        "miou": result["miou"],
        "pixel_acc": result["pixel_acc"],
        "baseline_miou": baseline["miou"],
        "baseline_pixel_acc": baseline["pixel_acc"],
        "constant_miou": constant["miou"],
        "constant_pixel_acc": constant["pixel_acc"],
        **{
            k: result[k]
            for k in ("size_balance", "majority_miou", "majority_pixel_acc")
            if k in result
        },
        "iou": [None if math.isnan(v) else v for v in result["iou"]],
        "num_clusters": num_clusters,
        "epochs": args.epochs,
        **figures,
    }
    floats = " ".join(f"{key}={v:.4g}" for key, v in results.items() if isinstance(v, float))
    print(f"results: {floats}", flush=True)
    results["weights_checksum"] = weights  # one per process: equal when they agree
    return common.write_results(out, results)


def train(args: Args) -> dict:
    """The data and the network; the baseline (step 7 on the untrained network); then per epoch
    steps 1-6 and the evaluation. Resumable from the end of any checkpointed epoch. Under
    torchrun, every process runs every pass over the whole data set but the training, of which it
    takes its share of each batch."""
    device = common.start_processes(args.device)  # under torchrun, this process's device
    common.check_batches({"--batch-size": args.batch_size})
    common.set_seed(args.seed)
    data = load_data(args, device)
    model, optimizer, forward = picie_net_and_optimizer(args, device)
    out = common.prepare_out_dir(args.out_dir, args.resume, args)
    print(
        f"picie: {args.dataset} on {device}, {data.description} images at {args.image_size} px, "
        f"K = {data.num_clusters}, ResNet-18 FPN ({args.weights} weights)",
        flush=True,
    )
    amp = args.amp and device.type == "cuda"

    def features(idx, images, transforms, view):  # step 2 on this run's network: a batch's Z_v
        batch_transforms = pick(transforms, idx)
        return view_features(
            forward, images, batch_transforms, view, args.image_size, data.stats, amp
        )

    book = common.RunBook(out, args, device)
    start = book.checkpoint.get("epoch", 0)
    book.start_log(total=args.epochs, start=start)
    if args.resume:
        baseline, result = restore(book, model, optimizer)
        print(f"resumed after epoch {start}", flush=True)
    else:
        baseline = untrained_baseline(model, forward, data, args, amp)
        result = {}
        book.log(0, log_scores("baseline", baseline))

    shown = None
    for epoch in range(start, args.epochs):
        # Training time is the whole epoch, clustering and labelling included.
        with book.timed():
            # Steps 1-4; every draw of an epoch comes from (seed, epoch): a resumed run repeats it.
            epoch_seed = args.seed * 1_000_003 + epoch
            generator = torch.Generator(device=device).manual_seed(epoch_seed)
            transforms = draw_epoch_transforms(data.num_train, args.min_scale, generator, device)
            order_generator = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(data.num_train, generator=order_generator).to(device)
            # Deviation: the clustering passes run in eval mode (official: train mode, so batch
            # norm uses each batch's statistics and updates its running ones).
            model.eval()
            fit_idx = order[: args.kmeans_images]
            clusters, record = cluster_and_label(
                features, data, fit_idx, transforms, epoch_seed, args
            )
            book.log(epoch, record)

            # Steps 5-6: Adam on the loss of both views, the images in this epoch's order.
            model.train()
            trained = without_lone_image(order, args.batch_size, common.world_size())
            steps = math.ceil(len(trained) / args.batch_size)
            loss_sums = torch.zeros(3, device=device)
            # Under torchrun this process loads (streamed sets: decodes) its share of each batch.
            mine = process_share(trained, args.batch_size)
            share_size = args.batch_size // common.world_size()
            epoch_batches = batches(data.train_source, mine, share_size, args.workers)
            for step, (idx, images, _) in enumerate(epoch_batches):
                loss_sums += train_step(
                    model, features, optimizer, idx, images, transforms, clusters
                )
                book.count(len(idx) * common.world_size())  # the images of all processes
                if (step + 1) % args.log_every == 0 or step + 1 == steps:
                    mean_losses = loss_sums / (step % args.log_every + 1)
                    metrics = {
                        "train/loss": mean_losses[0],
                        "train/loss_within": mean_losses[1],
                        "train/loss_cross": mean_losses[2],
                    }
                    book.log(epoch + (step + 1) / steps, metrics)
                    loss_sums = torch.zeros(3, device=device)

        evaluated = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
        if evaluated:
            result, shown = evaluate(forward, data, args, amp)
            book.log(epoch + 1, log_scores("eval", result))
        # A run resumes from an epoch's start: the checkpoint is due at epoch ends only.
        if book.save_due(evaluated):
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            book.save({**state, "epoch": epoch + 1, "baseline": baseline, "result": result})

    if shown is None:  # resumed from the final checkpoint: evaluate again for the picture
        result, shown = evaluate(forward, data, args, amp)
    common.save_segmentation_rows(out / "segmentation.png", *shown)
    constant = constant_baseline(data, args)
    figures = {**book.figures(), "classes": data.classes, "split": data.eval_split}
    weights = common.weights_checksum(model)  # the network saved in the checkpoint
    return report(out, result, baseline, constant, data.num_clusters, args, figures, weights)


def main(argv: list[str] | None = None) -> dict:
    torch.set_flush_denormal(True)  # denormal floats slow CPU training many times over
    description = __doc__.split("\n")[0]
    args = common.parse_args(Args, argv, DATASET_DEFAULTS, description, "picie", "segment")
    with common.user_errors("picie.py", args.out_dir):
        if args.predict:
            return predict(args)
        return train(args)


if __name__ == "__main__":
    main()
