"""Multi-node: one report from the run folders of every node (`vdiag report --merge DIR...`).

Each node's `vdiag run --nnodes N` watches only the ranks torchrun placed on that node and writes its own
run folder (`<time>-<scenario>-node<I>/`) with a `node.json` saying which node it was and which ranks it
held. Merging reads every folder's records (launch logs, watchdog verdict, stacks, GPU state, collectors,
environment, file locks, CUPTI launch traces), checks that they belong to one job, combines the per-node watchdog verdicts into one, and
runs the analysis again over all ranks, so the verdict names ranks across nodes. The merged folder
(`<time>-<scenario>-merged/`) holds copies of every node's records, so it can be rendered again on its own.

Node 0 merges by itself when the other nodes' folders appear beside its own (a shared reports folder);
otherwise copy the folders to one machine and run `vdiag report --merge`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from repro.collectors.locks import ARTIFACT as LOCKS_ARTIFACT
from repro.collectors.locks import load_locks
from repro.cupti_trace import cupti_file
from repro.diagnose import Evidence, RunContext, diagnose
from repro.errors import ScenarioError
from repro.events import read_rank_log
from repro.multinode import (
    NODE_NOTE_PREFIX,
    NODES_FILE,
    NodeInfo,
    find_node_dirs,
    nodes_text,
    read_node_info,
)
from repro.records import (
    CollectorRun,
    EnvInfo,
    FileLockHold,
    GpuState,
    RankLog,
    Report,
    StackSample,
    WatchdogVerdict,
)
from repro.report.format import ranks_text
from repro.rundir import RunDir
from repro.scenario import Scenario, fault_warnings

# ---- reading one node's folder -----------------------------------------------------------------------


@dataclass
class NodeRecords:
    root: Path
    info: NodeInfo | None
    scenario: Scenario
    logs: dict[int, RankLog]
    watchdog: WatchdogVerdict
    report: Report | None
    stacks: list[StackSample]
    gpu: list[GpuState]
    collectors: list[CollectorRun]
    env: EnvInfo
    locks: list[FileLockHold]

    @property
    def ranks(self) -> list[int]:
        return sorted(self.logs)

    @property
    def label(self) -> str:
        hello = self.logs[self.ranks[0]].hello if self.ranks else None
        host = self.info.host if self.info else (hello.host if hello else "")
        idx = f"node {self.info.node_rank}" if self.info else f"folder {self.root.name}"
        return idx + (f" ({host})" if host else "")


def _stacks_from_files(rd: RunDir, logs: dict[int, RankLog]) -> list[StackSample]:
    """Stacks from the raw dumps, where a node never wrote its report.json."""
    from repro.collectors.stacks import parse_faulthandler, parse_pyspy

    out = []
    for r, lg in sorted(logs.items()):
        try:
            text = rd.stack_file(r).read_text(errors="replace")
        except OSError:
            continue
        pid = lg.hello.pid if lg.hello else 0
        threads = parse_pyspy(text)
        source = "py-spy"
        if not threads:
            threads, source = parse_faulthandler(text), "faulthandler"
        if threads:
            out.append(StackSample(rank=r, pid=pid, source=source, threads=threads))
    return out


def load_node(root: Path) -> NodeRecords:
    """One node's records. Raises ScenarioError (exit 2) when the folder is not a vdiag run folder."""
    from repro.report.json_report import load_report

    rd = RunDir(root)
    if not root.is_dir():
        raise ScenarioError(f"{root}: no such folder; give the run folders that `vdiag run` made on each node")
    try:
        scenario = Scenario.model_validate_json(rd.scenario_json.read_text())
    except (OSError, ValidationError) as e:
        raise ScenarioError(f"{root}: not a vdiag run folder (scenario.json: {e}); give a folder that "
                            "`vdiag run` created") from None
    ranks = rd.ranks()
    if not ranks:
        raise ScenarioError(f"{root}: no launch logs (launch/rank*.jsonl): the node never started its ranks")
    logs = {r: read_rank_log(rd.launch_log(r), r) for r in ranks}
    report = load_report(rd.report_json) if rd.report_json.exists() else None
    if rd.watchdog_json.exists():
        watchdog = WatchdogVerdict.model_validate_json(rd.watchdog_json.read_text())
    elif report is not None:
        watchdog = report.watchdog
    else:
        raise ScenarioError(f"{root}: no watchdog.json: the node's vdiag stopped before its verdict")
    env = report.env if report is not None else EnvInfo()
    if report is None and rd.env_json.exists():
        try:
            env = EnvInfo.model_validate_json(rd.env_json.read_text())
        except ValidationError:
            pass
    return NodeRecords(
        root=root, info=read_node_info(root), scenario=scenario, logs=logs, watchdog=watchdog, report=report,
        stacks=list(report.stacks) if report is not None else _stacks_from_files(rd, logs),
        gpu=list(report.gpu) if report is not None else [],
        collectors=list(report.collectors) if report is not None else [], env=env,
        locks=list(report.locks) if report is not None else load_locks(root),
    )


