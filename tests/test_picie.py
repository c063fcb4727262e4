"""picie.py: equivariance of the two views, per-image transforms fixed for an epoch, the four-term
loss, class weights, the FPN, Hungarian-matched evaluation on constructed inputs, a smoke run with
resume, bad input, and learning tests: against the untrained network on shapes-seg, and against it
and the constant answer on CamVid where ../shared/data holds it."""

import copy
import dataclasses
import json
import math
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import picie

STATS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # features of [0, 1] images as they are
CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"  # optional: real data


def identity_transforms(n, boxes, flip):
    """Epoch transforms with no photometric change and the given crops and flips."""
    plain = common.draw_photometric(
        n, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, random_order=False
    )
    return {"p1": plain, "p2": plain, "boxes": boxes, "flip": flip}


def smooth_images(n, size, seed=0):
    """uint8 images (n, 3, size, size) without fine detail, so resampling chains nearly agree."""
    coarse = torch.rand(n, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (smooth.clamp(0, 1) * 255).round().to(torch.uint8)


def test_the_geometric_transform_of_a_feature_map_equals_the_features_of_the_transformed_input():
    # For a per-pixel (1x1, linear) network f, crop + flip + resize commutes with f exactly:
    # bilinear weights sum to one. This is what lets view 2 transform its feature map.
    torch.manual_seed(0)
    f = nn.Conv2d(3, 8, 1)
    x = torch.rand(4, 3, 24, 24)
    boxes = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.25, 0.1, 0.5, 0.5], [0.1, 0.4, 0.6, 0.6], [0.3, 0.0, 0.7, 0.7]]
    )
    flip = torch.tensor([False, True, False, True])
    with torch.no_grad():
        for size in (24, 12):
            assert torch.allclose(
                picie.geometric(f(x), boxes, flip, size),
                f(picie.geometric(x, boxes, flip, size)),
                atol=1e-5,
            )
        unflipped = picie.geometric(f(x), boxes, torch.zeros(4, dtype=torch.bool))
        assert not torch.allclose(unflipped[1], f(picie.geometric(x, boxes, flip))[1], atol=1e-2)


def test_the_two_views_are_aligned_pixel_for_pixel():
    # A stride-4 per-pixel network (4x4 average pooling, then a 1x1 convolution): view 1 crops the
    # image (decoded at twice the working size), view 2 crops its own feature map. On smooth images
    # the two feature maps agree up to resampling error; a wrong flip or box does not.
    torch.manual_seed(0)
    net = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 16, 1))
    images = smooth_images(6, 64)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.1, 0.3, 0.6, 0.6]])
    boxes = boxes.repeat(2, 1)
    flip = torch.tensor([False, False, False, True, True, True])
    transforms = identity_transforms(6, boxes, flip)
    with torch.no_grad():
        z1 = picie.view_features(net, images, transforms, 1, 32, STATS)
        z2 = picie.view_features(net, images, transforms, 2, 32, STATS)
        assert z1.shape == z2.shape == (6, 16, 8, 8)
        error = (z1 - z2).norm(dim=1)  # per pixel; both unit vectors
        wrong_flip = z1 - picie.view_features(
            net, images, identity_transforms(6, boxes, ~flip), 2, 32, STATS
        )
        # each box moved by a fifth of the image, vertically, staying inside it
        shifted = boxes.clone()
        shifted[:, 1] = torch.where(
            boxes[:, 1] + boxes[:, 3] <= 0.8, boxes[:, 1] + 0.2, boxes[:, 1] - 0.2
        )
        wrong_box = z1 - picie.view_features(
            net, images, identity_transforms(6, shifted, flip), 2, 32, STATS
        )
        # measured: error mean 0.011, max 0.063; wrong flip 0.23, wrong box 0.17 on average
        assert error.max() < 0.1
        assert wrong_flip.norm(dim=1).mean() > 10 * error.mean()
        assert wrong_box.norm(dim=1).mean() > 10 * error.mean()


def test_photometric_parameters_are_fixed_per_image_within_an_epoch():
    n = 8
    transforms = picie.draw_epoch_transforms(n, 0.5, torch.Generator().manual_seed(3))
    again = picie.draw_epoch_transforms(n, 0.5, torch.Generator().manual_seed(3))
    other = picie.draw_epoch_transforms(n, 0.5, torch.Generator().manual_seed(4))
    p1 = transforms["p1"]
    assert all(torch.equal(p1[k], again["p1"][k]) for k in p1)
    assert torch.equal(transforms["boxes"], again["boxes"])
    assert not torch.equal(p1["brightness"], other["p1"]["brightness"])
    assert not torch.equal(p1["brightness"], transforms["p2"]["brightness"]), "views draw apart"
    side = transforms["boxes"][:, 2]
    x0, y0 = transforms["boxes"][:, :2].T
    assert torch.equal(side, transforms["boxes"][:, 3])
    assert bool(((side >= 0.5) & (side <= 1)).all())
    assert bool(((x0 >= 0) & (x0 + side <= 1 + 1e-6) & (y0 >= 0) & (y0 + side <= 1 + 1e-6)).all())
    # Image 5's views are the same whichever batch it comes in (clustering, labelling, training
    # passes see different batches), and differ between the views.
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 1)
    images = torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        for view in (1, 2):
            whole = picie.view_features(net, images, transforms, view, 16, STATS)
            for idx in (torch.tensor([5]), torch.tensor([2, 5, 0])):
                batch_transforms = picie.pick(transforms, idx)
                part = picie.view_features(net, images[idx], batch_transforms, view, 16, STATS)
                assert torch.allclose(part[list(idx).index(5)], whole[5], atol=1e-4)
        z1 = picie.view_features(net, images, transforms, 1, 16, STATS)
        z1_other = picie.view_features(net, images, other, 1, 16, STATS)
        assert not torch.allclose(z1, z1_other, atol=1e-2), "another epoch, other views"


class GlobalMix(nn.Module):
    """A stand-in network of stride 4 whose feature at a pixel also holds the whole image's mean
    colour: cropping its input is not cropping its output, unlike a per-pixel network's."""

    def forward(self, x):
        return F.avg_pool2d(x, 4) + 2 * x.mean((2, 3), keepdim=True)


