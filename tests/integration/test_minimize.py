"""`vdiag minimize` with real torchrun workers: the result still hangs and is 1-minimal.

The starting scenario hangs because of a token-count divergence on rank 1 at capture size 16, layer 0.
It also carries an irrelevant 0.1 s delay on rank 0, 4 layers and 4 capture sizes. The minimal scenario
must keep only the divergence, 1 layer and size 16; the test then runs it for real (it hangs) and runs
every single-element removal for real (none hangs). About 9 runs of 7-15 s each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repro.bisect.minimize import ddmin, single_removals

START = """\
# A hang with noise around it.
name: toy-minimize
model: {preset: llama-3.1-70b, num_layers: 4}
parallel: {tp: 2, pp: 1}
capture: {sizes: [32, 16, 8, 4]}
fusion: {allreduce_rms: "on", oneshot: vllm, workspace_group: tp}
backend: sim
faults:
  - kind: token_divergence
    rank: 1
    tokens: 1
    at: {phase: capture, size: 16, layer: 0, sub: 0}
  - kind: delay
    rank: 0
    seconds: 0.1
    at: {phase: capture, size: 8, layer: 1}
expect: hang
"""


def vdiag(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("vdiag")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "repro.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


@pytest.mark.slow
def test_minimize_ends_on_a_1_minimal_scenario_that_still_hangs(tmp_path: Path) -> None:
    start = tmp_path / "toy-minimize.yaml"
    start.write_text(START)
    out = tmp_path / "issue" / "toy-minimize-min.yaml"
    p = vdiag(["minimize", str(start), "--out", str(out), "--reports", str(tmp_path / "reports"),
               "--gpu-state", "none"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == str(out)
    runs = int(lines[1].split()[0])
    assert lines[1] == f"{runs} runs" and 2 <= runs <= 12
    assert f"found in {runs} runs" in p.stderr

    text = out.read_text()
    assert text.startswith(f"# Minimal reproducer found by `vdiag minimize` from {start} in {runs} runs")
    data = yaml.safe_load(text)
    assert data["name"] == "toy-minimize-min" and data["expect"] == "hang"
    assert data["model"]["num_layers"] == 1
    assert data["capture"]["sizes"] == [16]  # only the size the fault targets
    assert [f["kind"] for f in data["faults"]] == ["token_divergence"]  # the delay is gone
    assert data["parallel"]["tp"] == 2 and data["parallel"]["pp"] == 1
    log = next((tmp_path / "reports").glob("*-minimize-toy-minimize/minimize.md")).read_text()
    assert log.count("\n| ") == runs  # the header row, then one row per candidate run

    # it still hangs, for real
    p = vdiag(["run", str(out), "--reports", str(tmp_path / "check"), "--no-live", "--gpu-state", "none",
               "--check-expect"], tmp_path)
    assert p.returncode == 0, p.stderr

    # and it cannot lose any single element without losing the hang, for real
    removals = single_removals(data)
    assert [what for what, _ in removals] == ["drop fault token_divergence on rank 1"]  # nothing else can go
    for i, (what, cand) in enumerate(removals):
        f = tmp_path / f"removal-{i}.yaml"
        f.write_text(yaml.safe_dump(cand, sort_keys=False))
        p = vdiag(["run", str(f), "--reports", str(tmp_path / "check"), "--no-live", "--gpu-state", "none"],
                  tmp_path)
        assert p.returncode == 0, f"{what}: still reproduces (exit {p.returncode})\n{p.stderr}"


def test_minimize_refuses_a_scenario_that_does_not_hang(tmp_path: Path) -> None:
    start = tmp_path / "clean.yaml"
    data = yaml.safe_load(START)
    data["faults"] = data["faults"][1:]  # only the 0.1 s delay: a clean start-up
    start.write_text(yaml.safe_dump(data))
    p = vdiag(["minimize", str(start), "--reports", str(tmp_path / "reports"), "--gpu-state", "none"], tmp_path)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith(f"vdiag: error: {start}: the original scenario does not hang (clean")


def test_single_removals_cover_every_element_and_keep_faults_on_their_ranks() -> None:
    data = yaml.safe_load(START)
    data["parallel"] = {"tp": 4, "pp": 2}
    data["faults"][1]["rank"] = 5  # stage 1, TP rank 1
    got = dict(single_removals(data))
    assert set(got) == {
        "drop fault token_divergence on rank 1", "drop fault delay on rank 5",
        "drop capture size 32", "drop capture size 16", "drop capture size 8", "drop capture size 4",
        "layers 4 -> 3", "TP 4 -> 2",  # PP 2 -> 1 would lose the rank of the delay fault
    }
    assert got["TP 4 -> 2"]["faults"][1]["rank"] == 3  # stage 1, TP rank 1 on the smaller layout
    assert got["TP 4 -> 2"]["faults"][0]["rank"] == 1


def test_ddmin_finds_a_1_minimal_subset() -> None:
    calls: list[list[int]] = []

    def needs_3_and_7(xs: list[int]) -> bool:
        calls.append(xs)
        return 3 in xs and 7 in xs

    assert ddmin(list(range(10)), needs_3_and_7, allow_empty=False) == [3, 7]
    assert ddmin([1, 2, 3], lambda xs: True, allow_empty=True) == []
    assert ddmin([5], lambda xs: bool(xs), allow_empty=False) == [5]
