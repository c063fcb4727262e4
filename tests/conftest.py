"""Shared test helpers."""

import json

import pytest
import torch

import common


@pytest.fixture
def interrupted_run(monkeypatch):
    """`interrupted_run(main, argv)`: the run is stopped (as by Ctrl-C) right after writing its
    first checkpoint, so a test can check that `--resume` ends where an uninterrupted run does."""

    def run(main, argv):
        real_save = common.save_checkpoint

        def save_then_crash(*args, **kwargs):
            real_save(*args, **kwargs)
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(common, "save_checkpoint", save_then_crash)
            with pytest.raises(SystemExit) as stop:  # common.user_errors: a message, status 130
                main(argv)
            assert stop.value.code == 130

    return run


@pytest.fixture(autouse=True)
def _keep_torchs_thread_count():
    """A test that runs a script with --threads changes torch's process-wide thread pool: give the
    next test the pool it would have had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def new_images(tmp_path):
    """`new_images(images)`: a folder of new images for --predict, from uint8 (N, 3, H, W) with
    N >= 4 (or a list of such (3, H, W) images): PNGs, one JPEG, one grayscale and one RGBA PNG
    in a nested subfolder, a corrupt file and a text file. Returns the folder and the relative
    paths of the readable images in the order --predict lists them (sorted)."""
    import numpy as np
    from PIL import Image

    def write(images):
        folder = tmp_path / "new"
        (folder / "nested" / "deeper").mkdir(parents=True)
        paths = []
        for i, image in enumerate(images):
            array = image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
            if i == 1:
                name, picture = f"nested/{i:03d}.jpg", Image.fromarray(array)
            elif i == 2:
                name, picture = f"nested/deeper/{i:03d}.png", Image.fromarray(array).convert("L")
            elif i == 3:
                name, picture = f"{i:03d}_rgba.png", Image.fromarray(array).convert("RGBA")
            else:
                name, picture = f"{i:03d}.png", Image.fromarray(array)
            picture.save(folder / name)
            paths.append(name)
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
        (folder / "notes.txt").write_text("not an image")
        return folder, sorted(paths)

    return write


@pytest.fixture
def torchrun(tmp_path):
    """`torchrun(script, argv, processes=2, stop=False, record=None)`: `script` (e.g. "odc.py")
    run by torch.distributed.run in `processes` CPU processes (gloo; one thread each) through
    tests/distributed_run.py; `stop` ends every process after the first checkpoint (status
    130), `record` is a file for the gathered batch indices. Returns the CompletedProcess; a
    failure other than the stop fails the test with the processes' output.

    `torchrun.resumed_after_stop(script, argv, out, **position)`: the run in `out` stopped after
    its first checkpoint, which must be at `position` (e.g. step=3), then resumed under the same
    processes; returns the resumed run's results.json. `torchrun.checksum(state)`: a state
    dict's sum, as `common.weights_checksum` sums one process's networks."""
    import os
    import shutil
    import subprocess
    import sys
    import uuid
    import warnings
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(script, argv, processes=2, stop=False, record=None):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(processes), str(root / "tests" / "distributed_run.py")]
        command += ["--stop-after-first-checkpoint"] if stop else []
        command += ["--record-batches", str(record)] if record else []
        command += [str(root / script), *map(str, argv)]
        # PYTHONFAULTHANDLER: a process that aborts prints where Python was when it did
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
        env["PYTHONFAULTHANDLER"] = "1"
        out = Path(argv[argv.index("--out-dir") + 1]) if "--out-dir" in argv else None
        before = tmp_path / f"before-{uuid.uuid4().hex}"  # the out-dir as this launch found it
        if out is not None and out.exists():
            shutil.copytree(out, before)
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0 and not stop and aborted_at_exit(done):
            # Rarely (once in two CI runs of ~20 launches; 0 in 60 launches here), one gloo
            # process aborts in the C++ teardown after the run has finished and printed its
            # results. Not the scripts' doing as far as we can tell: launch once more, from the
            # out-dir as it was, and say so.
            warnings.warn(
                f"torchrun {script}: a process aborted at exit; launched once more", stacklevel=2
            )
            for path in (out, record):
                if path is not None and Path(path).is_dir():
                    shutil.rmtree(path)
                elif path is not None and Path(path).exists():
                    Path(path).unlink()
            if before.exists():
                shutil.copytree(before, out)
            done = subprocess.run(
                command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
        if done.returncode != 0 and not stop:
            pytest.fail(f"torchrun {script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
        return done

    def aborted_at_exit(done):  # results printed, then "terminate called" from C++
        finished = any(line.startswith("results: ") for line in done.stdout.splitlines())
        return finished and "terminate called without an active exception" in done.stderr

    def resumed_after_stop(script, argv, out, **position):
        stopped = run(script, [*argv, "--out-dir", out], stop=True)
        assert stopped.returncode != 0, "the run was stopped"
        checkpoint = common.load_checkpoint(Path(out) / "checkpoint.pt")
        for key, value in position.items():
            assert checkpoint[key] == value, f"the first checkpoint's {key}"
        run(script, [*argv, "--out-dir", out, "--resume"])
        return json.loads((Path(out) / "results.json").read_text())

    def checksum(state: dict) -> float:
        return float(sum(t.double().sum() for t in state.values()))

    run.resumed_after_stop = resumed_after_stop
    run.checksum = checksum
    return run


@pytest.fixture
def shapes_folder(tmp_path, monkeypatch):
    """`shapes_folder(train, test, size)`: an image folder (<folder>/<split>/<shape>/<i>.png) of
    `train` + `test` shapes images at `size` px, its decoded cache under tmp_path."""
    from PIL import Image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def write(train, test, size):
        images, labels = common.make_shapes(train + test, seed=3, size=size)
        for split, part in (("train", slice(0, train)), ("test", slice(train, train + test))):
            for i, (image, label) in enumerate(zip(images[part], labels[part], strict=True)):
                path = tmp_path / "folder" / split / common.SHAPE_NAMES[label] / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        return tmp_path / "folder"

    return write
