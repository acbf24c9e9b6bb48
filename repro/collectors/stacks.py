"""Host stacks of every rank: py-spy first, Python's faulthandler where py-spy cannot attach.

For each rank, in parallel:

1. ``py-spy dump --native --pid PID``; the raw text (redacted) goes to ``stacks/rank{r}.txt``.
2. If ``--native`` fails for another reason than a ptrace refusal (py-spy issue #822, "failed to get os
   threadid", is common on vLLM workers), retry without it and say so in ``StackSample.warning``.
3. If py-spy is missing, refused ptrace, or fails otherwise, send SIGUSR1 to the worker, which registered
   ``faulthandler`` on it (see `repro.engines.worker`), and read the dump it appends to
   ``stacks/rank{r}.faulthandler.txt``. The signal is only sent to a process that catches SIGUSR1 (read
   from /proc), since its default action would kill the worker.

Every attempt is recorded as a `CollectorRun`, with advice when it failed; nothing here raises.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repro.records import CollectorRun, Frame, StackSample, ThreadStack
from repro.redact import redact_text
from repro.rundir import RunDir
from repro.tools import ToolMissing, ToolTimeout, looks_like_ptrace_denied, ptrace_advice, run_tool

log = logging.getLogger(__name__)

FAULTHANDLER_SIGNAL = signal.SIGUSR1
FAULTHANDLER_WAIT_S = 2.0
_POLL_S = 0.02
_STABLE_S = 0.1

NATIVE_WARNING = (
    "py-spy --native failed ({reason}; see py-spy issue #822): these are Python-only stacks, "
    "without native frames"
)
FAULTHANDLER_WARNING = (
    "py-spy could not be used ({reason}): stacks from Python's faulthandler, "
    "Python frames only, without thread names or idle/active state"
)

# ---- parsing -------------------------------------------------------------------------------------------

_PYSPY_THREAD = re.compile(r'^Thread (?P<id>\S+) \((?P<state>[^)]*)\)(?::\s*"(?P<name>.*)")?\s*$')
_PYSPY_FRAME = re.compile(r"^\s{2,}(?P<func>.+?) \((?P<loc>[^()]*)\)\s*$")
_LOC_LINE = re.compile(r"^(?P<file>.*):(?P<line>\d+)$")
_PY_SUFFIXES = (".py", ".pyx", ".pyi", ">")  # ">" for "<string>", "<frozen ...>"


def parse_pyspy(text: str) -> list[ThreadStack]:
    """Parse ``py-spy dump`` output into threads, frames innermost first (as py-spy prints them).

    A Python frame reads ``func (file.py:12)``; a native one ``func (libc.so.6)`` or ``0x7f.. (lib.so)``
    or, with debug information, ``func (file.cpp:12)``. Lines of ``--locals`` output are skipped.
    """
    threads: list[ThreadStack] = []
    cur: dict[str, object] | None = None
    frames: list[Frame] = []

    def flush() -> None:
        if cur is not None:
            threads.append(
                ThreadStack(
                    thread=str(cur["id"]),
                    name=str(cur["name"]),
                    active=bool(cur["active"]),
                    frames=list(frames),
                )
            )

    for line in text.splitlines():
        m = _PYSPY_THREAD.match(line)
        if m:
            flush()
            state = m["state"].lower()
            cur = {"id": m["id"], "name": m["name"] or "", "active": "active" in state}
            frames = []
            continue
        if cur is None:
            continue
        f = _PYSPY_FRAME.match(line)
        if not f:
            continue
        loc = f["loc"].strip()
        lm = _LOC_LINE.match(loc)
        if lm:
            file, lineno = lm["file"], int(lm["line"])
            native = not file.endswith(_PY_SUFFIXES)
            frames.append(Frame(function=f["func"].strip(), file=file, line=lineno, native=native))
        else:
            frames.append(Frame(function=f["func"].strip(), file=loc, line=None, native=True))
    flush()
    return threads


_FH_THREAD = re.compile(
    r"^(?P<cur>Current thread|Thread) (?P<id>0x[0-9a-fA-F]+)(?: \[(?P<name>[^\]]*)\])?"
    r" \(most recent call first\):\s*$"
)
_FH_STACK = re.compile(r"^Stack \(most recent call first\):\s*$")
_FH_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+|\?\?\?) in (?P<func>.*?)\s*$')


def parse_faulthandler(text: str) -> list[ThreadStack]:
    """Parse a `faulthandler` dump (``Thread 0x... (most recent call first):`` blocks, ``Current
    thread`` marking the one that ran the handler) into threads, innermost frame first.

    If the text holds several dumps (the worker's file grows with each SIGUSR1), only the last is kept.
    """
    blocks: list[list[ThreadStack]] = [[]]
    cur: ThreadStack | None = None
    frames: list[Frame] = []
    after_current = False  # the last header was "Current thread": the dump's last block

    def flush() -> None:
        if cur is not None:
            blocks[-1].append(cur.model_copy(update={"frames": list(frames)}))

    for line in text.splitlines():
        m = _FH_THREAD.match(line)
        if m or _FH_STACK.match(line):
            flush()
            if after_current:  # a dump ends with the current thread: this header starts the next dump
                blocks.append([])
            after_current = m is None or m["cur"] == "Current thread"
            cur = ThreadStack(thread=m["id"] if m else "", name=(m["name"] or "") if m else "", active=False)
            frames = []
            continue
        f = _FH_FRAME.match(line)
        if f and cur is not None:
            ln = f["line"]
            frames.append(Frame(function=f["func"], file=f["file"], line=int(ln) if ln.isdigit() else None))
    flush()
    return blocks[-1]


# ---- collection ----------------------------------------------------------------------------------------


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s.lower().startswith("error") or "failed" in s.lower() or "denied" in s.lower():
            return s[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _catches_signal(pid: int, sig: int) -> bool | None:
    """Whether the process has a handler for `sig` (from /proc/PID/status SigCgt); None if unknown."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)", text, re.MULTILINE)
    if not m:
        return None
    return bool(int(m[1], 16) >> (sig - 1) & 1)


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _write(path: Path, text: str) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)
    except OSError as e:
        log.warning("could not write %s: %s", path, e)
        return ""


