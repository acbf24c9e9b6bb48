"""GPU plumbing shared by the GPU backends, and the `nccl` backend on CUDA tensors.

* `select_device`: which GPU a rank uses (local rank modulo the visible GPUs), its NVML index (so the
  watchdog samples the right device) and whether ranks share a GPU (fewer GPUs than local ranks).
* `host_backend`: the torch.distributed backend for the host-side groups. NCCL refuses two ranks on one
  GPU, so ranks that share a GPU talk over gloo; ranks with a GPU each use NCCL for CUDA tensors
  (``cpu:gloo,cuda:nccl``, as vLLM's device groups do) and gloo for objects.
* `GpuReferenceBackend`: the unfused path vLLM takes without the fusion: a torch.distributed
  all_reduce of the CUDA tensor over the TP group, then the residual add and RMSNorm in torch.
* `placement_text`: the report's `placement` line, from the ranks' hello records.

Nothing here imports CUDA code at module import time: the CPU test suite imports this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from repro.backends.reference import ReferenceBackend

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda:N" or "cpu"
    cuda_index: int | None  # torch's index (after CUDA_VISIBLE_DEVICES)
    nvml_index: int | None  # NVML's index of the same GPU (what the watchdog samples)
    shared: bool  # several local ranks on this GPU
    name: str = ""
    local_ranks: int = 1
    gpus: int = 0


def wants_gpu(backend: str) -> bool:
    return backend in ("flashinfer", "nccl")


def _nvml_index(cuda_index: int) -> int | None:
    """NVML's index of torch's device `cuda_index` (they differ under CUDA_VISIBLE_DEVICES or with
    CUDA's default FASTEST_FIRST order). Matched by UUID, then PCI bus id; None when NVML is absent."""
    import torch

    props = torch.cuda.get_device_properties(cuda_index)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            with contextlib.suppress(Exception):
                text = str(uuid)
                h = pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
                return int(pynvml.nvmlDeviceGetIndex(h))
        bus = getattr(props, "pci_bus_id", None)
        dom = getattr(props, "pci_domain_id", 0)
        dev = getattr(props, "pci_device_id", 0)
        if bus is not None:
            with contextlib.suppress(Exception):
                h = pynvml.nvmlDeviceGetHandleByPciBusId(f"{dom:08x}:{bus:02x}:{dev:02x}.0")
                return int(pynvml.nvmlDeviceGetIndex(h))
        return cuda_index if not os.environ.get("CUDA_VISIBLE_DEVICES") else None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def select_device(backend: str, rank: int, env: Mapping[str, str] | None = None) -> DeviceChoice:
    """Pick this rank's GPU for a GPU backend and make it current; CPU where there is none.

    VDIAG_DEVICE_INDEX forces a CUDA index. Otherwise local rank modulo the visible GPUs, so with fewer
    GPUs than ranks the ranks are spread round-robin and share.
    """
    env = os.environ if env is None else env
    if not wants_gpu(backend):
        return DeviceChoice("cpu", None, None, False)
    try:
        import torch

        if not torch.cuda.is_available():
            return DeviceChoice("cpu", None, None, False)
        n = torch.cuda.device_count()
    except Exception:
        return DeviceChoice("cpu", None, None, False)
    local = int(env.get("LOCAL_RANK", rank))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    idx = int(env["VDIAG_DEVICE_INDEX"]) if "VDIAG_DEVICE_INDEX" in env else local % n
    torch.cuda.set_device(idx)
    shared = local_world > n or env.get("VDIAG_SHARED_GPU") == "1"
    name = torch.cuda.get_device_name(idx)
    return DeviceChoice(f"cuda:{idx}", idx, _nvml_index(idx), shared, name, local_world, n)


def host_backend(choice: DeviceChoice) -> str:
    """The process-group backend for the host-side groups (see the module docstring)."""
    if choice.cuda_index is None or choice.shared:
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def _torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[dtype])


def unfused_allreduce_rmsnorm_cuda(
    x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, eps: float, group: Any, *, dtype: str, nccl: bool
) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's unfused path on the GPU: all_reduce the hidden states over the TP group (NCCL in the
    model dtype; over gloo in fp32, which gloo reduces for every dtype), then residual add and RMSNorm
    computed in fp32 and stored in the model dtype, as vLLM's fused_add_rms_norm does."""
    import torch
    import torch.distributed as dist

    dt = _torch_dtype(dtype)
    dev = torch.device("cuda", torch.cuda.current_device())
    h = torch.from_numpy(np.array(x, dtype=np.float32, copy=True)).to(dev).to(dt)
    r = torch.from_numpy(np.array(residual, dtype=np.float32, copy=True)).to(dev).to(dt)
    g = torch.from_numpy(np.array(gamma, dtype=np.float32, copy=True)).to(dev).to(dt)
    if nccl:
        dist.all_reduce(h, group=group)
        s = h.float()
    else:
        s = h.float()
        dist.all_reduce(s, group=group)
        s = s.to(dt).float()
    res_out = (s + r.float()).to(dt)
    rf = res_out.float()
    inv = torch.rsqrt(rf.pow(2).mean(dim=-1, keepdim=True) + eps)
    norm = (rf * inv * g.float()).to(dt)
    return res_out.float().cpu().numpy(), norm.float().cpu().numpy()


class GpuReferenceBackend(ReferenceBackend):
    """The `nccl` backend on CUDA tensors: the unfused reference, and fusion-off scenarios on a GPU."""

    def __init__(self, *, tp_group: Any, tp_ranks: tuple[int, ...], dtype: str, nccl: bool) -> None:
        super().__init__(tp_group=tp_group, tp_ranks=tp_ranks)
        self.dtype = dtype
        self.nccl = nccl

    def unfused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        return unfused_allreduce_rmsnorm_cuda(x, residual, gamma, eps, self.tp_group, dtype=self.dtype,
                                              nccl=self.nccl)


def placement_text(devices: Mapping[int, tuple[str, str | None]], backend: str, workspace_group: str,
                   fused: bool) -> str:
    """The report's placement line. `devices`: rank -> (device string from hello, GPU name or None)."""
    by_dev: dict[str, list[int]] = {}
    for r, (dev, _) in sorted(devices.items()):
        by_dev.setdefault(dev, []).append(r)
    gpus = {d: rs for d, rs in by_dev.items() if d.startswith("cuda")}
    if not gpus:
        return f"CPU processes, one per rank ({backend})"
    names = {d for d, n in devices.values() if n}
    each = "; ".join(f"{d}: ranks {','.join(map(str, rs))}" for d, rs in sorted(gpus.items()))
    what = f"{len(devices)} ranks on {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"
    if names:
        what += f" ({', '.join(sorted(names))})"
    shared = any(len(rs) > 1 for rs in gpus.values())
    if not shared:
        return f"{what}, one rank per GPU ({each}); host groups over NCCL (CUDA tensors) and gloo (objects)"
    ws = ""
    if backend == "flashinfer" and fused:
        ws = (
            "; FlashInfer's workspace over torch symmetric memory with overlapping devices allowed "
            "(the 0.6.10-0.6.14 WORLD rendezvous)"
            if workspace_group == "world"
            else "; FlashInfer's workspace in symmetric device memory (use_symm_dev_mem=True, "
            "TorchDistBackend over the TP group)"
        )
    return (
        f"{what}, ranks SHARED GPUs ({each}): host groups over gloo{ws}; the GPU time-slices the ranks' "
        "kernels, and NVML utilisation is per device, so it cannot tell ranks on one GPU apart"
    )
