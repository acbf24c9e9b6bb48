"""Parsing /proc/locks (repro/collectors/locks.py): held locks with their device and inode, waiters left out."""

from __future__ import annotations

from pathlib import Path

from repro.collectors.locks import parse_proc_locks

SAMPLE = """\
1: FLOCK  ADVISORY  WRITE 7621 fe:00:2146403 0 EOF
1: -> FLOCK  ADVISORY  WRITE 7635 fe:00:2146403 0 EOF
2: POSIX  ADVISORY  READ 812 00:1b:77 0 EOF
3: OFDLCK ADVISORY  WRITE -1 08:01:1234 0 EOF
garbage line
"""


def test_held_locks_are_read_with_pid_device_and_inode_and_blocked_requests_are_skipped() -> None:
    got = parse_proc_locks(SAMPLE)
    assert [(e.kind, e.mode, e.pid, e.dev, e.inode) for e in got] == [
        ("FLOCK", "WRITE", 7621, (0xFE, 0), 2146403),
        ("POSIX", "READ", 812, (0, 0x1B), 77),
        ("OFDLCK", "WRITE", -1, (8, 1), 1234),
    ]


def test_the_holder_of_a_lock_file_a_rank_waits_for_is_named_even_outside_the_job(tmp_path: Path) -> None:
    """filelock closes its file between attempts, so a polling rank has nothing open; the lock file its JIT
    record names still leads to the holder in /proc/locks: here a real process, outside any job, holding it."""
    import subprocess
    import sys
    import time

    from repro.collectors.locks import awaited_lock_files, find_locks

    lock = tmp_path / "cached_ops" / "tmp" / "sampling.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(lock)], stdout=subprocess.PIPE, text=True)
    waiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        jit = tmp_path / "run" / "vllm"
        jit.mkdir(parents=True)  # as repro.engines.vllm.instrument writes it: a build entered, never left
        (jit / "jit-rank0.jsonl").write_text(
            f'{{"t": {time.time()}, "pid": {waiter.pid}, "ev": "enter", "module": "sampling", "lock": "{lock}"}}\n')
        awaited = awaited_lock_files(tmp_path / "run")
        assert awaited == {str(lock): [0]}
        (x,) = find_locks({0: waiter.pid}, awaited=awaited)
        assert (x.path, x.holder_pid, x.holder_rank, x.waiting_ranks) == (str(lock), holder.pid, None, [0])
        assert "FileLock" in x.holder_cmdline and x.kind == "FLOCK"
        assert find_locks({0: waiter.pid}) == []  # without the JIT record nothing ties the waiter to the lock
    finally:
        for p in (holder, waiter):
            p.kill()
            p.wait()
