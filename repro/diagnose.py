"""From a run folder's records to a `Report`: the analysis, the verdict and the facts, in one place.

`diagnose` is the one path every source of evidence takes to the report that the renderers in
`repro.report` draw: `vdiag run` (repro/run.py), the multi-node merge (repro/merge.py), `vdiag report
--reanalyse` (old records, the analysis of today) and `vdiag watch`/`attach` (repro/observe/). The
evidence is the watchdog's verdict, stacks, GPU state, file locks, the collectors' runs, the environment
and the launch logs in the run folder; the context is the scenario vdiag ran (`RunContext`) or, for a job
vdiag did not launch, the observed job: its redacted command line, its processes and their identities
(`JobContext`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field

from repro import __version__
from repro.analysis import analyze, fault_outcomes
from repro.errors import ExitCode, Interrupted, ScenarioError
from repro.events import read_rank_log
from repro.layout import place
from repro.observed_verdict import innermost, observed_verdict, wait_text
from repro.records import (
    CollectorRun,
    EnvInfo,
    Fact,
    FileLockHold,
    GpuState,
    ObservedJob,
    RankLog,
    RankSummary,
    Report,
    StackSample,
    WatchdogVerdict,
)
from repro.rundir import RunDir
from repro.scenario import FaultWarning, Scenario, fault_warnings

HANG_CLASSES = ("spin-deadlock", "all-spinning", "host-wait", "timeout")


@dataclass
class Evidence:
    watchdog: WatchdogVerdict
    stacks: list[StackSample] = field(default_factory=list)
    gpu: list[GpuState] = field(default_factory=list)
    collectors: list[CollectorRun] = field(default_factory=list)
    env: EnvInfo = field(default_factory=EnvInfo)
    notes: list[str] = field(default_factory=list)
    locks: list[FileLockHold] | None = None  # None: the run folder's locks.json (repro.collectors.locks)
    logs: dict[int, RankLog] | None = None  # None: the run folder's launch logs


@dataclass
class RunContext:
    """A run vdiag launched from a scenario (`vdiag run`, the merge of its nodes, its folder re-analysed)."""

    scenario: Scenario
    ranks: list[int]  # the ranks whose records the report covers
    scenario_file: str = ""
    started: str = ""  # ISO time
    duration_s: float = 0.0
    warnings: list[FaultWarning] = field(default_factory=list)  # faults that can never fire (repro.scenario)
    interrupted: str = ""  # the signal that stopped the run, if one did
    exit_code: int | None = None  # given (a run killed before its verdict, a stored interrupted run); else computed
    placement: str | None = None  # given (the merge); else from the ranks' hello records
    notes_final: bool = False  # the evidence's notes already hold the per-run notes (each node's, a stored report's)
    extra_notes: list[str] = field(default_factory=list)  # after the computed notes (the node's note)
    verdict_suffix: str = ""  # appended to the verdict's paragraph (the merge: which node ran which ranks)


@dataclass
class JobContext:
    """A job vdiag did not launch: what `watch` or `attach` saw of it."""

    job: ObservedJob
    ranks: dict[int, int]  # rank (or vdiag's process number) -> pid
    started: dt.datetime
    duration_s: float
    exit_code: int


def _layout(job: ObservedJob, ranks: dict[int, int]) -> tuple[int, int, int]:
    """(world, tp, pp): from the workers' own WORLD_SIZE or titles; tp = world, pp = 1 where not shown."""
    by_pid = {p.pid: p for p in job.processes}
    ids = [by_pid[p].identity for p in ranks.values() if p in by_pid]
    world = max([i.world_size for i in ids if i.world_size] + [len(ranks), 1])
    tps = [i.tp_rank for i in ids if i.tp_rank is not None and "title" in i.sources.get("tp_rank", "title")]
    pps = [i.pp_rank for i in ids if i.pp_rank is not None]
    tp = max(tps) + 1 if tps and any(i.title for i in ids) else world
    pp = max(pps) + 1 if pps and any(i.title for i in ids) else 1
    if tp * pp != world:
        tp, pp = world, 1
    return world, tp, pp


