"""`vdiag bisect --repo` over a history shaped like vLLM's, with the built-in `hook: vllm-source`.

The repository (tests/vllm_shaped.py) is written by the test: its commits add, remove and restore the PP
gate of the fused all-reduce + RMSNorm pass, pass the TP group to FlashInfer's workspace creation, and move
the FlashInfer pin into and out of the versions that rendezvous the workspace over WORLD. Nothing of it is
imported: each step reads the checkout's source, and the sim replays what it decided with real torchrun
workers. The hang is the workspace-aliasing race of the sim's Lamport protocol (PP=2 TP=2, workspace over
WORLD): it is flaky (about 3 runs in 4 at this size on two cores), so the search is the flake-aware one,
at confidence 0.99 (simulated on these ranges: no wrong commit in 1000 bisects at a rate of 0.6 or 0.75).
Each range has one commit between its ends, the culprit right after the good end, which a failing run
settles fast; the search over longer ranges is measured in bench/run_bench.py (bisect, bisect-real).

Runtime: each real run takes 5-14 s on two cores; each bisect below takes 4-9 runs (simulated p90).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm_shaped import HISTORY, make_history

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = """\
name: seed-vllm-source
model: {preset: llama-3.1-70b, num_layers: 24}
parallel: {tp: 2, pp: 2}
capture: {sizes: [16, 8, 4], mode: FULL, warmup_steps: 1}
fusion: {allreduce_rms: "on", oneshot: vllm, workspace_group: world}
backend: sim
hook: vllm-source
"""


@pytest.fixture(scope="module")
def vllm_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("vllm-history")
    repo = root / "vllm"
    return repo, make_history(repo)


def _state(repo: Path) -> tuple[str, str, str]:
    def g(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True).stdout
    return g("rev-parse", "HEAD"), g("worktree", "list", "--porcelain"), g("status", "--porcelain", "--ignored")


def _bisect(repo: Path, good: str, bad: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    sc = tmp_path / "seed.yaml"
    sc.write_text(SCENARIO)
    reports = tmp_path / "reports"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "repro.cli", "bisect", str(sc), "--repo", str(repo), "--good", good, "--bad", bad,
         "--search", "bayes", "--confidence", "0.99", "--reports", str(reports), "--gpu-state", "none"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900,
    )
    dirs = list(reports.glob("*-bisect-*"))
    assert len(dirs) == 1, (dirs, p.stderr)
    return p, json.loads((dirs[0] / "bisect.json").read_text())


def _check_log(data: dict, shas: list[str]) -> None:
    steps = data["steps"]
    assert [s["role"] for s in steps[:2]] == ["good end", "bad end"]
    for s in steps:
        assert s["reads"], s  # every step says what it read
        if s["verdict"] == "skip":
            continue
        gate, call, pin, group = s["reads"][:4]
        assert gate.startswith("fusion gate: ") and "(vllm/config/vllm.py:" in gate
        assert call.startswith("workspace group argument: ") and "vllm/compilation/collective_fusion.py:" in call
        assert pin.startswith("FlashInfer pin: ") and "(requirements/cuda.txt:4: " in pin
        assert group.startswith("workspace group: ") and "(computed: " in group
    for s in steps[1:]:
        assert s["posterior"] and abs(sum(p for _, p in s["posterior"]) - 1.0) < 1.0  # top candidates after it
    assert data["policy"]["confidence"] == 0.99 and data["search"] == "bayes"
    post = re.search(r"posterior of the first bad item: ([0-9.]+) \(confidence 0.99\)", " ".join(data["notes"]))
    assert post and float(post.group(1)) >= 0.99


def test_bisect_names_the_pin_bump_that_moved_flashinfer_into_the_world_window(
        vllm_repo: tuple[Path, list[str]], tmp_path: Path) -> None:
    repo, shas = vllm_repo
    before = _state(repo)
    p, data = _bisect(repo, shas[1], shas[3], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0] == f"first bad commit: {shas[2]} {HISTORY[2][0]}"
    assert "requirements/cuda.txt | 2 +-" in p.stdout
    assert _state(repo) == before
    _check_log(data, shas)
    culprit_runs = [s for s in data["steps"] if s["rev"] == shas[2]]
    assert culprit_runs and all("FlashInfer pin: 0.6.11.post2" in s["reads"][2] for s in culprit_runs)
    assert all("workspace group: world" in s["reads"][3] for s in culprit_runs)
    good_end = data["steps"][0]
    assert "workspace group: tp" in good_end["reads"][3] and "0.6.8.post1 is outside 0.6.10 to 0.6.14" in \
        good_end["reads"][3]
    md = (Path(data["log_dir"]) / "bisect.md").read_text()
    assert "posterior after (top candidates)" in md and "## What each step read from its checkout" in md


def test_bisect_names_the_commit_that_removed_the_pp_gate(
        vllm_repo: tuple[Path, list[str]], tmp_path: Path) -> None:
    repo, shas = vllm_repo
    before = _state(repo)
    p, data = _bisect(repo, shas[6], shas[8], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0] == f"first bad commit: {shas[7]} {HISTORY[7][0]}"
    assert _state(repo) == before
    _check_log(data, shas)
    assert "fusion gate: off" in data["steps"][0]["reads"][0]
    assert "its PP condition is at line" in data["steps"][0]["reads"][0]
    culprit = next(s for s in data["steps"] if s["rev"] == shas[7])
    assert "fusion gate: on" in culprit["reads"][0] and "it has no PP condition" in culprit["reads"][0]
