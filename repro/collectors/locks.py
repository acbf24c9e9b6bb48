"""File locks held by the run's ranks, read from the OS: /proc/locks for who holds what, /proc/PID/fd for
which file that is, and the holder's child processes (command line, state, kernel wait channel) for what
the holder is doing while it holds it.

This needs no ptrace and costs a few milliseconds. It sees flock(2) and fcntl(2) locks, which is what
`filelock` (FlashInfer's JIT cache lock) takes. A rank that polls a lock with a non-blocking attempt is
not listed in /proc/locks as a waiter; it is found as a rank that has the same file open without holding
it. filelock opens the file only for each attempt, so a rank that polls it is also found by the lock file
its FlashInfer JIT record names (a build entered and never left, vllm/jit-rank<N>.jsonl): whoever holds
that file's lock is named, also a process outside the job (another start-up sharing the JIT cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from repro.events import read_jit_records, unfinished_jit
from repro.records import CollectorRun, FileLockHold, LockProcess
from repro.redact import redact_text
from repro.rundir import RunDir

PROC_LOCKS = "/proc/locks"
ARTIFACT = "locks.json"


@dataclass(frozen=True)
class LockEntry:
    kind: str
    mode: str
    pid: int
    dev: tuple[int, int]
    inode: int


def parse_proc_locks(text: str) -> list[LockEntry]:
    """Held locks from /proc/locks (lines such as `1: FLOCK  ADVISORY  WRITE 7621 fe:00:2146403 0 EOF`);
    blocked requests (`1: -> FLOCK ...`) are left out."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":
            continue
        try:
            kind, mode, pid = parts[1], parts[3], int(parts[4])
            major, minor, inode = parts[5].split(":")
            out.append(LockEntry(kind, mode, pid, (int(major, 16), int(minor, 16)), int(inode)))
        except ValueError:
            continue
    return out


def open_files(pid: int) -> dict[tuple[int, int, int], str]:
    """(major, minor, inode) -> path of every regular file the process has open."""
    out: dict[tuple[int, int, int], str] = {}
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            try:
                st = os.stat(f"{fd_dir}/{fd}")
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("/"):
                out[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = target
    return out


def _wchan(pid: int) -> str:
    try:
        w = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return ""
    return "" if w in ("0", "") else w


def _cmdline(p: psutil.Process) -> str:
    try:
        return redact_text(" ".join(p.cmdline()))
    except (psutil.Error, OSError):
        return ""


def _describe(p: psutil.Process) -> LockProcess:
    state = ""
    with contextlib.suppress(psutil.Error):
        state = str(p.status())
    return LockProcess(pid=p.pid, cmdline=_cmdline(p), state=state, wchan=_wchan(p.pid))


def _file_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def find_locks(rank_pids: dict[int, int], proc_locks: str | None = None,
               awaited: dict[str, list[int]] | None = None) -> list[FileLockHold]:
    """Every file lock held by a rank or one of its descendants, with the ranks waiting for the same file;
    and the holder of each lock file in `awaited` ({path: ranks known to wait for it}), whoever it is."""
    text = proc_locks if proc_locks is not None else Path(PROC_LOCKS).read_text()
    entries = parse_proc_locks(text)
    owner_rank: dict[int, int] = {}  # pid -> rank, the ranks and their descendants
    procs: dict[int, psutil.Process] = {}
    for rank, pid in rank_pids.items():
        try:
            p = psutil.Process(pid)
            family = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in family:
            owner_rank.setdefault(q.pid, rank)
            procs[q.pid] = q
    files = {pid: open_files(pid) for pid in rank_pids.values()}
    out = []
    for e in entries:
        if e.pid not in owner_rank:
            continue
        key = (e.dev[0], e.dev[1], e.inode)
        path = next((f[key] for f in [open_files(e.pid), *files.values()] if key in f), "")
        if not path:
            continue
        holder = procs[e.pid]
        rank = owner_rank[e.pid]
        try:
            children = [_describe(c) for c in holder.children(recursive=True)]
        except psutil.Error:
            children = []
        waiting = sorted(r for r, pid in rank_pids.items() if r != rank and key in files.get(pid, {}))
        out.append(FileLockHold(path=path, kind=e.kind, mode=e.mode, holder_pid=e.pid, holder_rank=rank,
                                holder_cmdline=_cmdline(holder), children=children, waiting_ranks=waiting))
    for path, ranks in (awaited or {}).items():
        file_key = _file_key(path)
        if file_key is None:
            continue
        for e in entries:
            if (e.dev[0], e.dev[1], e.inode) != file_key or any(h.holder_pid == e.pid and h.path == path for h in out):
                continue
            try:
                holder = procs.get(e.pid) or psutil.Process(e.pid)
                children = [_describe(c) for c in holder.children(recursive=True)]
                cmd = _cmdline(holder)
            except psutil.Error:
                children, cmd = [], ""
            out.append(FileLockHold(path=path, kind=e.kind, mode=e.mode, holder_pid=e.pid,
                                    holder_rank=owner_rank.get(e.pid), holder_cmdline=cmd, children=children,
                                    waiting_ranks=sorted(r for r in ranks if r != owner_rank.get(e.pid)),
                                    waiting_from="JIT record",
                                    source="/proc/locks, for the lock file the waiting ranks' JIT records name"))
    return out


def awaited_lock_files(root: Path) -> dict[str, list[int]]:
    """{lock file: ranks} for the FlashInfer JIT builds ranks entered and never left (their JIT records)."""
    out: dict[str, list[int]] = {}
    for rank, recs in read_jit_records(root).items():
        for r in unfinished_jit(recs):
            if r.get("lock"):
                out.setdefault(str(r["lock"]), []).append(rank)
    return out


def collect_locks(rank_pids: dict[int, int], run_dir: RunDir) -> tuple[list[FileLockHold], list[CollectorRun]]:
    t0 = time.monotonic()
    try:
        held = find_locks(rank_pids, awaited=awaited_lock_files(run_dir.root))
    except OSError as e:
        return [], [CollectorRun(name="file locks", ok=False, seconds=round(time.monotonic() - t0, 3),
                                 error=f"cannot read {PROC_LOCKS}: {e}")]
    path = run_dir.root / ARTIFACT
    path.write_text(json.dumps([h.model_dump(mode="json") for h in held], indent=1))
    return held, [CollectorRun(name="file locks", ok=True, seconds=round(time.monotonic() - t0, 3),
                               artifact=ARTIFACT)]


def load_locks(root: Path) -> list[FileLockHold]:
    """The locks a run's collector found (empty when it did not run)."""
    try:
        data = json.loads((root / ARTIFACT).read_text())
    except (OSError, ValueError):
        return []
    return [FileLockHold.model_validate(d) for d in data]
