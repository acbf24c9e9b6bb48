"""Worker replay of vLLM's start-up on one rank.

Order, as in vLLM's GPU worker: the fused op's workspace, a profiling `_dummy_run`, kernel warm-up, then
the CUDA-graph capture loop over the capture sizes, largest first. Every forward runs each decoder layer's
two all-reduce + residual + RMSNorm calls (after attention, after the MLP). PP stages make up their
intermediate tensors locally, as `_dummy_run` does: no send/recv, so stages run concurrently.

Before each launch the rank appends a record to its launch log and flushes it, so the call that hangs is
on disk. After each call it checks the result against the locally computed expectation; the result
record carries the call's own duration (call_s), the check left out.
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from repro import checking
from repro.backends.base import Backend, CallSpec, WorkspaceInfo
from repro.backends.gpu_reference import DeviceChoice
from repro.checking import Outputs
from repro.engines.replay.faults import FaultBook
from repro.events import LaunchLogWriter
from repro.kernel_launch import launch_config
from repro.layout import place, tp_groups
from repro.records import DoneEvent, ErrorEvent, LaunchEvent, PhaseEvent, ResultEvent, WorkspaceEvent
from repro.scenario import WORKSPACE_MAX_TOKENS, Scenario, choose_oneshot

# Cap on the workspace rows (the sim keeps them in /dev/shm); the scenario refuses larger fused calls up front.
SIM_MAX_TOKENS = WORKSPACE_MAX_TOKENS


def _make_backend(
    sc: Scenario, rank: int, tp_group: Any, tp_ranks: tuple[int, ...], max_tokens: int, gpu_nccl: bool = False
) -> Backend:
    if sc.backend == "sim":
        from repro.backends.sim import SimBackend

        return SimBackend(
            rank=rank, tp=sc.parallel.tp, pp=sc.parallel.pp, tp_group=tp_group, tp_ranks=tp_ranks,
            run_token=os.environ.get("VDIAG_RUN_TOKEN", f"{os.getppid()}"), max_tokens=max_tokens,
            width=sc.payload_width(),
        )
    if sc.backend == "nccl":
        import torch

        if torch.cuda.is_available():  # CUDA tensors: NCCL where each rank has a GPU, else gloo
            from repro.backends.gpu_reference import GpuReferenceBackend

            return GpuReferenceBackend(tp_group=tp_group, tp_ranks=tp_ranks, dtype=sc.model.dtype, nccl=gpu_nccl)
        from repro.backends.reference import ReferenceBackend

        return ReferenceBackend(tp_group=tp_group, tp_ranks=tp_ranks)
    if sc.backend == "flashinfer":
        fi_backend = importlib.import_module("repro.backends.flashinfer")
        backend: Backend = fi_backend.make(sc, rank, tp_group, tp_ranks, max_tokens)
        return backend
    raise ValueError(f"backend {sc.backend!r} cannot run in a worker")


def run_rank(run_dir: Path, rank: int, sc: Scenario, log: LaunchLogWriter, gpu: DeviceChoice) -> int:
    """The replay on one rank, after the worker entry (repro.engines.worker) wrote `hello` and ran the hook."""
    import torch.distributed as dist

    tp, pp = sc.parallel.tp, sc.parallel.pp
    me = place(rank, tp, pp)
    from repro import cupti_trace
    from repro.backends.gpu_reference import host_backend

    pg_backend = host_backend(gpu)  # gloo, or cpu:gloo,cuda:nccl where each rank has its own GPU
    dist.init_process_group(pg_backend, timeout=datetime.timedelta(hours=2))
    groups = {}
    for ranks in tp_groups(tp, pp):
        groups[ranks] = dist.new_group(list(ranks), backend=pg_backend)
    tp_group = groups[me.tp_group]
    fused_wanted = sc.fusion_enabled()
    max_fused = sc.fusion_max_token_num()
    capture_sizes = sc.capture.ordered()
    faults = FaultBook(sc.faults, rank, log)
    # Every rank sizes its workspace alike: FlashInfer's max_token_num is vLLM's fusion limit.
    max_tokens = min(max_fused, SIM_MAX_TOKENS)
    backend = _make_backend(sc, rank, tp_group, me.tp_group, max_tokens, gpu_nccl=pg_backend != "gloo")
    width = sc.payload_width()
    shape = sc.model
    gamma = checking.gamma(width)
    checker = checking.Checker(group=me.pp_stage, tp=tp, n_groups=pp, width=width, eps=shape.rms_eps,
                               dtype="fp32" if sc.backend == "sim" else shape.dtype)

    # 1. the fused op's workspace
    log.emit(PhaseEvent(rank=log.rank, phase="workspace"))
    ws = WorkspaceInfo(ok=False, rendezvous_group=(), tp_group=me.tp_group)
    if fused_wanted:
        if faults.fire("jit_lock"):
            # This rank's JIT cache is cold and the module's source sits on a mount that never answers:
            # the real build (repro/engines/replay/jit_build.py) then never finishes, and its lock is never released.
            from repro.engines.replay import jit_build

            cache = jit_build.cache_dir(run_dir)
            jit_build.dead_source(cache)
            jit_build.build_and_load(cache)
        ws = backend.create_workspace(sc.fusion.workspace_group)
        if faults.workspace_fails():
            # vLLM logs a warning and silently falls back to the unfused path on this rank.
            ws = WorkspaceInfo(False, ws.rendezvous_group, ws.tp_group, ws.peers, ws.peer_owner_ranks,
                               error="injected: workspace creation failed; falling back to the unfused path")
        log.emit(WorkspaceEvent(
            rank=log.rank, ok=ws.ok, backend=sc.backend, rendezvous_group=tuple(ws.rendezvous_group),
            tp_group=tuple(ws.tp_group), peers=tuple(ws.peers), peer_owner_ranks=tuple(ws.peer_owner_ranks),
            fallback=not ws.ok, error=ws.error,
        ))
    use_fused = fused_wanted and ws.ok
    ws_id = ws.ident if ws.ok else None

    state = {"call": 0, "seq": 0, "wrong": 0}
    check_s = [0.0]  # time spent checking, reported in the done record (bench/run_bench.py)
    check_on = os.environ.get("VDIAG_CHECK", "1") != "0"  # off: bench/run_bench.py measures what checking costs

    def one_call(phase: str, size: int, layer: int, sub: int, graph: bool = False) -> None:
        call = state["call"]
        state["call"] += 1
        seq = state["seq"]
        state["seq"] += 1
        for f in faults.hits("delay", phase, size, layer, sub, call):
            time.sleep(f.seconds)
        tokens = size
        for f in faults.hits("token_divergence", phase, size, layer, sub, call):
            tokens = max(1, size + f.tokens)
        for f in faults.hits("flag_offset", phase, size, layer, sub, call):
            backend.offset_flag(f.offset)
        fused = use_fused and tokens <= max_fused
        record: dict[str, Any] = dict(
            seq=seq, call=call, phase=phase, size=size, layer=layer, sub=sub,
            op="fused" if fused else "unfused", token_num=tokens, hidden=shape.hidden_size, dtype=shape.dtype,
        )
        x = checking.contribution(me.pp_stage, me.tp_rank, tp, call, tokens, width)
        res = checking.residual(me.pp_stage, call, tokens, width)
        if fused:
            oneshot = choose_oneshot(sc.fusion.oneshot, tokens, shape.hidden_size, shape.elem_bytes, tp,
                                     sc.device.sm_version)
            for f in faults.hits("protocol_mismatch", phase, size, layer, sub, call):
                oneshot = f.mode == "oneshot"
            dev: dict[str, int] = dict(
                sm_count=sc.device.sm_count, sm_version=sc.device.sm_version,
                max_registers_per_block=sc.device.max_registers_per_block,
                regs_per_thread=sc.device.regs_per_thread, max_cluster_size=sc.device.max_cluster_size,
            )
            attrs = getattr(backend, "launch_attrs", None)  # GPU backends: this device, this kernel's registers
            if attrs is not None:
                dev.update(attrs(oneshot))
            lc = launch_config(
                token_num=tokens, hidden=shape.hidden_size, elem_bytes=shape.elem_bytes, oneshot=oneshot,
                nranks=tp, pattern=sc.fusion.pattern, dtype=shape.dtype, fp32_acc=sc.fusion.fp32_acc, **dev,
            )
            spec = CallSpec(token_num=tokens, oneshot=oneshot, launch=lc, eps=shape.rms_eps, dtype=shape.dtype,
                            phase=phase, seq=seq, graph=graph)
            record.update(oneshot=oneshot, grid=lc.grid, block=lc.block, cluster=lc.cluster, ws=ws_id)
            if graph:
                record["graph"] = True
            call_args = getattr(backend, "call_args", None)  # the arguments actually passed to the launcher
            if call_args is not None:
                record["args"] = call_args(spec)
            log.emit(LaunchEvent(rank=log.rank, **record))
            cupti_trace.set_call(seq, graph)
            t_call = time.perf_counter()
            outs = backend.fused(x, res, gamma, spec)
        else:
            log.emit(LaunchEvent(rank=log.rank, **record))
            cupti_trace.set_call(seq, graph)
            t_call = time.perf_counter()
            outs = backend.unfused(x, res, gamma, shape.rms_eps)
        call_s = round(time.perf_counter() - t_call, 6)
        if not check_on:
            log.emit(ResultEvent(rank=log.rank, seq=seq, ok=True, kind="unchecked", call_s=call_s))
            return
        t0 = time.perf_counter()
        res_out, norm_out = outs
        # The CPU backends' outputs come packed: one product digests both (checking.Outputs)
        r = checker.check(res_out, norm_out, call, outs.packed if type(outs) is Outputs else None)
        check_s[0] += time.perf_counter() - t0
        if r.ok:  # the record's defaults say the rest (records.ResultEvent)
            log.emit(ResultEvent(rank=log.rank, seq=seq, ok=True, call_s=call_s))
            return
        state["wrong"] += 1
        log.emit(ResultEvent(rank=log.rank, seq=seq, ok=False, max_err=round(r.max_err, 6), n_wrong=r.n_wrong,
                             first_wrong=r.first_wrong, kind=r.kind, detail=r.detail, call_s=call_s))

    def forward(phase: str, size: int, graph: bool = False) -> None:
        for layer in range(shape.num_layers):
            one_call(phase, size, layer, 0, graph)
            one_call(phase, size, layer, 1, graph)

    try:
        log.emit(PhaseEvent(rank=log.rank, phase="profile", size=sc.capture.max_num_batched_tokens))
        forward("profile", sc.capture.max_num_batched_tokens)
        log.emit(PhaseEvent(rank=log.rank, phase="warmup", size=capture_sizes[0]))
        forward("warmup", capture_sizes[0])
        for i, size in enumerate(capture_sizes):
            log.emit(PhaseEvent(rank=log.rank, phase="capture", index=i, total=len(capture_sizes), size=size))
            for _ in range(sc.capture.warmup_steps):
                forward("capture", size)
            forward("capture", size, graph=True)  # the captured run: a CUDA graph on GPU backends, replayed once
        log.emit(PhaseEvent(rank=log.rank, phase="capture", index=len(capture_sizes), total=len(capture_sizes)))
        log.emit(PhaseEvent(rank=log.rank, phase="finish"))
        dist.barrier()
        log.emit(DoneEvent(rank=log.rank, calls=state["call"], wrong_calls=state["wrong"],
                           check_s=round(check_s[0], 4) if check_on else None))
    except Exception as e:
        log.emit(ErrorEvent(rank=log.rank, where="replay", error=f"{type(e).__name__}: {e}"))
        traceback.print_exc(file=sys.stderr)
        return 1
    finally:
        backend.close()
    log.close()
    dist.destroy_process_group()
    return 0
