"""spice.py: the pieces of the three stages on constructed inputs with known answers (the
official strong views, head selection over all epochs, the stuck-head diagnostics, the capped
neighbours), a smoke run of every stage (alone, from the previous stage's file, and resumed),
bad input, and a learning test of stage 2 against k-means on a real MoCo embedding. SPICE-Semi
beating SPICE-Self at every seed is still to be found (README, SPICE: Results)."""

import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import spice


def figures(results: dict) -> dict:
    """The results without the timing, which differs from run to run."""
    return {k: v for k, v in results.items() if k not in ("seconds", "images_per_second")}


def unit(degrees):
    """Unit vectors in the plane at the given angles."""
    a = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_prototypes_and_pseudo_labels_on_a_constructed_example():
    # Images 0-2 lie near 0 degrees, 3-5 near 90, image 6 half-way, image 7 opposite both.
    embedding = unit([0, 10, 20, 90, 80, 70, 45, 225])
    p0 = torch.tensor([0.9, 0.8, 0.3, 0.1, 0.2, 0.35, 0.5, 0.4])
    # the head is most sure of 0, 1 (cluster 0) and 3, 4 (cluster 1)
    probs = torch.stack([p0, 1 - p0], 1)
    idx, labels = spice.prototype_pseudo_labels(probs, embedding)
    # N / K = 4 per cluster; prototypes from the top 0.5 N / K = 2: mean of images 0, 1 (at 5
    # degrees) and of 3, 4 (at 85); each prototype's 4 nearest images get its label, image 6 is
    # among both.
    assert len(idx) == len(labels) == 8
    assert sorted(idx[labels == 0].tolist()) == [0, 1, 2, 6]
    assert sorted(idx[labels == 1].tolist()) == [3, 4, 5, 6]
    assert labels.tolist() == [0] * 4 + [1] * 4
    # image 2 is far from the head's confident set of cluster 0 in P but near its prototype: it is
    # labelled by similarity, not by its own prediction (its argmax is cluster 1)
    assert probs[2].argmax() == 1


def test_prototypes_are_means_of_the_top_ranked_embeddings_per_column():
    g = torch.Generator().manual_seed(0)
    embedding = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    probs = torch.softmax(torch.randn(40, 4, generator=g), 1)
    idx, labels = spice.prototype_pseudo_labels(probs, embedding)
    for c in range(4):
        top = probs[:, c].argsort(descending=True)[:5]  # 0.5 x 40 / 4
        prototype = embedding[top].mean(0)
        expected = (embedding @ prototype).argsort(descending=True)[:10]
        assert sorted(idx[labels == c].tolist()) == sorted(expected.tolist())


def test_head_loss_is_cross_entropy_on_the_softmax_outputs_by_default():
    logits, y = torch.tensor([[4.0, 0.0, -1.0], [0.5, 0.2, 3.0]]), torch.tensor([0, 1])
    p = logits.softmax(1)
    expected = -(p[[0, 1], y] - p.exp().sum(1).log()).mean()  # cross-entropy of softmax(p)
    assert spice.head_loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert spice.head_loss(logits, y, double_softmax=False).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6
    )


def test_head_selection_picks_the_head_with_the_lowest_loss():
    g = torch.Generator().manual_seed(1)
    clusters = torch.arange(60) % 3
    embedding = F.normalize(
        F.one_hot(clusters, 5).float() + 0.1 * torch.randn(60, 5, generator=g), dim=1
    )
    logits = torch.stack(
        [
            torch.randn(60, 3, generator=g),  # a random head
            8.0 * F.one_hot(clusters, 3).float(),  # a head that agrees with the embedding
            torch.zeros(60, 3),  # an undecided head
        ]
    )
    best, losses = spice.select_head(logits, embedding)
    # each loss is the head's loss on its own prototype labels over the whole split
    for h in range(3):
        idx, labels = spice.prototype_pseudo_labels(logits[h].softmax(-1), embedding)
        assert losses[h].item() == pytest.approx(
            spice.head_loss(logits[h][idx], labels).item(), rel=1e-6
        )
    assert best == 1 == int(losses.argmin())
    # the selection follows the loss, whatever the head's position
    best, _ = spice.select_head(logits[[2, 0, 1]], embedding)
    assert best == 2


def test_chunked_knn_equals_the_dense_computation():
    g = torch.Generator().manual_seed(2)
    embedding = F.normalize(torch.randn(103, 8, generator=g), dim=1)
    dense = (embedding @ embedding.T).topk(10, dim=1).indices
    chunked = spice.knn_indices(embedding, k=10, chunk=16)
    assert torch.equal(chunked, dense)
    assert torch.equal(chunked[:, 0], torch.arange(103)), "each image is its own nearest neighbour"


def test_reliable_samples_keep_exactly_the_agreeing_confident_ones():
    preds = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    confidence = torch.tensor([0.99, 0.995, 0.999, 0.999, 0.999, 0.999, 0.995, 0.999])
    neighbours = torch.tensor(
        [
            [0, 1, 2, 3],
            [1, 0, 2, 4],
            [2, 0, 1, 3],
            [3, 4, 5, 6],
            [4, 5, 6, 7],
            [5, 4, 6, 7],
            [6, 4, 5, 0],
            [7, 0, 1, 2],
        ]
    )
    # agreement: 4, 3, 4, 1 | 4, 4, 3, 1 of 4; image 0 fails the confidence (not above 0.99)
    kept = spice.reliable_samples(
        preds,
        confidence,
        neighbours,
        2,
        ratio=0.75,
        threshold=0.99,
        generator=torch.Generator().manual_seed(0),
    )
    # reliable: 1, 2 in cluster 0 and 4, 5, 6 in cluster 1; balanced to 2 per cluster
    assert sorted(kept[:2].tolist()) == [1, 2]
    assert len(kept) == 4 and set(kept[2:].tolist()) < {4, 5, 6}
    # ratio 1 keeps only full agreement: 2 | 4, 5 -> 1 per cluster
    kept = spice.reliable_samples(preds, confidence, neighbours, 2, ratio=1.0, threshold=0.99)
    assert kept[0].item() == 2 and kept[1].item() in (4, 5) and len(kept) == 2


