"""Multi-node runs (docs/multinode.md): one vdiag per node, each watching the ranks torchrun put there.

What a node's `vdiag run` needs beyond one node (the checks, which ranks landed here, its node.json, how
long its hung ranks stay alive for the other nodes' watchdogs), and how a node finds the folders of the
same job's other nodes. Combining the folders into one report is `repro.merge`'s.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from repro.errors import ScenarioError
from repro.records import WatchdogVerdict
from repro.report.format import ranks_text
from repro.rundir import RunDir
from repro.scenario import Scenario
from repro.torchrun import Launch, NodeSpec

NODE_FILE = "node.json"
NODES_FILE = "nodes.json"  # in a merged folder: where each node's records came from
# A note every per-node report carries; the merged report drops it.
NODE_NOTE_PREFIX = "multi-node: node "


class NodeInfo(BaseModel):
    """What a node's `vdiag run` writes to node.json."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    nnodes: int
    node_rank: int
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    host: str = ""
    ranks: list[int] = []
    started_t: float = 0.0
    scenario: str = ""
    collected_t: float = 0.0  # when this node's collectors had finished (0: not yet)


def node_info_path(root: Path) -> Path:
    return root / NODE_FILE


def write_node_info(run_dir: RunDir, info: NodeInfo) -> None:
    node_info_path(run_dir.root).write_text(info.model_dump_json(indent=2) + "\n")


def read_node_info(root: Path) -> NodeInfo | None:
    try:
        return NodeInfo.model_validate_json(node_info_path(root).read_text())
    except (OSError, ValidationError):
        return None


def make_node_info(nnodes: int, node_rank: int, endpoint: str | None, rdzv_id: str | None, ranks: list[int],
                   started_t: float, scenario: str) -> NodeInfo:
    return NodeInfo(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=endpoint or "", rdzv_id=rdzv_id or "",
                    host=socket.gethostname(), ranks=sorted(ranks), started_t=started_t, scenario=scenario)


def node_note(info: NodeInfo) -> str:
    return (
        f"{NODE_NOTE_PREFIX}{info.node_rank} of {info.nnodes} on {info.host}: torchrun's rendezvous gave it "
        f"ranks {ranks_text(info.ranks)}; this report and its verdict cover those ranks only. "
        "Combine every node's folder with `vdiag report --merge DIR...` for the whole job."
    )


MULTINODE_LINGER_S = 5.0


def check_multinode(sc: Scenario, node: NodeSpec, path: str | Path) -> None:
    """What a multi-node run needs beyond one node: an endpoint, and for the sim, node-local TP groups."""
    if not node.rdzv_endpoint:
        raise ScenarioError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the same on every node (node 0's address)")
    if not 0 <= node.node_rank < node.nnodes:
        raise ScenarioError(f"--node-rank {node.node_rank}: must be 0..{node.nnodes - 1} for --nnodes {node.nnodes}")
    per_node = sc.world_size // node.nnodes
    if sc.backend == "sim" and sc.fusion_enabled():
        if per_node % sc.parallel.tp:
            raise ScenarioError(
                f"{path}: the sim shares workspaces through /dev/shm, so each TP group must sit on one node: "
                f"{per_node} ranks per node is not a multiple of tp={sc.parallel.tp}"
            )
        if sc.fusion.workspace_group == "world" and sc.parallel.pp > 1:
            raise ScenarioError(
                f"{path}: fusion.workspace_group: world maps other nodes' buffers, which the sim (CPU shared "
                "memory) cannot reach across nodes; use workspace_group: tp, or run on one node"
            )


def discover_local_ranks(run_dir: RunDir, launch: Launch, timeout: float = 300.0) -> list[int]:
    """The global ranks torchrun started on this node: c10d's rendezvous orders nodes by host name (and
    process id), whatever --node-rank says, so read them from the launch logs the workers open first."""
    deadline = time.monotonic() + timeout
    want = launch.nproc_per_node
    while time.monotonic() < deadline:
        ranks = run_dir.ranks()
        if len(ranks) >= want or launch.returncode() is not None:
            break
        time.sleep(0.1)
    ranks = run_dir.ranks()
    if not ranks:  # nothing started: fall back to the --node-rank block so the watchdog reports it
        first = launch.node.node_rank * want
        return list(range(first, first + want))
    return ranks


def write_run_node_info(
    node: NodeSpec, run_dir: RunDir, ranks: list[int], started: dt.datetime, name: str, collected: bool = False
) -> NodeInfo:
    """This node's node.json: written as soon as its ranks start, again once its collectors have finished."""
    info = make_node_info(node.nnodes, node.node_rank, node.rdzv_endpoint, node.rdzv_id, ranks,
                          started.timestamp(), name)
    if collected:
        info = info.model_copy(update={"collected_t": time.time()})
    write_node_info(run_dir, info)
    return info


def linger_for_other_nodes(launch: Launch, wd: WatchdogVerdict, info: NodeInfo, reports_dir: Path) -> None:
    """Keep this node's hung ranks alive a little after its verdict, so that the other nodes' watchdogs
    see the same hang rather than the job ending under them when this node tears down. Ends early once
    every other node has collected its evidence, as seen beside this folder (a shared reports folder)."""
    if not wd.is_hang:
        return
    deadline = wd.verdict_t + min(wd.stall_s, 10.0) + MULTINODE_LINGER_S
    while time.time() < deadline and launch.returncode() is None:
        if other_nodes_collected(reports_dir, info):
            return
        time.sleep(0.2)


def find_node_dirs(reports_dir: Path, info: NodeInfo, window_s: float = 600.0,
                   collected_only: bool = False, any_state: bool = False) -> dict[int, Path]:
    """The folders of this job's nodes under reports_dir (same rendezvous id and scenario, started close
    together), the closest in time per node: those with a complete report, or with `collected_only`,
    those whose collectors have finished, or with `any_state`, every one."""
    found: dict[int, tuple[float, Path]] = {}
    for nf in reports_dir.glob(f"*/{NODE_FILE}"):
        other = read_node_info(nf.parent)
        if other is None or other.rdzv_id != info.rdzv_id or other.scenario != info.scenario:
            continue
        done = any_state or (other.collected_t > 0 if collected_only else (nf.parent / "report.json").exists())
        if abs(other.started_t - info.started_t) > window_s or not done:
            continue
        best = found.get(other.node_rank)
        dist = abs(other.started_t - info.started_t)
        if best is None or dist < best[0]:
            found[other.node_rank] = (dist, nf.parent)
    return {k: v[1] for k, v in sorted(found.items())}


def other_nodes_collected(reports_dir: Path, info: NodeInfo) -> bool:
    """Whether every other node of this job has its verdict and evidence, seen beside this node's folder."""
    found = find_node_dirs(reports_dir, info, collected_only=True)
    return all(k in found for k in range(info.nnodes) if k != info.node_rank)


def merged_nodes_text(root: Path) -> str:
    """In a merged folder: which node ran which ranks, from its nodes.json ("" in any other folder)."""
    try:
        entries = json.loads((root / NODES_FILE).read_text())
    except (OSError, ValueError):
        return ""
    return nodes_text([(e.get("label", e.get("folder", "")), e.get("ranks", []), e.get("watchdog", ""))
                       for e in entries])


def nodes_text(nodes: list[tuple[str, list[int], str]]) -> str:
    """'Nodes: node 0 (host) ran ranks 0-1 (its watchdog: spin-deadlock); ...' from (label, ranks, class)."""
    return "Nodes: " + "; ".join(f"{label} ran ranks {ranks_text(ranks)} (its watchdog: {cls})"
                                 for label, ranks, cls in nodes) + "."
