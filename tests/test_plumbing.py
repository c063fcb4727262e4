"""Run plumbing: the command line from a dataclass, out-dir rules, devices, the RunBook (log,
totals, resume), atomic checkpoints, results.json, pictures and the self-benchmark."""

import dataclasses
import json
import re
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
        "threads",
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


@pytest.mark.slow  # about 15 s: the full benchmark in a subprocess
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


@dataclasses.dataclass
class Ranged:
    dataset: str = "shapes"
    out_dir: str | None = None
    seed: int = 0
    resume: bool = False
    threads: int | None = common.arg(None, at_least=1)
    """CPU threads"""
    steps: int = common.arg(100, at_least=1)
    """training steps"""
    threshold: float = common.arg(0.95, at_least=0, at_most=1)
    """confidence threshold"""
    lr: float = common.arg(0.03, above=0)
    """learning rate"""
    momentum: float = common.arg(0.9, at_least=0, below=1)
    """momentum"""
    data_dir: str | None = None
    """folder holding the data set (default: ./data for torchvision's sets)"""


def test_ranges_are_checked_at_their_edges(capsys):
    ok = ["--steps", "1", "--threshold", "0", "--lr", "1e-9", "--momentum", "0"]
    assert common.parse_args(Ranged, ok).steps == 1
    assert common.parse_args(Ranged, ["--threshold", "1"]).threshold == 1
    for flag, value, words in (
        ("--steps", "0", "at least 1"),
        ("--steps", "-5", "at least 1"),
        ("--threshold", "1.5", "at least 0 and at most 1"),
        ("--threshold", "-0.1", "at least 0 and at most 1"),
        ("--threshold", "nan", "at least 0 and at most 1"),
        ("--lr", "0.0", "above 0"),
        ("--momentum", "1.0", "at least 0 and below 1"),
        ("--threads", "0", "at least 1"),
    ):
        with pytest.raises(SystemExit) as stop:
            common.parse_args(Ranged, [flag, value], script="demo")
        assert stop.value.code == 2
        error = capsys.readouterr().err
        assert f"demo.py: error: argument {flag}: {value} is out of range: must be {words}" in error
    # A data set's own defaults are checked as well: a wrong table entry is caught at once.
    with pytest.raises(SystemExit):
        common.parse_args(Ranged, [], {"shapes": {"steps": 0}})


def test_parse_args_names_the_run_folder_and_checks_the_data_set(capsys):
    assert common.parse_args(Ranged, ["--seed", "3"], script="demo").out_dir == "runs/demo-shapes-3"
    assert common.parse_args(Ranged, ["--out-dir", "x"], script="demo").out_dir == "x"
    assert common.parse_args(Ranged, []).out_dir is None  # no script name: no default folder
    with pytest.raises(SystemExit):
        common.parse_args(Ranged, ["--dataset", "camvid"], task="classify")
    assert "not a known classification data set" in capsys.readouterr().err


