"""The merge and `vdiag report --reanalyse` take the one path of repro.diagnose, so a merged or re-analysed
report keeps the evidence a single-node report has: the file locks held (from the jit-lock run's real
/proc/locks collection) and the CUPTI launch checks.

The node folders are the real run folders of one-node runs (shared session fixtures), split by rank as two
nodes would have written them. No GPU here: the CUPTI traces are written in the worker's record format
with the grid, block and cluster of each real launch record, as a driver that agrees would report them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from repro.multinode import make_node_info, write_node_info
from repro.rundir import RunDir
from tests.conftest import VdiagRun, run_vdiag
from tests.integration.test_run_sim import seed  # noqa: F401 (shared fixture)
from tests.integration.test_wait_sites import jit_lock  # noqa: F401 (shared fixture)


def _split(src: Path, out: Path, nodes: list[list[int]], cupti: bool = False) -> list[Path]:
    """The run folder `src` as the folders of len(nodes) nodes, each holding its ranks' records."""
    locks = json.loads((src / "locks.json").read_text()) if (src / "locks.json").exists() else []
    folders = []
    for i, ranks in enumerate(nodes):
        rd = RunDir.create(out, f"node{i}")
        for name in ("scenario.json", "scenario.yaml", "watchdog.json", "env.json"):
            shutil.copy2(src / name, rd.root / name)
        for r in ranks:
            shutil.copy2(src / "launch" / f"rank{r}.jsonl", rd.launch_log(r))
            if (src / "stacks" / f"rank{r}.txt").exists():
                shutil.copy2(src / "stacks" / f"rank{r}.txt", rd.stack_file(r))
            if cupti:
                recs = [json.loads(ln) for ln in rd.launch_log(r).read_text().splitlines() if ln.strip()]
                with open(rd.root / "launch" / f"rank{r}.cupti.jsonl", "w") as f:
                    f.write(json.dumps({"ev": "cupti_status", "ok": True}) + "\n")
                    for e in recs:
                        if e.get("ev") == "launch" and e.get("op") == "fused" and e.get("grid"):
                            f.write(json.dumps({"ev": "cupti_launch", "kernel": e.get("kernel") or
                                                "allreduce_fusion_kernel_oneshot_lamport<...>", "grid": e["grid"],
                                                "block": e["block"], "cluster": e.get("cluster") or [1, 1, 1],
                                                "vdiag_seq": e["seq"]}) + "\n")
        mine = [h for h in locks if h.get("holder_rank") in ranks]
        (rd.root / "locks.json").write_text(json.dumps(mine))
        write_node_info(rd, make_node_info(len(nodes), i, "localhost:1", "job-1", ranks, 0.0, "x"))
        folders.append(rd.root)
    return folders


def _merge(folders: list[Path], reports: Path) -> dict:
    r = run_vdiag(["report", "--merge", *map(str, folders)], reports, timeout=120)
    assert r.rc == 0, r.stderr
    merged = Path(r.stdout.strip().splitlines()[-1]).parent
    data: dict = json.loads((merged / "report.json").read_text())
    data["_dir"] = str(merged)
    return data


def test_a_merged_report_keeps_the_file_locks_the_nodes_collected(jit_lock: VdiagRun, tmp_path: Path) -> None:  # noqa: F811
    single = jit_lock.report
    assert single["locks"], "the jit-lock run found no lock: nothing to merge"
    folders = _split(jit_lock.run_dir, tmp_path, [[0, 1], [2, 3]])
    merged = _merge(folders, tmp_path)
    assert [r["rank"] for r in merged["ranks"]] == [0, 1, 2, 3]
    assert sorted((h["path"], h["holder_pid"]) for h in merged["locks"]) == \
        sorted((h["path"], h["holder_pid"]) for h in single["locks"])
    md = (Path(merged["_dir"]) / "report.md").read_text()
    assert "trtllm_comm.lock" in md
    assert merged["analysis"]["verdict"]["top_hypothesis"] == single["analysis"]["verdict"]["top_hypothesis"]
    # The merged folder stands on its own: re-analysed, it keeps the locks.
    again = run_vdiag(["report", "--reanalyse", merged["_dir"]], tmp_path, timeout=120)
    assert again.rc == 0, again.stderr
    re = json.loads((Path(merged["_dir"]) / "report.json").read_text())
    assert re["locks"] == merged["locks"] and "Nodes: node 0" in re["analysis"]["verdict"]["paragraph"]


def test_a_merged_report_keeps_the_cupti_launch_checks(seed: VdiagRun, tmp_path: Path) -> None:  # noqa: F811
    folders = _split(seed.run_dir, tmp_path, [[0, 1], [2, 3]], cupti=True)
    merged = _merge(folders, tmp_path)
    checks = [c for c in merged["analysis"]["grid_checks"] if "CUPTI observed" in c]
    assert {c.split(":")[0] for c in checks} == {"rank 0", "rank 1", "rank 2", "rank 3"}, checks
    assert all(c.endswith(": agree") for c in checks), checks
    assert "Nodes: node 0" in merged["analysis"]["verdict"]["paragraph"]


def test_reanalyse_runs_the_analysis_again_on_the_stored_records(seed: VdiagRun, tmp_path: Path) -> None:  # noqa: F811
    copy = tmp_path / seed.run_dir.name
    shutil.copytree(seed.run_dir, copy)
    stored = json.loads((copy / "report.json").read_text())
    (copy / "report.md").unlink()
    r = run_vdiag(["report", "--reanalyse", str(copy)], tmp_path, timeout=120)
    assert r.rc == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(copy / "report.md")
    again = json.loads((copy / "report.json").read_text())
    for key in ("exit_code", "ranks", "stacks", "locks", "notes", "placement"):
        assert again[key] == stored[key], key
    assert again["analysis"]["verdict"] == stored["analysis"]["verdict"]
    assert "Rank" in (copy / "report.md").read_text()
    # Without --reanalyse the stored report.json is rendered as it is.
    plain = run_vdiag(["report", str(copy)], tmp_path, timeout=120)
    assert plain.rc == 0, plain.stderr
    assert json.loads((copy / "report.json").read_text())["analysis"] == again["analysis"]
