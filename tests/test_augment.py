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
        lambda x, g: common.randaugment(x, generator=g, variant="paper"),
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
# (op, magnitude, PIL's version, largest allowed mean |difference| in 0..255)
PIL_REFERENCES = [
    ("equalize", 0, ImageOps.equalize, 0.0),
    ("solarize", 128 / 255, lambda p: ImageOps.solarize(p, 128), 0.0),
    ("posterize", 1, lambda p: ImageOps.posterize(p, 1), 0.0),
    ("posterize", 4, lambda p: ImageOps.posterize(p, 4), 0.0),
    ("autocontrast", 0, ImageOps.autocontrast, 1.0),
]
for factor in (0.28, 1.72):  # the official range's ends: darker and brighter
    PIL_REFERENCES += [
        ("color", factor, lambda p, f=factor: ImageEnhance.Color(p).enhance(f), 1.0),
        ("contrast", factor, lambda p, f=factor: ImageEnhance.Contrast(p).enhance(f), 1.0),
        ("brightness", factor, lambda p, f=factor: ImageEnhance.Brightness(p).enhance(f), 1.0),
        ("sharpness", factor, lambda p, f=factor: ImageEnhance.Sharpness(p).enhance(f), 1.0),
    ]


@pytest.mark.parametrize(
    "name,magnitude,reference,tolerance",
    PIL_REFERENCES,
    ids=[f"{r[0]}-{r[1]:.2f}" for r in PIL_REFERENCES],
)
def test_randaugment_ops_match_pil(images, name, magnitude, reference, tolerance):
    x = common._to_float(images[:12])
    out = common._RANDAUGMENT_FNS[name](x, torch.full((len(x),), float(magnitude)))
    ours = common._restore(out, torch.uint8).int()
    pil = from_pil([reference(p) for p in to_pil(images[:12])]).int()
    assert (ours - pil).abs().float().mean() <= tolerance + 1e-6
    assert not torch.equal(ours, images[:12].int()), "the op must change the images"


def affine(coefficients, resample=Image.NEAREST):  # PIL's transform, as the official ops call it
    return lambda p: p.transform(p.size, Image.AFFINE, coefficients, resample, fillcolor=GREY)


# The official ops' own PIL calls (third_party/auto_augment/augmentations.py): rotate(degrees),
# transform(AFFINE, ...), PIL's default nearest resampling, the transparent fill that pil_unwrap
# turns grey. Shears run about the top-left corner. Translations in pixels (of 32).
OFFICIAL_GEOMETRY = [
    ("rotate", 27, lambda p: p.rotate(27, fillcolor=GREY)),
    ("rotate", -12, lambda p: p.rotate(-12, fillcolor=GREY)),
    ("shear_x", 0.27, affine((1, 0.27, 0, 0, 1, 0))),
    ("shear_x", -0.12, affine((1, -0.12, 0, 0, 1, 0))),
    ("shear_y", 0.27, affine((1, 0, 0, 0.27, 1, 0))),
    ("shear_y", -0.03, affine((1, 0, 0, -0.03, 1, 0))),
    ("translate_x", 9 / 32, affine((1, 0, 9, 0, 1, 0))),
    ("translate_y", -3 / 32, affine((1, 0, 0, 0, 1, -3))),
]
# The paper variant (spice.py's views): bilinear, shears about the centre.
PAPER_GEOMETRY = [
    ("rotate", 20, lambda p: p.rotate(20, resample=Image.BILINEAR, fillcolor=GREY)),
    ("shear_x", 0.3, affine((1, 0.3, -4.8, 0, 1, 0), Image.BILINEAR)),
    ("shear_y", -0.3, affine((1, 0, 0, -0.3, 1, 4.8), Image.BILINEAR)),
]


