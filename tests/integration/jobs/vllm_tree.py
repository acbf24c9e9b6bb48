"""A process tree shaped like `vllm serve -tp 2 -pp 2`: the API server starts the engine core, which starts
four workers (`offline`: `python job.py` with LLM(...) at TP=1, whose front end starts one engine core that
runs the model itself, next to multiprocessing's resource tracker). Each child is started with vLLM's process title as its argv[0] and its kernel name set with
prctl(PR_SET_NAME), as setproctitle does. The workers carry no RANK (vLLM's multiprocessing executor does
not set one); a ready file is written once the whole tree is up, then everything waits on a pipe."""

import ctypes
import os
import subprocess
import sys
import time


def set_comm(title: str) -> None:
    libc = ctypes.CDLL(None)
    libc.prctl(15, title.encode()[:15], 0, 0, 0)


def child(title: str, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    exe = os.readlink("/proc/self/exe")  # sys.executable is empty when argv[0] is a title
    return subprocess.Popen([title, os.path.abspath(__file__), *args], executable=exe, env=env)


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else "api"
    ready = sys.argv[2] if len(sys.argv) > 2 else ""
    if role == "offline":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # the real helper process, as vLLM's multiprocessing start-up has
        engine = child("VLLM::EngineCore", "worker", ready)
        deadline = time.time() + 30
        while time.time() < deadline and ready and not os.listdir(os.path.dirname(ready)):
            time.sleep(0.05)
        if ready:
            open(ready, "w").close()
        engine.wait()
    elif role == "api":
        set_comm("VLLM::APIServer")
        engine = child("VLLM::EngineCore", "engine", ready)
        engine.wait()
    elif role == "engine":
        set_comm("VLLM::EngineCore")
        workers = [child(f"VLLM::Worker_PP{pp}_TP{tp}", "worker", ready) for pp in range(2) for tp in range(2)]
        deadline = time.time() + 30
        while time.time() < deadline and ready and len(os.listdir(os.path.dirname(ready))) < 4:
            time.sleep(0.05)
        if ready:
            open(ready, "w").close()
        for w in workers:
            w.wait()
    else:
        set_comm(sys.argv[0][:15])
        if ready:
            open(f"{ready}.{os.getpid()}", "w").close()
        r, _ = os.pipe()
        os.read(r, 1)  # idle forever, like a worker waiting for its next request


if __name__ == "__main__":
    main()
