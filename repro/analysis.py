"""Analysis: typed records in, typed findings out.

- launch diff: for every TP group, the launch records compared call by call across its ranks;
- workspace identity: rendezvous over a group other than the TP group, TP groups sharing buffers;
- stacks: identical stacks clustered across ranks, odd ones pointed out;
- corruption: which ranks got wrong results, the first wrong call and what the wrong data looks like;
- hypotheses: each weighed with the evidence for and against it;
- verdict: one paragraph naming the ranks, the kernel and the call.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from repro.kernel_launch import kernel_name
from repro.layout import label, tp_groups
from repro.records import (
    Aliasing,
    Analysis,
    CallRef,
    CorruptionFinding,
    Divergence,
    FaultOutcome,
    FileLockHold,
    Frame,
    GpuState,
    Hypothesis,
    HypothesisKey,
    HypothesisStatus,
    KernelSource,
    LaunchEvent,
    RankExit,
    RankLog,
    RankWhere,
    StackCluster,
    StackSample,
    Verdict,
    WaitSite,
    WatchdogVerdict,
)
from repro.report.format import call_fields, call_ref_text, ranks_text
from repro.scenario import FaultWarning, Scenario

COMPARED = ("op", "token_num", "oneshot", "grid", "block", "cluster")

# Where the sim's spin-waits live (by function name), and what they model in the kernel.
SPIN_SITES = {
    "_oneshot": WaitSite.LAMPORT_POLL,
    "_barrier_sync": WaitSite.TWOSHOT_BARRIER,
    "_update": WaitSite.CTA_COUNTER,
}
# Host-side waits in torch.distributed and the CUDA runtime, by function name.
HOST_SITES = {
    "all_reduce": WaitSite.HOST_ALL_REDUCE,
    "barrier": WaitSite.HOST_BARRIER,
    "all_gather_object": WaitSite.RENDEZVOUS,
}
# Waits inside a library, matched on the module the frame is in (never on a function of vdiag's own).
LIBRARY_SITES = {
    "filelock/": WaitSite.FILE_LOCK,
    "subprocess.py": WaitSite.CHILD_PROCESS,
}
# A host thread blocked on its GPU: torch's synchronisations (Python frames, by module and function) and the
# CUDA runtime's and driver's blocking entry points (native frames: a D2H copy such as `.cpu()`, `.item()`
# or `.tolist()` has no Python frame of its own). A kernel that spins keeps its rank's host thread here.
TORCH_SYNC_FRAMES = (("torch/cuda/", "synchronize"), ("torch/accelerator/", "synchronize"))
CUDA_BLOCKING = re.compile(r"^cu(da)?((Device|Stream|Event|Ctx)Synchronize|Memcpy)|(stream|device)_synchronize")
# What each wait site is, in the report's words ({frames}: the library's innermost frames).
SITE_TEXT = {
    WaitSite.LAMPORT_POLL: "the one-shot Lamport poll (waits until no -0.0 sentinel is left in its own buffer)",
    WaitSite.TWOSHOT_BARRIER: "the two-shot Barrier::sync (waits for its peers' barrier flags)",
    WaitSite.CTA_COUNTER: "the end-of-kernel CTA arrival counter (waits until its private counter == its own gridDim)",
    WaitSite.TWOSHOT_GPU: "the two-shot kernel's Barrier::sync or its end-of-kernel CTA counter",
    WaitSite.HOST_ALL_REDUCE: "a host-side all_reduce (the unfused path) waiting for its TP peers",
    WaitSite.HOST_BARRIER: "{frames}, waiting for the other ranks",
    WaitSite.RENDEZVOUS: "the workspace rendezvous (all_gather over the workspace group)",
    WaitSite.DEVICE_SYNC: "a CUDA synchronisation (the host thread waits for its GPU: {frames})",
    WaitSite.FILE_LOCK: "a file lock, inside filelock's acquire loop ({frames}): another process holds the lock",
    WaitSite.CHILD_PROCESS: "a child process it started, inside subprocess ({frames})",
}


def _plural(word: str, ranks: Sequence[int]) -> str:
    return f"{word}{'s' if len(ranks) != 1 else ''} {ranks_text(ranks)}"


# ---- launch diff ------------------------------------------------------------------------------------


def launch_divergences(logs: dict[int, RankLog], tp: int, pp: int) -> list[Divergence]:
    out = []
    for group in tp_groups(tp, pp):
        seqs = {r: logs[r].launches for r in group if r in logs}
        if len(seqs) < 2:
            continue
        n = min(len(v) for v in seqs.values())
        found = False
        for i in range(n):
            evs = {r: seqs[r][i] for r in seqs}
            for fld in COMPARED:
                vals = {r: getattr(e, fld) for r, e in evs.items()}
                norm = {r: (list(v) if isinstance(v, tuple) else v) for r, v in vals.items()}
                if len({str(v) for v in norm.values()}) > 1:
                    ev0 = evs[min(evs)]
                    text = (
                        f"TP group {ranks_text(group)}: first disagreement at launch #{i} "
                        f"({call_ref_text(ev0)}): {fld} "
                        + ", ".join(f"rank {r}={norm[r]}" for r in sorted(norm))
                    )
                    out.append(Divergence(tp_group=group, index=i, field=fld, values=norm,
                                          call=call_fields(ev0), text=text))
                    found = True
                    break
            if found:
                break
        if not found:
            counts = {r: len(v) for r, v in seqs.items()}
            if len(set(counts.values())) > 1:
                lo = min(counts, key=lambda r: counts[r])
                ev = seqs[lo][-1] if seqs[lo] else None
                text = (
                    f"TP group {ranks_text(group)}: launches agree call by call, but the ranks issued "
                    + ", ".join(f"rank {r}: {c}" for r, c in sorted(counts.items()))
                    + f" launches; rank {lo} stopped at {call_ref_text(ev)}"
                )
                out.append(Divergence(tp_group=group, index=min(counts.values()), field="calls",
                                      values={r: c for r, c in counts.items()},
                                      call=call_fields(ev) if ev else CallRef(), text=text))
    return out


# ---- workspace identity -----------------------------------------------------------------------------


def workspace_aliasing(logs: dict[int, RankLog], tp: int, pp: int) -> list[Aliasing]:
    users: dict[str, set[int]] = defaultdict(set)
    rdzv: dict[int, tuple[int, ...]] = {}
    wrong_group = []
    for r, lg in logs.items():
        ws = lg.workspace
        if ws is None or not ws.peers:
            continue
        rdzv[r] = tuple(ws.rendezvous_group)
        if tuple(ws.rendezvous_group) != tuple(ws.tp_group):
            wrong_group.append(r)
        for p in ws.peers:
            users[p].add(r)
    groups = {r: next(g for g in tp_groups(tp, pp) if r in g) for r in logs}
    shared = {p: tuple(sorted(rs)) for p, rs in users.items() if len({groups[r] for r in rs}) > 1}
    if not wrong_group and not shared:
        return []
    ranks = tuple(sorted(set(wrong_group) | {r for rs in shared.values() for r in rs}))
    parts = []
    if wrong_group:
        parts.append(
            f"{_plural('rank', wrong_group)} rendezvoused their workspace over "
            f"{ranks_text(rdzv[wrong_group[0]])} instead of their TP group"
        )
    if shared:
        sample = sorted(shared.items())[:4]
        parts.append(
            "buffers used by more than one TP group: "
            + "; ".join(f"{p} by ranks {ranks_text(rs)}" for p, rs in sample)
        )
    return [Aliasing(ranks=ranks, rendezvous_groups=rdzv, shared_buffers=shared, text="; ".join(parts))]


# ---- stacks -----------------------------------------------------------------------------------------


def main_thread_frames(s: StackSample) -> list[Frame]:
    """The frames of the stack's main thread (its first thread where none is named so), innermost first."""
    th = next((t for t in s.threads if "MainThread" in t.name or "MainThread" in t.thread), None)
    if th is None and s.threads:
        th = s.threads[0]
    return list(th.frames) if th else []


