"""The verdict paragraph for a job vdiag did not launch, from the same findings as a replay's.

Without launch records there is no pending call to name; what the evidence shows is where each rank waits
(its stack, `repro.analysis.where_waiting`, and the torch.distributed call it is in) and how busy it is.
The ranks that are not in the collective the others wait in are the missing ones.
"""

from __future__ import annotations

from collections import defaultdict

from repro.analysis import gpu_waiting, main_thread_frames, where_waiting
from repro.records import (
    FileLockHold,
    GpuState,
    Hypothesis,
    ObservedJob,
    RankWhere,
    StackSample,
    Verdict,
    WatchdogVerdict,
)
from repro.report.format import LIST, rank_label, ranks_text

# torch.distributed's blocking calls, by the function name its Python frame shows.
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "gather", "scatter", "all_to_all",
    "all_to_all_single", "barrier", "monitored_barrier", "send", "recv", "irecv", "isend", "wait",
)


def _main_python(s: StackSample) -> list[tuple[str, str]]:
    return [(f.function, f"{f.file.rsplit('/', 1)[-1]}:{f.line}" if f.line else f.file) for f in main_thread_frames(s)
            if not f.native]


def collective_of(s: StackSample | None) -> tuple[str, str]:
    """(torch.distributed call, the caller's file:line) the stack is blocked in, or ("", "")."""
    if s is None:
        return "", ""
    frames = _main_python(s)
    for i, (fn, _loc) in enumerate(frames):
        short = fn.rsplit(".", 1)[-1]
        if short in COLLECTIVES:
            caller = next((loc for f2, loc in frames[i + 1:] if "distributed" not in loc and "c10d" not in loc
                           and f2 not in ("wrapper",)), "")
            return short, caller
    return "", ""


def wait_text(s: StackSample | None) -> str:
    """Where a stack waits, in the words of an observed job: the torch.distributed call and its caller where
    there is one, else the known wait site (`repro.analysis.where_waiting`), else ""."""
    c, loc = collective_of(s)
    if c:
        return f"torch.distributed's {c}" + (f" ({loc})" if loc else "")
    return where_waiting(s)


def innermost(s: StackSample | None) -> str:
    if s is None:
        return ""
    frames = _main_python(s)
    return f"{frames[0][0]} ({frames[0][1]})" if frames else ""


def _rs(ranks: list[int]) -> str:
    return rank_label(ranks, run=LIST)


def _be(ranks: list[int]) -> str:
    return "is" if len(ranks) == 1 else "are"


def _gpu_clause(g: GpuState | None) -> str:
    """What a rank's GPU was running when it was read (cuda-gdb), in the verdict's words ("" without it)."""
    if g is None or not g.kernels:
        return ""
    k = g.kernels[0]
    site = gpu_waiting(g).split(" (")[0]
    running = f", {k.running_blocks} blocks running" if k.running_blocks is not None else ""
    return f"its GPU runs {k.name.split('<')[0]}" + (f" in {site}" if site else "") + f" ({g.source}{running})"