# ---- combining ------------------------------------------------------------------------------------------


def combine_verdicts(nodes: list[NodeRecords]) -> tuple[WatchdogVerdict, list[str]]:
    """One watchdog verdict for the job from each node's, and notes on how it was combined.

    A node that saw its workers die after another node's hang verdict was most likely stopped by that
    node's teardown (torchrun ends the job when a node leaves): its ranks count as idle, not crashed.
    """
    notes: list[str] = []
    hang_t = [n.watchdog.verdict_t for n in nodes if n.watchdog.is_hang]
    first_hang = min(hang_t) if hang_t else None
    busy: set[int] = set()
    idle: set[int] = set()
    finished: set[int] = set()
    crashed = []
    classes = []
    for n in nodes:
        w = n.watchdog
        classes.append(w.cls)
        if w.cls == "crash" and first_hang is not None and w.verdict_t >= first_hang:
            idle.update(r for r in n.ranks if r not in w.finished_ranks)
            finished.update(w.finished_ranks)
            notes.append(f"{n.label}: its workers exited after another node's hang verdict (that node's teardown "
                         f"ends the job); its ranks {ranks_text(n.ranks)} are counted as waiting, not crashed")
            continue
        busy.update(w.busy_ranks)
        idle.update(r for r in w.idle_ranks if r not in w.finished_ranks)
        finished.update(w.finished_ranks)
        crashed.extend(w.crashed)
    idle -= busy | finished
    real_crash = [n for n in nodes if n.watchdog.cls == "crash" and (first_hang is None or n.watchdog.verdict_t < first_hang)]
    live = (busy | idle)
    if real_crash:
        cls = "crash"
    elif first_hang is not None:
        if busy and busy == live:
            cls = "all-spinning"
        elif busy:
            cls = "spin-deadlock"
        elif all(c == "timeout" for c in classes if c not in ("clean", "slow", "crash")):
            cls = "timeout"
        else:
            cls = "host-wait"
    else:
        cls = "slow" if any(c == "slow" for c in classes) else "clean"
    ws = [n.watchdog for n in nodes]
    last = [w.last_progress_t for w in ws if w.last_progress_t is not None]
    per_node = "; ".join(f"{n.label}: {n.watchdog.cls}" + (f" (busy {ranks_text(n.watchdog.busy_ranks)})"
                                                          if n.watchdog.busy_ranks else "") for n in nodes)
    merged = WatchdogVerdict(
        cls=cls,  # type: ignore[arg-type,unused-ignore]
        stall_s=max(w.stall_s for w in ws),
        started_t=min(w.started_t for w in ws),
        last_progress_t=max(last) if last else None,
        verdict_t=max(w.verdict_t for w in ws),
        busy_ranks=sorted(busy),
        idle_ranks=sorted(idle | (finished if first_hang is not None else set())),
        finished_ranks=sorted(finished),
        cpu_pct={r: v for w in ws for r, v in w.cpu_pct.items()},
        gpu_util={r: v for w in ws for r, v in w.gpu_util.items()},
        crashed=crashed if cls == "crash" else [],
        slow_resumed=sum(w.slow_resumed for w in ws),
        note=f"merged from {len(nodes)} nodes' watchdogs: {per_node}",
    )
    return merged, notes