def test_reliable_samples_need_the_ratio_rounded_up():
    # each image agrees with 2 of its 4 neighbours (itself included)
    preds = torch.tensor([0, 0, 1, 1])
    neighbours = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3], [2, 3, 0, 1], [3, 2, 1, 0]])
    kept = spice.reliable_samples(preds, torch.ones(4), neighbours, 2, ratio=0.5, threshold=0.5)
    assert sorted(kept.tolist()) == [0, 1, 2, 3], "2 of 4 is a ratio of 0.5"
    with pytest.raises(common.ConfigError, match="no reliable image"):  # 0.6 x 4: 3 must agree
        spice.reliable_samples(preds, torch.ones(4), neighbours, 2, ratio=0.6, threshold=0.5)


def test_reliable_samples_stop_clearly_on_an_empty_cluster():
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    # the neighbours of each image; cluster 1 disagrees
    neighbours = torch.tensor([[0, 1], [1, 0], [2, 0], [3, 1], [4, 5], [5, 4]])
    with pytest.raises(
        spice.common.ConfigError, match=r"cluster\(s\) \[1\].*--consistency-ratio.*--confidence"
    ):
        spice.reliable_samples(preds, torch.ones(6), neighbours, 3, ratio=1.0, threshold=0.5)


def three_clusters(sizes, dim=8, noise=0.05, seed=0):
    """L2-normalised points around the first axes, sizes[c] around axis c: (embedding, labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((size,), c) for c, size in enumerate(sizes)])
    points = F.one_hot(labels, dim).float() + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(points, dim=1), labels


def test_neighbours_are_capped_so_a_small_cluster_can_still_be_reliable():
    assert spice.neighbour_count(100, 50_000, 10) == 100, "CIFAR-10 keeps the paper's k"
    assert spice.neighbour_count(100, 5_000, 10) == 50, "a tenth of the expected cluster size"
    assert spice.neighbour_count(100, 20, 10) == 1
    # clusters of 300, 300 and 40 images, predicted perfectly and confidently
    embedding, labels = three_clusters([300, 300, 40])
    confidence = torch.ones(len(labels))
    wide = spice.knn_indices(embedding, k=100)
    with pytest.raises(common.ConfigError, match=r"cluster\(s\) \[2\] \(predicted sizes \[40\]"):
        spice.reliable_samples(labels, confidence, wide, 3, ratio=0.9, threshold=0.5)
    k = spice.neighbour_count(100, len(labels), 3)
    assert k == 21, "0.1 x 640 / 3"
    capped = spice.knn_indices(embedding, k=k)
    passed = spice.reliable_mask(labels, confidence, capped, ratio=0.9, threshold=0.5)
    assert torch.bincount(labels[passed]).tolist() == [300, 300, 40], "all agree: all pass"
    kept = spice.reliable_samples(labels, confidence, capped, 3, ratio=0.9, threshold=0.5)
    assert torch.bincount(labels[kept]).tolist() == [40, 40, 40], "balanced to the smallest"


def test_head_diagnostics_report_two_prototypes_on_one_cluster():
    embedding, labels = three_clusters([20, 20, 20])
    healthy = F.one_hot(labels, 3).float() * 0.9 + 0.05
    # the stuck state: columns 0 and 1 both on cluster 0 (its images at 0.501 / 0.499), cluster 1
    # orphaned and absorbed with cluster 2 by column 2
    stuck = torch.zeros(60, 3)
    stuck[labels == 0] = torch.tensor([0.501, 0.499, 0.0])
    stuck[labels != 0] = torch.tensor([0.002, 0.002, 0.996])
    stuck[labels == 2, 2] += 0.001  # cluster 2's images a little more typical of column 2
    for probs, stuck_head in ((healthy, False), (stuck, True)):
        picked, _ = spice.prototype_pseudo_labels(probs, embedding)
        report = spice.head_diagnostics(probs, embedding, picked)
        if stuck_head:
            assert report["distinct"] < 0.7, "images picked by two prototypes, labelled twice"
            assert report["prototype_cos_max"] > 0.99
            assert report["cluster_share_max"] == pytest.approx(2 / 3)
            assert report["cluster_share_min"] == 0.0
        else:
            assert report["distinct"] == 1.0 and report["prototype_cos_max"] < 0.5
            assert (
                report["cluster_share_min"] == report["cluster_share_max"] == pytest.approx(1 / 3)
            )


def test_spice_self_makes_about_the_official_number_of_draws_unless_told():
    args = spice.Args()
    assert spice.self_schedule(50_000, args) == (5000, 10, 30), "the official CIFAR-10 schedule"
    assert spice.self_schedule(5_000, spice.Args(self_batch=1000)) == (1000, 5, 60)
    assert spice.self_schedule(3_000, args) == (3000, 1, 300), "N capped at the images"
    assert spice.self_schedule(1_000_000, args) == (5000, 200, 30), "never under the official 30"
    assert spice.self_schedule(5_000, spice.Args(self_batch=1000, self_epochs=4))[2] == 4


def test_moco_queue_wraps_around():
    queue = spice.MocoQueue(6, 2)
    a, b = torch.arange(8.0).view(4, 2), -torch.arange(1, 9.0).view(4, 2)
    queue.enqueue(a)
    assert torch.equal(queue.keys[:4], a) and queue.ptr == 4
    queue.enqueue(b)  # the oldest entries (a[0], a[1]) are overwritten after the end wraps
    assert torch.equal(queue.keys[4:], b[:2]) and torch.equal(queue.keys[:2], b[2:])
    assert torch.equal(queue.keys[2:4], a[2:]) and queue.ptr == 2


def test_moco_loss_on_a_constructed_example():
    q = torch.eye(4)[:2]
    queue = torch.eye(4)[2:].repeat(3, 1)  # 6 keys orthogonal to both queries
    loss, acc = spice.moco_loss(q, q.clone(), queue, temperature=0.2)
    assert loss.item() == pytest.approx(-math.log(math.exp(5) / (math.exp(5) + 6)), rel=1e-5)
    assert acc.item() == 1.0
    # the positive is the query's own key, the negatives are the queue scored by the query
    k = F.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]), dim=1)
    loss, _ = spice.moco_loss(q, k, queue, temperature=0.5)
    expected = -math.log(math.exp(2**-0.5 / 0.5) / (math.exp(2**-0.5 / 0.5) + 6))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a queued key beats the positive
    loss, acc = spice.moco_loss(q, -q, torch.cat([q, queue]), temperature=0.2)
    assert acc.item() == 0.0


def test_momentum_update_moves_parameters_only():
    q, k = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        q.weight.fill_(2.0)
        k.weight.fill_(1.0)
        k.running_mean.fill_(5.0)
    spice.momentum_update(k, q, momentum=0.9)
    assert torch.allclose(k.weight, torch.full((3,), 1.1))
    assert torch.equal(k.running_mean, torch.full((3,), 5.0)), (
        "the key encoder keeps its own statistics"
    )


def test_shuffled_key_forward_restores_the_order_and_normalises_per_group():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(3))
    linear = nn.Linear(3, 2)  # a per-sample network: the output must be row for row the plain one
    assert torch.allclose(
        spice.shuffled_key_forward(linear, x, 3, torch.Generator().manual_seed(0)), linear(x)
    )
    bn = nn.BatchNorm1d(3, affine=False).train()
    out = spice.shuffled_key_forward(bn, x, 3, torch.Generator().manual_seed(0))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))  # the same shuffle
    # each group of 4 shuffled images is normalised by its own statistics
    for group in perm.chunk(3):
        assert torch.allclose(out[group].mean(0), torch.zeros(3), atol=1e-5)
    assert not torch.allclose(out, bn(x), atol=1e-3), "not the statistics of the whole batch"


TINY = [
    "--dataset",
    "shapes",
    "--image-size",
    "8",
    "--backbone-width",
    "4",
    "--moco-epochs",
    "2",
    "--batch-size",
    "256",
    "--self-epochs",
    "1",
    "--num-heads",
    "2",
    "--num-clusters",
    "3",
    "--semi-steps",
    "6",
    "--semi-mu",
    "1",
    "--semi-batch-size",
    "16",
    "--eval-every",
    "3",
    "--consistency-ratio",
    "0.5",
    "--confidence",
    "0.0",
    "--device",
    "cpu",
]


def without_perf(out_dir) -> list:
    """The run's log.jsonl without the timing entries, which differ from run to run."""
    lines = (json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in lines]


