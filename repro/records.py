"""Typed records that flow between the stages: collected data in, findings out.

Collectors and the watchdog produce these; the analysis reads them and returns findings; renderers only
read. They are pydantic models so that `report.json` round-trips (``vdiag report RUN_DIR``) and its schema
can be published (``vdiag report --schema``). Bump REPORT_SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

import enum
import os
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

REPORT_SCHEMA_VERSION = "1.2"  # 1.1: Report.observed (watch/attach), Verdict.cls "interrupted"; 1.2: Report.faults, Verdict.ranks, WatchdogVerdict.stragglers/patience_s/interrupted_by, RankExit.error_line


#: VDIAG_STRICT_RECORDS=1 (the test suite sets it) makes an unknown field in any record an error, so that a
#: writer cannot drop a field silently; without it readers ignore unknown fields (a newer vdiag's records).
STRICT_RECORDS = os.environ.get("VDIAG_STRICT_RECORDS") == "1"


class _Rec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid" if STRICT_RECORDS else "ignore")


class _Event(_Rec):
    """A line of a rank's launch log: built by the writer (`repro.events.LaunchLogWriter.emit`), parsed back."""

    rank: int
    t: float = Field(default_factory=time.time)


# ---- what the workers write (launch logs) ----------------------------------------------------------


class LaunchEvent(_Event):
    """One fused (or unfused) all-reduce + RMSNorm call, written and flushed before the launch."""

    ev: Literal["launch"] = "launch"
    seq: int
    call: int
    phase: str
    size: int
    layer: int | None = None  # None: a job vdiag did not launch and that is not vLLM (no layer to infer)
    sub: int | None = None
    op: Literal["fused", "unfused"]
    token_num: int
    hidden: int
    dtype: str
    oneshot: bool | None = None
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    cluster: tuple[int, int, int] | None = None
    kernel: str | None = None
    ws: str | None = None
    graph: bool = False  # the captured run (a CUDA graph on GPU backends)
    args: dict[str, Any] = {}


class ResultEvent(_Event):
    """The checked outcome of one call (issue: silent corruption)."""

    ev: Literal["result"] = "result"
    seq: int
    ok: bool
    max_err: float = 0.0
    n_wrong: int = 0
    first_wrong: int | None = None
    kind: str = "ok"  # ok | foreign_group | missing_peer | stale | misaligned | unknown
    detail: str = ""
    call_s: float | None = None  # launch to return, the check left out


class WorkspaceEvent(_Event):
    ev: Literal["workspace"] = "workspace"
    ok: bool
    backend: str
    rendezvous_group: tuple[int, ...]
    tp_group: tuple[int, ...]
    peers: tuple[str, ...] = ()
    peer_owner_ranks: tuple[int, ...] = ()
    fallback: bool = False
    error: str = ""
    # real vLLM (the instrumentation): which FlashInfer entry created it, and how it rendezvoused
    entry: str = ""
    fi_backend: str = ""
    rendezvous: str = ""
    tp_size: int | None = None
    max_token_num: int | None = None
    hidden_dim: int | None = None
    peer_ptrs: list[list[str]] = []


class PhaseEvent(_Event):
    ev: Literal["phase"] = "phase"
    phase: str
    index: int = 0
    total: int = 0
    size: int | None = None
    label: str = ""


class HelloEvent(_Event):
    ev: Literal["hello"] = "hello"
    pid: int
    host: str
    pp_stage: int
    tp_rank: int
    device: str = "cpu"
    device_index: int | None = None
    backend: str = "sim"
    gpu_name: str = ""
    shared_gpu: bool = False  # several local ranks on this GPU
    engine: str = ""  # "vllm" for real vLLM; "" for the replay


class DoneEvent(_Event):
    ev: Literal["done"] = "done"
    calls: int
    wrong_calls: int
    check_s: float | None = None  # seconds spent checking results, for the checking benchmark


