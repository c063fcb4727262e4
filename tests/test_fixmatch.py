"""fixmatch.py: the paper's pieces on constructed inputs, a smoke run with resume, bad input,
and a learning test against the supervised-only baseline."""

import dataclasses
import inspect
import json
import math
import shutil
import statistics

import pytest
import torch
import torch.nn.functional as F

import common
import fixmatch

_SHAPES = {}  # (split, image size) -> the shapes split, drawn once for this file


@pytest.fixture(autouse=True)
def shapes_drawn_once(monkeypatch):
    """The runs below load the shapes splits many times; drawing them costs seconds at 32 px.
    They are deterministic, so each is drawn once and handed out again (read, never changed)."""
    real = common.load_dataset

    def load(name, split="train", **kwargs):
        if name != "shapes":
            return real(name, split, **kwargs)
        key = (split, kwargs.get("image_size"))
        if key not in _SHAPES:
            _SHAPES[key] = real(name, split, **kwargs)
        return _SHAPES[key]

    monkeypatch.setattr(common, "load_dataset", load)


def test_loss_is_the_supervised_term_when_nothing_is_confident():
    g = torch.Generator().manual_seed(0)
    logits_x = torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    weak = torch.randn(12, 5, generator=g)
    strong = torch.randn(12, 5, generator=g)
    loss, loss_s, loss_u, mask, _ = fixmatch.fixmatch_loss(
        logits_x, y, weak, strong, threshold=1.01
    )
    assert mask.sum() == 0 and loss_u == 0
    assert torch.allclose(loss, F.cross_entropy(logits_x, y)) and torch.allclose(loss, loss_s)


def test_unlabelled_term_is_divided_by_all_unlabelled_samples():
    weak = torch.zeros(8, 3)
    weak[:3, 1] = 10.0  # three confident predictions of class 1; five uniform (1/3) ones
    strong = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    _, _, loss_u, mask, pseudo = fixmatch.fixmatch_loss(
        torch.zeros(2, 3), torch.tensor([0, 1]), weak, strong, threshold=0.95, lambda_u=1.0
    )
    assert mask.tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and pseudo[:3].tolist() == [1, 1, 1]
    expected = F.cross_entropy(strong[:3], torch.tensor([1, 1, 1]), reduction="sum") / 8  # not / 3
    assert torch.allclose(loss_u, expected)
    # lambda_u scales it, and no gradient flows through the pseudo-labels (the weak logits)
    weak.requires_grad_(True)
    strong.requires_grad_(True)
    total, loss_s, loss_u, _, _ = fixmatch.fixmatch_loss(
        torch.zeros(2, 3), torch.tensor([0, 1]), weak, strong, lambda_u=2.0
    )
    assert torch.allclose(total, loss_s + 2 * loss_u)
    total.backward()
    assert weak.grad is None
    assert strong.grad[:3].abs().sum() > 0 and strong.grad[3:].abs().sum() == 0


def test_pseudo_labels_and_mask_come_from_the_weak_logits_the_loss_from_the_strong():
    # Row 0: the weak view is sure of class 2, the strong one of class 0; row 1 the other way
    # round (the weak view unsure, the strong one sure of class 1).
    weak = torch.tensor([[0.0, 0.0, 9.0], [0.3, 0.0, 0.0]])
    strong = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]])
    _, _, loss_u, mask, pseudo = fixmatch.fixmatch_loss(
        torch.zeros(1, 3), torch.tensor([0]), weak, strong, threshold=0.95
    )
    assert pseudo.tolist() == [2, 0] and mask.tolist() == [1.0, 0.0]
    assert torch.allclose(loss_u, F.cross_entropy(strong[:1], torch.tensor([2])) / 2)
    # A confidence equal to tau is accepted (the official `>=`): two tied classes, tau = 1/2.
    _, _, _, mask, _ = fixmatch.fixmatch_loss(
        torch.zeros(1, 2), torch.tensor([0]), torch.zeros(1, 2), torch.zeros(1, 2), threshold=0.5
    )
    assert mask.tolist() == [1.0]


def test_pseudo_label_accuracy_counts_accepted_images_with_known_labels_only():
    pseudo = torch.tensor([1, 2, 3, 4, 5])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    truth = torch.tensor([1, 0, -1, 4, -1])  # -1: no label (STL-10's unlabelled images)
    assert fixmatch.pseudo_label_accuracy(pseudo, mask, truth) == 0.5  # 1 of images 0 and 1


