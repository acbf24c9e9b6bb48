"""`vdiag watch` and `vdiag attach` from start to report: run folder, monitor, collectors, `repro.diagnose`."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from repro.diagnose import Evidence, JobContext, diagnose
from repro.errors import EnvironmentProblem, ExitCode, ScenarioError
from repro.observe.collect import collect
from repro.observe.job import Job
from repro.observe.monitor import Monitor, MonitorResult, WatchConfig
from repro.observe.progress import ProgressScanner
from repro.observe.tree import ProcessTree, check_pid
from repro.observed_verdict import wait_text
from repro.records import ObservedJob, Report
from repro.redact import redact_argv
from repro.rundir import RunDir

SITE_DIR = Path(__file__).resolve().parent / "site"
PKG_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class ObserveOptions:
    reports_dir: Path = Path("reports")
    watch: WatchConfig = field(default_factory=WatchConfig)
    on_hang: str = "report"  # report | kill
    instrument: bool = True
    gpu_state: str = "auto"  # auto | attach | none
    core_dump: bool = False
    quiet: bool = False
    sample_s: float = 3.0  # attach: how long activity is sampled


@dataclass
class Outcome:
    report: Report | None
    run_dir: RunDir
    exit_code: int


def _say(opts: ObserveOptions, msg: str) -> None:
    """Status lines (a suspected stall, a hang reported) are printed even with --quiet (no summary)."""
    del opts
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _signal_name(rc: int | None) -> str | None:
    if rc is not None and rc < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-rc).name
        return f"signal {-rc}"
    return None


def _job_record(mode: str, command: str, roots: list[int], tree: ProcessTree, res: MonitorResult,
                opts: ObserveOptions, scanner: ProgressScanner | None, returncode: int | None,
                t0: float | None = None) -> ObservedJob:
    waits = {res.subjects[r].pid: wait_text(st) for r, st in res.probe.stacks.items() if r in res.subjects}
    for t in tree.procs.values():
        if t.exited and t.exit_status is None and t.pid in roots:
            t.exit_status = returncode
    return ObservedJob(
        mode=mode,  # type: ignore[arg-type,unused-ignore]
        command=command, root_pids=roots,
        processes=tree.observed(res.since, opts.watch.busy_cpu_pct, waits),
        progress=scanner.marks() if scanner else [], output_lines=scanner.lines if scanner else 0,
        output_tail=scanner.last_lines(15) if scanner else [], returncode=returncode,
        signal=_signal_name(returncode), stall_s=opts.watch.stall_s if mode == "watch" else opts.sample_s,
        patience_s=opts.watch.patience_s, instrumented=opts.instrument and mode == "watch", on_hang=opts.on_hang,
        stragglers=res.probe.outside if res.verdict.is_hang and mode == "watch" else [],
        numbered=res.numbered, ready_line=scanner.ready_line if scanner else "",
        ready_s=round(scanner.ready_t - t0, 1) if scanner and scanner.ready_t is not None and t0 is not None else None,
    )


def _report(run_dir: RunDir, mode: str, command: str, roots: list[int], tree: ProcessTree, res: MonitorResult,
            opts: ObserveOptions, scanner: ProgressScanner | None, started: dt.datetime, t0: float,
            returncode: int | None, notes: list[str], *, ended_by_user: bool = False) -> tuple[Report, int]:
    wd = res.verdict
    if wd.is_hang:
        stacks, gpu, runs, env = collect(run_dir, res.subjects, wd.busy_ranks, command=command, hang=True,
                                         gpu_state=opts.gpu_state, core_dump=opts.core_dump)
        code = ExitCode.REPRODUCED
    else:
        stacks, gpu, runs, env = collect(run_dir, res.subjects, [], command=command, hang=False)
        code = ExitCode.CLEAN if wd.cls in ("clean", "slow") else ExitCode.CRASH
    job = _job_record(mode, command, roots, tree, res, opts, scanner, returncode, t0)
    if ended_by_user:
        job = job.model_copy(update={"ended_by_user": True})
    if job.output_tail and wd.cls == "crash":
        notes = [*notes, "last lines of the command's output:", *[f"    {ln}" for ln in job.output_tail[-10:]]]
    ctx = JobContext(job=job, ranks={r: t.pid for r, t in res.subjects.items()},
                     started=started, duration_s=time.monotonic() - t0, exit_code=int(code))
    ev = Evidence(watchdog=wd, stacks=stacks, gpu=gpu, collectors=runs, env=env, notes=notes)
    rep = diagnose(run_dir, ev, ctx)
    return rep, int(code)


INTERRUPTED = 130


def _interrupted_report(run_dir: RunDir, command: str, root: int, tree: ProcessTree, res: MonitorResult,
                        opts: ObserveOptions, scanner: ProgressScanner, started: dt.datetime, t0: float,
                        notes: list[str]) -> Report:
    """Ctrl-C before any hang: the stacks taken at that moment, the environment, what the job printed."""
    from repro.collectors.environment import collect_env

    env = collect_env(run_dir, "").model_copy(update={"command_line": command})
    job = _job_record("watch", command, [root], tree, res, opts, scanner, None, t0)
    job = job.model_copy(update={"interrupted": True, "stragglers": []})
    ctx = JobContext(job=job, ranks={r: t.pid for r, t in res.subjects.items()},
                     started=started, duration_s=time.monotonic() - t0, exit_code=INTERRUPTED)
    ev = Evidence(watchdog=res.verdict, stacks=list(res.probe.stacks.values()), env=env,
                  notes=[*notes, "vdiag was interrupted (Ctrl-C) and ended the job; the stacks are Python-only "
                                 "ones taken at that moment"])
    return diagnose(run_dir, ev, ctx)


def _render(rep: Report, opts: ObserveOptions) -> None:
    if opts.quiet:
        return
    from rich.console import Console

    from repro.report.terminal import render_terminal

    render_terminal(rep, Console(stderr=True))


def watch_command(argv: list[str], opts: ObserveOptions) -> Outcome:
    if not argv:
        raise ScenarioError("vdiag watch: give the command to watch after `--`, e.g. "
                            "vdiag watch -- torchrun --nproc-per-node 2 job.py")
    if opts.on_hang not in ("report", "kill"):
        raise ScenarioError(f"--on-hang {opts.on_hang!r}: allowed values are report, kill")
    if shutil.which(argv[0]) is None:  # before any run folder exists
        if os.sep in argv[0] and os.path.exists(argv[0]):
            raise EnvironmentProblem(f"vdiag watch: {argv[0]!r}: permission denied (not executable); chmod +x it "
                                     "or run it through its interpreter")
        raise ScenarioError(f"vdiag watch: {argv[0]!r}: command not found; give the program to run after `--` "
                            "(its full path, or one on PATH), e.g. vdiag watch -- torchrun --nproc-per-node 2 job.py")
    command = " ".join(redact_argv(argv))
    opts.reports_dir.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir.create(opts.reports_dir, "watch-" + os.path.basename(argv[0]))
    (run_dir.root / "command.txt").write_text(command + "\n")
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    scanner = ProgressScanner(ready_patterns=opts.watch.ready_patterns)
    env: dict[str, str] = {}
    notes: list[str] = []
    if opts.instrument:
        old = os.environ.get("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), str(PKG_ROOT), *([old] if old else [])])
        env["VDIAG_WATCH_DIR"] = str(run_dir.root)
        notes.append("vdiag's FlashInfer/vLLM instrumentation was loaded into the job's Python processes "
                     "(a sitecustomize on PYTHONPATH); it writes launch logs only where FlashInfer or vLLM is used")
    if opts.core_dump:
        from repro.collectors.gpu import coredump_env

        env.update(coredump_env(run_dir))
    job = Job(argv, run_dir.root / "logs" / "output.log", scanner, env)
    job.start()
    tree = ProcessTree([job.pid])
    mon = Monitor(tree, run_dir, opts.watch, job=job, scanner=scanner, say=lambda m: _say(opts, m))
    rep: Report | None = None
    code = int(ExitCode.CLEAN)
    try:
        res = mon.watch()
        if res.ended:
            job.wait_output()
            rep, code = _report(run_dir, "watch", command, [job.pid], tree, res, opts, scanner, started, t0,
                                res.returncode, notes)
            _render(rep, opts)
            return Outcome(rep, run_dir, code)
        rep, code = _report(run_dir, "watch", command, [job.pid], tree, res, opts, scanner, started, t0, None,
                            notes)
        _render(rep, opts)
        print(run_dir.report_md, flush=True)
        if opts.on_hang == "kill":
            _say(opts, "vdiag: hang reported; ending the job (--on-hang kill)")
            job.end()
            return Outcome(rep, run_dir, code)
        _say(opts, f"vdiag: hang reported in {run_dir.report_md}; the job keeps running (--on-hang report). "
                   "Ctrl-C ends it.")
        while job.returncode() is None:
            time.sleep(0.5)
        return Outcome(rep, run_dir, code)
    except KeyboardInterrupt:
        if rep is not None:  # the hang was reported already: end the job, exit 1
            job.end()
            return Outcome(rep, run_dir, code)
        if scanner.ready_line:  # start-up had finished: a clean start-up, ended by the user
            job.end()
            res = mon.ended_by_user()
            rep, code = _report(run_dir, "watch", command, [job.pid], tree, res, opts, scanner, started, t0,
                                job.returncode(), notes, ended_by_user=True)
            _render(rep, opts)
            _say(opts, f"vdiag: the job's start-up had finished and no hang was seen; the job was ended; "
                       f"{run_dir.report_md}")
            return Outcome(rep, run_dir, code)
        try:
            res = mon.interrupted()
        finally:
            job.end()
        rep = _interrupted_report(run_dir, command, job.pid, tree, res, opts, scanner, started, t0, notes)
        _say(opts, f"vdiag: interrupted before any hang was seen; the job was ended; {run_dir.report_md}")
        return Outcome(rep, run_dir, INTERRUPTED)
    finally:
        if job.returncode() is None:
            job.end()
        job.close()


def attach_command(pids: list[int], opts: ObserveOptions, *, tree: bool = False) -> Outcome:
    if not pids:
        raise ScenarioError("vdiag attach: give one or more pids (vdiag attach PID [PID...]) or --tree PID")
    if tree and len(pids) != 1:
        raise ScenarioError("vdiag attach --tree: give one pid, the root of the job's process tree")
    procs = [check_pid(p) for p in pids]
    command = " | ".join(" ".join(redact_argv(p.cmdline())) for p in procs)[:2000]
    opts.reports_dir.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir.create(opts.reports_dir, f"attach-{pids[0]}")
    (run_dir.root / "command.txt").write_text(command + "\n")
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    ptree = ProcessTree(pids, follow=tree)
    mon = Monitor(ptree, run_dir, opts.watch, say=lambda m: _say(opts, m))
    res = mon.sample(opts.sample_s)
    rep, code = _report(run_dir, "attach", command, pids, ptree, res, opts, None, started, t0, None, [
        "vdiag attach never stops or kills the job: it was paused only while each stack was dumped"])
    if not res.verdict.is_hang:
        code = int(ExitCode.CLEAN)
    _render(rep, opts)
    print(run_dir.report_md, flush=True)
    return Outcome(rep, run_dir, code)