class FaultEvent(_Event):
    """An injected fault that fired on this rank (`index` is its place in the scenario's `faults:` list)."""

    ev: Literal["fault"] = "fault"
    index: int
    kind: str
    phase: str = ""
    size: int | None = None
    layer: int | None = None
    sub: int | None = None
    call: int | None = None


class ErrorEvent(_Event):
    """An exception a worker caught and reported before it exited."""

    ev: Literal["error"] = "error"
    where: str
    error: str
    seq: int | None = None


LogEvent = LaunchEvent | ResultEvent | WorkspaceEvent | PhaseEvent | HelloEvent | DoneEvent | FaultEvent | ErrorEvent


class RankLog(_Rec):
    """Everything one rank's launch log says, parsed."""

    rank: int
    hello: HelloEvent | None = None
    workspace: WorkspaceEvent | None = None
    phases: list[PhaseEvent] = []
    launches: list[LaunchEvent] = []
    results: list[ResultEvent] = []
    done: DoneEvent | None = None
    errors: list[str] = []
    faults: list[FaultEvent] = []

    @property
    def completed(self) -> int:
        return len(self.results)

    def pending_launch(self) -> LaunchEvent | None:
        """The launch written before the call that never returned, if any."""
        if self.launches and (not self.results or self.results[-1].seq != self.launches[-1].seq):
            return self.launches[-1]
        return None


# ---- what the watchdog sees -------------------------------------------------------------------------


class ActivitySample(_Rec):
    t: float
    rank: int
    cpu_pct: float
    progress: int
    gpu_util: float | None = None
    gpu_power_w: float | None = None
    sm_clock_mhz: float | None = None


class RankExit(_Rec):
    rank: int
    returncode: int | None
    signal: str | None = None
    stderr_tail: list[str] = []
    error_line: str = ""  # the first line of the real error in the rank's log (CUDA error, fatal error, exception)


HangClass = Literal["spin-deadlock", "all-spinning", "host-wait", "crash", "slow", "clean", "timeout", "interrupted"]


class Straggler(_Rec):
    """An idle rank outside every known wait when the stall was suspected: busy on the host, not waiting."""

    rank: int
    where: str  # innermost Python frames of its main thread, from its stack (py-spy)
    source: str = ""
    idle_s: float = 0.0  # how long it had made no progress when the verdict was given


class WatchdogVerdict(_Rec):
    cls: HangClass
    stall_s: float
    started_t: float
    last_progress_t: float | None
    verdict_t: float
    busy_ranks: list[int] = []
    idle_ranks: list[int] = []
    finished_ranks: list[int] = []
    cpu_pct: dict[int, float] = {}
    gpu_util: dict[int, float] = {}
    crashed: list[RankExit] = []
    slow_resumed: int = 0
    note: str = ""
    stragglers: list[Straggler] = []  # idle ranks outside every known wait (watched for patience_s)
    patience_s: float = 0.0  # how long the watchdog kept watching for stragglers to resume
    interrupted_by: str = ""  # SIGINT | SIGTERM | SIGHUP | killed (no report written; rebuilt by `vdiag report`)

    @property
    def is_hang(self) -> bool:
        return self.cls in ("spin-deadlock", "all-spinning", "host-wait", "timeout")


# ---- what the collectors bring back -------------------------------------------------------------------


class Frame(_Rec):
    function: str
    file: str = ""
    line: int | None = None
    native: bool = False


class ThreadStack(_Rec):
    thread: str
    name: str = ""
    active: bool = False
    frames: list[Frame] = []


class StackSample(_Rec):
    rank: int
    pid: int
    source: str  # "py-spy --native" | "py-spy" | "faulthandler"
    threads: list[ThreadStack] = []
    warning: str = ""


#: Where a hung rank's GPU state came from.
GpuSource = Literal["cuda-gdb attach", "cuda core dump"]
#: Where a hung rank's kernel name came from: its GPU state, else computed from (or read off) its launch record.
KernelSource = Literal["computed from the launch record", "launch record", "cuda-gdb attach", "cuda core dump", ""]


