"""Shared test helpers."""

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
