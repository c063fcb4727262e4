"""A script's run under torchrun, for the distributed tests (test_distributed.py):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_run.py \
        [--stop-after-first-checkpoint] [--record-batches FILE] SCRIPT.py ARGS...

runs SCRIPT's main on ARGS in every process. --stop-after-first-checkpoint stops every process
right after the run's first checkpoint, as Ctrl-C would (status 130), so that a test can resume
it. --record-batches writes FILE (from rank 0): every global batch of indices the processes drew,
gathered from their shares (`common.share`), in the order drawn."""

import os
import runpy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402 (after the path that finds it)

argv = sys.argv[1:]
stop = "--stop-after-first-checkpoint" in argv
if stop:
    argv.remove("--stop-after-first-checkpoint")
record = None
if argv[0] == "--record-batches":
    record, argv = argv[1], argv[2:]
script, args = argv[0], argv[1:]

if stop:
    real_save = common.save_checkpoint

    def save_then_stop(*a, **k):
        real_save(*a, **k)  # rank 0 writes; the others return at once
        # Every process waits for rank 0's file: torchrun ends the others when one stops, and
        # would otherwise end rank 0 in the middle of writing it.
        torch.distributed.barrier()
        raise KeyboardInterrupt

    common.save_checkpoint = save_then_stop

batches = []
if record:
    real_share = common.share

    def recorded_share(indices):
        mine = real_share(indices)
        batches.append(common.gather(mine).cpu())  # what all the processes drew together
        return mine

    common.share = recorded_share

sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    if record and os.environ.get("RANK", "0") == "0":  # the process group is closed by now
        torch.save(batches, record)