def _facts(job: ObservedJob, ctx: JobContext, ev: Evidence, stacks: dict[int, StackSample],
           logs: dict[int, RankLog]) -> list[Fact]:
    by_pid = {p.pid: p for p in job.processes}
    out: list[Fact] = []
    for r, pid in sorted(ctx.ranks.items()):
        p = by_pid.get(pid)
        if p is None:
            continue
        if ctx.job.numbered:
            out.append(Fact(text=f"process {r} is pid {pid} ({p.cmdline[:80]}); its rank is unknown (no RANK in its "
                                 "environment, no vLLM title), so vdiag numbered it in pid order",
                            how="inferred", source="process tree (psutil)"))
        else:
            out.append(Fact(text=f"rank {r} is pid {pid}" + (f" ({p.identity.title})" if p.identity.title else ""),
                            how="inferred" if "inferred" in p.identity.sources.get("rank", "") else "observed",
                            source=p.identity.sources.get("rank", "")))
        if p.cpu_pct is not None and p.state in ("busy", "idle"):
            out.append(Fact(text=f"{'process' if ctx.job.numbered else 'rank'} {r} used {p.cpu_pct:.0f} % of a core "
                                 f"({p.state})", how="observed", source=f"/proc/{pid}/stat (psutil)"))
        if p.identity.nvml_gpus:
            out.append(Fact(text=f"pid {pid} holds memory on GPU {','.join(map(str, p.identity.nvml_gpus))}",
                            how="observed", source="NVML"))
        s = stacks.get(r)
        w = wait_text(s)
        if s is not None and w:
            out.append(Fact(text=f"{'process' if ctx.job.numbered else 'rank'} {r}'s stack is in {w}", how="observed",
                            source=s.source))
    for m in job.progress[-3:]:
        out.append(Fact(text=f"progress bar {m.label!r} at {m.n}/{m.total} ({m.updates} updates)", how="observed",
                        source="the job's output"))
    if ev.watchdog.is_hang:
        out.append(Fact(text=f"the class {ev.watchdog.cls} (busy: {ev.watchdog.busy_ranks or 'none'}, idle: "
                             f"{ev.watchdog.idle_ranks or 'none'}) is inferred from CPU time and stacks",
                        how="inferred", source="repro.observe.monitor"))
    if any(lg.launches for lg in logs.values()):
        n = sum(len(lg.launches) for lg in logs.values())
        out.append(Fact(text=f"the launch configurations of the job's {n} fused calls (launch/rank<R>.jsonl, recorded "
                             "by vdiag's instrumentation as the job made them) are computed from FlashInfer's "
                             "launcher arithmetic", how="computed", source="repro.kernel_launch"))
    return out


def diagnose(run_dir: RunDir, ev: Evidence, ctx: RunContext | JobContext) -> Report:
    """Analyse the evidence and render its report (report.md, report.json, activity) into the run folder."""
    if isinstance(ctx, RunContext):
        return _diagnose_run(run_dir, ev, ctx)
    return _diagnose_job(run_dir, ev, ctx)