def faulthandler_dump(
    rank: int, pid: int, run_dir: RunDir, *, wait: float = FAULTHANDLER_WAIT_S, reason: str = ""
) -> tuple[StackSample | None, CollectorRun]:
    """Ask a worker for its faulthandler dump (SIGUSR1) and parse what it appends to its file."""
    t0 = time.monotonic()
    path = run_dir.faulthandler_file(rank)

    def fail(error: str, advice: str = "") -> tuple[StackSample | None, CollectorRun]:
        return None, CollectorRun(
            name="faulthandler",
            rank=rank,
            ok=False,
            seconds=time.monotonic() - t0,
            error=error,
            advice=advice,
        )

    if _process_gone(pid):
        return fail(f"process {pid} is gone")
    if _catches_signal(pid, FAULTHANDLER_SIGNAL) is False:
        return fail(
            f"process {pid} does not handle SIGUSR1 (no faulthandler registered); not signalled, "
            "since that would kill it",
            "start workers through repro.engines.worker, which registers faulthandler on SIGUSR1",
        )
    before = _file_size(path)
    try:
        os.kill(pid, FAULTHANDLER_SIGNAL)
    except ProcessLookupError:
        return fail(f"process {pid} is gone")
    except PermissionError as e:
        return fail(f"cannot signal process {pid}: {e}", "run vdiag as the workers' user")
    deadline = time.monotonic() + wait
    last, stable_since = before, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(_POLL_S)
        size = _file_size(path)
        if size != last:
            last, stable_since = size, time.monotonic()
        elif size > before and time.monotonic() - stable_since >= _STABLE_S:
            break
    size = _file_size(path)
    if size == before:
        return fail(f"no faulthandler dump appeared in {path} within {wait:g} s")
    try:
        with open(path, "rb") as fh:
            if size > before:
                fh.seek(before)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as e:
        return fail(f"cannot read {path}: {e}")
    threads = parse_faulthandler(text)
    if not threads:
        return fail(f"no thread stacks in the faulthandler dump {path}")
    artifact = _write(run_dir.stack_file(rank), redact_text(text))
    sample = StackSample(
        rank=rank,
        pid=pid,
        source="faulthandler",
        threads=threads,
        warning=FAULTHANDLER_WARNING.format(reason=reason or "see collectors"),
    )
    return sample, CollectorRun(
        name="faulthandler", rank=rank, ok=True, seconds=time.monotonic() - t0, artifact=artifact or str(path)
    )


def _pyspy(pid: int, native: bool, timeout: float) -> tuple[str, str, float]:
    """Run py-spy dump once. Returns (status, text, seconds): status is ok | denied | gone | failed."""
    argv = ["py-spy", "dump", "--pid", str(pid)]
    if native:
        argv.append("--native")
    res = run_tool(argv, timeout=timeout, attach=True)
    text = res.output
    if res.returncode == 0 and parse_pyspy(res.stdout):
        return "ok", res.stdout, res.seconds
    if looks_like_ptrace_denied(text):
        return "denied", text, res.seconds
    if _process_gone(pid) or re.search(r"no such process|failed to find process", text, re.IGNORECASE):
        return "gone", text, res.seconds
    return "failed", text, res.seconds


