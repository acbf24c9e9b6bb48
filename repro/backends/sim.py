"""The `sim` backend: FlashInfer's one-shot Lamport and two-shot barrier protocols over CPU shared memory.

Each rank owns one workspace segment in /dev/shm with the layout of FlashInfer's IPC workspace, reduced to
rank granularity. Only the buffers that peers write are in it (FlashInfer's workspace entries 0..3N-1):

    barrier  int32[N]   two-shot barrier flags, one per peer
    comm     f32[2*M*W] two-shot buffer: inputs, then reduced sums
    lamport  f32[3*N*M*W] one-shot Lamport buffers, triple-buffered, initialised to the -0.0 sentinel

(M: max tokens, W: payload width per token, N: tp.) Peers' segments are mapped by name after a rendezvous
over the configured group, exactly as FlashInfer gathers IPC handles: rank i of the group takes entry i of
the gathered list. Over WORLD with PP > 1 that hands the stage-1 ranks the stage-0 ranks' buffers.

The five control ints (CTA arrival counter, two-shot flag, Lamport flag, comm size, clear size) are
FlashInfer's `flag_ptr` (workspace entry 3N): a rank-private allocation that no peer maps. Here they live in
the rank's own process memory (`SimBackend.flags`), outside every shared mapping, so no other process can
write them, whatever group the workspace was rendezvoused over.

The spin-waits are the kernel's: the Lamport poll spins until no -0.0 is left in the rank's own buffer,
the two-shot barrier spins on its peers' flags, and the end-of-kernel update spins until the CTA arrival
counter equals this rank's own grid size (a private counter: only this launch's CTAs add to it). A wait that
never ends burns a core, like the GPU spins. Segment files are unlinked as soon as every rank has mapped its
peers, so no name outlives the run.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from repro.backends.base import CallSpec, WorkspaceInfo
from repro.backends.reference import unfused_allreduce_rmsnorm
from repro.checking import add_and_norm

FLAG_INTS = 5  # FlashInfer's flag_ptr: [CTA arrival counter, two-shot flag, Lamport flag, comm size, clear size]
H_COUNTER, H_SYNC_FLAG, H_LAMPORT_FLAG, H_COMM_SIZE, H_CLEAR_SIZE = range(FLAG_INTS)
NEG_ZERO_BITS = np.uint32(0x80000000)
SHM_DIR = "/dev/shm"


def relax(spins: int) -> None:
    """One turn of a spin-wait: yield the core to a peer that shares it, without sleeping, so a rank
    that waits forever burns a core as the GPU spin does."""
    os.sched_yield()


def segment_prefix(run_token: str) -> str:
    return f"vdiag-{run_token}-"


@dataclass
class _Segment:
    name: str
    fd: int
    mm: mmap.mmap
    barrier: np.ndarray
    comm: np.ndarray
    lamport: np.ndarray
    lamport_bits: np.ndarray


def _layout(tp: int, max_tokens: int, width: int) -> tuple[int, int, int, int]:
    comm_elems = 2 * max_tokens * width
    lam_elems = 3 * tp * max_tokens * width
    nbytes = 4 * (tp + comm_elems + lam_elems)
    return nbytes, tp, comm_elems, lam_elems


def _map(path: str, tp: int, max_tokens: int, width: int, create: bool) -> _Segment:
    nbytes, nflags, comm_elems, lam_elems = _layout(tp, max_tokens, width)
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    if create:
        os.ftruncate(fd, nbytes)
    mm = mmap.mmap(fd, nbytes)
    buf = np.frombuffer(mm, dtype=np.int32)
    off = 0
    barrier = buf[off : off + nflags]
    off += nflags
    fbuf = np.frombuffer(mm, dtype=np.float32)
    comm = fbuf[off : off + comm_elems]
    off += comm_elems
    lamport = fbuf[off : off + lam_elems]
    lamport_bits = lamport.view(np.uint32)
    if create:
        barrier[:] = 0
        comm[:] = 0.0
        lamport_bits[:] = NEG_ZERO_BITS
    return _Segment(os.path.basename(path), fd, mm, barrier, comm, lamport, lamport_bits)


class SimBackend:
    name = "sim"

    def __init__(
        self,
        *,
        rank: int,
        tp: int,
        pp: int,
        tp_group: dist.ProcessGroup,
        tp_ranks: tuple[int, ...],
        run_token: str,
        max_tokens: int,
        width: int,
    ) -> None:
        self.rank = rank
        self.tp = tp
        self.pp = pp
        self.tp_rank = rank % tp
        self.tp_group = tp_group
        self.tp_ranks = tp_ranks
        self.run_token = run_token
        self.max_tokens = max_tokens
        self.width = width
        self.own: _Segment | None = None
        self.peers: list[_Segment] = []
        # flag_ptr: private to this rank (ordinary process memory, never in a shared mapping)
        self.flags = np.zeros(FLAG_INTS, dtype=np.int32)
        self.flags[H_COMM_SIZE] = tp * max_tokens * width  # one of the three Lamport buffers

    # ---- workspace ------------------------------------------------------------------------------
    def create_workspace(self, rendezvous: str) -> WorkspaceInfo:
        path = os.path.join(SHM_DIR, f"{segment_prefix(self.run_token)}ws{self.rank}")
        self.own = _map(path, self.tp, self.max_tokens, self.width, create=True)
        if rendezvous == "world":
            group_ranks = tuple(range(dist.get_world_size()))
            gathered: list[str | None] = [None] * len(group_ranks)
            dist.all_gather_object(gathered, self.own.name)
        else:
            group_ranks = self.tp_ranks
            gathered = [None] * len(group_ranks)
            dist.all_gather_object(gathered, self.own.name, group=self.tp_group)
        # FlashInfer opens the handle of group entry i as "peer i": the first tp entries of the list.
        names = [str(n) for n in gathered[: self.tp]]
        owners = tuple(group_ranks[: self.tp])
        for n in names:
            if n == self.own.name:
                self.peers.append(self.own)
            else:
                self.peers.append(_map(os.path.join(SHM_DIR, n), self.tp, self.max_tokens, self.width, create=False))
        # Every rank has mapped what it needs: drop the names so nothing outlives the run.
        dist.barrier()
        os.unlink(path)
        return WorkspaceInfo(
            ok=True,
            rendezvous_group=group_ranks,
            tp_group=self.tp_ranks,
            peers=tuple(names),
            peer_owner_ranks=owners,
        )

    def offset_flag(self, offset: int) -> None:
        h = self.flags
        h[H_LAMPORT_FLAG] = (int(h[H_LAMPORT_FLAG]) + offset) % 3

    # ---- the CTA arrival counter (spin-wait a) ----------------------------------------------------
    def _arrive(self, grid: int) -> None:
        """Every CTA of this launch adds one to the rank's private counter (at rank granularity: all at once)."""
        self.flags[H_COUNTER] += grid

    def _update(self, grid: int, slot: int, value: int, clear_size: int | None = None) -> None:
        """Block 0 waits until every CTA of *this* launch arrived (counter == own gridDim), then publishes.
        The counter is private, so only this launch's arrivals count."""
        h = self.flags
        spins = 0
        while int(h[H_COUNTER]) != grid:
            relax(spins)
            spins += 1
        h[slot] = value
        if clear_size is not None:
            h[H_CLEAR_SIZE] = clear_size
        h[H_COUNTER] = 0

    # ---- one-shot Lamport --------------------------------------------------------------------------
    def _oneshot(self, x: np.ndarray, spec: CallSpec) -> np.ndarray:
        assert self.peers
        grid = spec.launch.grid[0]
        self._arrive(grid)
        h = self.flags
        flag = int(h[H_LAMPORT_FLAG])
        comm_size = int(h[H_COMM_SIZE])
        clear_size = int(h[H_CLEAR_SIZE])
        data_off = (flag % 3) * comm_size
        clear_off = ((flag + 2) % 3) * comm_size
        tot = x.size
        n = self.tp
        flat = x.reshape(-1).copy()
        flat[(flat == 0) & np.signbit(flat)] = 0.0  # remove_neg_zero
        start = data_off + self.tp_rank * tot
        for peer in self.peers:
            peer.lamport[start : start + tot] = flat
        own = self.peers[self.tp_rank]
        own.lamport_bits[clear_off : clear_off + clear_size] = NEG_ZERO_BITS
        region_bits = own.lamport_bits[data_off : data_off + n * tot]
        spins = 0
        while (region_bits == NEG_ZERO_BITS).any():  # the Lamport poll (spin-wait c)
            relax(spins)
            spins += 1
        vals = own.lamport[data_off : data_off + n * tot].reshape(n, tot)
        total = vals.sum(axis=0, dtype=np.float32)
        self._update(grid, H_LAMPORT_FLAG, (flag + 1) % 3, clear_size=tot * n)
        return total.reshape(x.shape)

    # ---- two-shot with Barrier::sync ---------------------------------------------------------------
    def _barrier_sync(self, flag_value: int) -> int:
        new = 0 if flag_value == 2 else flag_value + 1
        prev = 2 if new == 0 else new - 1
        for peer in self.peers:
            peer.barrier[self.tp_rank] = new
        own = self.peers[self.tp_rank]
        spins = 0
        while (own.barrier[: self.tp] == prev).any():  # spin-wait b
            relax(spins)
            spins += 1
        return new

    def _twoshot(self, x: np.ndarray, spec: CallSpec) -> np.ndarray:
        grid = spec.launch.grid[0]
        self._arrive(grid)
        n = self.tp
        tokens, width = x.shape
        tot = tokens * width
        per, rem = divmod(tokens, n)
        begin = [r * per + min(r, rem) for r in range(n)]
        count = [per + (1 if rem > r else 0) for r in range(n)]
        own = self.peers[self.tp_rank]
        flag_value = int(self.flags[H_SYNC_FLAG])
        own.comm[:tot] = x.reshape(-1)
        flag_value = self._barrier_sync(flag_value)
        b, c = begin[self.tp_rank] * width, count[self.tp_rank] * width
        acc = np.zeros(c, dtype=np.float32)
        for peer in self.peers:
            acc += peer.comm[b : b + c]
        for peer in self.peers:
            peer.comm[tot + b : tot + b + c] = acc
        flag_value = self._barrier_sync(flag_value)
        out = own.comm[tot : 2 * tot].copy()
        self._update(grid, H_SYNC_FLAG, flag_value)
        return out.reshape(x.shape)

    # ---- the calls the replay makes -------------------------------------------------------------------
    def fused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, spec: CallSpec
    ) -> tuple[np.ndarray, np.ndarray]:
        if x.shape[0] > self.max_tokens:
            raise ValueError(f"{x.shape[0]} tokens exceed the workspace's max_token_num {self.max_tokens}")
        total = self._oneshot(x, spec) if spec.oneshot else self._twoshot(x, spec)
        return add_and_norm(total, residual, gamma, spec.eps)

    def unfused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        return unfused_allreduce_rmsnorm(x, residual, gamma, eps, self.tp_group)

    def close(self) -> None:
        seen: set[int] = set()
        for seg in [*self.peers, *([self.own] if self.own else [])]:
            if id(seg) in seen:
                continue
            seen.add(id(seg))
            try:
                os.close(seg.fd)
            except OSError:
                pass
        self.peers = []