def _diagnose_run(run_dir: RunDir, ev: Evidence, ctx: RunContext) -> Report:
    from repro.collectors.locks import load_locks
    from repro.cupti_trace import cupti_findings

    sc, wd = ctx.scenario, ev.watchdog
    tp, pp = sc.parallel.tp, sc.parallel.pp
    logs = ev.logs if ev.logs is not None else {r: read_rank_log(run_dir.launch_log(r), r) for r in ctx.ranks}
    locks = ev.locks if ev.locks is not None else load_locks(run_dir.root)
    analysis = analyze(logs, wd, ev.stacks, ev.gpu, tp=tp, pp=pp, fused=sc.fusion_enabled(),
                       pattern=sc.fusion.pattern, fp32_acc=sc.fusion.fp32_acc, locks=locks)
    cupti_checks, cupti_notes = cupti_findings(run_dir.root, logs, hang=wd.is_hang)
    if cupti_checks:  # launches the driver saw, against the computed launch configurations
        analysis = analysis.model_copy(update={"grid_checks": [*analysis.grid_checks, *cupti_checks]})
    if ctx.verdict_suffix:
        para = analysis.verdict.paragraph.rstrip()
        verdict = analysis.verdict.model_copy(
            update={"paragraph": para + ("" if para.endswith(".") else ".") + " " + ctx.verdict_suffix})
        analysis = analysis.model_copy(update={"verdict": verdict})
    notes = list(ev.notes)
    env = ev.env
    if not ctx.notes_final:
        notes.extend(cupti_notes)
        notes.extend(gpu_state_notes(ev.gpu, ev.collectors))
    if sc.engine == "vllm":  # vLLM's version, commit and resolved config, from the workers
        from repro.engines.vllm import runner as engine_vllm

        vllm_notes, vllm_versions = engine_vllm.report_facts(run_dir.root)
        if not ctx.notes_final:
            notes.extend(vllm_notes)
        env = env.model_copy(update={"versions": {**env.versions, **vllm_versions}})
    code = int(exit_code_for(wd, bool(analysis.corruption))) if ctx.exit_code is None else ctx.exit_code
    if ctx.interrupted:
        code = Interrupted(ctx.interrupted).exit_code
        if not ctx.notes_final:
            notes.append(f"the run was interrupted by {Interrupted(ctx.interrupted).how}; every process and "
                         "shared-memory segment was cleaned up and the report holds what was collected until then")
    notes.extend(ctx.extra_notes)
    placement = ctx.placement if ctx.placement is not None else _placement(sc, logs)
    report = Report(
        vdiag_version=__version__, scenario_name=sc.name, scenario_file=ctx.scenario_file,
        scenario_yaml=run_dir.scenario_yaml.read_text() if run_dir.scenario_yaml.exists() else "",
        run_dir=str(run_dir.root), started=ctx.started, duration_s=round(ctx.duration_s, 2),
        backend=sc.backend, engine=sc.engine, world_size=sc.world_size, tp=tp, pp=pp,
        fusion_enabled=sc.fusion_enabled(), payload_width=sc.payload_width(), hidden=sc.model.hidden_size,
        exit_code=code, expect=sc.expect, placement=placement,
        ranks=summarize_ranks(logs, wd, tp, pp), watchdog=wd, analysis=analysis,
        stacks=ev.stacks, gpu=ev.gpu, locks=locks, collectors=ev.collectors, env=env, notes=notes,
        faults=fault_outcomes(sc, logs, ctx.warnings),
    )
    return write_report(run_dir, report)


def _placement(sc: Scenario, logs: dict[int, RankLog]) -> str:
    if sc.backend == "sim":
        return "CPU processes, one per rank (sim)"
    from repro.backends.gpu_reference import placement_text

    return placement_text({r: (lg.hello.device, None) for r, lg in logs.items() if lg.hello},
                          sc.backend, sc.fusion.workspace_group, sc.fusion_enabled())


