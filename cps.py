"""CPS: cross pseudo supervision for semi-supervised semantic segmentation.

Paper: Xiaokang Chen, Yuhui Yuan, Gang Zeng, Jingdong Wang, "Semi-Supervised Semantic Segmentation
with Cross Pseudo Supervision", CVPR 2021, arXiv:2106.01226.
Official code: github.com/charlesCXK/TorchSemiSeg.

The idea: two segmentation networks, same architecture and backbone weights, different random
heads. On every pixel each is trained on the other's hard (argmax) prediction, so neither simply
confirms its own mistakes, and unlabelled images become extra, noisily labelled data. CutMix on
the unlabelled images makes the method stronger.

One training step, `train_step` (each name is a function below):
1. Draw B labelled and B unlabelled images (two unlabelled batches with CutMix; `labeled_partition`
   fixes the labelled ones); flip, random scale and crop on the device (`random_scale_crop`).
2. `supervised_loss`: cross-entropy of both networks on the labelled batch (ignore 255; online
   hard example mining for Cityscapes).
3. Without CutMix: `cross_pseudo_supervision_loss` trains each network on the other's argmax
   over all pixels of the labelled and the unlabelled batch.
4. With CutMix (`cutmix_cps_loss`): `draw_boxes` / `box_masks` give one mask M per pair of
   unlabelled images; without gradient, each network predicts both source batches and
   `mixed_pseudo_labels` mixes its predictions with M; `cutmix` mixes the images with M; each
   network's prediction on the mixed images is trained on the *other* network's mixed pseudo-label.
5. L = L_s + lambda L_cps; one backward pass; SGD (momentum 0.9, weight decay 1e-4 on convolution
   weights only, `parameter_groups`) with `poly_lr` decay steps both networks.
6. `evaluate`: network 1 alone, single scale, `sliding_window` of the crop size with stride 2/3
   of it, one confusion matrix over the split, mIoU and pixel accuracy.

Usage:
    python cps.py --dataset voc --data-dir DIR --labeled-ratio 1/8    # the paper's recipe (a GPU)
    python cps.py --dataset voc --data-dir DIR --labeled-ratio 1/8 --cps-weight 0  # supervised
    python cps.py --dataset cityscapes --data-dir DIR --no-cutmix     # OHEM, lambda 6, crop 800
    python cps.py --dataset shapes-seg                                # CPU, offline, about 3 min
Several GPUs: `torchrun --nproc_per_node 4 cps.py ...` splits every batch among the processes
(--batch-size stays the total) and synchronises batch norm (--sync-bn).
Single GPU: the defaults are the official 4-GPU run's total batch (8 + 8) and lr 0.01; with a
smaller batch scale the learning rate linearly (batch 4 + 4: --batch-size 4 --lr 0.005).

Expected, mIoU % on Pascal VOC 2012 val, ResNet-50 DeepLabv3+ (the paper's figures):
    labelled      1/16    1/8    1/4    1/2
    CPS          68.21  73.20  74.24  75.91
    CPS + CutMix 71.98  73.67  74.90  76.15
    supervised only, 1/8 (as CPS reports it): 69.43; Cityscapes 1/8: CPS 74.39, + CutMix 76.61.
This file on a 2-core CPU, ResNet-18 from random weights (commands in the README), mIoU of CPS /
its --cps-weight 0 twin: far too short for CPS to pay off (README, CPS: Results)
    shapes-seg defaults (8 labelled, 200 steps), seeds 0-2: 0.227 0.222 0.228 / 0.248 0.255 0.249
    CamVid 1/8 (46 labelled), 64 px, batch 4, 360 iterations, seed 0: 0.227 / 0.254
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation.deeplabv3 import ASPP

import common


# --------------------------------------------------------------------------------------------------
# Arguments: defaults are the paper's recipe for Pascal VOC 2012 (+ SBD), 1/8 labelled
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    dataset: str = "voc"
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
    # 2: batch norm in the image-pooling branch sees one value per channel and image
    batch_size: int = common.arg(8, at_least=2)
    """labelled images per step, B (as many unlabelled; two unlabelled batches with CutMix); under
    torchrun, over all processes"""
    eval_every: int = common.arg(5000, at_least=1)
    """iterations between evaluations of network 1 (a checkpoint follows each)"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on the CPU)"""
    compile: bool = False
    """torch.compile the network(s)"""
    predict: str | None = None
    """a folder of new images: the finished run in --out-dir segments them (network 1) into
    <out-dir>/predictions, a mask at each image's own size, instead of training"""
    overwrite: bool = False
    """with --predict: replace the predictions already in <out-dir>/predictions"""
    labeled_ratio: float = common.arg(0.125, above=0, at_most=1)
    """labelled fraction of the training images, drawn with the seed (paper: 1/16, 1/8, 1/4, 1/2)"""
    labeled_list: str | None = None
    """list of the labelled images, one a line (official split files); overrides --labeled-ratio"""
    iterations: int = common.arg(39_338, at_least=1)
    """training iterations (official 1/8 run: 34 epochs of 1,157; about the same at every split)"""
    # 32: output stride 16 leaves 2 x 2 features, the least with a neighbourhood
    image_size: int | None = common.arg(None, at_least=32)
    """shorter side of every image after loading (default: as stored)"""
    crop_size: int = common.arg(512, at_least=32)
    """side of the random training crops and of the sliding evaluation window"""
    backbone: Literal["resnet50", "resnet101", "resnet18"] = "resnet50"
    """torchvision ResNet under each DeepLabv3+ (resnet18 for small machines)"""
    weights: Literal["imagenet", "none"] = "imagenet"
    """both backbones' initialisation (the same): torchvision's ImageNet weights or random"""
    # True: the official multi-GPU run builds both networks with synchronised batch norm
    # (TorchSemiSeg exp.voc/voc8.res50v3+.CPS+CutMix/train.py: `if engine.distributed:
    # BatchNorm2d = SyncBatchNorm`, apex's)
    sync_bn: bool = True
    """under torchrun on CUDA, batch norm over the whole global batch (torch's SyncBatchNorm; not
    on the CPU, where each process normalises its own share)"""
    cutmix: bool = True
    """CutMix on the unlabelled images (two unlabelled batches per step)"""
    cps_weight: float | None = common.arg(None, at_least=0)
    """lambda, weight of the CPS loss (default: 1.0 with CutMix, 1.5 without; Cityscapes 5 / 6);
    0: supervised only"""
    lr: float = common.arg(0.01, above=0)
    """SGD learning rate at batch 8 + 8, decayed as lr (1 - k / K)^0.9"""
    weight_decay: float = common.arg(1e-4, at_least=0)
    """weight decay on convolution weights (none on batch norm and biases)"""
    ohem: bool = False
    """online hard example mining in the supervised loss (on by default for Cityscapes)"""
    pseudo_label_mode: Literal["train", "eval"] = "train"
    """batch-norm mode of the no-gradient CutMix passes making pseudo-labels (train: official)"""
    twin: bool = True
    """after CPS, train its supervised twin (--cps-weight 0: the same labelled images, iterations
    and schedule, no unlabelled ones) in <out-dir>/twin, reported beside it (twin_miou)"""
    full_twin: bool = False
    """also train a supervised network on every training image, labelled (--labeled-ratio 1
    --cps-weight 0, the same iterations) in <out-dir>/full_twin: the headroom that unlabelled
    images could close at most (full_twin_miou)"""
    workers: int = common.arg(4, at_least=0)
    """DataLoader workers that decode the streamed data sets (VOC, Cityscapes) and pad a folder
    whose images differ in size"""
    log_every: int = common.arg(50, at_least=1)
    """iterations between log lines"""


