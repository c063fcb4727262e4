"""Write the GPU check suite's real data into the repository, for the `device` call to carry.

A GPU machine lent for the suite (tests/test_gpu.py) has no network and gets only the working
tree, at most 64 MiB, never ../shared. This script copies from ../shared/data, once, here:

- data/gpu/cifar10: the first 1,000 training and 200 test images of every CIFAR-10 class, the
  JPEG files byte for byte (the pixels the project's image-folder loader reads from the full set),
  in the same `<split>/<class>/<image>` layout: 10,000 training and 2,000 test images.
- data/gpu/camvid: CamVid's train and test splits at half size (480 x 360 -> 240 x 180), images
  resampled with antialiasing and saved as JPEG (quality 95, as ../shared stores them), label maps
  resampled nearest and saved as PNG, in the SegNet layout `common.load_segmentation` reads.

`data/` is git-ignored. Usage, from the repository root:

    python tests/prepare_gpu_data.py                  # ../shared/data -> data/gpu
    python tests/prepare_gpu_data.py --source DIR --out DIR

It prints the bytes written; data/gpu/prepared.json records what was written and from where.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "prepared.json"  # written last: a folder with it is complete, and ours to replace


def copy_cifar(source: Path, out: Path, per_class: dict[str, int]) -> dict:
    """The first `per_class[split]` files (sorted by name) of every class folder of each split,
    copied unchanged. Returns the image count per split."""
    counts = {}
    for split, count in per_class.items():
        classes = sorted(d for d in (source / split).iterdir() if d.is_dir())
        if not classes:
            raise SystemExit(f"prepare_gpu_data: no class folders in {source / split}")
        counts[split] = 0
        for folder in classes:
            files = sorted(p for p in folder.iterdir() if p.is_file())[:count]
            if len(files) < count:
                raise SystemExit(
                    f"prepare_gpu_data: {folder} holds {len(files)} images, {count} wanted"
                )
            (out / split / folder.name).mkdir(parents=True)
            for path in files:
                shutil.copyfile(path, out / split / folder.name / path.name)
            counts[split] += len(files)
    return counts


def shrink_camvid(source: Path, out: Path, splits: dict[str, int | None], scale: float) -> dict:
    """The first `splits[split]` image / label pairs (None: all) of each split, sorted by stem,
    resized by `scale`: images bilinear with antialiasing (PIL's resize), labels nearest.
    Returns the pair count per split."""
    from PIL import Image

    counts = {}
    for split, limit in splits.items():
        images = sorted(p for p in (source / split).iterdir() if p.is_file())[:limit]
        if not images:
            raise SystemExit(f"prepare_gpu_data: no images in {source / split}")
        (out / split).mkdir(parents=True)
        (out / f"{split}annot").mkdir(parents=True)
        for path in images:
            label_path = source / f"{split}annot" / f"{path.stem}.png"
            with Image.open(path) as image, Image.open(label_path) as label:
                size = (round(image.width * scale), round(image.height * scale))
                image = image.convert("RGB").resize(size, Image.BILINEAR)
                image.save(out / split / f"{path.stem}.jpg", quality=95)
                label.resize(size, Image.NEAREST).save(out / f"{split}annot" / f"{path.stem}.png")
        counts[split] = len(images)
    return counts


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(
    source: Path,
    out: Path,
    cifar_per_class: dict[str, int],
    camvid_splits: dict[str, int | None],
    camvid_scale: float = 0.5,
) -> dict:
    """`source` (holding cifar10/ and camvid/ as ../shared/data does) -> `out`/cifar10 and
    `out`/camvid. An `out` from an earlier call (it holds prepared.json) is replaced; any other
    existing `out` is refused. Returns what prepared.json records."""
    for name in ("cifar10", "camvid"):
        if not (source / name).is_dir():
            raise SystemExit(f"prepare_gpu_data: {source / name} not found (see --source)")
    if out.exists() and not (out / MARKER).is_file():
        raise SystemExit(f"prepare_gpu_data: {out} exists and was not made here; remove it first")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    record = {
        "source": str(source.resolve()),
        "cifar10": copy_cifar(source / "cifar10", out / "cifar10", cifar_per_class),
        "camvid": shrink_camvid(source / "camvid", out / "camvid", camvid_splits, camvid_scale),
        "camvid_scale": camvid_scale,
    }
    record["bytes"] = folder_bytes(out)
    (out / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "gpu")
    args = parser.parse_args(argv)
    record = prepare(
        args.source,
        args.out,
        cifar_per_class={"train": 1000, "test": 200},
        camvid_splits={"train": None, "test": None},
    )
    print(
        f"prepared {args.out}: CIFAR-10 {record['cifar10']}, CamVid {record['camvid']} at "
        f"{record['camvid_scale']} x, {record['bytes']:,} bytes ({record['bytes'] / 2**20:.1f} MiB)"
    )
    return record


if __name__ == "__main__":
    main()
