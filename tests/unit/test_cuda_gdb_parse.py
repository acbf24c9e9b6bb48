"""cuda-gdb output parsing, and the GPU collectors' plumbing around it.

The fixtures under tests/fixtures/cuda_gdb/ are hand-written in cuda-gdb's documented format (each says
so in its first line) until real outputs from the GPU validation replace them. Where cuda-gdb itself is
needed, a stand-in script prints a fixture; the core-dump trigger is tested on a real named pipe.
"""

from __future__ import annotations

import os
import select
import stat
import threading
import time
from pathlib import Path

import pytest

from repro.collectors.gpu import (
    COREDUMP_GENERATION_FLAGS,
    collect_gpu_attach,
    coredump_env,
    coredump_file,
    coredump_pipe,
    parse_cuda_gdb,
    read_cudacore,
    trigger_core_dump,
)
from repro.errors import EnvironmentProblem, ExitCode
from repro.rundir import RunDir
from repro.tools import ToolMissing

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cuda_gdb"
ONESHOT = (
    "allreduce_fusion_kernel_oneshot_lamport<(flashinfer::trtllm_allreduce_fusion::AllReduceFusionPattern)1, "
    "__nv_bfloat16, 2, true, true>(flashinfer::trtllm_allreduce_fusion::AllReduceFusionParams<__nv_bfloat16>)"
)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_every_fixture_says_it_is_hand_written() -> None:
    files = sorted(FIXTURES.glob("*.txt"))
    assert files
    for f in files:
        assert "HAND-WRITTEN" in f.read_text().splitlines()[0], f


def test_spinning_oneshot_kernel_with_its_grid_and_running_blocks() -> None:
    (k,) = parse_cuda_gdb(fixture("attach_oneshot_spinning.txt"))
    assert k.name == ONESHOT
    assert k.device == 0
    assert k.grid == (64, 1, 1)
    assert k.block == (128, 1, 1)
    assert k.cluster is None
    assert k.running_blocks == 64
    assert k.block_ranges == ["(0,0,0)-(63,0,0)"]


def test_cluster_column_and_blocks_of_the_focused_kernel_only() -> None:
    fill, fused = parse_cuda_gdb(fixture("attach_cluster_column.txt"))
    assert fill.name.startswith("void at::native::vectorized_elementwise_kernel<4")
    assert (fill.device, fill.grid, fill.block, fill.cluster) == (1, (1, 1, 1), (256, 1, 1), (1, 1, 1))
    assert fill.running_blocks is None  # no block list printed for it
    assert fused.name == ONESHOT
    assert (fused.grid, fused.block, fused.cluster) == ((68, 1, 1), (256, 1, 1), (4, 1, 1))
    assert fused.running_blocks == 64
    assert fused.block_ranges == ["(0,0,0)-(31,0,0)", "(36,0,0)-(67,0,0)"]


def test_uncoalesced_block_list_counts_one_per_row() -> None:
    (k,) = parse_cuda_gdb(fixture("attach_uncoalesced.txt"))
    assert k.name.startswith("allreduce_fusion_kernel_twoshot_sync<")
    assert k.grid == (132, 1, 1) and k.block == (512, 1, 1)
    assert k.running_blocks == 4
    assert k.block_ranges == ["(4,0,0)", "(5,0,0)", "(6,0,0)", "(7,0,0)"]


def test_core_dump_output_names_the_same_kernel() -> None:
    (k,) = parse_cuda_gdb(fixture("cudacore_oneshot.txt"))
    assert k.name == ONESHOT
    assert (k.grid, k.block, k.cluster, k.running_blocks) == ((64, 1, 1), (128, 1, 1), (4, 1, 1), 64)


def test_no_kernels_and_garbage_give_an_empty_list() -> None:
    assert parse_cuda_gdb(fixture("attach_no_kernels.txt")) == []
    assert parse_cuda_gdb("") == []
    assert parse_cuda_gdb("random text\n(1,2,3) (4,5,6)\n") == []


def test_blocks_without_a_kernel_line_go_to_the_focused_kernel() -> None:
    text = (
        "  Kernel Parent Dev Grid Status   SMs Mask   GridDim  BlockDim Invocation\n"
        "       3      -   0    9 Active 0x3 (2,1,1) (32,1,1) other_kernel()\n"
        "*      4      -   0   10 Active 0xc (8,1,1) (64,1,1) focused_kernel(int)\n"
        "  BlockIdx To BlockIdx Count   State\n"
        "*  (0,0,0)     (5,0,0)     6 running\n"
    )
    other, focused = parse_cuda_gdb(text)
    assert other.running_blocks is None
    assert focused.name == "focused_kernel(int)"
    assert focused.running_blocks == 6


def test_coredump_env_points_under_the_run_folder(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path, "t")
    env = coredump_env(rd)
    gpu = (rd.root / "gpu").resolve()
    assert env["CUDA_ENABLE_USER_TRIGGERED_COREDUMP"] == "1"
    assert env["CUDA_COREDUMP_PIPE"] == str(gpu / "pipe.%p")
    assert env["CUDA_COREDUMP_FILE"] == str(gpu / "core.%p")
    assert env["CUDA_COREDUMP_GENERATION_FLAGS"] == COREDUMP_GENERATION_FLAGS
    assert "skip_global_memory" in COREDUMP_GENERATION_FLAGS
    assert coredump_pipe(rd, 42) == gpu / "pipe.42"
    assert coredump_file(rd, 42) == gpu / "core.42"