def test_cosine_schedule_end_points():
    assert fixmatch.cosine_lr(0, 1000, 0.03) == pytest.approx(0.03)
    assert fixmatch.cosine_lr(1000, 1000, 0.03) == pytest.approx(0.03 * math.cos(7 * math.pi / 16))
    assert fixmatch.cosine_lr(1000, 1000, 0.03) == pytest.approx(0.00585, abs=1e-5)
    assert fixmatch.cosine_lr(500, 1000, 0.03) == pytest.approx(0.03 * math.cos(7 * math.pi / 32))


def test_ema_with_decay_zero_is_the_model_including_batch_norm_buffers():
    model = fixmatch.WideResNet(10, 10, 1)
    ema = fixmatch.WideResNet(10, 10, 1)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # moves the running statistics
    fixmatch.ema_update(ema, model, decay=0.0)
    for (name, a), b in zip(model.state_dict().items(), ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    before = [p.clone() for p in ema.parameters()]
    other = fixmatch.WideResNet(10, 10, 1)
    fixmatch.ema_update(ema, other, decay=0.9)
    for b, e, o in zip(before, ema.parameters(), other.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * b + 0.1 * o)


def test_ema_averages_the_weights_and_copies_the_batch_norm_buffers():
    torch.manual_seed(0)
    model, ema = fixmatch.WideResNet(10, 10, 1), fixmatch.WideResNet(10, 10, 1)
    with torch.no_grad():
        for p in model.parameters():  # batch norm's weights and biases too (initialised 1, 0)
            p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3, 16, 16) * 3 + 1)  # running statistics far from ema's (0, 1)
    before = [p.clone() for p in ema.parameters()]
    fixmatch.ema_update(ema, model, decay=0.9)
    for b, e, p in zip(before, ema.parameters(), model.parameters(), strict=True):
        assert not torch.equal(b, p)  # the average is neither of them
        assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-6)
    buffers = dict(model.named_buffers())
    for name, e in ema.named_buffers():  # running mean and variance, batch counts: copies
        assert torch.equal(e, buffers[name]), name


def _block_by_hand(block, x, shortcut_input):
    """A WideBlock's output written out: the residual path on BN -> LeakyReLU of x, plus the
    shortcut (1x1 convolution where the shape changes) applied to `shortcut_input`."""
    a = F.leaky_relu(block.bn1(x), 0.1)
    residual = block.conv2(F.leaky_relu(block.bn2(block.conv1(a)), 0.1))
    shortcut = block.shortcut(shortcut_input) if block.shortcut is not None else shortcut_input
    return residual + shortcut


def test_only_the_first_block_passes_the_activated_input_to_its_shortcut():
    torch.manual_seed(0)
    model = fixmatch.WideResNet(10, depth=16, widen_factor=2).eval()  # 2 blocks per stage
    flags = [block.activate_before_residual for block in model.blocks]
    assert flags == [True, False, False, False, False, False]
    for block in model.blocks[:2]:  # running statistics other than (0, 1): BN is not identity
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        x = torch.randn(2, 16, 8, 8)
        first = model.blocks[0]  # 16 -> 32 channels: its shortcut is a 1x1 convolution
        activated = F.leaky_relu(first.bn1(x), 0.1)
        assert torch.allclose(first(x), _block_by_hand(first, x, activated), atol=1e-6)
        assert not torch.allclose(first(x), _block_by_hand(first, x, x), atol=1e-3)
        second = model.blocks[1]  # 32 -> 32: the identity shortcut, of the raw input
        y = torch.randn(2, 32, 8, 8)
        assert torch.allclose(second(y), _block_by_hand(second, y, y), atol=1e-6)
    # WRN-10-1's first block keeps 16 channels: no convolution, the activated input itself
    tiny = fixmatch.WideResNet(10, 10, 1).eval()
    tiny.blocks[0].bn1.running_mean.fill_(0.5)
    with torch.no_grad():
        x = torch.randn(2, 16, 8, 8)
        activated = F.leaky_relu(tiny.blocks[0].bn1(x), 0.1)
        assert tiny.blocks[0].shortcut is None
        assert torch.allclose(tiny.blocks[0](x), _block_by_hand(tiny.blocks[0], x, activated))


def test_wide_resnet_forward_stages_and_head():
    torch.manual_seed(0)
    model = fixmatch.WideResNet(10, depth=16, widen_factor=1).eval()
    model.bn.running_mean.uniform_(-1, 1)  # the last batch norm is not an identity
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.stem(x)
        sides = []
        for block in model.blocks:
            h = block(h)
            sides.append((h.shape[1], h.shape[-1]))
        pooled = F.leaky_relu(model.bn(h), 0.1).mean((2, 3))  # BN, LeakyReLU, global average pool
        assert torch.allclose(model(x), model.fc(pooled), atol=1e-6)
    # widths 16k, 32k, 64k; stride 2 entering stages 2 and 3 only
    assert sides == [(16, 32), (16, 32), (32, 16), (32, 16), (64, 8), (64, 8)]