def test_smoke_every_stage_alone_and_resumed(tmp_path, monkeypatch):
    saved = []  # (file, stage, epoch or step) of every checkpoint and hand-over file written
    real_save = common.save_checkpoint

    def recording_save(path, state):
        saved.append((path.name, state["stage"], state.get("epoch", state.get("step"))))
        real_save(path, state)

    monkeypatch.setattr(common, "save_checkpoint", recording_save)
    results = spice.main(TINY + ["--out-dir", str(tmp_path / "all")])
    for name in (
        "moco.pt",
        "self.pt",
        "checkpoint.pt",
        "results.json",
        "args.json",
        "log.jsonl",
        "self_clusters.png",
        "clusters.png",
    ):
        assert (tmp_path / "all" / name).exists(), name
    keys = {
        "kmeans_acc",
        "self_acc",
        "self_nmi",
        "self_ari",
        "acc",
        "nmi",
        "ari",
        "num_reliable",
        "seconds",
        "images_per_second",
    }
    assert (
        keys <= set(results)
        and json.loads((tmp_path / "all" / "results.json").read_text()) == results
    )
    assert all(0 <= results[k] <= 1 for k in keys if k.endswith(("acc", "nmi")))
    assert all(-1 <= results[k] <= 1 for k in keys if k.endswith("ari"))
    # A checkpoint after every evaluation (each SPICE-Self epoch's head selection, every
    # --eval-every 3 SPICE-Semi steps); MoCo, within the 10 minutes, at its last epoch only.
    assert saved == [
        ("checkpoint.pt", "moco", 2),
        ("moco.pt", "moco", None),
        ("checkpoint.pt", "self", 1),
        ("self.pt", "self", None),
        ("checkpoint.pt", "semi", 3),
        ("checkpoint.pt", "semi", 6),
    ]
    # Stage 2 alone from stage 1's file, then stage 3 alone from stage 2's: the same figures.
    alone = spice.main(
        TINY
        + [
            "--stage",
            "self",
            "--init-from",
            str(tmp_path / "all" / "moco.pt"),
            "--out-dir",
            str(tmp_path / "self"),
        ]
    )
    assert {k: alone[k] for k in ("kmeans_acc", "self_acc", "self_nmi")} == {
        k: results[k] for k in ("kmeans_acc", "self_acc", "self_nmi")
    } and "acc" not in alone
    alone = spice.main(
        TINY
        + [
            "--stage",
            "semi",
            "--init-from",
            str(tmp_path / "self"),
            "--out-dir",
            str(tmp_path / "semi"),
        ]
    )
    assert figures(alone) == figures(results)
    # A run stopped (as by Ctrl-C) in stage 2, after a log line that no checkpoint kept: MoCo's
    # checkpoint and moco.pt are on disk, SPICE-Self's third draw was logged.
    resumed = tmp_path / "resumed"
    real_log, draws = common.RunBook.log, []

    def log_then_stop(book, step, metrics):
        record = real_log(book, step, metrics)
        if "self/loss" in metrics:
            draws.append(step)
            if len(draws) == 3:
                raise KeyboardInterrupt
        return record

    with monkeypatch.context() as patch:
        patch.setattr(common.RunBook, "log", log_then_stop)
        with pytest.raises(SystemExit) as stop:
            spice.main(TINY + ["--out-dir", str(resumed)])
    assert stop.value.code == 130
    assert (resumed / "moco.pt").exists() and not (resumed / "self.pt").exists()
    logged = len(without_perf(resumed))
    assert logged == 2 * 2 + 3, "two MoCo epochs and their kNN diagnostics, three SPICE-Self draws"
    # Resumed with another flag that decides the result: refused, the run's arguments unchanged.
    before = (resumed / "args.json").read_bytes()
    with pytest.raises(SystemExit, match=r"--self-epochs 1 \(now 2\)"):
        spice.main(TINY + ["--out-dir", str(resumed), "--resume", "--self-epochs", "2"])
    assert (resumed / "args.json").read_bytes() == before
    # Resumed as it was: the figures of the whole run, and a log that reads as that run's.
    assert figures(spice.main(TINY + ["--out-dir", str(resumed), "--resume"])) == figures(results)
    assert without_perf(resumed) == without_perf(tmp_path / "all")
    assert (resumed / "args.json").read_bytes() == before


