"""Launch: a real `torchrun` (torch.distributed.run) for the scenario, in its own session, and its teardown.

nproc = tp x pp on one node (or world / nnodes per node), c10d rendezvous on a free local port. The
torchrun process is tied to vdiag with PR_SET_PDEATHSIG, and each worker to torchrun, so a killed vdiag
takes the whole tree with it. Teardown kills every descendant and sweeps the run's /dev/shm names.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from repro.rundir import RunDir

SHM_GLOB = "/dev/shm/vdiag-*"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> None:
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class NodeSpec:
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def multi(self) -> bool:
        return self.nnodes > 1


@dataclass
class Launch:
    run_dir: RunDir
    world_size: int
    node: NodeSpec = field(default_factory=NodeSpec)
    extra_env: dict[str, str] = field(default_factory=dict)
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.token:
            self.token = f"{os.getpid()}-{secrets.token_hex(3)}"

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.node.nnodes

    def command(self) -> list[str]:
        endpoint = self.node.rdzv_endpoint or f"127.0.0.1:{free_port()}"
        rdzv_id = os.environ.get("VDIAG_RDZV_ID", self.token) if self.node.multi else self.token
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(self.node.nnodes),
            "--node-rank", str(self.node.node_rank),
            "--nproc-per-node", str(self.nproc_per_node),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint,
            "--rdzv-id", rdzv_id,
            "--max-restarts", "0",
            "--monitor-interval", "0.2",
            "-m", "repro.worker", "--run-dir", str(self.run_dir.root),
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VDIAG_RUN_TOKEN=self.token,
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            PYTHONUNBUFFERED="1",
            TORCHELASTIC_ERROR_FILE=str(self.run_dir.root / "logs" / "torchelastic_error.json"),
        )
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(self.extra_env)
        return env

    def start(self) -> subprocess.Popen[bytes]:
        self._log = open(self.run_dir.torchrun_log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env(), start_new_session=True, preexec_fn=_pdeathsig,
        )
        return self.proc

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def teardown(self, extra_pids: list[int] | None = None) -> None:
        """End the whole process tree, then remove this run's shared-memory names."""
        procs = self.tree()
        for pid in extra_pids or []:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if p.environ().get("VDIAG_RUN_TOKEN") == self.token:
                    procs.append(p)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.kill()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=5)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
        sweep_shm(self.token)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def sweep_shm(token: str | None = None) -> list[str]:
    """Remove this run's /dev/shm names (or, with no token, those of vdiag processes no longer alive)."""
    removed = []
    for path in glob.glob(SHM_GLOB):
        name = os.path.basename(path)
        parts = name.split("-")
        if token is not None:
            if not name.startswith(f"vdiag-{token}-"):
                continue
        else:
            try:
                owner = int(parts[1])
            except (IndexError, ValueError):
                continue
            if psutil.pid_exists(owner):
                continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def wait_for_exit(launch: Launch, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = launch.returncode()
        if rc is not None:
            return rc
        time.sleep(0.05)
    return None
