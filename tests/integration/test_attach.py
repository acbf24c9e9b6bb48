"""`vdiag attach` on processes the test started itself (vdiag did not launch them): a hung torchrun gloo job
with ptrace refused, a vLLM-shaped process tree for the rank inference, and pids that cannot be attached."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, vdiag_bin, wait_for
from tests.integration.test_watch import JOBS, Done, alive, env, torchrun

NOBODY_PREFIX = "setpriv --reuid=65534 --regid=65534 --clear-groups"


def attach(args: list[str], reports: Path, extra_env: dict[str, str] | None = None) -> Done:
    e = env()
    e.update(extra_env or {})
    p = subprocess.run([*vdiag_bin(), "attach", "--reports", str(reports), "--quiet", *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env=e)
    return Done(p.returncode, p.stdout, p.stderr, reports)


def _end(proc: subprocess.Popen[bytes]) -> None:
    kids = []
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kids, timeout=5)


@pytest.fixture(scope="module")
def hung_gloo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("gloo") / "out.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(torchrun("gloo_skip.py"), stdout=f, stderr=subprocess.STDOUT, env=env(),
                                start_new_session=True)
    try:
        wait_for(lambda: log.read_text(errors="replace").count("warm-up 3/3") >= 2, 90, "the job to reach the hang")
        time.sleep(1.0)
        yield proc
    finally:
        _end(proc)


def test_attach_with_ptrace_refused_says_what_it_still_saw_and_how_to_grant_it(
    hung_gloo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    if os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists():
        pytest.skip("needs root and setpriv to run py-spy as another user")
    pids = [hung_gloo.pid, *(c.pid for c in psutil.Process(hung_gloo.pid).children(recursive=True))]
    d = attach(["--tree", str(hung_gloo.pid)], tmp_path, {"VDIAG_COLLECTOR_PREFIX": NOBODY_PREFIX})
    assert d.rc == 1, d.stderr
    rep = d.report
    assert rep["stacks"] == []  # py-spy as nobody may not ptrace root's workers; no faulthandler in them
    assert rep["analysis"]["verdict"]["cls"] == "host-wait"  # from CPU activity alone
    md = d.markdown
    assert "ptrace was refused" in md and "CPU activity per process" in md
    assert "SYS_PTRACE" in md and "ptrace_scope" in md
    assert alive(pids) == pids  # attach never kills


@contextlib.contextmanager
def vllm_tree(tmp_path: Path, shape: str) -> Iterator[subprocess.Popen[bytes]]:
    """tests/integration/jobs/vllm_tree.py in the given shape ("api": serve -tp 2 -pp 2, "offline": TP=1),
    running until the test is done; then ended with everything it started."""
    ready = tmp_path / "ready" / "tree"
    ready.parent.mkdir()
    proc = subprocess.Popen([sys.executable, str(JOBS / "vllm_tree.py"), shape, str(ready)], env=env(),
                            start_new_session=True)
    try:
        wait_for(ready.exists, 60, f"the vLLM-shaped tree ({shape})")
        yield proc
    finally:
        _end(proc)


def test_attach_names_vllm_processes_by_their_titles(tmp_path: Path) -> None:
    with vllm_tree(tmp_path, "api") as proc:
        d = attach(["--tree", str(proc.pid), "--sample-s", "1"], tmp_path / "reports")
        procs = d.report["observed"]["processes"]
        roles = sorted(p["identity"]["role"] for p in procs)
        assert roles == ["api-server", "engine-core", "worker", "worker", "worker", "worker"]
        workers = {p["identity"]["title"]: p["identity"] for p in procs if p["identity"]["role"] == "worker"}
        assert set(workers) == {"VLLM::Worker_PP0_TP0", "VLLM::Worker_PP0_TP1", "VLLM::Worker_PP1_TP0",
                                "VLLM::Worker_PP1_TP1"}
        w = workers["VLLM::Worker_PP1_TP0"]
        assert (w["pp_rank"], w["tp_rank"], w["rank"]) == (1, 0, 2)
        assert "inferred from the process title" in w["sources"]["rank"]
        api = next(p for p in procs if p["identity"]["role"] == "api-server")
        assert api["identity"]["rank"] is None  # not a rank: unknown, not guessed
        assert d.report["tp"] == 2 and d.report["pp"] == 2 and d.report["world_size"] == 4
        assert "inferred: rank 2 is pid" in d.markdown
        assert proc.poll() is None


def test_a_tp1_vllm_job_is_diagnosed_through_its_engine_core_not_its_helpers(tmp_path: Path) -> None:
    """`python job.py` with LLM(...) at TP=1: no process has a rank; the engine core (by its title) is the
    one the diagnosis is about, and multiprocessing's resource tracker is a helper, not a rank."""
    with vllm_tree(tmp_path, "offline") as proc:
        d = attach(["--tree", str(proc.pid), "--sample-s", "1"], tmp_path / "reports")
        procs = d.report["observed"]["processes"]
        roles = {p["pid"]: p["identity"]["role"] for p in procs}
        tracker = [p for p in procs if "resource_tracker" in p["cmdline"]]
        assert len(tracker) == 1 and tracker[0]["identity"]["role"] == "helper"
        assert "resource tracker" in tracker[0]["identity"]["sources"]["role"]
        engine = next(p["pid"] for p in procs if roles[p["pid"]] == "engine-core")
        assert [s["pid"] for s in d.report["stacks"]] == [engine]  # the only process diagnosed
        assert proc.poll() is None


