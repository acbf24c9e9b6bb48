"""A plain torch.distributed job over gloo in which one rank skips an all_reduce (vdiag did not write it
for itself: it is what a user's job with a rank-dependent branch looks like). The other ranks block in the
all_reduce; the skipping rank goes on to the barrier at the end and blocks there."""

import os
import sys
import time

import torch
import torch.distributed as dist

SKIP = int(os.environ.get("JOB_SKIP_RANK", "1"))
# With JOB_STRAGGLE_S, the skipping rank first spends that long on the host (a slow file system, say),
# outside any collective, before it reaches the barrier.
STRAGGLE_S = float(os.environ.get("JOB_STRAGGLE_S", "0"))


def step(t: torch.Tensor, rank: int) -> None:
    if rank != SKIP:  # the bug: a rank-dependent branch around a collective
        dist.all_reduce(t)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = torch.ones(8)
    for i in range(3):
        dist.all_reduce(t)
        print(f"rank {rank}: warm-up {i + 1}/3", flush=True)
    step(t, rank)
    if rank == SKIP and STRAGGLE_S:
        time.sleep(STRAGGLE_S)
    dist.barrier()
    print(f"rank {rank}: done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
