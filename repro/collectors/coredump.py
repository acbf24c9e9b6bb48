"""GPU state from user-triggered CUDA core dumps: no ptrace, about a second, and it kills the process.

The workers start with `repro.collectors.gpu.coredump_env` (pipes and dumps under the run folder). When
the verdict is a GPU-side hang, and only after every non-destructive collector has finished, vdiag
writes into each spinning rank's pipe at once (the driver then writes gpu/core.<pid> and aborts the
process), waits for each process to end and for its dump to stop growing, and reads the dumps offline
with cuda-gdb (`read_cudacore`), giving GpuState(source="cuda core dump").

torchrun stops the whole job when one worker dies; a rank whose dump is still being written would be
killed half-way. So the torchrun agents above the dumped workers are paused (SIGSTOP) for the duration
and resumed afterwards; the run's teardown ends them anyway.

Measured on the lent H100 (docs/gpu-validation.md): see AUTO_GPU_STATE for what `--gpu-state auto` takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from repro.collectors.gpu import coredump_file, coredump_pipe, read_cudacore, trigger_core_dump
from repro.errors import EnvironmentProblem
from repro.records import CollectorRun, GpuState
from repro.rundir import RunDir

# What `--gpu-state auto` uses first. A core dump needs no ptrace and took ~1-2 s per rank (dump and
# offline read) against 11-12 s for a cuda-gdb attach with FlashInfer loaded (docs/mechanisms.md; re-measured in
# docs/gpu-validation.md). It kills the process, which is harmless here: it is taken last, once the run is
# over. Auto falls back to attach for a rank whose dump failed while its process still lives.
AUTO_GPU_STATE = "coredump"
NAME = "cuda core dump"


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def paused_parents(pids: list[int]) -> Iterator[list[int]]:
    """SIGSTOP the parents (torchrun agents) of `pids` for the duration; never this process or init."""
    parents: set[int] = set()
    me = os.getpid()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            pp = psutil.Process(pid).ppid()
            if pp not in (0, 1, me) and pp not in pids:
                parents.add(pp)
    stopped = []
    for pp in sorted(parents):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pp, signal.SIGSTOP)
            stopped.append(pp)
    try:
        yield stopped
    finally:
        for pp in stopped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pp, signal.SIGCONT)


def _wait_dump(pid: int, core: Path, timeout: float) -> bool:
    """Until the process has ended (the driver aborts it once the dump is written) and the dump exists
    and has stopped growing; False on timeout."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            size = core.stat().st_size
        except OSError:
            size = -1
        if size != last:
            last, since = size, time.monotonic()
        if size > 0 and not _alive(pid) and time.monotonic() - since >= 0.2:
            return True
        if size > 0 and time.monotonic() - since >= 5.0:  # stable for long, process lingering
            return True
        time.sleep(0.05)
    return False


def _dump_one(rank: int, pid: int, run_dir: RunDir, timeout: float) -> tuple[GpuState | None, list[CollectorRun]]:
    t0 = time.monotonic()
    runs: list[CollectorRun] = []
    # The driver closes the pipe within 1-3 s once it starts a dump (H100 measurements); past 10 s it will not.
    trig = trigger_core_dump(coredump_pipe(run_dir, pid), timeout=min(timeout, 10.0), rank=rank)
    runs.append(trig)
    if not trig.ok:
        if not _alive(pid):
            trig = trig.model_copy(update={"error": trig.error + "; the process died meanwhile (a peer's dump ended "
                                           "the peer, and this rank's kernel maps the peer's buffers)"})
            runs[-1] = trig
        return None, runs
    core = coredump_file(run_dir, pid)
    if not _wait_dump(pid, core, timeout):
        runs.append(CollectorRun(name=NAME, rank=rank, ok=False, seconds=round(time.monotonic() - t0, 3),
                                 error=f"no complete dump at {core} after {timeout:g} s", artifact=str(core)))
        return None, runs
    dumped = time.monotonic() - t0
    try:
        state = read_cudacore(core, run_dir, rank, pid, timeout=timeout)
    except EnvironmentProblem as e:
        runs.append(CollectorRun(name=NAME, rank=rank, ok=False, seconds=round(time.monotonic() - t0, 3),
                                 error=str(e), advice=getattr(e, "advice", ""), artifact=str(core)))
        return None, runs
    total = time.monotonic() - t0
    state = state.model_copy(update={"seconds": round(total, 3)})
    runs.append(CollectorRun(
        name=NAME, rank=rank, ok=True, seconds=round(total, 3), artifact=str(core),
        error="", advice=f"dump {dumped:.2f} s, offline read {total - dumped:.2f} s, {core.stat().st_size} bytes",
    ))
    return state, runs


def collect_gpu_coredump(
    pids: dict[int, int], run_dir: RunDir, *, timeout: float = 60.0
) -> tuple[list[GpuState], list[CollectorRun]]:
    """Dump every given rank ({rank: pid}, the spinning ones) at once and read the dumps. Destructive:
    each dumped process dies. Never raises: failures come back as CollectorRun records."""
    live = {r: p for r, p in pids.items() if _alive(p)}
    if not live:
        return [], []
    states: list[GpuState] = []
    runs: list[CollectorRun] = []
    with paused_parents(list(live.values())), ThreadPoolExecutor(
        max_workers=len(live), thread_name_prefix="vdiag-coredump"
    ) as ex:
        futs = {r: ex.submit(_dump_one, r, p, run_dir, timeout) for r, p in sorted(live.items())}
        for r, fut in futs.items():
            try:
                st, rs = fut.result()
            except Exception as e:  # _dump_one does not raise; belt and braces
                st, rs = None, [CollectorRun(name=NAME, rank=r, ok=False, seconds=0.0, error=repr(e))]
            if st is not None:
                states.append(st)
            runs.extend(rs)
    return states, runs
