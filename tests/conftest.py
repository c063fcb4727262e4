"""Shared test helpers."""

import pytest

import common


@pytest.fixture
def interrupted_run(monkeypatch):
    """`interrupted_run(main, argv)`: the run dies right after writing its first checkpoint, as a
    crash or a kill would, so a test can check that `--resume` ends where an uninterrupted run
    does."""

    def run(main, argv):
        real_save = common.save_checkpoint

        def save_then_crash(*args, **kwargs):
            real_save(*args, **kwargs)
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(common, "save_checkpoint", save_then_crash)
            with pytest.raises(KeyboardInterrupt):
                main(argv)

    return run
