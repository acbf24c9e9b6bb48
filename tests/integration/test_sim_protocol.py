"""The sim's protocols between real processes: matched calls give the reference sum + residual + RMSNorm."""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import pytest
import torch.multiprocessing as mp

from repro import checking as ck
from repro.backends.base import CallSpec
from repro.kernel_launch import launch_config


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, oneshot: bool, token: str, out: Any) -> None:
    import torch.distributed as dist

    from repro.backends.sim import SimBackend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    be = SimBackend(rank=rank, tp=world, pp=1, tp_group=group, tp_ranks=tuple(range(world)), run_token=token,
                    max_tokens=64, width=16)
    ws = be.create_workspace("tp")
    assert ws.ok
    results = []
    for call, tokens in enumerate([16, 17, 3, 1]):
        x = ck.contribution(0, rank, world, call, tokens, 16)
        res = ck.residual(0, call, tokens, 16)
        lc = launch_config(token_num=tokens, hidden=8192, elem_bytes=2, oneshot=oneshot, nranks=world, sm_count=132)
        res_out, norm = be.fused(x, res, ck.gamma(16), CallSpec(tokens, oneshot, lc, 1e-5, "bf16"))
        ref = np.sum([ck.contribution(0, r, world, call, tokens, 16) for r in range(world)], axis=0) + res
        ref_norm = ref / np.sqrt(np.mean(ref * ref, axis=-1, keepdims=True) + 1e-5) * ck.gamma(16)
        results.append(bool(np.allclose(res_out, ref, rtol=1e-5) and np.allclose(norm, ref_norm, rtol=1e-4)))
    out.put((rank, results))
    be.close()
    dist.destroy_process_group()


@pytest.mark.parametrize(("world", "oneshot"), [(2, True), (2, False), (4, False)],
                         ids=["tp2-oneshot-lamport", "tp2-twoshot-barrier", "tp4-twoshot-barrier"])
def test_matched_calls_produce_the_reference_result(oneshot: bool, world: int) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    token = f"{os.getpid()}-test{world}{int(oneshot)}"
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, oneshot, token, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(q.get(timeout=240) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(all(v) for v in got.values()), got
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"vdiag-{token}")]


def _shared_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's shared mappings (perms with 's'), from /proc/self/maps."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            addr, perms = line.split()[:2]
            if "s" in perms:
                lo, hi = (int(x, 16) for x in addr.split("-"))
                out.append((lo, hi))
    return out


def _inside(addr: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= addr < hi for lo, hi in ranges)


def _aliasing_worker(rank: int, world: int, port: int, token: str, out: Any) -> None:
    import torch.distributed as dist

    from repro.backends.sim import SimBackend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    groups = {g: dist.new_group(list(g)) for g in ((0, 1), (2, 3))}
    mine = (0, 1) if rank < 2 else (2, 3)
    be = SimBackend(rank=rank, tp=2, pp=2, tp_group=groups[mine], tp_ranks=mine, run_token=token,
                    max_tokens=16, width=8)
    ws = be.create_workspace("world")  # FlashInfer 0.6.10-0.6.14: stage 1 gets stage 0's buffers
    shared = _shared_ranges()
    out.put((rank, {
        "peers": list(ws.peers),
        "flags_shared": _inside(be.flags.ctypes.data, shared),
        "lamport_shared": all(_inside(p.lamport.ctypes.data, shared) for p in be.peers),
        "barrier_shared": all(_inside(p.barrier.ctypes.data, shared) for p in be.peers),
    }))
    dist.barrier()
    be.close()
    dist.destroy_process_group()


def test_control_ints_are_private_even_when_two_tp_groups_share_the_buffers() -> None:
    """FlashInfer's flag_ptr (CTA counter, two-shot flag, Lamport flag, sizes) is a rank-private
    allocation; only the comm, barrier and Lamport buffers are mapped by peers. Fails if any rank's
    counter or flags sit in memory another process maps, the case in which a rank could wait on a
    counter another process writes."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    token = f"{os.getpid()}-alias"
    port = _port()
    procs = [ctx.Process(target=_aliasing_worker, args=(r, 4, port, token, q)) for r in range(4)]
    for p in procs:
        p.start()
    try:
        got = dict(q.get(timeout=240) for _ in range(4))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert got[2]["peers"] == got[0]["peers"] and got[3]["peers"] == got[1]["peers"]  # the buffers are aliased
    for r, g in got.items():
        assert g["lamport_shared"] and g["barrier_shared"], (r, g)  # the check sees shared memory as shared
        assert not g["flags_shared"], f"rank {r}: its control ints lie in a shared mapping"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"vdiag-{token}")]