def _main_frames(s: StackSample) -> list[str]:
    return [f"{f.function} ({f.file}:{f.line})" if f.file and f.line else f.function for f in main_thread_frames(s)]


def _python_functions(s: StackSample) -> list[str]:
    return [f.function for f in main_thread_frames(s)]


def _signature(s: StackSample) -> str:
    """Python frames of the main thread, innermost first, by function name: same wait, same signature."""
    if not s.threads:
        return "(no frames)"
    py = [f.function for f in main_thread_frames(s)
          if not f.native and f.file.endswith(".py") and not f.function.startswith("0x")]
    return " <- ".join(py[:8]) or "(no Python frames)"


def cluster_stacks(stacks: list[StackSample]) -> list[StackCluster]:
    groups: dict[str, list[StackSample]] = defaultdict(list)
    for s in stacks:
        groups[_signature(s)].append(s)
    if not groups:
        return []
    biggest = max(len(v) for v in groups.values())
    out = []
    for sig, ss in sorted(groups.items(), key=lambda kv: (-len(kv[1]), min(x.rank for x in kv[1]))):
        out.append(StackCluster(signature=sig, ranks=sorted(x.rank for x in ss), top=_main_frames(ss[0])[:12],
                                odd=len(groups) > 1 and len(ss) < biggest))
    return out


GPU_SPIN_SITES = {
    "oneshot_lamport": WaitSite.LAMPORT_POLL,
    "twoshot_sync": WaitSite.TWOSHOT_GPU,
}


def gpu_wait_site(g: GpuState | None) -> WaitSite | None:
    """Which known wait a hung kernel on the GPU is in, from cuda-gdb's view of it (its kernel's name)."""
    if g is None:
        return None
    for k in g.kernels:
        for key, site in GPU_SPIN_SITES.items():
            if key in k.name:
                return site
    return None


def gpu_waiting(g: GpuState | None) -> str:
    """What a hung kernel on the GPU is waiting in, in the report's words ("" when none is known)."""
    site = gpu_wait_site(g)
    return SITE_TEXT[site] if site else ""


def _library_site(stack: StackSample) -> tuple[WaitSite, str] | None:
    frames = [f for f in main_thread_frames(stack) if not f.native]
    for i, f in enumerate(frames):
        for module, site in LIBRARY_SITES.items():
            if module in f.file.replace("\\", "/"):
                inner = [g.function for g in frames[i:] if module in g.file.replace("\\", "/")][:3]
                return site, " <- ".join(inner)
    return None


