"""Each mechanism pinned to where every rank ends up, between real processes (real `vdiag run`, torchrun
workers, py-spy): the Lamport poll, the two-shot barrier, a host collective, a file lock, finished; and
who got wrong data. Runs are shared with tests/integration/test_run_sim.py through its session fixtures.

Where a rank waits is read the way the report reads it: `repro.analysis.where_waiting` on the rank's
py-spy stack, which matches the sim's spin-wait functions and the library modules (filelock, subprocess,
torch.distributed) the frames are in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import filelock
import psutil
import pytest

from repro.analysis import where_waiting
from repro.collectors.locks import find_locks
from repro.records import StackSample
from tests.conftest import SCENARIOS, VdiagRun, leftovers, run_vdiag, wait_for
from tests.integration.test_run_sim import missing_peer, seed, token_divergence  # noqa: F401 (shared fixtures)

LAMPORT = "Lamport poll"
TWOSHOT = "Barrier::sync"
COUNTER = "CTA arrival counter"


def _run(session_reports: Path, name: str) -> VdiagRun:
    return run_vdiag(["run", str(SCENARIOS / f"{name}.yaml")], session_reports / f"waits-{name}")


def sites(run: VdiagRun) -> dict[int, str]:
    """rank -> where it ended: 'finished', or the wait site the analysis reads from its stack."""
    rep = run.report
    stacks = {s["rank"]: StackSample.model_validate(s) for s in rep["stacks"]}
    out = {}
    for r in rep["ranks"]:
        out[r["rank"]] = "finished" if r["state"] == "finished" else where_waiting(stacks.get(r["rank"]))
    return out


def wrong(run: VdiagRun) -> dict[int, dict[str, Any]]:
    return {c["rank"]: c for c in run.report["analysis"]["corruption"]}


def pending(run: VdiagRun, rank: int) -> tuple[Any, ...]:
    p = next(r for r in run.report["ranks"] if r["rank"] == rank)["pending"] or {}
    return p.get("phase"), p.get("size"), p.get("layer"), p.get("sub"), p.get("token_num"), p.get("oneshot")


@pytest.fixture(scope="session")
def protocol_mismatch(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "mech-protocol-mismatch")


@pytest.fixture(scope="session")
def flag_offset(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "mech-flag-offset")


@pytest.fixture(scope="session")
def aliasing(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "mech-workspace-aliasing")


@pytest.fixture(scope="session")
def delay(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "mech-delay")


@pytest.fixture(scope="session")
def jit_lock(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "mech-jit-lock")


def test_token_divergence_rank_with_more_tokens_spins_in_the_lamport_poll_and_its_peer_gets_wrong_data(
    token_divergence: VdiagRun,  # noqa: F811
) -> None:
    s = sites(token_divergence)
    assert LAMPORT in s[0], s  # rank 0 launched 17 tokens: its poll waits for a row its peer never writes
    assert pending(token_divergence, 0) == ("capture", 16, 0, 0, 17, True)
    # Rank 1 (16 tokens) finishes that call. Rank 0's 17th row lands on rank 1's own first row: if it lands
    # after rank 1 wrote its row, rank 1's result is misaligned; if before, rank 1's own write covers it.
    w = wrong(token_divergence)
    assert set(w) <= {1}, w
    if w:
        assert (w[1]["first"]["size"], w[1]["first"]["layer"], w[1]["first"]["sub"]) == (16, 0, 0)
        assert w[1]["kind"] == "misaligned"
    # ...and then waits in the next call's poll for rank 0, which never comes
    assert LAMPORT in s[1] and pending(token_divergence, 1)[:4] == ("capture", 16, 0, 1)


def test_protocol_mismatch_one_rank_in_the_lamport_poll_the_other_in_the_twoshot_barrier(
    protocol_mismatch: VdiagRun,
) -> None:
    assert protocol_mismatch.rc == 1
    s = sites(protocol_mismatch)
    assert LAMPORT in s[0] and TWOSHOT in s[1], s
    assert pending(protocol_mismatch, 0)[-1] is True and pending(protocol_mismatch, 1)[-1] is False
    assert wrong(protocol_mismatch) == {}


def test_missing_peer_spins_in_the_lamport_poll_while_the_fallen_back_rank_waits_in_a_host_all_reduce(
    missing_peer: VdiagRun,  # noqa: F811
) -> None:
    s = sites(missing_peer)
    assert LAMPORT in s[0], s
    assert "host-side all_reduce" in s[1], s
    assert wrong(missing_peer) == {}


def test_flag_offset_both_ranks_poll_different_lamport_buffers(flag_offset: VdiagRun) -> None:
    assert flag_offset.rc == 1
    s = sites(flag_offset)
    assert LAMPORT in s[0] and LAMPORT in s[1], s
    assert pending(flag_offset, 0)[:4] == pending(flag_offset, 1)[:4] == ("capture", 16, 0, 0)


def _fused_span(run: VdiagRun, ranks: range) -> tuple[float, float]:
    ts = [json.loads(x)["t"] for r in ranks
          for x in (run.run_dir / "launch" / f"rank{r}.jsonl").read_text().splitlines() if '"fused"' in x]
    return min(ts), max(ts)


def test_workspace_aliasing_ends_in_the_shared_buffers_protocol_waits_or_in_wrong_data(
    aliasing: VdiagRun, seed: VdiagRun,  # noqa: F811
) -> None:
    """Two TP groups on one set of buffers. A hung rank spins in the Lamport poll (or, for two-shot sizes,
    the two-shot barrier, whose flags the other group also writes), or finished its calls and waits for
    the others at the end; never on its own counter. Which ranks, and whether the run hangs or only gets
    another group's data, is a race (docs/fidelity.md); a run can only be clean if the two groups never
    launched at the same time."""
    for run in (aliasing, seed):
        s = sites(run)
        hung = {r: w for r, w in s.items() if w != "finished"}
        foreign = [c for c in wrong(run).values() if c["kind"] == "foreign_group"]
        if hung:
            assert run.rc == 1
            assert all(LAMPORT in w or TWOSHOT in w or "end-of-start-up barrier" in w for w in hung.values()), s
            assert any(LAMPORT in w or TWOSHOT in w for w in hung.values()), s
        elif foreign:
            assert run.rc == 1 and run.report["analysis"]["verdict"]["cls"] == "corruption"
        else:
            assert run.rc == 0
            (a0, a1), (b0, b1) = _fused_span(run, range(0, 2)), _fused_span(run, range(2, 4))
            assert a1 < b0 or b1 < a0, "a clean run with overlapping groups: the buffers were not shared?"


def test_a_host_stall_is_slow_every_rank_finishes_with_the_right_data(delay: VdiagRun) -> None:
    assert delay.rc == 0, delay.stderr[-2000:]
    assert set(sites(delay).values()) == {"finished"}
    assert wrong(delay) == {}


def test_no_rank_of_any_scenario_waits_on_a_counter_another_process_can_write(
    token_divergence: VdiagRun, protocol_mismatch: VdiagRun, missing_peer: VdiagRun,  # noqa: F811
    flag_offset: VdiagRun, aliasing: VdiagRun, seed: VdiagRun, jit_lock: VdiagRun,  # noqa: F811
) -> None:
    """The CTA arrival counter is rank-private (FlashInfer's flag_ptr): no rank may end up waiting on it,
    and the sim's flag area must lie outside every shared mapping (tests/integration/test_sim_protocol.py)."""
    runs = [token_divergence, protocol_mismatch, missing_peer, flag_offset, aliasing, seed, jit_lock]
    for run in runs:
        s = sites(run)
        assert not [r for r, w in s.items() if COUNTER in w], (run.run_dir.name, s)
        assert all(w for w in s.values()), (run.run_dir.name, s)  # every rank's end is known


# ---- the JIT build lock --------------------------------------------------------------------------------


def test_jit_lock_every_rank_waits_in_filelock_or_on_the_holders_stuck_compiler(jit_lock: VdiagRun) -> None:
    assert jit_lock.rc == 1
    rep = jit_lock.report
    assert rep["analysis"]["verdict"]["cls"] == "host-wait"
    s = sites(jit_lock)
    holders = [r for r, w in s.items() if "child process" in w]
    waiters = [r for r, w in s.items() if w.startswith("a file lock")]
    assert len(holders) == 1 and sorted(holders + waiters) == [0, 1, 2, 3], s
    assert all("filelock's acquire loop" in s[r] for r in waiters)
    # the OS names the same holder: the lock file, its pid and rank, and the compiler it waits for
    (lock,) = rep["locks"]
    assert lock["path"].endswith("jit-cache/trtllm_comm.lock") and lock["kind"] == "FLOCK"
    assert lock["holder_rank"] == holders[0]
    assert lock["holder_pid"] == next(r["pid"] for r in rep["ranks"] if r["rank"] == holders[0])
    (child,) = lock["children"]
    assert child["cmdline"].startswith("cat ") and child["cmdline"].endswith("src/trtllm_comm.cu")
    top = rep["analysis"]["hypotheses"][0]
    assert top["key"] == "jit-lock" and top["status"] == "supported"
    assert f"by rank {holders[0]} (pid {lock['holder_pid']})" in top["evidence_for"][0]
    assert "filelock" in jit_lock.markdown and "trtllm_comm.lock" in jit_lock.markdown
    assert max(rep["watchdog"]["cpu_pct"].values()) < 20
    assert leftovers(jit_lock.run_dir) == []  # the workers and the stuck compiler are gone


_BUILDER = """
import sys
from pathlib import Path
from repro.engines.replay import jit_build
cache = Path(sys.argv[1])
jit_build.dead_source(cache)
print("building", flush=True)
jit_build.build_and_load(cache)
"""


def _family(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [p.pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def test_the_jit_lock_is_a_real_lock_held_by_a_real_process(tmp_path: Path) -> None:
    cache = tmp_path / "jit-cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    a = subprocess.Popen([sys.executable, "-c", _BUILDER, str(cache)], env=env, stdout=subprocess.PIPE, text=True)
    procs = [a]
    try:
        assert a.stdout is not None and a.stdout.readline().strip() == "building"
        wait_for(lambda: find_locks({0: a.pid}) != [] and len(_family(a.pid)) == 2, 30, "the first build to lock")
        b = subprocess.Popen([sys.executable, "-c", _BUILDER, str(cache)], env=env, stdout=subprocess.PIPE, text=True)
        procs.append(b)
        assert b.stdout is not None and b.stdout.readline().strip() == "building"
        (held,) = find_locks({0: a.pid, 1: b.pid})
        assert held.holder_pid == a.pid and held.holder_rank == 0 and held.mode == "WRITE"
        assert Path(held.path) == cache / "trtllm_comm.lock"
        assert held.children[0].cmdline == f"cat {cache / 'src' / 'trtllm_comm.cu'}"
        # a third process cannot take it, neither through filelock nor with flock itself
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(cache / "trtllm_comm.lock"), timeout=0.3).acquire()
        import fcntl

        fd = os.open(cache / "trtllm_comm.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        time.sleep(0.3)
        assert b.poll() is None and len(_family(b.pid)) == 1  # b polls the lock: no compiler of its own
        # the holder dies: its compiler goes with it, the lock is released, and b (which was really
        # contending in filelock) takes it and starts its own build
        compiler = _family(a.pid)[1]
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        wait_for(lambda: not psutil.pid_exists(compiler) or psutil.Process(compiler).status() == "zombie", 10,
                 "the orphaned compiler to end")
        wait_for(lambda: [h.holder_pid for h in find_locks({1: b.pid})] == [b.pid], 10, "b to take the lock")
    finally:
        for p in procs:
            fam = _family(p.pid)
            for pid in reversed(fam):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=10)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(cache) in " ".join(p.info["cmdline"] or [])]