class GpuKernel(_Rec):
    name: str
    device: int | None = None
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    cluster: tuple[int, int, int] | None = None
    running_blocks: int | None = None
    block_ranges: list[str] = []


class GpuState(_Rec):
    rank: int
    pid: int
    source: GpuSource
    kernels: list[GpuKernel] = []
    raw_path: str = ""
    seconds: float = 0.0


class LockProcess(_Rec):
    """A process seen around a held file lock: the holder's children (what the build is doing)."""

    pid: int
    cmdline: str = ""
    state: str = ""  # psutil status: running, sleeping, disk-sleep...
    wchan: str = ""  # /proc/PID/wchan: where in the kernel it sleeps (fifo_open, pipe_read...)


class FileLockHold(_Rec):
    """A file lock held by one process of the run, from the OS (/proc/locks and /proc/PID/fd)."""

    path: str
    kind: str  # FLOCK | POSIX | OFDLCK, as /proc/locks names it
    mode: str  # WRITE (exclusive) | READ
    holder_pid: int
    holder_rank: int | None = None
    holder_cmdline: str = ""
    children: list[LockProcess] = []  # the holder's descendants
    waiting_ranks: list[int] = []  # ranks that have the same file open without holding it (or, by
    #                                `waiting_from`, whose JIT records name it: filelock closes it between tries)
    waiting_from: Literal["open file", "JIT record"] = "open file"
    source: str = "/proc/locks"


class CollectorRun(_Rec):
    name: str
    rank: int | None = None
    ok: bool
    seconds: float
    error: str = ""
    advice: str = ""
    artifact: str = ""


class EnvInfo(_Rec):
    python: str = ""
    platform: str = ""
    versions: dict[str, str] = {}
    driver: str = ""
    gpus: list[str] = []
    topology: str = ""
    variables: dict[str, str] = {}
    command_line: str = ""


class WaitSite(str, enum.Enum):
    """A known place a hung rank waits in (from its stack or its GPU state); `label` is its short name.

    The analysis holds each site's description; tables (gpu/validate.py) show the label."""

    LAMPORT_POLL = "lamport-poll"
    TWOSHOT_BARRIER = "twoshot-barrier"
    CTA_COUNTER = "cta-counter"
    TWOSHOT_GPU = "twoshot-gpu"  # cuda-gdb's view: the two-shot kernel, barrier and counter not told apart
    FILE_LOCK = "file-lock"
    CHILD_PROCESS = "child-process"
    HOST_ALL_REDUCE = "host-all-reduce"
    HOST_BARRIER = "host-barrier"
    RENDEZVOUS = "rendezvous"
    DEVICE_SYNC = "device-sync"

    @property
    def label(self) -> str:
        return _WAIT_LABELS[self]


_WAIT_LABELS = {
    WaitSite.LAMPORT_POLL: "Lamport poll", WaitSite.TWOSHOT_BARRIER: "two-shot barrier",
    WaitSite.CTA_COUNTER: "CTA counter", WaitSite.TWOSHOT_GPU: "two-shot barrier/counter",
    WaitSite.FILE_LOCK: "file lock", WaitSite.CHILD_PROCESS: "child process",
    WaitSite.HOST_ALL_REDUCE: "host all_reduce", WaitSite.HOST_BARRIER: "host barrier",
    WaitSite.RENDEZVOUS: "host rendezvous", WaitSite.DEVICE_SYNC: "CUDA synchronisation",
}


# ---- findings ----------------------------------------------------------------------------------------


class CallRef(_Rec):
    """The call a finding points at: the launch record's naming fields (`repro.report.format.call_fields`);
    a wrong result adds its error; `seq` alone when the launch record is missing. Only the fields that were
    set are written (and read back), so the call's text is the same from the run and from `report.json`."""

    phase: str | None = None
    size: int | None = None
    layer: int | None = None
    sub: int | None = None
    call: int | None = None
    token_num: int | None = None
    op: str | None = None
    oneshot: bool | None = None
    max_err: float | None = None
    first_wrong_element: int | None = None
    seq: int | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set}

    def __bool__(self) -> bool:
        return bool(self.model_fields_set)

    def fields(self) -> dict[str, Any]:
        """The fields that were set, in order."""
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}