def test_view_1_transforms_the_image_and_view_2_its_feature_map_each_with_its_colours():
    # Sec. 3.3: Z1 = f(crop(P1(x))), Z2 = crop(f(P2(x))), every feature L2-normalised; view 2's
    # feature map is resampled first and normalised once (official `train_picie.py`).
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    jitter = dict(jitter_p=1.0, jitter_each=True, random_order=False, grayscale_p=0.0, blur_p=0.0)
    transforms = {
        "p1": common.draw_photometric(3, **jitter, generator=g),
        "p2": common.draw_photometric(3, **jitter, generator=g),
        "boxes": torch.tensor(
            [[0.1, 0.3, 0.55, 0.55], [0.0, 0.0, 1.0, 1.0], [0.37, 0.2, 0.6, 0.6]]
        ),
        "flip": torch.tensor([True, False, True]),
    }
    stats = ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    net, x = GlobalMix(), images.float() / 255
    boxes, flip = transforms["boxes"], transforms["flip"]

    def f(x):  # pixel_features' contract
        return F.normalize(net(common.normalize(x, *stats)), dim=1)

    z1 = f(picie.geometric(common.apply_photometric(x, transforms["p1"]), boxes, flip, 16))
    raw2 = net(
        common.normalize(picie.shrink(common.apply_photometric(x, transforms["p2"]), 16), *stats)
    )
    z2 = F.normalize(picie.geometric(raw2, boxes, flip), dim=1)
    twice = F.normalize(picie.geometric(F.normalize(raw2, dim=1), boxes, flip), dim=1)
    assert not torch.allclose(z2, twice, atol=1e-3), "normalised before the resampling differs"
    assert torch.allclose(picie.view_features(net, images, transforms, 1, 16, stats), z1, atol=1e-6)
    assert torch.allclose(picie.view_features(net, images, transforms, 2, 16, stats), z2, atol=1e-6)
    assert not torch.allclose(z1, z2, atol=1e-2), "the example tells the views apart"


def test_epoch_transforms_follow_picies_ranges_and_probabilities():
    n = 20_000
    t = picie.draw_epoch_transforms(n, 0.5, torch.Generator().manual_seed(0))
    x0, y0, side = t["boxes"][:, 0], t["boxes"][:, 1], t["boxes"][:, 2]
    assert abs(t["flip"].float().mean() - 0.5) < 0.02
    # side ~ U[min_scale, 1]; the corner uniform over the positions that keep the box inside
    assert side.min() < 0.51 and side.max() > 0.99 and abs(side.mean() - 0.75) < 0.01
    u, v = x0 / (1 - side), y0 / (1 - side)
    for w in (u, v):
        assert w.min() < 0.01 and w.max() > 0.99 and abs(w.mean() - 0.5) < 0.02
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.05, "x and y drawn apart"
    for p in (t["p1"], t["p2"]):
        for name, low, high, off in (
            ("brightness", 0.7, 1.3, 1.0),
            ("contrast", 0.7, 1.3, 1.0),
            ("saturation", 0.7, 1.3, 1.0),
            ("hue", -0.1, 0.1, 0.0),
        ):
            on = p[name] != off
            assert abs(on.float().mean() - 0.8) < 0.02, name
            values = p[name][on]
            assert values.min() >= low and values.max() <= high, name
            assert values.min() < low + 0.01 and values.max() > high - 0.01, "both directions"
        both_on = ((p["brightness"] != 1) & (p["contrast"] != 1)).float().mean()
        assert abs(both_on - 0.64) < 0.02, "each jitter op on its own coin"
        assert abs(p["grayscale"].float().mean() - 0.2) < 0.02
        blurred = p["sigma"] > 0
        assert abs(blurred.float().mean() - 0.5) < 0.02
        assert p["sigma"][blurred].min() >= 0.1 and p["sigma"][blurred].max() <= 2.0
    assert abs(np.corrcoef(t["p1"]["brightness"], t["p2"]["brightness"])[0, 1]) < 0.05


def test_labels_are_the_nearest_centroid_by_euclidean_distance():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(2, 8, 3, 5, generator=g), dim=1)
    norms = 0.3 + torch.rand(6, 1, generator=g)  # centroids of unequal lengths
    centroids = F.normalize(torch.randn(6, 8, generator=g), dim=1) * norms
    distances = (z.permute(0, 2, 3, 1)[..., None, :] - centroids).square().sum(-1)
    labels = picie.assign_labels(z, centroids)
    assert torch.equal(labels, distances.argmin(-1))
    logits = picie.cluster_logits(z, centroids)
    assert not torch.equal(labels, logits.argmax(1)), "not the largest dot product"
    half = (logits - centroids.square().sum(1)[None, :, None, None]).argmax(1)
    assert not torch.equal(labels, half), "the example needs the 2 in 2 z . mu - |mu|^2"


def test_sample_pixels_draws_distinct_pixels_of_each_image_at_random():
    z = torch.arange(2 * 16, dtype=torch.float).reshape(2, 1, 4, 4)
    z = torch.cat([z, -z], 1)  # two channels that must travel together
    picked = picie.sample_pixels(z, 5, torch.Generator().manual_seed(0))
    assert picked.shape == (10, 2) and torch.equal(picked[:, 1], -picked[:, 0])
    first, second = picked[:5, 0].long(), picked[5:, 0].long() - 16
    for values in (first, second):
        assert len(set(values.tolist())) == 5 and 0 <= values.min() and values.max() < 16
    assert set(first.tolist()) != set(second.tolist()), "each image draws its own pixels"
    drawn = set()
    for seed in range(40):
        drawn |= set(
            picie.sample_pixels(z[:1], 5, torch.Generator().manual_seed(seed))[:, 0].tolist()
        )
    assert len(drawn) == 16, "every pixel can be drawn"
    assert torch.equal(picie.sample_pixels(z, 16), z.flatten(2).transpose(1, 2).reshape(-1, 2))


