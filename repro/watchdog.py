"""Watchdog: per-rank progress from the launch logs, activity sampling, and the stall verdict.

Progress is any new event in a rank's launch log. A stall is suspected when no rank has progressed for
`stall_s` (by default a multiple of the slowest call seen so far, floored at about 2 s) and confirmed
if nothing moves for a further confirmation window; progress in between makes the run `slow`, not hung.
When the stall is suspected, the ranks that look idle get a cheap Python-only stack (py-spy, no native
frames); an idle rank outside every known wait (not in a collective, a lock, a barrier, a synchronisation
or a spin-wait) is a straggler busy on the host, so the watchdog keeps watching for `patience_s` before it
calls a hang, and the run is `slow` if the straggler resumes. These stacks are handed on to the collectors,
which do not take them again.
Activity (CPU time per rank through psutil; GPU utilisation per device through NVML where there is one)
is averaged over the confirmation window to split the ranks into busy and idle.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil

from repro.events import LogTail
from repro.records import ActivitySample, CollectorRun, RankExit, StackSample, Straggler, WatchdogVerdict
from repro.redact import redact_text
from repro.rundir import RunDir
from repro.scenario import Watchdog as WatchdogConfig
from repro.torchrun import Launch

STARTUP_GRACE_S = 20.0  # before the first call completes (imports, rendezvous, workspace creation)
STARTUP_TIMEOUT_S = 300.0  # until every rank has said hello


@dataclass
class RankState:
    rank: int
    tail: LogTail
    pid: int | None = None
    device_index: int | None = None
    events: int = 0
    completed: int = 0
    wrong: int = 0
    phase: str = "starting"
    capture_index: int = 0
    capture_total: int = 0
    size: int | None = None
    pending: dict[str, Any] | None = None
    launched_at: float | None = None
    done: bool = False
    error: str = ""
    last_event_mono: float = 0.0
    cpu_prev: float | None = None
    cpu_pct: float = 0.0
    cpu_window: list[tuple[float, float]] = field(default_factory=list)
    proc: psutil.Process | None = None

    def label(self) -> str:
        if self.done:
            return "finished"
        if self.phase == "capture" and self.capture_total:
            return f"capture {self.capture_index}/{self.capture_total}"
        return self.phase


@dataclass
class Snapshot:
    t: float
    ranks: list[RankState]
    stall_s: float
    since_progress: float
    suspected: bool


Observer = Callable[[Snapshot], None]
# Takes stacks of {rank: pid}; the default is a Python-only py-spy dump (repro/collectors/stacks.py).
StackProbe = Callable[[dict[int, int]], tuple[list[StackSample], list[CollectorRun]]]


class GpuSampler:
    """NVML utilisation, power and SM clock per device; absent where there is no NVML."""

    def __init__(self) -> None:
        self.nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:
            self.nvml = None

    def sample(self, index: int) -> tuple[float | None, float | None, float | None]:
        if self.nvml is None:
            return None, None, None
        try:
            h = self.nvml.nvmlDeviceGetHandleByIndex(index)
            util = float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            power = float(self.nvml.nvmlDeviceGetPowerUsage(h)) / 1000.0
            clock = float(self.nvml.nvmlDeviceGetClockInfo(h, self.nvml.NVML_CLOCK_SM))
            return util, power, clock
        except Exception:
            return None, None, None

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()


class Watchdog:
    def __init__(
        self,
        run_dir: RunDir,
        launch: Launch,
        world_size: int,
        config: WatchdogConfig,
        observers: list[Observer] | None = None,
        use_gpu: bool = False,
        ranks: list[int] | None = None,
        probe: StackProbe | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.launch = launch
        self.cfg = config
        self.observers = observers or []
        self.rank_ids = ranks if ranks is not None else list(range(world_size))
        self.ranks = {r: RankState(r, LogTail(run_dir.launch_log(r))) for r in self.rank_ids}
        # recent samples only (the full series is in activity.jsonl)
        self.samples: deque[ActivitySample] = deque(maxlen=16 * max(1, len(self.rank_ids)))
        self.slowest_call = 0.0
        self.gpu = GpuSampler() if use_gpu else None
        self._activity = open(run_dir.activity, "a")  # noqa: SIM115
        self._probe_fn = probe or self._pyspy_probe
        self._probe_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdiag-probe")
        # Stacks of the idle ranks taken during the last stall (no progress since): the collectors reuse them.
        self.probe_stacks: dict[int, StackSample] = {}
        self.probe_runs: list[CollectorRun] = []
        self.resumed: list[Straggler] = []  # stragglers that resumed (a slow run), with how long they stalled
        self.started_wall: float | None = None
        self.last_progress_wall: float | None = None

    def _pyspy_probe(self, pids: dict[int, int]) -> tuple[list[StackSample], list[CollectorRun]]:
        from repro.collectors.stacks import collect_stacks

        return collect_stacks(pids, self.run_dir, native=False, timeout=5.0)

    # ---- reading the logs -------------------------------------------------------------------------
    def _ingest(self, now: float) -> bool:
        moved = False
        for st in self.ranks.values():
            evs = st.tail.new_events()
            if not evs:
                continue
            moved = True
            st.events += len(evs)
            st.last_event_mono = now
            for e in evs:
                kind = e.get("ev")
                if kind == "hello":
                    st.pid = int(e["pid"])
                    st.device_index = e.get("device_index")
                    with contextlib.suppress(psutil.NoSuchProcess):
                        st.proc = psutil.Process(st.pid)
                elif kind == "phase":
                    st.phase = str(e.get("phase"))
                    st.capture_index = int(e.get("index") or 0)
                    st.capture_total = int(e.get("total") or 0)
                    st.size = e.get("size")
                elif kind == "launch":
                    st.pending = e
                    st.launched_at = float(e["t"])
                elif kind == "result":
                    st.completed += 1
                    if not e.get("ok", True):
                        st.wrong += 1
                    # Only the result of the pending launch ends it; call_s, where the record has it, is the
                    # call's own duration without the check.
                    mine = st.pending is not None and st.pending.get("seq") == e.get("seq")
                    if e.get("call_s") is not None:
                        self.slowest_call = max(self.slowest_call, float(e["call_s"]))
                    elif mine and st.launched_at is not None:
                        self.slowest_call = max(self.slowest_call, float(e["t"]) - st.launched_at)
                    if mine:
                        st.pending = None
                        st.launched_at = None
                elif kind == "done":
                    st.done = True
                    st.phase = "finished"
                elif kind == "error":
                    st.error = str(e.get("error", ""))
        return moved

    def _sample(self, now: float, wall: float) -> None:
        for st in self.ranks.values():
            if st.proc is None:
                continue
            try:
                ct = st.proc.cpu_times()
                total = ct.user + ct.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                st.cpu_pct = 0.0
                continue
            if st.cpu_prev is not None and st.cpu_window:
                dt = now - st.cpu_window[-1][0]
                if dt > 0:
                    st.cpu_pct = max(0.0, min(100.0 * (total - st.cpu_prev) / dt, 100.0 * (psutil.cpu_count() or 1)))
            st.cpu_prev = total
            st.cpu_window.append((now, st.cpu_pct))
            if len(st.cpu_window) > 400:
                del st.cpu_window[:200]
            util = power = clock = None
            if self.gpu is not None and st.device_index is not None:
                util, power, clock = self.gpu.sample(st.device_index)
            s = ActivitySample(t=wall, rank=st.rank, cpu_pct=round(st.cpu_pct, 1), progress=st.completed,
                               gpu_util=util, gpu_power_w=power, sm_clock_mhz=clock)
            self.samples.append(s)
            self._activity.write(s.model_dump_json() + "\n")
        self._activity.flush()

    def stall_threshold(self) -> float:
        if self.cfg.stall_s is not None:
            return self.cfg.stall_s
        thr = max(self.cfg.floor_s, self.cfg.multiple * self.slowest_call)
        if not any(st.completed for st in self.ranks.values()):
            thr = max(thr, STARTUP_GRACE_S)
        return thr

    def _window_mean(self, st: RankState, since: float) -> float:
        vals = [v for (t, v) in st.cpu_window if t >= since]
        return sum(vals) / len(vals) if vals else st.cpu_pct

    def _gpu_busy(self, st: RankState) -> float | None:
        recent = [s.gpu_util for s in list(self.samples)[-4 * len(self.ranks):]
                  if s.rank == st.rank and s.gpu_util is not None]
        return sum(recent) / len(recent) if recent else None

    # ---- the loop ------------------------------------------------------------------------------------
    def watch(self) -> WatchdogVerdict:
        start_mono = time.monotonic()
        start_wall = time.time()
        self.started_wall = start_wall
        last_progress = start_mono
        last_progress_wall: float | None = None
        suspected_at: float | None = None
        patience_until: float | None = None
        probe: Future[None] | None = None
        stragglers: list[Straggler] = []
        slow_resumed = 0
        try:
            while True:
                time.sleep(self.cfg.sample_interval_s)
                now = time.monotonic()
                wall = time.time()
                if self._ingest(now):
                    if suspected_at is not None:
                        slow_resumed += 1
                        self.resumed.extend(st.model_copy(update={"idle_s": round(now - last_progress, 1)})
                                            for st in stragglers)
                        suspected_at = patience_until = None
                        stragglers = []
                        self._drop_probe(probe)
                        probe = None
                    last_progress = now
                    last_progress_wall = self.last_progress_wall = wall
                self._sample(now, wall)
                thr = self.stall_threshold()
                idle_for = now - last_progress
                snap = Snapshot(wall, list(self.ranks.values()), thr, idle_for, suspected_at is not None)
                for obs in self.observers:
                    obs(snap)
                rc = self.launch.returncode()
                if rc is not None:
                    self._ingest(time.monotonic())
                    return self._finished(rc, start_wall, last_progress_wall, thr, slow_resumed)
                if not all(st.pid for st in self.ranks.values()):
                    if now - start_mono > STARTUP_TIMEOUT_S:
                        return self._verdict("host-wait", start_wall, last_progress_wall, thr, slow_resumed,
                                             since=now - 5, note="some ranks never started the replay")
                    continue
                if now - start_mono > self.cfg.max_run_s:
                    return self._verdict("timeout", start_wall, last_progress_wall, thr, slow_resumed,
                                         since=now - 5, note=f"the run exceeded max_run_s={self.cfg.max_run_s:g}",
                                         stragglers=stragglers)
                if all(st.done for st in self.ranks.values()):
                    # every rank finished its start-up; only torchrun's exit is pending
                    suspected_at = None
                    if idle_for > 60:
                        return self._verdict("slow" if slow_resumed else "clean", start_wall, last_progress_wall,
                                             thr, slow_resumed, since=now - 5, finished=list(self.ranks),
                                             note="every rank finished, but torchrun did not exit within 60 s")
                    continue
                if idle_for >= thr and suspected_at is None:
                    suspected_at = now
                    # Python-only stacks of the ranks that look idle now, taken while the window confirms
                    probe = self._probe_pool.submit(self._probe, self._idle_now(now - 1.0))
                confirm = min(thr, 2.5)
                if suspected_at is None or now - suspected_at < confirm:
                    continue
                if patience_until is None:
                    _busy, idle, _fin = self._split(suspected_at)
                    self._finish_probe(probe, idle)
                    probe = None
                    stragglers = self._stragglers(idle, now)
                    if stragglers and self.cfg.patience_s > 0:
                        patience_until = now + self.cfg.patience_s  # a straggler on the host: keep watching
                        continue
                    return self._classify(start_wall, last_progress_wall, thr, slow_resumed, since=suspected_at,
                                          stragglers=stragglers)
                if now >= patience_until:
                    # it never resumed: where is every idle rank now?
                    since = now - confirm
                    _busy, idle, _fin = self._split(since)
                    self.probe_stacks, self.probe_runs = {}, []
                    self._finish_probe(None, idle)
                    stragglers = self._stragglers(idle, now)
                    return self._classify(start_wall, last_progress_wall, thr, slow_resumed, since=since,
                                          stragglers=stragglers)
        finally:
            self._probe_pool.shutdown(wait=True)
            self._activity.close()
            if self.gpu is not None:
                self.gpu.close()

    # ---- stragglers ------------------------------------------------------------------------------------
    def _idle_now(self, since: float) -> dict[int, int]:
        return {st.rank: st.pid for st in self.ranks.values()
                if st.pid and not st.done and self._window_mean(st, since) < self.cfg.busy_cpu_pct}

    def _probe(self, pids: dict[int, int]) -> None:
        if not pids:
            return
        try:
            samples, runs = self._probe_fn(pids)
        except Exception as e:  # a probe that fails leaves the rank without a stack; the verdict goes on
            runs, samples = [CollectorRun(name="py-spy (stall probe)", ok=False, seconds=0.0, error=repr(e))], []
        self.probe_stacks.update({s.rank: s for s in samples})
        self.probe_runs.extend(runs)

    def _drop_probe(self, probe: Future[None] | None) -> None:
        if probe is not None:
            with contextlib.suppress(Exception):
                probe.result()
        self.probe_stacks = {}
        self.probe_runs = []

    def _finish_probe(self, probe: Future[None] | None, idle: list[int]) -> None:
        """Wait for the probe started at suspicion; take the idle ranks it missed now."""
        if probe is not None:
            with contextlib.suppress(Exception):
                probe.result()
        missing = {r: self.ranks[r].pid for r in idle if r not in self.probe_stacks and self.ranks[r].pid}
        self._probe({r: p for r, p in missing.items() if p is not None})

    def _stragglers(self, idle: list[int], now: float) -> list[Straggler]:
        from repro.analysis import host_frames, known_wait

        out = []
        for r in idle:
            sample = self.probe_stacks.get(r)
            if sample is None or known_wait(sample):
                continue  # no stack: nothing to say it is a straggler; in a known wait: part of the stall
            out.append(Straggler(rank=r, where=host_frames(sample), source=sample.source,
                                 idle_s=round(now - self.ranks[r].last_event_mono, 1)))
        return out

    def _split(self, since: float) -> tuple[list[int], list[int], list[int]]:
        """Busy, idle and finished ranks, by mean activity since `since`."""
        busy, idle, finished = [], [], []
        for st in self.ranks.values():
            if st.done:
                finished.append(st.rank)
                continue
            cpu = self._window_mean(st, since)
            gpu = self._gpu_busy(st)
            if cpu >= self.cfg.busy_cpu_pct or (gpu is not None and gpu >= 50 and cpu >= 5):
                busy.append(st.rank)
            else:
                idle.append(st.rank)
        return busy, idle, finished

    def _classify(
        self, start: float, last_wall: float | None, thr: float, slow: int, since: float,
        stragglers: list[Straggler] | None = None,
    ) -> WatchdogVerdict:
        busy, idle, finished = self._split(since)
        live = [r for r in self.ranks if r not in finished]
        if busy and len(busy) == len(live):
            cls = "all-spinning"
        elif busy:
            cls = "spin-deadlock"
        else:
            cls = "host-wait"
        return self._verdict(cls, start, last_wall, thr, slow, since, busy=busy, idle=idle + finished,
                             finished=finished, stragglers=stragglers)

    def _verdict(
        self, cls: str, start: float, last_wall: float | None, thr: float, slow: int, since: float,
        busy: list[int] | None = None, idle: list[int] | None = None, finished: list[int] | None = None,
        crashed: list[RankExit] | None = None, note: str = "", stragglers: list[Straggler] | None = None,
        interrupted_by: str = "",
    ) -> WatchdogVerdict:
        v = WatchdogVerdict(
            cls=cls,  # type: ignore[arg-type,unused-ignore]
            stall_s=round(thr, 3),
            started_t=start,
            last_progress_t=last_wall,
            verdict_t=time.time(),
            busy_ranks=sorted(busy or []),
            idle_ranks=sorted(idle or []),
            finished_ranks=sorted(finished or [st.rank for st in self.ranks.values() if st.done]),
            cpu_pct={st.rank: round(self._window_mean(st, since), 1) for st in self.ranks.values()},
            gpu_util={st.rank: g for st in self.ranks.values() if (g := self._gpu_busy(st)) is not None},
            crashed=crashed or [],
            slow_resumed=slow,
            note=note,
            stragglers=(stragglers or []) if cls != "slow" and cls != "clean" else self.resumed,
            patience_s=self.cfg.patience_s,
            interrupted_by=interrupted_by,
        )
        self.run_dir.watchdog_json.write_text(v.model_dump_json(indent=2))
        return v

    def _finished(
        self, rc: int, start: float, last_wall: float | None, thr: float, slow: int
    ) -> WatchdogVerdict:
        now = time.monotonic()
        if rc == 0 and all(st.done for st in self.ranks.values()):
            return self._verdict("slow" if slow else "clean", start, last_wall, thr, slow, since=now - 5,
                                 finished=list(self.ranks))
        crashed = crashed_ranks(self.run_dir, self.ranks, rc)
        return self._verdict("crash", start, last_wall, thr, slow, since=now - 5, crashed=crashed,
                             note=f"torchrun exited with {rc}")


def _signal_name(code: int) -> str | None:
    import signal as _s

    if code < 0:
        with contextlib.suppress(ValueError):
            return _s.Signals(-code).name
        return f"signal {-code}"
    return None


def _tail(path: Any, n: int = 15) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keep = [ln for ln in lines if "OMP_NUM_THREADS" not in ln and not ln.startswith("W1") and "*****" not in ln]
    return [redact_text(ln) for ln in keep[-n:]]


# The lines that name a real error, most telling first: a CUDA error, Python's fatal error, an exception.
_ERROR_PATTERNS = (
    re.compile(r"CUDA error: .*|CUDA_ERROR_\w+.*|cudaError\w*.*|an illegal memory access was encountered.*"),
    re.compile(r"Fatal Python error: .*"),
    re.compile(r"^(?:[\w.]+\.)?(?:[A-Z]\w*(?:Error|Exception|Interrupt|Exit)|AssertionError)(?:: .*)?$"),
)


def error_line(lines: list[str]) -> str:
    """The first line of the real error in a rank's stderr: the first CUDA error, else the first Python
    fatal error, else the exception that ended the first traceback (the line after its frames), else ""."""
    lines = [re.sub(r"^\[(?:rank|default)\d+\]:\s?", "", ln) for ln in lines]
    for pat in _ERROR_PATTERNS[:2]:
        for ln in lines:
            if not ln.startswith((" ", "\t")) and pat.search(ln):  # indented: a traceback's source line
                return ln.strip()
    in_tb = False
    for ln in lines:
        if ln.startswith("Traceback (most recent call last)"):
            in_tb = True
        elif in_tb and ln.strip() and not ln.startswith((" ", "\t")):
            if _ERROR_PATTERNS[2].match(ln.strip()):
                return ln.strip()
            in_tb = False
    return next((ln.strip() for ln in lines if _ERROR_PATTERNS[2].match(ln.strip())), "")


def _read_lines(path: Any) -> list[str]:
    try:
        return [redact_text(ln) for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return []


def crashed_ranks(run_dir: RunDir, ranks: dict[int, RankState], rc: int) -> list[RankExit]:
    """Which ranks died, with exit code or signal, from torchrun's failure summary and the logs."""
    found: dict[int, int] = {}
    err_file = run_dir.root / "logs" / "torchelastic_error.json"
    text = ""
    with contextlib.suppress(OSError):
        text = run_dir.torchrun_log.read_text(errors="replace")
    pattern = r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
    root: int | None = None
    if "Root Cause" in text:
        m = re.search(pattern, text.split("Root Cause", 1)[1])
        if m:
            root = int(m.group(1))
            found[root] = int(m.group(2))
    for m in re.finditer(pattern, text):
        found.setdefault(int(m.group(1)), int(m.group(2)))
    if not found and err_file.exists():
        with contextlib.suppress(Exception):
            data = json.loads(err_file.read_text())
            found[int(data.get("rank", -1))] = int(data.get("exitcode", rc))
    if not found:
        for st in ranks.values():
            if st.error or not st.done:
                found[st.rank] = rc
                break
    out = []
    # The root cause first: a rank that exited by itself before one that torchrun terminated.
    for r, code in sorted(found.items(), key=lambda kv: (kv[0] != root, kv[1] == -15, kv[0])):
        out.append(RankExit(rank=r, returncode=code, signal=_signal_name(code),
                            stderr_tail=_tail(run_dir.stderr_log(r)) if r >= 0 else [],
                            error_line=error_line(_read_lines(run_dir.stderr_log(r))) if r >= 0 else ""))
    return out


def load_activity(path: Any) -> list[ActivitySample]:
    out: list[ActivitySample] = []
    try:
        with open(path) as f:
            for line in f:
                with contextlib.suppress(Exception):
                    out.append(ActivitySample.model_validate_json(line))
    except OSError:
        pass
    return out