class Divergence(_Rec):
    tp_group: tuple[int, ...]
    index: int
    field: str  # token_num | oneshot | grid | block | cluster | calls | op
    values: dict[int, Any]
    call: CallRef = CallRef()
    text: str = ""


class Aliasing(_Rec):
    ranks: tuple[int, ...]
    rendezvous_groups: dict[int, tuple[int, ...]]
    shared_buffers: dict[str, tuple[int, ...]]
    text: str = ""


class StackCluster(_Rec):
    signature: str
    ranks: list[int]
    top: list[str]
    odd: bool = False


class CorruptionFinding(_Rec):
    rank: int
    wrong_calls: int
    total_calls: int
    first: CallRef
    kind: str
    kinds: dict[str, int] = {}  # every wrong call's kind, counted (the first call's kind is `kind`)
    detail: str = ""


HypothesisStatus = Literal["supported", "consistent", "refuted", "no-evidence"]
#: The hypotheses the analysis weighs (repro.analysis.hypotheses), by key.
HypothesisKey = Literal[
    "launch-divergence", "protocol-mismatch", "workspace-aliasing", "missing-peer", "flag-out-of-step",
    "host-collective", "jit-lock", "straggler",
]
#: A verdict's class: the watchdog's hang class, or silent corruption found in a run that finished.
VerdictClass = Literal[
    "spin-deadlock", "all-spinning", "host-wait", "crash", "slow", "clean", "timeout", "interrupted", "corruption",
]


class Hypothesis(_Rec):
    key: HypothesisKey
    title: str
    status: HypothesisStatus
    score: float
    evidence_for: list[str] = []
    evidence_against: list[str] = []


class RankWhere(_Rec):
    """One hung rank's kernel and wait site, from that rank's own evidence."""

    rank: int
    state: str  # spinning | idle | straggler | finished
    kernel: str = ""  # the kernel's name, no template arguments
    geometry: str = ""  # grid, block, cluster
    kernel_source: KernelSource = ""
    site: str = ""  # what it waits in, from its stack (or its GPU state)
    host_wait: str = ""  # a spinning rank whose site is its GPU's: where its host thread waits (its stack)
    call: CallRef = CallRef()


class Verdict(_Rec):
    cls: VerdictClass
    headline: str
    paragraph: str
    spinning: list[int] = []
    idle: list[int] = []
    kernel: str = ""
    call: CallRef = CallRef()
    top_hypothesis: HypothesisKey | Literal[""] = ""
    ranks: list[RankWhere] = []  # every hung rank's own kernel and wait site


class Analysis(_Rec):
    divergences: list[Divergence] = []
    aliasing: list[Aliasing] = []
    stack_clusters: list[StackCluster] = []
    corruption: list[CorruptionFinding] = []
    hypotheses: list[Hypothesis] = []
    verdict: Verdict
    grid_checks: list[str] = []


class RankSummary(_Rec):
    rank: int
    pp_stage: int
    tp_rank: int
    pid: int | None = None
    device: str = "cpu"
    calls_done: int = 0
    wrong_calls: int = 0
    last_phase: str = ""
    pending: LaunchEvent | None = None
    state: str = ""  # spinning | idle | finished | crashed


class FaultOutcome(_Rec):
    """One injected fault of the scenario: where it fired, or why it never did."""

    index: int
    kind: str
    ranks: list[int]
    selector: dict[str, Any] = {}
    fired_on: dict[int, list[CallRef]] = {}  # rank -> the calls it fired at
    warning: str = ""  # set when the selector can never match (scenario.fault_warnings)

    @property
    def fired(self) -> bool:
        return bool(self.fired_on)