def _diagnose_job(run_dir: RunDir, ev: Evidence, ctx: JobContext) -> Report:
    job = ctx.job
    world, tp, pp = _layout(job, ctx.ranks)
    logs = {r: read_rank_log(run_dir.launch_log(r), r) for r in ctx.ranks}
    stacks_by_rank = {s.rank: s for s in ev.stacks}
    fused = any(e.op == "fused" for lg in logs.values() for e in lg.launches)
    from repro.collectors.locks import load_locks

    locks = ev.locks if ev.locks is not None else load_locks(run_dir.root)
    analysis = analyze(logs, ev.watchdog, ev.stacks, ev.gpu, tp=tp, pp=pp, fused=fused, locks=locks)
    if not any(lg.launches for lg in logs.values()):
        verdict = observed_verdict(ev.watchdog, job, stacks_by_rank, analysis.hypotheses,
                                   gpu={g.rank: g for g in ev.gpu}, ranks=analysis.verdict.ranks, locks=locks)
        analysis = analysis.model_copy(update={"verdict": verdict})
    job = job.model_copy(update={"facts": _facts(job, ctx, ev, stacks_by_rank, logs)})
    notes = list(ev.notes)
    from repro.engines.vllm.runner import jit_notes

    notes += [n for n in jit_notes(run_dir.root) if n not in notes]  # the job's FlashInfer JIT builds, if recorded
    denied = [c for c in ev.collectors if c.advice and "ptrace denied" in c.advice]
    if denied:
        note = ("ptrace was refused, so py-spy and cuda-gdb could not read the processes; still observed: "
                "CPU activity per process (/proc), NVML, the environment and the job's output. To grant "
                "ptrace: " + denied[0].advice)
        if note not in notes:  # a stored report's notes have it already (--reanalyse)
            notes.append(note)
    by_pid = {p.pid: p for p in job.processes}
    summaries = []
    for r, pid in sorted(ctx.ranks.items()):
        p = by_pid.get(pid)
        ident = p.identity if p else None
        pl = place(r, tp, pp) if r < world else None
        state = {"busy": "busy", "idle": "idle", "exited": "exited"}.get(p.state if p else "", "unknown")
        if ev.watchdog.cls == "crash" and p is not None and p.state == "exited":
            state = "exited"
        site = wait_text(stacks_by_rank.get(r))
        if not site and stacks_by_rank.get(r) is not None:
            site = innermost(stacks_by_rank[r])
        summaries.append(RankSummary(
            rank=r, pp_stage=ident.pp_rank if ident and ident.pp_rank is not None else (pl.pp_stage if pl else 0),
            tp_rank=ident.tp_rank if ident and ident.tp_rank is not None else (pl.tp_rank if pl else r),
            pid=pid, device=",".join(f"cuda:{g}" for g in ident.nvml_gpus) if ident and ident.nvml_gpus else "cpu",
            calls_done=len(logs[r].results), last_phase=site or (logs[r].phases[-1].phase if logs[r].phases else ""),
            pending=logs[r].pending_launch() if ev.watchdog.is_hang else None, state=state,
        ))
    engine = "vllm" if any(p.identity.title for p in job.processes) else (
        "torchrun" if any(p.identity.role == "torchrun-agent" for p in job.processes) else "process")
    name = f"{job.mode}: {job.command[:80]}" if job.command else job.mode
    report = Report(
        vdiag_version=__version__, scenario_name=name, scenario_file="", scenario_yaml="", run_dir=str(run_dir.root),
        started=ctx.started.isoformat(timespec="seconds"), duration_s=round(ctx.duration_s, 2),
        backend="observed", engine=engine, world_size=world, tp=tp, pp=pp, fusion_enabled=fused, payload_width=0,
        hidden=0, exit_code=ctx.exit_code, placement="", ranks=summaries, watchdog=ev.watchdog, analysis=analysis,
        stacks=ev.stacks, gpu=ev.gpu, locks=locks, collectors=ev.collectors, env=ev.env, notes=notes, observed=job,
    )
    return write_report(run_dir, report)


def gpu_state_notes(gpu: list[GpuState], runs: list[CollectorRun]) -> list[str]:
    """Which source gave the GPU state, with its time (issue 11: attach vs core dump)."""
    out = []
    for src in sorted({g.source for g in gpu}):
        got = sorted(g.rank for g in gpu if g.source == src)
        secs = [g.seconds for g in gpu if g.source == src]
        out.append(f"GPU state from {src} for ranks {','.join(map(str, got))} "
                   f"({min(secs):.1f}-{max(secs):.1f} s per rank)")
    dumps = [c for c in runs if c.name == "cuda core dump" and c.ok]
    if dumps:
        out.append("the CUDA core dump ended the dumped processes (taken last); dumps kept under gpu/core.*")
    return out


