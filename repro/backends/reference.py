"""The `nccl` backend: the unfused path, torch.distributed all_reduce then residual add and RMSNorm.

It is the comparison point and serves fusion-off scenarios. On the CPU the group runs over gloo; where
each rank has its own GPU it runs over NCCL, as vLLM does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from repro.backends.base import CallSpec, WorkspaceInfo
from repro.checking import add_and_norm


def unfused_allreduce_rmsnorm(
    x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, eps: float, group: dist.ProcessGroup
) -> tuple[np.ndarray, np.ndarray]:
    t = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
    dist.all_reduce(t, group=group)
    return add_and_norm(t.numpy(), residual, gamma, eps)


class ReferenceBackend:
    name = "nccl"

    def __init__(self, *, tp_group: dist.ProcessGroup, tp_ranks: tuple[int, ...]) -> None:
        self.tp_group = tp_group
        self.tp_ranks = tp_ranks

    def create_workspace(self, rendezvous: str) -> WorkspaceInfo:
        return WorkspaceInfo(ok=False, rendezvous_group=(), tp_group=self.tp_ranks, error="the nccl backend has no fused op")

    def fused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, spec: CallSpec
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.unfused(x, residual, gamma, spec.eps)

    def unfused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        return unfused_allreduce_rmsnorm(x, residual, gamma, eps, self.tp_group)

    def offset_flag(self, offset: int) -> None:
        return None

    def close(self) -> None:
        return None
