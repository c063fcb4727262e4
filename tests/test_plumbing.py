"""Run plumbing: the command line from a dataclass, out-dir rules, devices, the RunBook (log,
totals, resume), atomic checkpoints, results.json, pictures and the self-benchmark."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

import common


@dataclasses.dataclass
class Args:
    dataset: str = "cifar10"
    """data set name"""
    num_labeled: int = 4000
    """labelled images, n"""
    labeled_ratio: float = 0.125
    """fraction of the pool that is labelled"""
    cutmix: bool = True
    """CutMix on unlabelled images"""
    stage: Literal["all", "moco", "self"] = "all"
    """which stage to run"""
    init_from: str | None = None
    """checkpoint of the previous stage"""
    lr: float = 0.03
    """learning rate eta"""


def test_every_field_is_a_flag_with_its_help(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(Args, ["--help"])
    text = capsys.readouterr().out
    for flag, help_text in (
        ("--num-labeled", "labelled images, n"),
        ("--labeled-ratio", "fraction of the pool"),
        ("--cutmix, --no-cutmix", "CutMix on unlabelled"),
        ("--init-from", "previous stage"),
        ("--stage {all,moco,self}", "which stage"),
    ):
        assert flag in text and help_text in text
    assert "(default: 4000)" in text


def test_types_booleans_fractions_and_choices():
    args = common.parse_args(
        Args,
        [
            "--num-labeled",
            "40",
            "--labeled-ratio",
            "1/8",
            "--no-cutmix",
            "--stage",
            "moco",
            "--init-from",
            "runs/x/checkpoint.pt",
            "--lr",
            "1e-3",
        ],
    )
    assert args == Args(
        num_labeled=40,
        labeled_ratio=0.125,
        cutmix=False,
        stage="moco",
        init_from="runs/x/checkpoint.pt",
        lr=0.001,
    )
    assert common.parse_args(Args, []) == Args()
    for bad in (
        ["--labeled-ratio", "one/8"],
        ["--stage", "semi"],
        ["--num-labeled", "4.5"],
        ["--unknown", "1"],
    ):
        with pytest.raises(SystemExit):
            common.parse_args(Args, bad)


def test_dataset_defaults_apply_unless_a_flag_overrides_them():
    per_dataset = {"cifar100": {"lr": 0.01, "num_labeled": 10000}}
    assert common.parse_args(Args, ["--dataset", "cifar100"], per_dataset).lr == 0.01
    args = common.parse_args(Args, ["--dataset", "cifar100", "--lr", "0.5"], per_dataset)
    assert args.lr == 0.5 and args.num_labeled == 10000
    assert common.parse_args(Args, [], per_dataset).lr == 0.03


def test_out_dir_rules(tmp_path):
    out = common.prepare_out_dir(tmp_path / "run", args=Args())
    assert json.loads((out / "args.json").read_text())["num_labeled"] == 4000
    common.prepare_out_dir(out)  # holds only args.json: still a fresh run
    (out / "results.json").write_text("{}")
    with pytest.raises(common.ConfigError, match="--resume"):
        common.prepare_out_dir(out)
    with pytest.raises(common.ConfigError, match="no checkpoint"):
        common.prepare_out_dir(out, resume=True)
    common.save_checkpoint(out / "checkpoint.pt", {"step": 3})
    assert common.prepare_out_dir(out, resume=True) == out
    assert (out / "results.json").read_text() == "{}", "nothing written over"


def test_shared_flags_are_designs_in_order():
    # DESIGN.md (Runs): the flags every script shares, with the same names and help
    assert list(common.SHARED_ARGS) == [
        "dataset",
        "data_dir",
        "out_dir",
        "download",
        "seed",
        "device",
        "batch_size",
        "eval_every",
        "resume",
        "amp",
        "compile",
    ]
    assert all(
        text
        for name, text in common.SHARED_ARGS.items()
        if name not in ("batch_size", "eval_every")
    )


def test_select_device():
    assert common.select_device("cpu").type == "cpu"
    assert common.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(common.ConfigError):
        common.select_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(common.ConfigError, match="--device cpu"):
            common.select_device("cuda:0")


@dataclasses.dataclass
class RunArgs:
    resume: bool = False
    steps: int = 10


def test_runbook_log_prints_key_values_and_appends_jsonl(tmp_path, capsys):
    book = common.RunBook(tmp_path, RunArgs())
    book.start_log(total=10)
    with book.timed(images=100):
        pass
    book.log(5, {"train/loss": torch.tensor(0.25), "train/mask": 0.5})
    book.log(10, {"eval/acc": 0.75})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("step=5 train/loss=0.25 train/mask=0.5 perf/img_per_s=")
    assert "perf/eta_s=" in lines[0] and "eval/acc=0.75" in lines[1]
    assert "perf/img_per_s" not in lines[1], "no images counted since the last line"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10] and records[0]["train/loss"] == 0.25
    assert records[0]["perf/img_per_s"] > 0 and records[1]["perf/eta_s"] == 0


def test_runbook_resumes_its_totals_from_the_checkpoint(tmp_path):
    book = common.RunBook(tmp_path, RunArgs())
    with book.timed(images=64):
        pass
    book.save({"step": 3})
    saved = common.load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 3 and saved["args"] == {"resume": False, "steps": 10}
    resumed = common.RunBook(tmp_path, RunArgs(resume=True))
    assert resumed.checkpoint["step"] == 3 and resumed.totals["images"] == 64
    figures = resumed.figures()
    assert figures["seconds"] >= saved["totals"]["seconds"] and figures["images_per_second"] > 0


def test_runbook_restores_the_random_states_a_resumed_run_draws_from(tmp_path):
    # ODC's dropout and PiCIE's draw from torch's global generator, the augmentations from their
    # own: through the checkpoint, both draw again what the uninterrupted run drew.
    generator = torch.Generator().manual_seed(5)
    book = common.RunBook(tmp_path, RunArgs())
    book.save({"augment_rng": generator.get_state()})
    first = (torch.rand(3, generator=generator), torch.rand(3))
    resumed = common.RunBook(tmp_path, RunArgs(resume=True))
    generator.set_state(resumed.checkpoint["augment_rng"])
    resumed.restore_global_rng()
    again = (torch.rand(3, generator=generator), torch.rand(3))
    assert torch.equal(first[0], again[0]), "the augmentation generator"
    assert torch.equal(first[1], again[1]), "torch's global generator (dropout)"


def test_checkpoint_survives_a_crash_during_save(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    state = common.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path], "no temporary file left behind"
    common.save_checkpoint(path, {"step": 2})
    assert common.load_checkpoint(path)["step"] == 2


def test_results_are_fractions(tmp_path):
    written = common.write_results(
        tmp_path, {"acc": torch.tensor(0.9), "kmeans_acc": 0.5, "seconds": 12.0}
    )
    assert (
        json.loads((tmp_path / "results.json").read_text())
        == written
        == {"acc": pytest.approx(0.9), "kmeans_acc": 0.5, "seconds": 12.0}
    )
    for bad in (
        {"acc": 91.8},
        {"self_nmi": -0.1},
        {"miou": 1.5},
        {"ari": 83.6},
        {"self_ari": -1.5},
    ):
        with pytest.raises(ValueError, match="fraction"):
            common.write_results(tmp_path, bad)
    assert common.write_results(tmp_path, {"self_ari": -0.02}) == {"self_ari": -0.02}, (
        "ARI below chance is negative"
    )


def test_pictures_are_written(tmp_path):
    from PIL import Image

    images = torch.randint(0, 255, (30, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    common.save_cluster_grid(
        tmp_path / "clusters.png", images, labels, scores=torch.rand(30), per_row=4
    )
    assert Image.open(tmp_path / "clusters.png").size == (
        4 * 9 + 1,
        3 * 9 + 1,
    )  # one row per cluster
    targets, preds = torch.randint(0, 4, (2, 8, 8)), torch.randint(0, 4, (2, 8, 8))
    targets[0, 0, 0] = 255
    common.save_segmentation_rows(tmp_path / "seg.png", images[:2], targets, preds)
    assert Image.open(tmp_path / "seg.png").size == (3 * 10 + 2, 2 * 10 + 2)
    colours = common.colorize(torch.tensor([[[0, 1, 255]]]))
    assert colours[0, :, 0, 0].tolist() == [0, 0, 0] and colours[0, 0, 0, 1] == 128 / 255


def test_python_common_py_prints_its_benchmark():
    result = subprocess.run(
        [sys.executable, "common.py", "cpu"],
        cwd=Path(common.__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = dict(line.split("=", 1) for line in result.stdout.split())
    for key in ("weak_aug_img_per_s", "strong_aug_img_per_s", "kmeans_s", "hungarian_s"):
        assert float(figures[key]) > 0
