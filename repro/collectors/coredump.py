"""GPU state from user-triggered CUDA core dumps: no ptrace, about a second, and it kills the process.

The workers start with `repro.collectors.gpu.coredump_env` (pipes and dumps under the run folder). When
the verdict is a GPU-side hang, and only after every non-destructive collector has finished, vdiag
writes into each spinning rank's pipe in turn (the driver then writes gpu/core.<pid> and aborts the
process), waits for each process to end and for its dump to stop growing, and reads the dumps offline
with cuda-gdb (`read_cudacore`), giving GpuState(source="cuda core dump").

torchrun stops the whole job when one worker dies; a rank whose dump is still being written would be
killed half-way. So the torchrun agents above the dumped workers are paused (SIGSTOP) for the duration
and resumed afterwards; the run's teardown ends them anyway.

Each rank's trigger waits until the driver has the rank's pipe open for reading (CUDA initialises after
the rank's first record), and the ranks are dumped one at a time. Measured on the lent H200 (2026-12-01,
ranks sharing one GPU, docs/gpu-validation.md): triggered all at once, one rank's driver kept reading its
pipe and never began the dump in 5 of 6 multi-rank hangs (TracerPid 0, no core bytes after 60 s); one at
a time, 11 of 11 spinning ranks in 3 runs were dumped in 1.3-5.9 s each, and no rank died of a peer's
dump. A rank whose dump was started (its trigger read, its core file begun) is not handed to cuda-gdb
afterwards: on the H200 such processes refused cuda-gdb's ptrace although vdiag ran as root, so the
advice says that rather than asking for SYS_PTRACE (`attach_candidates`, `explain_attach`).

Measured on the lent H100 (docs/gpu-validation.md): see AUTO_GPU_STATE for what `--gpu-state auto` takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
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


def pipe_reader_ready(pipe: Path, pid: int, timeout: float) -> str:
    """Wait until the driver has created `pipe` and process `pid` holds it open (its reader is ready):
    "" when ready, else why not. Looks at /proc/<pid>/fd and never opens the pipe, so it cannot disturb
    the driver; where /proc cannot be read, an existing FIFO counts as ready."""
    deadline = time.monotonic() + timeout
    target = str(pipe.resolve()) if pipe.exists() else str(pipe)
    while True:
        if not _alive(pid):
            return "the process had exited before its dump was triggered"
        try:
            if stat.S_ISFIFO(pipe.stat().st_mode):
                target = str(pipe.resolve())
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    return ""
                for fd in fds:
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                            return ""
            else:
                return f"{pipe} is not a named pipe"
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            return f"the driver had not opened {target} for reading after {timeout:g} s"
        time.sleep(0.05)


def _dump_one(
    rank: int, pid: int, run_dir: RunDir, timeout: float, start: threading.Barrier | None = None,
    ready_timeout: float = 5.0,
) -> tuple[GpuState | None, list[CollectorRun]]:
    t0 = time.monotonic()
    runs: list[CollectorRun] = []
    pipe = coredump_pipe(run_dir, pid)
    not_ready = pipe_reader_ready(pipe, pid, ready_timeout)
    if start is not None:  # every rank's trigger at the same moment, once every reader is ready
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(timeout=ready_timeout + 1.0)
    if not_ready and not pipe.exists():
        runs.append(CollectorRun(name="cuda core dump trigger", rank=rank, ok=False,
                                 seconds=round(time.monotonic() - t0, 3), error=f"no coredump pipe at {pipe}",
                                 advice="start the workers with coredump_env() in their environment",
                                 artifact=str(pipe)))
        return None, runs
    # The driver closes the pipe within 1-3 s once it starts a dump (H100 measurements); past 10 s it will not.
    trig = trigger_core_dump(pipe, timeout=min(timeout, 10.0), rank=rank)
    runs.append(trig)
    if not trig.ok:
        core = coredump_file(run_dir, pid)
        size = core.stat().st_size if core.exists() else 0
        if not _alive(pid):
            trig = trig.model_copy(update={"error": trig.error + "; the process died meanwhile, without a dump",
                                           "advice": "this rank's stacks and pending launch record are in the "
                                           "report"})
        elif size or "had not closed" in trig.error:
            # The driver kept reading the pipe without closing it (seen on the H200 when several dumps were
            # triggered at once). Give the dump the rest of the timeout before giving up on it.
            if _wait_dump(pid, core, max(0.0, timeout - (time.monotonic() - t0))):
                runs[-1] = trig.model_copy(update={"ok": True, "advice": (
                    f"the driver did not close the pipe within 10 s, but the dump arrived "
                    f"{time.monotonic() - t0:.1f} s after the trigger")})
                return _read_dump(rank, pid, run_dir, core, timeout, t0, runs)
            state = process_state(pid)
            trig = trig.model_copy(update={"advice": (
                f"the driver took the trigger but had written {size} bytes of gpu/{core.name} after "
                f"{time.monotonic() - t0:.0f} s ({state}); its stacks and pending launch record are in the report")})
        elif not_ready:
            trig = trig.model_copy(update={"error": f"{not_ready}; {trig.error}"})
        runs[-1] = trig
        return None, runs
    core = coredump_file(run_dir, pid)
    if not _wait_dump(pid, core, timeout):
        runs.append(CollectorRun(name=NAME, rank=rank, ok=False, seconds=round(time.monotonic() - t0, 3),
                                 error=f"no complete dump at {core} after {timeout:g} s ({process_state(pid)})",
                                 artifact=str(core)))
        return None, runs
    return _read_dump(rank, pid, run_dir, core, timeout, t0, runs)


def process_state(pid: int) -> str:
    """What the OS says of a process whose dump does not finish: alive or not, its tracer, its threads' states."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "the process has exited"
    tracer = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("TracerPid:")), "0")
    states: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError):
                st = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                states[st] = states.get(st, 0) + 1
    who = ""
    if tracer != "0":
        with contextlib.suppress(OSError):
            who = " " + Path(f"/proc/{tracer}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80].strip()
    threads = ", ".join(f"{n} {k}" for k, n in sorted(states.items()))
    return f"from /proc: alive, TracerPid {tracer}{who}, threads {threads or '?'}"


def _read_dump(
    rank: int, pid: int, run_dir: RunDir, core: Path, timeout: float, t0: float, runs: list[CollectorRun]
) -> tuple[GpuState | None, list[CollectorRun]]:
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


def attach_candidates(
    pids: dict[int, int], run_dir: RunDir, runs: list[CollectorRun]
) -> tuple[dict[int, int], list[CollectorRun]]:
    """The ranks whose failed dump leaves cuda-gdb a chance: alive, and no dump started on them (no
    trigger read, no core file begun). The others get a record saying why attach was not tried."""
    triggered = {c.rank for c in runs if c.name == "cuda core dump trigger" and
                 ("had not closed" in c.error or c.ok)}
    ok: dict[int, int] = {}
    skipped: list[CollectorRun] = []
    for r, pid in sorted(pids.items()):
        if not _alive(pid):
            continue
        core = coredump_file(run_dir, pid)
        size = core.stat().st_size if core.exists() else 0
        if r in triggered or size:
            skipped.append(CollectorRun(
                name="cuda-gdb attach", rank=r, ok=False, seconds=0.0,
                error=f"not attempted: this process's CUDA core dump had been triggered and had not finished "
                      f"({size} bytes in gpu/{core.name}); cuda-gdb was refused ptrace on such processes on the "
                      "H200 although it ran as root",
                advice="a started dump, not a missing SYS_PTRACE, is what stands in the way here; this rank's "
                       "stacks and pending launch record are in the report"))
            continue
        ok[r] = pid
    return ok, skipped


def explain_attach(runs: list[CollectorRun], triggered: set[int], ptrace_ok: set[int]) -> list[CollectorRun]:
    """cuda-gdb's ptrace refusal on a rank that py-spy attached to earlier in the run: ptrace is allowed
    here, so the advice names what else happened to the process instead of asking for SYS_PTRACE."""
    out = []
    for c in runs:
        if c.name.startswith("cuda-gdb") and not c.ok and c.rank in ptrace_ok and "SYS_PTRACE" in c.advice:
            why = ("after its CUDA core dump had been triggered" if c.rank in triggered
                   else "while the process was being taken down or held by another tracer")
            c = c.model_copy(update={"advice": (
                f"py-spy attached to this process earlier in the run, so ptrace is allowed here: cuda-gdb was "
                f"refused {why}, not for want of SYS_PTRACE")})
        out.append(c)
    return out


def collect_gpu_coredump(
    pids: dict[int, int], run_dir: RunDir, *, timeout: float = 60.0, ready_timeout: float = 5.0
) -> tuple[list[GpuState], list[CollectorRun]]:
    """Dump every given rank ({rank: pid}, the spinning ones), one after the other, and read the dumps.
    Destructive: each dumped process dies. Every trigger waits for its pipe's reader (up to `ready_timeout`).
    Never raises: failures come back as CollectorRun records."""
    live = {r: p for r, p in pids.items() if _alive(p)}
    if not live:
        return [], []
    states: list[GpuState] = []
    runs: list[CollectorRun] = []
    # One dump at a time. On the H200, triggering every spinning rank at once lost one rank's dump in 5 of 6
    # runs (its driver kept reading the pipe and never began the dump); one at a time, 11 of 11 ranks in
    # 3 runs were dumped, and no rank died of a peer's dump (docs/gpu-validation.md). VDIAG_COREDUMP_CONCURRENT=1
    # restores the all-at-once trigger for that comparison.
    serial = os.environ.get("VDIAG_COREDUMP_CONCURRENT") != "1"
    start = None if serial else threading.Barrier(len(live))
    with paused_parents(list(live.values())), ThreadPoolExecutor(
        max_workers=1 if serial else len(live), thread_name_prefix="vdiag-coredump"
    ) as ex:
        futs = {r: ex.submit(_dump_one, r, p, run_dir, timeout, start, ready_timeout)
                for r, p in sorted(live.items())}
        for r, fut in futs.items():
            try:
                st, rs = fut.result()
            except Exception as e:  # _dump_one does not raise; belt and braces
                st, rs = None, [CollectorRun(name=NAME, rank=r, ok=False, seconds=0.0, error=repr(e))]
            if st is not None:
                states.append(st)
            runs.extend(rs)
    return states, runs
