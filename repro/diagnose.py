"""From a run folder's records to a `Report`: the analysis, the verdict and the facts, in one place.

`diagnose` is the one path `vdiag watch` and `vdiag attach` take from their evidence (the watchdog's
verdict, stacks, GPU state, environment, any launch logs the instrumentation wrote) to the report that the
renderers in `repro.report` draw. For a job vdiag did not launch, the context is the observed job (its
redacted command line, its processes and their identities) in place of a scenario.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from repro import __version__
from repro.analysis import analyze
from repro.events import read_rank_log
from repro.layout import place
from repro.observe.verdict import innermost, observed_verdict, wait_text
from repro.records import (
    CollectorRun,
    EnvInfo,
    Fact,
    GpuState,
    ObservedJob,
    RankLog,
    RankSummary,
    Report,
    StackSample,
    WatchdogVerdict,
)
from repro.rundir import RunDir


@dataclass
class Evidence:
    watchdog: WatchdogVerdict
    stacks: list[StackSample] = field(default_factory=list)
    gpu: list[GpuState] = field(default_factory=list)
    collectors: list[CollectorRun] = field(default_factory=list)
    env: EnvInfo = field(default_factory=EnvInfo)
    notes: list[str] = field(default_factory=list)


@dataclass
class JobContext:
    """A job vdiag did not launch: what `watch` or `attach` saw of it."""

    job: ObservedJob
    ranks: dict[int, int]  # rank (or vdiag's process number) -> pid
    numbered: bool  # the keys are vdiag's numbers in pid order, not ranks the processes showed
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
        if ctx.numbered:
            out.append(Fact(text=f"process {r} is pid {pid} ({p.cmdline[:80]}); its rank is unknown (no RANK in its "
                                 "environment, no vLLM title), so vdiag numbered it in pid order",
                            how="inferred", source="process tree (psutil)"))
        else:
            out.append(Fact(text=f"rank {r} is pid {pid}" + (f" ({p.identity.title})" if p.identity.title else ""),
                            how="inferred" if "inferred" in p.identity.sources.get("rank", "") else "observed",
                            source=p.identity.sources.get("rank", "")))
        if p.cpu_pct is not None and p.state in ("busy", "idle"):
            out.append(Fact(text=f"{'process' if ctx.numbered else 'rank'} {r} used {p.cpu_pct:.0f} % of a core "
                                 f"({p.state})", how="observed", source=f"/proc/{pid}/stat (psutil)"))
        if p.identity.nvml_gpus:
            out.append(Fact(text=f"pid {pid} holds memory on GPU {','.join(map(str, p.identity.nvml_gpus))}",
                            how="observed", source="NVML"))
        s = stacks.get(r)
        w = wait_text(s)
        if s is not None and w:
            out.append(Fact(text=f"{'process' if ctx.numbered else 'rank'} {r}'s stack is in {w}", how="observed",
                            source=s.source))
    for m in job.progress[-3:]:
        out.append(Fact(text=f"progress bar {m.label!r} at {m.n}/{m.total} ({m.updates} updates)", how="observed",
                        source="the job's output"))
    if ev.watchdog.is_hang:
        out.append(Fact(text=f"the class {ev.watchdog.cls} (busy: {ev.watchdog.busy_ranks or 'none'}, idle: "
                             f"{ev.watchdog.idle_ranks or 'none'}) is inferred from CPU time and stacks",
                        how="inferred", source="repro.observe.monitor"))
    if any(lg.launches for lg in logs.values()):
        out.append(Fact(text="launch configurations in the launch logs are computed from FlashInfer's launcher "
                             "arithmetic for the calls vLLM made", how="computed", source="repro.kernel_launch"))
    return out


def diagnose(run_dir: RunDir, ev: Evidence, ctx: JobContext) -> Report:
    """Analyse the evidence of an observed job and render its report into the run folder."""
    from repro.run import write_report

    job = ctx.job
    world, tp, pp = _layout(job, ctx.ranks)
    logs = {r: read_rank_log(run_dir.launch_log(r), r) for r in ctx.ranks}
    stacks_by_rank = {s.rank: s for s in ev.stacks}
    fused = any(e.op == "fused" for lg in logs.values() for e in lg.launches)
    analysis = analyze(logs, ev.watchdog, ev.stacks, ev.gpu, tp=tp, pp=pp, fused=fused)
    if not any(lg.launches for lg in logs.values()):
        verdict = observed_verdict(ev.watchdog, job, stacks_by_rank, analysis.hypotheses, ctx.numbered)
        analysis = analysis.model_copy(update={"verdict": verdict})
    job = job.model_copy(update={"facts": _facts(job, ctx, ev, stacks_by_rank, logs)})
    notes = list(ev.notes)
    denied = [c for c in ev.collectors if c.advice and "ptrace denied" in c.advice]
    if denied:
        notes.append("ptrace was refused, so py-spy and cuda-gdb could not read the processes; still observed: "
                     "CPU activity per process (/proc), NVML, the environment and the job's output. To grant "
                     "ptrace: " + denied[0].advice)
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
        stacks=ev.stacks, gpu=ev.gpu, collectors=ev.collectors, env=ev.env, notes=notes, observed=job,
    )
    return write_report(run_dir, report)
