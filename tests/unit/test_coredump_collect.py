"""collect_gpu_coredump's glue against a stand-in for the CUDA driver: a real child process that listens
on gpu/pipe.<pid>, reads what vdiag writes, closes the pipe, writes gpu/core.<pid> and aborts, as the
driver does. cuda-gdb is replaced by a script printing a real core-dump read from the H100."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from repro.collectors.coredump import collect_gpu_coredump
from repro.collectors.gpu import coredump_file
from repro.rundir import RunDir

H100 = Path(__file__).resolve().parent.parent / "fixtures" / "cuda_gdb" / "h100"

DRIVER = r"""
import os, resource, sys, time
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # abort() below must not leave a CPU core file
gpu = sys.argv[1]
pipe = os.path.join(gpu, f"pipe.{os.getpid()}")
os.mkfifo(pipe)
fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
print("ready", flush=True)
n = 0
while n < 100_000:
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        time.sleep(0.01)
        continue
    if not chunk:
        time.sleep(0.01)
        continue
    n += len(chunk)
os.close(fd)
with open(os.path.join(gpu, f"core.{os.getpid()}"), "wb") as f:
    f.write(b"\x7fELF" + bytes(4096))
os.abort()
"""


def _fake_cuda_gdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    exe = bindir / "cuda-gdb"
    exe.write_text(f'#!/bin/sh\ncat "{H100 / "cudacore_missing_peer_rank0.txt"}"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_dump_each_spinning_rank_then_read_it_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda_gdb(tmp_path, monkeypatch)
    rd = RunDir.create(tmp_path, "t")
    gpu_dir = str((rd.root / "gpu").resolve())
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, gpu_dir], stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        states, runs = collect_gpu_coredump({0: procs[0].pid, 1: procs[1].pid}, rd, timeout=20)
        assert time.monotonic() - t0 < 15
        assert sorted(s.rank for s in states) == [0, 1]
        assert all(s.source == "cuda core dump" for s in states)
        assert states[0].kernels[0].grid == (128, 1, 1) and states[0].kernels[0].cluster == (4, 1, 1)
        assert [r.name for r in runs if r.ok].count("cuda core dump") == 2
        for p in procs:  # the dump ended the process (the driver aborts it)
            assert p.wait(timeout=10) == -signal.SIGABRT
            assert coredump_file(rd, p.pid).exists()
        assert psutil.Process().status() != psutil.STATUS_STOPPED  # never pauses itself
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_rank_with_no_pipe_is_a_recorded_failure(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path, "t")
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        states, runs = collect_gpu_coredump({3: p.pid}, rd, timeout=5)
        assert states == []
        assert runs and not runs[0].ok and runs[0].rank == 3 and "coredump_env" in runs[0].advice
        assert p.poll() is None  # nothing was done to it
    finally:
        p.kill()
        p.wait()