def test_the_optimizer_is_nesterov_sgd_and_the_ema_starts_as_the_model():
    args = fixmatch.Args(depth=10, widen_factor=1, lr=0.05, weight_decay=1e-3, bn_momentum=0.1)
    model, ema, optimizer, forward = fixmatch.wide_resnet_and_optimizer(
        args, 10, torch.device("cpu")
    )
    assert isinstance(optimizer, torch.optim.SGD) and forward is model
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-3, 0.0]
    assert all(g["lr"] == 0.05 for g in optimizer.param_groups)
    ema_state = ema.state_dict()
    assert all(torch.equal(v, ema_state[k]) for k, v in model.state_dict().items())
    assert ema is not model and not any(p.requires_grad for p in ema.parameters())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_headline_accuracy_is_the_median_of_the_last_two_percent_of_the_steps():
    # The paper's schedule, 1,024 evaluations of 2^20 steps: the official median of the last 20.
    paper = [(1024 * k, k / 1024) for k in range(1, 1025)]
    last20 = statistics.median(range(1005, 1025)) / 1024
    assert fixmatch.headline_accuracy(paper, 2**20) == (pytest.approx(last20), 20)
    # The shapes defaults, 6 evaluations of 1200 steps: the last one alone, not a median reaching
    # back to step 200.
    shapes = [(200, 0.2), (400, 0.5), (600, 0.7), (800, 0.8), (1000, 0.85), (1200, 0.88)]
    assert fixmatch.headline_accuracy(shapes, 1200) == (0.88, 1)
    # Every step evaluated, 100 steps: steps 99 and 100 (step 98 is 2% before the end, not in it).
    every_step = [(k, k / 100) for k in range(1, 101)]
    assert fixmatch.headline_accuracy(every_step, 100) == (pytest.approx(0.995), 2)
    # A run resumed with another --eval-every: the window is by step, not by count.
    resumed = [(500, 0.1), (1000, 0.2), (1990, 0.5), (1995, 0.9), (2000, 0.6)]
    assert fixmatch.headline_accuracy(resumed, 2000) == (0.6, 3)


def test_weight_decay_only_on_conv_and_linear_weights():
    model = fixmatch.WideResNet(10, 10, 1)
    decay, no_decay = fixmatch.parameter_groups(model, 5e-4)
    decayed = {id(p) for p in decay["params"]}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            wanted = isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name == "weight"
            assert (id(p) in decayed) == wanted, (type(module).__name__, name)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_wrn_28_2_has_1_47_million_parameters():
    count = sum(p.numel() for p in fixmatch.WideResNet(10, 28, 2).parameters())
    assert abs(count - 1.47e6) / 1.47e6 < 0.01
    assert fixmatch.WideResNet(10, 28, 2)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6 n \\+ 4"):
        fixmatch.WideResNet(10, 27, 2)


def test_labeled_split_is_balanced_seeded_and_inside_the_training_set():
    labels = torch.arange(1000) % 10
    idx = fixmatch.labeled_split(labels, 40, 10, seed=3)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [4] * 10
    assert len(set(idx.tolist())) == 40 and bool((idx >= 0).all() and (idx < 1000).all())
    assert torch.equal(idx, fixmatch.labeled_split(labels, 40, 10, seed=3))
    assert not torch.equal(idx, fixmatch.labeled_split(labels, 40, 10, seed=4))
    with pytest.raises(common.ConfigError, match="multiple"):
        fixmatch.labeled_split(labels, 45, 10, 0)
    with pytest.raises(common.ConfigError, match="class"):
        fixmatch.labeled_split(labels, 1010, 10, 0)


def test_load_data_draws_the_labelled_split_and_keeps_every_training_image_unlabelled():
    args = fixmatch.Args(dataset="shapes", num_labeled=30, image_size=16)
    labeled_set, unlabeled_set, test_set = fixmatch.load_data(args, torch.device("cpu"))
    train_set = common.load_dataset("shapes", "train", image_size=16)
    assert torch.bincount(labeled_set.labels, minlength=10).tolist() == [3] * 10
    assert labeled_set.images.dtype == torch.uint8 and labeled_set.images.shape[1:] == (3, 16, 16)
    assert torch.equal(unlabeled_set.images, train_set.images)
    assert torch.equal(unlabeled_set.labels, train_set.labels)
    assert len(test_set) > 0 and labeled_set.num_classes == 10
    with pytest.raises(common.ConfigError, match="exceeds"):
        fixmatch.load_data(dataclasses.replace(args, num_labeled=10**6), torch.device("cpu"))