def test_trigger_writes_zeros_until_the_reader_closes_the_pipe(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.1"
    os.mkfifo(pipe)
    rfd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # the "driver" listens before the trigger comes
    got: list[bytes] = []

    def driver() -> None:  # plays the CUDA driver: reads about 100 KB, then closes the pipe
        n = 0
        deadline = time.monotonic() + 5
        try:
            while n < 100_000 and time.monotonic() < deadline:
                try:
                    chunk = os.read(rfd, 65536)
                except BlockingIOError:
                    select.select([rfd], [], [], 0.05)
                    continue
                if not chunk:  # no writer yet
                    select.select([rfd], [], [], 0.01)
                    continue
                got.append(chunk)
                n += len(chunk)
        finally:
            os.close(rfd)

    reader = threading.Thread(target=driver, daemon=True)
    reader.start()
    run = trigger_core_dump(pipe, timeout=5, rank=3)
    reader.join(timeout=5)
    assert run.ok, run.error
    assert run.rank == 3
    assert got and set(b"".join(got)) == {0}


def test_trigger_refuses_a_regular_file_and_a_pipe_nobody_reads(tmp_path: Path) -> None:
    regular = tmp_path / "not-a-pipe"
    regular.write_bytes(b"keep me")
    run = trigger_core_dump(regular, timeout=1)
    assert not run.ok and "not a named pipe" in run.error
    assert regular.read_bytes() == b"keep me"

    lonely = tmp_path / "pipe.2"
    os.mkfifo(lonely)
    run = trigger_core_dump(lonely, timeout=1)
    assert not run.ok and "nobody reads" in run.error

    run = trigger_core_dump(tmp_path / "missing", timeout=1)
    assert not run.ok and "coredump_env" in run.advice


# ---- the collectors, with cuda-gdb replaced by a script that prints a fixture ---------------------------


def fake_cuda_gdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "cuda-gdb"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_attach_parses_saves_the_raw_output_and_records_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cuda_gdb(tmp_path, monkeypatch, f'cat "{FIXTURES / "attach_oneshot_spinning.txt"}"\n')
    rd = RunDir.create(tmp_path, "t")
    states, runs = collect_gpu_attach({0: os.getpid(), 1: os.getpid()}, rd, timeout=10)
    assert [s.rank for s in states] == [0, 1]
    assert all(r.ok for r in runs)
    assert states[0].source == "cuda-gdb attach"
    assert states[0].kernels[0].grid == (64, 1, 1)
    assert Path(states[0].raw_path) == rd.gpu_file(0, "attach")
    assert "allreduce_fusion_kernel_oneshot_lamport" in rd.gpu_file(1, "attach").read_text()


def test_attach_refused_ptrace_is_recorded_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cuda_gdb(tmp_path, monkeypatch, f'cat "{FIXTURES / "attach_ptrace_denied.txt"}"\nexit 1\n')
    states, runs = collect_gpu_attach({2: os.getpid()}, RunDir.create(tmp_path, "t"), timeout=10)
    assert states == []
    (run,) = runs
    assert not run.ok and run.rank == 2
    assert "ptrace denied" in run.advice and "SYS_PTRACE" in run.advice and "ptrace_scope" in run.advice


def test_attach_retries_alone_when_another_cuda_gdb_held_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "first-call"
    fake_cuda_gdb(
        tmp_path,
        monkeypatch,
        f'if mkdir "{marker}" 2>/dev/null; then\n'
        '  echo "An instance of cuda-gdb (pid 1) is already using device 0. If you believe you are seeing '
        'this message in error, try deleting /tmp/cuda-dbg/cuda-gdb.lock."; exit 1\nfi\n'
        f'cat "{FIXTURES / "attach_oneshot_spinning.txt"}"\n',
    )
    states, runs = collect_gpu_attach({0: os.getpid()}, RunDir.create(tmp_path, "t"), timeout=10)
    assert len(states) == 1 and runs[0].ok


def test_read_cudacore_parses_the_dump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda_gdb(tmp_path, monkeypatch, f'cat "{FIXTURES / "cudacore_oneshot.txt"}"\n')
    rd = RunDir.create(tmp_path, "t")
    core = coredump_file(rd, 4242)
    core.write_bytes(b"\x7fELF fake")
    state = read_cudacore(core, rd, rank=1, pid=4242, timeout=10)
    assert state.source == "cuda core dump"
    assert state.kernels[0].cluster == (4, 1, 1)
    assert Path(state.raw_path) == rd.gpu_file(1, "cudacore")
    with pytest.raises(EnvironmentProblem):
        read_cudacore(tmp_path / "no-such-core", rd, rank=1, pid=1, timeout=10)


def test_missing_cuda_gdb_is_recorded_with_install_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr("repro.tools._extra_dirs", lambda: [])
    states, runs = collect_gpu_attach({0: os.getpid()}, RunDir.create(tmp_path, "t"), timeout=5)
    assert states == []
    assert not runs[0].ok and "cuda-gdb" in runs[0].advice
    with pytest.raises(ToolMissing) as info:
        read_cudacore(Path(__file__), RunDir.create(tmp_path, "u"), rank=0, pid=1)
    assert info.value.exit_code == ExitCode.ENVIRONMENT