def test_four_term_loss_on_a_constructed_example():
    # One image of two pixels with 2-d features e0 and e1 (already unit length), K = 2.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixel 0: e0, pixel 1: e1
    z2 = torch.tensor([[0.6, 0.8], [0.8, 0.6]]).T.reshape(1, 2, 1, 2)
    mu1, mu2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    y1, y2 = torch.tensor([[[0, 1]]]), torch.tensor([[[1, 0]]])  # each view has both labels
    w1, w2 = torch.tensor([0.75, 0.25]), torch.tensor([0.2, 0.8])

    def ce(z, mu, y, w):  # by hand: sum_i w_yi (-log softmax(z_i . mu)_yi) / sum_i w_yi
        num = den = 0.0
        for i in range(2):
            logits = [
                sum(z[0, c, 0, i].item() * mu[k, c].item() for c in range(2)) for k in range(2)
            ]
            target = y[0, 0, i].item()
            nll = -(logits[target] - math.log(sum(math.exp(v) for v in logits)))
            num += w[target].item() * nll
            den += w[target].item()
        return num / den

    within = (ce(z1, mu1, y1, w1) + ce(z2, mu2, y2, w2)) / 2
    cross = (ce(z1, mu2, y2, w2) + ce(z2, mu1, y1, w1)) / 2
    loss, loss_within, loss_cross = picie.picie_loss(z1, z2, mu1, mu2, y1, y2, w1, w2)
    assert loss_within.item() == pytest.approx(within, rel=1e-6)
    assert loss_cross.item() == pytest.approx(cross, rel=1e-6)
    assert loss.item() == pytest.approx((within + cross) / 2, rel=1e-6)
    assert within != pytest.approx(cross), "the example tells the within and cross terms apart"
    unweighted = picie.picie_loss(z1, z2, mu1, mu2, y1, y2, torch.ones(2), torch.ones(2))[0]
    assert unweighted.item() != pytest.approx(loss.item()), "the example needs the weights"
    # the classifiers are frozen: gradients reach the features, not the centroids
    z1g, z2g = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    picie.picie_loss(z1g, z2g, mu1, mu2, y1, y2, w1, w2)[0].backward()
    assert z1g.grad.abs().sum() > 0 and z2g.grad.abs().sum() > 0 and mu1.grad is None


def test_labels_are_the_nearest_centroid_and_logits_the_dot_product():
    z = F.normalize(torch.tensor([[1.0, 0.1], [0.6, 0.8]]), dim=1).T.reshape(1, 2, 1, 2)
    # pixel 1 is nearer centroid 0, yet closer in angle to 1
    centroids = torch.tensor([[0.9, 0.0], [2.0, 2.0]])
    assert picie.assign_labels(z, centroids).tolist() == [[[0, 0]]]
    assert torch.allclose(picie.cluster_logits(z, centroids)[0, :, 0, 1], centroids @ z[0, :, 0, 1])


def test_class_weights():
    counts = torch.tensor([6, 3, 0, 1])
    assert torch.allclose(
        picie.cluster_weights(counts, "proportional"), torch.tensor([0.6, 0.3, 0.0, 0.1])
    )
    assert torch.allclose(
        picie.cluster_weights(counts, "inverse"), torch.tensor([1 / 9, 2 / 9, 0.0, 2 / 3])
    )
    assert torch.allclose(picie.cluster_weights(counts, "none"), torch.full((4,), 0.25))
    # inverse weights make the weighted cross-entropy the mean over clusters of each cluster's mean
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0] * 6 + [1] * 3 + [3])
    nll = F.cross_entropy(logits, y, reduction="none")
    per_cluster = torch.stack([nll[y == k].mean() for k in (0, 1, 3)]).mean()
    assert torch.allclose(
        F.cross_entropy(logits, y, weight=picie.cluster_weights(counts, "inverse")), per_cluster
    )
    with pytest.raises(ValueError):
        picie.cluster_weights(counts, "sqrt")


def test_fpn_output_is_128_channels_at_stride_4_and_sums_all_four_levels():
    torch.manual_seed(0)
    net = picie.PiCIENet("none").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 320, 320)).shape == (1, 128, 80, 80)
        assert net(torch.randn(2, 3, 64, 96)).shape == (2, 128, 16, 24)
        # the top-down path alone (finer laterals silenced): bilinear upsampling, level by level
        x = torch.randn(1, 3, 64, 64)
        levels = [net.stem(x)]
        for stage in net.stages:
            levels.append(stage(levels[-1]))
        top_down = net.lateral[3](levels[4])
        for level in levels[3:0:-1]:
            top_down = F.interpolate(
                top_down, level.shape[-2:], mode="bilinear", align_corners=False
            )
        for lateral in net.lateral[:3]:
            lateral.weight.zero_()
            lateral.bias.zero_()
        assert torch.allclose(net(x), top_down, atol=1e-6)
        # lateral projections reduced to biases 1, 2, 4, 8
        for i, lateral in enumerate(net.lateral):
            lateral.weight.zero_()
            lateral.bias.fill_(2.0**i)
        assert torch.allclose(net(torch.randn(1, 3, 64, 64)), torch.full((1, 128, 16, 16), 15.0))
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert batch_norms == 20, "ResNet-18's own, none in the decoder"


def test_hungarian_matched_miou_on_a_constructed_confusion_matrix():
    # 3 classes, 4 clusters: cluster 1 is class 0, cluster 0 class 1, cluster 2 class 2, cluster 3
    # unmatched.
    conf = torch.tensor([[0, 10, 0, 2], [8, 0, 0, 0], [0, 2, 6, 0]])
    scores = common.segmentation_scores(conf, hungarian=True)
    assert scores["match"] == [1, 0, 2, -1]
    assert scores["miou"] == pytest.approx((10 / 14 + 1 + 6 / 8) / 3)
    assert scores["pixel_acc"] == pytest.approx(24 / 28)


class Colours(nn.Module):
    """A stand-in network of stride 4 whose features are a pixel block's mean colour."""

    def forward(self, x):
        return F.avg_pool2d(x, 4)


class Grey(nn.Module):
    """A stand-in network that sees only brightness, the same in every band here."""

    def forward(self, x):
        return F.avg_pool2d(x, 4).mean(1, keepdim=True).expand(-1, 3, -1, -1) + 1