def exit_code_for(wd: WatchdogVerdict, any_wrong: bool) -> ExitCode:
    if wd.cls == "crash":
        return ExitCode.CRASH
    if wd.cls in HANG_CLASSES or any_wrong:
        return ExitCode.REPRODUCED
    return ExitCode.CLEAN


def summarize_ranks(logs: dict[int, RankLog], wd: WatchdogVerdict, tp: int, pp: int) -> list[RankSummary]:
    out = []
    crashed = {c.rank for c in wd.crashed}
    for r in sorted(logs):
        lg = logs[r]
        p = place(r, tp, pp)
        if r in crashed:
            state = "crashed"
        elif lg.done is not None:
            state = "finished"
        elif r in wd.busy_ranks:
            state = "spinning"
        elif wd.is_hang:
            state = "idle"
        else:
            state = "stopped"
        out.append(RankSummary(
            rank=r, pp_stage=p.pp_stage, tp_rank=p.tp_rank, pid=lg.hello.pid if lg.hello else None,
            device=lg.hello.device if lg.hello else "cpu", calls_done=len(lg.results),
            wrong_calls=sum(1 for x in lg.results if not x.ok),
            last_phase=lg.phases[-1].phase if lg.phases else "", pending=lg.pending_launch() if wd.is_hang else None,
            state=state,
        ))
    return out


def rebuild_report(run_dir: RunDir) -> Report:
    """A report from a run folder's records alone, for a run that wrote none (vdiag was killed: SIGKILL,
    an out-of-memory kill): scenario, launch logs, the watchdog's verdict if it had one, the stacks taken."""
    from repro.collectors.stacks import parse_pyspy

    try:
        sc = Scenario.model_validate_json(run_dir.scenario_json.read_text())
    except (OSError, ValueError):
        raise ScenarioError(f"{run_dir.root}: no report.json and no readable scenario.json; give a folder that "
                            "`vdiag run` created") from None
    ranks = run_dir.ranks() or list(range(sc.world_size))
    logs = {r: read_rank_log(run_dir.launch_log(r), r) for r in ranks}
    wd: WatchdogVerdict | None = None
    with contextlib.suppress(OSError, ValueError):
        wd = WatchdogVerdict.model_validate_json(run_dir.watchdog_json.read_text())
    notes = ["rebuilt by `vdiag report` from the run folder's records: vdiag ended without writing a report "
             "(killed by a signal it cannot catch, such as SIGKILL, or it died)"]
    if wd is None:
        times = [e.t for lg in logs.values() for e in lg.launches] + [e.t for lg in logs.values() for e in lg.results]
        first = [lg.hello.t for lg in logs.values() if lg.hello is not None]
        wd = WatchdogVerdict(cls="interrupted", stall_s=0.0, started_t=min(first or [0.0]),
                             last_progress_t=max(times) if times else None, verdict_t=max(times or [0.0]),
                             note="no verdict was reached", interrupted_by="killed")
    stacks: list[StackSample] = []
    for r, lg in logs.items():
        f = run_dir.stack_file(r)
        if f.exists() and lg.hello is not None:
            with contextlib.suppress(Exception):
                stacks.append(StackSample(rank=r, pid=lg.hello.pid, source="py-spy",
                                          threads=parse_pyspy(f.read_text(errors="replace"))))
    started = dt.datetime.fromtimestamp(wd.started_t, dt.timezone.utc) if wd.started_t else None
    warnings = fault_warnings(sc, sc.name)
    ev = Evidence(watchdog=wd, stacks=stacks, notes=notes + [w.message for w in warnings],
                  locks=[], logs=logs)
    ctx = RunContext(scenario=sc, ranks=ranks, started=started.isoformat(timespec="seconds") if started else "",
                     duration_s=max(0.0, wd.verdict_t - wd.started_t), warnings=warnings,
                     exit_code=int(ExitCode.KILLED) if wd.cls == "interrupted" else None, placement="",
                     notes_final=True)
    return diagnose(run_dir, ev, ctx)