# ---- jobs vdiag did not launch (`vdiag watch`, `vdiag attach`; repro/observe/) -----------------------

FactHow = Literal["observed", "inferred", "computed"]
ProcessRole = Literal["worker", "engine-core", "api-server", "torchrun-agent", "launcher", "helper", "process"]


class Fact(_Rec):
    """One statement in an observed job's report, with how vdiag knows it and from where."""

    text: str
    how: FactHow
    source: str = ""  # e.g. "/proc/PID/environ", "process title", "NVML", "py-spy", "output line"


class ProcessIdentity(_Rec):
    """Who a process of the job is. Every field that vdiag could not tell is None, never a guess."""

    role: ProcessRole = "process"
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    tp_rank: int | None = None
    pp_rank: int | None = None
    dp_rank: int | None = None
    title: str = ""  # vLLM's process title, e.g. VLLM::Worker_PP1_TP0
    cuda_visible_devices: str | None = None
    nvml_gpus: list[int] = []  # devices whose NVML process list holds this pid
    sources: dict[str, str] = {}  # field -> where it came from ("RANK in /proc/PID/environ", "process title")


class ObservedProcess(_Rec):
    pid: int
    ppid: int | None = None
    name: str = ""
    cmdline: str = ""  # redacted
    identity: ProcessIdentity = ProcessIdentity()
    python: bool = False
    cpu_s: float | None = None  # CPU seconds at the verdict
    cpu_pct: float | None = None  # mean over the confirmation window
    state: str = ""  # busy | idle | exited | unknown
    wait_site: str = ""  # the known wait its stack is in ("" when outside every known wait or unknown)
    exit_status: int | None = None


class ProgressMark(_Rec):
    """A tqdm-style N/M progress bar seen in the job's output, at its last value."""

    label: str
    n: int
    total: int
    t: float
    updates: int = 1


class ObservedJob(_Rec):
    mode: Literal["watch", "attach"]
    command: str = ""  # redacted command line (watch) or the attached pids' command lines (attach)
    root_pids: list[int] = []
    processes: list[ObservedProcess] = []
    progress: list[ProgressMark] = []
    output_lines: int = 0
    output_tail: list[str] = []  # redacted
    returncode: int | None = None
    signal: str | None = None
    stall_s: float = 0.0
    patience_s: float = 0.0
    instrumented: bool = False
    on_hang: str = "report"
    stragglers: list[int] = []  # ranks outside every known wait when the verdict was given
    interrupted: bool = False  # Ctrl-C on vdiag before any hang was seen: the job was ended
    ready_line: str = ""  # the line in which the job said its start-up was over (redacted)
    ready_s: float | None = None  # seconds from the start of the watch to that line
    ended_by_user: bool = False  # Ctrl-C after the job was ready: vdiag ended it, no hang was judged
    numbered: bool = False  # the diagnosed processes carry vdiag's numbers (pid order), not ranks they showed
    facts: list[Fact] = []


class Report(_Rec):
    schema_version: str = REPORT_SCHEMA_VERSION
    vdiag_version: str
    scenario_name: str
    scenario_file: str
    scenario_yaml: str
    run_dir: str
    started: str
    duration_s: float
    backend: str
    engine: str
    world_size: int
    tp: int
    pp: int
    fusion_enabled: bool
    payload_width: int
    hidden: int
    exit_code: int
    expect: str | None = None
    placement: str = ""
    ranks: list[RankSummary] = []
    watchdog: WatchdogVerdict
    analysis: Analysis
    stacks: list[StackSample] = []
    gpu: list[GpuState] = []
    locks: list[FileLockHold] = []
    collectors: list[CollectorRun] = []
    env: EnvInfo = EnvInfo()
    activity_plot: str = ""
    notes: list[str] = []
    faults: list[FaultOutcome] = []
    observed: ObservedJob | None = None  # watch/attach: the job vdiag did not launch (no scenario)
