"""Parsing /proc/locks (repro/collectors/locks.py): held locks with their device and inode, waiters left out."""

from __future__ import annotations

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