@pytest.mark.slow  # about 15 s: a second whole pipeline run and its resume
def test_moco_resumes_mid_stage_on_the_clock(tmp_path, monkeypatch, interrupted_run):
    # With the 10-minute clock run out at every epoch end, MoCo checkpoints each epoch: stopped
    # after the first and resumed (its queue, encoders and optimizer restored), stage 1 ends where
    # an uninterrupted stage 1 does.
    monkeypatch.setattr(common, "CHECKPOINT_SECONDS", 0)
    moco = TINY + ["--stage", "moco"]
    whole = spice.main(moco + ["--out-dir", str(tmp_path / "whole")])
    interrupted_run(spice.main, moco + ["--out-dir", str(tmp_path / "resumed")])
    saved = common.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert saved["stage"] == "moco" and saved["epoch"] == 1
    assert figures(spice.main(moco + ["--out-dir", str(tmp_path / "resumed"), "--resume"])) == (
        figures(whole)
    )
    assert without_perf(tmp_path / "resumed") == without_perf(tmp_path / "whole")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stage", "semi"], "--init-from goes with"),
        (["--stage", "all", "--init-from", "x.pt"], "--init-from goes with"),
        (["--num-clusters", "6000", "--self-batch", "10000"], "--num-clusters 6000: need 2 to "),
        (["--semi-depth", "27"], "--semi-depth 27"),
        (["--stage", "semi", "--init-from", "missing-folder"], "no self.pt there"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        spice.main(TINY + ["--out-dir", str(tmp_path / "run")] + extra)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--num-heads", "0"),
        ("--batch-size", "0"),
        ("--self-batch", "-4"),
        ("--semi-batch-size", "0"),
        ("--moco-epochs", "0"),
        ("--self-epochs", "-1"),
        ("--semi-steps", "0"),
        ("--moco-lr", "0.0"),
        ("--self-lr", "-0.005"),
        ("--semi-lr", "0.0"),
        ("--eval-every", "0"),
        ("--log-every", "0"),
        ("--image-size", "0"),
        ("--num-clusters", "1"),
        ("--confidence", "1.0"),
    ],
)
def test_a_value_outside_its_range_is_refused_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        spice.main(TINY + ["--out-dir", str(tmp_path / "run"), flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: {value} is out of range: must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_damaged_hand_over_file_is_named(tmp_path):
    damaged = tmp_path / "moco.pt"
    damaged.write_bytes(b"PK\x03\x04 half a zip archive")
    argv = ["--stage", "self", "--init-from", str(damaged), "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=re.escape(f"{damaged} cannot be read as a checkpoint")):
        spice.main(TINY + argv)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # about 11 s: two runs of all three stages
def test_a_run_whose_stage_3_cannot_run_keeps_what_stages_1_and_2_measured(tmp_path, capsys):
    # --confidence 0.9999: a head trained for one epoch is that sure of too few images, so stage 3
    # finds a cluster without reliable images. The run ends with the message (status 1: not a
    # result), but the k-means and SPICE-Self figures are printed and written, with the stage that
    # stopped and why.
    run = tmp_path / "run"
    argv = TINY + ["--out-dir", str(run), "--confidence", "0.9999"]
    with pytest.raises(SystemExit) as stop:
        spice.main(argv)
    message = str(stop.value.code)
    assert re.match(r"spice.py: error: no reliable image in cluster\(s\) \[[\d, ]+\]", message)
    written = json.loads((run / "results.json").read_text())
    assert written["stopped_at"] == "semi"
    because = written["stopped_because"]
    assert message == f"spice.py: error: {because} (the figures so far: {run / 'results.json'})"
    assert {"kmeans_acc", "self_acc", "self_nmi", "self_ari", "selected_head"} <= set(written)
    assert "acc" not in written and "num_reliable" not in written
    handed_over = common.load_checkpoint(run / "self.pt")["results"]
    assert {k: written[k] for k in handed_over} == handed_over
    out = capsys.readouterr().out
    assert f"results: kmeans_acc={written['kmeans_acc']:.4g}" in out
    assert f"self_acc={written['self_acc']:.4g}" in out and "stopped_at=semi" in out
    # Resumed with flags that only change how it is watched: accepted, and it stops the same way.
    with pytest.raises(SystemExit, match=re.escape(written["stopped_because"])):
        spice.main(argv + ["--resume", "--eval-every", "2", "--log-every", "1"])
    assert figures(json.loads((run / "results.json").read_text())) == figures(written)
    # Its checkpoint cut to half its size: --resume names the file, and nothing is written.
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(SystemExit, match=re.escape(f"{checkpoint} cannot be read as a checkpoint")):
        spice.main(argv + ["--resume"])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("flag, value", [("--protocol", "both"), ("--stage", "semi-only")])
def test_a_value_outside_the_choices_is_refused_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        spice.main(TINY + ["--out-dir", str(tmp_path / "run"), flag, value])
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # about 8 s: trains the stages it hands over
def test_a_hand_over_from_another_stage_or_setting_is_refused(tmp_path):
    spice.main(TINY + ["--stage", "moco", "--out-dir", str(tmp_path / "moco")])
    with pytest.raises(SystemExit, match="needs self.pt"):
        spice.main(
            TINY
            + [
                "--stage",
                "semi",
                "--init-from",
                str(tmp_path / "moco" / "moco.pt"),
                "--out-dir",
                str(tmp_path / "a"),
            ]
        )
    with pytest.raises(SystemExit, match="--backbone-width 4"):
        spice.main(
            TINY
            + [
                "--stage",
                "self",
                "--init-from",
                str(tmp_path / "moco"),
                "--backbone-width",
                "8",
                "--out-dir",
                str(tmp_path / "b"),
            ]
        )


def test_kmeans_baseline_embeds_the_evaluated_split_as_the_clustered_one():
    # Under --protocol split the test images are embedded apart from the training images; they
    # must be normalised the same way (L2), or k-means assigns them by another geometry. With the
    # test split a copy of the training split, the figures must equal those on the split itself:
    # an L1-normalised test embedding (a bug here until 2026-12) scored ACC 0.173 against 0.190.
    images, labels = common.make_shapes(300, seed=0, size=16)
    info = common.dataset_info("shapes")
    torch.manual_seed(0)
    backbone = spice.ResNet18(4)
    args = spice.Args(dataset="shapes", num_clusters=10, seed=0)
    run = spice.Run(None, torch.device("cpu"), (info.mean, info.std), False, 10)
    itself = spice.Data(images, labels, images, labels, images, 10)
    copy = spice.Data(images, labels, images.clone(), labels.clone(), images, 10)
    assert spice.kmeans_baseline(args, run, backbone, copy) == spice.kmeans_baseline(
        args, run, backbone, itself
    )


def test_kmeans_baseline_is_fit_on_the_training_split(monkeypatch):
    images, labels = common.make_shapes(60, seed=0, size=8)
    info = common.dataset_info("shapes")
    backbone = spice.ResNet18(2)
    args = spice.Args(dataset="shapes", num_clusters=3, seed=0)
    run = spice.Run(None, torch.device("cpu"), (info.mean, info.std), False, 3)
    fitted, real_kmeans = [], common.kmeans
    monkeypatch.setattr(
        common, "kmeans", lambda x, *a, **k: fitted.append(x) or real_kmeans(x, *a, **k)
    )
    spice.kmeans_baseline(
        args, run, backbone, spice.Data(images, labels, images[:20], labels[:20], images, 10)
    )
    train = F.normalize(spice.network_outputs(backbone, images, run.stats), dim=1)
    assert len(fitted) == 1 and torch.allclose(fitted[0], train)


def test_moco_queue_starts_with_unit_keys():
    assert torch.allclose(spice.MocoQueue(5, 3).keys.norm(dim=1), torch.ones(5))


def test_head_selection_passes_the_loss_choice_on():
    g = torch.Generator().manual_seed(4)
    embedding = F.normalize(torch.randn(30, 4, generator=g), dim=1)
    logits = 3 * torch.randn(2, 30, 3, generator=g)
    _, losses = spice.select_head(logits, embedding, double_softmax=False)
    for h in range(2):
        idx, labels = spice.prototype_pseudo_labels(logits[h].softmax(-1), embedding)
        assert losses[h].item() == pytest.approx(F.cross_entropy(logits[h][idx], labels).item())


def test_train_heads_fits_each_head_to_its_own_pseudo_labels():
    torch.manual_seed(0)
    heads = spice.Heads(2, 4, 3)
    features = torch.randn(6, 4)
    targets = [
        (torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2])),
        (torch.tensor([5, 4, 3, 2, 1, 0]), torch.tensor([2, 2, 2, 0, 0, 1])),
    ]

    def own_losses():  # each head's loss on its own (index, label) pairs
        with torch.no_grad():
            return torch.stack([spice.head_loss(h(features[i]), y) for h, (i, y) in own])

    own = list(zip(heads.heads, targets, strict=True))
    before = own_losses()
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    # one pass, one mini-batch: the mean loss is each head's on its own pairs before the step
    losses = spice.train_heads(heads, optimizer, features, targets, passes=1, generator=g)
    assert torch.allclose(losses, before)
    spice.train_heads(heads, optimizer, features, targets, passes=30, generator=g)
    assert (own_losses() < before - 0.05).all(), "each head learns its own labels"


def tiny_run(tmp_path, **changes):
    """Args, a Run on the CPU writing into tmp_path, and 24 shapes images of 8 px."""
    args = spice.Args(dataset="shapes", image_size=8, num_clusters=3, log_every=1, **changes)
    info = common.dataset_info("shapes")
    book = common.RunBook(tmp_path, args)
    run = spice.Run(book, torch.device("cpu"), (info.mean, info.std), False, 3)
    images, labels = common.make_shapes(24, seed=0, size=8)
    return args, run, spice.Data(images, labels, images, labels, images, 10)


def test_moco_steps_keys_from_the_other_view_after_the_momentum_update(tmp_path, monkeypatch):
    # 24 images, 2 steps of 12, a queue of 12 keys: each step's keys replace the whole queue
    args, run, data = tiny_run(
        tmp_path, moco_epochs=1, batch_size=12, bn_groups=2, moco_queue=12, backbone_width=2
    )
    events, views = [], []

    def augment(x, generator=None):  # the first view as it is, the second mirrored
        views.append(x if len(views) % 2 == 0 else x.flip(-1))
        return views[-1]

    def spy(name, real):
        def call(*a, **k):
            # tensors as they are at the call, modules as their mode (training or not)
            seen = [t.clone() if torch.is_tensor(t) else getattr(t, "training", t) for t in a]
            events.append((name, seen))
            return real(*a, **k)

        monkeypatch.setattr(spice, name, call)

    monkeypatch.setattr(spice, "moco_augment", augment)
    for name in ("grouped_forward", "momentum_update", "shuffled_key_forward", "moco_loss"):
        spy(name, getattr(spice, name))
    real_enqueue = spice.MocoQueue.enqueue

    def enqueue(queue, keys):
        events.append(("enqueue", [keys.clone()]))
        real_enqueue(queue, keys)

    monkeypatch.setattr(spice.MocoQueue, "enqueue", enqueue)
    torch.manual_seed(args.seed)  # the queue's first keys: train_moco's draw after the network's
    spice.MoCo(args.backbone_width)
    initial = spice.MocoQueue(12, 128).keys
    spice.train_moco(args, run, data.images)
    step = ["grouped_forward", "momentum_update", "shuffled_key_forward", "grouped_forward"]
    step += ["moco_loss", "enqueue"]
    assert [e[0] for e in events] == step + step
    for s in range(2):
        queries, _, keys, _, (q, k, negatives, _), enqueued = (e[1] for e in events[6 * s :][:6])
        # the queries: the first view, in training mode, batch norm over --bn-groups groups
        assert torch.equal(queries[1], run.inputs(views[2 * s])) and queries[0] and queries[2] == 2
        assert torch.equal(keys[1], run.inputs(views[2 * s + 1])), "keys: the second view"
        assert keys[0], "the key encoder normalises by its groups' statistics (training mode)"
        # the negatives are the queue before this step: the random keys, then step 1's keys
        assert torch.equal(negatives, initial if s == 0 else events[4][1][1])
        assert torch.equal(enqueued[0], k), "the keys are queued, not the queries"
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[0]["moco/lr"] == args.moco_lr, "the first epoch at the full learning rate"


def test_a_spice_self_draw_labels_weak_views_and_trains_on_strong_ones(tmp_path, monkeypatch):
    # one epoch, one draw of all 24 images, 2 heads: step 4 scores the weak views (here mirrored),
    # step 5 builds prototypes in the embedding of the unaugmented images, step 6 trains on the
    # strong views (here inverted)
    args, run, data = tiny_run(
        tmp_path, self_epochs=1, self_batch=24, num_heads=2, self_passes=1, backbone_width=2
    )
    monkeypatch.setattr(common, "weak_augment", lambda x, generator=None: x.flip(-1))
    monkeypatch.setattr(spice, "scan_strong_augment", lambda x, mean, generator=None: 255 - x)
    seen = {"heads": [], "prototypes": [], "train": []}
    real_heads, real_labels = spice.Heads.forward, spice.prototype_pseudo_labels
    real_train = spice.train_heads

    def heads_forward(heads, features):
        seen["heads"].append((features.clone(), real_heads(heads, features).detach()))
        return seen["heads"][-1][1]

    def labels(probs, embedding):
        seen["prototypes"].append((probs, embedding))
        return real_labels(probs, embedding)

    def train(heads, optimizer, features, targets, *a):
        seen["train"].append((features, targets))
        return real_train(heads, optimizer, features, targets, *a)

    monkeypatch.setattr(spice.Heads, "forward", heads_forward)
    monkeypatch.setattr(spice, "prototype_pseudo_labels", labels)
    monkeypatch.setattr(spice, "train_heads", train)
    backbone = spice.ResNet18(2)
    spice.train_self(args, run, backbone, data)
    draw = torch.randperm(24, generator=torch.Generator().manual_seed(500_000))

    def outputs(images):  # the backbone's features, in eval mode, without augmentation
        return spice.network_outputs(backbone, images, run.stats)

    weak, strong = outputs(data.images[draw].flip(-1)), outputs(255 - data.images[draw])
    embedding = F.normalize(outputs(data.images), dim=1)
    scored, logits = seen["heads"][0]
    assert torch.allclose(scored, weak), "step 4 scores the weak views"
    for h, (probs, prototype_space) in enumerate(seen["prototypes"][:2]):
        assert torch.allclose(probs, logits[h].softmax(-1))
        assert torch.allclose(prototype_space, embedding[draw]), "prototypes: unaugmented"
    features, targets = seen["train"][0]
    assert torch.allclose(features, strong), "step 6 trains on the strong views"
    for h in range(2):
        assert all(
            torch.equal(a, b)
            for a, b in zip(targets[h], real_labels(*seen["prototypes"][h]), strict=True)
        )
    # step 7 selects on the unaugmented features of the whole split
    assert torch.allclose(seen["heads"][-1][0], outputs(data.images))


def test_a_spice_semi_step_learns_the_clusters_weak_to_strong(tmp_path, monkeypatch):
    # SPICE-Semi labels the reliable images with their clusters (never the true labels), its
    # pseudo-labels come from the weak views, its unlabelled loss from the strong ones, and the
    # evaluated model is the EMA copy
    args, run, data = tiny_run(
        tmp_path,
        semi_steps=2,
        semi_batch_size=4,
        semi_mu=2,
        semi_depth=10,
        semi_widen_factor=1,
        eval_every=2,
        backbone_width=2,
    )
    clusters = (data.labels + 1) % 3  # the clusters: not the labels
    evaluated = []  # (frozen?, the first weights) of every model predicted with

    def predict(model, images, run):
        weights = next(model.parameters()).detach().clone()
        evaluated.append((all(not p.requires_grad for p in model.parameters()), weights))
        return clusters, torch.ones(len(images))

    monkeypatch.setattr(spice, "clusters_of", predict)
    reliable = torch.tensor([0, 1, 2, 3, 4, 5])
    monkeypatch.setattr(spice, "reliable_samples", lambda *a: reliable)
    weak_inputs = []  # per step: the labelled images, then the unlabelled ones
    monkeypatch.setattr(
        common, "weak_augment", lambda x, generator=None: weak_inputs.append(x) or x
    )
    # every strong view the same grey image: the strong logits of a step are all equal
    monkeypatch.setattr(
        spice, "semi_strong_augment", lambda x, mean, generator: torch.full_like(x, 128)
    )
    calls, real_loss = [], spice.fixmatch_loss
    monkeypatch.setattr(spice, "fixmatch_loss", lambda *a: calls.append(a) or real_loss(*a))
    spice.train_semi(args, run, spice.ResNet18(2), nn.Linear(16, 3), data)
    # predicted with: the stage-2 classifier (the clusters), then the frozen EMA at each evaluation
    assert len(calls) == 2 and [e[0] for e in evaluated] == [False, True, True]
    torch.manual_seed(args.seed + 2)  # the network's initial weights, the EMA's first
    start = next(spice.WideResNet(3, 10, 1, args.semi_bn_momentum).parameters())
    assert start.shape == evaluated[1][1].shape and not torch.equal(start, evaluated[1][1])
    for step, (_, targets_x, logits_weak, logits_strong) in enumerate(calls):
        xi = spice.uniform_indices(6, 4, step, args.seed, "cpu")
        assert torch.equal(targets_x, clusters[reliable][xi])
        ui = spice.uniform_indices(24, 8, step, args.seed + 1, "cpu")
        assert torch.equal(weak_inputs[2 * step + 1], data.images[ui]), "unlabelled: every image"
        assert torch.allclose(logits_strong, logits_strong[:1].expand_as(logits_strong))
        assert not torch.allclose(logits_weak, logits_weak[:1].expand_as(logits_weak), atol=1e-4)


def test_the_strong_views_are_composed_as_the_official_ones(monkeypatch):
    calls = []  # (what, its settings) in the order the view makes them
    real_weak = common.weak_augment

    def randaugment(x, num_ops, prob, generator, variant):
        calls.append(("randaugment", (num_ops, prob, variant)))
        return x

    def cutout(x, size, random_size=False, generator=None, fill=0.5, scan_sides=False):
        calls.append(("cutout", (size, random_size, scan_sides, fill)))
        return x

    def weak_augment(x, translate=0.125, generator=None):
        calls.append(("weak", translate))
        return real_weak(x, translate=translate, generator=generator)

    monkeypatch.setattr(common, "randaugment", randaugment)
    monkeypatch.setattr(common, "cutout", cutout)
    monkeypatch.setattr(common, "weak_augment", weak_augment)
    columns = torch.arange(32, dtype=torch.uint8).expand(6, 3, 32, 32)  # each column its index
    mean = (0.5, 0.4, 0.3)
    out = spice.scan_strong_augment(columns, mean, torch.Generator().manual_seed(0))
    # SPICE-Self (SCAN): flip, RandomCrop(32) of a 32 px image (nothing), 4 ops, SCAN's Cutout
    assert calls == [
        ("weak", 0.0),
        ("randaugment", (4, 1.0, "scan")),
        ("cutout", (16, False, True, mean)),
    ]
    flipped = columns.flip(-1)
    views = zip(out, columns, flipped, strict=True)
    assert all(torch.equal(o, c) or torch.equal(o, f) for o, c, f in views), "no translation"
    calls.clear()
    spice.semi_strong_augment(columns, mean, torch.Generator().manual_seed(0))
    # SPICE-Semi: RandAugment(3) and a Cutout up to half the side before the weak transform
    assert calls == [
        ("randaugment", (3, 1.0, "spice-semi")),
        ("cutout", (16.0, True, False, mean)),
        ("weak", 0.125),
    ]


def test_the_selected_head_is_the_lowest_loss_over_all_epochs_with_its_weights_then(
    tmp_path, monkeypatch
):
    # official tools/train_self_v2.py: checkpoint_select keeps the minimum over every epoch
    args, run, data = tiny_run(
        tmp_path, self_epochs=3, self_batch=24, num_heads=2, self_passes=1, backbone_width=2
    )
    selections = iter([(0, [0.8, 0.9]), (1, [0.7, 0.5]), (0, [0.6, 0.65])])  # best: epoch 2
    weights = []  # head 1's weights at each selection

    def select_head(logits, embedding, double_softmax=True):
        weights.append({k: v.clone() for k, v in heads_seen[0].heads[1].state_dict().items()})
        chosen, losses = next(selections)
        return chosen, torch.tensor(losses)

    heads_seen = []
    real_init = spice.Heads.__init__

    def heads_init(self, *a, **k):
        real_init(self, *a, **k)
        heads_seen.append(self)

    monkeypatch.setattr(spice.Heads, "__init__", heads_init)
    monkeypatch.setattr(spice, "select_head", select_head)
    head, figures = spice.train_self(args, run, spice.ResNet18(2), data)
    assert figures["selected_head"] == 1
    assert not torch.equal(weights[1]["0.weight"], weights[2]["0.weight"]), "head 1 trained on"
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, weights[1][name]), "the weights of epoch 2, not the last"