def test_threads_flag_sets_torchs_thread_pool():
    before = torch.get_num_threads()
    try:
        common.parse_args(Ranged, ["--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_help_lists_data_sets_their_defaults_and_each_default_once(capsys):
    with pytest.raises(SystemExit):
        per_dataset = {"shapes": {"steps": 1200}, "camvid": {"resume": False}}
        common.parse_args(Ranged, ["--help"], per_dataset, task="segment")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "data sets (--dataset): camvid," in text and "shapes-seg" in text
    assert "cifar10" not in text, "only the data sets of the script's task"
    assert "shapes: --steps 1200" in text and "camvid: --no-resume" in text
    assert "confidence threshold (default: 0.95; at least 0 and at most 1)" in text
    assert "(default: ./data for torchvision's sets)" in text
    data_dir_help = text.split("--data-dir STR folder")[1]
    assert data_dir_help.startswith(
        " holding the data set (default: ./data for torchvision's sets)"
    )
    assert "(default: None)" not in data_dir_help.split("--")[0], "a default said once"


def test_resume_refuses_changed_flags_and_keeps_args_json(tmp_path):
    out = common.prepare_out_dir(tmp_path / "run", args=Ranged(steps=100))
    common.save_checkpoint(out / "checkpoint.pt", {"step": 3})
    started = (out / "args.json").read_text()
    with pytest.raises(common.ConfigError, match=r"--steps 100 \(now 50\)") as refusal:
        common.prepare_out_dir(out, resume=True, args=Ranged(steps=50, lr=0.1))
    assert "--lr 0.03 (now 0.1)" in str(refusal.value)
    # How a run is watched or where it runs may change; args.json keeps the run's start.
    common.prepare_out_dir(out, resume=True, args=Ranged(steps=100, threads=1, resume=True))
    assert (out / "args.json").read_text() == started
    assert "threads" in common.MAY_CHANGE_ON_RESUME and "steps" not in common.MAY_CHANGE_ON_RESUME


def test_a_fresh_start_drops_the_log_of_a_run_stopped_before_its_first_checkpoint(tmp_path):
    out = common.prepare_out_dir(tmp_path / "run", args=Ranged())
    (out / "log.jsonl").write_text('{"step": 1}\n')
    common.prepare_out_dir(out, args=Ranged())
    assert not (out / "log.jsonl").exists()


def test_a_resumed_log_reads_as_one_run(tmp_path, capsys):
    out = common.prepare_out_dir(tmp_path / "run", args=Ranged())
    book = common.RunBook(out, Ranged())
    book.start_log()
    for step in (1, 2):
        book.log(step, {"loss": 1.0})
    book.save({"step": 2})
    for step in (3, 4):  # an attempt interrupted after its last checkpoint
        book.log(step, {"loss": 1.0})
    resumed = common.RunBook(out, Ranged(resume=True))
    resumed.start_log()
    resumed.log(3, {"loss": 0.5})
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"] == 0.5


def test_a_damaged_checkpoint_is_a_message_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"weights": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(common.ConfigError, match="cannot be read as a checkpoint") as error:
        common.load_checkpoint(path)
    assert str(path) in str(error.value)
    with pytest.raises(common.ConfigError, match="no such file"):
        common.load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_are_due_after_each_evaluation_and_on_the_clock(tmp_path, monkeypatch):
    book = common.RunBook(common.prepare_out_dir(tmp_path / "run"), Ranged())
    assert book.save_due(evaluated=True)
    assert not book.save_due()
    monkeypatch.setattr(common, "CHECKPOINT_SECONDS", 0.0)
    assert book.save_due()


def test_user_errors_end_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        with common.user_errors("demo.py", tmp_path):
            raise common.ConfigError("--steps must be positive")
    assert stop.value.code == "demo.py: error: --steps must be positive"
    with pytest.raises(SystemExit) as stop:
        with common.user_errors("demo.py", tmp_path):
            raise KeyboardInterrupt
    assert stop.value.code == 130
    assert "before the first checkpoint" in capsys.readouterr().err
    common.save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    with pytest.raises(SystemExit):
        with common.user_errors("demo.py", tmp_path):
            raise KeyboardInterrupt
    error = capsys.readouterr().err
    assert str(tmp_path / "checkpoint.pt") in error and "--resume" in error


@pytest.mark.parametrize(
    ("flag", "gpus", "device", "backend", "told"),
    [
        ("cuda", 2, "cuda:1", "nccl", None),  # a GPU per process: LOCAL_RANK's, NCCL
        ("auto", 2, "cuda:1", "nccl", None),
        ("cuda:0", 2, "cuda:0", "gloo", "share GPU 0.*--device cuda gives each process"),
        ("cuda", 1, "cuda:0", "gloo", "share 1 GPU"),  # fewer GPUs than processes
        ("cpu", 2, "cpu", "gloo", None),
    ],
)
def test_under_torchrun_each_process_picks_its_gpu_and_nccl_only_with_one_each(
    monkeypatch, capsys, flag, gpus, device, backend, told
):
    # Rank 1 of 2 processes on one machine. NCCL refuses two processes on one GPU, so an explicit
    # --device cuda:0 (every process on GPU 0) must not get it.
    for key, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", chosen.append)
    assert common.start_processes(flag) == torch.device(device)
    assert chosen[-1] == backend
    if device != "cpu":
        assert chosen[0] == torch.device(device)
    out = capsys.readouterr().out
    if told is None:
        assert "gloo" not in out
    else:
        assert f"--device {flag}" in out and re.search(told, out)


ABORTS_ONCE_AT_EXIT = """
import pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--out-dir") + 1])
assert not (out / "results.json").exists(), "the second launch found the first one's files"
out.mkdir(exist_ok=True)
(out / "results.json").write_text("{}")
print("results: acc=1", flush=True)
tried = out.parent / "tried"
if not tried.exists():  # the first launch: finished, then the abort gloo rarely gives at exit
    tried.write_text("1")
    print("terminate called without an active exception", file=sys.stderr, flush=True)
    sys.exit(1)
"""


@pytest.mark.slow  # one torchrun start: about 15 s
def test_the_torchrun_harness_relaunches_once_after_an_abort_at_exit_from_the_out_dir_as_it_was(
    tmp_path, torchrun
):
    script = tmp_path / "aborts_once.py"
    script.write_text(ABORTS_ONCE_AT_EXIT)
    with pytest.warns(UserWarning, match="aborted at exit; launched once more"):
        done = torchrun(str(script), ["--out-dir", tmp_path / "run"], processes=1)
    assert done.returncode == 0 and (tmp_path / "tried").exists()