# Departures from the VOC recipe. Cityscapes (official config and script): lr 0.02, 800 crops, OHEM,
# 137 epochs of 325 iterations. CamVid (no published CPS figure): crops of its native 360 px height.
DATASET_DEFAULTS = {
    "cityscapes": {"lr": 0.02, "crop_size": 800, "ohem": True, "iterations": 44_525},
    "camvid": {"crop_size": 360},
    # Deviation: not in the paper. The synthetic `shapes-seg` (64 px) gets what a CPU runs offline
    # in about 3 minutes: 32 px crops, ResNet-18 from random weights, batch 4 + 4, 8 labelled.
    "shapes-seg": {
        "crop_size": 32,
        "backbone": "resnet18",
        "weights": "none",
        "iterations": 200,
        "lr": 0.02,
        "batch_size": 4,
        "labeled_ratio": 1 / 128,
        "eval_every": 200,
        "log_every": 50,
        "workers": 0,
    },
}
# lambda (without CutMix, with CutMix), the paper's; the others take VOC's (1.5, 1.0)
CPS_WEIGHTS = {"cityscapes": (6.0, 5.0)}
# Decoded from disk by DataLoader workers, evaluated on val; the others are held in memory and
# evaluated on test (segfolder: or val).
STREAMED = ("voc", "cityscapes")
SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)  # random scales of the training images (official config)


# --------------------------------------------------------------------------------------------------
# The paper's pieces: split, losses, CutMix masks, augmentation, schedule, parameter groups
# --------------------------------------------------------------------------------------------------
def labeled_partition(
    names: list[str], ratio: float, seed: int, list_file: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(labelled indices, unlabelled indices, description) of a training set whose images are
    called `names`: the images a list file names (first token of each line, by file stem, as the
    official lists `image/x.jpg<TAB>label/x.png`), or round(ratio n) of them drawn with the seed."""
    n = len(names)
    if list_file is not None:
        path = Path(list_file)
        if not path.is_file():
            raise common.ConfigError(f"--labeled-list {path}: file not found")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        wanted = [Path(line.split()[0]).stem for line in lines]
        position = {name: i for i, name in enumerate(names)}
        unknown = [w for w in wanted if w not in position]
        if unknown:
            raise common.ConfigError(
                f"--labeled-list {path} names {len(unknown)} images not in the training set "
                f"(e.g. {unknown[:3]})"
            )
        if not wanted:
            raise common.ConfigError(f"--labeled-list {path} is empty")
        labeled = torch.tensor(sorted({position[w] for w in wanted}))
        description = f"the {len(labeled)} images of {path}"
    else:
        count = round(ratio * n)
        if count < 1:
            raise common.ConfigError(
                f"--labeled-ratio {ratio:.4g} of the {n} training images labels none: give at "
                f"least 1/{n}, or name the labelled images with --labeled-list"
            )
        # Deviation: a seeded random draw (official: fixed split lists, given by --labeled-list)
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        labeled = permutation[:count].sort().values
        description = f"a random {ratio:.4g} of the training set (seed {seed}), {count} images"
    unlabeled = torch.tensor(sorted(set(range(n)) - set(labeled.tolist())), dtype=torch.long)
    return labeled, unlabeled, description


def supervised_loss(
    logits: torch.Tensor, target: torch.Tensor, ohem_min_kept: int = 0, threshold: float = 0.7
) -> torch.Tensor:
    """L_s of one network: cross-entropy of logits (B, C, H, W) against labels (B, H, W), 255
    ignored. With ohem_min_kept > 0, online hard example mining (official ProbOhemCrossEntropy2d):
    only the batch's pixels whose true-class probability is at most max(`threshold`, the
    ohem_min_kept-th smallest) count; all when fewer than ohem_min_kept are labelled."""
    valid = target != 255
    if 0 < ohem_min_kept <= int(valid.sum()):
        with torch.no_grad():
            safe_target = torch.where(valid, target, 0)[:, None]  # (B, 1, H, W), void as class 0
            prob = torch.softmax(logits.float(), 1).gather(1, safe_target)[:, 0]  # true class
            kth = prob[valid].kthvalue(ohem_min_kept).values
            target = torch.where(valid & (prob <= torch.clamp(kth, min=threshold)), target, 255)
    return F.cross_entropy(logits.float(), target, ignore_index=255)


def cross_pseudo_supervision_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    pseudo1: torch.Tensor | None = None,
    pseudo2: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's L_cps = CE(p1, Y2) + CE(p2, Y1) (symmetric), means over all pixels of the batch;
    Y_i is network i's one-hot pseudo-label: the argmax of its logits (B, C, H, W) (no gradient, no
    confidence threshold) or, with CutMix, the mixed pseudo-labels (B, H, W) given."""
    pseudo1 = logits1.detach().argmax(1) if pseudo1 is None else pseudo1
    pseudo2 = logits2.detach().argmax(1) if pseudo2 is None else pseudo2
    return F.cross_entropy(logits1.float(), pseudo2) + F.cross_entropy(logits2.float(), pseudo1)


