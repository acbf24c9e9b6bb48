"""Shared helpers: run the real `vdiag` CLI and check that nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

# Every record vdiag writes must be one its models know: an unknown field is an error in the whole suite
# (this process, the vdiag CLI it starts and their torchrun workers), not silently dropped.
os.environ["VDIAG_STRICT_RECORDS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


def vdiag_bin() -> list[str]:
    exe = Path(sys.executable).with_name("vdiag")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "repro.cli"]


@dataclass
class VdiagRun:
    rc: int
    stdout: str
    stderr: str
    reports: Path

    @property
    def run_dir(self) -> Path:
        dirs = sorted(p for p in self.reports.iterdir() if p.is_dir())
        assert dirs, f"no run folder under {self.reports}; stderr:\n{self.stderr}"
        return dirs[-1]

    @property
    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.run_dir / "report.json").read_text())
        return data

    @property
    def markdown(self) -> str:
        return (self.run_dir / "report.md").read_text()


def run_vdiag(args: list[str], reports: Path, *, env: dict[str, str] | None = None, timeout: float = 240) -> VdiagRun:
    full_env = dict(os.environ)
    full_env.update(env or {})
    reports.mkdir(parents=True, exist_ok=True)
    cmd = [*vdiag_bin(), *args]
    if args and args[0] == "run":
        cmd += ["--reports", str(reports), "--no-live"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    return VdiagRun(p.returncode, p.stdout, p.stderr, reports)


def leftovers(run_dir: Path) -> list[str]:
    """Processes of this run still alive, and vdiag shared-memory names."""
    out = []
    needle = str(run_dir)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if needle in " ".join(p.info["cmdline"] or []):
                out.append(f"pid {p.pid}: {' '.join(p.info['cmdline'])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def shm_names(token_prefix: str = "vdiag-") -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(token_prefix)}


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    return tmp_path / "reports"


@pytest.fixture(scope="session")
def session_reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session-reports")


def pyspy_available() -> bool:
    return shutil.which("py-spy") is not None or Path(sys.executable).with_name("py-spy").exists()