def band_images(n, side, seed=0):
    """Images of four horizontal bands, each pure red, green or blue; class = (colour + 1) % 3, not
    the colour's index. (Bands, not quadrants: where four cells meet, bilinear upsampling of the
    logits rightly lets three of them outvote the fourth at the corner pixel.)"""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, 3, (n, 4, 1), generator=g)
    colour_map = colour.repeat_interleave(side // 4, 1).repeat_interleave(side, 2)
    images = (F.one_hot(colour_map, 3).permute(0, 3, 1, 2) * 255).to(torch.uint8)
    return images, (colour_map + 1) % 3


def test_evaluation_recovers_a_segmentation_the_features_separate(monkeypatch):
    train_images, train_labels = band_images(16, 32, seed=0)
    eval_images, eval_labels = band_images(8, 32, seed=1)
    data = picie.PicieData(
        train_source=(train_images, train_labels),
        eval_source=(eval_images, eval_labels),
        num_train=16,
        num_eval=8,
        num_classes=3,
        num_clusters=3,
        stats=STATS,
        fit_idx=torch.arange(16),
        description="bands",
    )
    args = picie.Args(image_size=16, seed=0, kmeans_pixels=10_000, batch_size=5)
    fitted = []  # what k-means was given: the un-augmented training images data.fit_idx
    real_cluster_pixels = picie.cluster_pixels

    def cluster_pixels(features_of, source, idx, *rest):
        fitted.append((source, idx))
        return real_cluster_pixels(features_of, source, idx, *rest)

    monkeypatch.setattr(picie, "cluster_pixels", cluster_pixels)
    scores, (shown_x, shown_y, shown_pred) = picie.evaluate(Colours(), data, args, show=4)
    ((source, idx),) = fitted
    assert source is data.train_source and torch.equal(idx, data.fit_idx)
    assert scores["miou"] == pytest.approx(1.0) and scores["pixel_acc"] == pytest.approx(1.0)
    assert shown_x.shape == (4, 3, 16, 16) and torch.equal(shown_pred, shown_y)
    assert torch.equal(shown_y, eval_labels[[0, 2, 5, 7], ::2, ::2]), "images spread over the split"
    # with a feature that cannot see colour, the same evaluation is at chance level
    blind, _ = picie.evaluate(Grey(), data, picie.Args(image_size=16, kmeans_pixels=10_000))
    assert blind["miou"] < 0.5


def band_data(n=16, n_eval=8, num_clusters=3):
    """PicieData of `band_images`, 32 px decoded for a 16 px run."""
    train_images, train_labels = band_images(n, 32, seed=0)
    eval_images, eval_labels = band_images(n_eval, 32, seed=1)
    return picie.PicieData(
        train_source=(train_images, train_labels),
        eval_source=(eval_images, eval_labels),
        num_train=n,
        num_eval=n_eval,
        num_classes=3,
        num_clusters=num_clusters,
        stats=STATS,
        fit_idx=torch.arange(n),
        description="bands",
    )


def test_every_evaluation_judges_the_network_with_clean_statistics_and_then_restores_them():
    # The official evaluation re-estimates batch norm on its clustering images (train-mode
    # passes); training's statistics, from augmented batches, must come back afterwards.
    data = band_data()
    args = picie.Args(image_size=16, batch_size=5, kmeans_pixels=10_000, kmeans_iters=5)
    net = nn.Sequential(nn.AvgPool2d(4), nn.BatchNorm2d(3))
    net[1].running_mean.copy_(torch.tensor([3.0, -2.0, 0.0]))  # statistics of other images
    net[1].running_var.copy_(torch.tensor([0.01, 9.0, 1.0]))
    trained = [t.clone() for t in (net[1].running_mean, net[1].running_var)]
    as_trained, _ = picie.evaluate_as_is(net, data, args)
    scores, _ = picie.evaluate(net, data, args)
    assert torch.equal(net[1].running_mean, trained[0]), "training's statistics are back"
    assert torch.equal(net[1].running_var, trained[1])
    clean = copy.deepcopy(net)
    picie.fit_batch_norm(clean, data, args)
    expected, _ = picie.evaluate_as_is(clean, data, args)
    assert scores["miou"] == expected["miou"] and scores["pixel_acc"] == expected["pixel_acc"]
    assert as_trained["miou"] < scores["miou"] - 0.1, "the example tells the two apart"


def test_the_constant_baseline_is_one_cluster_everywhere_under_hungarian_matching():
    data = band_data()
    args = picie.Args(image_size=16, batch_size=5)
    eval_labels = data.eval_source[1][:, ::2, ::2]  # the labels at 16 px, as evaluated
    shares = torch.bincount(eval_labels.flatten(), minlength=3).double() / eval_labels.numel()
    scores = picie.constant_baseline(data, args)
    assert scores["pixel_acc"] == pytest.approx(float(shares.max()))
    assert scores["miou"] == pytest.approx(float(shares.max()) / 3), (
        "one class matched, IoU = share"
    )


def test_each_view_is_labelled_by_its_own_centroids_and_weighted_by_its_own_sizes():
    data = band_data()
    args = picie.Args(image_size=16, batch_size=5, kmeans_pixels=10_000, kmeans_iters=5)

    def features(idx, images, transforms, view):  # view 2 sees the colours rolled
        x = images.float() / 255
        return F.avg_pool2d(x if view == 1 else x.roll(1, 1), 8)

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(16, 1)
    transforms = identity_transforms(16, boxes, torch.zeros(16, dtype=torch.bool))
    (centroids, labels, weights), record = picie.cluster_and_label(
        features, data, data.fit_idx, transforms, 0, args
    )
    assert not torch.allclose(centroids[0], centroids[1]), "the example tells the views apart"
    images = data.train_source[0]
    for view in (1, 2):
        z = features(torch.arange(16), images, transforms, view)
        assert torch.equal(labels[view - 1].long(), picie.assign_labels(z, centroids[view - 1]))
        counts = torch.bincount(labels[view - 1].flatten().long(), minlength=3)
        assert torch.allclose(weights[view - 1], picie.cluster_weights(counts))
        assert record[f"diag/label_miou{view}"] == pytest.approx(1.0), "labels lie on the truth"
    assert not torch.equal(labels[0], labels[1])


def test_train_step_is_one_adam_step_on_the_loss_of_both_views_of_its_images():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 1)
    twin = copy.deepcopy(net)
    start = net.weight.detach().clone()

    def features_of(model):
        def features(idx, images, transforms, view):
            x = F.avg_pool2d(images.float() / 255, 4)
            return F.normalize(model(x if view == 1 else x.flip(-1)), dim=1)

        return features

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    idx = torch.tensor([4, 1, 3])
    centroids = [torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)]
    labels = [torch.randint(0, 3, (6, 2, 2), generator=g).to(torch.uint8) for _ in range(2)]
    weights = [torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])]
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    got = picie.train_step(
        net, features_of(net), optimizer, idx, images[idx], None, (centroids, labels, weights)
    )
    f = features_of(twin)
    z1, z2 = f(idx, images[idx], None, 1), f(idx, images[idx], None, 2)
    losses = picie.picie_loss(z1, z2, *centroids, labels[0][idx], labels[1][idx], *weights)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=0.1)
    losses[0].backward()
    twin_optimizer.step()
    assert torch.allclose(got, torch.stack(losses).detach())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters(), strict=True))
    assert not torch.equal(net.weight, start)


