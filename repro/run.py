"""`vdiag run`: scenario -> torchrun -> watchdog -> collectors -> `repro.diagnose` (analysis, report), exit code."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from repro.diagnose import HANG_CLASSES, Evidence, RunContext, diagnose
from repro.errors import EnvironmentProblem, ExitCode, Interrupted, ScenarioError
from repro.events import read_rank_log
from repro.live import LiveView
from repro.merge import auto_merge
from repro.multinode import (
    NodeInfo,
    check_multinode,
    discover_local_ranks,
    linger_for_other_nodes,
    node_note,
    write_run_node_info,
)
from repro.records import (
    CollectorRun,
    EnvInfo,
    GpuState,
    RankLog,
    Report,
    StackSample,
    WatchdogVerdict,
)
from repro.redact import redact_text
from repro.rundir import RunDir
from repro.scenario import Scenario, dump_resolved, fault_warnings, load_scenario
from repro.torchrun import Launch, NodeSpec, sweep_shm
from repro.watchdog import Watchdog


@dataclass
class RunOptions:
    overrides: list[str] = field(default_factory=list)
    reports_dir: Path = Path("reports")
    node: NodeSpec = field(default_factory=NodeSpec)
    gpu_state: str = "auto"  # auto | attach | coredump | none
    live: bool = True
    quiet: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    merge_wait_s: float = 60.0  # multi-node: how long node 0 waits for the other nodes' folders to merge


@dataclass
class RunOutcome:
    report: Report
    run_dir: RunDir
    exit_code: int
    merged_dir: RunDir | None = None  # multi-node: node 0's report of all nodes, when it could merge
    merge_message: str = ""

    @property
    def expectation_met(self) -> bool | None:
        exp = self.report.expect
        if exp is None:
            return None
        cls = self.report.analysis.verdict.cls
        wrong = bool(self.report.analysis.corruption)
        if exp == "hang":
            return cls in HANG_CLASSES
        if exp == "clean":
            return cls in ("clean", "slow") and not wrong
        if exp == "corruption":
            return wrong
        return self.exit_code == ExitCode.REPRODUCED  # failure: a hang or corruption


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        n = int(pynvml.nvmlDeviceGetCount())
        pynvml.nvmlShutdown()
        return n
    except Exception:
        return 0


def resolve_backend(sc: Scenario) -> tuple[Scenario, list[str]]:
    notes = []
    backend = sc.backend
    n_gpus = gpu_count()
    if backend == "auto":
        if n_gpus == 0:
            backend = "sim"
            notes.append("backend auto -> sim: no GPU on this machine")
        elif importlib.util.find_spec("flashinfer") is not None:
            backend = "flashinfer"
        else:
            backend = "sim"
            notes.append("backend auto -> sim: a GPU is present but flashinfer-python is not installed")
    if backend in ("flashinfer",) and n_gpus == 0:
        raise EnvironmentProblem(
            f"scenario {sc.name}: backend: {backend} needs an NVIDIA GPU and none was found (NVML); "
            "use backend: sim on this machine"
        )
    if backend == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        raise EnvironmentProblem(
            f"scenario {sc.name}: backend: flashinfer needs flashinfer-python; run `pip install -e .[flashinfer]`"
        )
    if sc.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EnvironmentProblem(f"scenario {sc.name}: engine: vllm needs vLLM; run `pip install -e .[vllm]`")
    update: dict[str, Any] = {"backend": backend}
    if backend in ("flashinfer", "nccl") and n_gpus > 0:
        # The real kernel runs at the real shape: the payload is the full hidden width, every element checked.
        update["sim"] = sc.sim.model_copy(update={"payload_width": None})
    return sc.model_copy(update=update), notes


def _collect(
    run_dir: RunDir, sc: Scenario, logs: dict[int, RankLog], wd: WatchdogVerdict, opts: RunOptions,
    have: dict[int, StackSample] | None = None, have_runs: list[CollectorRun] | None = None,
) -> tuple[list[StackSample], list[GpuState], list[CollectorRun], EnvInfo]:
    """Run the collectors in parallel; a collector that fails is recorded and does not stop the others.

    `have`: Python-only stacks the watchdog took of idle ranks during the stall (no progress since);
    they are used as they are, not taken again."""
    from repro.collectors.host import collect_host

    pids = {r: lg.hello.pid for r, lg in logs.items() if lg.hello is not None}
    alive = {r: p for r, p in pids.items() if _alive(p)}
    have = {r: st for r, st in (have or {}).items() if r in alive and r not in wd.busy_ranks} if wd.is_hang else {}
    stacks: list[StackSample] = list(have.values())
    gpu: list[GpuState] = []
    runs: list[CollectorRun] = [c for c in (have_runs or []) if c.rank in have] if have else []
    from repro import cupti_trace
    from repro.collectors.coredump import AUTO_GPU_STATE
    from repro.collectors.gpu import collect_gpu_attach

    gpu_state = AUTO_GPU_STATE if opts.gpu_state == "auto" else opts.gpu_state  # attach|coredump|both|none
    if opts.gpu_state == "auto" and cupti_trace.enabled():
        gpu_state = "attach"  # the driver disables user-triggered core dumps in a process with CUPTI
    on_gpu = sc.backend in ("flashinfer",) or (sc.backend == "nccl" and gpu_count() > 0)
    busy = {r: p for r, p in alive.items() if r in wd.busy_ranks} or alive
    native: dict[int, int] = {}
    rest: dict[int, int] = {}
    if wd.is_hang and alive:
        # Native stacks cost ~0.5 CPU-s per rank: take them where the wait is (busy ranks, or every rank
        # when none is busy), Python-only stacks elsewhere.
        native = {r: p for r, p in alive.items() if r in wd.busy_ranks} or {
            r: p for r, p in alive.items() if r not in have}
        rest = {r: p for r, p in alive.items() if r not in native and r not in have}
    env, got, host_runs = collect_host(run_dir, run_dir.scenario_yaml.read_text(), native, rest,
                                       alive if wd.is_hang else {})
    stacks.extend(got)
    runs.extend(host_runs)
    if wd.is_hang and alive and on_gpu and gpu_state in ("attach", "both"):
        # After the stacks, never beside them: a process has one ptrace tracer, so py-spy and cuda-gdb
        # attached at once make one of them fail (seen on the H100).
        gpu, r = collect_gpu_attach(busy, run_dir)
        runs.extend(r)
    if wd.is_hang and alive and on_gpu and gpu_state in ("coredump", "both"):
        # Destructive (the dumped processes die): only now that every other collector has finished.
        # A process cuda-gdb attached to no longer answers the dump pipe (seen on the H100), so "both"
        # dumps only the ranks the attach could not read.
        from repro.collectors.coredump import collect_gpu_coredump

        attached_ranks = {g.rank for g in gpu}
        targets = {k: p for k, p in busy.items() if k not in attached_ranks}
        dumped, r = collect_gpu_coredump(targets, run_dir)
        gpu.extend(dumped)
        runs.extend(r)
        dumped_ranks = {g.rank for g in dumped}
        if opts.gpu_state == "auto":  # the dump failed but the process lives: attach, where that can work
            from repro.collectors.coredump import attach_candidates, explain_attach

            left = {k: p for k, p in busy.items() if k not in dumped_ranks}
            fallback, skipped = attach_candidates(left, run_dir, r)
            runs.extend(skipped)
            if fallback:
                attached, r2 = collect_gpu_attach(fallback, run_dir)
                gpu.extend(attached)
                triggered = {c.rank for c in r if c.name == "cuda core dump trigger" and c.rank is not None}
                ptrace_ok = {s.rank for s in stacks if s.source.startswith("py-spy")}
                runs.extend(explain_attach(r2, triggered, ptrace_ok))
    stacks.sort(key=lambda s: s.rank)
    return stacks, gpu, runs, env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def run_scenario(path: str | Path, opts: RunOptions, console: Console | None = None) -> RunOutcome:
    console = console or Console(stderr=True)
    sc = load_scenario(path, opts.overrides)
    if sc.hook == "vllm-source":  # the built-in hook reads a checkout, which only `vdiag bisect --repo` gives it
        raise ScenarioError(
            f"{path}: hook: vllm-source reads a vLLM checkout: run `vdiag bisect {path} --repo PATH --good REV "
            "--bad REV`, or set hook to a module:function of your own (or remove it) for `vdiag run`"
        )
    sc, notes = resolve_backend(sc)
    if sc.engine == "vllm":  # real vLLM in every worker (repro/engines/vllm/runner.py, docs/vllm-engine.md)
        from repro.engines.vllm import runner as engine_vllm

        sc, vllm_notes = engine_vllm.prepare(sc, gpu_count(), opts.node.nnodes)
        notes.extend(vllm_notes)
    world = sc.world_size
    if opts.node.nnodes > 1 and world % opts.node.nnodes:
        raise ScenarioError(
            f"{path}: parallel: tp x pp = {world} ranks cannot be split evenly over --nnodes {opts.node.nnodes}"
        )
    if opts.node.multi:
        check_multinode(sc, opts.node, path)
    opts.reports_dir.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir.create(opts.reports_dir, sc.name + (f"-node{opts.node.node_rank}" if opts.node.multi else ""))
    # Users paste reports into public issues: no secret from the scenario reaches the run folder.
    run_dir.scenario_json.write_text(redact_text(sc.model_dump_json()))
    run_dir.scenario_yaml.write_text(redact_text(dump_resolved(sc)))
    if sc.backend == "sim" and sc.payload_scaled():
        notes.append(
            f"payload scaled: the sim carried {sc.payload_width()} of {sc.model.hidden_size} elements per token; "
            "launch records and the launch arithmetic use the real shape (docs/mechanisms.md, 'Payload scaling')"
        )
    sweep_shm()  # names left by vdiag processes that no longer exist
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    extra_env = dict(opts.extra_env)
    if sc.backend in ("flashinfer", "nccl") and gpu_count() > 0 and opts.gpu_state != "none":
        from repro.collectors.gpu import coredump_env

        extra_env = {**coredump_env(run_dir), **extra_env}  # pipes and dumps under the run folder
    launch = Launch(run_dir, world, node=opts.node, extra_env=extra_env)
    first_rank = opts.node.node_rank * launch.nproc_per_node
    local_ranks = list(range(first_rank, first_rank + launch.nproc_per_node))
    wd_verdict: WatchdogVerdict | None = None
    stacks: list[StackSample] = []
    gpu: list[GpuState] = []
    runs: list[CollectorRun] = []
    env = EnvInfo()
    interrupted = ""  # the signal that stopped the run: SIGINT (Ctrl-C), SIGTERM, SIGHUP
    pids: list[int] = []
    node_info: NodeInfo | None = None  # multi-node only
    warnings = fault_warnings(sc, str(path))
    for w in warnings:
        if not opts.quiet:
            console.print(w.line, markup=False, highlight=False, soft_wrap=True)
    notes.extend(w.message for w in warnings)
    dog: Watchdog | None = None
    with stop_signals() as guard:
        try:
            launch.start()
            if opts.node.multi:  # c10d places nodes by host name, not --node-rank: ask the workers
                if not opts.quiet:
                    console.print(f"vdiag: node {opts.node.node_rank} of {opts.node.nnodes}: waiting for the other "
                                  f"nodes at {opts.node.rdzv_endpoint} (rendezvous id {opts.node.rdzv_id})",
                                  markup=False, highlight=False)
                local_ranks = discover_local_ranks(run_dir, launch)
                node_info = write_run_node_info(opts.node, run_dir, local_ranks, started, sc.name)
            title = f"vdiag {sc.name}: {sc.backend}, tp={sc.parallel.tp} pp={sc.parallel.pp}"
            with LiveView(console, sc.parallel.tp, sc.parallel.pp, title) as view:
                dog = Watchdog(run_dir, launch, world, sc.watchdog, observers=[view] if opts.live else [],
                               use_gpu=sc.backend != "sim", ranks=local_ranks)
                wd_verdict = dog.watch()
            logs = {r: read_rank_log(run_dir.launch_log(r), r) for r in local_ranks}
            pids = [lg.hello.pid for lg in logs.values() if lg.hello is not None]
            stacks, gpu, runs, env = _collect(run_dir, sc, logs, wd_verdict, opts, have=dog.probe_stacks,
                                              have_runs=dog.probe_runs)
            if node_info is not None:
                node_info = write_run_node_info(opts.node, run_dir, local_ranks, started, sc.name,
                                                collected=True)
                linger_for_other_nodes(launch, wd_verdict, node_info, opts.reports_dir)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP (stop_signals): keep what was collected
            interrupted = e.signame if isinstance(e, Interrupted) else "SIGINT"
        finally:
            guard.defer()  # a second signal now waits until the processes are gone and the report is written
            if not pids:
                pids = [lg.hello.pid for r in local_ranks
                        if (lg := read_rank_log(run_dir.launch_log(r), r)).hello is not None]
            launch.teardown(extra_pids=pids)
        interrupted = interrupted or guard.pending
        if interrupted and not stacks and dog is not None:  # stopped while collecting: keep the stall's stacks
            stacks = sorted(dog.probe_stacks.values(), key=lambda st: st.rank)
            runs = [*dog.probe_runs, *runs]
        if wd_verdict is None:
            wd_verdict = interrupted_verdict(run_dir, dog, interrupted or "SIGINT")
        elif interrupted:  # stopped after the verdict, while collecting: the verdict stands
            wd_verdict = wd_verdict.model_copy(update={"interrupted_by": interrupted})
        logs = {r: read_rank_log(run_dir.launch_log(r), r) for r in local_ranks}
        ev = Evidence(watchdog=wd_verdict, stacks=stacks, gpu=gpu, collectors=runs, env=env, notes=notes, logs=logs)
        ctx = RunContext(scenario=sc, ranks=local_ranks, scenario_file=str(path),
                         started=started.isoformat(timespec="seconds"), duration_s=time.monotonic() - t0,
                         warnings=warnings, interrupted=interrupted,
                         extra_notes=[node_note(node_info)] if node_info is not None else [])
        report = diagnose(run_dir, ev, ctx)
        code = report.exit_code
        if not opts.quiet:
            from repro.report.terminal import render_terminal

            render_terminal(report, console)
    if interrupted:
        raise Interrupted(interrupted)
    outcome = RunOutcome(report=report, run_dir=run_dir, exit_code=code)
    if node_info is not None and node_info.node_rank == 0 and opts.merge_wait_s > 0:
        outcome.merged_dir, outcome.merge_message = auto_merge(run_dir, node_info, opts.reports_dir,
                                                               opts.merge_wait_s)
    return outcome


# ---- signals: SIGTERM and SIGHUP stop a run as Ctrl-C does --------------------------------------------

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class SignalGuard:
    """Turns SIGINT, SIGTERM and SIGHUP into `Interrupted` while armed; once deferred (cleaning up,
    writing the report), a signal is remembered in `pending` instead, so the report is never lost."""

    def __init__(self) -> None:
        self.armed = True
        self.pending = ""

    def handler(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.armed:
            self.armed = False
            raise Interrupted(name)
        self.pending = self.pending or name

    def defer(self) -> None:
        self.armed = False


@contextlib.contextmanager
def stop_signals() -> Iterator[SignalGuard]:
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        guard.armed = False
        yield guard
        return
    old = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, guard.handler)
    try:
        yield guard
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def interrupted_verdict(run_dir: RunDir, dog: Watchdog | None, by: str) -> WatchdogVerdict:
    """The watchdog's record of a run stopped before its verdict (what each rank had done, by whom)."""
    if dog is not None:
        return dog._verdict("interrupted", dog.started_wall or time.time(), dog.last_progress_wall,
                            dog.stall_threshold(), 0, since=time.monotonic() - 5,
                            note=f"interrupted by {by} before a verdict", interrupted_by=by)
    now = time.time()
    v = WatchdogVerdict(cls="interrupted", stall_s=0.0, started_t=now, last_progress_t=None, verdict_t=now,
                        note=f"interrupted by {by} before the watchdog started", interrupted_by=by)
    run_dir.watchdog_json.write_text(v.model_dump_json(indent=2))
    return v


#END
