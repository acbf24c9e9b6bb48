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


# A driver modelled on what the H200 showed (docs/gpu-validation.md): its pipe appears late (CUDA
# initialises after the hello record), and a trigger that arrives while another process on the GPU is
# being dumped is drained but never begins a dump. One GPU, one dump at a time: the lock file below.
BUSY_GPU_DRIVER = r"""
import fcntl, os, resource, sys, time
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
gpu, delay = sys.argv[1], float(sys.argv[2])
print("ready", flush=True)
time.sleep(delay)
pipe = os.path.join(gpu, f"pipe.{os.getpid()}")
os.mkfifo(pipe)
fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
device = os.open(os.path.join(gpu, "device.lock"), os.O_RDWR | os.O_CREAT, 0o600)
n, stuck = 0, False
while True:
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        chunk = b""
    if chunk and n == 0:
        try:
            fcntl.flock(device, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stuck = True  # another dump holds the device: drain the pipe for ever, never dump
    n += len(chunk)
    if n >= 100_000 and not stuck:
        break
    time.sleep(0.005)
os.close(fd)
time.sleep(0.3)
with open(os.path.join(gpu, f"core.{os.getpid()}"), "wb") as f:
    f.write(b"\x7fELF" + bytes(4096))
os.abort()
"""


def _busy_gpu_ranks(tmp_path: Path) -> tuple[RunDir, list[subprocess.Popen[str]]]:
    rd = RunDir.create(tmp_path, "t")
    gpu_dir = str((rd.root / "gpu").resolve())
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_GPU_DRIVER, gpu_dir, d], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path) for d in ("0", "1.0", "0")]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return rd, procs


def test_every_rank_is_dumped_one_at_a_time_when_one_pipe_is_late_and_the_gpu_takes_one_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_cuda_gdb(tmp_path, monkeypatch)
    monkeypatch.delenv("VDIAG_COREDUMP_CONCURRENT", raising=False)
    rd, procs = _busy_gpu_ranks(tmp_path)
    try:
        states, runs = collect_gpu_coredump({i: p.pid for i, p in enumerate(procs)}, rd, timeout=20)
        assert sorted(s.rank for s in states) == [0, 1, 2], [r.model_dump() for r in runs if not r.ok]
        for p in procs:
            assert p.wait(timeout=10) == -signal.SIGABRT  # each died of its own dump
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_triggered_all_at_once_a_rank_whose_driver_never_dumps_is_described_from_proc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_cuda_gdb(tmp_path, monkeypatch)
    monkeypatch.setenv("VDIAG_COREDUMP_CONCURRENT", "1")
    rd, procs = _busy_gpu_ranks(tmp_path)
    try:
        states, runs = collect_gpu_coredump({i: p.pid for i, p in enumerate(procs)}, rd, timeout=4)
        assert len(states) < 3
        stuck = [r for r in runs if r.name == "cuda core dump trigger" and not r.ok]
        assert stuck and all("had not closed" in r.error for r in stuck)
        assert all("from /proc: alive, TracerPid 0" in r.advice for r in stuck), [r.advice for r in stuck]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_rank_whose_dump_started_is_not_handed_to_cuda_gdb(tmp_path: Path) -> None:
    from repro.collectors.coredump import attach_candidates, explain_attach
    from repro.records import CollectorRun
    from repro.tools import ptrace_advice

    rd = RunDir.create(tmp_path, "t")
    held, free = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(2))
    try:
        coredump_file(rd, held.pid).write_bytes(bytes(5_000_000))  # the driver had begun writing it
        trig = CollectorRun(name="cuda core dump trigger", rank=0, ok=False, seconds=10.0,
                            error=f"the driver had not closed pipe.{held.pid} after 10 s (6029312 bytes written)")
        ok, skipped = attach_candidates({0: held.pid, 1: free.pid}, rd, [trig])
        assert ok == {1: free.pid}
        assert len(skipped) == 1 and skipped[0].rank == 0 and "5000000 bytes" in skipped[0].error
        assert "SYS_PTRACE" not in skipped[0].advice.replace("not a missing SYS_PTRACE", "")
        denied = CollectorRun(name="cuda-gdb attach", rank=1, ok=False, seconds=1.0,
                              error="ptrace: Operation not permitted.", advice=ptrace_advice("cuda-gdb"))
        [explained] = explain_attach([denied], triggered={1}, ptrace_ok={1})
        assert "py-spy attached to this process earlier" in explained.advice
        assert "after its CUDA core dump had been triggered" in explained.advice
        [kept] = explain_attach([denied], triggered={1}, ptrace_ok=set())  # no proof ptrace works: keep it
        assert "SYS_PTRACE" in kept.advice
    finally:
        for p in (held, free):
            p.kill()
            p.wait()