def draw_boxes(
    n: int,
    height: int,
    width: int,
    n_boxes: int = 3,
    prop_range=(0.25, 0.5),
    generator=None,
    device=None,
) -> torch.Tensor:
    """CutMix boxes (n, n_boxes, 4) = (y0, x0, y1, x1) in pixels, as the official BoxMaskGenerator
    draws them: area proportion a ~ U(prop_range), height proportion a^u with u ~ U(0, 1) (a random
    aspect), width a / that, both sides scaled by sqrt(1 / n_boxes) (each box covers a / n_boxes of
    the image), rounded, placed uniformly inside the image."""

    def rand():
        return torch.rand(n, n_boxes, generator=generator, device=device)

    area = prop_range[0] + (prop_range[1] - prop_range[0]) * rand()
    h_prop = area ** rand()
    props = torch.stack([h_prop, area / h_prop], -1) * math.sqrt(1 / n_boxes)  # (n, n_boxes, 2)
    extent = torch.tensor([height, width], device=device, dtype=props.dtype)
    sizes = (props * extent).round()
    corner = ((extent - sizes) * torch.stack([rand(), rand()], -1)).round()
    return torch.cat([corner, corner + sizes], -1).long()


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masks M (n, 1, H, W) in {0, 1}: starting from 0, every box toggles its pixels, so a pixel in
    two overlapping boxes is back to 0 (official: invert=True, then 1 - M inside each box)."""
    ys = torch.arange(height, device=boxes.device)[None, None, :, None]
    xs = torch.arange(width, device=boxes.device)[None, None, None, :]
    y0, x0, y1, x1 = (boxes[..., i, None, None] for i in range(4))  # (n, K, 1, 1)
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # (n, K, H, W)
    return (inside.sum(1, keepdim=True) % 2).float()


def cutmix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """X_mix = U_a (1 - M) + U_b M for images or logits (n, C, H, W), mask (n, 1, H, W)."""
    return a * (1 - mask) + b * mask


def mixed_pseudo_labels(
    logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One network's pseudo-label (n, H, W) for the mixed images: the argmax of its predictions on
    the two source batches mixed with the same mask (logits or probabilities alike: M is 0 or 1)."""
    return cutmix(logits_a.detach(), logits_b.detach(), mask).argmax(1)


