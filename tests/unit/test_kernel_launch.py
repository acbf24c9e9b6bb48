"""repro/kernel_launch.py against the worked grids in docs/mechanisms.md and the measured ones (H100, cuda-gdb).

The arithmetic is FlashInfer 0.7.2.post1's `allreduce_fusion_kernel_launcher`
(include/flashinfer/comm/trtllm_allreduce_fusion.cuh): cluster = min(8, max cluster from the occupancy
query since 0.6.16), halved until it divides threads per token; threads per block doubled (cluster halved)
until >= 128; then, while cluster_num * cluster > SM count and threads per block <= max threads / 2, threads
doubled and cluster halved; grid = (min(SMs, cluster_num * cluster) // cluster) * cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from repro.kernel_launch import launch_config

H100 = Path(__file__).resolve().parent.parent / "fixtures" / "cuda_gdb" / "h100"


def lc(tokens: int, *, hidden: int = 8192, oneshot: bool = True, nranks: int = 2, sms: int = 132,
       regs: int = 64, max_cluster: int = 8, sm_version: int = 90, pattern: str = "residual_rmsnorm"
       ) -> tuple[int, int, int]:
    c = launch_config(token_num=tokens, hidden=hidden, elem_bytes=2, oneshot=oneshot, nranks=nranks,
                      sm_count=sms, sm_version=sm_version, regs_per_thread=regs, max_cluster_size=max_cluster,
                      pattern=pattern)
    return c.grid[0], c.block[0], c.cluster[0]


@pytest.mark.parametrize(
    ("tokens", "sms", "expected"),
    [
        (16, 132, (128, 128, 8)),  # docs/mechanisms.md: one-shot T=16 -> grid 128 (cluster 8 x 128 threads)
        (17, 132, (68, 256, 4)),  # T=17 -> grid 68 (cluster 4 x 256)
        (512, 132, (132, 1024, 1)),  # T=512 -> 132
        (16, 114, (64, 256, 4)),  # 114 SMs: T=16 -> 64
        (128, 114, (114, 1024, 1)),  # 114 SMs: T=128 -> 114
    ],
)
def test_worked_grids_from_notes(tokens: int, sms: int, expected: tuple[int, int, int]) -> None:
    assert lc(tokens, sms=sms) == expected


def test_grid_measured_with_cuda_gdb_in_the_first_trial() -> None:
    """docs/mechanisms.md (H100, cuda-gdb): bf16, hidden 4096, TP=2, T=16 one-shot -> grid (64,1,1), block (128,1,1), cluster 4."""
    c = launch_config(token_num=16, hidden=4096, elem_bytes=2, oneshot=True, nranks=2, sm_count=132)
    assert (c.grid, c.block, c.cluster) == ((64, 1, 1), (128, 1, 1), (4, 1, 1))
    assert c.kernel.startswith("allreduce_fusion_kernel_oneshot_lamport<")


@pytest.mark.parametrize(
    ("tokens", "oneshot", "expected"),
    [
        (64, True, (128, 512, 2)),  # seed rank 0, capture size 64 (attach_seed_rank0_oneshot.txt)
        (32, True, (128, 256, 4)),  # seed rank 2, capture size 32
        (17, True, (68, 256, 4)),  # token divergence, the rank with 17 tokens
        (16, True, (128, 128, 8)),  # its peer, and the flag-offset ranks
        (24, True, (96, 256, 4)),  # protocol mismatch, the one-shot rank
        (24, False, (96, 128, 8)),  # protocol mismatch, the two-shot rank: cluster_num = ceil(24 / 2) = 12
    ],
)
def test_grids_measured_on_the_h100_validation(tokens: int, oneshot: bool, expected: tuple[int, int, int]) -> None:
    """Llama-70B shape (hidden 8192), bf16, TP=2, 132 SMs, 56 registers (cuobjdump), cluster limit 8:
    what cuda-gdb (attach and core dump) and CUPTI showed for the hung kernels (docs/gpu-validation.md)."""
    assert lc(tokens, oneshot=oneshot, regs=56) == expected


def test_registers_measured_by_cuobjdump() -> None:
    text = (H100 / "cuobjdump_resource_usage_bf16_tp2.txt").read_text()
    assert text.count("REG:56") == 6  # every bf16 TP=2 kARResidualRMSNorm variant: 56 registers


def test_max_cluster_occupancy_cap_since_0_6_16() -> None:
    """A device (or kernel) that allows clusters of 4 at most starts from 4, not 8."""
    assert lc(16, max_cluster=4) == (64, 256, 4)
    assert lc(16, max_cluster=2) == (32, 512, 2)
    assert lc(16, max_cluster=1) == (16, 1024, 1)


def test_register_limit_stops_the_block_from_growing() -> None:
    """max threads per block = min(65536 // regs, 1024): with 128 registers only 512, so at T=512 the
    loop stops at 512 threads x cluster 2."""
    assert lc(512, regs=128) == (132, 512, 2)
    assert lc(512, regs=64) == (132, 1024, 1)


def test_two_shot_counts_clusters_per_rank() -> None:
    assert lc(512, oneshot=False) == (132, 1024, 1)
    assert lc(8, oneshot=False, nranks=4) == (16, 128, 8)  # cluster_num = ceil(8 / 4) = 2


def test_pre_hopper_launches_without_clusters() -> None:
    c = launch_config(token_num=16, hidden=8192, elem_bytes=2, oneshot=True, nranks=2, sm_count=108,
                      sm_version=80, max_cluster_size=1)
    assert c.cluster == (1, 1, 1) and c.block == (1024, 1, 1) and c.grid == (16, 1, 1)


def test_fp4_pattern_prefers_160_then_192_threads() -> None:
    # hidden 5120: 640 threads per token; 160 divides it with cluster 4 (a power of two)
    c = launch_config(token_num=4, hidden=5120, elem_bytes=2, oneshot=True, nranks=2, sm_count=132,
                      pattern="residual_rmsnorm_fp4")
    assert (c.block[0], c.cluster[0]) == (160, 4)
