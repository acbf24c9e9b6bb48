"""FlashInfer's launch arithmetic for the fused all-reduce (`allreduce_fusion_kernel_launcher` in
include/flashinfer/comm/trtllm_allreduce_fusion.cuh), written from its description; see docs/mechanisms.md, "The launch".

Nothing in it measures time or load: the grid is a pure function of the arguments and the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

BYTES_PER_ACCESS = 16


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    cluster: tuple[int, int, int]
    cluster_num: int
    kernel: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> str:
        return f"<<<{self.grid[0]},{self.block[0]}>>> cluster {self.cluster[0]}"


def kernel_name(oneshot: bool, pattern: str, dtype: str, nranks: int, fp32_acc: bool) -> str:
    ctype = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}[dtype]
    pat = {
        "residual_rmsnorm": "kARResidualRMSNorm",
        "residual_rmsnorm_fp8": "kARResidualRMSNormFP8Quant",
        "residual_rmsnorm_fp4": "kARResidualRMSNormFP4Quant",
        "allreduce": "kAllReduce",
    }.get(pattern, pattern)
    base = "allreduce_fusion_kernel_oneshot_lamport" if oneshot else "allreduce_fusion_kernel_twoshot_sync"
    acc = "true" if fp32_acc and dtype != "fp32" else "false"
    return f"{base}<AllReduceFusionPattern::{pat}, {ctype}, {nranks}, {acc}>"


def launch_config(
    *,
    token_num: int,
    hidden: int,
    elem_bytes: int,
    oneshot: bool,
    nranks: int,
    sm_count: int,
    sm_version: int = 90,
    max_registers_per_block: int = 65536,
    regs_per_thread: int = 64,
    max_cluster_size: int = 8,
    pattern: str = "residual_rmsnorm",
    dtype: str = "bf16",
    fp32_acc: bool = True,
) -> LaunchConfig:
    vec = BYTES_PER_ACCESS // elem_bytes
    if hidden % vec:
        raise ValueError(f"hidden {hidden} is not a multiple of the {vec}-element vector")
    cluster_num = token_num
    if not oneshot:
        cluster_num = token_num // nranks + (1 if token_num % nranks else 0)
    threads_per_token = hidden // vec
    cluster_size = 8 if sm_version >= 90 else 1
    # Since 0.6.16 the launcher also caps the cluster at what the occupancy query allows.
    cluster_size = min(cluster_size, max_cluster_size)
    while threads_per_token % cluster_size != 0 and cluster_size > 1:
        cluster_size //= 2
    threads_per_block = threads_per_token // cluster_size
    while threads_per_block < 128 and cluster_size >= 2:
        threads_per_block *= 2
        cluster_size //= 2
    max_threads_per_block = min(max_registers_per_block // regs_per_thread, 1024)

    def adjust(tpb: int, cs: int) -> tuple[int, int]:
        while cluster_num * cs > sm_count and cs > 1 and tpb <= max_threads_per_block // 2:
            tpb *= 2
            cs //= 2
        return tpb, cs

    baseline = (threads_per_block, cluster_size)
    block_size = threads_per_block
    if pattern == "residual_rmsnorm_fp4":
        for cand in (160, 192, 128):
            if 128 <= cand <= max_threads_per_block and threads_per_token % cand == 0:
                ccs = threads_per_token // cand
                if ccs <= 8 and ccs & (ccs - 1) == 0:
                    block_size, cluster_size = cand, ccs
                    break
        threads_per_block = block_size
    threads_per_block, cluster_size = adjust(threads_per_block, cluster_size)
    if oneshot and threads_per_block * cluster_size != threads_per_token:
        threads_per_block, cluster_size = adjust(*baseline)
    block_size = threads_per_block
    grid = (min(sm_count, cluster_num * cluster_size) // cluster_size) * cluster_size
    if sm_version < 90:
        cluster_size = 1
    return LaunchConfig(
        grid=(grid, 1, 1),
        block=(block_size, 1, 1),
        cluster=(cluster_size, 1, 1),
        cluster_num=cluster_num,
        kernel=kernel_name(oneshot, pattern, dtype, nranks, fp32_acc),
    )