def random_scale_crop(
    images: torch.Tensor,
    labels: torch.Tensor,
    sizes: torch.Tensor,
    crop: int,
    scales=SCALES,
    generator=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training augmentation, per sample on the device, as one resampling: flip
    (p = 0.5), scale s drawn from `scales`, a crop x crop window of the scaled image at a uniform
    position, or the scaled image centred in it and padded (images with 0, after normalisation,
    labels with 255). images (B, 3, H, W) normalised, zero outside each image's true `sizes`
    (B, 2) = (h, w); labels (B, H, W) -> (B, 3, crop, crop), (B, crop, crop)."""
    b = len(images)
    device = images.device
    drawn = torch.randint(len(scales), (b,), generator=generator, device=device)
    scale = torch.tensor(scales, device=device)[drawn]
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    side = (crop / scale)[:, None].expand(-1, 2)  # the window's side in the original image's pixels
    room = sizes.flip(1).float() - side  # (B, 2) as (x, y), < 0 where the scaled image is smaller
    # Deviation: continuous crop offsets, one resampling per batch (official: whole pixels, per
    # image in DataLoader workers)
    offset = torch.rand(b, 2, generator=generator, device=device) * room
    corner = torch.where(room > 0, offset, room / 2)
    canvas = torch.tensor(labels.shape[:0:-1], device=device).repeat(2)  # (W, H, W, H)
    boxes = torch.cat([corner, side], 1) / canvas  # (x0, y0, w, h) in fractions of the canvas
    images = common.resized_crop(images, boxes, flip, crop, mode="bilinear", fill=0.0)
    labels = common.resized_crop(labels, boxes, flip, crop, mode="nearest", fill=255)
    return images, labels


def poly_lr(step: int, total_steps: int, lr: float, power: float = 0.9) -> float:
    """The poly schedule: lr (1 - k / K)^0.9, no warm-up (official WarmUpPolyLR, warm-up 0)."""
    return lr * (1 - step / total_steps) ** power


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of convolutions and linear layers (tensors of 2+ dimensions),
    none on batch-norm parameters and biases, as the official code groups them."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------------------------------
# The networks: two DeepLabv3+ (output stride 16) on a torchvision ResNet
# --------------------------------------------------------------------------------------------------
# Dilations of the last stage's blocks once its stride is removed: the official multi-grid 2, 4, 8
# for the bottleneck ResNets (done by hand for all, as torchvision will not dilate basic blocks).
# Deviation: ResNet-18 (not in the paper), for small machines: rate 2 in both of its blocks.
DILATIONS = {"resnet18": (2, 2), "resnet50": (2, 4, 8), "resnet101": (2, 4, 8)}


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


def resnet(name: str, weights: str = "imagenet") -> nn.Module:
    """`imagenet_resnet` at output stride 16: no stride in its last stage, dilated (DILATIONS)."""
    # Deviation: torchvision's plain 7x7 stem and ImageNet V1 weights; the official backbone is a
    # deep-stem ResNet (resnet50_v1c) with its own weights.
    net = imagenet_resnet(name, weights)
    for block, rate in zip(net.layer4, DILATIONS[name], strict=True):  # output stride 32 -> 16
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation = (rate, rate)
                    m.padding = (rate, rate)
    return net


class DeepLabV3Plus(nn.Module):
    """ResNet (stride 16) -> ASPP (1x1, 3x3 at rates 6, 12, 18, image pooling; 256 channels each,
    concatenated, projected to 256) -> upsampled to stride 4, concatenated with the stride-4
    feature projected to 48 channels -> two 3x3 convolutions of 256 -> 1x1 classifier -> bilinear
    upsampling to the input size. Logits (B, C, H, W)."""

    def __init__(self, num_classes: int, backbone: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layers = nn.ModuleList(
            [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
        )
        low = backbone.layer1[-1].conv1.in_channels  # 256 (ResNet-18: 64)
        high = backbone.fc.in_features  # 2048 (ResNet-18: 512)
        # Deviation: torchvision's ASPP (ReLU, the pooled branch concatenated before projecting);
        # the official one has LeakyReLU and adds the projected pooled branch after the projection.
        self.aspp = ASPP(high, [6, 12, 18], 256)
        self.aspp.project[3] = nn.Identity()  # torchvision's dropout 0.5; the official has none
        self.reduce = nn.Sequential(
            nn.Conv2d(low, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU()
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def head(self) -> list[nn.Module]:
        """What each network initialises on its own (official business_layer)."""
        return [self.aspp, self.reduce, self.fuse, self.classifier]

    def forward(self, x):  # (B, 3, H, W) -> (B, C, H, W)
        size = x.shape[-2:]
        low = self.layers[0](self.stem(x))  # (B, 256, H/4, W/4)
        x = self.aspp(self.layers[3](self.layers[2](self.layers[1](low))))  # (B, 256, H/16, W/16)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        x = self.classifier(self.fuse(torch.cat([x, self.reduce(low)], 1)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def init_head(net: DeepLabV3Plus) -> None:
    """Kaiming-normal (fan in, ReLU) convolutions and unit batch norm in the head, drawn from the
    global generator: called once per network, so the two heads differ (official init_weight)."""
    for m in (m for part in net.head() for m in part.modules()):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_networks(
    num_classes: int, backbone: str, weights: str, device=None
) -> tuple[DeepLabV3Plus, DeepLabV3Plus]:
    """Two DeepLabv3+ whose backbones hold the same weights (ImageNet's, or one random draw) and
    whose heads are initialised independently (on the CPU), then moved to `device`."""
    net1 = DeepLabV3Plus(num_classes, resnet(backbone, weights))
    net2 = copy.deepcopy(net1)
    init_head(net1)
    init_head(net2)
    return net1.to(device), net2.to(device)


# --------------------------------------------------------------------------------------------------
# Data: batches as a function of the step, in memory or streamed from disk
# --------------------------------------------------------------------------------------------------
def load_split(args: Args, split: str, device) -> tuple:
    """(source, image names, class names) of one split: source is (uint8 images, uint8 labels) on
    the device, or the SegmentationSet itself: decoded by workers for the STREAMED sets, held in
    memory as lists for a folder whose images differ in size (a user's photographs)."""
    data = common.load_segmentation(
        args.dataset, split, args.data_dir, args.download, args.image_size
    )
    names = [p.stem for p, _ in data.pairs] if data.pairs else [str(i) for i in range(len(data))]
    if args.dataset in STREAMED:
        return data, names, data.classes
    decoded = data.in_memory()
    if decoded is data:  # images of different sizes: padded batch by batch, evaluated one by one
        return data, names, data.classes
    images, labels = decoded
    labels = labels.to(torch.uint8)  # class indices and 255 (void) fit in a byte
    return (images.to(device), labels.to(device)), names, data.classes


def load_data(args: Args, device, cps_weight: float) -> tuple:
    """(training source, labelled and unlabelled indices (`labeled_partition`), evaluation source
    (val for the STREAMED sets, else test), class names, a line describing them, the evaluated
    split's name), checked."""
    eval_split = "val" if args.dataset in STREAMED else "test"
    if args.dataset == "segfolder" and args.data_dir:  # its test split, or val if it has none
        eval_split = common.resolve_split(Path(args.data_dir), eval_split)
    train_source, names, classes = load_split(args, "train", device)
    eval_source, _, _ = load_split(args, eval_split, device)
    labeled, unlabeled, split_description = labeled_partition(
        names, args.labeled_ratio, args.seed, args.labeled_list
    )
    if cps_weight > 0 and not len(unlabeled):
        raise common.ConfigError(
            f"every training image is labelled ({split_description}): lower --labeled-ratio, or "
            f"pass --cps-weight 0 for supervised training"
        )
    num_eval = len(eval_source[0]) if isinstance(eval_source, tuple) else len(eval_source)
    description = f"labelled: {split_description}; {len(unlabeled)} unlabelled (train), "
    description += f"{num_eval} evaluation images ({eval_split})"
    return train_source, labeled, unlabeled, eval_source, classes, description, eval_split


def batch_indices(n: int, batch_size: int, step: int, seed: int, device) -> torch.Tensor:
    """The `step`-th batch of an endless stream of shuffled passes over n items. A function of
    the step alone, so a resumed run draws exactly the batches the uninterrupted one would."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    passes = positions // n
    offsets = positions % n
    out = torch.empty(batch_size, dtype=torch.long)
    for p in passes.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + p))
        out[passes == p] = perm[offsets[passes == p]]
    return out.to(device)


def training_batches(source, pool, seed: int, start: int, args: Args, stats, generator):
    """Endless batches of the images `pool` (indices), one per step from `start` on, a function of
    the step (`batch_indices`), on the generator's device, normalised (0 in any padding), augmented
    by `random_scale_crop` (draws from `generator`): (B, 3, crop, crop), (B, crop, crop). Under
    torchrun, B is the global batch: this process loads and returns its share."""
    draws = (
        common.share(pool[batch_indices(len(pool), args.batch_size, step, seed, pool.device)])
        for step in itertools.count(start)
    )
    batches = common.segmentation_batches(source, draws, generator.device, args.workers)
    for images, labels, sizes in batches:
        images = common.normalize_padded(images, sizes, *stats)
        yield random_scale_crop(images, labels, sizes, args.crop_size, generator=generator)


# --------------------------------------------------------------------------------------------------
# Evaluation: network 1, sliding window, one confusion matrix
# --------------------------------------------------------------------------------------------------
def forward_logits(model: nn.Module, x: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Float logits (B, C, H, W) of images x (B, 3, H, W), under bfloat16 autocast with `amp`."""
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        return model(x).float()


@torch.no_grad()
def sliding_window(model: nn.Module, x: torch.Tensor, crop: int, amp: bool = False) -> torch.Tensor:
    """Logits (B, C, H, W) of normalised images x (B, 3, H, W), averaged over crop x crop windows at
    a stride of ceil(2/3 crop), the last flush with the border, a shorter side padded with 0 (the
    mean colour) on both ends (official evaluator: stride rate 2/3, single scale, no flip)."""
    h, w = x.shape[-2:]
    top = max(crop - h, 0) // 2
    left = max(crop - w, 0) // 2
    x = F.pad(x, (left, max(crop - w, 0) - left, top, max(crop - h, 0) - top))
    big_h, big_w = x.shape[-2:]
    stride = math.ceil(crop * 2 / 3)

    def starts(extent: int) -> list[int]:  # window offsets along one side, the last flush
        steps = math.ceil(max(extent - crop, 0) / stride)
        return sorted({min(i * stride, extent - crop) for i in range(steps + 1)})

    total = None  # (B, C, big_h, big_w), once the first window tells C
    count = x.new_zeros(1, 1, big_h, big_w)
    for y0 in starts(big_h):
        for x0 in starts(big_w):
            logits = forward_logits(model, x[:, :, y0 : y0 + crop, x0 : x0 + crop], amp)
            total = x.new_zeros(len(x), logits.shape[1], big_h, big_w) if total is None else total
            total[:, :, y0 : y0 + crop, x0 : x0 + crop] += logits
            count[:, :, y0 : y0 + crop, x0 : x0 + crop] += 1
    # Deviation: logits averaged; the official evaluator sums scores and divides by the count
    # (the same up to how scores are defined).
    return (total / count)[:, :, top : top + h, left : left + w]


@torch.no_grad()
def evaluate(
    model: nn.Module, source, num_classes: int, stats, args: Args, show: int = 6
) -> tuple[dict, tuple]:
    """mIoU and pixel accuracy of `model` (eval mode) over the split, one confusion matrix, windows
    of --crop-size; and `show` images spread over it with labels and predictions (resized alike)."""
    model.eval()
    device = next(model.parameters()).device
    amp = args.amp and device.type == "cuda"
    n = len(source[0]) if isinstance(source, tuple) else len(source)
    # in memory: --batch-size images at a time; streamed images differ in size: one at a time
    index_batches = torch.arange(n).split(args.batch_size if isinstance(source, tuple) else 1)
    batches = common.segmentation_batches(source, index_batches, device, args.workers)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    shown = []  # (image, label, prediction) of the picked images, all at the first one's size
    picks = set(torch.linspace(0, n - 1, show).round().long().tolist())
    for idx, (images, labels, _) in zip(index_batches, batches, strict=True):
        pred = sliding_window(model, common.normalize(images, *stats), args.crop_size, amp)
        pred = pred.argmax(1)
        conf += common.confusion_matrix(pred, labels, num_classes)
        for j, i in enumerate(idx.tolist()):
            if i not in picks:
                continue
            size = shown[0][1].shape[-2:] if shown else labels.shape[-2:]
            # label maps resized by nearest neighbour, images bilinearly
            label = F.interpolate(labels[j : j + 1, None].float(), size=size)[:, 0].long()
            predicted = F.interpolate(pred[j : j + 1, None].float(), size=size)[:, 0].long()
            image = F.interpolate(images[j : j + 1].float(), size=size, mode="bilinear") / 255
            shown.append((image, label, predicted))
    pictures = tuple(torch.cat(part) for part in zip(*shown, strict=True))
    return common.segmentation_scores(conf), pictures


@torch.no_grad()
def segment(model: nn.Module, image: torch.Tensor, stats, run: Args) -> torch.Tensor:
    """The mask (H, W) of one uint8 image (3, H, W) at its own size: shorter side resized to the
    run's --image-size where it had one, `sliding_window` as the evaluation, the logits resized
    back (bilinear) before the argmax."""
    model.eval()
    x = image[None]
    if run.image_size:
        from torchvision.transforms.functional import resize

        x = resize(x, run.image_size, antialias=True)
    logits = sliding_window(model, common.normalize(x, *stats), run.crop_size)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


def predict(args: Args) -> dict:
    """--predict FOLDER: the finished run in --out-dir (network 1, the one evaluated) segments
    every image under FOLDER (`segment`) into <out-dir>/predictions: a mask and an overlay per
    image at its own size, and each image's class shares."""
    run, state = common.finished_run(args.out_dir, Args)
    device = common.select_device(args.device)
    info = common.dataset_info(run.dataset, "segment")
    names = common.load_results(args.out_dir).get("classes")
    num_classes = state["net1"]["classifier.weight"].shape[0]
    model = DeepLabV3Plus(num_classes, resnet(run.backbone, "none")).to(device)
    model.load_state_dict(state["net1"])
    out = common.predictions_dir(args.out_dir, args.overwrite)
    paths, images = common.read_new_images(args.predict)  # each at its own size
    masks = []
    for i, image in enumerate(images):
        masks.append(segment(model, image.to(device), (info.mean, info.std), run))
        if (i + 1) % 100 == 0:
            print(f"segmented {i + 1} of {len(images)} images", flush=True)
    return common.write_mask_predictions(out, paths, images, masks, names, num_classes)


# --------------------------------------------------------------------------------------------------
# Training: steps 1-6 of the module docstring
# --------------------------------------------------------------------------------------------------
def sync_batch_norm(args: Args, device: torch.device) -> bool:
    """Whether the networks get synchronised batch norm: --sync-bn under torchrun on CUDA, one GPU
    per process (torch's SyncBatchNorm runs on CUDA only, and gathers through NCCL). Without it
    each process's batch norm sees its share of the batch, which must then hold at least 2
    images (the image-pooling branch, --batch-size)."""
    processes = common.world_size()
    nccl = torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"
    synced = args.sync_bn and processes > 1 and device.type == "cuda" and nccl
    if args.sync_bn and processes > 1 and not synced:
        where = "on the CPU" if device.type == "cpu" else "without a GPU per process (NCCL)"
        print(f"--sync-bn: not {where}; each process's batch norm sees its own share", flush=True)
    if not synced and args.batch_size // processes < 2:
        raise common.ConfigError(
            f"--batch-size {args.batch_size} leaves {args.batch_size // processes} image per "
            f"process, and batch norm needs at least 2: a --batch-size of at least "
            f"{2 * processes}, or fewer processes"
        )
    return synced


def networks_and_optimizer(
    args: Args, num_classes: int, device: torch.device, sync_bn: bool = False
) -> tuple[DeepLabV3Plus, DeepLabV3Plus, torch.optim.Optimizer, tuple[nn.Module, nn.Module]]:
    """The two networks (`build_networks`), with synchronised batch norm where `sync_bn`, step 5's
    SGD over both, and the forwards that train them: with --compile, their torch.compile'd
    wrappers (checkpoints save the networks)."""
    net1, net2 = build_networks(num_classes, args.backbone, args.weights, device)
    if sync_bn:  # the same modules, their BatchNorm2d layers replaced in place
        net1 = nn.SyncBatchNorm.convert_sync_batchnorm(net1)
        net2 = nn.SyncBatchNorm.convert_sync_batchnorm(net2)
    # Channels-last, except with --compile (channels-last weights failed its stride check, picie.py)
    if device.type == "cuda" and not args.compile:
        net1.to(memory_format=torch.channels_last)
        net2.to(memory_format=torch.channels_last)
    # Deviation: one SGD over both networks' parameters, where the official code has two;
    # per-parameter momentum makes their updates identical.
    groups = parameter_groups(net1, args.weight_decay) + parameter_groups(net2, args.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    forwards = (torch.compile(net1), torch.compile(net2)) if args.compile else (net1, net2)
    return net1, net2, optimizer, forwards


def argmax_agreement(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """The agreement diagnostic: the fraction of pixels where the two networks' argmax agree."""
    return (logits1.detach().argmax(1) == logits2.detach().argmax(1)).float().mean()


def cutmix_cps_loss(
    forwards: tuple[nn.Module, nn.Module],
    unlabeled: list[tuple[torch.Tensor, torch.Tensor]],
    generator: torch.Generator,
    args: Args,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4 on U_a and U_b, the two unlabelled batches to mix (one mask M a pair): L_cps, the
    agreement on the mixed pixels and pseudo_acc, the only use of U_a's and U_b's labels."""
    forward1, forward2 = forwards
    (unlabeled_a, truth_a), (unlabeled_b, truth_b) = unlabeled
    device = unlabeled_a.device
    amp = args.amp and device.type == "cuda"
    height, width = unlabeled_a.shape[-2:]
    boxes = draw_boxes(len(unlabeled_a), height, width, generator=generator, device=device)
    mask = box_masks(boxes, height, width)  # (B, 1, crop, crop)
    with torch.no_grad():
        # In train mode (batch statistics, running ones updated) as official, or eval mode
        forward1.train(args.pseudo_label_mode == "train")
        forward2.train(args.pseudo_label_mode == "train")
        logits1_a = forward_logits(forward1, unlabeled_a, amp)
        logits1_b = forward_logits(forward1, unlabeled_b, amp)
        pseudo1 = mixed_pseudo_labels(logits1_a, logits1_b, mask)
        logits2_a = forward_logits(forward2, unlabeled_a, amp)
        logits2_b = forward_logits(forward2, unlabeled_b, amp)
        pseudo2 = mixed_pseudo_labels(logits2_a, logits2_b, mask)
        forward1.train()
        forward2.train()
    mixed_images = cutmix(unlabeled_a, unlabeled_b, mask)
    mixed_logits1 = forward_logits(forward1, mixed_images, amp)
    mixed_logits2 = forward_logits(forward2, mixed_images, amp)
    loss_cps = cross_pseudo_supervision_loss(mixed_logits1, mixed_logits2, pseudo1, pseudo2)
    # pseudo_acc: network 1's mixed pseudo-labels against the held-back truth, mixed alike
    truth = cutmix(truth_a[:, None].float(), truth_b[:, None].float(), mask)[:, 0].long()
    known = truth != 255
    pseudo_acc = ((pseudo1 == truth) & known).sum() / known.sum().clamp_min(1)
    return loss_cps, argmax_agreement(mixed_logits1, mixed_logits2), pseudo_acc


def train_step(
    forwards: tuple[nn.Module, nn.Module],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    cps_weight: float,
    args: Args,
) -> torch.Tensor:
    """Steps 2-5 on the step's augmented batches, the labelled one and the unlabelled ones (none for
    the supervised twin, one for CPS, two with CutMix): (L_s, L_cps, agreement, pseudo_acc)."""
    forward1, forward2 = forwards
    forward1.train()
    forward2.train()
    (images, labels), *unlabeled = batches  # (B, 3, crop, crop), (B, crop, crop) each
    amp = args.amp and images.device.type == "cuda"
    # 2. L_s of both networks. OHEM keeps at least the 50,000 hardest of an 800 x 800 crop's
    # pixels per image, the same fraction of other crops (official: 50000 * batch_size //
    # world_size per GPU process, one image each: the same 50,000 per image).
    # Deviation: the hard pixels are mined over the whole batch (official: within each image).
    kept = round(50_000 * args.crop_size**2 / 800**2) * len(labels) if args.ohem else 0  # min_kept
    logits1 = forward_logits(forward1, images, amp)
    logits2 = forward_logits(forward2, images, amp)
    loss_sup = supervised_loss(logits1, labels, kept) + supervised_loss(logits2, labels, kept)
    # 0 where they do not apply: all three for the supervised twin, pseudo_acc without CutMix
    loss_cps = agreement = pseudo_acc = torch.zeros((), device=images.device)
    if cps_weight > 0 and not args.cutmix:
        # 3. CPS over the labelled and the unlabelled pixels. The unlabelled batch gets its own
        # forward pass, so batch norm sees it alone, as official. Its labels are never used.
        unlabeled_images, _ = unlabeled[0]
        unlabeled_logits1 = forward_logits(forward1, unlabeled_images, amp)
        unlabeled_logits2 = forward_logits(forward2, unlabeled_images, amp)
        loss_cps = cross_pseudo_supervision_loss(
            torch.cat([logits1, unlabeled_logits1]), torch.cat([logits2, unlabeled_logits2])
        )
        agreement = argmax_agreement(unlabeled_logits1, unlabeled_logits2)
    elif cps_weight > 0:  # 4. CPS with CutMix
        loss_cps, agreement, pseudo_acc = cutmix_cps_loss(forwards, unlabeled, generator, args)
    # 5. L = L_s + lambda L_cps; one backward pass; one SGD step for both networks
    loss = loss_sup + cps_weight * loss_cps
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Under torchrun: both networks' gradients averaged over the processes (official: apex DDP)
    common.synchronize(*forwards)
    optimizer.step()
    return torch.stack([loss_sup.detach(), loss_cps.detach(), agreement, pseudo_acc])


def train_metrics(means: torch.Tensor, step: int, cps_weight: float, args: Args) -> dict:
    """A log line's training figures: the `means` of `train_step`'s four since the last line (the
    diagnostics only where they exist) and the learning rate."""
    metrics = {"train/loss_sup": means[0], "train/loss_cps": means[1]}
    if cps_weight > 0:
        metrics["diag/agreement"] = means[2]
    if cps_weight > 0 and args.cutmix:
        metrics["diag/pseudo_acc"] = means[3]
    metrics["train/lr"] = poly_lr(step, args.iterations, args.lr)
    return metrics


def cps_results(last: dict, cps_weight: float, num_labeled: int, args: Args) -> dict:
    """The method's figures for results.json, from `last`, the last evaluation."""
    return {
        # Deviation: the last evaluation; the official code reports the best of its evaluated
        # epoch snapshots (eval.py -e 20-34).
        "miou": last["miou"],
        "pixel_acc": last["pixel_acc"],
        "iou": [None if math.isnan(v) else v for v in last["iou"]],  # NaN: a class never present
        "cps_weight": cps_weight,
        "num_labeled": num_labeled,
        "iterations": args.iterations,
    }


def train_twin(args: Args, out: Path, name: str = "twin", **changes) -> dict:
    """A supervised twin's results: a run of its own in out/<name> with --cps-weight 0 and
    `changes` (resumed from its checkpoint, or read back once finished), so that CPS's gain is
    measured in its run."""
    folder = out / name
    if (folder / "results.json").exists():
        return common.load_results(folder)
    print(f"supervised twin (--cps-weight 0) in {folder}", flush=True)
    resume = (folder / "checkpoint.pt").exists()
    twin = dataclasses.replace(
        args, cps_weight=0.0, twin=False, full_twin=False, out_dir=str(folder), resume=resume
    )
    return train(dataclasses.replace(twin, **changes))


def train(args: Args) -> dict:
    device = common.start_processes(args.device)  # under torchrun, this process's device
    common.check_batches({"--batch-size": args.batch_size})  # each stream's global batch
    synced = sync_batch_norm(args, device)
    common.set_seed(args.seed)
    info = common.dataset_info(args.dataset, "segment")
    stats = (info.mean, info.std)
    cps_weight = args.cps_weight
    if cps_weight is None:  # the paper's lambda for the data set
        without_cutmix, with_cutmix = CPS_WEIGHTS.get(args.dataset, (1.5, 1.0))
        cps_weight = with_cutmix if args.cutmix else without_cutmix
    train_source, labeled, unlabeled, eval_source, classes, description, eval_split = load_data(
        args, device, cps_weight
    )
    num_classes = len(classes)
    # Built before anything is written: a missing ImageNet weights file stops the run here.
    net1, net2, optimizer, forwards = networks_and_optimizer(args, num_classes, device, synced)
    out = common.prepare_out_dir(args.out_dir, args.resume, args)
    print(
        f"cps: {args.dataset} on {device}; {description}; DeepLabv3+ {args.backbone} "
        f"({args.weights}), lambda {cps_weight:g}, CutMix {args.cutmix}",
        flush=True,
    )
    augment_rng = common.rank_generator(args.seed, device)  # another stream in each process
    book = common.RunBook(out, args, device)  # with --resume, the checkpoint's state
    start = book.checkpoint.get("step", 0)
    evals = book.checkpoint.get("evals", [])
    if args.resume:
        for key, part in (("net1", net1), ("net2", net2), ("optimizer", optimizer)):
            part.load_state_dict(book.checkpoint[key])
        common.restore_generator(augment_rng, book.checkpoint["augment_rng"])
        print(f"resumed at iteration {start}", flush=True)

    # 1. The step's batches, each stream with its own seed: the labelled images; for CPS, the
    # unlabelled ones; with CutMix, a second unlabelled stream to mix with the first (U_a, U_b).
    pools = [(labeled, args.seed)]
    if cps_weight > 0:
        pools.append((unlabeled, args.seed + 1))
    if cps_weight > 0 and args.cutmix:
        pools.append((unlabeled, args.seed + 2))
    streams = [
        training_batches(train_source, pool, seed, start, args, stats, augment_rng)
        for pool, seed in pools
    ]
    images_per_step = args.batch_size * len(streams)  # labelled and unlabelled
    book.start_log(total=args.iterations, start=start)
    # L_s, L_cps, agreement, pseudo_acc summed since the log line at iteration `logged`
    sums = torch.tensor(book.checkpoint.get("sums", [0.0] * 4), device=device)
    logged = book.checkpoint.get("logged", start)
    shown = None
    for step in range(start, args.iterations):
        with book.timed(images=images_per_step):
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(step, args.iterations, args.lr)
            batches = [next(stream) for stream in streams]  # 1.
            # 2-5. L = L_s + lambda L_cps, one SGD step for both networks
            figures = train_step(forwards, batches, optimizer, augment_rng, cps_weight, args)
            # the mean over the processes' shares, the same in each (it is checkpointed)
            sums += common.gather(figures[None]).mean(0)

        if (step + 1) % args.log_every == 0 or step + 1 == args.iterations:
            book.log(step + 1, train_metrics(sums / (step + 1 - logged), step, cps_weight, args))
            sums.zero_()
            logged = step + 1
        evaluated = (step + 1) % args.eval_every == 0 or step + 1 == args.iterations
        if evaluated:
            # 6. Network 1 alone, sliding window
            scores, shown = evaluate(forwards[0], eval_source, num_classes, stats, args)
            evals.append({key: scores[key] for key in ("miou", "pixel_acc", "iou")})
            book.log(step + 1, {"eval/miou": scores["miou"], "eval/pixel_acc": scores["pixel_acc"]})
        if book.save_due(evaluated):  # after every evaluation, and on the clock between them
            state = {"net1": net1.state_dict(), "net2": net2.state_dict(), "evals": evals}
            rng = common.generator_state(augment_rng)  # every process's, under torchrun
            state.update(optimizer=optimizer.state_dict(), augment_rng=rng)
            book.save({**state, "step": step + 1, "sums": sums.tolist(), "logged": logged})

    if shown is None:  # resumed from the final checkpoint: evaluate again for the picture
        _, shown = evaluate(forwards[0], eval_source, num_classes, stats, args)
    common.save_segmentation_rows(out / "segmentation.png", *shown)
    results = {**cps_results(evals[-1], cps_weight, len(labeled), args), **book.figures()}
    results["classes"] = classes  # their names, for --predict
    rows = {}  # the baselines trained beside CPS, printed above it
    if args.twin and cps_weight > 0:
        twin = train_twin(args, out)
        rows["supervised twin (--cps-weight 0)"] = twin
        results.update(twin_miou=twin["miou"], twin_pixel_acc=twin["pixel_acc"])
    if args.full_twin and len(unlabeled) > 0:  # every training image labelled: the headroom
        full = train_twin(args, out, "full_twin", labeled_ratio=1.0, labeled_list=None)
        rows["every image labelled (--full-twin)"] = full
        results.update(full_twin_miou=full["miou"], full_twin_pixel_acc=full["pixel_acc"])
    if rows:
        rows["CPS" if cps_weight > 0 else "supervised (--cps-weight 0)"] = results
        common.print_table({k: {f: r[f] for f in ("miou", "pixel_acc")} for k, r in rows.items()})
    figures = " ".join(f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float))
    print(f"results: {figures}", flush=True)
    results["split"] = eval_split  # the split every figure is on
    # one per process, both networks: equal when the processes agree
    results["weights_checksum"] = common.weights_checksum(net1, net2)
    return common.write_results(out, results)


def main(argv: list[str] | None = None) -> dict:
    torch.set_flush_denormal(True)  # denormal floats slow CPU training many times over
    description = __doc__.split("\n")[0]
    args = common.parse_args(Args, argv, DATASET_DEFAULTS, description, "cps", "segment")
    with common.user_errors("cps.py", args.out_dir):
        if args.predict:
            return predict(args)
        return train(args)


if __name__ == "__main__":
    main()
