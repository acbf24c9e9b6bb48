"""What the GPUs are running: cuda-gdb attached to a live rank, or a CUDA core dump read offline.

Two ways in (see docs/mechanisms.md, "Other evidence sources"):

* ``collect_gpu_attach``: ``cuda-gdb -q -batch -p PID -ex "info cuda kernels" -ex "info cuda blocks"
  -ex detach`` per busy rank. Needs ptrace, like py-spy; 2 s on a small program, 11-12 s with FlashInfer.
* a user-triggered CUDA core dump: start the workers with `coredump_env`, write zeros into the driver's
  pipe (`trigger_core_dump`), then `read_cudacore`. No ptrace, about 1 s, but it KILLS the dumped
  process: take it last, after stacks, NVML and launch logs, and only when the run is over.

`parse_cuda_gdb` reads both outputs into `GpuKernel` records: kernel name, device, grid, block, cluster,
and how many blocks are still running.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repro.errors import EnvironmentProblem
from repro.records import CollectorRun, GpuKernel, GpuState
from repro.redact import redact_text
from repro.rundir import RunDir
from repro.tools import ToolMissing, ToolTimeout, looks_like_ptrace_denied, ptrace_advice, run_tool

log = logging.getLogger(__name__)

ATTACH_COMMANDS = ("info cuda kernels", "info cuda blocks")
COREDUMP_GENERATION_FLAGS = "skip_nonrelocated_elf_images,skip_global_memory,skip_shared_memory,skip_local_memory,skip_constbank_memory"
COREDUMP_PIPE_NAME = "pipe.%p"
COREDUMP_FILE_NAME = "core.%p"

# ---- parsing -------------------------------------------------------------------------------------------

_TUPLE = r"\(\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*\)"
_TUPLE_RE = re.compile(_TUPLE)
_KERNELS_HEADER = re.compile(r"^\s*Kernel\s+.*\bGridDim\b")
_KERNEL_ROW = re.compile(
    rf"^\s*(?P<star>\*)?\s*(?P<pre>\d+(?:\s+\S+)*?)\s+(?P<dims>(?:{_TUPLE}\s+){{2,3}})(?P<inv>\S.*?)\s*$"
)
_BLOCKS_HEADER = re.compile(r"^\s*BlockIdx\b")
_BLOCKS_KERNEL = re.compile(r"^\s*Kernel\s+(?P<id>\d+)\s*$")
_BLOCK_ROW = re.compile(
    rf"^\s*(?P<star>\*)?\s*(?P<tuples>(?:{_TUPLE}\s*)+?)\s*(?P<count>\d+)?\s*(?P<state>[A-Za-z][\w -]*?)?\s*$"
)
_FOCUS = re.compile(r"\[(?:Switching focus to|Current focus set to) CUDA kernel (?P<id>\d+)")
# cuda-gdb 13.0 prints no ClusterDim column; the focus line names the focused kernel's cluster shape.
_FOCUS_CLUSTER = re.compile(r"cluster dim (?P<dim>\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\))")
# cuda-gdb attached but could not start CUDA debugging in the process (another developer tool, e.g. CUPTI)
_NO_CUDA_DEBUG = re.compile(r"cudbgApiAttach\) will be abandoned", re.IGNORECASE)
# the target was gone when cuda-gdb attached: its "No CUDA kernels." says nothing either
_GONE = re.compile(r"ptrace: No such process", re.IGNORECASE)
_NO_KERNELS = re.compile(r"No CUDA kernels", re.IGNORECASE)
_DEFAULT_KERNEL_COLS = ["Kernel", "Parent", "Dev", "Grid", "Status", "SMs Mask"]


def _dim(text: str) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in text.strip()[1:-1].split(","))
    return (x, y, z)


def _kernel_columns(header: str) -> tuple[list[str], list[str]]:
    """(columns before the dimensions, names of the dimension columns) from a kernels table header."""
    words = header.split()
    pre: list[str] = []
    dims: list[str] = []
    for w in words:
        if w.endswith("Dim"):
            dims.append(w)
        elif not dims:
            if w == "Mask" and pre and pre[-1] == "SMs":
                pre[-1] = "SMs Mask"
            else:
                pre.append(w)
    return pre, dims


def parse_cuda_gdb(text: str) -> list[GpuKernel]:
    """Kernels from cuda-gdb's ``info cuda kernels`` (+ ``info cuda blocks``) output, in table order.

    Tolerates gdb's chatter around the tables, an extra ClusterDim column (newer cuda-gdb), coalesced
    (``BlockIdx To BlockIdx Count State``) and uncoalesced (``BlockIdx State``) block lists, and
    "No CUDA kernels.". Blocks listed under ``Kernel N`` go to kernel N; blocks with no such line go to
    the kernel in focus (``*``). `running_blocks` is None when no block list was printed for a kernel.
    """
    pre_cols = list(_DEFAULT_KERNEL_COLS)
    dim_cols: list[str] = []
    order: list[str] = []
    info: dict[str, dict[str, object]] = {}
    focus: str | None = None
    blocks_idx_names: list[str] = []
    blocks_coalesced = True
    in_blocks = False
    block_kernel: str | None = None
    running: dict[str, int] = {}
    ranges: dict[str, list[str]] = {}
    focus_cluster: tuple[int, int, int] | None = None

    for line in text.splitlines():
        if _KERNELS_HEADER.match(line):
            pre_cols, dim_cols = _kernel_columns(line)
            in_blocks = False
            continue
        fm = _FOCUS.search(line)
        if fm:
            focus = fm["id"]
            cm = _FOCUS_CLUSTER.search(line)
            if cm:
                focus_cluster = _dim(cm["dim"])
            continue
        if _BLOCKS_HEADER.match(line):
            words = line.split()
            blocks_coalesced = "To" in words
            blocks_idx_names = [w for w in words if w.endswith("Idx")]
            in_blocks = True
            block_kernel = None
            continue
        if in_blocks:
            km = _BLOCKS_KERNEL.match(line)
            if km:
                block_kernel = km["id"]
                continue
            bm = _BLOCK_ROW.match(line)
            if bm:
                kid = block_kernel or focus or (order[0] if len(order) == 1 else None)
                if kid is None:
                    continue
                tuples = _TUPLE_RE.findall(bm["tuples"])
                state = (bm["state"] or "").strip().lower()
                count = int(bm["count"]) if bm["count"] else 1
                names = blocks_idx_names[: len(tuples)] if blocks_idx_names else []
                half = len(tuples) // 2 if blocks_coalesced and len(tuples) >= 2 else len(tuples)
                bi = names.index("BlockIdx") if "BlockIdx" in names[:half] else 0
                start = tuples[bi].replace(" ", "")
                end = (
                    tuples[half + bi].replace(" ", "")
                    if half < len(tuples) and half + bi < len(tuples)
                    else start
                )
                rng = start if start == end else f"{start}-{end}"
                if not state or state.startswith("running"):
                    running[kid] = running.get(kid, 0) + count
                else:
                    rng = f"{rng} {state}"
                ranges.setdefault(kid, []).append(rng)
                if kid not in info:
                    order.append(kid)
                    info[kid] = {"name": f"kernel {kid}"}
                continue
        m = _KERNEL_ROW.match(line)
        if m:
            values = m["pre"].split()
            cols = pre_cols if len(pre_cols) == len(values) else _DEFAULT_KERNEL_COLS
            kid = values[0]
            dev: int | None = None
            if "Dev" in cols and cols.index("Dev") < len(values) and values[cols.index("Dev")].isdigit():
                dev = int(values[cols.index("Dev")])
            dims = _TUPLE_RE.findall(m["dims"])
            names = (
                dim_cols if len(dim_cols) == len(dims) else ["GridDim", "BlockDim", "ClusterDim"][: len(dims)]
            )
            by_name = dict(zip(names, dims, strict=False))
            rec: dict[str, object] = {
                "name": m["inv"],
                "device": dev,
                "grid": _dim(by_name["GridDim"]) if "GridDim" in by_name else None,
                "block": _dim(by_name["BlockDim"]) if "BlockDim" in by_name else None,
                "cluster": _dim(by_name["ClusterDim"]) if "ClusterDim" in by_name else None,
            }
            if kid not in info:
                order.append(kid)
            info[kid] = rec
            if m["star"] and focus is None:
                focus = kid
            in_blocks = False
    out: list[GpuKernel] = []
    if focus is not None and focus_cluster is not None and focus in info and info[focus].get("cluster") is None:
        info[focus]["cluster"] = focus_cluster
    for kid in order:
        rec = info[kid]
        out.append(
            GpuKernel.model_validate(
                {
                    **rec,
                    "running_blocks": running.get(kid) if kid in ranges else None,
                    "block_ranges": ranges.get(kid, []),
                }
            )
        )
    return out


def _has_kernel_table(text: str) -> bool:
    return any(_KERNELS_HEADER.match(ln) for ln in text.splitlines())


def _has_kernel_info(text: str) -> bool:
    return bool(_NO_KERNELS.search(text)) or _has_kernel_table(text)


def _error_line(text: str) -> str:
    for ln in text.splitlines():
        s = ln.strip()
        low = s.lower()
        if any(w in low for w in ("error", "denied", "not permitted", "could not", "cannot", "failed")):
            return s[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _write(path: Path, text: str) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)
    except OSError as e:
        log.warning("could not write %s: %s", path, e)
        return ""


# ---- cuda-gdb attach -----------------------------------------------------------------------------------

_LOCKED = re.compile(r"cuda-gdb\.lock|another cuda-gdb|already (?:in use|using)", re.IGNORECASE)


def _attach_one(
    rank: int, pid: int, run_dir: RunDir, timeout: float
) -> tuple[GpuState | None, CollectorRun, bool]:
    """(state, run, locked): `locked` when another cuda-gdb held the debugger lock (retry serially)."""
    name = "cuda-gdb attach"
    t0 = time.monotonic()
    argv = ["cuda-gdb", "-q", "-batch", "-p", str(pid)]
    for cmd in (*ATTACH_COMMANDS, "detach"):
        argv += ["-ex", cmd]
    raw_path = run_dir.gpu_file(rank, "attach")
    try:
        res = run_tool(argv, timeout=timeout, attach=True)
    except ToolMissing as e:
        return (
            None,
            CollectorRun(
                name=name, rank=rank, ok=False, seconds=time.monotonic() - t0, error=str(e), advice=e.advice
            ),
            False,
        )
    except ToolTimeout as e:
        artifact = _write(raw_path, redact_text(e.stdout + e.stderr)) if (e.stdout or e.stderr) else ""
        return (
            None,
            CollectorRun(
                name=name,
                rank=rank,
                ok=False,
                seconds=time.monotonic() - t0,
                error=str(e),
                artifact=artifact,
                advice="cuda-gdb attach takes 11-12 s with FlashInfer loaded: raise the timeout, or use the CUDA core dump",
            ),
            False,
        )
    except EnvironmentProblem as e:
        return (
            None,
            CollectorRun(name=name, rank=rank, ok=False, seconds=time.monotonic() - t0, error=str(e)),
            False,
        )
    text = res.output
    artifact = _write(raw_path, redact_text(text))
    if _GONE.search(text) and not _has_kernel_table(text):
        return (
            None,
            CollectorRun(name=name, rank=rank, ok=False, seconds=res.seconds, artifact=artifact,
                         error="the process had exited before cuda-gdb could attach (ptrace: No such process)"),
            False,
        )
    if _NO_CUDA_DEBUG.search(text) and not _has_kernel_table(text):
        return (
            None,
            CollectorRun(
                name=name, rank=rank, ok=False, seconds=res.seconds, artifact=artifact,
                error="cuda-gdb attached but could not start CUDA debugging in the process (cudbgApiAttach "
                "abandoned); its 'No CUDA kernels' says nothing",
                advice="another CUDA developer tool holds the process (CUPTI: VDIAG_CUPTI=1, Nsight); run "
                "without it for the GPU state",
            ),
            False,
        )
    denied = looks_like_ptrace_denied(text)
    if _has_kernel_table(text) or (_NO_KERNELS.search(text) and not denied):
        state = GpuState(
            rank=rank,
            pid=pid,
            source="cuda-gdb attach",
            kernels=parse_cuda_gdb(text),
            raw_path=artifact,
            seconds=res.seconds,
        )
        return (
            state,
            CollectorRun(name=name, rank=rank, ok=True, seconds=res.seconds, artifact=artifact),
            False,
        )
    error = redact_text(_error_line(text))
    if denied:
        return (
            None,
            CollectorRun(
                name=name,
                rank=rank,
                ok=False,
                seconds=res.seconds,
                error=error,
                advice=ptrace_advice("cuda-gdb"),
                artifact=artifact,
            ),
            False,
        )
    if _LOCKED.search(text):
        return (
            None,
            CollectorRun(name=name, rank=rank, ok=False, seconds=res.seconds, error=error, artifact=artifact),
            True,
        )
    return (
        None,
        CollectorRun(name=name, rank=rank, ok=False, seconds=res.seconds, error=error, artifact=artifact),
        False,
    )


def collect_gpu_attach(
    pids: dict[int, int], run_dir: RunDir, *, timeout: float = 60.0, max_workers: int = 8
) -> tuple[list[GpuState], list[CollectorRun]]:
    """cuda-gdb attached to each given rank ({rank: pid}, normally the busy ones), in parallel.

    A rank whose cuda-gdb found another holding the debugger lock is retried once, alone, afterwards.
    Never raises: failures come back as CollectorRun records with advice.
    """
    if not pids:
        return [], []
    results: dict[int, tuple[GpuState | None, CollectorRun, bool]] = {}
    with ThreadPoolExecutor(
        max_workers=max(1, min(max_workers, len(pids))), thread_name_prefix="vdiag-cuda-gdb"
    ) as ex:
        futs = {
            rank: ex.submit(_attach_one, rank, pid, run_dir, timeout) for rank, pid in sorted(pids.items())
        }
        for rank, fut in futs.items():
            try:
                results[rank] = fut.result()
            except Exception as e:  # _attach_one does not raise; belt and braces
                results[rank] = (
                    None,
                    CollectorRun(name="cuda-gdb attach", rank=rank, ok=False, seconds=0.0, error=repr(e)),
                    False,
                )
    for rank in sorted(results):
        if results[rank][2]:
            try:
                results[rank] = _attach_one(rank, pids[rank], run_dir, timeout)
            except Exception as e:
                results[rank] = (
                    None,
                    CollectorRun(name="cuda-gdb attach", rank=rank, ok=False, seconds=0.0, error=repr(e)),
                    False,
                )
    states = [s for s, _, _ in (results[r] for r in sorted(results)) if s is not None]
    runs = [results[r][1] for r in sorted(results)]
    return states, runs


# ---- CUDA core dumps -----------------------------------------------------------------------------------


def coredump_dir(run_dir: RunDir) -> Path:
    return Path(os.path.abspath(run_dir.root)) / "gpu"


def coredump_env(run_dir: RunDir) -> dict[str, str]:
    """Variables that make the CUDA driver dump a worker's GPU state on demand (see docs/mechanisms.md).

    The driver expands %p to the worker's pid: the pipe is gpu/pipe.<pid>, the dump gpu/core.<pid>.
    """
    d = coredump_dir(run_dir)
    return {
        "CUDA_ENABLE_USER_TRIGGERED_COREDUMP": "1",
        "CUDA_COREDUMP_PIPE": str(d / COREDUMP_PIPE_NAME),
        "CUDA_COREDUMP_FILE": str(d / COREDUMP_FILE_NAME),
        "CUDA_COREDUMP_GENERATION_FLAGS": COREDUMP_GENERATION_FLAGS,
    }


def coredump_pipe(run_dir: RunDir, pid: int) -> Path:
    return coredump_dir(run_dir) / COREDUMP_PIPE_NAME.replace("%p", str(pid))


def coredump_file(run_dir: RunDir, pid: int) -> Path:
    return coredump_dir(run_dir) / COREDUMP_FILE_NAME.replace("%p", str(pid))


def trigger_core_dump(
    pipe_path: str | os.PathLike[str], timeout: float = 10.0, *, rank: int | None = None
) -> CollectorRun:
    """Write zeros into the driver's named pipe until the driver closes it (EPIPE: that is success).

    Refuses anything that is not a FIFO. The dumped process dies afterwards (see the module docstring).
    Never raises.
    """
    name = "cuda core dump trigger"
    t0 = time.monotonic()
    path = Path(pipe_path)

    def done(ok: bool, error: str = "", advice: str = "") -> CollectorRun:
        return CollectorRun(
            name=name,
            rank=rank,
            ok=ok,
            seconds=time.monotonic() - t0,
            error=error,
            advice=advice,
            artifact=str(path),
        )

    try:
        st = path.stat()
    except FileNotFoundError:
        return done(
            False, f"no coredump pipe at {path}", "start the workers with coredump_env() in their environment"
        )
    except OSError as e:
        return done(False, f"cannot stat {path}: {e}")
    if not stat.S_ISFIFO(st.st_mode):
        return done(False, f"{path} is not a named pipe; not written to")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return done(False, f"nobody reads {path}: the process is gone or never initialised CUDA")
        return done(False, f"cannot open {path}: {e}")
    zeros = bytes(64 * 1024)
    written = 0
    deadline = t0 + timeout
    try:
        while time.monotonic() < deadline:
            try:
                written += os.write(fd, zeros)
            except BlockingIOError:
                select.select([], [fd], [], 0.05)
            except BrokenPipeError:
                return done(True)
            except OSError as e:
                if e.errno == errno.EPIPE:
                    return done(True)
                return done(False, f"writing to {path} failed after {written} bytes: {e}")
        return done(False, f"the driver had not closed {path} after {timeout:g} s ({written} bytes written)")
    finally:
        os.close(fd)


def wait_for_core(core_path: str | os.PathLike[str], timeout: float = 30.0, stable_s: float = 0.5) -> bool:
    """Wait until the core dump file exists and has stopped growing."""
    path = Path(core_path)
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size != last:
            last, since = size, time.monotonic()
        elif size > 0 and time.monotonic() - since >= stable_s:
            return True
        time.sleep(0.05)
    return False


def read_cudacore(
    core_path: str | os.PathLike[str], run_dir: RunDir, rank: int, pid: int, timeout: float = 60.0
) -> GpuState:
    """Read a CUDA core dump offline with cuda-gdb (``target cudacore FILE``). Raw output goes to
    gpu/rank{r}.cudacore.txt.

    Raises ToolMissing (no cuda-gdb), ToolTimeout, or EnvironmentProblem (no such file, or cuda-gdb
    could not read it); the caller records these as a failed collector.
    """
    path = Path(core_path)
    if not path.is_file():
        raise EnvironmentProblem(f"no CUDA core dump at {path}")
    argv = ["cuda-gdb", "-q", "-batch", "-ex", f"target cudacore {path}"]
    for cmd in ATTACH_COMMANDS:
        argv += ["-ex", cmd]
    res = run_tool(argv, timeout=timeout)
    text = res.output
    artifact = _write(run_dir.gpu_file(rank, "cudacore"), redact_text(text))
    if not _has_kernel_info(text):
        raise EnvironmentProblem(
            f"cuda-gdb could not read the CUDA core dump {path}: {redact_text(_error_line(text))}"
        )
    return GpuState(
        rank=rank,
        pid=pid,
        source="cuda core dump",
        kernels=parse_cuda_gdb(text),
        raw_path=artifact,
        seconds=res.seconds,
    )
