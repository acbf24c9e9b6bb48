"""The torchrun entry point of one rank: `python -m repro.worker --run-dir DIR`.

It ties its life to its parent, sends its own stderr to the run folder, registers a faulthandler dump
on SIGUSR1 (the stack fallback where ptrace is refused), then hands over to the replay.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
FAULTHANDLER_SIGNAL = signal.SIGUSR1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before we could tie ourselves to it
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="repro.worker")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    _die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir)
    err = open(run_dir / "logs" / f"rank{rank}.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(err.fileno(), 2)
    os.dup2(err.fileno(), 1)
    sys.stderr = err
    sys.stdout = err
    fh = open(run_dir / "stacks" / f"rank{rank}.faulthandler.txt", "w")  # noqa: SIM115
    faulthandler.register(FAULTHANDLER_SIGNAL, file=fh, all_threads=True, chain=False)
    faulthandler.enable(file=err)

    from repro import cupti_trace

    if cupti_trace.enabled():  # VDIAG_CUPTI=1: launch configurations from the driver, before each launch
        reason = cupti_trace.start_in_worker(run_dir, rank)
        if reason:
            print(f"vdiag: {reason}", file=sys.stderr, flush=True)

    from repro.replay import run_rank

    try:
        return run_rank(run_dir, rank)
    finally:
        cupti_trace.stop()


if __name__ == "__main__":
    sys.exit(main())