def test_draw_batches_gives_b_labelled_and_mu_b_unlabelled_images_with_their_labels():
    args = fixmatch.Args(dataset="shapes", num_labeled=30, image_size=16, batch_size=4, mu=3)
    labeled_set, unlabeled_set, _ = fixmatch.load_data(args, torch.device("cpu"))
    x, targets_x, u, u_labels = fixmatch.draw_batches(args, labeled_set, unlabeled_set, step=2)
    assert x.shape == (4, 3, 16, 16) and u.shape == (12, 3, 16, 16) and x.dtype == torch.uint8
    labeled = fixmatch.batch_indices(30, 4, 2, args.seed, "cpu")
    unlabeled = fixmatch.batch_indices(len(unlabeled_set), 12, 2, args.seed + 1, "cpu")
    assert torch.equal(x, labeled_set.images[labeled])
    assert torch.equal(targets_x, labeled_set.labels[labeled])
    assert torch.equal(u, unlabeled_set.images[unlabeled])
    assert torch.equal(u_labels, unlabeled_set.labels[unlabeled])
    assert not torch.equal(labeled, unlabeled[:4]), "the two streams are shuffled differently"


def test_batch_indices_cover_every_item_once_per_pass():
    first_pass = torch.cat(
        [fixmatch.batch_indices(40, 8, step, seed=0, device="cpu") for step in range(5)]
    )
    assert sorted(first_pass.tolist()) == list(range(40))
    crossing = fixmatch.batch_indices(40, 16, 2, seed=0, device="cpu")  # items 32..47: two passes
    assert len(crossing) == 16
    assert torch.equal(crossing, fixmatch.batch_indices(40, 16, 2, seed=0, device="cpu"))


SMOKE = [
    "--dataset",
    "shapes",
    "--depth",
    "10",
    "--widen-factor",
    "1",
    "--num-labeled",
    "20",
    "--batch-size",
    "8",
    "--mu",
    "2",
    "--steps",
    "6",
    "--eval-every",
    "3",
    "--log-every",
    "2",
    "--device",
    "cpu",
]


# A smaller run still: 8 px images, for the tests of single steps.
TINY = SMOKE[:12] + ["--image-size", "8", "--device", "cpu"]


def _log(folder) -> list[dict]:  # log.jsonl without the timing entries
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if "perf/" not in k} for line in lines]


