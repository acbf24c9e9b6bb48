"""What every backend gives the replay: a workspace for the fused op, the fused call and the unfused call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from repro.kernel_launch import LaunchConfig


@dataclass
class WorkspaceInfo:
    ok: bool
    rendezvous_group: tuple[int, ...]
    tp_group: tuple[int, ...]
    peers: tuple[str, ...] = ()
    peer_owner_ranks: tuple[int, ...] = ()
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ident(self) -> str:
        return ",".join(self.peers)


@dataclass
class CallSpec:
    """One fused call as the replay asks for it (the real shape; the payload may be narrower)."""

    token_num: int
    oneshot: bool
    launch: LaunchConfig
    eps: float
    dtype: str
    phase: str = ""  # workspace | profile | warmup | capture
    seq: int = -1  # the replay's call sequence number (matches the launch record)
    graph: bool = False  # the capture loop's captured run: GPU backends capture a CUDA graph and replay it


class Backend(Protocol):
    name: str

    def create_workspace(self, rendezvous: str) -> WorkspaceInfo: ...

    def fused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, spec: CallSpec
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def unfused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def offset_flag(self, offset: int) -> None: ...

    def close(self) -> None: ...