class NormedColours(nn.Module):
    """Colours after a batch norm: the stand-in whose statistics the baseline recomputes."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.avg_pool2d(self.bn(x), 4)


def test_the_baseline_recomputes_batch_norm_on_the_k_means_images_as_the_network_sees_them():
    data = band_data()
    data.fit_idx = torch.tensor([7, 2, 5, 0, 9])  # batches of 2: image 9 would be alone, left out
    data.stats = ((0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    args = picie.Args(image_size=16, batch_size=2, kmeans_pixels=1000, kmeans_iters=2)
    model = NormedColours()
    picie.untrained_baseline(model, model, data, args, amp=False)
    images = data.train_source[0][[7, 2, 5, 0]]
    seen = common.normalize(picie.shrink(images, 16), *data.stats)
    assert torch.allclose(model.bn.running_mean, seen.mean((0, 2, 3)), atol=1e-6)
    assert not model.training, "evaluated in eval mode"


@pytest.fixture
def small_shapes_seg(monkeypatch):
    """shapes-seg with 48 images per split instead of 1,000 / 200, so a run takes seconds."""
    real = common.make_shapes_seg
    monkeypatch.setattr(
        common, "make_shapes_seg", lambda n, seed=0, size=64: real(min(n, 48), seed, size)
    )


# One thread: torch's default pool ran this test 4 times slower on a busy 2-core machine.
SMOKE = (
    "--dataset shapes-seg --weights none --image-size 16 --epochs 2 --eval-every 1 --batch-size 16 "
    "--kmeans-images 24 --kmeans-iters 5 --log-every 2 --device cpu --threads 1"
).split()


def records_of(run) -> list:
    """log.jsonl's records without the timing fields (which differ between any two runs)."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("perf/")} for x in lines]


def watch_loop(monkeypatch) -> dict:
    """Spies on a run's loop: per epoch what `cluster_and_label` got and gave and the images of
    every `train_step` (with whether it got that epoch's transforms and clusters), and the mode
    (train or eval) of the network in each pass."""
    seen = {"epochs": [], "modes": set()}
    phase = ["other"]
    real_cluster, real_step, real_evaluate = (
        picie.cluster_and_label,
        picie.train_step,
        picie.evaluate_as_is,
    )
    real_forward = picie.PiCIENet.forward

    def in_phase(name, fn, *args):
        phase[0] = name
        try:
            return fn(*args)
        finally:
            phase[0] = "other"

    def cluster_and_label(features, data, fit_idx, transforms, seed, args):
        clusters, record = in_phase(
            "cluster", real_cluster, features, data, fit_idx, transforms, seed, args
        )
        epoch = {"transforms": transforms, "fit_idx": fit_idx.clone(), "clusters": clusters}
        seen["epochs"].append({**epoch, "steps": [], "same": []})
        return clusters, record

    def train_step(model, features, optimizer, idx, images, transforms, clusters):
        epoch = seen["epochs"][-1]
        epoch["steps"].append(idx.clone())
        epoch["same"].append(transforms is epoch["transforms"] and clusters is epoch["clusters"])
        step = (model, features, optimizer, idx, images, transforms, clusters)
        return in_phase("train", real_step, *step)

    def forward(self, x):
        seen["modes"].add((phase[0], self.training))
        return real_forward(self, x)

    monkeypatch.setattr(picie, "cluster_and_label", cluster_and_label)
    monkeypatch.setattr(picie, "train_step", train_step)
    # the evaluation proper; its batch-norm recomputation (a train-mode pass) is "other"
    monkeypatch.setattr(
        picie, "evaluate_as_is", lambda *a, **k: in_phase("evaluate", real_evaluate, *a)
    )
    monkeypatch.setattr(picie.PiCIENet, "forward", forward)
    return seen