def _files(folder) -> dict:  # every file of a run folder and its bytes
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_smoke_run_writes_its_files_and_resume_reaches_the_same_result(
    tmp_path, interrupted_run, monkeypatch
):
    saved, evaluated = [], []
    real_save, real_evaluate = common.save_checkpoint, fixmatch.evaluate

    def save(path, state):
        saved.append(state["step"])
        real_save(path, state)

    def evaluate(model, *args):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *args)

    with monkeypatch.context() as patch:
        patch.setattr(common, "save_checkpoint", save)
        patch.setattr(fixmatch, "evaluate", evaluate)
        straight = fixmatch.main(SMOKE + ["--out-dir", str(tmp_path / "a")])
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "results.json", "predictions.png"):
        assert (tmp_path / "a" / name).exists(), name
    assert saved == [3, 6], "a checkpoint at every evaluation"
    assert set(straight) >= {"acc", "acc_evals", "acc_last", "seconds", "images_per_second"}
    assert 0 <= straight["acc_last"] <= 1
    # 6 steps, evaluated at 3 and 6: only step 6 lies in the last 2%, the headline is its figure.
    assert straight["acc_evals"] == 1 and straight["acc"] == straight["acc_last"]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["acc_evals"] == 1
    records = _log(tmp_path / "a")
    assert [r["step"] for r in records] == [2, 3, 4, 6, 6]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    for r in records:  # step k trains at the rate of the schedule's step k - 1 (from 0)
        if "train/lr" in r:
            assert r["train/lr"] == pytest.approx(fixmatch.cosine_lr(r["step"] - 1, 6, 0.03))
    assert [r["eval/acc"] for r in records if "eval/acc" in r][-1] == straight["acc_last"]
    final = common.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert all(torch.equal(v, final["ema"][k]) for k, v in evaluated[-1].items()), "the EMA model"
    assert not all(torch.equal(v, final["model"][k]) for k, v in evaluated[-1].items())

    b = tmp_path / "b"
    interrupted_run(fixmatch.main, SMOKE + ["--out-dir", str(b)])  # dies after step 3
    assert common.load_checkpoint(b / "checkpoint.pt")["step"] == 3
    with pytest.raises(SystemExit, match="--resume"):  # a run in progress is not overwritten
        fixmatch.main(SMOKE + ["--out-dir", str(b)])
    # A resume that would change the result is refused, naming the flag; args.json stays.
    before = _files(b)
    with pytest.raises(SystemExit, match="--depth 10 \\(now 16\\)"):
        fixmatch.main(SMOKE + ["--out-dir", str(b), "--resume", "--depth", "16"])
    with pytest.raises(SystemExit, match="--steps 6 \\(now 8\\)"):
        fixmatch.main(SMOKE + ["--out-dir", str(b), "--resume", "--steps", "8"])
    assert _files(b) == before
    # A truncated checkpoint is a message naming it, and nothing is written.
    damaged = tmp_path / "damaged"
    shutil.copytree(b, damaged)
    data = (damaged / "checkpoint.pt").read_bytes()
    (damaged / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = _files(damaged)
    with pytest.raises(SystemExit, match=str(damaged / "checkpoint.pt")):
        fixmatch.main(SMOKE + ["--out-dir", str(damaged), "--resume"])
    assert _files(damaged) == before
    watched = tmp_path / "watched"
    shutil.copytree(b, watched)

    # A line that the interrupted attempt wrote after its checkpoint: dropped on resume.
    with open(b / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "train/loss": 9.9}) + "\n")
    resumed = fixmatch.main(SMOKE + ["--out-dir", str(b), "--resume"])
    assert resumed["acc"] == straight["acc"] and resumed["acc_last"] == straight["acc_last"]
    state_a = common.load_checkpoint(tmp_path / "a" / "checkpoint.pt")["ema"]
    state_b = common.load_checkpoint(b / "checkpoint.pt")["ema"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert _log(b) == records, "the log reads as one run: each step once, in order"

    # --eval-every and --log-every may change on resume: they watch the run, the result is the same.
    args_json = (watched / "args.json").read_bytes()
    flags = ["--resume", "--eval-every", "2", "--log-every", "1"]
    again = fixmatch.main(SMOKE + ["--out-dir", str(watched)] + flags)
    assert again["acc_last"] == straight["acc_last"]
    state_c = common.load_checkpoint(watched / "checkpoint.pt")["ema"]
    assert all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert [r["step"] for r in _log(watched)] == [2, 3, 4, 4, 5, 6, 6]
    assert (watched / "args.json").read_bytes() == args_json


def test_one_step_pseudo_labels_come_from_the_weak_view_and_the_loss_from_the_strong(
    tmp_path, monkeypatch
):
    """One training step, each piece marked: the weak views are constant images of grey 50,
    the strong ones of grey 200, so every row of the network's input says which view it is."""
    seen = {"weak": [], "strong": [], "forward": []}
    real_draw, real_forward = fixmatch.draw_batches, fixmatch.WideResNet.forward
    real_loss, real_ema = fixmatch.fixmatch_loss, fixmatch.ema_update

    def weak(x, **kwargs):
        seen["weak"].append((x.clone(), kwargs["flip"]))
        return torch.full_like(x, 50)

    def strong(x, **kwargs):
        seen["strong"].append((x.clone(), kwargs["flip"]))
        return torch.full_like(x, 200)

    def draw(*args):
        seen["batches"] = real_draw(*args)
        return seen["batches"]

    def forward(self, x):
        out = real_forward(self, x)
        if self.training:
            seen["forward"].append((x.detach().clone(), out.detach().clone()))
        return out

    def loss(*args, **kwargs):
        seen["loss"] = inspect.signature(real_loss).bind(*args, **kwargs).arguments
        return real_loss(*args, **kwargs)

    def ema_update(ema, model, decay):
        seen["ema"] = (ema, model, decay)
        return real_ema(ema, model, decay)

    monkeypatch.setattr(common, "weak_augment", weak)
    monkeypatch.setattr(common, "strong_augment", strong)
    monkeypatch.setattr(fixmatch, "draw_batches", draw)
    monkeypatch.setattr(fixmatch.WideResNet, "forward", forward)
    monkeypatch.setattr(fixmatch, "fixmatch_loss", loss)
    monkeypatch.setattr(fixmatch, "ema_update", ema_update)
    argv = TINY + ["--steps", "1", "--no-flip"]
    argv += ["--threshold", "0.6", "--lambda-u", "2", "--ema-decay", "0.75"]
    fixmatch.main(argv + ["--out-dir", str(tmp_path / "run")])

    x, targets_x, u, _ = seen["batches"]
    b, mu_b = len(x), len(u)
    assert (b, mu_b) == (8, 16)
    # The weak view of the labelled and of the unlabelled batch, the strong view of the same
    # unlabelled images (not of their weak view), flips as --no-flip says.
    assert [(len(v), f) for v, f in seen["weak"]] == [(b, False), (mu_b, False)]
    assert torch.equal(seen["weak"][0][0], x) and torch.equal(seen["weak"][1][0], u)
    assert len(seen["strong"]) == 1 and torch.equal(seen["strong"][0][0], u)
    assert seen["strong"][0][1] is False
    # One forward pass over [labelled weak; unlabelled weak; unlabelled strong].
    assert len(seen["forward"]) == 1
    inputs, logits = seen["forward"][0]
    stats = common.dataset_info("shapes").mean, common.dataset_info("shapes").std
    grey = {
        v: common.normalize(torch.full((1, 3, 8, 8), v, dtype=torch.uint8), *stats)
        for v in (50, 200)
    }
    assert inputs.shape[0] == b + 2 * mu_b
    assert torch.equal(inputs[: b + mu_b], grey[50].expand(b + mu_b, -1, -1, -1))
    assert torch.equal(inputs[b + mu_b :], grey[200].expand(mu_b, -1, -1, -1))
    # The loss: pseudo-labels from the weak rows, its unlabelled term on the strong rows.
    used = seen["loss"]
    assert torch.equal(used["logits_x"].detach(), logits[:b])
    assert torch.equal(used["targets_x"], targets_x)
    assert torch.equal(used["logits_weak"].detach(), logits[b : b + mu_b])
    assert torch.equal(used["logits_strong"].detach(), logits[b + mu_b :])
    assert (used["threshold"], used["lambda_u"]) == (0.6, 2.0)
    ema, model, decay = seen["ema"]
    assert ema is not model and decay == 0.75


def test_a_checkpoint_is_due_at_every_evaluation_and_on_the_clock(tmp_path, monkeypatch):
    saved = []
    real_save = common.save_checkpoint

    def save(path, state):
        saved.append(state["step"])
        real_save(path, state)

    monkeypatch.setattr(common, "save_checkpoint", save)
    monkeypatch.setattr(common, "CHECKPOINT_SECONDS", 0.0)  # every step is past the interval
    argv = TINY + ["--steps", "3", "--eval-every", "10", "--out-dir", str(tmp_path / "run")]
    result = fixmatch.main(argv)
    assert saved == [1, 2, 3] and result["acc_evals"] == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--num-labeled", "6000"], "exceeds the 5000 training images"),
        (["--num-labeled", "45"], "multiple of the 10 classes.*--num-labeled 40"),
        (["--depth", "27"], "6 n \\+ 4"),
        (["--dataset", "imagefolder", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
    ],
)
def test_bad_input_is_a_clear_message_before_training(tmp_path, argv, message):
    base = ["--dataset", "shapes", "--out-dir", str(tmp_path / "run"), "--steps", "2"]
    with pytest.raises(SystemExit, match=message):
        fixmatch.main(base + argv)
    assert not (tmp_path / "run").exists(), "nothing is written before the input is checked"


@pytest.mark.parametrize(
    "argv,error",
    [
        (["--num-labeled", "-10"], None),  # trained on 4,990 labels
        (["--num-labeled", "0"], None),
        (["--batch-size", "0"], None),  # NaN losses
        (["--batch-size", "-4"], None),
        (["--mu", "0"], None),
        (["--threshold", "1.5"], None),  # no pseudo-label ever: supervised only, without a word
        (["--steps", "0"], None),
        (["--steps", "-5"], None),
        (["--eval-every", "0"], None),
        (["--log-every", "0"], None),
        (["--image-size", "0"], None),  # was silently 32
        (["--ema-decay", "1.0"], None),  # the untrained network evaluated
        (["--dataset", "cifar11"], "argument --dataset: 'cifar11' is not a known classification"),
    ],
)
def test_the_command_line_refuses_values_outside_their_range(tmp_path, capsys, argv, error):
    with pytest.raises(SystemExit) as stop:
        fixmatch.main(["--dataset", "shapes", "--out-dir", str(tmp_path / "run")] + argv)
    assert stop.value.code == 2
    assert (error or f"argument {argv[0]}: {argv[1]} is out of range") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fixmatch_learns_from_its_pseudo_labels_on_shapes(tmp_path):
    # 25 labels per class (250, as the paper's middle CIFAR-10 setting), the shapes defaults
    # (WRN-10-1, 1200 steps) at 16 px, seed 0: 40-110 s a run on 2 CPU cores. Measured on
    # 2026-12-02 (the official RandAugment, a fresh torch 2.14.1 environment), final EMA
    # accuracy, FixMatch vs --lambda-u 0, seeds 0 / 1 / 2:
    #   --threads 1: 0.891 vs 0.887, 0.907 vs 0.901, 0.896 vs 0.880 (+0.4, +0.6, +1.6 points)
    #   --threads 2: 0.894 vs 0.890, 0.899 vs 0.891, 0.888 vs 0.889 (+0.4, +0.8, -0.1)
    # The supervised twin already reaches 0.88-0.90, so at this budget FixMatch's gain is within
    # its seed spread (2,400 steps, seed 0: +2.4 with one thread, +0.9 with two). What holds at
    # every seed and thread count: the unlabelled term works, with 69-83% of the unlabelled
    # images above the threshold by the end and their pseudo-labels 93-96% right, and FixMatch
    # ends at worst 0.1 point under its twin (the test allows 0.5). An earlier version of this
    # test asserted a gain of a point, from runs before the official RandAugment (0.919 vs 0.853
    # at seed 0); here that gain is not there (README, FixMatch: Results).
    argv = [
        "--dataset",
        "shapes",
        "--image-size",
        "16",
        "--num-labeled",
        "250",
        "--seed",
        "0",
        "--device",
        "cpu",
    ]
    fixmatch_run = fixmatch.main(argv + ["--out-dir", str(tmp_path / "fixmatch")])
    supervised = fixmatch.main(
        argv + ["--out-dir", str(tmp_path / "supervised"), "--lambda-u", "0"]
    )
    # The baseline learns too: the comparison is not against chance.
    assert supervised["acc_last"] > 0.6
    assert fixmatch_run["acc_last"] >= supervised["acc_last"] - 0.005
    last = [json.loads(line) for line in (tmp_path / "fixmatch" / "log.jsonl").open()]
    last = [r for r in last if "train/mask" in r][-1]
    assert last["train/mask"] > 0.5, "most unlabelled images pass the threshold by the end"
    assert last["diag/pseudo_acc"] > 0.85, "and their pseudo-labels are mostly right"


def test_predict_classifies_a_folder_as_the_evaluation_does(tmp_path, new_images, capsys):
    run = tmp_path / "run"
    fixmatch.main(TINY + ["--steps", "2", "--eval-every", "2", "--out-dir", str(run)])
    images, _ = common.make_shapes(6, seed=3, size=16)  # twice the run's size: resized to 8
    folder, paths = new_images(images)
    summary = fixmatch.main(["--predict", str(folder), "--out-dir", str(run), "--device", "cpu"])
    log = capsys.readouterr().out
    assert "broken.png: not a readable image" in log and "notes.txt" in log
    rows = (run / "predictions" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,prediction,name,confidence" and len(rows) == 1 + len(paths)
    assert [row.split(",")[0] for row in rows[1:]] == paths
    assert summary["images"] == 6 and (run / "predictions" / "predictions.png").exists()
    # the same EMA model, images and preprocessing as the run's own evaluation
    ema = fixmatch.WideResNet(10, 10, 1, 0.001)
    ema.load_state_dict(common.load_checkpoint(run / "checkpoint.pt")["ema"])
    read = torch.stack([common._read_image(folder / path, 8) for path in paths])
    info = common.dataset_info("shapes")
    _, preds, confidence = fixmatch.evaluate(ema, read, torch.zeros(6), (info.mean, info.std))
    names = json.loads((run / "results.json").read_text())["classes"]
    for row, p, c in zip(rows[1:], preds.tolist(), confidence.tolist(), strict=True):
        _, predicted, name, conf = row.split(",")
        assert (
            int(predicted) == p and name == names[p] and float(conf) == pytest.approx(c, abs=1e-4)
        )
    with pytest.raises(SystemExit, match="already holds predictions: pass --overwrite"):
        fixmatch.main(["--predict", str(folder), "--out-dir", str(run), "--device", "cpu"])
    fixmatch.main(
        ["--predict", str(folder), "--out-dir", str(run), "--overwrite", "--device", "cpu"]
    )
    with pytest.raises(SystemExit, match="holds no results.json"):
        fixmatch.main(["--predict", str(folder), "--out-dir", str(tmp_path / "none")])


@pytest.mark.slow  # three launches of two processes: about 40 s on two cores
def test_two_processes_train_one_model_write_once_and_resume(tmp_path, torchrun):
    argv = SMOKE + ["--seed", "1"]
    torchrun("fixmatch.py", argv + ["--out-dir", tmp_path / "a"], record=tmp_path / "two.pt")
    a = tmp_path / "a"
    results = json.loads((a / "results.json").read_text())
    # Both processes ended with the same EMA model, the one rank 0 saved.
    checksums = results["weights_checksum"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    saved = common.load_checkpoint(a / "checkpoint.pt")
    assert checksums[0] == pytest.approx(torchrun.checksum(saved["ema"]), rel=1e-12)
    assert len(saved["augment_rng"]) == 2, "each process's augmentation stream is kept"
    # One writer: one log, its lines once each (steps 2, 3, 4, 6 and the evaluations at 3, 6).
    assert [r["step"] for r in _log(a)] == [2, 3, 4, 6, 6]
    assert math.isfinite(results["acc"]) and 0 <= results["acc"] <= 1

    # The same global batches as one process: every step's labelled and unlabelled indices,
    # gathered from the two processes' shares, are those that one process draws alone.
    torchrun("fixmatch.py", argv + ["--out-dir", tmp_path / "one"], 1, record=tmp_path / "one.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert len(one) == len(two) == 12  # 6 steps, a labelled and an unlabelled batch each
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))

    # Stopped after its first checkpoint (step 3) and resumed under two processes, the run ends
    # with the uninterrupted run's figures and weights.
    resumed = torchrun.resumed_after_stop("fixmatch.py", argv, tmp_path / "b", step=3)
    assert resumed["acc"] == results["acc"]
    assert resumed["weights_checksum"] == checksums
    assert _log(tmp_path / "b") == _log(a)


def test_a_global_batch_that_does_not_split_among_the_processes_is_refused(monkeypatch):
    monkeypatch.setattr(common, "world_size", lambda: 3)
    with pytest.raises(common.ConfigError, match="--batch-size 8 .* multiple of 3"):
        common.check_batches({"--batch-size": 8})
    common.check_batches({"--batch-size": 9})


def test_a_memory_mapped_folder_trains_to_the_figures_of_one_in_memory(
    tmp_path, shapes_folder, capsys
):
    folder = shapes_folder(60, 20, 16)
    argv = ["--dataset", "imagefolder", "--data-dir", folder, "--image-size", "16"]
    argv += SMOKE[2:] + ["--device", "cpu"]
    argv = [str(a) for a in argv]
    mapped = fixmatch.main(argv + ["--memmap", "on", "--out-dir", str(tmp_path / "on")])
    said = capsys.readouterr().out
    assert "data unlabelled: " in said and "kept on the CPU, batches gathered from it" in said
    in_memory = fixmatch.main(argv + ["--memmap", "off", "--out-dir", str(tmp_path / "off")])
    assert mapped["acc"] == in_memory["acc"] and mapped["acc_last"] == in_memory["acc_last"]
    assert mapped["weights_checksum"] == in_memory["weights_checksum"]
    assert _log(tmp_path / "on") == _log(tmp_path / "off")


@pytest.mark.slow  # about 6 minutes on two idle cores: a whole shapes run in one and two processes
def test_two_processes_end_near_one_process_with_the_same_global_batch(tmp_path, torchrun):
    # Two processes see the same images at every step as one (the test above), but not the same
    # computation: batch norm normalises each process's half of the batch, and the second
    # process augments from its own stream. Measured with the shapes defaults (1,200 steps of
    # batch 32, mu 2; one process with --threads 1, two with one thread each), 2026-12-02:
    # seed 0: 0.863 alone, 0.885 in two; seed 1: 0.918 and 0.935; seed 2: 0.896 and 0.898. The
    # gap (at most 2.2 points) is within the spread of seeds (5.5 points alone); the bound, 5
    # points, leaves a little more than twice it.
    argv = ["--dataset", "shapes", "--device", "cpu", "--seed", "0"]
    two = torchrun("fixmatch.py", argv + ["--out-dir", tmp_path / "two"])
    assert two.returncode == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = fixmatch.main(argv + ["--threads", "1", "--out-dir", str(tmp_path / "one")])
    assert abs(two["acc"] - one["acc"]) <= 0.05
    assert two["acc"] > 0.8 and one["acc"] > 0.8  # both learned: the comparison means something
