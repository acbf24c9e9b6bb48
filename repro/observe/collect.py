"""The collectors pointed at a job vdiag did not launch, in parallel, non-blocking ones first.

py-spy stacks of every rank (native frames where the wait is: the busy ranks, or every rank when none is
busy; Python frames elsewhere), the file locks the ranks hold, the environment (vdiag's and the ranks' own variables, redacted), then,
only for processes that NVML shows on a GPU, cuda-gdb attach (after the stacks: a process has one ptrace
tracer), and last the CUDA core dump, only when the user asked for it at start (it ends the process).
"""

from __future__ import annotations

from typing import Any

from repro.collectors.environment import relevant_variables
from repro.collectors.host import collect_host
from repro.observe.tree import Tracked
from repro.records import CollectorRun, EnvInfo, GpuState, StackSample
from repro.rundir import RunDir


def collect(
    run_dir: RunDir, subjects: dict[int, Tracked], busy: list[int], *, command: str, hang: bool,
    gpu_state: str = "auto", core_dump: bool = False,
) -> tuple[list[StackSample], list[GpuState], list[CollectorRun], EnvInfo]:
    alive = {r: t.pid for r, t in subjects.items() if not t.exited}
    gpu: list[GpuState] = []
    native: dict[int, int] = {}
    rest: dict[int, int] = {}
    if hang and alive:
        native = {r: p for r, p in alive.items() if r in busy} or alive
        rest = {r: p for r, p in alive.items() if r not in native}
    env, stacks, runs = collect_host(run_dir, "", native, rest, alive if hang else {})
    # The job's own variables (of its first rank) replace vdiag's; the command line is the job's.
    first = next((t for _, t in sorted(subjects.items()) if t.env is not None), None)
    update: dict[str, Any] = {"command_line": command}
    if first is not None and first.env is not None:
        update["variables"] = relevant_variables(first.env)
    env = env.model_copy(update=update)
    run_dir.env_json.write_text(env.model_dump_json(indent=2))
    on_gpu = {r: p for r, p in alive.items() if subjects[r].identity.nvml_gpus}
    targets = {r: p for r, p in on_gpu.items() if r in busy} or on_gpu
    if hang and targets and gpu_state in ("auto", "attach"):
        from repro.collectors.gpu import collect_gpu_attach

        got, r = collect_gpu_attach(targets, run_dir)
        gpu.extend(got)
        runs.extend(r)
    if hang and targets and core_dump:
        from repro.collectors.coredump import collect_gpu_coredump

        have = {g.rank for g in gpu}
        dumped, r = collect_gpu_coredump({k: p for k, p in targets.items() if k not in have}, run_dir)
        gpu.extend(dumped)
        runs.extend(r)
    return sorted(stacks, key=lambda s: s.rank), gpu, runs, env