def _check_same_job(nodes: list[NodeRecords]) -> list[str]:
    notes = []
    first = nodes[0].scenario
    for n in nodes[1:]:
        s = n.scenario
        if (s.name, s.parallel.tp, s.parallel.pp) != (first.name, first.parallel.tp, first.parallel.pp):
            raise ScenarioError(
                f"{n.root}: scenario {s.name} (tp={s.parallel.tp} pp={s.parallel.pp}) differs from {nodes[0].root}'s "
                f"{first.name} (tp={first.parallel.tp} pp={first.parallel.pp}): these folders are not one job"
            )
    ids = {n.info.rdzv_id for n in nodes if n.info is not None and n.info.rdzv_id}
    if len(ids) > 1:
        raise ScenarioError(
            f"the folders come from different rendezvous ids ({', '.join(sorted(ids))}): they are not one job; "
            "give the folders of one multi-node run"
        )
    seen: dict[int, Path] = {}
    for n in nodes:
        for r in n.ranks:
            if r in seen:
                raise ScenarioError(f"rank {r} is in both {seen[r]} and {n.root}: give each node's folder once")
            seen[r] = n.root
    missing = sorted(set(range(first.world_size)) - set(seen))
    if missing:
        notes.append(f"ranks {ranks_text(missing)} have no folder among those merged: their node's records are "
                     "missing, so the analysis cannot see them")
    return notes


def _copy_records(nodes: list[NodeRecords], out: RunDir) -> None:
    """Every node's per-rank records into the merged folder, so it stands on its own."""
    first = RunDir(nodes[0].root)
    for src in (first.scenario_json, first.scenario_yaml, first.env_json):
        if src.exists():
            shutil.copy2(src, out.root / src.name)
    with open(out.activity, "w") as act:
        for n in nodes:
            rd = RunDir(n.root)
            for r in n.ranks:
                for src, dst in ((rd.launch_log(r), out.launch_log(r)), (rd.stderr_log(r), out.stderr_log(r)),
                                 (cupti_file(rd.root, r), cupti_file(out.root, r)),
                                 (rd.stack_file(r), out.stack_file(r)),
                                 (rd.faulthandler_file(r), out.faulthandler_file(r))):
                    if src.exists():
                        shutil.copy2(src, dst)
            for g in (rd.root / "gpu").glob("*"):
                if g.is_file():
                    shutil.copy2(g, out.root / "gpu" / g.name)
            if rd.torchrun_log.exists():
                idx = n.info.node_rank if n.info else nodes.index(n)
                shutil.copy2(rd.torchrun_log, out.root / "logs" / f"torchrun.node{idx}.log")
            if rd.activity.exists():
                act.write(rd.activity.read_text())


