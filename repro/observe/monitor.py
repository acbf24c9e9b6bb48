"""The stall rule for a job vdiag did not launch, and the split of its processes into busy and idle.

Progress is anything the job shows: a tqdm bar that advances or an output line of a shape not seen before
(`repro.observe.progress`), a new process in the tree, and, with the instrumentation loaded, a new event
in a rank's launch log. When nothing moved for ``stall_s``, CPU time per process (and, for a process NVML
shows on a GPU, that GPU's utilisation) is averaged over a short confirmation window and every rank's Python stack is taken (py-spy, Python frames only, a few
milliseconds of pause). Then the straggler rule: a rank that is outside every known wait (no collective,
lock, synchronisation or spin-wait site in its stack, `repro.analysis.where_waiting`) is still working on
the host (a JIT build, torch.compile, a slow file system), so vdiag keeps watching, probing again now and
then, for up to ``patience_s``. Progress in between makes the job ``slow``, never hung. A stall in which
every live rank is in a known wait is confirmed at once.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from repro.analysis import where_waiting
from repro.collectors.stacks import collect_stacks
from repro.events import LogTail
from repro.observe.job import Job
from repro.observe.progress import READY_PATTERNS, ProgressScanner
from repro.observe.tree import ProcessTree, Tracked
from repro.observed_verdict import innermost
from repro.records import ActivitySample, StackSample, WatchdogVerdict
from repro.report.format import LIST, rank_label
from repro.rundir import RunDir
from repro.watchdog import GpuSampler

DEFAULT_STALL_S = 180.0  # model loading and torch.compile print nothing for minutes; see docs/watch.md
DEFAULT_PATIENCE_S = 600.0
CONFIRM_S = 2.5


@dataclass
class WatchConfig:
    stall_s: float = DEFAULT_STALL_S
    ready_patterns: tuple[str, ...] = READY_PATTERNS
    patience_s: float = DEFAULT_PATIENCE_S
    sample_interval_s: float = 0.5
    confirm_s: float = CONFIRM_S
    busy_cpu_pct: float = 20.0
    max_s: float | None = None  # give up watching after this long (tests, benchmarks)


@dataclass
class Probe:
    stacks: dict[int, StackSample] = field(default_factory=dict)
    waits: dict[int, str] = field(default_factory=dict)  # rank -> known wait site ("" outside every one)
    outside: list[int] = field(default_factory=list)  # live ranks outside every known wait (stragglers)
    unknown: list[int] = field(default_factory=list)  # live ranks without a stack (ptrace refused...)


@dataclass
class MonitorResult:
    ended: bool  # the job exited (returncode set) rather than hung
    returncode: int | None
    verdict: WatchdogVerdict
    probe: Probe
    subjects: dict[int, Tracked]
    numbered: bool  # subjects numbered by vdiag in pid order, not real ranks
    since: float  # monotonic start of the window the activity split was taken over


def classify(subjects: dict[int, Tracked], since: float, busy_pct: float) -> tuple[list[int], list[int], list[int]]:
    """Busy: a core's share of CPU time at or above busy_pct, or its GPU at 50 % or more (NVML) while the
    process still runs on the CPU a little (the rule of `repro.watchdog`)."""
    busy, idle, gone = [], [], []
    for r, t in subjects.items():
        cpu = t.cpu_pct(since)
        gpu = t.gpu_pct(since)
        if t.exited:
            gone.append(r)
        elif cpu >= busy_pct or (gpu is not None and gpu >= 50 and cpu >= 5):
            busy.append(r)
        else:
            idle.append(r)
    return sorted(busy), sorted(idle), sorted(gone)


def hang_class(busy: list[int], idle: list[int]) -> str:
    if busy and not idle:
        return "all-spinning"
    return "spin-deadlock" if busy else "host-wait"


def probe_waits(subjects: dict[int, Tracked], run_dir: RunDir) -> Probe:
    live = {r: t.pid for r, t in subjects.items() if not t.exited}
    samples, _ = collect_stacks(live, run_dir, native=False, timeout=10.0)
    p = Probe(stacks={s.rank: s for s in samples})
    for r in sorted(live):
        s = p.stacks.get(r)
        if s is None:
            p.unknown.append(r)
            continue
        w = where_waiting(s)
        p.waits[r] = w
        if not w:
            p.outside.append(r)
    if p.outside:  # blocked in a CUDA call (a D2H copy behind a spinning kernel) shows only in native frames
        native, _ = collect_stacks({r: live[r] for r in p.outside}, run_dir, native=True, timeout=10.0)
        for s in native:
            w = where_waiting(s)
            if w:
                p.waits[s.rank], p.stacks[s.rank] = w, s
                p.outside.remove(s.rank)
    return p


class Monitor:
    def __init__(self, tree: ProcessTree, run_dir: RunDir, cfg: WatchConfig, *, job: Job | None = None,
                 scanner: ProgressScanner | None = None, say: Callable[[str], None] | None = None) -> None:
        self.tree = tree
        self.run_dir = run_dir
        self.cfg = cfg
        self.job = job
        self.scanner = scanner
        self.say = say or (lambda msg: sys.stderr.write(msg + "\n"))
        self.tails: dict[int, LogTail] = {}
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.last_progress = self.started
        self.last_progress_wall: float | None = None
        self.slow_resumed = 0
        self.ready_told = False
        self._activity = open(run_dir.activity, "a")  # noqa: SIM115
        self.gpu = GpuSampler()

    # ---- progress sources ------------------------------------------------------------------------
    def _launch_logs_moved(self) -> bool:
        moved = False
        for r in self.run_dir.ranks():
            tail = self.tails.setdefault(r, LogTail(self.run_dir.launch_log(r)))
            if tail.new_events():
                moved = True
        return moved

    def _tick(self) -> None:
        now = time.monotonic()
        moved = self.tree.refresh()
        if self.job is not None:
            self.job.remember([t.proc for t in self.tree.alive()])
        moved |= self._launch_logs_moved()
        if self.scanner is not None and self.scanner.last_progress > self.last_progress:
            moved = True
        if moved:
            self.last_progress = max(now, self.scanner.last_progress if self.scanner else now)
            self.last_progress_wall = time.time()
        subjects, _ = self.tree.subjects()
        wall = time.time()
        for r, t in subjects.items():
            if t.exited:
                continue
            pct = t.cpu_pct(now - 2 * self.cfg.sample_interval_s)
            util = power = clock = None
            if t.identity.nvml_gpus and self.gpu.nvml is not None:
                util, power, clock = self.gpu.sample(t.identity.nvml_gpus[0])
                if util is not None:
                    t.gpu.append((now, util))
                    del t.gpu[:-600]
            s = ActivitySample(t=wall, rank=r, cpu_pct=round(pct, 1), progress=self.scanner.lines if self.scanner else 0,
                               gpu_util=util, gpu_power_w=power, sm_clock_mhz=clock)
            self._activity.write(s.model_dump_json() + "\n")
        self._activity.flush()

    def _verdict(self, cls: str, subjects: dict[int, Tracked], since: float, note: str = "") -> WatchdogVerdict:
        busy, idle, gone = classify(subjects, since, self.cfg.busy_cpu_pct)
        v = WatchdogVerdict(
            cls=cls,  # type: ignore[arg-type,unused-ignore]
            stall_s=round(self.cfg.stall_s, 3), started_t=self.started_wall, last_progress_t=self.last_progress_wall,
            verdict_t=time.time(), busy_ranks=busy if cls not in ("clean", "slow", "crash") else [],
            idle_ranks=idle if cls not in ("clean", "slow", "crash") else [],
            finished_ranks=gone if cls not in ("crash",) else [],
            cpu_pct={r: round(t.cpu_pct(since), 1) for r, t in subjects.items()},
            gpu_util={r: round(g, 1) for r, t in subjects.items() if (g := t.gpu_pct(since)) is not None},
            slow_resumed=self.slow_resumed, note=note,
        )
        self.run_dir.watchdog_json.write_text(v.model_dump_json(indent=2))
        return v

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._activity.close()
        self.gpu.close()

    # ---- watch: until the job ends or a stall is confirmed -----------------------------------------
    def watch(self) -> MonitorResult:
        assert self.job is not None
        cfg = self.cfg
        suspected: float | None = None
        next_probe = 0.0
        told = False
        probe = Probe()
        try:
            while True:
                time.sleep(cfg.sample_interval_s)
                self._tick()
                now = time.monotonic()
                rc = self.job.returncode()
                subjects, numbered = self.tree.subjects()
                who = "process" if numbered else "rank"  # vdiag's own numbers are never passed off as ranks
                if rc is not None:
                    self.tree.refresh()
                    cls = "clean" if rc == 0 and not self.slow_resumed else ("slow" if rc == 0 else "crash")
                    v = self._verdict(cls, subjects, now - 5, note=f"the command exited with {rc}")
                    return MonitorResult(True, rc, v, probe, subjects, numbered, now - 5)
                if cfg.max_s is not None and now - self.started > cfg.max_s:
                    v = self._verdict("timeout", subjects, now - 5,
                                      note=f"still running after {cfg.max_s:g} s (--max-s)")
                    return MonitorResult(False, None, v, probe_waits(subjects, self.run_dir), subjects, numbered,
                                         now - 5)
                if self.scanner is not None and self.scanner.ready_line:
                    if not self.ready_told:
                        self.ready_told = True
                        self.say(f"vdiag: the job says its start-up is over ({self.scanner.ready_line!r}); a "
                                 "serving job that idles is not a stalled start-up, so vdiag stops looking for "
                                 "one and follows the job until it ends (Ctrl-C ends it)")
                    continue
                if suspected is not None and self.last_progress > suspected:
                    self.slow_resumed += 1
                    if told:
                        self.say(f"vdiag: the job progressed again after {self.last_progress - suspected:.0f} s: "
                                 "slow, not hung; still watching")
                    suspected, told = None, False
                idle_for = now - self.last_progress
                if suspected is None:
                    if idle_for >= cfg.stall_s and any(not t.exited for t in subjects.values()):
                        suspected = now
                        next_probe = now + cfg.confirm_s
                    continue
                if now < next_probe:
                    continue
                probe = probe_waits(subjects, self.run_dir)
                since = max(suspected, now - max(cfg.confirm_s, 2.0))
                waiting_out = now - suspected
                if probe.outside and waiting_out < cfg.patience_s:
                    if not told:
                        where = "; ".join(f"{who} {r}: {_innermost(probe.stacks.get(r))}" for r in probe.outside)
                        self.say(f"vdiag: no progress for {idle_for:.0f} s, but "
                                 f"{rank_label(probe.outside, run=LIST, word=who)} "
                                 f"{'is' if len(probe.outside) == 1 else 'are'} outside every known wait "
                                 f"({where}): still working on the host, so vdiag keeps watching "
                                 f"(up to {cfg.patience_s:g} s, --patience-s)")
                        told = True
                    next_probe = now + min(max(cfg.stall_s / 2, 2.0), 30.0)
                    continue
                busy, idle, _ = classify(subjects, since, cfg.busy_cpu_pct)
                note = ""
                if probe.outside:
                    note = (f"{rank_label(probe.outside, run=LIST, word=who)} stayed outside every known wait for {waiting_out:.0f} s "
                            f"(patience {cfg.patience_s:g} s): stragglers, not shown to be deadlocked")
                v = self._verdict(hang_class(busy, idle), subjects, since, note=note)
                return MonitorResult(False, None, v, probe, subjects, numbered, since)
        finally:
            self.close()

    def ended_by_user(self) -> MonitorResult:
        """Ctrl-C after the job said it was ready: a clean start-up, ended by the user; nothing judged after."""
        self.tree.refresh()
        subjects, numbered = self.tree.subjects()
        now = time.monotonic()
        v = self._verdict("slow" if self.slow_resumed else "clean", subjects, now - 5,
                          note="start-up finished; the job was then ended by Ctrl-C")
        return MonitorResult(True, None, v, Probe(), subjects, numbered, now - 5)

    def interrupted(self) -> MonitorResult:
        """Ctrl-C before a verdict: where every rank was at that moment (Python stacks), for the report."""
        self.tree.refresh()
        subjects, numbered = self.tree.subjects()
        now = time.monotonic()
        probe = probe_waits(subjects, self.run_dir)
        v = self._verdict("timeout", subjects, now - 5, note="interrupted by the user (Ctrl-C) before any hang was seen")
        return MonitorResult(False, None, v, probe, subjects, numbered, now - 5)

    # ---- attach: sample a job that is already hung ----------------------------------------------------
    def sample(self, seconds: float) -> MonitorResult:
        start = time.monotonic()
        try:
            while time.monotonic() - start < seconds:
                self._tick()
                time.sleep(self.cfg.sample_interval_s)
            self._tick()
            subjects, numbered = self.tree.subjects()
            probe = probe_waits(subjects, self.run_dir)
            busy, idle, _ = classify(subjects, start, self.cfg.busy_cpu_pct)
            live = [r for r, t in subjects.items() if not t.exited]
            cls = hang_class(busy, idle) if live else "clean"
            note = f"attached to a running job; activity sampled for {seconds:g} s"
            if probe.outside:
                note += (f"; {rank_label(probe.outside, run=LIST, word='process' if numbered else 'rank')} {'is' if len(probe.outside) == 1 else 'are'} outside every "
                         "known wait (busy on the host, perhaps a straggler rather than a deadlock)")
            v = self._verdict(cls, subjects, start, note=note)
            v = v.model_copy(update={"stall_s": round(seconds, 3)})
            return MonitorResult(False, None, v, probe, subjects, numbered, start)
        finally:
            self.close()


def _innermost(s: StackSample | None) -> str:
    if s is None or not s.threads:
        return "no stack"
    return innermost(s) or "no Python frame"