@pytest.mark.parametrize(
    "official,name,magnitude,reference",
    [(True, *r) for r in OFFICIAL_GEOMETRY] + [(False, *r) for r in PAPER_GEOMETRY],
    ids=[f"official-{r[0]}-{r[1]:.2f}" for r in OFFICIAL_GEOMETRY]
    + [f"paper-{r[0]}" for r in PAPER_GEOMETRY],
)
def test_geometric_ops_match_pil(images, official, name, magnitude, reference):
    x = common._to_float(images[:12])
    kind = torch.full((len(x),), common.GEOMETRIC_OPS.index(name))
    m = torch.full((len(x),), float(magnitude))
    mode = "nearest" if official else "bilinear"
    out = common._geometric(x, kind, m, corner=official, mode=mode)
    ours = common._restore(out, torch.uint8).int()
    pil = from_pil([reference(p) for p in to_pil(images[:12])]).int()
    if official:  # nearest: the same pixels, but for a few sampled at a rounding boundary
        assert (ours != pil).float().mean() <= 0.03
    else:  # bilinear: interpolation and rounding apart
        assert (ours - pil).abs().float().mean() <= 2.0
    assert not torch.equal(ours, images[:12].int())


def test_posterize_keeps_the_top_bits():
    values = torch.tensor([0, 1, 15, 16, 127, 128, 200, 255])
    x = (values.float() / 255).view(1, 1, 1, 8).repeat(4, 3, 1, 1)
    out = common._posterize(x, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    kept = (out * 255).round().long()[:, 0, 0]  # (bits, values)
    expected = [
        [0, 0, 0, 0, 0, 128, 128, 128],  # v & 0b10000000
        [0, 0, 0, 0, 64, 128, 192, 192],  # v & 0b11000000
        [0, 0, 0, 0, 96, 128, 192, 224],  # v & 0b11100000
        [0, 0, 0, 16, 112, 128, 192, 240],  # v & 0b11110000
    ]
    assert kept.tolist() == expected


# The official magnitudes at levels 1..9, worked out by hand from third_party/auto_augment/
# augmentations.py (PARAMETER_MAX = 10): int_parameter(L, m) = int(L m / 10), float_parameter(L,
# m) = L m / 10. Signed ops take either sign.
OFFICIAL_LEVELS = {
    "rotate": [3, 6, 9, 12, 15, 18, 21, 24, 27],  # degrees, int_parameter(L, 30)
    "solarize": [231, 205, 180, 154, 128, 103, 77, 52, 26],  # 256 - int_parameter(L, 256), of 255
    "color": [0.28, 0.46, 0.64, 0.82, 1.0, 1.18, 1.36, 1.54, 1.72],  # float_parameter(L, 1.8) + 0.1
    "shear_x": [0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21, 0.24, 0.27],  # float_parameter(L, 0.3)
    "translate_x": [1, 2, 3, 4, 5, 6, 7, 8, 9],  # pixels, int_parameter(L, 10)
    "posterize": [4, 4, 3, 3, 2, 2, 2, 1, 1],  # bits kept, 4 - int_parameter(L, 4)
}
for a, b in (("color", "contrast"), ("color", "brightness"), ("color", "sharpness")):
    OFFICIAL_LEVELS[b] = OFFICIAL_LEVELS[a]
OFFICIAL_LEVELS["shear_y"] = OFFICIAL_LEVELS["shear_x"]
OFFICIAL_LEVELS["translate_y"] = OFFICIAL_LEVELS["translate_x"]
SIGNED = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def test_official_randaugment_draws_the_official_ops_levels_and_probability():
    b, num_ops, size = 10000, 2, {"translate_x": 96, "translate_y": 32}  # (H, W) = (32, 96)
    names, ops, applied, magnitude = common.draw_randaugment(
        b, num_ops, size=(32, 96), generator=gen(20)
    )
    assert ops.shape == applied.shape == magnitude.shape == (b, num_ops)
    assert sorted(names) == sorted(
        "identity autocontrast equalize rotate solarize color contrast brightness sharpness "
        "shear_x shear_y translate_x translate_y posterize".split()
    )
    # ops uniform over the 14, with replacement (both slots the same op 1 time in 14)
    share = torch.bincount(ops.flatten(), minlength=14).float() / ops.numel()
    assert (share - 1 / 14).abs().max() < 0.01
    assert abs(float((ops[:, 0] == ops[:, 1]).float().mean()) - 1 / 14) < 0.01
    # each drawn op applied with p = 0.5, independently of the op
    for k in range(14):
        assert abs(float(applied[ops == k].float().mean()) - 0.5) < 0.05
    for name, levels in OFFICIAL_LEVELS.items():
        m = magnitude[ops == names.index(name)].double()
        if name == "solarize":
            m = m * 255
        if name.startswith("translate"):
            m = m * size[name]  # drawn as fractions of the side: 1..9 px at any size
        values = torch.tensor(levels, dtype=torch.double)
        if name in SIGNED:
            assert abs(float((m > 0).double().mean()) - 0.5) < 0.05, f"{name}: both signs"
            values = torch.cat([-values, values])
        # every drawn magnitude is one of the official ones ...
        nearest = (m[:, None] - values[None]).abs().min(1)
        assert float(nearest.values.max()) < 1e-4, f"{name}: {m.unique()[:12].tolist()}"
        # ... each level drawn 1 time in 9 (posterize: 4 bits 2 in 9, 2 bits 3 in 9)
        unique = values.unique()
        counts = torch.bincount((m[:, None] - unique[None]).abs().argmin(1), minlength=len(unique))
        expected = torch.tensor([float((values == v).sum()) for v in unique]) / len(values)
        assert (counts / len(m) - expected).abs().max() < 0.03, name
    no_magnitude = [names.index(n) for n in ("identity", "autocontrast", "equalize")]
    assert bool((magnitude[torch.isin(ops, torch.tensor(no_magnitude))] == 0).all())


def test_paper_randaugment_draws_uniform_magnitudes_in_the_tables_ranges():
    table = {name: (lo, hi) for name, lo, hi in common.RANDAUGMENT_PAPER_OPS}
    assert len(table) == 14
    assert table["rotate"] == (-30, 30) and table["shear_x"] == (-0.3, 0.3)
    assert table["translate_y"] == (-0.3, 0.3) and table["brightness"] == (0.05, 0.95)
    assert table["solarize"] == (0, 1) and table["posterize"] == (4, 9)
    names, ops, _, magnitude = common.draw_randaugment(20000, variant="paper", generator=gen(21))
    for name, (lo, hi) in table.items():
        m = magnitude[ops == names.index(name)]
        assert float(m.min()) >= lo and float(m.max()) < hi + 1e-6
        if hi > lo:  # uniform: a quarter of the draws in each quarter of the range
            quarter = ((m - lo) / (hi - lo) * 4).long().clamp(max=3)
            assert (torch.bincount(quarter, minlength=4) / len(m) - 0.25).abs().max() < 0.03
    with pytest.raises(common.ConfigError, match="variant"):
        common.draw_randaugment(4, variant="Table 12")


@pytest.mark.parametrize("variant", ["spice-semi", "scan"])
def test_spices_tables_are_the_official_ones_drawn_uniformly(variant):
    # spice-semi: fixmatch/datasets/augmentation/randaugment.py; scan: spice/data/augment.py (both
    # niuchuangnn/SPICE): the paper's ranges, posterize int(U[4, 8)) bits; scan shears and
    # translates by at most 0.1
    table = {name: (lo, hi) for name, lo, hi in common.RANDAUGMENT_TABLES[variant]}
    assert set(table) == {name for name, _, _ in common.RANDAUGMENT_PAPER_OPS}
    geometric = 0.1 if variant == "scan" else 0.3
    for name in ("shear_x", "shear_y", "translate_x", "translate_y"):
        assert table[name] == (-geometric, geometric), name
    assert table["rotate"] == (-30, 30) and table["posterize"] == (4, 8)
    assert table["color"] == (0.05, 0.95) and table["solarize"] == (0, 1)
    names, ops, applied, magnitude = common.draw_randaugment(
        20000, num_ops=4, prob=1.0, variant=variant, generator=gen(22)
    )
    assert applied.all(), "every drawn op is applied"
    counts = torch.bincount(ops.flatten(), minlength=14) / ops.numel()
    assert (counts - 1 / 14).abs().max() < 0.01, "ops drawn uniformly, with replacement"
    for name, (lo, hi) in table.items():
        m = magnitude[ops == names.index(name)]
        assert float(m.min()) >= lo and float(m.max()) < hi + 1e-6
        if hi > lo:
            assert float(m.min()) < lo + 0.02 * (hi - lo) and float(m.max()) > hi - 0.02 * (hi - lo)
    bits = magnitude[ops == names.index("posterize")].floor().long()
    assert sorted(bits.unique().tolist()) == [4, 5, 6, 7], "never 8 bits"


def covered_sides(
    x,
):  # per sample: the side of the filled square, from the rows or columns it spans
    filled = (x[:, 0] > 0).float()
    return torch.maximum(filled.amax(2).sum(1), filled.amax(1).sum(1))


def test_scan_cutout_sides_are_even_from_a_uniform_draw_in_1_to_size():
    # SCAN's Cutout (SPICE-Self's, spice/data/augment.py): L = randint(1, 16), the box
    # [c - L // 2, c + L // 2) about an integer centre: sides 0, 2, .., 16
    x = torch.zeros(4000, 3, 128, 128)
    sides = covered_sides(common.cutout(x, 16, generator=gen(23), fill=1.0, scan_sides=True))
    shares = torch.bincount(sides.long(), minlength=17) / len(sides)
    expected = torch.zeros(17)
    expected[0] = expected[16] = 1 / 16
    expected[2:16:2] = 2 / 16
    assert (shares - expected).abs().max() < 0.02, shares


def test_spice_semi_cutout_sides_are_uniform_up_to_half_the_image_in_the_fill_colour():
    x = torch.ones(3000, 3, 64, 64)
    fill = (0.2, 0.4, 0.6)
    out = common.cutout(x, 32.0, random_size=True, generator=gen(24), fill=fill)
    inside = (out != 1).any(1)  # (B, H, W): the pixels cut out
    for c, value in enumerate(fill):
        assert torch.allclose(out[:, c][inside], torch.tensor(value))
    sides = covered_sides(1 - out)
    assert float(sides.max()) <= 32
    assert abs(float(sides.mean()) - 16) < 1.0, "U[0, 32]: mean side 16"
    assert abs(float((sides < 8).float().mean()) - 0.25) < 0.04
    as_bytes = common.cutout(torch.full((2, 3, 8, 8), 255, dtype=torch.uint8), 16, fill=fill)
    assert as_bytes[0, :, 4, 4].tolist() == [51, 102, 153], "uint8 fills round(255 x colour)"


def only(monkeypatch, name):  # RandAugment with one op in its table: each slot draws that op
    monkeypatch.setattr(common, "RANDAUGMENT_OPS", {name: common.RANDAUGMENT_OPS[name]})


@pytest.mark.parametrize("num_ops", [1, 2, 3])
def test_each_op_is_applied_with_probability_one_half(monkeypatch, num_ops):
    # solarize of an all-white image: any official threshold (<= 231) inverts it, and a second
    # solarize leaves the black result alone, so it is unchanged iff no slot applied the op
    only(monkeypatch, "solarize")
    white = torch.full((4000, 3, 4, 4), 255, dtype=torch.uint8)
    out = common.randaugment(white, num_ops=num_ops, generator=gen(22))
    unchanged = (out == 255).flatten(1).all(1).float().mean()
    assert abs(float(unchanged) - 0.5**num_ops) < 0.03
    assert bool(((out == 0) | (out == 255)).all())


def ramp(n, size, axis):  # n strips 3 px wide whose value along `axis` is 0, 2, 4, .. (2 per px)
    line = (2 * torch.arange(size)).to(torch.uint8)
    shape = (n, 3, 3, size) if axis == "x" else (n, 3, size, 3)
    return (line.view(1, size) if axis == "x" else line.view(size, 1)).expand(shape).contiguous()


@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_translate_moves_1_to_9_pixels_either_way_at_any_size(monkeypatch, size, axis):
    only(monkeypatch, f"translate_{axis}")
    out = common.randaugment(ramp(1000, size, axis), num_ops=1, generator=gen(23))
    centre = out[:, 0, 1, size // 2] if axis == "x" else out[:, 0, size // 2, 1]
    shift = centre.long() // 2 - size // 2  # the ramp reads 2 (size / 2 + shift) there
    assert set(shift.tolist()) == set(range(-9, 10))  # 0: not applied
    moved = shift[shift != 0]
    assert abs(float((moved > 0).float().mean()) - 0.5) < 0.08
    assert abs(float((shift == 0).float().mean()) - 0.5) < 0.06  # not applied: p = 0.5


@pytest.mark.parametrize("axis", ["x", "y"])
def test_official_shear_pivots_on_the_top_left_corner_by_nearest_neighbour(monkeypatch, axis):
    # x' = x + m y from the corner: the first row (column, for shear_y) moves by m / 2 < 0.14 px,
    # so nearest sampling keeps it exactly; about the centre it would move by ~4 px, and bilinear
    # sampling would blend it. Further rows do move.
    only(monkeypatch, f"shear_{axis}")
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=gen(28))
    out = common.randaugment(x, num_ops=1, prob=1.0, generator=gen(29))
    if axis == "y":
        out, x = out.transpose(2, 3), x.transpose(2, 3)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert bool((out[:, :, 31] != x[:, :, 31]).flatten(1).any(1).all())


def test_brightness_factors_are_the_official_levels_darker_and_brighter(monkeypatch):
    only(monkeypatch, "brightness")
    grey = torch.full((1000, 3, 4, 4), 100, dtype=torch.uint8)
    out = common.randaugment(grey, num_ops=1, prob=1.0, generator=gen(24))
    factors = out[:, 0, 0, 0].long()  # 100 f
    assert out.flatten(1).float().std(1).max() == 0  # one factor per image
    assert set(factors.tolist()) == {28, 46, 64, 82, 100, 118, 136, 154, 172}


def test_posterize_keeps_1_to_4_bits(monkeypatch):
    only(monkeypatch, "posterize")
    every_value = torch.arange(256).to(torch.uint8).view(1, 1, 16, 16).expand(1000, 3, 16, 16)
    out = common.randaugment(every_value.contiguous(), num_ops=1, prob=1.0, generator=gen(25))
    seen = torch.zeros(len(out), 256).scatter_(1, out[:, 0].flatten(1).long(), 1.0)
    levels = seen.sum(1)  # distinct values per image: 2^bits
    share = {bits: float((levels == 2**bits).float().mean()) for bits in (1, 2, 3, 4)}
    assert sum(share.values()) == pytest.approx(1.0)  # nothing else: neither 0 nor 5-8 bits
    expected = {1: 2 / 9, 2: 3 / 9, 3: 2 / 9, 4: 2 / 9}  # levels 8-9, 5-7, 3-4, 1-2
    assert all(abs(share[bits] - expected[bits]) < 0.05 for bits in expected)


def test_solarize_thresholds_are_the_official_levels(monkeypatch):
    only(monkeypatch, "solarize")
    every_value = torch.arange(256).to(torch.uint8).view(1, 1, 16, 16).expand(1000, 3, 16, 16)
    out = common.randaugment(every_value.contiguous(), num_ops=1, prob=1.0, generator=gen(26))
    inverted = out[:, 0].flatten(1) != every_value[0, 0].flatten()  # (n, 256)
    threshold = inverted.float().argmax(1)  # the first value inverted
    assert bool(inverted.any(1).all())
    assert set(threshold.tolist()) == {231, 205, 180, 154, 128, 103, 77, 52, 26}


@pytest.mark.parametrize("size", [32, 96])
def test_strong_augment_cuts_out_a_16_px_square_at_any_size(size):
    black = torch.zeros(100, 3, size, size, dtype=torch.uint8)
    out = common.strong_augment(black, prob=0.0, generator=gen(27))  # RandAugment off
    grey = (out == 128).all(1)
    area = grey.sum((1, 2))
    assert area.max() == 16 * 16 and area.min() > 0
    assert torch.equal(area, grey.any(2).sum(1) * grey.any(1).sum(1)), "a rectangle"
    assert bool(((out == 0) | (out == 128)).all())


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
