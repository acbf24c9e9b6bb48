"""What happens to the processes: a worker killed, Ctrl-C, vdiag itself killed, ptrace refused, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil

from tests.conftest import ROOT, SCENARIOS, leftovers, run_vdiag, shm_names, vdiag_bin, wait_for

LONG_CLEAN = ["--set", "model.num_layers=80", "--set", "capture.sizes=default"]


def _start(args: list[str], reports: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full = dict(os.environ)
    full.update(env or {})
    reports.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*vdiag_bin(), "run", *args, "--reports", str(reports), "--no-live"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=full)


def _run_dir(reports: Path) -> Path:
    wait_for(lambda: any(p.is_dir() for p in reports.iterdir()), 30, "the run folder")
    return next(p for p in reports.iterdir() if p.is_dir())


def _worker_pids(run_dir: Path, world: int) -> dict[int, int]:
    def ready() -> bool:
        for r in range(world):
            f = run_dir / "launch" / f"rank{r}.jsonl"
            if not f.exists() or '"ev":"result"' not in f.read_text():
                return False
        return True

    wait_for(ready, 90, "every rank to complete a call")
    pids = {}
    for r in range(world):
        first = (run_dir / "launch" / f"rank{r}.jsonl").read_text().splitlines()[0]
        pids[r] = json.loads(first)["pid"]
    return pids


def test_a_killed_worker_is_reported_as_a_crash(reports: Path) -> None:
    p = _start([str(SCENARIOS / "llama70b-pp2-tp2-fusion-tpgroup.yaml"), *LONG_CLEAN], reports)
    try:
        rd = _run_dir(reports)
        pids = _worker_pids(rd, 4)
        os.kill(pids[2], signal.SIGKILL)
        _out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 4, err
    rep = json.loads((rd / "report.json").read_text())
    assert rep["watchdog"]["cls"] == "crash"
    crashed = rep["watchdog"]["crashed"][0]
    assert crashed["rank"] == 2 and crashed["signal"] == "SIGKILL"
    assert "rank 2 (pp 1, tp 0) died (SIGKILL)" in (rd / "report.md").read_text()
    assert leftovers(rd) == []


def test_ctrl_c_cleans_up_and_keeps_what_was_collected(reports: Path) -> None:
    before = shm_names()
    p = _start([str(SCENARIOS / "llama70b-pp2-tp2-fusion-tpgroup.yaml"), *LONG_CLEAN], reports)
    try:
        rd = _run_dir(reports)
        _worker_pids(rd, 4)
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert leftovers(rd) == []
    assert shm_names() <= before
    assert (rd / "launch" / "rank0.jsonl").stat().st_size > 0
    md = (rd / "report.md").read_text()
    assert "interrupted" in md
    assert "**interrupted: the run was stopped by Ctrl-C (SIGINT) before a verdict**" in md
    assert "timeout: the run did not finish" not in md


def test_killing_vdiag_itself_takes_the_workers_with_it(reports: Path) -> None:
    before = shm_names()
    p = _start([str(SCENARIOS / "llama70b-pp2-tp2-fusion-tpgroup.yaml"), *LONG_CLEAN], reports)
    rd = _run_dir(reports)
    pids = _worker_pids(rd, 4)
    p.kill()
    p.wait(timeout=10)
    wait_for(lambda: not any(psutil.pid_exists(x) and psutil.Process(x).status() != psutil.STATUS_ZOMBIE
                             for x in pids.values()), 15, "the workers to die with vdiag")
    wait_for(lambda: leftovers(rd) == [], 15, "torchrun to exit")
    assert shm_names() <= before
    # no report was written, but the folder's records still render one
    assert not (rd / "report.json").exists()
    again = run_vdiag(["report", str(rd)], reports)
    assert again.rc == 0, again.stderr
    rep = json.loads((rd / "report.json").read_text())
    assert rep["watchdog"]["cls"] == "interrupted" and rep["watchdog"]["interrupted_by"] == "killed"
    assert rep["exit_code"] == 137
    assert all(r["calls_done"] > 0 for r in rep["ranks"])
    assert "rebuilt by `vdiag report`" in (rd / "report.md").read_text()


def test_ptrace_denied_run_still_reports_stacks_and_how_to_grant_it(reports: Path) -> None:
    """The collector really runs as another unprivileged user: the kernel refuses ptrace."""
    env = {"VDIAG_COLLECTOR_PREFIX": "setpriv --reuid=65534 --regid=65534 --clear-groups"}
    r = run_vdiag(["run", str(SCENARIOS / "mech-missing-peer.yaml")], reports, env=env)
    assert r.rc == 1, r.stderr
    rep = r.report
    sources = {s["rank"]: s["source"] for s in rep["stacks"]}
    assert sources == {0: "faulthandler", 1: "faulthandler"}
    frames0 = " ".join(f["function"] for t in rep["stacks"][0]["threads"] for f in t["frames"])
    assert "_oneshot" in frames0 or "relax" in frames0
    md = r.markdown
    assert "SYS_PTRACE" in md and "ptrace_scope" in md
    assert rep["analysis"]["verdict"]["cls"] == "spin-deadlock"
    assert (r.run_dir / "launch" / "rank0.jsonl").exists()


def test_secrets_in_the_environment_and_command_line_never_reach_the_report(reports: Path) -> None:
    secret_env = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    secret_arg = "sk-proj-0123456789abcdefABCDEF"
    env = {"HF_TOKEN": secret_env, "MY_SERVICE_API_KEY": "plain-value-123456", "VLLM_API_KEY": secret_arg}
    r = run_vdiag(["run", str(SCENARIOS / "mech-missing-peer.yaml"),
                   "--set", f"description=started with --api-key {secret_arg} and HF_TOKEN={secret_env}"],
                  reports, env=env)
    assert r.rc == 1, r.stderr
    for path in r.run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json", ".txt", ".yaml", ".jsonl", ".log"):
            text = path.read_text(errors="replace")
            for s in (secret_env, secret_arg, "plain-value-123456"):
                assert s not in text, f"{s} leaked into {path}"
    assert "HF_TOKEN" in (r.run_dir / "env.json").read_text()
