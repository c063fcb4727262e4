"""Augmentation on the device: shapes, dtypes and ranges; independence per sample;
reproducibility; agreement with PIL's definitions; labels moving with their pixels."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import common


@pytest.fixture(scope="module")
def images():
    return common.make_shapes(64, seed=7, size=32)[0]  # natural-ish content: edges and smooth areas


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, g: common.weak_augment(x, generator=g),
        lambda x, g: common.strong_augment(x, generator=g),
        lambda x, g: common.strong_augment(x, num_ops=4, random_cutout=True, generator=g),
        lambda x, g: common.randaugment(x, generator=g),
        lambda x, g: common.photometric_augment(x, generator=g),
        lambda x, g: common.cutout(x, generator=g),
    ],
)
def test_shape_dtype_range_independence_and_reproducibility(images, fn):
    for x in (images, images.float() / 255):
        out = fn(x, gen(1))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= (255 if x.dtype == torch.uint8 else 1)
        assert torch.equal(out, fn(x, gen(1))), "same generator state, same result"
        assert not torch.equal(out, fn(x, gen(2)))
    # the same image repeated gets different augmentations: parameters are drawn per sample
    same = images[:1].repeat(16, 1, 1, 1)
    out = fn(same, gen(3))
    distinct = len({o.numpy().tobytes() for o in out})
    assert distinct >= 12


def test_weak_augment_is_a_flip_and_a_reflect_padded_crop(images):
    x = images[:8]
    out = common.weak_augment(x, generator=gen(4))
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    for i in range(len(x)):
        candidates = [
            padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)
        ]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i].float(), c) for c in candidates), (
            f"sample {i} is no flip+crop"
        )
    no_flip = common.weak_augment(x, flip=False, translate=0.0, generator=gen(5))
    assert torch.equal(no_flip, x)


def test_identity_settings_leave_the_batch_unchanged(images):
    assert torch.equal(common.randaugment(images, prob=0.0, generator=gen()), images)
    assert torch.equal(common.cutout(images, size=0, generator=gen()), images)
    params = common.draw_photometric(
        len(images), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, generator=gen()
    )
    assert torch.equal(common.apply_photometric(images, params), images)


def test_cutout_is_a_grey_square_clipped_at_the_border():
    x = torch.zeros(200, 3, 32, 32)
    out = common.cutout(x, size=16, generator=gen(6))
    grey = (out == 0.5).all(1)  # (B, H, W)
    area = grey.sum((1, 2))
    assert area.max() == 256 and area.min() < 256  # full squares inside, clipped ones at the edge
    rows, cols = grey.any(2), grey.any(1)
    assert torch.equal(area, rows.sum(1) * cols.sum(1)), "the grey region is a rectangle"


def to_pil(x):
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]


def from_pil(pils):
    return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pils])


GREY = (128, 128, 128)
PIL_REFERENCES = [  # (op, magnitude, PIL's version, largest allowed mean |difference| in 0..255)
    ("equalize", 0, ImageOps.equalize, 0.0),
    ("solarize", 128 / 255, lambda p: ImageOps.solarize(p, 128), 0.0),
    ("posterize", 5, lambda p: ImageOps.posterize(p, 5), 0.0),
    ("autocontrast", 0, ImageOps.autocontrast, 1.0),
    ("color", 0.3, lambda p: ImageEnhance.Color(p).enhance(0.3), 1.0),
    ("contrast", 0.3, lambda p: ImageEnhance.Contrast(p).enhance(0.3), 1.0),
    ("brightness", 0.3, lambda p: ImageEnhance.Brightness(p).enhance(0.3), 1.0),
    ("sharpness", 0.3, lambda p: ImageEnhance.Sharpness(p).enhance(0.3), 1.0),
    ("rotate", 20, lambda p: p.rotate(20, resample=Image.BILINEAR, fillcolor=GREY), 2.0),
    (
        "translate_x",
        0.25,
        lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 8, 0, 1, 0), fillcolor=GREY),
        0.0,
    ),
    (
        "translate_y",
        -0.25,
        lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 0, 0, 1, -8), fillcolor=GREY),
        0.0,
    ),
    # shear about the centre: PIL's transform with the matching offset
    (
        "shear_x",
        0.3,
        lambda p: p.transform(
            p.size, Image.AFFINE, (1, 0.3, -4.8, 0, 1, 0), Image.BILINEAR, fillcolor=GREY
        ),
        2.0,
    ),
    (
        "shear_y",
        -0.3,
        lambda p: p.transform(
            p.size, Image.AFFINE, (1, 0, 0, -0.3, 1, 4.8), Image.BILINEAR, fillcolor=GREY
        ),
        2.0,
    ),
]


@pytest.mark.parametrize(
    "name,magnitude,reference,tolerance", PIL_REFERENCES, ids=[r[0] for r in PIL_REFERENCES]
)
def test_randaugment_ops_match_pil(images, name, magnitude, reference, tolerance):
    x = common._to_float(images[:12])
    m = torch.full((len(x),), float(magnitude))
    if name in common.GEOMETRIC_OPS:
        out = common._geometric(x, torch.full((len(x),), common.GEOMETRIC_OPS.index(name)), m)
    else:
        out = common._RANDAUGMENT_FNS[name](x, m)
    ours = common._restore(out, torch.uint8).int()
    pil = from_pil([reference(p) for p in to_pil(images[:12])]).int()
    assert (ours - pil).abs().float().mean() <= tolerance + 1e-6
    assert not torch.equal(ours, images[:12].int()) or name == "identity", (
        "the op must change the images"
    )


def test_randaugment_table_is_the_papers():
    table = {name: (lo, hi) for name, lo, hi in common.RANDAUGMENT_OPS}
    assert len(table) == 14
    assert (
        table["rotate"] == (-30, 30)
        and table["shear_x"] == (-0.3, 0.3)
        and table["translate_y"] == (-0.3, 0.3)
    )
    assert table["brightness"] == (0.05, 0.95) and table["solarize"] == (0, 1)
    assert {int(math.floor(4 + 5 * u)) for u in torch.rand(1000).tolist()} == {4, 5, 6, 7, 8}
    assert table["posterize"] == (4, 9)


def test_hue_and_blur_match_torchvision(images):
    from torchvision.transforms import functional as TF

    x = images[:6].float() / 255
    shift = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.07, 0.1])
    ours = common._adjust_hue(x, shift)
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(6)])
    assert (ours - ref).abs().max() < 1e-4
    sigma = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 0.1])
    ours = common._gaussian_blur(x, sigma)
    k = 2 * math.ceil(3 * 2.0) + 1  # one kernel size for the batch, from the largest sigma
    ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(6)])
    assert (ours - ref).abs().max() < 1e-4


def test_photometric_parameters_can_be_fixed_per_image(images):
    params = common.draw_photometric(len(images), generator=gen(8))
    a = common.apply_photometric(images, params)
    b = common.apply_photometric(images, params)
    assert torch.equal(a, b)
    # PiCIE draws one coin per jitter op; MoCo one coin for the whole jitter
    each = common.draw_photometric(4000, jitter_each=True, generator=gen(9))
    joint = common.draw_photometric(4000, generator=gen(9))

    def moved(p: dict) -> torch.Tensor:  # (n, 3): which of the three jitter ops changed the image
        return torch.stack([p["brightness"] != 1, p["contrast"] != 1, p["saturation"] != 1], 1)

    assert moved(joint).float().std(1).max() == 0  # all three move together
    assert moved(each).float().std(1).max() > 0
    assert abs(float(moved(each).float().mean()) - 0.8) < 0.03
    assert abs(float(joint["grayscale"].float().mean()) - 0.2) < 0.03
    assert abs(float((joint["sigma"] > 0).float().mean()) - 0.5) < 0.03
    assert bool(((joint["brightness"] - 1).abs() <= 0.4 + 1e-6).all())


def test_draw_crops_respects_scale_ratio_and_bounds():
    boxes, flip = common.draw_crops(5000, scale=(0.2, 1.0), generator=gen(10))
    x0, y0, w, h = boxes.unbind(1)
    assert bool(((x0 >= 0) & (y0 >= 0) & (x0 + w <= 1 + 1e-6) & (y0 + h <= 1 + 1e-6)).all())
    assert float((w * h).min()) >= 0.2 - 1e-6
    assert bool(((w / h >= 3 / 4 - 1e-4) & (w / h <= 4 / 3 + 1e-4)).all())
    assert abs(float(flip.float().mean()) - 0.5) < 0.03
    square, _ = common.draw_crops(100, scale=(0.25, 1.0), ratio=(1.0, 1.0), generator=gen(11))
    assert torch.allclose(square[:, 2], square[:, 3]) and float(square[:, 2].min()) >= 0.5 - 1e-6


def test_resized_crop_known_boxes(images):
    x = images[:4]
    half = torch.tensor([[0.25, 0.25, 0.5, 0.5]]).repeat(4, 1)
    no, yes = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    assert torch.equal(common.resized_crop(x, half, no, 16), x[..., 8:24, 8:24])
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)
    assert torch.equal(common.resized_crop(x, whole, yes, 32), x.flip(-1))
    # a box reaching outside the image is filled: 255 for labels
    labels = torch.randint(0, 5, (4, 32, 32))
    out = common.resized_crop(
        labels, torch.tensor([[0.5, 0.0, 1.0, 1.0]]).repeat(4, 1), no, 32, "nearest", 255
    )
    assert torch.equal(out[:, :, :16], labels[:, :, 16:]) and bool((out[:, :, 16:] == 255).all())
    # an enlarged crop at the image's corner keeps the edge pixels' values: no fill bleeds in
    flat = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    assert bool(
        (
            common.resized_crop(flat, torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2), no[:2], 32) == 200
        ).all()
    )
    assert bool(
        (
            common.resized_crop(
                flat.float(), torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 2), no[:2], 32, fill=-1.0
            )
            == 200
        ).all()
    )


def test_crop_and_flip_move_labels_with_their_pixels():
    g = gen(12)
    blocks = torch.randint(0, 7, (16, 5, 6), generator=g)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (16, 40, 48) in 8x8 blocks
    image = (labels[:, None].repeat(1, 3, 1, 1) * 30).to(
        torch.uint8
    )  # pixel value encodes its label
    boxes, flip = common.draw_crops(16, scale=(0.1, 1.0), aspect=48 / 40, generator=g)
    img_out = common.resized_crop(image, boxes, flip, (24, 24), mode="nearest")
    lab_out = common.resized_crop(labels, boxes, flip, (24, 24), mode="nearest", fill=255)
    assert torch.equal(img_out[:, 0].long(), lab_out * 30)
    # bilinear images stay aligned too: off the block edges they agree with the labels
    img_bil = common.resized_crop(image, boxes, flip, (24, 24))
    assert (img_bil[:, 0].long() == lab_out * 30).float().mean() > 0.6
    assert (
        common.resized_crop(image, boxes, ~flip, (24, 24))[:, 0].long() == lab_out * 30
    ).float().mean() < 0.5


def test_normalize_uses_the_statistics():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = common.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
