"""The sim's one-shot Lamport protocol (repro.backends.sim) driven from a plain script under plain torchrun:
rank 0 launches 17 tokens where its peer launches 16, so rank 0 polls forever for a token nobody writes
(it burns a core) while rank 1 completes its call and waits at the barrier."""

import os

import numpy as np
import torch.distributed as dist

from repro.backends.base import CallSpec
from repro.backends.sim import SimBackend
from repro.kernel_launch import launch_config

WIDTH = 64


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    sim = SimBackend(rank=rank, tp=world, pp=1, tp_group=group, tp_ranks=tuple(range(world)),
                     run_token=f"{os.getpid()}-watchtest", max_tokens=64, width=WIDTH)
    try:
        sim.create_workspace("tp")
        diverge = os.environ.get("SIM_DIVERGE", "1") == "1"  # 0: a clean job (the benchmark)
        calls = int(os.environ.get("SIM_CALLS", "1"))
        for i in range(calls):
            tokens = 17 if rank == 0 and diverge else 16  # the divergence
            x = np.ones((tokens, WIDTH), dtype=np.float32)
            res = np.zeros_like(x)
            gamma = np.ones(WIDTH, dtype=np.float32)
            lc = launch_config(token_num=tokens, hidden=8192, elem_bytes=2, oneshot=True, nranks=world,
                               sm_count=132)
            spec = CallSpec(token_num=tokens, oneshot=True, launch=lc, eps=1e-5, dtype="bf16", phase="capture",
                            seq=i)
            if i == 0 or (i + 1) % 100 == 0:
                print(f"rank {rank}: fused call {i + 1}/{calls} with {tokens} tokens", flush=True)
            sim.fused(x, res, gamma, spec)
        print(f"rank {rank}: calls returned", flush=True)
        dist.barrier()
    finally:
        sim.close()


if __name__ == "__main__":
    main()