def merge_runs(dirs: list[Path], out_base: Path | None = None) -> tuple[RunDir, Report]:
    """Combine the run folders of a multi-node run into one report; returns the merged folder and report."""
    if not dirs:
        raise ScenarioError("vdiag report --merge: give the run folder of every node")
    nodes = [load_node(Path(d)) for d in dirs]
    nodes.sort(key=lambda n: (n.info.node_rank if n.info else 0, n.ranks[0]))
    notes = _check_same_job(nodes)
    sc = nodes[0].scenario
    wd, wd_notes = combine_verdicts(nodes)
    logs = {r: lg for n in nodes for r, lg in n.logs.items()}
    locks = [h for n in nodes for h in n.locks]

    out = RunDir.create(out_base or Path(dirs[0]).resolve().parent, f"{sc.name}-merged")
    _copy_records(nodes, out)
    out.watchdog_json.write_text(wd.model_dump_json(indent=2))
    (out.root / LOCKS_ARTIFACT).write_text(json.dumps([h.model_dump(mode="json") for h in locks], indent=1))
    (out.root / NODES_FILE).write_text(json.dumps(
        [{"folder": str(n.root), "label": n.label, "ranks": n.ranks, "watchdog": n.watchdog.cls,
          **(n.info.model_dump() if n.info else {})} for n in nodes], indent=2) + "\n")

    where = "; ".join(f"{n.label} ran ranks {ranks_text(n.ranks)} (its watchdog: {n.watchdog.cls})" for n in nodes)
    reps = [n.report for n in nodes if n.report is not None]
    node_notes = [x for r in reps for x in r.notes if not x.startswith(NODE_NOTE_PREFIX)]
    hosts = sorted({n.info.host for n in nodes if n.info and n.info.host})
    notes = [
        f"merged from {len(nodes)} node folders ({where}); the environment section is {nodes[0].label}'s",
        *notes, *wd_notes, *dict.fromkeys(node_notes),
    ]
    if len(hosts) > 1:
        notes.append("times come from each node's clock: compare stall and verdict times across nodes with "
                     "the clocks' skew in mind")
    base = reps[0] if reps else None
    ev = Evidence(watchdog=wd, stacks=[s for n in nodes for s in n.stacks], gpu=[g for n in nodes for g in n.gpu],
                  collectors=[c for n in nodes for c in n.collectors], env=nodes[0].env, notes=notes, locks=locks,
                  logs=logs)
    ctx = RunContext(
        scenario=sc, ranks=sorted(logs),
        scenario_file=base.scenario_file if base else str(nodes[0].root / "scenario.json"),
        started=min(r.started for r in reps) if reps else time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        duration_s=max((r.duration_s for r in reps), default=0.0),
        warnings=fault_warnings(sc, base.scenario_file if base else sc.name),
        placement=(base.placement + "; " if base and base.placement else "") + f"{len(nodes)} nodes",
        notes_final=True,  # each node's report already holds its GPU-state, CUPTI and vLLM notes
        verdict_suffix=nodes_text([(n.label, n.ranks, n.watchdog.cls) for n in nodes]),
    )
    return out, diagnose(out, ev, ctx)


def auto_merge(run_dir: RunDir, info: NodeInfo, reports_dir: Path, wait_s: float) -> tuple[RunDir | None, str]:
    """Node 0: wait up to wait_s for every node's finished folder beside this one, then merge.

    Returns (merged folder or None, a line for the user). Waits only where the folder is shared: every
    node writes node.json as soon as its ranks start, so by now a shared folder shows the others."""
    hint = "copy every node's run folder to one machine and run `vdiag report --merge DIR...`"
    if not set(find_node_dirs(reports_dir, info, any_state=True)) - {info.node_rank}:
        return None, f"the other nodes' folders are not under {reports_dir} (not a shared folder): {hint}"
    deadline = time.monotonic() + wait_s
    while True:
        dirs = find_node_dirs(reports_dir, info)
        dirs[info.node_rank] = run_dir.root
        if len(dirs) >= info.nnodes or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if len(dirs) < info.nnodes:
        missing = sorted(set(range(info.nnodes)) - set(dirs))
        return None, (f"nodes {', '.join(map(str, missing))} wrote no report under {reports_dir} within "
                      f"{wait_s:g} s: {hint}")
    out, _ = merge_runs([dirs[k] for k in sorted(dirs)], out_base=reports_dir)
    return out, f"merged report of all {info.nnodes} nodes: {out.report_md}"
