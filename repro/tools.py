"""The one wrapper around every external program vdiag runs (py-spy, cuda-gdb, nvidia-smi, git, pip...).

`run_tool` captures output, applies a timeout, and turns the two failures every caller must handle into
typed errors that carry advice: `ToolMissing` (the program is not installed) and `ToolTimeout` (it ran past
its time; its whole process group is killed). Anything else (a non-zero exit, an error message) comes back
in the `ToolResult` for the caller to judge.

Collector prefix
----------------
Commands that attach to other processes (``py-spy dump``, ``cuda-gdb -p``) are run with ``attach=True``.
For those, the environment variable ``VDIAG_COLLECTOR_PREFIX`` (split like a shell command line) is put in
front of the command. It exists so that a test, or a user, can run the collectors under another identity,
for example::

    VDIAG_COLLECTOR_PREFIX="setpriv --reuid=65534 --regid=65534 --clear-groups" vdiag run ...

runs py-spy and cuda-gdb as user ``nobody``, which the kernel does not let ptrace root's workers: the
integration tests use it to make a ptrace refusal real and check vdiag's fallback and advice.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from repro.errors import EnvironmentProblem, ExitCode

COLLECTOR_PREFIX_ENV = "VDIAG_COLLECTOR_PREFIX"

# How to get each tool, shown when it is missing.
INSTALL_ADVICE: dict[str, str] = {
    "py-spy": "pip install py-spy",
    "cuda-gdb": (
        "install the CUDA toolkit's cuda-gdb (e.g. `apt-get install cuda-gdb-12-8`, or the toolkit "
        "runfile) and put its bin directory (usually /usr/local/cuda/bin) on PATH or set CUDA_HOME"
    ),
    "nvidia-smi": "install the NVIDIA driver utilities (nvidia-smi ships with the driver)",
    "git": "install git (e.g. `apt-get install git`)",
    "pip": "python -m ensurepip",
    "setpriv": "install util-linux (it provides setpriv), or unset VDIAG_COLLECTOR_PREFIX",
    "torchrun": "pip install torch",
}

# Seconds between SIGTERM and SIGKILL when a tool runs past its timeout (lets gdb detach cleanly).
KILL_GRACE_S = 1.0


def ptrace_advice(tool: str) -> str:
    """The one-line how-to shown when `tool` was refused ptrace on the workers."""
    return (
        f"{tool} could not attach (ptrace denied): run the container with --cap-add SYS_PTRACE, "
        "or set kernel.yama.ptrace_scope=0 (sysctl), or run vdiag as the workers' user"
    )


_PTRACE_DENIED = re.compile(
    r"permission denied|operation not permitted|\bEPERM\b|ptrace_scope|could not attach to process",
    re.IGNORECASE,
)


def looks_like_ptrace_denied(text: str) -> bool:
    """Whether a collector's output says the kernel refused it ptrace on the target."""
    return bool(_PTRACE_DENIED.search(text))


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    argv: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        """stdout and stderr together (stderr last), for searching messages."""
        if self.stdout and self.stderr:
            return self.stdout.rstrip("\n") + "\n" + self.stderr
        return self.stdout or self.stderr


class ToolMissing(EnvironmentProblem):
    """The program is not installed (or not on PATH / next to the Python interpreter)."""

    exit_code = ExitCode.ENVIRONMENT

    def __init__(self, tool: str, advice: str = "") -> None:
        self.tool = tool
        self.advice = advice or INSTALL_ADVICE.get(Path(tool).name, f"install {tool} and put it on PATH")
        super().__init__(f"{tool} not found: {self.advice}")


class ToolTimeout(EnvironmentProblem):
    """The program ran past its timeout; its process group was killed. Partial output is kept."""

    exit_code = ExitCode.ENVIRONMENT

    def __init__(self, tool: str, timeout: float, stdout: str = "", stderr: str = "") -> None:
        self.tool = tool
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{tool} did not finish within {timeout:g} s (killed)")


def _extra_dirs() -> list[Path]:
    dirs = [Path(sys.executable).parent]  # the venv's bin: py-spy, torchrun (not resolved: keep the venv)
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        dirs.append(Path(cuda_home) / "bin")
    dirs.append(Path("/usr/local/cuda/bin"))
    return dirs


def which(tool: str) -> str | None:
    """Full path of `tool`: PATH first, then next to sys.executable (the venv's bin), then CUDA's bin."""
    if os.sep in tool:
        return tool if os.path.isfile(tool) and os.access(tool, os.X_OK) else None
    found = shutil.which(tool)
    if found:
        return found
    for d in _extra_dirs():
        cand = d / tool
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def collector_prefix() -> list[str]:
    """The command prefix from VDIAG_COLLECTOR_PREFIX (empty when unset), its program resolved to a path."""
    raw = os.environ.get(COLLECTOR_PREFIX_ENV, "").strip()
    if not raw:
        return []
    parts = shlex.split(raw)
    exe = which(parts[0])
    if exe is None:
        raise ToolMissing(parts[0], f"{COLLECTOR_PREFIX_ENV} names {parts[0]!r}, which is not installed")
    return [exe, *parts[1:]]


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after a short grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; make sure nothing else in its group lingers.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return


def run_tool(
    argv: list[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    attach: bool = False,
) -> ToolResult:
    """Run one external program and return its exit status and output.

    argv[0] is looked up with `which` (so the venv's py-spy is found even when the venv is not
    activated). `env` holds variables added to (and overriding) the inherited environment. With
    `attach=True` the VDIAG_COLLECTOR_PREFIX prefix is put in front (see the module docstring).
    The child runs in its own session; on timeout its whole process group is terminated.

    Raises ToolMissing when the program (or the prefix's program) is not installed, ToolTimeout when it
    runs past `timeout`, and EnvironmentProblem when it exists but cannot be started.
    """
    if not argv:
        raise ValueError("run_tool: empty argv")
    tool = argv[0]
    exe = which(tool)
    if exe is None:
        raise ToolMissing(tool)
    full = [exe, *argv[1:]]
    if attach:
        full = [*collector_prefix(), *full]
    child_env = dict(os.environ)
    if env:
        child_env.update(env)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=child_env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise ToolMissing(Path(e.filename).name if e.filename else tool) from e
    except OSError as e:
        raise EnvironmentProblem(f"could not start {tool}: {e}") from e
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=5.0)
        except subprocess.TimeoutExpired:  # something outside the group holds the pipes open
            proc.kill()
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            out, err = "", ""
        raise ToolTimeout(tool, timeout, out or "", err or "") from None
    return ToolResult(
        returncode=proc.returncode,
        stdout=out or "",
        stderr=err or "",
        seconds=time.monotonic() - t0,
        argv=tuple(full),
    )