def _device_sync(stack: StackSample) -> str:
    """The frames that show the main thread blocked on its GPU ("" when it is not)."""
    for f in main_thread_frames(stack):
        short = f.function.rsplit(".", 1)[-1].split("(")[0]
        path = f.file.replace("\\", "/")
        if f.native and CUDA_BLOCKING.search(short):
            return f"{short} (native)"
        for module, fn in TORCH_SYNC_FRAMES:
            if not f.native and module in path and short == fn:
                where = path[path.index(module):]
                return f"{f.function} ({where}:{f.line})" if f.line else f"{f.function} ({where})"
    return ""


def stack_wait(stack: StackSample | None) -> tuple[WaitSite, str] | None:
    """Which known wait a rank's stack is in, and the library frames that show it (py-spy's stack)."""
    if stack is None:
        return None
    funcs = _python_functions(stack)
    for f in funcs:
        short = f.rsplit(".", 1)[-1]
        if short in SPIN_SITES:
            return SPIN_SITES[short], ""
    lib = _library_site(stack)
    if lib:
        return lib
    dev = _device_sync(stack)
    if dev:
        return WaitSite.DEVICE_SYNC, dev
    for f in funcs:
        for key, site in HOST_SITES.items():
            if key in f.rsplit(".", 1)[-1]:
                return site, (_barrier_caller(stack) if site is WaitSite.HOST_BARRIER else "")
    return None


def _barrier_caller(stack: StackSample) -> str:
    """Whose barrier a rank waits in: the replay's own end-of-start-up barrier, or the job's (its call site)."""
    frames = [f for f in main_thread_frames(stack) if not f.native and f.file]
    for i, f in enumerate(frames):
        if "barrier" in f.function.rsplit(".", 1)[-1]:
            for g in frames[i + 1:]:
                path = g.file.replace("\\", "/")
                if "torch/distributed" in path:
                    continue
                if "repro/engines/" in path:
                    return "the end-of-start-up barrier"
                return f"a torch.distributed barrier ({_short_file(path)}:{g.line})" if g.line else "a torch.distributed barrier"
    return "a torch.distributed barrier"


def stack_wait_site(stack: StackSample | None) -> WaitSite | None:
    found = stack_wait(stack)
    return found[0] if found else None


def where_waiting(stack: StackSample | None) -> str:
    """What a rank's stack waits in, in the report's words ("" when in no known wait)."""
    found = stack_wait(stack)
    if found is None:
        return ""
    site, frames = found
    return SITE_TEXT[site].format(frames=frames)


def _lamport_spin(stack: StackSample | None, gpu: GpuState | None) -> bool:
    return WaitSite.LAMPORT_POLL in (stack_wait_site(stack), gpu_wait_site(gpu))


def _lock_text(x: FileLockHold) -> str:
    who = (f"rank {x.holder_rank} (pid {x.holder_pid})" if x.holder_rank is not None else
           f"pid {x.holder_pid}" + (f" `{x.holder_cmdline}`" if x.holder_cmdline else "") + ", not a rank or a rank's child")
    text = f"{x.path} is held ({x.kind} {x.mode}, from {x.source}) by {who}"
    if x.children:
        kids = "; ".join(
            f"pid {c.pid} `{c.cmdline}` ({c.state or '?'}" + (f", in the kernel at {c.wchan}" if c.wchan else "") + ")"
            for c in x.children[:3]
        )
        text += f", which has started and not finished: {kids}"
    else:
        text += ", which has no child process"
    if x.waiting_ranks:
        verb = "has" if len(x.waiting_ranks) == 1 else "have"
        text += (f"; {_plural('rank', x.waiting_ranks)} {verb} the same file open and wait for it"
                 if x.waiting_from == "open file" else
                 f"; {_plural('rank', x.waiting_ranks)} entered a FlashInfer JIT build under this lock and never "
                 "left it (JIT record)")
    return text


# Wait primitives an idle rank may sit in that the tables above do not name: a thread, a lock, a queue, a
# future, a socket or a device synchronisation. A rank idle in none of them, and in no site above, is busy
# on the host (a straggler), not waiting for a peer.
GENERIC_WAITS = frozenset({
    "wait", "acquire", "synchronize", "join", "_wait_for_tstate_lock", "result", "select", "poll", "epoll",
    "recv", "irecv", "recv_into", "accept", "broadcast", "all_gather", "reduce_scatter", "gather", "scatter",
    "all_to_all", "monitored_barrier", "wait_for", "_poll_until_acquired",
})


def known_wait(stack: StackSample | None) -> str:
    """What an idle rank waits in ("" when its stack shows no known wait: a straggler busy on the host)."""
    if stack is None:
        return ""
    site = where_waiting(stack)
    if site:
        return site
    for f in main_thread_frames(stack)[:2]:
        short = f.function.rsplit(".", 1)[-1]
        if short in GENERIC_WAITS:
            return f"{short} ({_short_file(f.file)}:{f.line})" if f.file else short
    return ""


