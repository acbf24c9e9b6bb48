"""The job's processes: the root(s) and every descendant, followed as the tree grows (psutil).

Each process is read once for what does not change (command line, environment, identity) and sampled for
its CPU time on every tick. A process that exits stays in the table with its last CPU time.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import psutil

from repro.errors import EnvironmentProblem, ScenarioError
from repro.observe.identity import identify, infer_title_ranks, nvml_process_gpus
from repro.records import ObservedProcess, ProcessIdentity
from repro.redact import redact_argv


def read_environ(pid: int) -> dict[str, str] | None:
    """The process's environment from /proc/PID/environ; None where it cannot be read (another user)."""
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()  # noqa: SIM115
    except (PermissionError, FileNotFoundError, ProcessLookupError, OSError):
        return None
    out = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, _, v = item.partition(b"=")
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def check_pid(pid: int) -> psutil.Process:
    """The process, or a one-line error that names the pid and what to do (exit 2 or 3)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise ScenarioError(f"pid {pid}: the process has exited (a zombie); give the pid of a running process")
    except psutil.NoSuchProcess:
        raise ScenarioError(f"pid {pid}: no such process; give the pid of a running process "
                            "(`ps -ef`, or `pgrep -f torchrun`)") from None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            f.read(1)
    except PermissionError:
        owner = "another user"
        with contextlib.suppress(Exception):
            owner = f"user {proc.username()}"
        raise EnvironmentProblem(
            f"pid {pid}: belongs to {owner} and vdiag may not read it (/proc/{pid}/environ: permission "
            f"denied); run vdiag as that user or as root"
        ) from None
    except (FileNotFoundError, ProcessLookupError):
        raise ScenarioError(f"pid {pid}: the process exited; give the pid of a running process") from None
    return proc


def is_python(cmdline: list[str], exe: str) -> bool:
    names = [os.path.basename(exe)] + [os.path.basename(c) for c in cmdline[:1]]
    return any(n.startswith("python") or n.startswith("pypy") for n in names) or any(
        c.endswith(".py") for c in cmdline[:2]
    )


@dataclass
class Tracked:
    proc: psutil.Process
    pid: int
    ppid: int | None
    name: str
    cmdline: list[str]
    exe: str
    env: dict[str, str] | None
    identity: ProcessIdentity
    first_seen: float
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, cpu seconds)
    gpu: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, NVML utilisation % of its GPU)
    exited: bool = False
    exit_status: int | None = None

    @property
    def python(self) -> bool:
        return is_python(self.cmdline, self.exe)

    def cpu_s(self) -> float | None:
        return self.cpu[-1][1] if self.cpu else None

    def gpu_pct(self, since: float) -> float | None:
        vals = [u for t, u in self.gpu if t >= since]
        return sum(vals) / len(vals) if vals else None

    def cpu_pct(self, since: float) -> float:
        pts = [p for p in self.cpu if p[0] >= since]
        if len(pts) < 2:
            pts = self.cpu[-2:]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return 0.0
        return max(0.0, 100.0 * (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))


class ProcessTree:
    """Root processes and (with `follow`) every descendant; `refresh` finds new ones and samples CPU."""

    def __init__(self, roots: list[int], *, follow: bool = True) -> None:
        self.roots = list(roots)
        self.follow = follow
        self.procs: dict[int, Tracked] = {}
        self._nvml: dict[int, list[int]] = {}
        self._nvml_t = 0.0

    def _track(self, p: psutil.Process, now: float) -> bool:
        if p.pid in self.procs:
            return False
        try:
            with p.oneshot():
                cmdline = p.cmdline()
                name = p.name()
                ppid = p.ppid()
                exe = ""
                with contextlib.suppress(psutil.AccessDenied, psutil.ZombieProcess):
                    exe = p.exe()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        except psutil.AccessDenied:
            cmdline, name, ppid, exe = [], "", None, ""
        env = read_environ(p.pid)
        ident = identify(p.pid, env, cmdline, name, self._nvml.get(p.pid, ()))
        self.procs[p.pid] = Tracked(p, p.pid, ppid, name, cmdline, exe, env, ident, now)
        return True

    def refresh(self) -> bool:
        """Find new processes, sample CPU times. True when the tree gained a process."""
        now = time.monotonic()
        grew = False
        if time.monotonic() - self._nvml_t > 5.0:
            self._nvml = nvml_process_gpus()
            self._nvml_t = time.monotonic()
        for root in self.roots:
            try:
                rp = psutil.Process(root)
                found = [rp, *(rp.children(recursive=True) if self.follow else [])]
            except psutil.NoSuchProcess:
                found = []
            for p in found:
                grew |= self._track(p, now)
        if grew:
            ids = infer_title_ranks({pid: t.identity for pid, t in self.procs.items()})
            for pid, ident in ids.items():
                self.procs[pid].identity = ident
        for t in self.procs.values():
            if t.exited:
                continue
            try:
                if t.proc.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(t.pid)
                ct = t.proc.cpu_times()
                t.cpu.append((now, ct.user + ct.system))
                if len(t.cpu) > 600:
                    del t.cpu[:300]
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                t.exited = True
            except psutil.AccessDenied:
                pass
            if self._nvml and t.pid in self._nvml and t.identity.nvml_gpus != self._nvml[t.pid]:
                src = {**t.identity.sources, "nvml_gpus": "NVML's per-device process list"}
                t.identity = t.identity.model_copy(update={"nvml_gpus": self._nvml[t.pid], "sources": src})
        return grew

    def alive(self) -> list[Tracked]:
        return [t for t in self.procs.values() if not t.exited]

    def ranked(self) -> dict[int, Tracked]:
        """{rank: process} for the processes whose rank is known (the lowest pid wins a duplicate)."""
        out: dict[int, Tracked] = {}
        for t in sorted(self.procs.values(), key=lambda t: t.pid):
            r = t.identity.rank
            if r is not None and r not in out and t.identity.role == "worker":
                out[r] = t
        return out

    def subjects(self) -> tuple[dict[int, Tracked], bool]:
        """The processes the diagnosis is about, keyed by rank: the ranked workers; where none has a known
        rank, the processes vLLM's titles name as its workers or engine cores (an engine core runs the
        model itself at TP=1); else the Python processes that have no Python child, leaving out helpers
        such as multiprocessing's resource tracker. Numbered in pid order; the second value says so, so that
        the report never passes such a number off as a rank."""
        ranked = self.ranked()
        if ranked:
            return ranked, False
        procs = sorted(self.procs.values(), key=lambda t: t.pid)
        titled = [t for t in procs if t.identity.role in ("worker", "engine-core")]
        if titled:
            return dict(enumerate(titled)), True
        py = [t for t in procs if t.python and t.identity.role not in ("torchrun-agent", "helper")]
        parents = {t.ppid for t in py}
        return dict(enumerate(t for t in py if t.pid not in parents)), True

    def observed(self, since: float, busy_pct: float, waits: dict[int, str] | None = None) -> list[ObservedProcess]:
        out = []
        waits = waits or {}
        for t in sorted(self.procs.values(), key=lambda t: t.pid):
            pct = t.cpu_pct(since)
            state = "exited" if t.exited else ("busy" if pct >= busy_pct else "idle")
            out.append(ObservedProcess(
                pid=t.pid, ppid=t.ppid, name=t.name, cmdline=" ".join(redact_argv(t.cmdline))[:400],
                identity=t.identity, python=t.python, cpu_s=t.cpu_s(), cpu_pct=round(pct, 1), state=state,
                wait_site=waits.get(t.pid, ""), exit_status=t.exit_status,
            ))
        return out
