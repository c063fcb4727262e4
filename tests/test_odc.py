"""odc.py: the memories, class weights and loss order on constructed inputs, kNN and batch-norm
recomputation, a smoke run with resume, bad input, and a learning test against the untrained
network."""

import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import odc


def axis_memory(sizes, dim=8, noise=0.05, seed=0):
    """A memory whose cluster c holds sizes[c] features near the axis e_c, labelled c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    features = F.one_hot(labels, dim).float() + noise * torch.randn(len(labels), dim, generator=g)
    return odc.OdcMemory(features, labels, num_clusters=len(sizes))


def test_memory_update_is_the_normalised_momentum_average_then_the_nearest_centroid():
    memory = axis_memory([4, 4, 4])
    before_f = memory.features.clone()
    before_l = memory.labels.clone()
    idx = torch.tensor([0, 5, 9])
    # sample 0 (label 0) -> towards e0; samples 5 (label 1) and 9 (label 2) -> towards e2
    z = torch.zeros(3, 8)
    z[0, 0] = 3.0
    z[1, 2] = 7.0
    z[1, 1] = -3.0
    z[2, 2] = 0.1
    changed = memory.update_samples(idx, z)
    expected = F.normalize(0.5 * before_f[idx] + 0.5 * F.normalize(z, dim=1), dim=1)
    assert torch.allclose(memory.features[idx], expected, atol=1e-6)
    assert torch.allclose(memory.features.norm(dim=1), torch.ones(12), atol=1e-6)
    rest = torch.ones(12, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(memory.features[rest], before_f[rest])
    assert torch.equal(memory.labels[rest], before_l[rest])
    # only sample 5 changes label (1 -> 2): the scale of z does not matter, only its direction
    assert memory.labels[idx].tolist() == [0, 2, 2]
    assert changed.item() == pytest.approx(1 / 3)
    assert torch.equal(memory.labels[idx], (memory.features[idx] @ memory.centroids.T).argmax(1))


def test_an_image_drawn_twice_in_a_batch_is_updated_once_from_its_first_view():
    memory = axis_memory([4, 4, 4])
    memory.momentum = 0.9
    before = memory.features.clone()
    z = torch.zeros(4, 8)
    z[0, 2] = 1.0  # image 1 (label 0), its first view: towards e2
    z[1, 1] = 1.0  # image 5 (label 1): stays
    z[2, 0] = 1.0  # image 1's second view: towards e0, ignored
    z[3, 0] = 1.0  # image 9 (label 2): towards e0
    changed = memory.update_samples(torch.tensor([1, 5, 1, 9]), z)
    expected = F.normalize(0.1 * before[1] + 0.9 * z[0], dim=0)
    assert torch.allclose(memory.features[1], expected, atol=1e-6)
    assert memory.labels[[1, 5, 9]].tolist() == [2, 1, 0]
    assert changed.item() == pytest.approx(2 / 3), "of the 3 images updated, 1 and 9 moved"


def test_momentum_sets_how_far_features_follow_the_network():
    memory = axis_memory([3, 3])
    memory.momentum = 1.0
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    memory.update_samples(torch.tensor([1, 4]), z)
    assert torch.allclose(memory.features[[1, 4]], F.normalize(z, dim=1), atol=1e-6)


def test_centroid_recomputation_equals_a_plain_loop():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (200,), generator=g)
    labels[labels == 4] = 5  # cluster 4 is empty
    memory = odc.OdcMemory(torch.randn(200, 16, generator=g), labels, num_clusters=6)
    for c in (0, 1, 2, 3, 5):
        members = [memory.features[i] for i in range(200) if memory.labels[i] == c]
        assert torch.allclose(memory.centroids[c], sum(members) / len(members), atol=1e-5)
    assert torch.equal(memory.centroids[4], torch.zeros(16)), "an empty cluster keeps its centroid"
    # recomputing only some clusters leaves the others as they were
    old = memory.centroids.clone()
    memory.labels[:20] = 0
    memory.update_centroids(torch.tensor([0]))
    assert torch.allclose(
        memory.centroids[0], memory.features[memory.labels == 0].mean(0), atol=1e-5
    )
    assert torch.equal(memory.centroids[1:], old[1:])


def test_class_weights_are_inverse_square_root_sizes_summing_to_one():
    weights = odc.class_weights(torch.tensor([0, 1, 1, 1, 1, 3]), num_clusters=4)
    raw = torch.tensor([1.0, 0.5, 1e-5**-0.5, 1.0])  # sizes 1, 4, 0, 1
    assert torch.allclose(weights, raw / raw.sum())
    assert weights.sum().item() == pytest.approx(1.0)


def test_the_loss_is_the_class_weighted_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    weights = torch.tensor([0.5, 0.3, 0.2])
    nll = -F.log_softmax(logits, dim=1)[torch.arange(4), labels]
    w = weights[labels]
    assert odc.odc_loss(logits, labels, weights).item() == pytest.approx(
        float((w * nll).sum() / w.sum()), rel=1e-6
    )


def test_the_head_has_no_momentum_and_every_parameter_decays():
    args = odc.Args(sgd_momentum=0.9, weight_decay=1e-5)
    model = odc.ODC(num_clusters=5, width=2)
    groups = odc.build_optimizer(model, args).param_groups
    head = {id(p) for p in model.head.parameters()}
    assert [{id(p) for p in g["params"]} == head for g in groups] == [False, True]
    assert [g["momentum"] for g in groups] == [0.9, 0.0]
    assert all(g["weight_decay"] == 1e-5 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_the_neck_and_head_are_the_official_ones():
    model = odc.ODC(num_clusters=7, width=2)
    linear1, bn, relu, dropout, linear2, relu2 = model.neck
    assert (linear1.in_features, linear1.out_features, linear2.out_features) == (16, 512, 256)
    assert not bn.affine and bn.momentum == 0.001 and dropout.p == 0.5
    assert isinstance(relu, nn.ReLU) and isinstance(relu2, nn.ReLU)
    assert model.head.out_features == 7 and torch.equal(model.head.bias, torch.zeros(7))
    assert 0.008 < model.head.weight.std().item() < 0.012, "N(0, 0.01)"


def blobs(*parts, seed=0):
    """Features: for each (count, axes) part, `count` points near the sum of those unit axes."""
    g = torch.Generator().manual_seed(seed)
    features = torch.cat(
        [torch.zeros(n, 8).index_fill_(1, torch.tensor(axes), 1.0) for n, axes in parts]
    )
    return features + 0.01 * torch.randn(len(features), 8, generator=g)


def test_small_clusters_are_dissolved_and_the_largest_split_along_its_structure():
    # cluster 0: blob a (30 near e0 + e5) and blob b (30 near e0 + e6); cluster 1: 40 near e1;
    # cluster 2: 3 near e0 + e5 (small); cluster 3: 25 near e3.
    features = blobs((30, [0, 5]), (30, [0, 6]), (40, [1]), (3, [0, 5]), (25, [3]))
    labels = torch.tensor([0] * 60 + [1] * 40 + [2] * 3 + [3] * 25)
    memory = odc.OdcMemory(features, labels, num_clusters=4)
    assert memory.handle_small_clusters(min_cluster=10) == 1
    sizes = torch.bincount(memory.labels, minlength=4)
    assert len(sizes) == 4 and sizes.min() >= 10, "exactly C clusters, none small"
    # only members of the small cluster and of the split one moved
    assert torch.equal(memory.labels[60:100], labels[60:100])
    assert torch.equal(memory.labels[103:], labels[103:])
    # the small cluster joined its nearest centroid (0); 2-means then split cluster 0 along its
    # blobs: blob a with the 3 dissolved members on one side, blob b on the other, ids 0 and 2
    side_a = memory.labels[list(range(30)) + [100, 101, 102]]
    side_b = memory.labels[30:60]
    assert len(side_a.unique()) == 1 and len(side_b.unique()) == 1
    assert {int(side_a[0]), int(side_b[0])} == {0, 2}
    for c in range(4):
        assert torch.allclose(
            memory.centroids[c], memory.features[memory.labels == c].mean(0), atol=1e-5
        )


def test_a_split_gives_both_halves_the_minimum_size():
    # cluster 0: 50 near e0 and 4 outliers near e4, which 2-means cuts off alone; cluster 2 is
    # small.
    features = blobs((50, [0]), (4, [4]), (20, [1]), (2, [1]))
    labels = torch.tensor([0] * 54 + [1] * 20 + [2] * 2)
    memory = odc.OdcMemory(features, labels, num_clusters=3)
    assert memory.handle_small_clusters(min_cluster=10) == 1
    assert torch.bincount(memory.labels, minlength=3).tolist() == [44, 22, 10]
    assert (memory.labels[50:54] == 2).all(), "the outliers stay together in the refilled cluster"


def test_a_largest_cluster_too_small_for_two_minimum_halves_is_halved():
    # 15 + 15 + 3 = 33 >= 3 x 10, yet after the small cluster joins one of the others (18) no
    # split can give both halves 10: it is halved (9 + 9), and the next step handles it again.
    features = blobs((15, [0]), (15, [1]), (3, [0]))
    memory = odc.OdcMemory(features, torch.tensor([0] * 15 + [1] * 15 + [2] * 3), num_clusters=3)
    assert memory.handle_small_clusters(min_cluster=10) == 1
    assert sorted(torch.bincount(memory.labels, minlength=3).tolist()) == [9, 9, 15]


def test_nothing_happens_without_small_clusters():
    memory = axis_memory([20, 20, 20])
    before = memory.labels.clone()
    assert memory.handle_small_clusters(min_cluster=20) == 0
    assert torch.equal(memory.labels, before)


class Toy(nn.Module):
    """A stand-in for ODC: an 8-d 'neck feature' and logits over 3 clusters."""

    def __init__(self):
        super().__init__()
        self.neck = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        z = self.neck(x)
        return z, self.head(z)


def test_the_loss_uses_the_labels_from_before_the_update_and_the_step_follows():
    torch.manual_seed(0)
    model = Toy()
    memory = axis_memory([4, 4, 4])
    memory.momentum = 0.9  # (with 0.5 the new feature would sit halfway between two centroids)
    x = torch.randn(6, 4)
    idx = torch.tensor([0, 1, 4, 5, 8, 9])
    with torch.no_grad():  # send every sample's network feature far towards e2
        model.neck.weight.zero_()
        model.neck.bias.copy_(F.one_hot(torch.tensor(2), 8) * 100.0)
    old_labels = memory.labels[idx].clone()
    weights = odc.class_weights(memory.labels, 3)
    with torch.no_grad():
        expected = odc.odc_loss(model(x)[1], old_labels, weights)
    head_before = model.head.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, changed = odc.train_step(model, memory, optimizer, x, idx, weights)
    assert torch.allclose(loss, expected)
    assert memory.labels[idx].tolist() == [2] * 6
    assert changed.item() == pytest.approx(4 / 6)
    assert not torch.equal(model.head.weight, head_before), "the optimiser stepped"
    with torch.no_grad():
        assert not torch.allclose(odc.odc_loss(model(x)[1], memory.labels[idx], weights), expected)


def test_weighted_knn_on_constructed_neighbourhoods():
    train = F.normalize(
        torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1
    )
    train_labels = torch.tensor([0, 0, 1, 1, 1])
    test = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert common.knn_accuracy(train, train_labels, test, torch.tensor([0, 1]), k=2) == 1.0
    assert common.knn_accuracy(train, train_labels, test, torch.tensor([1, 1]), k=2) == 0.5
    # with all 5 neighbours, the temperature decides: at T = 0.07 the close pair outvotes the
    # three far ones, at T = 100 the votes are nearly equal and the three win
    sharp = common.knn_accuracy(
        train, train_labels, test[:1], torch.tensor([0]), k=5, temperature=0.07
    )
    flat = common.knn_accuracy(
        train, train_labels, test[:1], torch.tensor([1]), k=5, temperature=100.0
    )
    assert sharp == 1.0
    assert flat == 1.0


def test_batch_norm_recomputation_gives_the_average_over_all_images():
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.001), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    images = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = common.normalize(images, *stats)
    odc.recompute_batch_norm(model, x.split(10))
    assert torch.allclose(model[0].running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert model[0].momentum == 0.001, "the layers' momenta are restored"


def test_augment_keeps_shape_and_dtype_and_draws_from_the_generator():
    images = common.make_shapes(4, seed=0, size=16)[0]
    a = odc.augment(images, torch.Generator().manual_seed(0))
    b = odc.augment(images, torch.Generator().manual_seed(0))
    c = odc.augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_learning_rate_drops_once_by_the_factor():
    args = odc.Args(epochs=100, lr=0.1, lr_drop=0.91)
    assert odc.step_lr(90, args) == 0.1
    assert odc.step_lr(91, args) == pytest.approx(0.04)
    assert odc.step_lr(99, args) == pytest.approx(0.04)


def test_epoch_indices_are_whole_batches_drawn_with_replacement_fixed_by_seed_and_epoch():
    batches = odc.epoch_indices(50, 8, epoch=3, seed=1, device="cpu")
    assert batches.shape == (7, 8), "ceil(50 / 8) full batches, no partial one"
    assert 0 <= batches.min() and batches.max() < 50
    assert len(batches.unique()) < 50, "56 draws with replacement: some image is drawn twice"
    assert torch.equal(batches, odc.epoch_indices(50, 8, epoch=3, seed=1, device="cpu"))
    assert not torch.equal(batches, odc.epoch_indices(50, 8, epoch=4, seed=1, device="cpu"))
    assert not torch.equal(batches, odc.epoch_indices(50, 8, epoch=3, seed=2, device="cpu"))
    # uniform: 10 images, 20,000 draws, about 2,000 each (binomial sd 42)
    counts = torch.bincount(odc.epoch_indices(10, 20_000, 0, 0, "cpu").flatten(), minlength=10)
    assert (counts - 2000).abs().max() < 200
    assert counts.float().std() > 10, "not a permutation repeated: counts vary as binomials"


@pytest.fixture
def one_thread():
    """Tiny networks run many times faster on one thread than on torch's pool of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run(n=40, num_clusters=4, min_cluster=0, batch_size=4, centroid_every=5, seed=0):
    """What `train_epoch` needs, at 8 px with a width-2 network: data, model, memory, args."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 2
    data = odc.OdcData(
        images, images, labels, images[:8], labels[:8], "test", 2, ((0.5,) * 3, (0.25,) * 3)
    )
    args = odc.Args(
        num_clusters=num_clusters,
        min_cluster=min_cluster,
        batch_size=batch_size,
        centroid_every=centroid_every,
        log_every=1000,
        backbone_width=2,
    )
    torch.manual_seed(seed)
    model, optimizer, forward = odc.build_model(args, torch.device("cpu"))
    memory_labels = torch.arange(n) % num_clusters
    memory = odc.OdcMemory(torch.randn(n, 256, generator=g), memory_labels, num_clusters)
    return data, model, optimizer, memory, args


def run_epoch(tmp_path, data, model, optimizer, memory, args, epoch=0):
    book = common.RunBook(tmp_path, args)
    book.start_log()
    weights = odc.class_weights(memory.labels, args.num_clusters)
    model.train()
    rng = torch.Generator().manual_seed(0)
    return odc.train_epoch(model, optimizer, memory, data, weights, epoch, rng, book, args)


def test_an_epoch_with_n_one_more_than_a_multiple_of_the_batch_runs_in_full_batches(
    tmp_path, monkeypatch, one_thread
):
    data, model, optimizer, memory, args = tiny_run(n=9, batch_size=4)  # 9 = 2 x 4 + 1
    sizes = []
    real_step = odc.train_step

    def step(model, memory, optimizer, x, idx, weights, amp=False):
        sizes.append(len(idx))
        return real_step(model, memory, optimizer, x, idx, weights, amp)

    monkeypatch.setattr(odc, "train_step", step)
    run_epoch(tmp_path, data, model, optimizer, memory, args)  # a batch of one would raise
    assert sizes == [4, 4, 4]


def test_ten_steps_refresh_the_centroids_and_weigh_each_loss_by_the_labels_before_it(
    tmp_path, monkeypatch, one_thread
):
    # 40 images, batch 4: 10 steps; the centroids are recomputed after steps 5 and 10
    data, model, optimizer, memory, args = tiny_run(n=40, batch_size=4, centroid_every=5)
    seen = []
    real_step = odc.train_step

    def step(model, memory, optimizer, x, idx, weights, amp=False):
        expected = odc.class_weights(memory.labels, args.num_clusters)
        seen.append(torch.allclose(weights, expected))
        return real_step(model, memory, optimizer, x, idx, weights, amp)

    monkeypatch.setattr(odc, "train_step", step)
    start = memory.centroids.clone()
    weights = run_epoch(tmp_path, data, model, optimizer, memory, args)
    assert seen == [True] * 10, "each step's weights are those of the labels it starts from"
    assert torch.allclose(weights, odc.class_weights(memory.labels, args.num_clusters))
    assert not torch.allclose(memory.centroids, start)
    for c in memory.labels.unique():
        mean = memory.features[memory.labels == c].mean(0)
        assert torch.allclose(memory.centroids[c], mean, atol=1e-5), "refreshed after step 10"


def test_small_clusters_are_handled_after_every_step(tmp_path, monkeypatch, one_thread):
    data, model, optimizer, memory, args = tiny_run(n=40, min_cluster=6, centroid_every=100)
    memory.labels[[1, 5, 9, 13, 17, 21, 25, 29]] = 0  # cluster 1 keeps 2 of its 10 members
    memory.update_centroids()
    assert torch.bincount(memory.labels, minlength=4).min() < 6
    smallest = []
    real_step = odc.train_step

    def step(model, memory, optimizer, x, idx, weights, amp=False):
        smallest.append(int(torch.bincount(memory.labels, minlength=4).min()))
        return real_step(model, memory, optimizer, x, idx, weights, amp)

    monkeypatch.setattr(odc, "train_step", step)
    run_epoch(tmp_path, data, model, optimizer, memory, args)
    assert smallest[0] < 6 and min(smallest[1:]) >= 6, smallest
    assert torch.bincount(memory.labels, minlength=4).min() >= 6


def test_each_step_trains_on_a_fresh_augmented_view_of_its_own_images(
    tmp_path, monkeypatch, one_thread
):
    data, model, optimizer, memory, args = tiny_run(n=8, batch_size=4)
    views = []
    inputs = []
    real_augment = odc.augment
    real_step = odc.train_step

    def augment(images, generator):
        view = real_augment(images, generator)
        views.append((images.clone(), view.clone()))
        return view

    def step(model, memory, optimizer, x, idx, weights, amp=False):
        inputs.append((x.clone(), idx.clone()))
        return real_step(model, memory, optimizer, x, idx, weights, amp)

    monkeypatch.setattr(odc, "augment", augment)
    monkeypatch.setattr(odc, "train_step", step)
    run_epoch(tmp_path, data, model, optimizer, memory, args)
    assert len(views) == len(inputs) == 2, "one augmented view per step"
    for (raw, view), (x, idx) in zip(views, inputs, strict=True):
        assert torch.equal(raw, data.images[idx]), "the view is of the step's own images"
        assert not torch.allclose(view.float(), raw.float(), atol=12), "the view is augmented"
        assert torch.allclose(x, common.normalize(view, *data.stats)), "and is what trains"


def test_small_clusters_are_split_with_a_new_seed_every_step(tmp_path, monkeypatch, one_thread):
    # The 2-means of a split draws from a seed of (seed, step): a constant seed would cut every
    # split the same way; a seed of the step alone would make every run's splits the same.
    data, model, optimizer, memory, args = tiny_run(n=40, batch_size=4)
    args.seed = 3
    seeds = []
    real_handle = odc.OdcMemory.handle_small_clusters

    def handle(self, min_cluster, seed=0):
        seeds.append(seed)
        return real_handle(self, min_cluster, seed=seed)

    monkeypatch.setattr(odc.OdcMemory, "handle_small_clusters", handle)
    run_epoch(tmp_path, data, model, optimizer, memory, args, epoch=1)
    assert seeds == [3 * 1_000_003 + step for step in range(10, 20)]


def test_the_linear_probe_separates_separable_features_and_cannot_learn_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(4, 16, generator=g)
    train_y, test_y = (
        torch.randint(0, 4, (400,), generator=g),
        torch.randint(0, 4, (800,), generator=g),
    )
    train_x = centres[train_y] + torch.randn(400, 16, generator=g)
    test_x = centres[test_y] + torch.randn(800, 16, generator=g)
    state = torch.get_rng_state()
    assert odc.linear_probe(train_x, train_y, test_x, test_y) >= 0.95
    assert torch.equal(torch.get_rng_state(), state), "the global random state is left alone"
    # features unrelated to the labels (noise, 64-d): the probe is at chance, 0.25 (one fit on the
    # 200 test images themselves would reach far above it)
    noise_x, noise_y = torch.randn(600, 64, generator=g), torch.randint(0, 4, (600,), generator=g)
    acc = odc.linear_probe(noise_x[:400], noise_y[:400], noise_x[400:], noise_y[400:])
    assert abs(acc - 0.25) < 0.1


SMOKE = (
    "--dataset shapes --image-size 16 --backbone-width 4 --epochs 2 --eval-every 1 "
    "--batch-size 256 --num-clusters 20 --min-cluster 30 --log-every 10 --device cpu"
).split()


def test_smoke_run_writes_its_files_and_resume_reaches_the_same_result(
    tmp_path, interrupted_run, monkeypatch
):
    saved = []  # the epoch of every checkpoint written
    real_save = common.save_checkpoint
    with monkeypatch.context() as patch:
        patch.setattr(
            common, "save_checkpoint", lambda p, s: saved.append(s["epoch"]) or real_save(p, s)
        )
        straight = odc.main(SMOKE + ["--out-dir", str(tmp_path / "a")])
    assert saved == [1, 2], "a checkpoint at every evaluation (--eval-every 1)"
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "results.json", "clusters.png"):
        assert (tmp_path / "a" / name).exists(), name
    fractions = {"linear_acc", "knn_acc", "knn20_acc", "baseline_knn_acc", "acc", "nmi", "ari"}
    keys = fractions | {"baseline_acc", "baseline_linear_acc", "seconds", "images_per_second"}
    assert keys <= set(straight)
    assert keys <= set(json.loads((tmp_path / "a" / "results.json").read_text()))
    assert all(0 <= straight[k] <= 1 for k in fractions)
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert len(train_records) == 2 * 2, "2 epochs, each logged at its end and after 10 steps"
    assert all(math.isfinite(r["train/loss"]) for r in train_records)
    small_handled = all(r["train/min_cluster"] >= 30 for r in train_records)
    assert small_handled, "small clusters are handled every step"
    assert sum("eval/knn_acc" in r for r in records) == 2
    assert sum("baseline/knn_acc" in r for r in records) == 1

    # evaluating only at the end, the clock's checkpoint (due at once here) ends epoch 1
    run_b = SMOKE + ["--out-dir", str(tmp_path / "b")]
    monkeypatch.setattr(common, "CHECKPOINT_SECONDS", 0)
    interrupted_run(odc.main, run_b + ["--eval-every", "2"])  # dies after epoch 1
    assert common.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    args_json = (tmp_path / "b" / "args.json").read_bytes()
    with pytest.raises(SystemExit, match="--resume"):  # a run in progress is not overwritten
        odc.main(run_b)
    with pytest.raises(SystemExit, match="--epochs 2 \\(now 3\\)"):  # would bend the schedule
        odc.main(run_b + ["--eval-every", "2", "--resume", "--epochs", "3"])
    assert (tmp_path / "b" / "args.json").read_bytes() == args_json
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    damaged = tmp_path / "c" / "checkpoint.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    files = {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()}
    with pytest.raises(SystemExit, match=str(damaged)):
        odc.main(SMOKE + ["--out-dir", str(tmp_path / "c"), "--resume"])
    assert {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()} == files, "untouched"

    # --eval-every and --log-every may change on resume
    resumed = odc.main(run_b + ["--resume", "--eval-every", "1", "--log-every", "5"])
    for k in ("linear_acc", "knn_acc", "knn20_acc", "acc", "nmi", "baseline_knn_acc"):
        assert resumed[k] == straight[k], k
    memory_a = common.load_checkpoint(tmp_path / "a" / "checkpoint.pt")["memory"]
    memory_b = common.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["memory"]
    assert torch.equal(memory_a["labels"], memory_b["labels"])
    assert torch.equal(memory_a["features"], memory_b["features"])
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "train/loss" in line]
    assert steps == sorted(set(steps)), "the log reads as one run: each step once, in order"
    assert steps[:2] == [0.5, 1.0] and len(steps) == 2 + 4, "epoch 2 logged every 5 steps"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--num-clusters", "6000"], "exceeds the 5000 training images"),
        (["--num-clusters", "50", "--min-cluster", "101"], "cannot hold"),
        (["--dataset", "cifar11"], "not a known"),
        (["--batch-size", "-4"], "--batch-size: -4 is out of range"),
        (["--batch-size", "0"], "--batch-size: 0 is out of range"),
        (["--batch-size", "1"], "--batch-size: 1 is out of range"),
        (["--num-clusters", "0"], "--num-clusters: 0 is out of range"),
        (["--eval-every", "0"], "--eval-every: 0 is out of range"),
        (["--log-every", "0"], "--log-every: 0 is out of range"),
        (["--epochs", "0"], "--epochs: 0 is out of range"),
        (["--image-size", "0"], "--image-size: 0 is out of range"),
    ],
)
def test_bad_input_is_a_clear_message_before_training(tmp_path, argv, message, capsys):
    base = ["--dataset", "shapes", "--epochs", "1", "--device", "cpu"]
    base += ["--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        odc.main(base + argv)
    assert message in str(stop.value) + capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing is written before the input is checked"


# --init-from: a spice.py MoCo run's backbone, then ODC
INIT_TINY = "--dataset shapes --image-size 8 --backbone-width 4 --device cpu --threads 1".split()


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory):
    """A one-epoch spice.py MoCo run on shapes: its run folder and results."""
    import spice

    out = tmp_path_factory.mktemp("moco") / "run"
    argv = INIT_TINY + ["--stage", "moco", "--moco-epochs", "1", "--batch-size", "256"]
    return out, spice.main(argv + ["--out-dir", str(out)])


def test_init_from_a_moco_run_loads_every_backbone_weight_and_reports_three_rows(
    tmp_path, moco_run, monkeypatch, capsys
):
    moco_dir, moco_results = moco_run
    moco_backbone = common.load_checkpoint(moco_dir / "moco.pt")["backbone"]
    seen = {}
    real_train_epoch = odc.train_epoch

    def first_epoch_checked(forward, optimizer, memory, data, *rest, **kwargs):
        if not seen:  # before the first step: the loaded weights, the memory made from them
            seen["backbone"] = {k: v.clone() for k, v in forward.backbone.state_dict().items()}
            neck = nn.Sequential(forward.backbone, forward.neck)
            features = odc.network_outputs(neck, data.images, data.stats)
            seen["memory_matches"] = torch.allclose(
                memory.features, F.normalize(features, dim=1), atol=1e-5
            )
            forward.train()
        return real_train_epoch(forward, optimizer, memory, data, *rest, **kwargs)

    monkeypatch.setattr(odc, "train_epoch", first_epoch_checked)
    argv = INIT_TINY + ["--epochs", "1", "--batch-size", "256", "--num-clusters", "20"]
    argv += ["--min-cluster", "30", "--init-from", str(moco_dir / "moco.pt")]
    result = odc.main(argv + ["--out-dir", str(tmp_path / "odc")])

    assert seen["backbone"].keys() == moco_backbone.keys()
    for name, tensor in moco_backbone.items():
        assert torch.equal(seen["backbone"][name], tensor), name
    assert seen["memory_matches"], "the memory starts from the loaded network's neck features"
    # the loaded row is the MoCo embedding as spice.py measured it (its own batch-norm statistics)
    assert result["init_acc"] == moco_results["kmeans_acc"], "the same clusters"
    assert result["init_nmi"] == pytest.approx(moco_results["kmeans_nmi"], abs=1e-5)
    assert result["init_knn_acc"] != result["baseline_knn_acc"], "not the random network again"
    assert "init_memory_nmi" in result and "baseline_memory_nmi" not in result
    rows = [line for line in capsys.readouterr().out.splitlines() if "knn_acc" not in line]
    for row in ("random network", "loaded network, before ODC", "after ODC"):
        assert sum(line.startswith(row) for line in rows) == 1, row
    written = json.loads((tmp_path / "odc" / "results.json").read_text())
    assert {"knn_acc", "baseline_knn_acc", "init_knn_acc", "init_linear_acc"} <= set(written)


def test_backbone_weights_come_from_odc_checkpoints_and_state_dicts(tmp_path):
    source = odc.ODC(num_clusters=5, width=4)
    target = odc.ResNet18(width=4)
    files = {
        "checkpoint.pt": {"model": source.state_dict(), "epoch": 3},
        "odc_model.pt": source.state_dict(),
        "resnet.pt": source.backbone.state_dict(),
    }
    for name, state in files.items():
        torch.save(state, tmp_path / name)
        weights = odc.backbone_weights(str(tmp_path / name), target)
        assert weights.keys() == target.state_dict().keys(), name
        for key, tensor in source.backbone.state_dict().items():
            assert torch.equal(weights[key], tensor), (name, key)


def test_init_from_another_network_is_refused_before_anything_is_written(
    tmp_path, moco_run, capsys
):
    torch.save(nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "linear.pt"), "a state_dict with 2 entries (weight, bias, ...), not"),
        (str(moco_run[0]), "width 4; this run builds width 8: pass --backbone-width 4"),
        (str(tmp_path / "empty"), "no such file"),
    ]
    for path, message in cases:
        argv = ["--dataset", "shapes", "--image-size", "8", "--backbone-width", "8", "--epochs"]
        argv += ["1", "--device", "cpu", "--init-from", path, "--out-dir", str(tmp_path / "run")]
        with pytest.raises(SystemExit) as stop:
            odc.main(argv)
        assert message in str(stop.value) + capsys.readouterr().err, path
        assert not (tmp_path / "run").exists(), "nothing is written"


@pytest.mark.slow
def test_odc_features_beat_the_untrained_network_on_shapes(tmp_path):
    # The shapes defaults (ResNet-18 width 16, C = 50, min cluster 15, batch 128) at 16 px for 20
    # epochs: about 130 s on 2 CPU cores. Measured kNN accuracy (k = 200) after training vs the
    # untrained network, seeds 0 / 1 / 2: 0.472 vs 0.238, 0.399 vs 0.186, 0.568 vs 0.214, a gain
    # of 21 to 35 points (k = 20: 0.621 / 0.567 / 0.690 vs 0.223 / 0.195 / 0.214).
    # After the resized_crop edge fix (commit fc4138b: no dark rim on enlarged crops): 0.589 /
    # 0.499 / 0.447 vs the same baselines, 23 to 35 points (k = 20: 0.704 / 0.614 / 0.608).
    # With the official sampling (draws with replacement, 2026-12-02, one thread): 0.501 / 0.525
    # / 0.573, 26 to 36 points (k = 20: 0.642 / 0.691 / 0.734, 42 to 52 points).
    argv = "--dataset shapes --image-size 16 --epochs 20 --eval-every 20 --seed 0 --device cpu"
    argv = argv.split() + ["--out-dir", str(tmp_path / "run")]
    result = odc.main(argv)
    assert result["knn_acc"] >= result["baseline_knn_acc"] + 0.10
    assert result["knn20_acc"] >= result["baseline_knn20_acc"] + 0.20
    closer = result["memory_nmi"] > result["baseline_memory_nmi"]
    assert closer, "the memory labels came closer to the classes"


def test_predict_puts_new_images_in_their_memory_cluster(tmp_path, new_images, capsys):
    run = tmp_path / "run"
    argv = INIT_TINY + ["--epochs", "1", "--batch-size", "256", "--num-clusters", "20"]
    odc.main(argv + ["--min-cluster", "30", "--out-dir", str(run)])
    images, _ = common.make_shapes(6, seed=3, size=16)  # twice the run's size: resized to 8
    folder, paths = new_images(images)
    summary = odc.main(["--predict", str(folder), "--out-dir", str(run), "--device", "cpu"])
    assert "broken.png: not a readable image" in capsys.readouterr().out
    rows = [r.split(",") for r in (run / "predictions" / "predictions.csv").read_text().split()]
    assert [r[0] for r in rows[1:]] == paths and summary["images"] == 6
    state = common.load_checkpoint(run / "checkpoint.pt")
    model = odc.ODC(20, 4)
    model.load_state_dict(state["model"])
    read = torch.stack([common._read_image(folder / path, 8) for path in paths])
    info = common.dataset_info("shapes")
    stats = (info.mean, info.std)
    clusters, cosine = odc.memory_clusters(model, state["memory"]["centroids"], read, stats)
    assert [int(r[1]) for r in rows[1:]] == clusters.tolist()
    assert all(abs(float(r[3]) - c) < 1e-4 for r, c in zip(rows[1:], cosine.tolist(), strict=True))
    # the memory's own rule (step 3) with m = 1, fed the same neck features, gives these clusters
    neck = nn.Sequential(model.backbone, model.neck)
    z = odc.network_outputs(neck, read, stats)
    memory = odc.OdcMemory(torch.randn(6, 256), torch.zeros(6, dtype=torch.long), 20, momentum=1.0)
    memory.centroids = state["memory"]["centroids"]
    memory.update_samples(torch.arange(6), z)
    assert memory.labels.tolist() == clusters.tolist()


def test_memory_figures_score_the_clusters_many_to_one_and_their_balance():
    # 6 labelled images (classes 0, 0, 1, 1, 2, 2) then 2 unlabelled, in C = 4 clusters
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    memory = odc.OdcMemory(torch.randn(8, 4), torch.tensor([0, 1, 2, 2, 3, 2, 3, 3]), 4)
    data = odc.OdcData(None, None, labels, None, None, "test", 3, None)
    figures = odc.memory_figures(memory, data)
    # clusters 0 and 1 both hold class 0 (one-to-one would count one), 2 holds class 1 twice and
    # class 2 once, 3 holds class 2: 5 of 6 under majority matching
    assert figures["memory_majority_acc"] == pytest.approx(5 / 6)
    sizes = torch.tensor([1, 1, 3, 3]) / 8  # all 8 memory rows
    entropy = float(-(sizes * sizes.log()).sum())
    assert figures["memory_size_balance"] == pytest.approx(entropy / math.log(4))
    assert figures["memory_nmi"] == pytest.approx(common.nmi(labels, memory.labels[:6]))


# --------------------------------------------------------------------------------------------------
# Several processes (torchrun)
# --------------------------------------------------------------------------------------------------
def test_under_two_processes_each_trains_on_its_share_and_updates_the_memory_from_all(monkeypatch):
    # Rank 0 of 2, simulated: its share is the batch's first half; `common.gather` hands it the
    # other process's half too. Its memory must end as one process's on the whole batch, its loss
    # be the loss on its own half.
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(6, 4)
    idx = torch.tensor([0, 1, 4, 5, 8, 0])  # image 0 twice, once in each share
    one = axis_memory([4, 4, 4])
    two = axis_memory([4, 4, 4])
    weights = odc.class_weights(one.labels, 3)
    with torch.no_grad():
        z_other = model(x[3:])[0]
        expected = odc.odc_loss(model(x[:3])[1], two.labels[idx[:3]], weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the network stays put
    odc.train_step(model, one, optimizer, x, idx, weights)  # one process, the whole batch

    def gather(tensor):
        other = idx[3:] if tensor.dtype == torch.long else z_other
        return torch.cat([tensor, other])

    monkeypatch.setattr(common, "gather", gather)
    loss, changed = odc.train_step(model, two, optimizer, x[:3], idx[:3], weights)
    assert torch.allclose(loss, expected), "the loss is on this process's share"
    assert torch.allclose(two.features, one.features) and torch.equal(two.labels, one.labels)


def test_each_step_ends_with_rank_0s_labels_and_centroids_in_every_process(monkeypatch):
    # Under torchrun, `common.broadcast_` writes rank 0's tensor into every process's; here it
    # writes a fixed "rank 0" clustering, and the step's class weights must follow it.
    memory = axis_memory([20, 20, 20])
    args = odc.Args(num_clusters=3, min_cluster=0)
    rank_0 = {"labels": torch.zeros_like(memory.labels), "centroids": torch.eye(3, 8)}
    broadcast = []

    def broadcast_(tensor):
        name = "labels" if tensor is memory.labels else "centroids"
        assert tensor is getattr(memory, name), "in place, in the memory itself"
        broadcast.append(name)
        return tensor.copy_(rank_0[name])

    monkeypatch.setattr(common, "broadcast_", broadcast_)
    _, weights = odc.refresh_memory(memory, step=3, args=args)
    assert broadcast == ["labels", "centroids"]
    assert torch.equal(memory.labels, rank_0["labels"])
    assert torch.equal(memory.centroids, rank_0["centroids"])
    assert torch.equal(weights, odc.class_weights(rank_0["labels"], 3))

    # The initial k-means: rank 0's features, then its labels and centroids.
    shapes = []
    monkeypatch.setattr(common, "broadcast_", lambda t: shapes.append((t.shape, t.dtype)) or t)
    odc.OdcMemory.initialise(memory.features, 3)
    floats, longs = torch.float32, torch.int64
    assert shapes == [((60, 8), floats), ((60,), longs), ((3, 8), floats)]


def test_a_batch_that_leaves_a_process_fewer_than_two_images_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "start_processes", lambda device: torch.device("cpu"))
    monkeypatch.setattr(common, "world_size", lambda: 2)
    argv = SMOKE + ["--out-dir", str(tmp_path / "run"), "--batch-size"]
    with pytest.raises(SystemExit, match="--batch-size 3 .* multiple of 2"):
        odc.main(argv + ["3"])
    with pytest.raises(SystemExit, match="--batch-size 2 gives each of the 2 processes"):
        odc.main(argv + ["2"])
    assert not (tmp_path / "run").exists(), "nothing is written"


def _log(folder) -> list[dict]:  # log.jsonl without the timing entries
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if "perf/" not in k} for line in lines]


@pytest.mark.slow  # three launches of two processes
def test_two_processes_train_one_model_and_memory_write_once_and_resume(tmp_path, torchrun):
    argv = SMOKE + ["--image-size", "8", "--seed", "1"]  # 8 px: the smallest, for speed
    torchrun("odc.py", argv + ["--out-dir", tmp_path / "a"])
    a = tmp_path / "a"
    results = json.loads((a / "results.json").read_text())
    # Both processes ended with the same network and the same memory, those rank 0 saved.
    saved = common.load_checkpoint(a / "checkpoint.pt")
    for key, part in (("weights_checksum", "model"), ("memory_checksum", "memory")):
        checksums = results[key]
        assert len(checksums) == 2 and checksums[0] == checksums[1], key
        assert checksums[0] == pytest.approx(torchrun.checksum(saved[part]), rel=1e-12), key
    assert len(saved["augment_rng"]) == 2, "each process's augmentation stream is kept"
    # One writer: one log, its lines once each (the baseline; 20 steps an epoch, logged after
    # 10 and 20; an evaluation after each epoch), as one process logs them.
    steps = [r["step"] for r in _log(a)]
    assert steps == [0, 0.5, 1.0, 1, 1.5, 2.0, 2]
    assert all(math.isfinite(v) for k, v in results.items() if isinstance(v, float)), results
    assert 0 <= results["knn_acc"] <= 1

    # Stopped after its first checkpoint (epoch 1) and resumed under two processes, the run ends
    # with the uninterrupted run's figures, network and memory.
    resumed = torchrun.resumed_after_stop("odc.py", argv, tmp_path / "b", epoch=1)
    for key in ("linear_acc", "knn_acc", "acc", "nmi", "memory_nmi", "weights_checksum"):
        assert resumed[key] == results[key], key
    assert resumed["memory_checksum"] == results["memory_checksum"]
    assert _log(tmp_path / "b") == _log(a)


def test_a_memory_mapped_folder_trains_to_the_figures_of_one_in_memory(
    tmp_path, shapes_folder, capsys
):
    folder = shapes_folder(120, 40, 16)
    argv = ["--dataset", "imagefolder", "--data-dir", str(folder)] + SMOKE[2:]
    argv += ["--batch-size", "60", "--num-clusters", "4", "--min-cluster", "5"]
    mapped = odc.main(argv + ["--memmap", "on", "--out-dir", str(tmp_path / "on")])
    said = capsys.readouterr().out
    assert "data training: " in said and "kept on the CPU, batches gathered from it" in said
    in_memory = odc.main(argv + ["--memmap", "off", "--out-dir", str(tmp_path / "off")])
    figures = ("knn_acc", "linear_acc", "acc", "nmi", "memory_nmi")
    assert all(mapped[k] == in_memory[k] for k in figures)
    assert mapped["weights_checksum"] == in_memory["weights_checksum"]
    assert mapped["memory_checksum"] == in_memory["memory_checksum"]
