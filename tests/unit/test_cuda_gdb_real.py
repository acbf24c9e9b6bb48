"""The cuda-gdb parser and collectors on REAL outputs captured on the H100 (tests/fixtures/cuda_gdb/h100)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from repro.collectors.gpu import collect_gpu_attach, coredump_file, parse_cuda_gdb, read_cudacore
from repro.rundir import RunDir
from repro.tools import looks_like_ptrace_denied

H100 = Path(__file__).resolve().parent.parent / "fixtures" / "cuda_gdb" / "h100"
ONESHOT = "flashinfer::trtllm_allreduce_fusion::allreduce_fusion_kernel_oneshot_lamport<"
TWOSHOT = "flashinfer::trtllm_allreduce_fusion::allreduce_fusion_kernel_twoshot_sync<"


def real(name: str) -> str:
    return (H100 / name).read_text()


@pytest.mark.parametrize(
    ("name", "prefix", "grid", "block", "cluster", "running", "ranges"),
    [
        ("attach_seed_rank0_oneshot.txt", ONESHOT, 128, 512, 2, 128, ["(0,0,0)-(127,0,0)"]),
        ("attach_token_divergence_rank0_partial.txt", ONESHOT, 68, 256, 4, 8, ["(60,0,0)-(67,0,0)"]),
        ("attach_protocol_mismatch_rank1_twoshot.txt", TWOSHOT, 96, 128, 8, 96, ["(0,0,0)-(95,0,0)"]),
        ("attach_flag_offset_rank0.txt", ONESHOT, 128, 128, 8, 128, ["(0,0,0)-(127,0,0)"]),
        ("cudacore_token_divergence_rank0_partial.txt", ONESHOT, 68, 256, 4, 8, ["(60,0,0)-(67,0,0)"]),
        ("cudacore_protocol_mismatch_rank1_twoshot.txt", TWOSHOT, 96, 128, 8, 96, ["(0,0,0)-(95,0,0)"]),
        ("cudacore_missing_peer_rank0.txt", ONESHOT, 128, 256, 4, 128, ["(0,0,0)-(127,0,0)"]),
    ],
)
def test_real_outputs_name_the_kernel_grid_block_cluster_and_running_blocks(
    name: str, prefix: str, grid: int, block: int, cluster: int, running: int, ranges: list[str]
) -> None:
    (k,) = parse_cuda_gdb(real(name))
    assert k.name.startswith(prefix)
    assert "__nv_bfloat16, 2, true" in k.name
    assert k.device == 0
    assert k.grid == (grid, 1, 1) and k.block == (block, 1, 1)
    assert k.cluster == (cluster, 1, 1)  # from the focus line: cuda-gdb 13.0 prints no ClusterDim column
    assert k.running_blocks == running
    assert k.block_ranges == ranges


def test_attach_and_core_dump_of_the_same_hang_agree() -> None:
    (a,) = parse_cuda_gdb(real("attach_token_divergence_rank0_partial.txt"))
    (d,) = parse_cuda_gdb(real("cudacore_token_divergence_rank0_partial.txt"))
    assert (a.name, a.grid, a.block, a.cluster, a.running_blocks) == (d.name, d.grid, d.block, d.cluster, d.running_blocks)


def test_a_process_already_traced_is_a_ptrace_refusal_with_no_kernels() -> None:
    text = real("attach_already_traced.txt")
    assert "already traced" in text
    assert looks_like_ptrace_denied(text)
    assert parse_cuda_gdb(text) == []


def _fake_cuda_gdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str) -> None:
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "cuda-gdb"
    exe.write_text(f'#!/bin/sh\ncat "{H100 / fixture}"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_attach_under_cupti_is_a_failure_not_an_empty_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-gdb prints "No CUDA kernels." when it could not start CUDA debugging (CUPTI holds the process);
    that must not read as "nothing runs on the GPU"."""
    _fake_cuda_gdb(tmp_path, monkeypatch, "attach_under_cupti.txt")
    states, runs = collect_gpu_attach({1: os.getpid()}, RunDir.create(tmp_path, "t"), timeout=10)
    assert states == []
    (run,) = runs
    assert not run.ok and "cudbgApiAttach" in run.error and "CUPTI" in run.advice


def test_real_attach_and_core_dump_through_the_collectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rd = RunDir.create(tmp_path, "t")
    _fake_cuda_gdb(tmp_path, monkeypatch, "attach_protocol_mismatch_rank1_twoshot.txt")
    states, runs = collect_gpu_attach({1: os.getpid()}, rd, timeout=10)
    assert runs[0].ok and states[0].kernels[0].cluster == (8, 1, 1)
    _fake_cuda_gdb(tmp_path, monkeypatch, "cudacore_missing_peer_rank0.txt")
    core = coredump_file(rd, 4242)
    core.write_bytes(b"\x7fELF")
    st = read_cudacore(core, rd, rank=0, pid=4242, timeout=10)
    assert st.source == "cuda core dump" and st.kernels[0].grid == (128, 1, 1)


def test_attach_to_a_process_that_is_gone_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda_gdb(tmp_path, monkeypatch, "attach_process_gone.txt")
    states, runs = collect_gpu_attach({0: os.getpid()}, RunDir.create(tmp_path, "t"), timeout=10)
    assert states == [] and not runs[0].ok and "exited before cuda-gdb" in runs[0].error