def test_smoke_run_checkpoints_at_evaluations_and_resume_reaches_the_same_result(
    tmp_path, monkeypatch, capsys, small_shapes_seg
):
    saved = []  # the epoch of every checkpoint written
    real_save = common.save_checkpoint

    def spy(path, state):
        real_save(path, state)
        saved.append(state["epoch"])

    monkeypatch.setattr(common, "save_checkpoint", spy)
    loop = watch_loop(monkeypatch)
    straight = picie.main(SMOKE + ["--out-dir", str(tmp_path / "a")])
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "results.json", "segmentation.png"):
        assert (tmp_path / "a" / name).exists(), name
    keys = {
        "miou",
        "pixel_acc",
        "baseline_miou",
        "baseline_pixel_acc",
        "constant_miou",
        "constant_pixel_acc",
        "seconds",
        "images_per_second",
    }
    assert keys <= set(straight)
    assert keys <= set(json.loads((tmp_path / "a" / "results.json").read_text()))
    figures = ("miou", "pixel_acc", "baseline_miou", "baseline_pixel_acc", "constant_miou")
    assert all(0 <= straight[k] <= 1 for k in figures)
    assert straight["num_clusters"] == 5, "K defaults to the number of classes"
    records = records_of(tmp_path / "a")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 * 2 and all(math.isfinite(v) for v in losses)
    assert [r["step"] for r in records if "eval/miou" in r] == [1, 2]
    assert saved == [1, 2], "a checkpoint after every evaluation"
    assert sum("baseline/miou" in r for r in records) == 1
    assert sum("cluster/kmeans_loss1" in r for r in records) == 2
    # the loop: k-means anew every epoch, on new views of --kmeans-images images, then every
    # training image once, in a new order, against that epoch's views and clusters
    first, second = loop["epochs"]
    assert not torch.equal(first["transforms"]["boxes"], second["transforms"]["boxes"])
    assert not torch.equal(first["fit_idx"], second["fit_idx"])
    assert not torch.equal(torch.cat(first["steps"]), torch.cat(second["steps"]))
    for epoch in (first, second):
        assert len(set(epoch["fit_idx"].tolist())) == 24 and all(epoch["same"])
        assert sorted(torch.cat(epoch["steps"]).tolist()) == list(range(48))

    # Run b evaluates only at its end, checkpoints on the clock (made due every epoch), and is
    # stopped as by Ctrl-C in epoch 2, after two more log lines than its checkpoint holds.
    b = tmp_path / "b"
    argv_b = SMOKE + ["--out-dir", str(b), "--eval-every", "2"]
    saved.clear()
    monkeypatch.setattr(common, "CHECKPOINT_SECONDS", 0)
    real_step, calls = picie.train_step, []

    def step_then_stop(*args):
        calls.append(1)
        if len(calls) == 6:  # epoch 2's third step (48 images, batches of 16)
            raise KeyboardInterrupt
        return real_step(*args)

    with monkeypatch.context() as patch:
        patch.setattr(picie, "train_step", step_then_stop)
        with pytest.raises(SystemExit) as stop:
            picie.main(argv_b)
    assert stop.value.code == 130 and str(b / "checkpoint.pt") in capsys.readouterr().err
    assert saved == [1], "the clock's checkpoint, without an evaluation"
    # k-means and evaluation see the network in eval mode, training in train mode (run b
    # clusters epoch 2 right after training, with no evaluation between)
    assert {("cluster", False), ("evaluate", False), ("train", True)} <= loop["modes"]
    assert not {("cluster", True), ("evaluate", True), ("train", False)} & loop["modes"]
    assert len(records_of(b)) == 4 + 2, "baseline, epoch 1's three lines; epoch 2's first two"
    with pytest.raises(SystemExit, match="--resume"):  # a run in progress is not overwritten
        picie.main(argv_b)

    # A damaged checkpoint is named, and nothing in the run folder changes.
    damaged = tmp_path / "damaged"
    shutil.copytree(b, damaged)
    checkpoint = damaged / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = {f.name: f.read_bytes() for f in damaged.iterdir()}
    with pytest.raises(SystemExit, match=f"{checkpoint}.*damaged or incomplete"):
        picie.main(SMOKE + ["--out-dir", str(damaged), "--eval-every", "2", "--resume"])
    assert {f.name: f.read_bytes() for f in damaged.iterdir()} == before

    # A flag that decides the result is refused on --resume, args.json left as it was.
    args_json = (b / "args.json").read_text()
    with pytest.raises(SystemExit, match=r"--epochs 2 \(now 3\)"):
        picie.main(argv_b + ["--resume", "--epochs", "3"])
    assert (b / "args.json").read_text() == args_json
    # --eval-every may change: the evaluations do not touch the training.
    resumed = picie.main(SMOKE + ["--out-dir", str(b), "--eval-every", "1", "--resume"])
    assert (b / "args.json").read_text() == args_json, "args.json is the run's start"
    for k in figures:
        assert resumed[k] == straight[k], k
    model_a = common.load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    model_b = common.load_checkpoint(b / "checkpoint.pt")["model"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    # b's log reads as one run, a's without its evaluation after epoch 1: the lines of the
    # stopped epoch once, in order.
    expected = [r for r in records_of(tmp_path / "a") if not ("eval/miou" in r and r["step"] == 1)]
    assert records_of(b) == expected


def write_cityscapes(root: Path, counts: dict) -> None:
    """A tiny Cityscapes tree under `root`, random 40 x 80 images and label ids: `counts` images
    per split ({"test": 2, ...})."""
    from PIL import Image

    def write(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    g = np.random.default_rng(0)
    for split, count in counts.items():
        for i in range(count):
            stem = f"bonn_{split}_{i}"
            write(
                root / "leftImg8bit" / split / "bonn" / f"{stem}_leftImg8bit.png",
                g.integers(0, 256, (40, 80, 3), dtype=np.uint8),
            )
            if split != "train_extra":  # train_extra has no labels
                write(
                    root / "gtFine" / split / "bonn" / f"{stem}_gtFine_labelIds.png",
                    g.integers(0, 34, (40, 80), dtype=np.uint8),
                )


def test_cityscapes_trains_on_test_and_train_extra_and_evaluates_27_classes_on_val_and_train(
    tmp_path, capsys
):
    # A tiny Cityscapes tree, 40 x 80 images: the official protocol's splits, streamed from disk.
    write_cityscapes(tmp_path, {"test": 2, "train_extra": 3, "val": 1, "train": 2})
    result = picie.main(
        [
            "--dataset",
            "cityscapes",
            "--data-dir",
            str(tmp_path),
            "--weights",
            "none",
            "--image-size",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--out-dir",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert "5 training (test+train_extra) and 3 evaluation (val+train) images" in out
    assert result["num_clusters"] == 27 and len(result["iou"]) == 27
    assert 0 <= result["miou"] <= 1
    run_args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert run_args["lr"] == 1e-3, "Cityscapes' learning rate"


def test_squares_crop_the_centre_and_batches_stream_them_in_order():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.uint8).reshape(2, 3, 4, 6)
    labels = torch.arange(2 * 4 * 6).reshape(2, 4, 6)
    squares = picie.Squares(common.SegmentationSet(["a"], "train", images=images, labels=labels), 4)
    i, image, label = squares[1]
    assert i == 1
    assert torch.equal(image, images[1, :, :, 1:5]) and torch.equal(label, labels[1, :, 1:5])
    order = torch.tensor([1, 0])
    ((idx, x, y),) = list(picie.batches(squares, order, batch_size=2))
    assert idx.tolist() == [1, 0]
    assert torch.equal(x, images[[1, 0], :, :, 1:5]) and torch.equal(y, labels[[1, 0], :, 1:5])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "cifar10"], "not a known segmentation"),
        (["--dataset", "camvid", "--data-dir", "/nonexistent/camvid"], "/nonexistent/camvid"),
        (["--batch-size", "0"], "--batch-size: 0 is out of range: must be at least 1"),
        (["--batch-size", "-4"], "--batch-size: -4 is out of range"),
        (["--batch-size", "1"], "--batch-size 1 with 48 training images makes batches of one"),
        (["--eval-every", "0"], "--eval-every: 0 is out of range"),
        (["--log-every", "0"], "--log-every: 0 is out of range"),
        (["--epochs", "0"], "--epochs: 0 is out of range"),
        (["--kmeans-images", "0"], "--kmeans-images: 0 is out of range"),
        (["--num-clusters", "0"], "--num-clusters: 0 is out of range: must be at least 2"),
        (["--num-clusters", "300"], "must be at least 2 and at most 256"),
        (["--image-size", "8"], "--image-size: 8 is out of range: must be at least 16"),
        # k-means sees 48 images x max(1, 30 // 48) pixels (the next test: every case)
        (["--num-clusters", "49", "--kmeans-pixels", "30"], "exceeds the 48 pixel features"),
    ],
)
def test_bad_input_is_a_clear_message_before_training(
    tmp_path, capsys, argv, message, small_shapes_seg
):
    base = [
        "--dataset",
        "shapes-seg",
        "--out-dir",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit) as stop:
        picie.main(base + argv)
    said = f"{stop.value.code}\n{capsys.readouterr().err}"  # argparse's errors go to stderr
    assert message in said and "Traceback" not in said
    assert not (tmp_path / "run").exists(), "nothing is written before the input is checked"


