"""Multi-node on one machine: two `vdiag run` "nodes" meet through torchrun's c10d rendezvous on loopback.

Node 0 is started with flags, node 1 the way `srun` starts it (SLURM variables only), so both ways of
placing a node are exercised. The planted hang spans both nodes: rank 1 (node A) loses its workspace,
rank 0 spins for it, and the other node's ranks 2-3 finish their replay and wait in the final barrier.
Each node reports its own ranks; the merged report names ranks of both.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from repro.torchrun import first_slurm_host, free_port, node_from_slurm, resolve_node
from tests.conftest import ROOT, leftovers, run_vdiag, shm_names, vdiag_bin

SCENARIO = """\
name: mn-missing-peer
model: {preset: llama-3.1-70b, num_layers: 1}
parallel: {tp: 2, pp: 2}
capture: {sizes: [8]}
fusion: {allreduce_rms: "on", oneshot: vllm, workspace_group: tp}
backend: sim
faults:
  - kind: workspace_fail
    rank: 1
expect: hang
"""


def _slurm_env(job: str, node_id: int, port: int) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
        "SLURM_NODEID": str(node_id), "SLURM_LOCALID": "0", "SLURM_PROCID": str(node_id),
        "SLURM_JOB_NODELIST": "localhost,localhost", "MASTER_PORT": str(port),
    }


def test_slurm_variables_place_the_node() -> None:
    assert first_slurm_host("gpu[07-09,12],login1") == "gpu07"
    assert first_slurm_host("rack[2-3]-n[010-011]") == "rack2-n010"
    spec = node_from_slurm(_slurm_env("77", 1, 29555))
    assert spec is not None
    assert (spec.nnodes, spec.node_rank, spec.rdzv_endpoint, spec.rdzv_id) == (2, 1, "localhost:29555", "slurm-77.0")
    with_master = node_from_slurm({**_slurm_env("77", 0, 29555), "MASTER_ADDR": "10.0.0.5"})
    assert with_master is not None and with_master.rdzv_endpoint == "10.0.0.5:29555"
    assert node_from_slurm({"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_NODEID": "0"}) is None  # sbatch, no srun
    with pytest.raises(ValueError, match="one vdiag per node"):
        node_from_slurm({**_slurm_env("77", 0, 1), "SLURM_NTASKS": "16"})
    # Flags win; --nnodes 1 turns SLURM off.
    assert resolve_node(1, None, None, None, env=_slurm_env("77", 1, 1)).nnodes == 1


def test_missing_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    sc = tmp_path / "mn.yaml"
    sc.write_text(SCENARIO)
    r = run_vdiag(["run", str(sc), "--nnodes", "2", "--node-rank", "0"], tmp_path / "reports", timeout=60)
    assert r.rc == 2
    assert "--rdzv-endpoint" in r.stderr


def test_two_nodes_on_loopback_report_a_hang_that_spans_both(tmp_path: Path) -> None:
    sc = tmp_path / "mn.yaml"
    sc.write_text(SCENARIO)
    reports = tmp_path / "reports"
    reports.mkdir()
    port = free_port()
    job = f"{os.getpid()}{port}"
    before = shm_names()
    base = [*vdiag_bin(), "run", str(sc), "--reports", str(reports), "--no-live", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    node0 = subprocess.Popen(
        [*base, "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", f"localhost:{port}",
         "--rdzv-id", f"slurm-{job}.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    node1 = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**env, **_slurm_env(job, 1, port)}, cwd=ROOT)
    try:
        out0, err0 = node0.communicate(timeout=150)
        out1, err1 = node1.communicate(timeout=60)
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                p.kill()
                p.communicate()
    # Both nodes reproduced the hang (exit 1), each from its own ranks.
    assert node0.returncode == 1, err0
    assert node1.returncode == 1, err1
    dirs = {p.name.rsplit("-", 1)[-1]: p for p in reports.iterdir() if p.is_dir()}
    assert set(dirs) == {"node0", "node1", "merged"}, sorted(dirs)
    node_ranks = {}
    for name in ("node0", "node1"):
        info = json.loads((dirs[name] / "node.json").read_text())
        assert info["nnodes"] == 2 and info["rdzv_id"] == f"slurm-{job}.0"
        launch_logs = sorted(p.name for p in (dirs[name] / "launch").glob("rank*.jsonl"))
        assert len(launch_logs) == 2
        node_ranks[name] = info["ranks"]
        rep = json.loads((dirs[name] / "report.json").read_text())
        assert [r["rank"] for r in rep["ranks"]] == info["ranks"]
        assert str(dirs[name] / "report.md") in out0 + out1
    assert sorted(node_ranks["node0"] + node_ranks["node1"]) == [0, 1, 2, 3]
    # The node holding ranks 0-1 saw the spin; the other node's ranks wait in the final barrier, and its
    # watchdog still reported them (idle), rather than seeing the job end under it.
    spin_node = "node0" if 0 in node_ranks["node0"] else "node1"
    wait_node = "node1" if spin_node == "node0" else "node0"
    spin_wd = json.loads((dirs[spin_node] / "watchdog.json").read_text())
    wait_wd = json.loads((dirs[wait_node] / "watchdog.json").read_text())
    assert spin_wd["cls"] == "spin-deadlock" and spin_wd["busy_ranks"] == [0]
    assert wait_wd["cls"] == "host-wait" and wait_wd["idle_ranks"] == [2, 3]
    assert "end-of-start-up barrier" in (dirs[wait_node] / "report.md").read_text()

    # Node 0 merged by itself (shared reports folder); `vdiag report --merge` does the same by hand.
    assert str(dirs["merged"] / "report.md") in out0
    merged_by_hand = run_vdiag(["report", "--merge", str(dirs["node0"]), str(dirs["node1"])], reports, timeout=60)
    assert merged_by_hand.rc == 0, merged_by_hand.stderr
    by_hand = Path(merged_by_hand.stdout.strip().splitlines()[-1]).parent
    assert by_hand.name.endswith("-merged") and by_hand != dirs["merged"]
    for folder in (dirs["merged"], by_hand):
        rep = json.loads((folder / "report.json").read_text())
        assert rep["world_size"] == 4
        assert [r["rank"] for r in rep["ranks"]] == [0, 1, 2, 3]
        assert rep["watchdog"]["cls"] == "spin-deadlock"
        assert rep["watchdog"]["busy_ranks"] == [0] and rep["watchdog"]["idle_ranks"] == [1, 2, 3]
        verdict = rep["analysis"]["verdict"]
        assert verdict["top_hypothesis"] == "missing-peer"
        assert sorted({s["rank"] for s in rep["stacks"]}) == [0, 1, 2, 3]
        md = (folder / "report.md").read_text()
        # The verdict names ranks of both nodes: the spinner, its idle peer, and the other node's waiters.
        for text in ("Rank 0 (pp 0, tp 0) spins", "rank 1 (pp 0, tp 1) is idle", "ranks 2-3 are idle",
                     "Nodes: node 0"):
            assert text in md, text
        assert sorted(p.name for p in (folder / "launch").glob("*.jsonl")) == [f"rank{r}.jsonl" for r in range(4)]
    # Nothing is left behind on the machine.
    for name in ("node0", "node1"):
        assert leftovers(dirs[name]) == []
    assert shm_names() - before == set()
