"""Hold FlashInfer's JIT build lock for one module, as a concurrent build of that module does, until told
to stop (SIGTERM/SIGINT). The lock is FlashInfer's own (`JitSpec.lock_path`, taken with filelock as
`build_and_load` takes it), computed by FlashInfer for this machine's JIT cache, so a vLLM start-up in
the same environment that needs the module waits on the very same lock.

    python3 gpu/hold_flashinfer_lock.py [--module sampling] [--pid-file F]

Prints `holding <path>` once the lock is held. Used with scenarios/vllm-tp1-jit-lock.yaml by
gpu/vllm-validate.sh; the caller that started it ends it (vdiag never does: not its process).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", default="sampling", help="FlashInfer JIT module (default: sampling)")
    ap.add_argument("--pid-file", type=Path)
    a = ap.parse_args()
    import os

    from filelock import FileLock

    if a.module != "sampling":
        print(f"--module {a.module}: only 'sampling' is known here", file=sys.stderr)
        return 2
    from flashinfer.jit.sampling import gen_sampling_module

    spec = gen_sampling_module()
    lock = FileLock(str(spec.lock_path), thread_local=False)
    lock.acquire()
    if a.pid_file:
        a.pid_file.write_text(f"{os.getpid()}\n")
    print(f"holding {spec.lock_path}", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        signal.pause()
    lock.release()
    print("released", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