def test_attach_to_a_pid_that_does_not_exist_is_a_one_line_error(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    d = attach([str(p.pid)], tmp_path)
    assert d.rc == 2
    assert d.stderr.count("\n") == 1 and f"pid {p.pid}: no such process" in d.stderr


def test_attach_to_another_users_process_names_the_pid_and_the_fix(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists():
        pytest.skip("needs root and setpriv to run vdiag as another user")
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cmd = [*NOBODY_PREFIX.split(), *vdiag_bin(), "attach", "--reports", str(tmp_path / "r"), str(target.pid)]
        os.chmod(tmp_path, 0o777)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/tmp", env=env())
        assert r.returncode == 3, r.stderr
        assert r.stderr.count("\n") == 1 and f"pid {target.pid}: belongs to user root" in r.stderr
        assert "run vdiag as that user or as root" in r.stderr
    finally:
        target.kill()
        target.wait()


def test_attach_names_the_build_lock_and_its_holder_from_the_os(tmp_path: Path) -> None:
    """A job stalled in a file lock: the report names the lock file and the rank holding it, from /proc/locks,
    and the compiler child that holder waits on; attach leaves the job running."""
    cache = tmp_path / "cache"
    cache.mkdir()
    log = tmp_path / "out.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(torchrun("lock_wait.py"), stdout=f, stderr=subprocess.STDOUT,
                                env={**env(), "JOB_LOCK_DIR": str(cache)}, start_new_session=True)
    try:
        wait_for(lambda: "waiting for the build lock" in log.read_text(errors="replace"), 60, "the lock wait")
        time.sleep(1.0)
        pids = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        d = attach(["--tree", str(proc.pid)], tmp_path / "reports")
        assert d.rc == 1, d.stderr
        rep = d.report
        [held] = rep["locks"]
        assert held["path"].endswith("module.lock") and held["holder_rank"] == 0
        assert any("cat" in c["cmdline"] for c in held["children"])
        jit = next(h for h in rep["analysis"]["hypotheses"] if h["key"] == "jit-lock")
        assert jit["status"] == "supported"
        assert any("module.lock is held" in e and "by rank 0" in e for e in jit["evidence_for"]), jit
        assert alive(pids) == pids  # attach never kills
    finally:
        _end(proc)