def _short_file(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def host_frames(stack: StackSample, n: int = 3) -> str:
    """The innermost Python frames of the main thread, `func (dir/file.py:line) <- caller <- ...`."""
    py = [f for f in main_thread_frames(stack) if not f.native]
    if not py:
        return "(no Python frames)"
    def name(f: Frame) -> str:
        return f.function.rsplit(".", 1)[-1]  # run_rank.<locals>.one_call -> one_call

    first = py[0]
    head = f"{name(first)} ({_short_file(first.file)}:{first.line})" if first.file else name(first)
    return " <- ".join([head, *(name(f) for f in py[1:n])])


# ---- corruption --------------------------------------------------------------------------------------


def corruption_findings(logs: dict[int, RankLog]) -> list[CorruptionFinding]:
    out = []
    for r, lg in sorted(logs.items()):
        wrong = [x for x in lg.results if not x.ok]
        if not wrong:
            continue
        by_seq = {x.seq: x for x in lg.launches}
        first = wrong[0]
        ev = by_seq.get(first.seq)
        kinds = Counter(x.kind for x in wrong)
        kind = first.kind
        mix = ", ".join(f"{k.replace('_', ' ')} x{n}" for k, n in kinds.most_common())
        out.append(CorruptionFinding(
            rank=r, wrong_calls=len(wrong), total_calls=len(lg.results),
            first=call_fields(ev, max_err=first.max_err, first_wrong_element=first.first_wrong)
            if ev else CallRef(seq=first.seq),
            kind=kind, kinds=dict(kinds),
            detail=first.detail + (f" (all wrong calls: {mix})" if len(kinds) > 1 else ""),
        ))
    return out


# ---- hypotheses ------------------------------------------------------------------------------------


def _status(score: float, against: int, best: float) -> HypothesisStatus:
    if score >= 2 and score >= best:
        return "supported"
    if score > 0:
        return "consistent"
    if against:
        return "refuted"
    return "no-evidence"


def weigh(
    logs: dict[int, RankLog],
    wd: WatchdogVerdict,
    divs: list[Divergence],
    alias: list[Aliasing],
    corr: list[CorruptionFinding],
    stacks: dict[int, StackSample],
    fused: bool,
    gpu: dict[int, GpuState] | None = None,
    locks: list[FileLockHold] | None = None,
) -> list[Hypothesis]:
    gpu = gpu or {}
    locks = locks or []
    hang = wd.is_hang
    spinning = set(wd.busy_ranks)
    fused_calls = any(ev.op == "fused" for lg in logs.values() for ev in lg.launches)
    H: dict[HypothesisKey, dict[str, Any]] = {}

    def h(key: HypothesisKey, title: str) -> dict[str, Any]:
        return H.setdefault(key, {"title": title, "score": 0.0, "for": [], "against": []})

    tok = [d for d in divs if d.field == "token_num"]
    osd = [d for d in divs if d.field == "oneshot"]
    opd = [d for d in divs if d.field == "op"]
    geo = [d for d in divs if d.field in ("grid", "block", "cluster")]

    # 1. launch divergence (token count / grid)
    d1 = h("launch-divergence", "TP peers launched different configurations (token count / gridDim)")
    for d in tok + geo:
        d1["score"] += 3
        d1["for"].append(d.text)
        big = max(d.values, key=lambda r: d.values[r]) if d.field == "token_num" else None
        if big is not None and hang and big in spinning:
            d1["score"] += 1
            d1["for"].append(f"rank {big}, the one with more tokens, is the one spinning, as the one-shot layout predicts")
    if not tok and not geo and fused_calls:
        d1["against"].append("every TP group's launches agree call by call on token_num, grid, block and cluster")

    # 2. protocol mismatch (one-shot vs two-shot)
    d2 = h("protocol-mismatch", "TP peers chose different protocols (one-shot Lamport vs two-shot)")
    for d in osd:
        d2["score"] += 3
        d2["for"].append(d.text)
    if not osd and fused_calls:
        d2["against"].append("every TP group agreed on one-shot/two-shot for every call")

    # 3. workspace aliasing
    d3 = h("workspace-aliasing", "Workspace rendezvoused over the wrong group: TP groups share buffers")
    for a in alias:
        d3["score"] += 3
        d3["for"].append(a.text)
    foreign = [c for c in corr if "foreign_group" in c.kinds or c.kind == "foreign_group"]
    if foreign:
        d3["score"] += 2
        d3["for"].append(
            f"{_plural('rank', [c.rank for c in foreign])} received another TP group's data "
            f"(first on rank {foreign[0].rank}: {foreign[0].detail})"
        )
    shared_bufs = {p for a in alias for p in a.shared_buffers}
    # the buffer each rank polls: its own entry of the peers it was handed (its place in its TP group)
    polled = {r: lg.workspace.peers[lg.workspace.tp_group.index(r)] for r, lg in logs.items()
              if lg.workspace is not None and r in lg.workspace.tp_group
              and len(lg.workspace.peers) > lg.workspace.tp_group.index(r)}
    shared_poll = sorted(r for r in spinning if polled.get(r) in shared_bufs
                         and _lamport_spin(stacks.get(r), gpu.get(r)))
    if alias and shared_poll:
        d3["score"] += 1
        d3["for"].append(
            f"{_plural('rank', shared_poll)} spin in the one-shot Lamport poll on "
            + ", ".join(sorted({polled[r] for r in shared_poll}))
            + ", a buffer that ranks of another TP group also write and clear (computed from the workspace records)"
        )
    if not alias and any(lg.workspace is not None and lg.workspace.peers for lg in logs.values()):
        d3["against"].append("every workspace was rendezvoused over its own TP group, and no buffer is shared across groups")

    # 4. missing peer (workspace creation failed, silent fallback)
    d4 = h("missing-peer", "A TP peer never launches the fused kernel (its workspace failed; it fell back)")
    failed = [r for r, lg in logs.items() if lg.workspace is not None and not lg.workspace.ok]
    for r in failed:
        lg = logs[r]
        d4["score"] += 3
        d4["for"].append(f"rank {r}'s workspace creation failed ({lg.workspace.error if lg.workspace else ''}); it runs the unfused path")
    for d in opd:
        d4["score"] += 1
        d4["for"].append(d.text)
    if not failed and fused_calls:
        d4["against"].append("every rank created its workspace and launched the fused op")

    # 5. Lamport flag out of step
    d5 = h("flag-out-of-step", "Lamport flag out of step (a different number of earlier one-shot calls on one rank)")
    stale = [c for c in corr if "stale" in c.kinds or c.kind == "stale"]
    if stale:
        d5["score"] += 2
        d5["for"].append(f"{_plural('rank', [c.rank for c in stale])} received data from another call ({stale[0].detail})")
    clean_layout = not tok and not osd and not geo and not alias and not failed
    lamport_spin = [r for r in spinning
                    if _lamport_spin(stacks.get(r), gpu.get(r))]
    stragglers = [st.rank for st in wd.stragglers]
    if hang and clean_layout and fused_calls and lamport_spin and stragglers:
        # The exclusion argument needs every rank accounted for; a straggler explains the wait by itself.
        d5["against"].append(
            f"{_plural('rank', stragglers)} {'is a straggler' if len(stragglers) == 1 else 'are stragglers'}: "
            "stalled on the host outside every known wait before the call the spinning ranks wait in, so the "
            "spin needs no protocol fault to explain it"
        )
    elif hang and clean_layout and fused_calls and lamport_spin:
        d5["score"] += 2
        d5["for"].append(
            f"{_plural('rank', lamport_spin)} spin in the Lamport poll although launches, protocol and "
            "workspaces all agree: the flag (buffer index) is the only protocol state the records do not show"
        )
    if not stale and not (hang and clean_layout):
        d5["against"].append("no stale data, and the observed failure is explained by the launch or workspace records")

    # 6. host-side collective mismatch
    d6 = h("host-collective", "A host-side collective or lock that not every rank reaches")
    if hang and not spinning:
        sites = {r: where_waiting(stacks.get(r)) for r in wd.idle_ranks}
        d6["score"] += 2
        d6["for"].append("no rank is busy: every live rank waits on the host")
        for r, s in sorted(sites.items()):
            if s:
                d6["for"].append(f"rank {r}: {s}")
    d7 = h("jit-lock", "Start-up lock: a file lock (FlashInfer's JIT build lock) held by a process that never releases it")
    lock_sites = {r: where_waiting(stacks.get(r)) for r in wd.idle_ranks}
    lock_waiters = sorted(r for r in wd.idle_ranks if stack_wait_site(stacks.get(r)) is WaitSite.FILE_LOCK)
    held = [x for x in locks if x.holder_rank is not None or x.waiting_ranks]  # a rank holds it, or ranks wait for it
    if hang and (lock_waiters or held):
        for x in held:
            d7["score"] += 2
            d7["for"].append(_lock_text(x))
        if lock_waiters:
            d7["score"] += 2 if not spinning else 1
            d7["for"].append(f"{_plural('rank', lock_waiters)} wait in {lock_sites[lock_waiters[0]]} (py-spy)")
    elif hang:
        d7["against"].append("no stack waits in a file lock, and /proc/locks shows no lock held by a rank")
    elif spinning:
        d6["against"].append(f"{_plural('rank', sorted(spinning))} {'is' if len(spinning) == 1 else 'are'} busy: a device-side spin-wait, not only a host wait")

    # 8. a straggler: a rank busy on the host, outside every known wait, that never came back
    if hang:
        d8 = h("straggler", "A rank stalled on the host outside every known wait (a slow start-up "
                            "step, not a protocol fault)")
        for st in wd.stragglers:
            d8["score"] += 3
            d8["for"].append(f"rank {st.rank} made no progress for {st.idle_s:g} s and is in none of the known "
                             f"waits: {st.where} ({st.source})")
        if not wd.stragglers:
            d8["against"].append("no idle rank is outside the known waits (collective, lock, barrier, "
                                 "synchronisation, spin)")

    if not fused:
        fused_keys: tuple[HypothesisKey, ...] = (
            "launch-divergence", "protocol-mismatch", "workspace-aliasing", "missing-peer", "flag-out-of-step")
        for key in fused_keys:
            H[key]["against"].insert(0, "the fused all-reduce was not used in this run (fusion off or gated)")

    best = max(v["score"] for v in H.values())
    out = []
    for key, v in H.items():
        out.append(Hypothesis(key=key, title=v["title"], status=_status(v["score"], len(v["against"]), best),
                              score=v["score"], evidence_for=v["for"], evidence_against=v["against"]))
    out.sort(key=lambda x: -x.score)
    return out


# ---- the verdict ---------------------------------------------------------------------------------------


COMPUTED: KernelSource = "computed from the launch record"


def _short_site(site: str) -> str:
    """A wait site without its parenthetical explanation, for the headline paragraph."""
    return site.split(" (")[0] if site else site


def rank_kernel(ev: LaunchEvent | None, g: GpuState | None, tp: int, pattern: str, fp32_acc: bool
                ) -> tuple[str, str, KernelSource]:
    """(kernel name, geometry, where it comes from) for one rank: its GPU state when there is one (observed),
    else its own pending launch record (computed on the sim)."""
    if g is not None and g.kernels:
        k = g.kernels[0]
        base = k.name.split("<")[0].split("(")[0]
        geo = f"grid {k.grid[0] if k.grid else '?'}, block {k.block[0] if k.block else '?'}" + (
            f", cluster {k.cluster[0]}" if k.cluster else "")
        return base, geo, g.source
    if ev is None:
        return "", "", ""
    if ev.op == "unfused":
        return "the unfused all_reduce (host collective)", "", "launch record"
    name = kernel_name(bool(ev.oneshot), pattern, ev.dtype, tp, fp32_acc).split("<")[0]
    geo = (f"grid {ev.grid[0] if ev.grid else '?'}, block {ev.block[0] if ev.block else '?'}, "
           f"cluster {ev.cluster[0] if ev.cluster else '?'}")
    return name, geo, COMPUTED


def _kernel_for(ev: LaunchEvent | None, gpu: dict[int, GpuState], rank: int, tp: int, pattern: str, fp32_acc: bool) -> str:
    name, geo, src = rank_kernel(ev, gpu.get(rank), tp, pattern, fp32_acc)
    if not name:
        return ""
    return name + (f" <<<{geo}>>>" if geo else "") + (f" ({src})" if src and src != "launch record" else "")


def rank_wheres(
    logs: dict[int, RankLog], wd: WatchdogVerdict, stacks: dict[int, StackSample], gpu: dict[int, GpuState],
    tp: int, pattern: str, fp32_acc: bool,
) -> list[RankWhere]:
    """Each hung rank's kernel and wait site from its own records: pending launch, stack, GPU state."""
    strag = {st.rank: st for st in wd.stragglers}
    out = []
    for r in sorted(set(wd.busy_ranks) | set(wd.idle_ranks)):
        lg = logs.get(r)
        ev = lg.pending_launch() if lg is not None else None
        state = ("finished" if lg is not None and lg.done is not None else
                 "straggler" if r in strag else "spinning" if r in wd.busy_ranks else "idle")
        host = ""
        if r in wd.busy_ranks:
            name, geo, src = rank_kernel(ev, gpu.get(r), tp, pattern, fp32_acc)
            site = where_waiting(stacks.get(r))
            if stack_wait_site(stacks.get(r)) == WaitSite.DEVICE_SYNC:  # the host waits for its kernel
                site, host = gpu_waiting(gpu.get(r)), site
            else:
                site = site or gpu_waiting(gpu.get(r))
        else:
            name = geo = src = ""
            site = (f"on the host, outside every known wait: {strag[r].where}" if r in strag
                    else known_wait(stacks.get(r)))
        out.append(RankWhere(rank=r, state=state, kernel=name, geometry=geo, kernel_source=src, site=site,
                             host_wait=host, call=call_fields(ev) if ev is not None else CallRef()))
    return out


def _calls_text(calls: list[CallRef]) -> str:
    if not calls:
        return "no pending call"
    if len({call_ref_text(c) for c in calls}) == 1:
        return call_ref_text(calls[0])
    idx = sorted(c.call for c in calls if c.call is not None)
    where = sorted({f"{c.phase} {c.size}" for c in calls})
    return f"calls {', '.join(map(str, idx))} ({'; '.join(where)})"


def _spin_groups(wheres: list[RankWhere], tp: int, pp: int) -> list[str]:
    """One clause per set of spinning ranks that agree on kernel and wait site (and the kernel's source)."""
    groups: dict[tuple[str, str, str, str], list[RankWhere]] = defaultdict(list)
    for w in wheres:
        if w.state == "spinning":
            groups[(w.kernel, _short_site(w.site), w.kernel_source, _short_site(w.host_wait))].append(w)
    out = []
    one_source = len({src for (_k, _s, src, _h) in groups}) == 1  # then said once, after the clauses
    for (kernel, site, src, host), ws in groups.items():
        rs = [w.rank for w in ws]
        who = label(rs[0], tp, pp) if len(rs) == 1 else _plural("rank", rs)
        text = f"{who} {'spins' if len(rs) == 1 else 'spin'}"
        if kernel:
            text += f" in {kernel}" + (f" ({_source_text(src)})" if src and not one_source else "")
        if site:
            text += f", inside {site}"
        if host:
            text += f" (on the host, {'its' if len(rs) == 1 else 'their'} thread waits in {host})"
        text += f", at {_calls_text([w.call for w in ws if w.call])}"
        out.append(text)
    srcs = {src for (k, _s, src, _h) in groups if k and src}
    if out and one_source and srcs:
        n = sum(len(ws) for ws in groups.values())
        out[-1] += f" (kernel{'s' if n > 1 else ''} {_source_text(srcs.pop())})"
    return out


def _source_text(src: str) -> str:
    return src if src == COMPUTED else f"from the {src}"


def _idle_groups(wheres: list[RankWhere], tp: int, pp: int) -> list[str]:
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for w in wheres:
        if w.state in ("idle", "finished"):
            site = _short_site(w.site)
            if w.state == "finished":
                site = "finished its start-up; " + (site or "waiting on the host")
            groups[(w.state, site)].append(w.rank)
    out = []
    for (_state, site), rs in groups.items():
        who = label(rs[0], tp, pp) if len(rs) == 1 else _plural("rank", rs)
        out.append(f"{who} {'is' if len(rs) == 1 else 'are'} idle" + (f" in {site}" if site else ""))
    return out


def _straggler_text(wd: WatchdogVerdict, tp: int, pp: int) -> str:
    if not wd.stragglers:
        return ""
    parts = [f"{_sentence(label(st.rank, tp, pp))} is a straggler: idle on the host outside every known wait, in {st.where}, "
             f"with no progress for {st.idle_s:g} s" for st in wd.stragglers]
    return " " + "; ".join(parts) + (f" (watched {wd.patience_s:g} s for it to resume)." if wd.patience_s else ".")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _evidence_clip(text: str, limit: int = 220) -> str:
    """The first clause of a piece of evidence, at most `limit` characters (the rest is in its section)."""
    text = text.split("; ")[0]
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _cause(top: Hypothesis | None) -> str:
    if top is None:
        return ""
    title = top.title
    # lower-case a sentence's first word, never an acronym ("TP peers", "JIT")
    if title[:1].isupper() and not title[1:2].isupper():
        title = title[0].lower() + title[1:]
    return f" Most likely cause: {title} ({top.status})."


def crash_line(c: RankExit) -> str:
    return c.error_line or (c.stderr_tail[-1] if c.stderr_tail else "")


def make_verdict(
    logs: dict[int, RankLog],
    wd: WatchdogVerdict,
    hyps: list[Hypothesis],
    corr: list[CorruptionFinding],
    stacks: dict[int, StackSample],
    gpu: dict[int, GpuState],
    tp: int,
    pp: int,
    pattern: str = "residual_rmsnorm",
    fp32_acc: bool = True,
) -> Verdict:
    top = hyps[0] if hyps and hyps[0].score > 0 else None
    cause = _cause(top)
    wrong_ranks = [c.rank for c in corr]
    if wd.cls == "crash":
        c = wd.crashed[0] if wd.crashed else None
        who = label(c.rank, tp, pp) if c and c.rank >= 0 else "a worker"
        how = (c.signal or f"exit code {c.returncode}") if c else "unknown"
        line = crash_line(c) if c else ""
        what = "Its error" if c and c.error_line else "Last stderr line"
        return Verdict(cls="crash", headline=f"crash: {who} died ({how})",
                       paragraph=f"{_sentence(who)} exited ({how}) before the start-up finished. {what}: {line!r}. "
                                 "The other ranks were stopped by torchrun.", top_hypothesis="")
    if wd.cls == "interrupted":
        by = wd.interrupted_by or "a signal"
        how = {"SIGINT": "Ctrl-C (SIGINT)",
               "killed": "a signal it cannot catch (SIGKILL, the OOM killer)"}.get(by, by)
        done = sum(len(lg.results) for lg in logs.values())
        phases = sorted({lg.phases[-1].phase + (f" {lg.phases[-1].index}/{lg.phases[-1].total}"
                                                if lg.phases[-1].total else "")
                         for lg in logs.values() if lg.phases})
        during = f", during {', '.join(phases)}" if phases else ", before any rank started the replay"
        return Verdict(
            cls="interrupted", headline=f"interrupted: the run was stopped by {how} before a verdict",
            paragraph=(f"vdiag was stopped by {how} after its {len(logs)} ranks had completed {done} calls{during}; "
                       "no verdict was reached. The launch logs and activity written until then are kept in the "
                       "run folder" + (" and every process and shared-memory segment of the run was cleaned up."
                                       if by != "killed" else "; this report was rebuilt from them by `vdiag report`.")),
        )
    if not wd.is_hang:
        if corr:
            first = corr[0]
            call = first.first
            return Verdict(
                cls="corruption",
                headline=f"corruption: the run finished, but ranks {ranks_text(wrong_ranks)} got wrong results",
                paragraph=(
                    f"No rank hung, but {sum(c.wrong_calls for c in corr)} calls returned wrong data on ranks "
                    f"{ranks_text(wrong_ranks)}. The first wrong call was on {label(first.rank, tp, pp)} at "
                    f"{call_ref_text(call)}: {first.kind.replace('_', ' ')} ({first.detail}).{cause}"
                ),
                call=call, top_hypothesis=top.key if top else "",
            )
        slow = " Progress stalled and resumed, so this is reported as slow, not hung." if wd.cls == "slow" else ""
        if wd.cls == "slow" and wd.stragglers:
            slow = " Progress stalled and resumed: " + "; ".join(
                f"{label(st.rank, tp, pp)} was stalled on the host outside every known wait ({st.where}) for "
                f"{st.idle_s:g} s, then carried on" for st in wd.stragglers) + ". A straggler, not a deadlock: slow."
        unchecked = any(x.kind == "unchecked" for lg in logs.values() for x in lg.results)
        if unchecked:
            return Verdict(cls=wd.cls, headline=f"{wd.cls}: start-up finished (results not checked)",
                           paragraph=f"All {len(logs)} ranks finished the start-up. The all-reduce results were not "
                                     f"checked in this run, so silent corruption cannot be ruled out.{slow}")
        return Verdict(cls=wd.cls, headline=f"{wd.cls}: start-up finished and every checked result was right",
                       paragraph=f"All {len(logs)} ranks finished the replay; every all-reduce result matched the "
                                 f"locally computed expectation.{slow}")
    spinning, idle = wd.busy_ranks, wd.idle_ranks
    pend = {r: logs[r].pending_launch() for r in logs}
    focus = spinning[0] if spinning else (idle[0] if idle else 0)
    ev = pend.get(focus)
    kernel = _kernel_for(ev, gpu, focus, tp, pattern, fp32_acc)
    wheres = rank_wheres(logs, wd, stacks, gpu, tp, pattern, fp32_acc)
    call_txt = call_ref_text(ev) if ev else "no pending call"
    key_ev = f" Key evidence: {_evidence_clip(top.evidence_for[0], 200)}" if top and top.evidence_for else ""
    stalled = f" No rank progressed for {wd.stall_s:g} s before the stall was confirmed."
    strag = _straggler_text(wd, tp, pp)
    if wd.cls == "host-wait":
        headline = f"host-wait: all {len(idle)} live ranks idle on the host, none progressing"
        by_site: dict[str, list[int]] = defaultdict(list)
        for w in wheres:
            if w.state != "straggler":
                by_site[_short_site(w.site) or "an unknown host wait"].append(w.rank)
        para = (
            f"All {len(idle)} live ranks are idle on the host and none progresses"
            + (": " + "; ".join(f"{_plural('rank', rs)} in {w}" for w, rs in by_site.items()) if by_site else "")
            + (f". The last calls issued: {call_txt} on {label(focus, tp, pp)}" if ev else
               ". No rank had reached a collective call")
            + "." + strag + stalled + cause + key_ev
        )
        return Verdict(cls=wd.cls, headline=headline, paragraph=para, spinning=[], idle=idle, kernel="",
                       call=call_fields(ev) if ev else CallRef(), top_hypothesis=top.key if top else "", ranks=wheres)
    elif wd.cls == "all-spinning":
        headline = f"all-spinning: {_plural('rank', spinning)} busy, none progressing"
    elif wd.cls == "timeout":
        headline = "timeout: the run did not finish within max_run_s"
    else:
        headline = f"spin-deadlock: {_plural('rank', spinning)} spinning, {_plural('rank', idle)} idle"
    if wd.stragglers:
        headline += f" (straggler: {_plural('rank', [st.rank for st in wd.stragglers])})"
    lead = "; ".join(_spin_groups(wheres, tp, pp)) or "no rank spins"
    idle_desc = _idle_groups(wheres, tp, pp)
    para = _sentence(lead) + (f", while {'; '.join(idle_desc)}" if idle_desc else "") + "." + strag + stalled
    if corr:
        para += (f" {_plural('rank', wrong_ranks).capitalize()} also received wrong data before hanging "
                 f"({corr[0].kind.replace('_', ' ')}).")
    para += cause + key_ev
    return Verdict(cls=wd.cls, headline=headline, paragraph=para, spinning=spinning, idle=idle, kernel=kernel,
                   call=call_fields(ev) if ev else CallRef(), top_hypothesis=top.key if top else "", ranks=wheres)


def analyze(
    logs: dict[int, RankLog],
    wd: WatchdogVerdict,
    stacks: list[StackSample],
    gpu: list[GpuState],
    *,
    tp: int,
    pp: int,
    fused: bool,
    pattern: str = "residual_rmsnorm",
    fp32_acc: bool = True,
    locks: list[FileLockHold] | None = None,
) -> Analysis:
    divs = launch_divergences(logs, tp, pp)
    alias = workspace_aliasing(logs, tp, pp)
    corr = corruption_findings(logs)
    by_rank = {s.rank: s for s in stacks}
    gpu_by_rank = {g.rank: g for g in gpu}
    hyps = weigh(logs, wd, divs, alias, corr, by_rank, fused, gpu_by_rank, locks)
    verdict = make_verdict(logs, wd, hyps, corr, by_rank, gpu_by_rank, tp, pp, pattern, fp32_acc)
    checks = grid_cross_checks(logs, gpu_by_rank)
    return Analysis(divergences=divs, aliasing=alias, stack_clusters=cluster_stacks(stacks), corruption=corr,
                    hypotheses=hyps, verdict=verdict, grid_checks=checks)


def grid_cross_checks(logs: dict[int, RankLog], gpu: dict[int, GpuState]) -> list[str]:
    """Compare the grid the launch arithmetic predicted with what the GPU reports for the hung kernel."""
    out = []
    for r, g in sorted(gpu.items()):
        ev = logs[r].pending_launch() if r in logs else None
        if ev is None or not g.kernels or ev.grid is None:
            continue
        k = g.kernels[0]
        agree = k.grid == tuple(ev.grid) and (k.block is None or k.block == tuple(ev.block or ()))
        out.append(
            f"rank {r}: computed grid {tuple(ev.grid)} block {tuple(ev.block or ())} vs {g.source} "
            f"grid {k.grid} block {k.block}: {'agree' if agree else 'DISAGREE'}"
        )
    return out


def fault_outcomes(sc: Scenario, logs: dict[int, RankLog], warnings: Sequence[FaultWarning] = ()
                   ) -> list[FaultOutcome]:
    """Each injected fault of the scenario with the calls it fired at on each rank (from the `fault`
    records the replay writes), and the warning when its selector can never match."""
    out = []
    for i, f in enumerate(sc.faults):
        fired: dict[int, list[CallRef]] = {}
        for r in f.ranks:
            lg = logs.get(r)
            hits = [CallRef(**{k: v for k, v in e.model_dump().items() if k in ("phase", "size", "layer", "sub", "call")
                               and v is not None}) for e in (lg.faults if lg else []) if e.index == i]
            if hits:
                fired[r] = hits
        warning = next((w.message for w in warnings if w.index == i), "")
        out.append(FaultOutcome(index=i, kind=f.kind, ranks=list(f.ranks),
                                selector=f.at.model_dump(exclude_none=True), fired_on=fired, warning=warning))
    return out
