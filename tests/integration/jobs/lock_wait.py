"""A torchrun job (vdiag did not write it for itself) that stalls in a build lock, as two ranks that build
the same JIT module do: rank 0 takes the lock with filelock and runs a "compiler" that never finishes (it
opens a FIFO nobody writes, a stand-in for a source on a dead mount); rank 1 waits for the lock in filelock."""

import os
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

cache = Path(os.environ["JOB_LOCK_DIR"])
rank = int(os.environ["RANK"])
lock = FileLock(str(cache / "module.lock"), thread_local=False)
if rank == 0:
    src = cache / "module.cu"
    if not src.exists():
        os.mkfifo(src)
    with lock:
        print("rank 0: building module.cu", flush=True)
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=False)
else:
    time.sleep(1.0)
    print("rank 1: waiting for the build lock", flush=True)
    with lock:
        print("rank 1: got the lock", flush=True)
sys.exit(0)
