"""The torchrun entry point of one rank: `python -m repro.engines.worker --run-dir DIR`.

It ties its life to its parent, sends its own stderr to the run folder, registers a faulthandler dump
on SIGUSR1 (the stack fallback where ptrace is refused), writes `hello`, runs the scenario's hook,
then hands over to the scenario's engine (repro/engines/replay or repro/engines/vllm).
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import importlib
import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from repro.records import ErrorEvent, HelloEvent

if TYPE_CHECKING:  # the rank ties itself to its parent before anything heavier than the stdlib is imported
    from repro.backends.gpu_reference import DeviceChoice
    from repro.events import LaunchLogWriter
    from repro.scenario import Scenario

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


def _apply_hook(sc: Scenario, rank: int) -> Scenario:
    """Run the scenario's hook (`module:function`), which returns dotted overrides for this rank."""
    from repro.scenario import Scenario, apply_overrides

    if not sc.hook:
        return sc
    mod_name, _, fn_name = sc.hook.partition(":")
    fn = getattr(importlib.import_module(mod_name), fn_name or "configure")
    overrides = fn(scenario=sc.model_dump(mode="json"), rank=rank) or {}
    if not overrides:
        return sc
    data = apply_overrides(sc.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return Scenario.model_validate(data)


def start_rank(run_dir: Path, rank: int) -> tuple[Scenario, LaunchLogWriter, DeviceChoice] | int:
    """What every engine's rank does first: this rank's device, the `hello` record, the scenario's hook.

    Returns the scenario (after the hook), the launch log and the device; or the exit code 3 where the
    hook failed (a crash unrelated to the hang, recorded as an `error` record)."""
    from repro.backends.gpu_reference import select_device
    from repro.events import LaunchLogWriter
    from repro.layout import place
    from repro.scenario import Scenario

    sc = Scenario.model_validate(json.loads((run_dir / "scenario.json").read_text()))
    log = LaunchLogWriter(run_dir / "launch" / f"rank{rank}.jsonl", rank)
    me = place(rank, sc.parallel.tp, sc.parallel.pp)
    gpu = select_device(sc.backend, rank)  # GPU backends: this rank's GPU (local rank modulo GPUs), made current
    log.emit(HelloEvent(
        rank=rank, pid=os.getpid(), host=socket.gethostname(), pp_stage=me.pp_stage, tp_rank=me.tp_rank,
        backend=sc.backend, device=os.environ.get("VDIAG_DEVICE", gpu.device),
        device_index=int(os.environ["VDIAG_DEVICE_INDEX"]) if "VDIAG_DEVICE_INDEX" in os.environ else gpu.nvml_index,
        gpu_name=gpu.name, shared_gpu=gpu.shared,
    ))
    try:
        sc = _apply_hook(sc, rank)
    except Exception as e:  # the code under test failed to import or run: a crash unrelated to the hang
        log.emit(ErrorEvent(rank=rank, where="hook", error=f"{type(e).__name__}: {e}"))
        traceback.print_exc()
        return 3
    return sc, log, gpu


def run_engine(run_dir: Path, rank: int) -> int:
    """Start the rank, then hand over to the scenario's engine: the replay, or real vLLM."""
    started = start_rank(run_dir, rank)
    if isinstance(started, int):
        return started
    sc, log, gpu = started
    if sc.engine == "vllm":  # real vLLM instead of the replay; it sets up torch.distributed itself
        from repro.engines.vllm.runner import run_rank_vllm

        return run_rank_vllm(run_dir, rank, sc, log)
    from repro.engines.replay.replay import run_rank

    return run_rank(run_dir, rank, sc, log, gpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="repro.engines.worker")
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

    try:
        return run_engine(run_dir, rank)
    finally:
        cupti_trace.stop()


if __name__ == "__main__":
    sys.exit(main())