@pytest.mark.parametrize("pixels,images", [(30, 24), (30, 48), (1000, 2), (100, 7)])
def test_the_num_clusters_check_allows_exactly_the_k_means_sample(monkeypatch, pixels, images):
    seen = []  # the number of features each k-means is given

    def kmeans(x, k, **kwargs):
        seen.append(len(x))
        return x[:k], torch.zeros(len(x), dtype=torch.long)

    monkeypatch.setattr(common, "kmeans", kmeans)
    args = picie.Args(image_size=16, kmeans_pixels=pixels)
    source = (torch.zeros(images, 3, 32, 32, dtype=torch.uint8), torch.zeros(images, 32, 32))
    features_of = lambda idx, x: torch.rand(len(idx), 8, 4, 4)  # noqa: E731 (16 px: 4 x 4 maps)
    picie.cluster_pixels(features_of, source, torch.arange(images), 2, 0, args)
    largest = seen[0]
    k_args = dataclasses.replace(args, num_clusters=largest)
    assert picie.choose_num_clusters(k_args, 5, images) == largest
    with pytest.raises(common.ConfigError, match=f"exceeds the {largest} pixel features"):
        picie.choose_num_clusters(dataclasses.replace(k_args, num_clusters=largest + 1), 5, images)


def test_missing_imagenet_weights_offline_name_the_file_and_the_way_out(
    tmp_path, monkeypatch, small_shapes_seg
):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    with pytest.raises(
        SystemExit, match=r"resnet18-f37072fd\.pth.*hub.checkpoints.*--weights none"
    ) as error:
        argv = "--dataset shapes-seg --weights imagenet --device cpu".split()
        picie.main(argv + ["--out-dir", str(tmp_path / "run")])
    assert str(tmp_path / "torch") in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_picie_beats_the_untrained_network_on_shapes_seg(tmp_path):
    # The shapes-seg defaults (32 px, decoded at 64, K = 5, random initialisation, batch 32, Adam
    # 1e-3, 6 epochs): 100-530 s on the 2-core CPU beside other jobs. Measured on the code of
    # 2026-12-02 (every evaluation with re-estimated batch norm, view 2 normalised once), mIoU
    # after training vs the untrained network, seeds 0 / 1 / 2:
    #   --threads 1: 0.123 / 0.123 / 0.135 vs 0.107 / 0.076 / 0.091 (gains 1.7, 4.8, 4.4 points)
    #   --threads 2: 0.126 / 0.146 / 0.141 vs the same (gains 1.9, 7.1, 5.0 points)
    # Seed 0 gains least at both thread counts; the margin below is under its 1.7. The constant
    # one-cluster answer scores 0.141: PiCIE reaches it only at seeds 1 and 2 with two threads
    # (README, PiCIE: Results), so this test guards that PiCIE learns, not that it wins.
    argv = [
        "--dataset",
        "shapes-seg",
        "--eval-every",
        "6",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    result = picie.main(argv)
    assert result["epochs"] == 6 and result["num_clusters"] == 5
    assert result["miou"] >= result["baseline_miou"] + 0.01


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID.is_dir(), reason="no ../shared/data/camvid here")
def test_picie_beats_the_untrained_network_and_the_constant_answer_on_camvid(tmp_path):
    # The regime where PiCIE's gain shows on this CPU (README, PiCIE: Results): real street scenes,
    # random weights, 128 px, 3 epochs, batch 32, lr 1e-3, K = 11; 280-350 s a run here with one
    # thread beside another job. Measured on the code of 2026-12-02, seeds 0 / 1 / 2:
    #   mIoU after training        0.177 / 0.189 / 0.171
    #   untrained network          0.127 / 0.139 / 0.137 (gains 4.9, 4.9, 3.5 points)
    #   one cluster everywhere     0.027 at every seed (no CamVid class covers most pixels)
    # The margins below are under the smallest gains (3.5 and 14.4 points). shapes-seg cannot
    # show this: no setting tried there passes the constant answer at every seed (README).
    argv = ["--dataset", "camvid", "--data-dir", str(CAMVID), "--weights", "none"]
    argv += ["--image-size", "128", "--epochs", "3", "--batch-size", "32", "--lr", "1e-3"]
    argv += ["--threads", "1", "--seed", "0", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    result = picie.main(argv)
    assert result["num_clusters"] == 11 and result["epochs"] == 3
    assert result["miou"] >= result["baseline_miou"] + 0.02
    assert result["miou"] >= result["constant_miou"] + 0.10


def test_predict_segments_new_images_into_the_last_evaluations_clusters(
    tmp_path, small_shapes_seg, new_images, capsys
):
    from PIL import Image

    run = tmp_path / "run"
    picie.main(SMOKE + ["--epochs", "1", "--out-dir", str(run)])
    images, _ = common.make_shapes_seg(5, seed=3, size=64)
    sizes = [(48, 40), (64, 64), (40, 56), (64, 48), (36, 64)]
    pairs = zip(images, sizes, strict=True)
    images = [F.interpolate(im[None].float(), size=s)[0].byte() for im, s in pairs]
    folder, paths = new_images(images)
    summary = picie.main(["--predict", str(folder), "--out-dir", str(run), "--device", "cpu"])
    assert "broken.png: not a readable image" in capsys.readouterr().out
    state = common.load_checkpoint(run / "checkpoint.pt")
    result = state["result"]
    model = picie.PiCIENet("none")
    model.load_state_dict({**state["model"], **result["batch_norm"]})
    info = common.dataset_info("shapes-seg")
    shares = (run / "predictions" / "shares.csv").read_text().splitlines()
    assert len(shares[0].split(",")) == 1 + 5 and len(shares) == 6, "a column per cluster"
    for path in paths:
        stem = str(Path(path).with_suffix(".png"))
        mask = torch.from_numpy(np.array(Image.open(run / "predictions" / "masks" / stem)))
        image = common._read_image(folder / path)
        assert mask.shape == image.shape[1:], "the mask at the image's own size"
        expected = picie.cluster_mask(model, image, result["centroids"], (info.mean, info.std), 16)
        assert torch.equal(mask.long(), expected), path
    assert summary["images"] == 5
    # the evaluation's statistics differ from training's: predict must use the evaluation's
    trained = {k: v for k, v in state["model"].items() if "running_mean" in k}
    assert any(not torch.equal(v, result["batch_norm"][k]) for k, v in trained.items())


def test_overclustering_is_also_scored_many_to_one():
    # 4 clusters for 3 colour bands the features separate: one band is split in two clusters,
    # one-to-one matching leaves one of them unmatched, many-to-one merges it back
    data = band_data(num_clusters=4)
    args = picie.Args(image_size=16, seed=0, kmeans_pixels=10_000, batch_size=5)
    scores, _ = picie.evaluate(Colours(), data, args)
    assert scores["majority_pixel_acc"] == pytest.approx(1.0)
    assert scores["majority_miou"] == pytest.approx(1.0)
    assert scores["pixel_acc"] < 1.0
    exact, _ = picie.evaluate(Colours(), band_data(num_clusters=3), args)
    assert "majority_pixel_acc" not in exact, "K = the classes: one-to-one only"


@pytest.mark.parametrize("processes", [2, 3])
def test_under_torchrun_each_process_loads_its_share_of_every_batch(monkeypatch, processes):
    # The epoch's last, partial batch is cut to a multiple of the processes, and left out where
    # each process would get one image; in one process only a lone image is left out, as before.
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert len(picie.without_lone_image(order[:33], 16)) == 32
    assert len(picie.without_lone_image(order[:34], 16)) == 34
    assert len(picie.without_lone_image(order[:36], 16, 2)) == 36
    assert len(picie.without_lone_image(order[:34], 16, 2)) == 32, "one image each: left out"
    assert len(picie.without_lone_image(order[:35], 16, 2)) == 32, "cut to 2, one image each"
    assert len(picie.without_lone_image(order[:37], 16, 2)) == 36
    trained = picie.without_lone_image(order, 12, processes)  # 40 % 12 = 4
    assert len(trained) == {2: 40, 3: 36}[processes]
    global_batches = trained.split(12)
    images = torch.arange(40 * 3 * 2 * 2, dtype=torch.uint8).reshape(40, 3, 2, 2)
    labels = torch.arange(40 * 2 * 2).reshape(40, 2, 2)
    streamed = picie.Squares(
        common.SegmentationSet(["a"], "train", images=images, labels=labels), 2
    )
    monkeypatch.setattr(common, "world_size", lambda: processes)
    loaded = []  # per process, the batches its DataLoader decoded
    for rank in range(processes):
        monkeypatch.setattr(common, "rank", lambda rank=rank: rank)
        mine = picie.process_share(trained, 12)
        loaded.append(list(picie.batches(streamed, mine, 12 // processes)))
    for step, batch in enumerate(global_batches):
        together = torch.cat([loaded[rank][step][0] for rank in range(processes)])
        assert torch.equal(together, batch), "the processes' shares make up the global batch"
        assert torch.equal(torch.cat([loaded[r][step][1] for r in range(processes)]), images[batch])
    assert all(len(batches) == len(global_batches) for batches in loaded)


def test_batches_of_one_image_per_process_are_refused_at_small_sizes(monkeypatch, small_shapes_seg):
    args = picie.Args(dataset="shapes-seg", image_size=16, batch_size=2, weights="none")
    args.kmeans_images = 24
    picie.load_data(args, torch.device("cpu"))  # one process: two images a batch
    monkeypatch.setattr(common, "world_size", lambda: 2)
    with pytest.raises(common.ConfigError, match="2 processes: one image each.*at least 4"):
        picie.load_data(args, torch.device("cpu"))


@pytest.mark.slow
def test_two_processes_train_one_model_write_once_and_resume(tmp_path, monkeypatch, torchrun):
    # A streamed set (Cityscapes, decoded by the DataLoader): 48 training images, 3 steps of 16
    # an epoch, each process loading its 8 of each.
    write_cityscapes(tmp_path / "city", {"test": 24, "train_extra": 24, "val": 4, "train": 4})
    argv = ["--dataset", "cityscapes", "--data-dir", tmp_path / "city", "--workers", "0"]
    argv += SMOKE[2:]
    a = tmp_path / "a"
    torchrun("picie.py", argv + ["--out-dir", a], record=tmp_path / "two.pt")
    results = json.loads((a / "results.json").read_text())
    # Both processes ended with the same network, the one rank 0 saved.
    checksums = results["weights_checksum"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    saved = common.load_checkpoint(a / "checkpoint.pt")
    assert checksums[0] == pytest.approx(torchrun.checksum(saved["model"]), rel=1e-12)
    # One writer: one log, its lines once each (the baseline; per epoch its clustering, training
    # at 2 of 3 steps and the end, and the evaluation).
    steps = [r["step"] for r in records_of(a)]
    assert steps == pytest.approx([0, 0, 2 / 3, 1, 1, 1, 1 + 2 / 3, 2, 2])
    figures = ("miou", "pixel_acc", "baseline_miou", "baseline_pixel_acc", "constant_miou")
    assert all(0 <= results[k] <= 1 for k in figures)
    # Every training image once an epoch: the global batches, gathered from the shares.
    drawn = torch.load(tmp_path / "two.pt")
    assert [len(b) for b in drawn] == [16] * 6
    for epoch in (drawn[:3], drawn[3:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(48))
    # They are the batches that one process draws alone.
    alone = []
    real_share = common.share

    def recorded_share(indices):
        alone.append(indices.clone())
        return real_share(indices)

    monkeypatch.setattr(common, "share", recorded_share)
    picie.main([str(x) for x in argv] + ["--out-dir", str(tmp_path / "one")])
    assert len(alone) == len(drawn) and all(map(torch.equal, alone, drawn))

    # Stopped after its first checkpoint (epoch 1) and resumed under two processes, the run ends
    # with the uninterrupted run's figures and weights.
    b = tmp_path / "b"
    resumed = torchrun.resumed_after_stop("picie.py", argv, b, epoch=1)
    for k in figures:
        assert resumed[k] == results[k], k
    assert resumed["weights_checksum"] == checksums
    assert records_of(b) == records_of(a)