def reanalyse(run_dir: RunDir) -> Report:
    """`vdiag report --reanalyse`: the analysis of today over a folder's stored records (launch logs,
    watchdog verdict, stacks, GPU state, locks, collectors, environment), written as a new report."""
    from repro.multinode import merged_nodes_text
    from repro.report.json_report import load_report

    if not run_dir.report_json.exists():
        return rebuild_report(run_dir)
    old = load_report(run_dir.report_json)
    if old.observed is not None:  # watch / attach: the job as it was seen, analysed again
        ranks = {r.rank: r.pid for r in old.ranks if r.pid is not None}
        by_pid = {p.pid: p.identity for p in old.observed.processes}
        # reports written before ObservedJob.numbered existed: vdiag numbered them where a pid's rank differs
        numbered = old.observed.numbered or any(by_pid.get(pid) is None or by_pid[pid].rank != r
                                                for r, pid in ranks.items())
        job_ctx = JobContext(job=old.observed.model_copy(update={"facts": [], "numbered": numbered}), ranks=ranks,
                             started=dt.datetime.fromisoformat(old.started), duration_s=old.duration_s,
                             exit_code=old.exit_code if old.exit_code is not None else 0)
        ev = Evidence(watchdog=old.watchdog, stacks=list(old.stacks), gpu=list(old.gpu),
                      collectors=list(old.collectors), env=old.env, notes=list(old.notes), locks=list(old.locks))
        return diagnose(run_dir, ev, job_ctx)
    try:
        sc = Scenario.model_validate_json(run_dir.scenario_json.read_text())
    except (OSError, ValueError):
        raise ScenarioError(f"{run_dir.root}: scenario.json is missing or unreadable, so the analysis cannot run "
                            f"again; run `vdiag report {run_dir.root}` without --reanalyse") from None
    ev = Evidence(watchdog=old.watchdog, stacks=list(old.stacks), gpu=list(old.gpu), collectors=list(old.collectors),
                  env=old.env, notes=list(old.notes), locks=list(old.locks))
    ctx = RunContext(
        scenario=sc, ranks=run_dir.ranks() or [r.rank for r in old.ranks], scenario_file=old.scenario_file,
        started=old.started, duration_s=old.duration_s, warnings=fault_warnings(sc, old.scenario_file or sc.name),
        exit_code=old.exit_code if old.watchdog.interrupted_by else None, placement=old.placement,
        notes_final=True, verdict_suffix=merged_nodes_text(run_dir.root),
    )
    return diagnose(run_dir, ev, ctx)


def write_report(run_dir: RunDir, report: Report) -> Report:
    """Render report.md, report.json and the activity picture from the records (also `vdiag report`)."""
    from repro.report import json_report, markdown
    from repro.report.timeline import render_activity
    from repro.watchdog import load_activity

    samples = load_activity(run_dir.activity)
    meta = {r.rank: f"r{r.rank} pp{r.pp_stage} tp{r.tp_rank}" for r in report.ranks}
    with contextlib.suppress(Exception):
        stall_t = (report.watchdog.last_progress_t or 0) + report.watchdog.stall_s if report.watchdog.is_hang else None
        render_activity(samples, run_dir.activity_svg, ranks_meta=meta, stall_t=stall_t,
                        verdict_t=report.watchdog.verdict_t)
        report = report.model_copy(update={"activity_plot": run_dir.activity_svg.name})
    json_report.render(report, run_dir.report_json)
    markdown.render(report, run_dir.report_md)
    return report
