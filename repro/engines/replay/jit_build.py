"""A JIT build the way FlashInfer does one: a file lock per module, the compiler as a child process.

FlashInfer's `JitSpec.build_and_load` takes `filelock.FileLock` on `<cache>/<module>.lock`, builds the module
if its shared object is missing (ninja and nvcc as child processes), then loads it. Every rank of a host
shares the cache, so while one rank builds, the others wait inside filelock's acquire loop.

Here the build step is a real child process too: the stand-in compiler (`cat`, which reads the module's
source and writes the object) is started by the rank that holds the lock, and the rank waits for it.
Nothing here loops on purpose. The `jit_lock` fault only sets up the environment a build can hang in:
the module's source is a FIFO that no process writes (`dead_source`), as a source file on an NFS mount
that stopped answering, so the compiler blocks in open() forever, the holder waits on its compiler
forever, and the other ranks poll the lock forever. The lock, its holder and the compiler are all
visible to the OS (/proc/locks, /proc/PID/fd, the child's command line), which is where
repro/collectors/locks.py finds them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path

import filelock

MODULE = "trtllm_comm"  # the FlashInfer JIT module the fused all-reduce needs
_PR_SET_PDEATHSIG = 1


def cache_dir(run_dir: Path) -> Path:
    """The JIT cache every rank of the run shares (FlashInfer's ~/.cache/flashinfer, per run here)."""
    return run_dir / "jit-cache"


def lock_path(cache: Path, module: str = MODULE) -> Path:
    return cache / f"{module}.lock"


def source_path(cache: Path, module: str = MODULE) -> Path:
    return cache / "src" / f"{module}.cu"


def dead_source(cache: Path, module: str = MODULE) -> Path:
    """Fault `jit_lock`: the module's source is a FIFO with no writer (a mount that never answers)."""
    src = source_path(cache, module)
    src.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkfifo(src, 0o600)
    except FileExistsError:  # another rank of the run made it first
        pass
    return src


def _die_with_parent() -> None:
    """In the compiler child, before exec: end when the rank that started it ends (no orphan left behind)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def compile_module(sources: list[Path], out: Path) -> None:
    """The build step: the compiler reads the sources and writes the object, then the object is moved in place."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as obj:
        subprocess.run(["cat", *(str(s) for s in sources)], stdout=obj, check=True, preexec_fn=_die_with_parent)
    os.replace(tmp, out)


def build_and_load(cache: Path, module: str = MODULE) -> Path:
    """Take the module's build lock, build the module unless it is cached, and return the shared object."""
    cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"{module}.so"
    with filelock.FileLock(str(lock_path(cache, module))):
        if not so.exists():
            compile_module([source_path(cache, module)], so)
    return so