@pytest.mark.slow  # about 15 s: a run of all three stages and a MoCo run
def test_predict_clusters_new_images_with_the_last_evaluated_model(tmp_path, new_images, capsys):
    run = tmp_path / "run"
    spice.main(TINY + ["--out-dir", str(run)])  # all three stages
    images, _ = common.make_shapes(6, seed=3, size=16)  # twice the run's size: resized to 8
    folder, paths = new_images(images)
    summary = spice.main(["--predict", str(folder), "--out-dir", str(run), "--device", "cpu"])
    assert "broken.png: not a readable image" in capsys.readouterr().out
    rows = [r.split(",") for r in (run / "predictions" / "predictions.csv").read_text().split()]
    assert [r[0] for r in rows[1:]] == paths and summary["images"] == 6
    # SPICE-Semi's final EMA network, the images read and normalised as in training
    args = spice.Args(**{k: v for k, v in json.loads((run / "args.json").read_text()).items()})
    ema = spice.WideResNet(3, args.semi_depth, args.semi_widen_factor, args.semi_bn_momentum)
    ema.load_state_dict(common.load_checkpoint(run / "checkpoint.pt")["ema"])
    info = common.dataset_info("shapes")
    read = torch.stack([common._read_image(folder / path, 8) for path in paths])
    stats = (info.mean, info.std)
    preds, confidence = spice.clusters_of(ema, read, spice.Run(None, "cpu", stats, False, 3))
    assert [int(r[1]) for r in rows[1:]] == preds.tolist()
    assert all(
        abs(float(r[3]) - c) < 1e-4 for r, c in zip(rows[1:], confidence.tolist(), strict=True)
    )
    moco_only = tmp_path / "moco"
    spice.main(TINY + ["--stage", "moco", "--out-dir", str(moco_only)])
    with pytest.raises(SystemExit, match="made no clusters"):
        spice.main(["--predict", str(folder), "--out-dir", str(moco_only), "--device", "cpu"])