def collect_stack(
    rank: int, pid: int, run_dir: RunDir, *, timeout: float = 10.0, native: bool = True
) -> tuple[StackSample | None, list[CollectorRun]]:
    """One rank's stacks (see the module docstring). Never raises."""
    runs: list[CollectorRun] = []
    t0 = time.monotonic()
    reason = ""
    try:
        status, text, _ = _pyspy(pid, native, timeout)
        warning = ""
        source = "py-spy --native" if native else "py-spy"
        if native and status == "failed":
            first = _first_error_line(text) or "no stacks"
            status2, text2, _ = _pyspy(pid, False, timeout)
            if status2 == "ok":
                warning = NATIVE_WARNING.format(reason=first)
                source = "py-spy"
            status, text = status2, (text2 if status2 == "ok" else text + "\n" + text2)
        if status == "ok":
            artifact = _write(run_dir.stack_file(rank), redact_text(text))
            runs.append(
                CollectorRun(
                    name="py-spy", rank=rank, ok=True, seconds=time.monotonic() - t0, artifact=artifact
                )
            )
            return StackSample(
                rank=rank, pid=pid, source=source, threads=parse_pyspy(text), warning=warning
            ), runs
        error = redact_text(_first_error_line(text) or f"py-spy gave no stacks for process {pid}")
        advice = ""
        if status == "denied":
            advice = ptrace_advice("py-spy")
            reason = "ptrace denied"
        elif status == "gone":
            reason = "process gone"
        else:
            reason = error
        runs.append(
            CollectorRun(
                name="py-spy", rank=rank, ok=False, seconds=time.monotonic() - t0, error=error, advice=advice
            )
        )
        if status == "gone":
            return None, runs
    except ToolMissing as e:
        reason = "py-spy not installed"
        runs.append(
            CollectorRun(
                name="py-spy",
                rank=rank,
                ok=False,
                seconds=time.monotonic() - t0,
                error=str(e),
                advice=e.advice,
            )
        )
    except ToolTimeout as e:
        reason = f"py-spy timed out after {e.timeout:g} s"
        runs.append(
            CollectorRun(name="py-spy", rank=rank, ok=False, seconds=time.monotonic() - t0, error=str(e))
        )
    except Exception as e:  # a collector never raises: record it
        log.exception("py-spy collector failed for rank %d", rank)
        reason = f"py-spy collector error: {e}"
        runs.append(
            CollectorRun(
                name="py-spy", rank=rank, ok=False, seconds=time.monotonic() - t0, error=redact_text(repr(e))
            )
        )
    try:
        sample, run = faulthandler_dump(rank, pid, run_dir, reason=reason)
    except Exception as e:
        log.exception("faulthandler fallback failed for rank %d", rank)
        sample, run = None, CollectorRun(name="faulthandler", rank=rank, ok=False, seconds=0.0, error=repr(e))
    runs.append(run)
    return sample, runs


def collect_stacks(
    pids: dict[int, int],
    run_dir: RunDir,
    *,
    timeout: float = 10.0,
    native: bool = True,
    max_workers: int = 8,
) -> tuple[list[StackSample], list[CollectorRun]]:
    """Stacks of every rank ({rank: pid}), collected in parallel, each py-spy call under `timeout`.

    Returns the samples (one per rank that gave any, sorted by rank) and every collector attempt.
    """
    if not pids:
        return [], []
    samples: list[StackSample] = []
    runs: list[CollectorRun] = []
    with ThreadPoolExecutor(
        max_workers=max(1, min(max_workers, len(pids))), thread_name_prefix="vdiag-stacks"
    ) as ex:
        futures = {
            rank: ex.submit(collect_stack, rank, pid, run_dir, timeout=timeout, native=native)
            for rank, pid in sorted(pids.items())
        }
        for rank, fut in futures.items():
            try:
                sample, rruns = fut.result()
            except Exception as e:  # collect_stack does not raise; belt and braces
                sample, rruns = (
                    None,
                    [CollectorRun(name="py-spy", rank=rank, ok=False, seconds=0.0, error=repr(e))],
                )
            if sample is not None:
                samples.append(sample)
            runs.extend(rruns)
    return samples, runs
