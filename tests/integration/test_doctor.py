"""`vdiag doctor` for real: it attaches py-spy to a child, signals a faulthandler child, and catches a planted
two-rank deadlock with the whole pipeline. A real ptrace refusal (py-spy run as `nobody`) must be reported
with the advice, and must not stop the diagnosis (stacks then come from faulthandler)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from repro.tools import which
from tests.conftest import run_vdiag, shm_names

NOBODY_PREFIX = "setpriv --reuid=65534 --regid=65534 --clear-groups"


def test_doctor_passes_here_and_catches_the_planted_deadlock(tmp_path: Path) -> None:
    before = shm_names()
    r = run_vdiag(["doctor"], tmp_path, env={"COLUMNS": "200"}, timeout=180)
    assert r.rc == 0, r.stdout + r.stderr
    out = r.stdout
    assert "vdiag doctor" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    for check in ("py-spy", "ptrace", "faulthandler", "NVML", "GPUs", "cuda-gdb", "torch", "flashinfer", "vllm",
                  "/dev/shm", "torchrun", "self-test (sim)", "self-test (GPU)"):
        assert check in rows, f"no {check} row in:\n{out}"
    assert "ok" in rows["ptrace"] and "named its function" in rows["ptrace"]
    assert "ok" in rows["self-test (sim)"]
    assert "spin-deadlock" in out and "missing-peer" in out
    from repro.run import gpu_count

    if gpu_count() == 0:  # skipped with a note, not failed
        assert "skip" in rows["self-test (GPU)"] and "no GPU on this machine" in rows["self-test (GPU)"]
    assert "vdiag can catch and diagnose a start-up hang on this machine" in out
    assert shm_names() - before == set()  # the self-test cleaned up after itself


def test_doctor_reports_a_real_ptrace_refusal_with_the_fix(tmp_path: Path) -> None:
    if os.geteuid() != 0 or which("setpriv") is None:
        pytest.skip("needs root and setpriv to run py-spy as another user")
    r = run_vdiag(["doctor", "--json"], tmp_path, env={"VDIAG_COLLECTOR_PREFIX": NOBODY_PREFIX}, timeout=180)
    data = json.loads(r.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    ptrace = checks["ptrace"]
    assert ptrace["status"] == "warn"
    assert "ptrace denied" in ptrace["detail"]
    assert "--cap-add SYS_PTRACE" in ptrace["fix"] and "kernel.yama.ptrace_scope" in ptrace["fix"]
    # Still diagnosable: the fallback works and the planted deadlock is caught with faulthandler stacks.
    assert checks["faulthandler"]["status"] == "ok"
    selftest = checks["self-test (sim)"]
    assert selftest["status"] == "ok", selftest
    assert "faulthandler" in selftest["detail"] and "missing-peer" in selftest["detail"]
    assert r.rc == 0 and data["exit_code"] == 0
    assert "1 warning" in data["summary"]


def test_doctor_table_spells_out_the_ptrace_fix(tmp_path: Path) -> None:
    if os.geteuid() != 0 or which("setpriv") is None:
        pytest.skip("needs root and setpriv to run py-spy as another user")
    r = run_vdiag(["doctor", "--no-selftest"], tmp_path, env={"VDIAG_COLLECTOR_PREFIX": NOBODY_PREFIX}, timeout=120)
    assert r.rc == 0, r.stdout + r.stderr
    fix = next(line for line in r.stdout.splitlines() if line.startswith("warn: ptrace:"))
    assert "--cap-add SYS_PTRACE" in fix and "kernel.yama.ptrace_scope=0" in fix