def test_moco_logs_the_knn_accuracy_of_its_embedding_as_a_diagnostic(tmp_path, monkeypatch):
    args, run, data = tiny_run(
        tmp_path, moco_epochs=3, batch_size=12, bn_groups=2, moco_queue=12, backbone_width=2
    )
    seen = []
    real = spice.moco_knn_accuracy

    def knn(backbone, data, run):
        seen.append({k: v.clone() for k, v in backbone.state_dict().items()})
        return real(backbone, data, run)

    monkeypatch.setattr(spice, "moco_knn_accuracy", knn)
    weights = spice.train_moco(args, run, data.images, data)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["oracle/moco_knn_acc"]) for r in lines if "oracle/moco_knn_acc" in r]
    assert [step for step, _ in logged] == [1, 2, 3], "every tenth of the epochs (here each)"
    assert all(0 <= acc <= 1 for _, acc in logged)
    assert all(torch.equal(seen[-1][k], v) for k, v in weights.items()), "the final backbone"
    # the figure: the weighted kNN of the test embedding against the labelled training one
    backbone = spice.ResNet18(2)
    backbone.load_state_dict(weights)

    def embed(images):
        return F.normalize(spice.network_outputs(backbone, images, run.stats), dim=1)

    train, test = embed(data.images), embed(data.eval_images)
    expected = common.knn_accuracy(train, data.labels, test, data.eval_labels, k=20)
    assert logged[-1][1] == pytest.approx(expected)


