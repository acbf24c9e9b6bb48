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
    rdzv_id: str | None = None  # must be the same on every node (multi-node); see docs/multinode.md

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
        # Port 0: the c10d store binds a free port itself (as `torchrun --standalone` does), so no
        # other process can take the port between choosing it and binding it.
        endpoint = self.node.rdzv_endpoint or "127.0.0.1:0"
        rdzv_id = (self.node.rdzv_id or os.environ.get("VDIAG_RDZV_ID", self.token)) if self.node.multi else self.token
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
            "-m", "repro.engines.worker", "--run-dir", str(self.run_dir.root),
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


# ---- multi-node: the node's place from SLURM (docs/multinode.md) -----------------------------------------

SLURM_DEFAULT_PORT = 29400  # torchrun's c10d default; MASTER_PORT overrides it


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[07-09,12],login1" -> "gpu07", "a[1-2]-b[3-4]" -> "a1-b3"."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    out, i = "", 0
    while i < len(first):
        if first[i] == "[":
            close = first.index("]", i)
            out += first[i + 1 : close].split(",")[0].split("-")[0]
            i = close + 1
        else:
            out += first[i]
            i += 1
    return out


def node_from_slurm(env: dict[str, str] | None = None) -> NodeSpec | None:
    """This node's NodeSpec inside an `srun` step over several nodes, or None outside one.

    SLURM_NNODES and SLURM_NODEID give the node count and this node's index; the endpoint is
    MASTER_ADDR:MASTER_PORT when both are set, else the first host of SLURM_JOB_NODELIST on MASTER_PORT
    (default 29400); the rendezvous id is "slurm-JOBID.STEPID", the same on every node of the step.
    Raises ValueError when the step runs more than one vdiag per node.
    """
    e = dict(os.environ) if env is None else env
    step = e.get("SLURM_STEP_ID", e.get("SLURM_STEPID"))
    if not e.get("SLURM_JOB_ID") or step is None or "SLURM_NODEID" not in e:
        return None
    nnodes = int(e.get("SLURM_NNODES", e.get("SLURM_JOB_NUM_NODES", "1")) or 1)
    if nnodes <= 1:
        return None
    ntasks = int(e.get("SLURM_NTASKS", str(nnodes)) or nnodes)
    if ntasks != nnodes or e.get("SLURM_LOCALID", "0") != "0":
        raise ValueError(
            f"this srun step runs {ntasks} tasks on {nnodes} nodes: vdiag starts torchrun itself, so run one "
            "vdiag per node (srun --nodes N --ntasks-per-node 1 vdiag run ...)"
        )
    port = e.get("MASTER_PORT") or str(SLURM_DEFAULT_PORT)
    host = e.get("MASTER_ADDR") or first_slurm_host(e.get("SLURM_JOB_NODELIST", e.get("SLURM_NODELIST", "")))
    if not host:
        raise ValueError("SLURM_JOB_NODELIST is empty and MASTER_ADDR is not set: no rendezvous endpoint")
    return NodeSpec(nnodes=nnodes, node_rank=int(e["SLURM_NODEID"]), rdzv_endpoint=f"{host}:{port}",
                    rdzv_id=f"slurm-{e['SLURM_JOB_ID']}.{step}")


def resolve_node(
    nnodes: int | None, node_rank: int | None, rdzv_endpoint: str | None, rdzv_id: str | None,
    env: dict[str, str] | None = None,
) -> NodeSpec:
    """The node's place from the command line, else from SLURM (inside an srun step), else one node.

    Flags win over SLURM's variables; `--nnodes 1` turns SLURM's detection off. A multi-node run with no
    rendezvous id gets one from VDIAG_RDZV_ID or the endpoint, which every node shares.
    """
    e = dict(os.environ) if env is None else env
    spec = None if nnodes is not None else node_from_slurm(e)
    if spec is None:
        spec = NodeSpec(nnodes=nnodes or 1, node_rank=node_rank or 0, rdzv_endpoint=rdzv_endpoint or None,
                        rdzv_id=rdzv_id or None)
    else:
        if node_rank is not None:
            spec.node_rank = node_rank
        spec.rdzv_endpoint = rdzv_endpoint or spec.rdzv_endpoint
        spec.rdzv_id = rdzv_id or spec.rdzv_id
    if spec.multi and not spec.rdzv_id:
        spec.rdzv_id = e.get("VDIAG_RDZV_ID") or "vdiag-" + "".join(
            c if c.isalnum() else "-" for c in (spec.rdzv_endpoint or "")
        )
    return spec