def observed_verdict(wd: WatchdogVerdict, job: ObservedJob, stacks: dict[int, StackSample],
                     hyps: list[Hypothesis], gpu: dict[int, GpuState] | None = None,
                     ranks: list[RankWhere] | None = None, locks: list[FileLockHold] | None = None) -> Verdict:
    top = hyps[0] if hyps and hyps[0].score > 0 else None
    who = "process" if job.numbered else "rank"
    if wd.cls == "crash":
        status = job.signal or f"exit status {job.returncode}"
        last = job.output_tail[-1] if job.output_tail else ""
        return Verdict(cls="crash", headline=f"crash: the command exited with {status}",
                       paragraph=f"The command ended with {status} before vdiag saw a hang. Its last output line: "
                                 f"{last!r} (the last lines are in the report's job section and in logs/output.log).")
    if not wd.is_hang:
        slow = (f" Progress stalled for {wd.stall_s:g} s or more {wd.slow_resumed} time(s) and resumed: slow, "
                "not hung.") if wd.cls == "slow" else ""
        ready = ""
        if job.ready_line:
            when = f" after {job.ready_s:g} s" if job.ready_s is not None else ""
            ready = (f" Its start-up finished{when}: it printed {job.ready_line!r}, and vdiag stopped looking "
                     "for a stall from then on.")
        if job.ended_by_user:
            return Verdict(cls=wd.cls, headline=f"{wd.cls}: the job's start-up finished and no hang was seen; "
                                                "vdiag ended the job on Ctrl-C",
                           paragraph=f"No hang was seen before the job said it was ready.{ready}{slow} The job "
                                     "was then ended because vdiag was interrupted (Ctrl-C).")
        return Verdict(cls=wd.cls, headline=f"{wd.cls}: the command finished (exit status 0) and no hang was seen",
                       paragraph=f"The command ran to its end with exit status 0.{ready}{slow}")
    if job.interrupted:
        live = sorted(set(wd.busy_ranks) | set(wd.idle_ranks))
        where = "; ".join(f"{who} {r} was {'busy' if r in wd.busy_ranks else 'idle'} in "
                          f"{where_waiting(stacks.get(r)) or innermost(stacks.get(r)) or 'an unknown place'}"
                          for r in live)
        return Verdict(cls="interrupted", headline="interrupted: the job was ended by Ctrl-C before any hang was seen",
                       paragraph="vdiag was interrupted before the job stalled for the threshold, so nothing is "
                                 "judged. " + (f"At that moment: {where}." if where else ""),
                       spinning=[], idle=[])
    live = sorted(set(wd.busy_ranks) | set(wd.idle_ranks))
    coll = {r: collective_of(stacks.get(r)) for r in live}
    site = {r: where_waiting(stacks.get(r)) for r in live}
    by_coll: dict[str, list[int]] = defaultdict(list)
    for r in live:
        by_coll[coll[r][0]].append(r)
    sentences: list[str] = []
    headline = ""
    waited = [c for c in by_coll if c and c not in ("barrier", "monitored_barrier")]
    if waited:
        main = max(waited, key=lambda c: len(by_coll[c]))
        inside = by_coll[main]
        missing = [r for r in live if r not in inside]
        where_called = coll[inside[0]][1]
        sentences.append(f"{_rs(inside).capitalize()} {_be(inside)} blocked in torch.distributed's {main}"
                         + (f" (called from {where_called})" if where_called else ""))
        if missing:
            desc = []
            for r in missing:
                c, loc = coll[r]
                w = "in " + (f"{c}" + (f" ({loc})" if loc else "") if c else (
                    site[r] or innermost(stacks.get(r)) or "a place vdiag could not see"))
                desc.append(f"{who} {r} is {w}")
            sentences.append(f"{_rs(missing)} never entered that {main}: " + "; ".join(desc))
            headline = (f"{wd.cls}: {_rs(inside)} wait{'s' if len(inside) == 1 else ''} in {main} for "
                        f"{_rs(missing)}, which never reached it")
    spin = [r for r in wd.busy_ranks]
    if spin:
        sp = []
        for r in spin:
            w = site[r] or innermost(stacks.get(r)) or "no stack"
            on_gpu = _gpu_clause((gpu or {}).get(r))
            sp.append(f"{who} {r} burns {wd.cpu_pct.get(r, 0):.0f} % CPU in {w}" + (f", and {on_gpu}" if on_gpu else ""))
        sentences.insert(0, "; ".join(sp))
        quiet = []
        for r in wd.idle_ranks:
            c, loc = coll[r]
            w = (f"torch.distributed's {c}" + (f" ({loc})" if loc else "")) if c else (
                site[r] or innermost(stacks.get(r)) or "no stack")
            quiet.append(f"{who} {r} is idle in {w}")
        if quiet:
            sentences[0] += ", while " + "; ".join(quiet)
        if not headline:
            headline = (f"{wd.cls}: {_rs(spin)} spinning, {_rs(wd.idle_ranks)} idle" if wd.idle_ranks
                        else f"{wd.cls}: {_rs(spin)} busy, none progressing")
    if not headline:
        if len(live) == 1:
            headline = f"{wd.cls}: the one live {who} {live[0]} is idle on the host, not progressing"
        else:
            headline = f"{wd.cls}: all {len(live)} live {who}es idle, none progressing" if who == "process" else \
                f"{wd.cls}: all {len(live)} live ranks idle on the host, none progressing"
        if not sentences:
            sentences.append("; ".join(f"{who} {r} is in {site[r] or innermost(stacks.get(r)) or 'an unknown wait'}"
                                       for r in live))
    for x in locks or []:
        if x.waiting_ranks and x.holder_rank is None:
            cmd = f" (`{x.holder_cmdline}`)" if x.holder_cmdline else ""
            ours = x.holder_pid in {p.pid for p in job.processes}
            sentences.append(f"the lock {who} {ranks_text(x.waiting_ranks)} waits for, {x.path}, is held by pid "
                             f"{x.holder_pid}{cmd}, " + ("a process of the job that is not a rank" if ours else
                                                         "which is not part of the job") + f" ({x.source})")
    if job.stragglers:
        sentences.append(f"{_rs(job.stragglers)} stayed outside every known wait (collective, lock, "
                         f"synchronisation or spin-wait) for the whole patience window of {job.patience_s:g} s: "
                         "a straggler on the host, not shown to be a deadlock")
    if job.mode == "watch":
        sentences.append(f"The job showed no progress (output, progress bars, new processes) for {wd.stall_s:g} s "
                         "before the stall was confirmed")
    else:
        sentences.append(f"vdiag attached to the running job and sampled its activity for {wd.stall_s:g} s; "
                         "it did not see when the stall began")
    para = ". ".join(s[0].upper() + s[1:] for s in sentences if s) + "."
    if job.stragglers:
        para += (" A rank busy elsewhere on the host looks like a missing peer until it returns, so no cause is "
                 "called supported here; the hypotheses below are weighed on the stacks as they were.")
    elif top is not None:
        para += f" Most likely cause: {top.title[0].lower() + top.title[1:]} ({top.status})."
    return Verdict(cls=wd.cls, headline=headline, paragraph=para, spinning=wd.busy_ranks, idle=wd.idle_ranks,
                   top_hypothesis=top.key if top else "", ranks=ranks or [])