def test_distributed_key_forward_shuffles_across_processes_and_restores_the_order(monkeypatch):
    # Two processes played in turn: gather hands back the whole batch of images, then every
    # process's keys (the encoder is per-sample, so their concatenation is the encoder's output on
    # the shuffled batch). Each process must run the key encoder on its half of rank 0's shuffle
    # and get back its own images' keys, in order, and the whole batch's for the queue.
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    linear = nn.Linear(3, 2)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(common, "world_size", lambda: 2)
    monkeypatch.setattr(
        common, "broadcast_", lambda t: t
    )  # rank 0's: here every "process" draws it
    for r in range(2):
        monkeypatch.setattr(common, "rank", lambda r=r: r)
        encoded = []  # what the key encoder saw
        gathered = iter([x, linear(x[perm])])

        def gather(t, gathered=gathered):
            return next(gathered)

        def encoder(batch, encoded=encoded):
            encoded.append(batch)
            return linear(batch)

        monkeypatch.setattr(common, "gather", gather)
        mine, everyone = spice.distributed_key_forward(
            encoder, x.chunk(2)[r], torch.Generator().manual_seed(0)
        )
        assert torch.equal(encoded[0], x[perm.chunk(2)[r]]), "its share of the shuffled batch"
        assert torch.allclose(everyone, linear(x)), "every key back in its image's place"
        assert torch.allclose(mine, linear(x.chunk(2)[r])), "this process's own images' keys"


