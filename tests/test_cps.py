"""cps.py: the CPS loss (symmetry, no gradient through pseudo-labels), CutMix masks and mixed
pseudo-labels, the CutMix CPS loss and one training step against hand computations, OHEM, the two
networks' initialisation, output stride 16, the schedule and weight decay groups, sliding-window
evaluation, the split, a smoke run that records the loop's wiring and resumes (in memory and
streamed from a tiny VOC tree), bad input, a learning test on shapes-seg, and torchrun (two CPU
processes: one writer, the same networks, resume)."""

import copy
import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import cps


def ce(logits, target):  # cross-entropy of one pixel's logits (list) by hand
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def test_cps_loss_is_symmetric_and_passes_no_gradient_through_pseudo_labels():
    # A constructed example: two pixels, three classes. Network 1 says (class 0, class 2), network 2
    # says (class 1, class 2).
    l1 = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 3.0]]).T.reshape(1, 3, 1, 2)
    l2 = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 2.0]]).T.reshape(1, 3, 1, 2)
    first = (ce([2.0, 0.5, 0.0], 1) + ce([0.0, 1.0, 3.0], 2)) / 2  # CE(p1, argmax p2), pixel mean
    second = (ce([0.0, 1.0, -1.0], 0) + ce([0.5, 0.0, 2.0], 2)) / 2  # CE(p2, argmax p1)
    by_hand = first + second
    assert cps.cross_pseudo_supervision_loss(l1, l2).item() == pytest.approx(by_hand, rel=1e-6)
    # symmetric in the two networks, on random logits too
    a, b = torch.randn(2, 5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(
        cps.cross_pseudo_supervision_loss(a, b), cps.cross_pseudo_supervision_loss(b, a)
    )
    # Gradients: each network's logits get exactly the gradient of CE against the other's fixed
    # argmax; nothing flows through the pseudo-labels (a soft or undetached target would add some).
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    cps.cross_pseudo_supervision_loss(a, b).backward()
    a_ref = a.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(a_ref, b.detach().argmax(1))
    reference = reference + F.cross_entropy(b_ref, a.detach().argmax(1))
    reference.backward()
    assert torch.allclose(a.grad, a_ref.grad, atol=1e-7)
    assert torch.allclose(b.grad, b_ref.grad, atol=1e-7)
    # with given (CutMix) pseudo-labels, the loss uses them, not the argmax of the logits
    y = torch.zeros(1, 1, 2, dtype=torch.long)
    given = (ce([2.0, 0.5, 0.0], 0) + ce([0.0, 1.0, 3.0], 0)) / 2
    given += (ce([0.0, 1.0, -1.0], 0) + ce([0.5, 0.0, 2.0], 0)) / 2
    assert cps.cross_pseudo_supervision_loss(l1, l2, y, y).item() == pytest.approx(given, rel=1e-6)


def test_mixed_pseudo_label_is_the_argmax_of_the_mixed_predictions():
    g = torch.Generator().manual_seed(1)
    logits_a = torch.randn(4, 6, 20, 24, generator=g, requires_grad=True)
    logits_b = torch.randn(4, 6, 20, 24, generator=g)
    mask = cps.box_masks(cps.draw_boxes(4, 20, 24, generator=g), 20, 24)
    pseudo = cps.mixed_pseudo_labels(logits_a, logits_b, mask)
    # pixel by pixel: network's argmax on the source image that the mask put there
    expected = torch.where(mask[:, 0] > 0, logits_b.argmax(1), logits_a.argmax(1))
    assert torch.equal(pseudo, expected) and not pseudo.requires_grad
    assert 0 < mask.mean() < 1, "both sources are present"
    unlabeled_a = torch.zeros(4, 3, 20, 24)
    unlabeled_b = torch.ones(4, 3, 20, 24)
    mixed = cps.cutmix(unlabeled_a, unlabeled_b, mask)
    assert torch.equal(mixed, mask.expand(-1, 3, -1, -1)), "U_b where M = 1"


class Probe(nn.Module):
    """A small network with a global term, so that its prediction on a mixed image is not the mix
    of its predictions on the two sources (as a real network's), that records its batch-norm mode
    (train or eval) at every call."""

    def __init__(self, seed: int, classes: int = 4):
        super().__init__()
        self.local = nn.Conv2d(3, classes, 1)
        self.context = nn.Conv2d(3, classes, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.local(x) + 3 * self.context(x.mean((2, 3), keepdim=True))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cutmix_cps_loss_trains_each_network_on_the_other_ones_mixed_pseudo_labels(mode):
    net1, net2 = Probe(1), Probe(2)
    g = torch.Generator().manual_seed(0)
    unlabeled_a, unlabeled_b = torch.randn(2, 4, 3, 16, 16, generator=g)
    truth_a, truth_b = torch.randint(0, 4, (2, 4, 16, 16), generator=g)
    unlabeled = [(unlabeled_a, truth_a), (unlabeled_b, truth_b)]
    args = cps.Args(pseudo_label_mode=mode)
    loss, agreement, pseudo_acc = cps.cutmix_cps_loss(
        (net1, net2), unlabeled, torch.Generator().manual_seed(5), args
    )
    # pseudo-labels in the mode asked for, then the mixed images in train mode
    assert net1.modes == net2.modes == [mode == "train"] * 2 + [True]
    # By hand: one mask M (the generator's first draw) mixes the images and each network's
    # argmax on the two sources; each network learns the other one's mixed pseudo-label.
    # (the official BoxMaskGenerator settings: 3 boxes, area 0.25-0.5)
    g = torch.Generator().manual_seed(5)
    boxes = cps.draw_boxes(4, 16, 16, n_boxes=3, prop_range=(0.25, 0.5), generator=g)
    m = cps.box_masks(boxes, 16, 16)
    assert 0 < m.mean() < 1
    with torch.no_grad():
        y1 = torch.where(m[:, 0] > 0, net1(unlabeled_b).argmax(1), net1(unlabeled_a).argmax(1))
        y2 = torch.where(m[:, 0] > 0, net2(unlabeled_b).argmax(1), net2(unlabeled_a).argmax(1))
    mixed = unlabeled_a * (1 - m) + unlabeled_b * m
    p1, p2 = net1(mixed), net2(mixed)
    expected = F.cross_entropy(p1, y2) + F.cross_entropy(p2, y1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # (a network trained on its own pseudo-label, or on argmax of the mixed image, scores otherwise)
    own = F.cross_entropy(p1, y1) + F.cross_entropy(p2, y2)
    on_mixed = F.cross_entropy(p1, p2.argmax(1)) + F.cross_entropy(p2, p1.argmax(1))
    assert abs(own - expected) > 0.1 and abs(on_mixed - expected) > 0.01
    params = list(net1.parameters()) + list(net2.parameters())
    for got, want in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True
    ):
        assert torch.allclose(got, want, atol=1e-6)
    assert agreement.item() == pytest.approx((p1.argmax(1) == p2.argmax(1)).float().mean().item())
    truth = torch.where(m[:, 0] > 0, truth_b, truth_a)
    assert pseudo_acc.item() == pytest.approx((y1 == truth).float().mean().item())


@pytest.mark.parametrize("cutmix,ohem", [(False, False), (True, False), (False, True)])
def test_train_step_is_one_sgd_step_on_l_s_plus_lambda_l_cps(cutmix, ohem):
    g = torch.Generator().manual_seed(0)
    images, *unlabeled_images = torch.randn(3, 2, 3, 8, 8, generator=g) * (50 if ohem else 1)
    nets = (Probe(1), Probe(2))
    before = copy.deepcopy(nets)
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    if ohem:  # confident: OHEM keeps only the min_kept hardest pixels of network 1's
        labels = nets[0](images).argmax(1)
    labels[:, 0] = 255  # ignored
    garbage = torch.full((2, 8, 8), 7)  # the unlabelled images' labels: never used for the loss
    batches = [(images, labels)] + [(u, garbage) for u in unlabeled_images[: 1 + cutmix]]
    params = [p for net in nets for p in net.parameters()]
    for p in params:
        p.grad = torch.ones_like(p)  # stale gradients must not leak into the step
    optimizer = torch.optim.SGD(params, lr=0.1)
    args = cps.Args(cutmix=cutmix, crop_size=8, ohem=ohem)
    figures = cps.train_step(nets, batches, optimizer, torch.Generator().manual_seed(3), 2.5, args)
    # by hand, on the networks before the step; OHEM's min_kept: 50,000 of 800 x 800 pixels, as
    # many of 8 x 8 (5) per image
    l1, l2 = (net(images) for net in before)
    kept = 10 if ohem else 0
    loss_sup = cps.supervised_loss(l1, labels, kept) + cps.supervised_loss(l2, labels, kept)
    if ohem:
        assert abs(cps.supervised_loss(l1, labels, 5) - cps.supervised_loss(l1, labels, 10)) > 0.01
    else:
        assert loss_sup == F.cross_entropy(l1, labels, ignore_index=255) + F.cross_entropy(
            l2, labels, ignore_index=255
        )
    if cutmix:
        loss_cps = cps.cutmix_cps_loss(before, batches[1:], torch.Generator().manual_seed(3), args)[
            0
        ]
    else:  # over the labelled and the unlabelled pixels
        u1, u2 = (net(unlabeled_images[0]) for net in before)
        a1, a2 = torch.cat([l1, u1]), torch.cat([l2, u2])
        loss_cps = F.cross_entropy(a1, a2.argmax(1)) + F.cross_entropy(a2, a1.argmax(1))
        assert figures[2].item() == pytest.approx((u1.argmax(1) == u2.argmax(1)).float().mean())
    assert figures[0].item() == pytest.approx(loss_sup.item(), rel=1e-6)
    assert figures[1].item() == pytest.approx(loss_cps.item(), rel=1e-6)
    before_params = [p for net in before for p in net.parameters()]
    grads = torch.autograd.grad(loss_sup + 2.5 * loss_cps, before_params)
    for p, p0, grad in zip(params, before_params, grads, strict=True):
        assert torch.allclose(p, p0 - 0.1 * grad, atol=1e-6)


def test_box_masks_have_the_stated_area_and_toggle_where_boxes_overlap():
    g = torch.Generator().manual_seed(0)
    boxes = cps.draw_boxes(2000, 120, 90, n_boxes=3, generator=g)  # (n, 3, 4) = y0, x0, y1, x1
    heights = boxes[..., 2] - boxes[..., 0]
    widths = boxes[..., 3] - boxes[..., 1]
    area = (heights * widths).float() / (120 * 90)
    # each box covers a / 3 of the image, a ~ U(0.25, 0.5), up to rounding of its sides to pixels
    assert area.min() > 0.25 / 3 - 0.01 and area.max() < 0.5 / 3 + 0.01
    assert area.min() < 0.25 / 3 + 0.005, "the whole range is drawn"
    assert area.max() > 0.5 / 3 - 0.005, "the whole range is drawn"
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= 120).all()
    assert (boxes[..., 3] <= 90).all()
    aspect = heights.float() / widths.float()
    assert aspect.min() < 0.5 and aspect.max() > 2, "a random aspect ratio"
    # one box: a in [0.25, 0.5]
    one = cps.box_masks(cps.draw_boxes(500, 64, 64, n_boxes=1, generator=g), 64, 64)
    assert 0.24 < one.mean((1, 2, 3)).min() and one.mean((1, 2, 3)).max() < 0.51
    # toggling: two boxes overlapping in a 2 x 2 square; a third covering one pixel of it
    boxes = torch.tensor([[[0, 0, 4, 4], [2, 2, 6, 6], [3, 3, 4, 4]]])
    mask = cps.box_masks(boxes[:, :2], 8, 8)[0, 0]
    assert mask.sum() == 16 + 16 - 2 * 4 and mask[2:4, 2:4].sum() == 0
    assert mask[0, 0] == 1 and mask[5, 5] == 1
    mask3 = cps.box_masks(boxes, 8, 8)[0, 0]
    assert mask3[3, 3] == 1 and mask3[2, 2] == 0 and mask3.shape == (8, 8)


def test_ohem_keeps_the_hard_pixels_and_at_least_min_kept():
    # Four pixels whose true-class probabilities are 0.9, 0.6, 0.3, 0.8 (two classes), one ignored.
    p = torch.tensor([0.9, 0.6, 0.3, 0.8, 0.5])
    logits = torch.stack([torch.log(p), torch.log(1 - p)]).reshape(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    nll = -torch.log(p[:4])
    assert cps.supervised_loss(logits, target, 1).item() == pytest.approx(
        nll[[1, 2]].mean().item(), rel=1e-5
    )
    # min_kept 3: the threshold rises to the third-smallest probability (0.8)
    assert cps.supervised_loss(logits, target, 3).item() == pytest.approx(
        nll[[1, 2, 3]].mean().item(), rel=1e-5
    )
    # fewer labelled pixels than min_kept: plain cross-entropy (as the official code); and without
    # OHEM
    assert cps.supervised_loss(logits, target).item() == pytest.approx(nll.mean().item(), rel=1e-5)
    assert cps.supervised_loss(logits, target, 10).item() == pytest.approx(
        nll.mean().item(), rel=1e-5
    )


def test_the_two_networks_share_backbone_weights_and_differ_in_their_heads():
    torch.manual_seed(0)
    net1, net2 = cps.build_networks(5, "resnet18", "none")
    backbone1 = {k: v for k, v in net1.state_dict().items() if k.startswith(("stem", "layers"))}
    backbone2 = {k: v for k, v in net2.state_dict().items() if k.startswith(("stem", "layers"))}
    assert len(backbone1) > 50 and all(torch.equal(backbone1[k], backbone2[k]) for k in backbone1)
    heads = [
        [m.weight for part in net.head() for m in part.modules() if isinstance(m, nn.Conv2d)]
        for net in (net1, net2)
    ]
    assert len(heads[0]) == 10
    assert all(not torch.allclose(w1, w2) for w1, w2 in zip(*heads, strict=True))
    # Kaiming normal, fan in: the classifier's weights have std sqrt(2 / 256)
    assert net1.classifier.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(net1.eval()(x), net2.eval()(x)), "different networks from the start"


@pytest.mark.parametrize(
    "name,channels",
    [("resnet18", (64, 512)), ("resnet50", (256, 2048)), ("resnet101", (256, 2048))],
)
def test_every_backbone_has_output_stride_16(name, channels):
    torch.manual_seed(0)
    net = cps.DeepLabV3Plus(3, cps.resnet(name, "none")).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        low = net.layers[0](net.stem(x))
        high = net.layers[3](net.layers[2](net.layers[1](low)))
        assert low.shape == (1, channels[0], 16, 24) and high.shape == (1, channels[1], 4, 6)
        assert net(x).shape == (1, 3, 64, 96)
    rates = [
        m.dilation[0]
        for m in net.layers[3].modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert rates == ([2, 2, 2, 2] if name == "resnet18" else [2, 4, 8])


def test_poly_schedule():
    assert cps.poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert cps.poly_lr(50, 100, 0.01) == pytest.approx(0.01 * 0.5**0.9)
    assert cps.poly_lr(99, 100, 0.01) == pytest.approx(0.01 * 0.01**0.9)
    assert cps.poly_lr(100, 100, 0.01) == 0.0


def test_no_weight_decay_on_batch_norm_and_biases():
    torch.manual_seed(0)
    net = cps.DeepLabV3Plus(4, cps.resnet("resnet18", "none"))
    decay, no_decay = cps.parameter_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0

    def ids(params):
        return {id(p) for p in params}

    bn = ids(p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    convs = ids(m.weight for m in net.modules() if isinstance(m, nn.Conv2d))
    assert ids(no_decay["params"]) == bn | {id(net.classifier.bias)}
    assert ids(decay["params"]) == convs
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_sliding_window_equals_a_single_forward_when_the_image_fits_and_stitches_larger_ones():
    torch.manual_seed(0)
    net = cps.DeepLabV3Plus(4, cps.resnet("resnet18", "none")).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(cps.sliding_window(net, x, 48), net(x), atol=1e-5)
    # A per-pixel network: overlapping windows averaged, borders and padding cut away, give back
    # exactly the single forward, for images larger and smaller than the window.
    pixelwise = nn.Conv2d(3, 5, 1)
    for shape in ((1, 3, 70, 50), (2, 3, 20, 90)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(cps.sliding_window(pixelwise, x, 32), pixelwise(x), atol=1e-5)
    counts = []  # windows: 70 rows at crop 32, stride 22 -> starts 0, 22, 38

    def probe(t):  # a network that records each window's shape
        counts.append(t.shape)
        return t.new_zeros(len(t), 1, *t.shape[-2:])

    cps.sliding_window(probe, torch.zeros(1, 3, 70, 32), 32)
    assert len(counts) == 3 and all(s[-2:] == (32, 32) for s in counts)


def test_random_scale_crop_moves_labels_with_their_pixels_and_pads_0_and_255():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 5, (6, 8, 8), generator=g)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 64 x 64 in blocks of 8 x 8
    images = 10.0 ** labels[:, None].float().expand(-1, 3, -1, -1)  # each pixel's value: 10^label
    sizes = torch.tensor([[64, 64]] * 6)
    x, y = cps.random_scale_crop(images, labels, sizes, 48, generator=g)
    assert x.shape == (6, 3, 48, 48) and y.shape == (6, 48, 48) and y.dtype == labels.dtype
    known = y != 255
    # Where bilinear sampling read one block only (a power of ten; no blend of two makes one), the
    # label is that block's.
    power = x[:, 0].clamp_min(1e-6).log10()
    pure = known & ((power - power.round()).abs() < 1e-5)
    assert pure.float().mean() > 0.6 and torch.equal(power[pure].round(), y[pure].float())
    # scale 0.5 of a 64 image in a 64 crop: the 32 x 32 image centred, padding around it
    x, y = cps.random_scale_crop(images[:1], labels[:1], sizes[:1], 64, scales=(0.5,), generator=g)
    assert (
        (y[0, 16:48, 16:48] != 255).all()
        and (y[0, :16] == 255).all()
        and (y[0, :, 48:] == 255).all()
    )
    assert (x[0, :, :16] == 0).all() and (x[0, :, 16:48, 16:48] >= 1).all()
    # flipped left-right with probability 0.5, labels alike: crops of the whole image at scale 1
    ramp = torch.arange(64.0).expand(400, 3, 64, 64)
    columns = torch.arange(64).expand(400, 64, 64)
    x, y = cps.random_scale_crop(
        ramp, columns, sizes[:1].expand(400, 2), 64, scales=(1.0,), generator=g
    )
    flipped = x[:, 0, 0, 0] > 32
    assert torch.allclose(x[flipped], ramp[flipped].flip(-1), atol=1e-3)
    assert torch.allclose(x[~flipped], ramp[~flipped], atol=1e-3)
    assert torch.equal(y[flipped], columns[flipped].flip(-1)) and 160 < flipped.sum() < 240
    # the true size counts, not the padded canvas: a 40 x 64 image on a 64 x 64 canvas
    padded = torch.where(torch.arange(64)[None, :, None] < 40, labels[:1], 255)
    x, y = cps.random_scale_crop(
        images[:1], padded, torch.tensor([[40, 64]]), 64, scales=(1.0,), generator=g
    )
    assert (y[0, :12] == 255).all() and (y[0, 12:52] != 255).all(), "centred vertically"


def test_labeled_partition_by_ratio_and_by_list(tmp_path):
    names = [f"img{i:03d}" for i in range(80)]
    labeled, unlabeled, description = cps.labeled_partition(names, 1 / 8, seed=3)
    assert len(labeled) == 10 and len(unlabeled) == 70 and "10 images" in description
    assert sorted(labeled.tolist() + unlabeled.tolist()) == list(range(80))
    assert torch.equal(labeled, cps.labeled_partition(names, 0.125, seed=3)[0])
    assert not torch.equal(labeled, cps.labeled_partition(names, 0.125, seed=4)[0])
    lines = "image/img005.jpg\tlabel/img005.png\nimage/img042.jpg\tlabel/img042.png\n\nimg007\n"
    (tmp_path / "list.txt").write_text(lines)  # the official lists' format, or bare names
    labeled, unlabeled, description = cps.labeled_partition(
        names, 0.5, 0, str(tmp_path / "list.txt")
    )
    assert labeled.tolist() == [5, 7, 42] and len(unlabeled) == 77 and "list.txt" in description


@pytest.fixture
def small_shapes_seg(monkeypatch):
    """shapes-seg with 48 images per split instead of 1,000 / 200, so a run takes seconds."""
    real = common.make_shapes_seg
    monkeypatch.setattr(
        common, "make_shapes_seg", lambda n, seed=0, size=64: real(min(n, 48), seed, size)
    )


SMOKE = [
    "--dataset",
    "shapes-seg",
    "--image-size",
    "32",
    "--crop-size",
    "32",
    "--batch-size",
    "2",
    "--iterations",
    "4",
    "--eval-every",
    "2",
    "--log-every",
    "2",
    "--labeled-ratio",
    "1/8",
    "--device",
    "cpu",
    "--no-twin",  # the twin has a test of its own
]


def records(path):
    """log.jsonl's lines without the timing figures, which differ between runs."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in lines]


def test_smoke_run_writes_its_files_and_resume_reaches_the_same_result(
    tmp_path, interrupted_run, small_shapes_seg, monkeypatch
):
    # The loop's wiring, recorded on the way: each step's learning rate and batches, the streams
    # they come from, the network evaluated and the checkpoints written.
    steps, streams, evaluated, saved = [], [], [], []
    real_step, real_batches = cps.train_step, cps.training_batches
    real_evaluate, real_save = cps.evaluate, common.save_checkpoint

    def step(forwards, batches, optimizer, generator, cps_weight, args):
        groups = [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups]
        figures = real_step(forwards, batches, optimizer, generator, cps_weight, args)
        steps.append((groups, len(batches), cps_weight, figures))
        return figures

    def batches(source, pool, seed, *rest):
        streams.append((pool.tolist(), seed))
        return real_batches(source, pool, seed, *rest)

    def evaluate(model, *rest):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *rest)

    def save(path, state):
        saved.append(state["step"])
        real_save(path, state)

    with monkeypatch.context() as patch:
        for module, name, wrapper in (
            (cps, "train_step", step),
            (cps, "training_batches", batches),
            (cps, "evaluate", evaluate),
            (common, "save_checkpoint", save),
        ):
            patch.setattr(module, name, wrapper)
        straight = cps.main(SMOKE + ["--out-dir", str(tmp_path / "a")])
    # poly schedule per step (shapes-seg: lr 0.02), both networks alike; labelled + U_a + U_b
    # SGD, momentum 0.9, weight decay 1e-4 on the weights only, both networks alike
    for k, (groups, n, weight, _) in enumerate(steps):
        lr = cps.poly_lr(k, 4, 0.02)
        assert groups == [(lr, 0.9, 1e-4), (lr, 0.9, 0.0)] * 2 and n == 3 and weight == 1.0
    (labeled, seed0), (unlabeled_a, seed1), (unlabeled_b, seed2) = streams
    assert len(labeled) == 6 and sorted(labeled + unlabeled_a) == list(range(48))
    assert unlabeled_a == unlabeled_b and len({seed0, seed1, seed2}) == 3, "U_a, U_b drawn apart"
    assert saved == [2, 4], "a checkpoint at every evaluation"
    final = common.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert len(evaluated) == 2 and all(
        torch.equal(evaluated[1][k], v) for k, v in final["net1"].items()
    )
    assert not all(torch.equal(evaluated[1][k], v) for k, v in final["net2"].items()), "network 1"
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "results.json", "segmentation.png"):
        assert (tmp_path / "a" / name).exists(), name
    keys = {"miou", "pixel_acc", "seconds", "images_per_second"}
    assert keys <= set(json.loads((tmp_path / "a" / "results.json").read_text()))
    assert (
        0 <= straight["miou"] <= 1
        and 0 <= straight["pixel_acc"] <= 1
        and straight["images_per_second"] > 0
    )
    assert straight["cps_weight"] == 1.0 and straight["num_labeled"] == 6, (
        "VOC's lambda with CutMix; 48 / 8"
    )
    log = records(tmp_path / "a" / "log.jsonl")
    train = [r for r in log if "train/loss_sup" in r]
    assert len(train) == 2 and all(
        math.isfinite(r["train/loss_sup"]) and r["train/loss_cps"] > 0 for r in train
    )
    assert all(0 <= r["diag/agreement"] <= 1 for r in train)
    for line, pair in zip(train, (steps[:2], steps[2:]), strict=True):  # means over the interval
        means = (pair[0][3] + pair[1][3]) / 2
        assert line["train/loss_sup"] == pytest.approx(means[0].item(), rel=1e-6)
        assert line["diag/pseudo_acc"] == pytest.approx(means[3].item(), rel=1e-6)
    assert [r["step"] for r in log] == [2, 2, 4, 4] and sum("eval/miou" in r for r in log) == 2

    # Interrupted at a checkpoint on the clock (after iteration 1, between two log lines), then
    # resumed: the same networks, results and log, each line once.
    with monkeypatch.context() as patch:
        patch.setattr(common, "CHECKPOINT_SECONDS", 0)
        interrupted_run(cps.main, SMOKE + ["--out-dir", str(tmp_path / "b")])
    assert common.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 1
    with pytest.raises(SystemExit, match="--resume"):  # a run in progress is not overwritten
        cps.main(SMOKE + ["--out-dir", str(tmp_path / "b")])
    resumed = cps.main(SMOKE + ["--out-dir", str(tmp_path / "b"), "--resume"])
    assert resumed["miou"] == straight["miou"] and resumed["pixel_acc"] == straight["pixel_acc"]
    assert records(tmp_path / "b" / "log.jsonl") == log
    state_b = common.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for net in ("net1", "net2"):
        assert all(torch.equal(final[net][k], state_b[net][k]) for k in final[net]), net

    # --resume with a flag that decides the result is refused, args.json kept; --eval-every may
    # change (the finished run evaluates again and gives the same figures)
    args_json = (tmp_path / "a" / "args.json").read_bytes()
    with pytest.raises(SystemExit, match=r"--iterations 4 \(now 6\)"):
        cps.main(SMOKE + ["--out-dir", str(tmp_path / "a"), "--resume", "--iterations", "6"])
    assert (tmp_path / "a" / "args.json").read_bytes() == args_json
    again = cps.main(SMOKE + ["--out-dir", str(tmp_path / "a"), "--resume", "--eval-every", "1"])
    assert again["miou"] == straight["miou"]

    # A damaged checkpoint: a message naming it, nothing written
    damaged = tmp_path / "c"
    damaged.mkdir()
    (damaged / "args.json").write_bytes(args_json)
    whole = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    (damaged / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SystemExit, match=r"c/checkpoint\.pt cannot be read as a checkpoint"):
        cps.main(SMOKE + ["--out-dir", str(damaged), "--resume"])
    assert sorted(p.name for p in damaged.iterdir()) == ["args.json", "checkpoint.pt"]
    assert (damaged / "checkpoint.pt").read_bytes() == whole[: len(whole) // 2]


@pytest.mark.slow  # about 8 s: two more training runs
def test_without_cutmix_and_supervised_only(tmp_path, small_shapes_seg):
    # crops larger than the 32 px images: padded (images 0, labels 255), as official
    argv = ["--no-cutmix", "--iterations", "2", "--crop-size", "48"]
    plain = cps.main(SMOKE + argv + ["--out-dir", str(tmp_path / "a")])
    assert plain["cps_weight"] == 1.5 and 0 <= plain["miou"] <= 1, "VOC's lambda without CutMix"
    baseline = cps.main(
        SMOKE + ["--cps-weight", "0", "--iterations", "2", "--out-dir", str(tmp_path / "b")]
    )
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert baseline["cps_weight"] == 0 and all(r.get("train/loss_cps", 0) == 0 for r in records)
    assert baseline["images_per_second"] > 0


def write_voc(root, sizes, seed=0):
    """A tiny VOC2012 tree with images of different sizes: 2 classes painted as halves, void
    borders."""
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for split, count in (("train", 8), ("val", 2)):
        ids = [f"2007_{split}{i}" for i in range(count)]
        for i, name in enumerate(ids):
            h, w = sizes[i % len(sizes)]
            label = np.zeros((h, w), np.uint8)
            label[:, w // 2 :] = 1 + i % 2
            label[0] = 255
            image = (g.random((h, w, 3)) * 60 + label[..., None] * 60).astype(np.uint8)
            Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg")
            Image.fromarray(label).save(base / "SegmentationClass" / f"{name}.png")
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def test_voc_streams_images_of_different_sizes_with_an_official_split_list(tmp_path, capsys):
    write_voc(tmp_path, [(40, 56), (48, 36), (33, 64)])
    (tmp_path / "labeled.txt").write_text(
        "image/2007_train1.jpg\tlabel/2007_train1.png\n"
        "image/2007_train4.jpg\tlabel/2007_train4.png\n"
    )
    result = cps.main(
        [
            "--dataset",
            "voc",
            "--data-dir",
            str(tmp_path),
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--crop-size",
            "32",
            "--batch-size",
            "2",
            "--iterations",
            "2",
            "--workers",
            "0",
            "--labeled-list",
            str(tmp_path / "labeled.txt"),
            "--out-dir",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--no-twin",
        ]
    )
    out = capsys.readouterr().out
    assert "the 2 images of" in out and "6 unlabelled (train), 2 evaluation images (val)" in out
    assert result["num_labeled"] == 2 and len(result["iou"]) == 21 and 0 <= result["miou"] <= 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "cifar10"], "not a known segmentation"),
        (["--dataset", "camvid", "--data-dir", "/nonexistent/camvid"], "/nonexistent/camvid"),
        (["--labeled-ratio", "0"], "--labeled-ratio: 0.0 is out of range: must be above 0"),
        (
            ["--labeled-ratio", "3/2"],
            "--labeled-ratio: 1.5 is out of range: must be above 0 and at most 1",
        ),
        (
            ["--labeled-ratio", "1/100"],
            "--labeled-ratio 0.01 of the 48 training images labels none",
        ),
        (["--labeled-ratio", "1"], "every training image is labelled"),
        (["--labeled-list", "{all}"], "every training image is labelled"),
        (["--labeled-list", "/nonexistent/list.txt"], "file not found"),
        (["--labeled-list", "{unknown}"], "not in the training set"),
        (["--labeled-list", "{empty}"], "is empty"),
        (["--batch-size", "0"], "--batch-size: 0 is out of range: must be at least 2"),
        (["--batch-size", "-4"], "--batch-size: -4 is out of range"),
        (["--batch-size", "1"], "--batch-size: 1 is out of range"),
        (["--iterations", "0"], "--iterations: 0 is out of range: must be at least 1"),
        (["--eval-every", "0"], "--eval-every: 0 is out of range"),
        (["--log-every", "0"], "--log-every: 0 is out of range"),
        (["--crop-size", "16"], "--crop-size: 16 is out of range: must be at least 32"),
        (["--image-size", "0"], "--image-size: 0 is out of range: must be at least 32"),
        (["--labeled-ratio", "one/8"], "expected a number or a fraction"),
    ],
)
def test_bad_input_is_a_clear_message_before_anything_is_written(
    tmp_path, argv, message, small_shapes_seg, capsys
):
    (tmp_path / "unknown.txt").write_text("1\n7\nno_such_image\n")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "all.txt").write_text("".join(f"{i}\n" for i in range(48)))
    lists = {name: tmp_path / f"{name}.txt" for name in ("unknown", "empty", "all")}
    argv = [a.format(**lists) for a in argv]
    base = [
        "--dataset",
        "shapes-seg",
        "--out-dir",
        str(tmp_path / "run"),
        "--iterations",
        "1",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit) as stop:
        cps.main(base + argv)
    assert message in str(stop.value) + capsys.readouterr().err  # ours, or argparse's on stderr
    assert not (tmp_path / "run").exists(), "nothing is written before the input is checked"


def write_segfolder(root, test_label):
    """A segfolder of 32 x 32 images, training masks of classes 0-2, one test mask holding
    `test_label`."""
    from PIL import Image

    g = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(count):
            mask = np.full((32, 32), i % 3, np.uint8)
            mask[:, 16:] = test_label if split == "test" and i == 1 else 2
            image = (g.random((32, 32, 3)) * 80 + mask[..., None] * 50).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{split}{i}.png")


def test_a_test_mask_with_a_class_training_never_saw_stops_the_run_at_load(tmp_path, monkeypatch):
    write_segfolder(tmp_path / "data", test_label=3)

    def no_training(*args):
        raise AssertionError("training began before the test masks were checked")

    monkeypatch.setattr(cps, "train_step", no_training)
    argv = ["--dataset", "segfolder", "--data-dir", str(tmp_path / "data"), "--crop-size", "32"]
    argv += ["--backbone", "resnet18", "--weights", "none", "--labeled-ratio", "1/2"]
    with pytest.raises(SystemExit, match=r"test1\.png holds label 3"):
        cps.main(argv + ["--device", "cpu", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_missing_imagenet_weights_offline_name_the_file_and_the_way_out(
    tmp_path, monkeypatch, small_shapes_seg
):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    with pytest.raises(
        SystemExit, match=r"resnet50-0676ba61\.pth.*hub.checkpoints.*--weights none"
    ) as error:
        argv = "--dataset shapes-seg --backbone resnet50 --weights imagenet --device cpu".split()
        cps.main(argv + ["--labeled-ratio", "1/8", "--out-dir", str(tmp_path / "run")])
    assert str(tmp_path / "torch") in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cps_learns_shapes_seg_within_a_cpu_budget(tmp_path):
    # The shapes-seg defaults (64 px images, 32 px crops, ResNet-18 from random weights, 8 labelled
    # images, batch 4 + 4 + 4, lr 0.02, 200 iterations, CutMix, lambda 1): 155-180 s a run here
    # (2-core CPU shared with another job, one thread). Predicting background everywhere scores
    # mIoU 0.141 and pixel accuracy 0.703 on the test split. Measured, seeds 0 / 1 / 2:
    #   CPS                     mIoU 0.227 / 0.222 / 0.228, pixel accuracy 0.736 / 0.730 / 0.730
    #   --cps-weight 0 (twin)   mIoU 0.248 / 0.255 / 0.249, pixel accuracy 0.726 / 0.710 / 0.727
    # So CPS learns, but within a CPU budget from random weights it does not beat its supervised
    # twin in mIoU. A search for a regime that could show the gain found none with headroom: at
    # 1,000 iterations a network trained on every label ends -1.5 to +4.2 points from the twin
    # (seeds 0-2), and the pseudo-labels are right at the background's 70% share (README, CPS:
    # Results, "Headroom and pseudo-labels"; Known gaps). This test guards the learning only.
    result = cps.main(
        [
            "--dataset",
            "shapes-seg",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--no-twin",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    assert (
        result["num_labeled"] == 8 and result["cps_weight"] == 1.0 and result["iterations"] == 200
    )
    assert result["miou"] >= 0.19 and result["pixel_acc"] > 0.703


def test_a_folder_of_images_of_different_sizes_trains_and_is_evaluated_at_each_own_size(
    tmp_path, monkeypatch
):
    from PIL import Image

    g = np.random.default_rng(0)
    sizes = {"train": [(40, 32), (32, 56), (36, 36), (48, 40)], "test": [(44, 32), (32, 50)]}
    for split, shapes in sizes.items():
        for sub in ("images", "masks"):
            (tmp_path / "data" / split / sub).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            mask = np.zeros((h, w), np.uint8)
            mask[:, w // 2 :] = 1
            mask[: h // 4] = 2
            image = (g.random((h, w, 3)) * 80 + mask[..., None] * 60).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(tmp_path / "data" / split / "masks" / f"{i}.png")
    evaluated = []  # the (h, w) of every image the evaluation scored
    real_confusion = common.confusion_matrix

    def confusion_recorded(pred, labels, num_classes):
        evaluated.append(tuple(labels.shape[-2:]))
        return real_confusion(pred, labels, num_classes)

    monkeypatch.setattr(common, "confusion_matrix", confusion_recorded)
    argv = ["--dataset", "segfolder", "--data-dir", str(tmp_path / "data"), "--crop-size", "32"]
    argv += ["--backbone", "resnet18", "--weights", "none", "--labeled-ratio", "1/2"]
    argv += [
        "--iterations",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-twin",
    ]
    result = cps.main(argv + ["--out-dir", str(tmp_path / "run")])
    assert evaluated[-2:] == sizes["test"], "each test image scored whole, at its own size"
    assert 0 <= result["miou"] <= 1 and (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow  # about 20 s: a run with its twin, and one stopped in the twin and resumed
def test_a_cps_run_trains_its_supervised_twin_on_the_same_labels_and_resumes_into_it(
    tmp_path, small_shapes_seg, monkeypatch, capsys
):
    pools = []  # (out folder, [(pool, seed) of each stream])
    real_batches, real_train = cps.training_batches, cps.train
    runs = []

    def batches(source, pool, seed, *rest):
        pools[-1][1].append((pool.tolist(), seed))
        return real_batches(source, pool, seed, *rest)

    def train(args):
        pools.append((args.out_dir, []))
        runs.append(args)
        return real_train(args)

    monkeypatch.setattr(cps, "training_batches", batches)
    monkeypatch.setattr(cps, "train", train)
    argv = [a for a in SMOKE if a != "--no-twin"]
    result = cps.main(argv + ["--out-dir", str(tmp_path / "a")])
    (cps_dir, cps_streams), (twin_dir, twin_streams) = pools
    assert twin_dir == str(tmp_path / "a" / "twin") and runs[1].cps_weight == 0
    assert len(cps_streams) == 3 and len(twin_streams) == 1, "labelled + U_a + U_b; labelled"
    assert twin_streams[0] == cps_streams[0], "the same labelled images, drawn alike"
    twin = json.loads((tmp_path / "a" / "twin" / "results.json").read_text())
    assert result["twin_miou"] == twin["miou"] and result["twin_pixel_acc"] == twin["pixel_acc"]
    assert twin["miou"] != result["miou"], "two different networks were evaluated"
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("supervised twin (--cps-weight 0)") for line in out)
    assert any(line.startswith("CPS ") for line in out)

    # stopped during the twin's training (at its first checkpoint), --resume finishes both alike
    real_save = common.save_checkpoint

    def save(path, state):
        real_save(path, state)
        if "twin" in str(path):
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(common, "save_checkpoint", save)
        with pytest.raises(SystemExit):
            cps.main(argv + ["--out-dir", str(tmp_path / "b")])
    assert (tmp_path / "b" / "twin" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / "twin" / "results.json").exists()
    resumed = cps.main(argv + ["--out-dir", str(tmp_path / "b"), "--resume"])
    for key in ("miou", "pixel_acc", "twin_miou", "twin_pixel_acc"):
        assert resumed[key] == result[key], key


@pytest.mark.slow  # about 10 s: a run and its fully labelled twin
def test_the_full_twin_trains_on_every_training_label_for_the_same_iterations(
    tmp_path, small_shapes_seg, monkeypatch, capsys
):
    # --full-twin: the headroom. A supervised run on all 48 training images' labels (not CPS's 6),
    # with CPS's iterations and batch, in its own folder, reported under fixed keys.
    streams = []  # per run: (out folder, cps weight, the labelled pool)
    real_batches, real_train = cps.training_batches, cps.train
    runs = []

    def batches(source, pool, seed, *rest):
        if len(streams) < len(runs):
            streams.append((runs[-1].out_dir, runs[-1].cps_weight, pool.tolist()))
        return real_batches(source, pool, seed, *rest)

    def train(args):
        runs.append(args)
        return real_train(args)

    monkeypatch.setattr(cps, "training_batches", batches)
    monkeypatch.setattr(cps, "train", train)
    result = cps.main(SMOKE + ["--full-twin", "--out-dir", str(tmp_path / "a")])
    (_, _, labelled), (full_dir, full_weight, everything) = streams
    assert len(labelled) == 6 and everything == list(range(48)), "every image, labelled"
    assert full_dir == str(tmp_path / "a" / "full_twin") and full_weight == 0
    assert runs[1].iterations == runs[0].iterations and runs[1].batch_size == runs[0].batch_size
    full = json.loads((tmp_path / "a" / "full_twin" / "results.json").read_text())
    assert result["full_twin_miou"] == full["miou"] and full["num_labeled"] == 48
    assert result["full_twin_pixel_acc"] == full["pixel_acc"]
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("every image labelled (--full-twin)") for line in out)
    assert "full_twin_miou" not in cps.main(SMOKE + ["--out-dir", str(tmp_path / "b")])


def test_predict_segments_new_images_each_at_its_own_size(
    tmp_path, small_shapes_seg, new_images, capsys
):
    from PIL import Image

    run = tmp_path / "run"
    cps.main(SMOKE + ["--iterations", "2", "--out-dir", str(run)])
    images, _ = common.make_shapes_seg(5, seed=3, size=64)
    sizes = [(48, 40), (64, 64), (40, 56), (64, 48), (36, 64)]
    images = [
        F.interpolate(im[None].float(), size=s)[0].byte()
        for im, s in zip(images, sizes, strict=True)
    ]
    folder, paths = new_images(images)
    summary = cps.main(["--predict", str(folder), "--out-dir", str(run), "--device", "cpu"])
    assert "broken.png: not a readable image" in capsys.readouterr().out
    state = common.load_checkpoint(run / "checkpoint.pt")
    model = cps.DeepLabV3Plus(5, cps.resnet("resnet18", "none"))
    model.load_state_dict(state["net1"])
    info = common.dataset_info("shapes-seg")
    run_args = cps.Args(image_size=32, crop_size=32)
    shares = (run / "predictions" / "shares.csv").read_text().splitlines()
    assert shares[0] == "path," + ",".join(common.SHAPES_SEG_CLASSES) and len(shares) == 6
    for path, row in zip(paths, shares[1:], strict=True):
        stem = str(Path(path).with_suffix(".png"))
        mask = torch.from_numpy(np.array(Image.open(run / "predictions" / "masks" / stem)))
        image = common._read_image(folder / path)
        assert mask.shape == image.shape[1:], "the mask at the image's own size"
        expected = cps.segment(model, image, (info.mean, info.std), run_args)
        assert torch.equal(mask.long(), expected), path
        assert (run / "predictions" / "overlays" / stem).exists()
        counts = torch.bincount(expected.flatten(), minlength=5) / expected.numel()
        assert [float(v) for v in row.split(",")[1:]] == pytest.approx(counts.tolist(), abs=1e-4)
    assert summary["images"] == 5
    # at the run's own size (shorter side 32), a mask is the evaluation's prediction exactly
    image = images[0][:, :32, :48]
    evaluated = cps.sliding_window(
        model.eval(), common.normalize(image[None], info.mean, info.std), 32
    )
    assert torch.equal(
        cps.segment(model, image, (info.mean, info.std), run_args), evaluated.argmax(1)[0]
    )


# --- Several processes: torchrun ----------------------------------------------------------------
def test_sync_bn_only_under_torchrun_on_cuda_and_each_share_holds_2_images(
    monkeypatch, capsys, tmp_path
):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not cps.sync_batch_norm(cps.Args(batch_size=2), cpu), "one process: plain batch norm"
    assert capsys.readouterr().out == ""
    # two processes, each on its GPU (NCCL), or all on the CPU (gloo)
    monkeypatch.setattr(common, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    assert cps.sync_batch_norm(cps.Args(batch_size=2), cuda), "synchronised: 1 image a process"
    assert not cps.sync_batch_norm(cps.Args(batch_size=4, sync_bn=False), cuda)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    assert not cps.sync_batch_norm(cps.Args(batch_size=4), cpu)
    assert capsys.readouterr().out == (
        "--sync-bn: not on the CPU; each process's batch norm sees its own share\n"
    ), "one line says it is not applied"
    with pytest.raises(common.ConfigError, match="--batch-size 2 leaves 1 image per process"):
        cps.sync_batch_norm(cps.Args(batch_size=2), cpu)
    # A global batch that does not split among the processes: refused before anything is written
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    never = tmp_path / "never"
    with pytest.raises(common.ConfigError, match="--batch-size 3 .* multiple of 2"):
        cps.train(cps.Args(dataset="shapes-seg", batch_size=3, device="cpu", out_dir=str(never)))
    assert not never.exists()
    # --sync-bn converts every batch norm of both networks, keeping their parameters
    args = cps.Args(backbone="resnet18", weights="none")
    net1, net2, optimizer, _ = cps.networks_and_optimizer(args, 5, cpu, sync_bn=True)
    for net in (net1, net2):
        kinds = {type(m) for m in net.modules()}
        assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in [*net1.parameters(), *net2.parameters()]}


def _segfolder(root: Path) -> Path:
    """A tiny in-memory folder: 16 training and 8 test images of shapes-seg, 32 px."""
    from PIL import Image

    for split, n, seed in (("train", 16, 0), ("test", 8, 1)):
        images, labels = common.make_shapes_seg(n, seed=seed, size=32)
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                root / split / "images" / f"{i}.png"
            )
            Image.fromarray(label.byte().numpy()).save(root / split / "masks" / f"{i}.png")
    return root


@pytest.mark.slow  # three launches of two processes: 80-120 s on two busy cores
def test_two_processes_train_both_networks_and_the_twin_write_once_and_resume(tmp_path, torchrun):
    data = _segfolder(tmp_path / "data")
    argv = ["--dataset", "segfolder", "--data-dir", data, "--crop-size", "32", "--batch-size", "4"]
    argv += ["--backbone", "resnet18", "--weights", "none", "--labeled-ratio", "1/2"]
    argv += ["--iterations", "4", "--eval-every", "2", "--log-every", "2", "--workers", "0"]
    argv += ["--device", "cpu"]
    done = torchrun("cps.py", argv + ["--out-dir", tmp_path / "a"], record=tmp_path / "two.pt")
    assert done.stdout.count("--sync-bn: not on the CPU") == 2, "once per run (CPS, twin), rank 0"
    a = tmp_path / "a"
    results = json.loads((a / "results.json").read_text())
    # Both processes ended with the same two networks, those rank 0 saved; the twin's too.
    checksums = results["weights_checksum"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    saved = common.load_checkpoint(a / "checkpoint.pt")
    total = torchrun.checksum(saved["net1"]) + torchrun.checksum(saved["net2"])
    assert checksums[0] == pytest.approx(total, rel=1e-12)
    assert len(saved["augment_rng"]) == 2, "each process's augmentation stream is kept"
    twin = json.loads((a / "twin" / "results.json").read_text())
    assert len(twin["weights_checksum"]) == 2 and len(set(twin["weights_checksum"])) == 1
    # One writer: one log each, its lines once (training and evaluation at iterations 2 and 4)
    for folder in (a, a / "twin"):
        assert [r["step"] for r in records(folder / "log.jsonl")] == [2, 2, 4, 4], folder
    for key in ("miou", "pixel_acc", "twin_miou", "twin_pixel_acc"):
        assert math.isfinite(results[key]) and 0 <= results[key] <= 1, key

    # The global batches are those one process draws: every step's labelled, U_a and U_b indices
    # gathered from the two shares, then the twin's labelled ones (the same stream as CPS's).
    labeled, unlabeled, _ = cps.labeled_partition([""] * 16, 0.5, 0)
    expected = [
        pool[cps.batch_indices(len(pool), 4, step, seed, "cpu")]
        for step in range(4)
        for pool, seed in ((labeled, 0), (unlabeled, 1), (unlabeled, 2))
    ]
    expected += [labeled[cps.batch_indices(len(labeled), 4, step, 0, "cpu")] for step in range(4)]
    drawn = torch.load(tmp_path / "two.pt")
    assert len(drawn) == len(expected) == 16
    assert all(torch.equal(x, y) for x, y in zip(drawn, expected, strict=True))

    # Stopped after its first checkpoint (iteration 2) and resumed under two processes, the run
    # ends with the uninterrupted run's figures, networks and logs.
    resumed = torchrun.resumed_after_stop("cps.py", argv, tmp_path / "b", step=2)
    for key in ("miou", "pixel_acc", "twin_miou", "weights_checksum"):
        assert resumed[key] == results[key], key
    for folder in ("", "twin"):
        assert records(tmp_path / "b" / folder / "log.jsonl") == records(a / folder / "log.jsonl")