def test_augmentations_have_a_stream_per_process_only_under_torchrun(monkeypatch):
    shared = torch.Generator().manual_seed(5)
    assert spice.augment_stream(shared, 5) is shared, "one process: the one stream, as ever"
    monkeypatch.setattr(common, "world_size", lambda: 2)
    streams = []
    for r in range(2):
        monkeypatch.setattr(common, "rank", lambda r=r: r)
        streams.append(spice.augment_stream(shared, 5))
    assert all(s is not shared for s in streams)
    draws = [torch.rand(4, generator=s) for s in streams]
    assert not torch.equal(draws[0], draws[1]), "the processes augment differently"


@pytest.mark.slow  # three launches of two processes: about 60 s on two cores
def test_two_processes_train_one_model_write_once_and_resume(tmp_path, torchrun):
    # All three stages under two processes: one writer, the same final EMA model in both.
    torchrun("spice.py", TINY + ["--out-dir", tmp_path / "a"])
    a = tmp_path / "a"
    results = json.loads((a / "results.json").read_text())
    checksums = results["weights_checksum"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    saved = common.load_checkpoint(a / "checkpoint.pt")
    assert saved["stage"] == "semi" and len(saved["rng"]) == 2, "each process's stream is kept"
    assert checksums[0] == pytest.approx(torchrun.checksum(saved["ema"]), rel=1e-12)
    # One log, its lines once each: MoCo's 2 epochs and their kNN diagnostics, SPICE-Self's 5
    # draws of 1000 and its epoch, SPICE-Semi's evaluation at step 3, its log line and evaluation
    # at step 6 (what one process logs).
    steps = [r["step"] for r in without_perf(a)]
    assert steps == [1, 1, 2, 2, 0.2, 0.4, 0.6, 0.8, 1.0, 1, 3, 6, 6]
    assert all(math.isfinite(v) for v in figures(results).values() if isinstance(v, float))
    assert 0 <= results["acc"] <= 1 and 0 <= results["self_acc"] <= 1
    # SPICE-Semi alone from stage 2's file, stopped after its first checkpoint (step 3) and
    # resumed under two processes: the uninterrupted run's figures and weights.
    semi = TINY + ["--stage", "semi", "--init-from", a / "self.pt"]
    resumed = torchrun.resumed_after_stop("spice.py", semi, tmp_path / "b", step=3)
    for key in ("acc", "nmi", "ari", "num_reliable", "weights_checksum"):
        assert resumed[key] == results[key], key
    assert without_perf(tmp_path / "b") == without_perf(a)[-3:], "SPICE-Semi's lines, once each"


def test_a_global_batch_that_does_not_split_among_the_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "world_size", lambda: 3)  # as if under torchrun with 3 processes
    with pytest.raises(SystemExit, match="--batch-size 256 is the batch over all 3 processes"):
        spice.main(TINY + ["--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_a_memory_mapped_folder_trains_to_the_figures_of_one_in_memory(
    tmp_path, shapes_folder, capsys
):
    folder = shapes_folder(90, 30, 8)  # three stages in a few seconds
    argv = ["--dataset", "imagefolder", "--data-dir", str(folder)] + TINY[2:]
    argv += ["--batch-size", "30", "--num-clusters", "3"]
    mapped = spice.main(argv + ["--memmap", "on", "--out-dir", str(tmp_path / "on")])
    said = capsys.readouterr().out
    assert "data clustered: " in said and "kept on the CPU, batches gathered from it" in said
    in_memory = spice.main(argv + ["--memmap", "off", "--out-dir", str(tmp_path / "off")])
    for key in ("acc", "nmi", "ari", "kmeans_acc", "self_acc", "num_reliable", "weights_checksum"):
        assert mapped[key] == in_memory[key], key
    assert without_perf(tmp_path / "on") == without_perf(tmp_path / "off")


@pytest.mark.slow
def test_spice_self_beats_k_means_on_the_moco_embedding_it_starts_from(tmp_path):
    # shapes with its defaults but 96 MoCo epochs (the default 32 leave an embedding too weak at
    # some seeds). Measured on the code of 2026-12-02, three runs at once on the 2-core CPU
    # (about 12 min each; 7 min alone), ACC on the test split, seeds 0 / 1 / 2:
    #   k-means on the MoCo embedding   0.379 / 0.345 / 0.389
    #   SPICE-Self (selected head)      0.418 / 0.386 / 0.422  (gains 3.9, 4.1, 3.3 points)
    #   SPICE (SPICE-Semi)              0.403 / 0.404 / 0.427  (-1.5, +1.8, +0.5 on SPICE-Self)
    # The margin on k-means is under the smallest gain. Stage 3 does not beat stage 2 at every
    # seed, so this test asserts only that it keeps stage 2's accuracy within 3 points.
    argv = ["--dataset", "shapes", "--moco-epochs", "96", "--seed", "0", "--threads", "1"]
    result = spice.main(argv + ["--device", "cpu", "--out-dir", str(tmp_path / "run")])
    assert result["self_acc"] >= result["kmeans_acc"] + 0.02
    assert result["acc"] >= result["self_acc"] - 0.03
