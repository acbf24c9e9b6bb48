"""Run-time wrappers, installed in the worker before vLLM starts, that write the replay's launch records for
real vLLM + FlashInfer. Nothing in vLLM's or FlashInfer's source is changed: module attributes and class
methods are replaced in this process only, and `uninstall()` puts the originals back.

What is wrapped (see docs/vllm-engine.md for the versions checked):

- FlashInfer's fused all-reduce entry points: `trtllm_allreduce_fusion` (the call vLLM up to 0.16 makes)
  and the unified `allreduce_fusion` (vLLM 0.17 and newer). Each call writes a `launch` record before it
  goes through (token count, hidden size, dtype, one-shot or two-shot, pattern, and the launch
  configuration that FlashInfer's launcher arithmetic gives on this device, `repro.kernel_launch`) and a
  `result` record when it returns.
- Workspace creation: `trtllm_create_ipc_workspace_for_all_reduce_fusion` and the unified
  `create_allreduce_fusion_workspace`. Each writes a `workspace` record: the ranks of the group the
  buffers were rendezvoused over, the rank's TP group, and which rank owns each peer buffer.
- vLLM's start-up: `profile_run`, `compile_or_warm_up_model`, `capture_model` and the capture loops of
  both model runners write `phase` records, with the capture index and total, as the replay does.

Every loaded `flashinfer.*` module that holds one of those functions under its name gets the wrapper, so
`from flashinfer.comm import trtllm_allreduce_fusion`, `flashinfer_comm.allreduce_fusion(...)` and
FlashInfer's internal calls (the unified API calls the legacy one) all go through it. A call made inside
another wrapped call of the same family is not recorded twice.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from repro.events import JIT_FILE, LaunchLogWriter
from repro.kernel_launch import launch_config
from repro.layout import place
from repro.records import (
    ErrorEvent,
    HelloEvent,
    LaunchEvent,
    LogEvent,
    PhaseEvent,
    ResultEvent,
    WorkspaceEvent,
)
from repro.scenario import FLASHINFER_ONESHOT_HEURISTIC_MB, MIB

# Entry points, by the name FlashInfer exports them under.
FUSED_CALLS = ("trtllm_allreduce_fusion", "allreduce_fusion")
WORKSPACE_CALLS = ("trtllm_create_ipc_workspace_for_all_reduce_fusion", "create_allreduce_fusion_workspace")

# AllReduceFusionPattern (flashinfer/comm/trtllm_ar.py) -> repro.kernel_launch pattern names.
PATTERNS = {
    0: "allreduce",
    1: "residual_rmsnorm",
    2: "residual_rmsnorm_fp8",
    3: "residual_rmsnorm_fp4",
    4: "residual_rmsnorm_fp8",
    5: "residual_rmsnorm_fp4",
}
_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


@dataclass
class DeviceFacts:
    """What FlashInfer's launcher reads from the device; the real device's SM count wins when there is one."""

    sm_count: int = 132
    sm_version: int = 90
    max_registers_per_block: int = 65536
    regs_per_thread: int = 64
    max_cluster_size: int = 8
    source: str = "scenario"


@dataclass
class _Progress:
    phase: str = "starting"
    index: int = 0
    total: int = 0
    size: int | None = None
    label: str = ""


@dataclass
class Recorder:
    """Per-process state of the instrumentation: where to write, the rank, the counters."""

    writer: LaunchLogWriter | None
    rank: int
    tp: int
    pp: int
    device: DeviceFacts = field(default_factory=DeviceFacts)
    sync: bool = True
    run_dir: Path | None = None
    progress: _Progress = field(default_factory=_Progress)
    calls: int = 0
    seq: int = 0
    forward_calls: int = 0
    workspaces: dict[int, str] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)
    device_probed: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)

    # ---- writing ---------------------------------------------------------------------------------
    def _ensure_writer(self) -> LaunchLogWriter | None:
        """A forked child (vLLM's mp executor) writes to its own rank's log, announcing its own pid."""
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.rank = _dist_rank(self.rank)
            self.writer = None
            if self.run_dir is not None:
                self.writer = LaunchLogWriter(self.run_dir / "launch" / f"rank{self.rank}.jsonl", self.rank)
                me = place(self.rank, self.tp, self.pp)
                self.writer.emit(HelloEvent(rank=self.rank, pid=os.getpid(), host=os.uname().nodename,
                                            pp_stage=me.pp_stage, tp_rank=me.tp_rank, backend="flashinfer",
                                            device="cuda", device_index=None, engine="vllm"))
        return self.writer

    def emit(self, model: type[LogEvent], /, **fields: Any) -> None:
        """Build a record of `model` for this process's rank and write it (nothing when no log is open)."""
        with self.lock:
            w = self._ensure_writer()
            if w is not None:
                w.emit(model(rank=w.rank, **fields))

    def set_phase(self, phase: str, *, index: int = 0, total: int = 0, size: int | None = None,
                  label: str = "") -> None:
        with self.lock:
            self.progress = _Progress(phase, index, total, size, label)
            self.emit(PhaseEvent, phase=phase, index=index, total=total, size=size, label=label)

    def resume_phase(self, p: _Progress) -> None:
        """Back to the phase that was current before a nested one (workspace creation)."""
        self.set_phase(p.phase, index=p.index, total=p.total, size=p.size, label=p.label)

    # ---- the device ------------------------------------------------------------------------------
    def device_facts(self) -> DeviceFacts:
        if not self.device_probed:
            self.device_probed = True
            torch = _torch()
            with contextlib.suppress(Exception):
                if torch is not None and torch.cuda.is_available():
                    props = torch.cuda.get_device_properties(torch.cuda.current_device())
                    self.device = DeviceFacts(
                        sm_count=int(props.multi_processor_count), sm_version=int(props.major) * 10 + int(props.minor),
                        max_registers_per_block=self.device.max_registers_per_block,
                        regs_per_thread=self.device.regs_per_thread, max_cluster_size=self.device.max_cluster_size,
                        source="cuda device properties",
                    )
        return self.device


_STATE: Recorder | None = None
_TLS = threading.local()
_ORIGINALS: list[tuple[Any, str, Any]] = []
_WRAPPED_ATTR = "__vdiag_wrapped__"


def configure(writer: LaunchLogWriter | None, rank: int, tp: int, pp: int, *, device: DeviceFacts | None = None,
              sync: bool = True, run_dir: Path | None = None) -> Recorder:
    """Set where this process's records go. Call before `install_flashinfer()`/`install_progress()`."""
    global _STATE
    _STATE = Recorder(writer=writer, rank=rank, tp=tp, pp=pp, device=device or DeviceFacts(), sync=sync,
                      run_dir=run_dir)
    return _STATE


def state() -> Recorder | None:
    return _STATE


# ---- helpers ----------------------------------------------------------------------------------------


def _dist_rank(default: int) -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:
        pass
    return default


def _group_ranks(group: Any) -> tuple[int, ...] | None:
    """Global ranks of a torch ProcessGroup (None: the default group, WORLD)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        if group is None or group is dist.group.WORLD:
            return tuple(range(dist.get_world_size()))
        return tuple(int(r) for r in dist.get_process_group_ranks(group))
    except Exception:
        return None


def _backend_group(comm_backend: Any) -> tuple[bool, Any]:
    """(known, group) for a FlashInfer CommBackend: TorchDistBackend keeps its group in `_group`."""
    if comm_backend is None:
        return False, None
    for attr in ("_group", "group"):
        if hasattr(comm_backend, attr):
            return True, getattr(comm_backend, attr)
    return False, None


def _dtype_name(t: Any) -> str:
    return _DTYPE_NAMES.get(str(getattr(t, "dtype", "")), str(getattr(t, "dtype", "?")).replace("torch.", ""))


def _elem_bytes(dtype: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}.get(dtype, 2)


def _shape(t: Any) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in t.shape)
    except Exception:
        return ()


def _pattern_name(code: Any) -> str:
    try:
        return PATTERNS.get(int(code), f"pattern{int(code)}")
    except (TypeError, ValueError):
        return str(code)


def _flashinfer_oneshot(token_num: int, hidden: int, elem_bytes: int, world: int) -> bool:
    """FlashInfer's `_should_use_oneshot` when the caller passes use_oneshot=None."""
    mb = token_num * hidden * 2 * world * elem_bytes / MIB
    return mb <= FLASHINFER_ONESHOT_HEURISTIC_MB.get(world, 42)


def _tp_group(rec: Recorder, rank: int) -> tuple[int, ...]:
    if "vllm.distributed.parallel_state" in sys.modules:
        with contextlib.suppress(Exception):
            ps = sys.modules["vllm.distributed.parallel_state"]
            return tuple(int(r) for r in ps.get_tp_group().ranks)
    return place(rank, rec.tp, rec.pp).tp_group


def _depth(family: str) -> int:
    return int(getattr(_TLS, family, 0))


@contextlib.contextmanager
def _nested(family: str) -> Iterator[bool]:
    """Yields True for the outermost wrapped call of a family on this thread."""
    d = _depth(family)
    setattr(_TLS, family, d + 1)
    try:
        yield d == 0
    finally:
        setattr(_TLS, family, d)


def _torch() -> Any:
    """torch if this process has imported it (vLLM has, by the time FlashInfer is called); never imports it."""
    return sys.modules.get("torch")


def _capturing() -> bool:
    torch = _torch()
    try:
        return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    except Exception:
        return False


def _synchronize() -> bool:
    torch = _torch()
    try:
        if torch is not None and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream().synchronize()
            return True
    except Exception:
        pass
    return False


# ---- the fused call ---------------------------------------------------------------------------------


def _bind(sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        ba = sig.bind(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


def _ws_world(ws: Any) -> int | None:
    for attr in ("world_size", "tp_size"):
        v = getattr(ws, attr, None)
        if isinstance(v, int):
            return v
    meta = getattr(ws, "metadata", None)
    if isinstance(meta, dict) and isinstance(meta.get("tp_size"), int):
        return int(meta["tp_size"])
    return None


def _launch_record(rec: Recorder, name: str, a: dict[str, Any]) -> dict[str, Any]:
    """The launch record for one fused call, from the arguments as FlashInfer receives them."""
    unified = name == "allreduce_fusion"
    x = a.get("input") if unified else a.get("allreduce_in")
    shape = _shape(x)
    token_num = int(a.get("token_num") or (shape[0] if shape else 0))
    hidden = int(a.get("hidden_dim") or (shape[-1] if shape else 0))
    dtype = _dtype_name(x)
    ws = a.get("workspace") if unified else a.get("workspace_ptrs")
    fi_backend = str(getattr(ws, "backend", "trtllm")) if unified else "trtllm"
    world = int(a.get("world_size") or (_ws_world(ws) if unified else 0) or rec.tp)
    pattern = _pattern_name(a.get("pattern") if unified else a.get("pattern_code"))
    fp32_acc = bool(a.get("fp32_acc", False))
    requested = a.get("use_oneshot")
    oneshot = bool(requested) if requested is not None else _flashinfer_oneshot(token_num, hidden,
                                                                                _elem_bytes(dtype), world)
    p = rec.progress
    k = rec.forward_calls
    in_vllm = p.phase != "starting"  # a process with no vLLM phase (a plain FlashInfer job) has no layers
    record: dict[str, Any] = dict(
        seq=rec.seq, call=rec.calls, phase=p.phase, size=p.size if p.size is not None else token_num,
        layer=k // 2 if in_vllm else None, sub=k % 2 if in_vllm else None,  # vLLM: two fused calls per layer
        op="fused", token_num=token_num, hidden=hidden, dtype=dtype, oneshot=oneshot,
    )
    args: dict[str, Any] = dict(
        entry=name, fi_backend=fi_backend, world_size=world, pattern=pattern, fp32_acc=fp32_acc,
        use_oneshot_arg=requested, trigger_completion_at_end=a.get("trigger_completion_at_end"),
        launch_with_pdl=a.get("launch_with_pdl"), shape=list(shape), layer_inferred=True,
    )
    if not unified and a.get("world_rank") is not None:
        args["world_rank"] = int(a["world_rank"])
    if fi_backend == "trtllm" and hidden and dtype in ("bf16", "fp16", "fp32"):
        dev = rec.device_facts()
        try:
            lc = launch_config(
                token_num=token_num, hidden=hidden, elem_bytes=_elem_bytes(dtype), oneshot=oneshot, nranks=world,
                sm_count=dev.sm_count, sm_version=dev.sm_version, max_registers_per_block=dev.max_registers_per_block,
                regs_per_thread=dev.regs_per_thread, max_cluster_size=dev.max_cluster_size,
                pattern=pattern if pattern in PATTERNS.values() else "residual_rmsnorm", dtype=dtype,
                fp32_acc=fp32_acc,
            )
            record.update(grid=lc.grid, block=lc.block, cluster=lc.cluster, kernel=lc.kernel)
            args["device"] = dev.source
        except ValueError as e:
            args["launch_math"] = str(e)
    key = id(ws) if unified else _tensor_key(ws)
    record["ws"] = rec.workspaces.get(key) if key is not None else None
    record["args"] = args
    return record


def _tensor_key(t: Any) -> int | None:
    try:
        return int(t.data_ptr())
    except Exception:
        return None


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(msg, file=sys.stderr, flush=True)


def _wrap_fused(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec = _STATE
        with _nested("fused") as outer:
            if rec is None or not outer:
                return orig(*args, **kwargs)
            try:
                with rec.lock:
                    record = _launch_record(rec, name, _bind(sig, args, kwargs))
                    seq = rec.seq
                    rec.seq += 1
                    rec.calls += 1
                    rec.forward_calls += 1
                    capturing = _capturing()
                    record["args"]["capturing"] = capturing
                    rec.emit(LaunchEvent, **record)
            except Exception as e:  # recording must never break the job's own call
                _warn_once(f"vdiag instrumentation: the {name} call was not recorded ({type(e).__name__}: {e})")
                return orig(*args, **kwargs)
            try:
                out = orig(*args, **kwargs)
            except BaseException as e:
                rec.emit(ErrorEvent, where=f"flashinfer.{name}", error=f"{type(e).__name__}: {e}", seq=seq)
                raise
            synced = rec.sync and not capturing and _synchronize()
            detail = ("returned and synchronized" if synced
                      else "returned (recorded into a CUDA graph)" if capturing else "returned (launch is asynchronous)")
            rec.emit(ResultEvent, seq=seq, ok=True, kind="unchecked", detail=detail)
            return out

    setattr(wrapper, _WRAPPED_ATTR, True)
    return wrapper


# ---- workspace creation -----------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def honours_symm_dev_mem(orig: Callable[..., Any]) -> bool:
    """Whether this FlashInfer's legacy workspace call exchanges handles through `comm_backend` when asked
    (`use_symm_dev_mem=True`), or always rendezvouses torch symmetric memory over `group` (WORLD when
    none is given). Read from the function's source; without source, from FlashInfer's version:
    0.6.3-0.6.8 and 0.6.16+ use SymmDeviceMemory over comm_backend, 0.6.11-0.6.14 always use `group`
    (read from the wheels' trtllm_ar.py; 0.6.9, 0.6.10 and 0.6.15 were not read and follow their neighbours)."""
    try:
        body = inspect.getsource(orig)
        if f"def {getattr(orig, '__name__', '')}(" in body:  # the function itself, not a decorator's wrapper
            return "SymmDeviceMemory(" in body
    except (OSError, TypeError):
        pass
    fi = sys.modules.get("flashinfer")
    version = _version_tuple(str(getattr(fi, "__version__", "")))
    if not version:
        return True
    return not ((0, 6, 10) <= version < (0, 6, 16)) and version >= (0, 6, 0)


def _rendezvous(a: dict[str, Any], legacy: bool, symm_dev_mem_ok: bool = True) -> tuple[Any, str]:
    """The group a workspace's buffers are exchanged over, and how that was decided.

    Legacy (`trtllm_create_ipc_workspace_for_all_reduce_fusion`): with `use_symm_dev_mem` (where the
    installed FlashInfer honours it) the handles go through `comm_backend`, or a TorchDistBackend over
    `group`; otherwise the buffers are rendezvoused over `group`, WORLD when none is given (FlashInfer
    0.6.11-0.6.14 always: with vLLM 0.22-0.23, which passed no group, that is the aliasing bug).
    Unified (`create_allreduce_fusion_workspace`): the legacy call underneath decides where it is
    recorded; otherwise `comm_backend`'s group, then `group`, then WORLD.
    """
    group = a.get("group")
    known, cb_group = _backend_group(a.get("comm_backend"))
    if legacy:
        if a.get("use_symm_dev_mem") and symm_dev_mem_ok:
            if known:
                return cb_group, "comm_backend (use_symm_dev_mem=True)"
            return group, "group (use_symm_dev_mem=True, no comm_backend)"
        why = "" if not a.get("use_symm_dev_mem") else "; this FlashInfer ignores comm_backend here"
        return group, ("group" if group is not None else "WORLD (no group given)") + why
    if known:
        return cb_group, "comm_backend"
    return group, "group" if group is not None else "WORLD (no group given)"


def _peer_ptrs(result: Any) -> list[list[str]]:
    """Peer buffer pointers as this process sees them: ipc_handles[buffer][peer]."""
    handles = getattr(result, "ipc_handles", None)
    if handles is None and isinstance(result, tuple) and result and isinstance(result[0], list):
        handles = result[0]
    out: list[list[str]] = []
    if isinstance(handles, list):
        for row in handles:
            if isinstance(row, list):
                out.append([hex(int(p)) if isinstance(p, int) else str(p) for p in row])
    return out


def _ws_tensor_key(result: Any) -> int | None:
    t = getattr(result, "workspace_tensor", None)
    if t is None and isinstance(result, tuple) and len(result) > 1:
        t = result[1]
    return _tensor_key(t) if t is not None else None


def _wrap_workspace(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(orig)
    legacy = name == "trtllm_create_ipc_workspace_for_all_reduce_fusion"
    symm_ok = honours_symm_dev_mem(orig) if legacy else True

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec = _STATE
        a = _bind(sig, args, kwargs)
        inner = getattr(_TLS, "ws_inner", None)
        with _nested("workspace") as outer:
            if rec is None:
                return orig(*args, **kwargs)
            if not outer:
                # The unified call underneath: its arguments say where the rendezvous really goes.
                if legacy and isinstance(inner, dict):
                    g, how = _rendezvous(a, legacy=True, symm_dev_mem_ok=symm_ok)
                    inner.update(group=g, how=how + ", from the trtllm call underneath", tp_size=a.get("tp_size"))
                out = orig(*args, **kwargs)
                if legacy and isinstance(inner, dict):
                    inner["ptrs"] = _peer_ptrs(out)
                    inner["tensor_key"] = _ws_tensor_key(out)
                return out
            ctx: dict[str, Any] = {}
            _TLS.ws_inner = ctx
            before = rec.progress
            rec.set_phase("workspace")
            err = ""
            out = None
            try:
                out = orig(*args, **kwargs)
                return out
            except BaseException as e:
                err = f"{type(e).__name__}: {e}"
                raise
            finally:
                _TLS.ws_inner = None
                with contextlib.suppress(Exception):
                    _emit_workspace(rec, name, legacy, a, ctx, out, err, symm_ok)
                rec.resume_phase(before)

    setattr(wrapper, _WRAPPED_ATTR, True)
    return wrapper


def _emit_workspace(rec: Recorder, name: str, legacy: bool, a: dict[str, Any], ctx: dict[str, Any], out: Any,
                    err: str, symm_ok: bool) -> None:
    rank = _dist_rank(rec.rank)
    if "group" in ctx or "how" in ctx:
        group, how = ctx.get("group"), str(ctx.get("how", ""))
    else:
        group, how = _rendezvous(a, legacy, symm_ok)
    rdzv = _group_ranks(group)
    tp_size = int(a.get("tp_size") or a.get("world_size") or ctx.get("tp_size") or rec.tp)
    tp_group = _tp_group(rec, rank)
    fi_backend = str(getattr(out, "backend", "trtllm" if legacy else a.get("backend", "?")))
    ok = out is not None and not err
    if rdzv is None:
        # torch.distributed not readable here: WORLD is every rank; any other group is taken as the TP group.
        rdzv = tuple(range(rec.tp * rec.pp)) if group is None else tp_group
        how += " (group ranks not readable; assumed)"
    owners = tuple(rdzv[:tp_size]) if len(rdzv) >= tp_size else ()
    # FlashInfer's buffer list i holds the handle of rendezvous-group member i: name each peer by its owner,
    # which every rank can compare (this process's pointers to the same buffer differ between processes).
    peers = tuple(f"rank{o}" for o in owners) if ok else ()
    ptrs = ctx.get("ptrs") or _peer_ptrs(out)
    key = ctx.get("tensor_key") or (None if not legacy else _ws_tensor_key(out))
    ident = ",".join(peers)
    if ok:
        rec.workspaces[id(out)] = ident
        if key is not None:
            rec.workspaces[int(key)] = ident
    if not ok and not err:
        err = f"{name} returned nothing"
    rec.emit(
        WorkspaceEvent, ok=ok, backend="flashinfer", rendezvous_group=list(rdzv), tp_group=list(tp_group),
        peers=list(peers), peer_owner_ranks=list(owners if ok else ()), fallback=not ok, error=err,
        entry=name, fi_backend=fi_backend, rendezvous=how, tp_size=tp_size,
        max_token_num=a.get("max_token_num"), hidden_dim=a.get("hidden_dim"), peer_ptrs=ptrs,
    )


# ---- installing into FlashInfer -----------------------------------------------------------------------


def _flashinfer_modules() -> list[ModuleType]:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == "flashinfer" or n.startswith("flashinfer.") or n.startswith("vllm."))]


def _replace_everywhere(orig: Any, wrapper: Any) -> int:
    n = 0
    for mod in _flashinfer_modules():
        d = getattr(mod, "__dict__", {})
        for attr, val in list(d.items()):
            if val is orig:
                setattr(mod, attr, wrapper)
                _ORIGINALS.append((mod, attr, orig))
                n += 1
    return n


def install_flashinfer(import_modules: tuple[str, ...] = ("flashinfer.comm",)) -> dict[str, int]:
    """Import FlashInfer's comm package and wrap its entry points in every module that holds them.

    Returns how many module attributes were replaced per entry point (0: the installed FlashInfer has no
    such function, or nothing new refers to it). Safe to call again after more modules were imported
    (vLLM's): references to the originals that arrived since are replaced too.
    """
    import importlib

    for m in import_modules:
        importlib.import_module(m)
    counts: dict[str, int] = {}
    for name in (*FUSED_CALLS, *WORKSPACE_CALLS):
        orig = _ORIG_FUNCS.get(name)
        if orig is None:
            orig = next((v for mod in _flashinfer_modules()
                         if callable(v := getattr(mod, "__dict__", {}).get(name)) and not getattr(v, _WRAPPED_ATTR, False)),
                        None)
            if orig is None:
                counts[name] = 0
                continue
            _ORIG_FUNCS[name] = orig
            _WRAPPERS[name] = (_wrap_fused if name in FUSED_CALLS else _wrap_workspace)(name, orig)
        counts[name] = _replace_everywhere(orig, _WRAPPERS[name])
    return counts


_WRAPPERS: dict[str, Callable[..., Any]] = {}
_ORIG_FUNCS: dict[str, Callable[..., Any]] = {}


def installed() -> dict[str, bool]:
    """Which FlashInfer entry points are wrapped in this process."""
    return {name: name in _WRAPPERS for name in (*FUSED_CALLS, *WORKSPACE_CALLS)}


# ---- FlashInfer's JIT builds ---------------------------------------------------------------------------
#
# FlashInfer builds a kernel module on first use (`JitSpec.build_and_load` in flashinfer/jit/core.py): it
# loads a prebuilt artifact if there is one, else takes the module's build lock (a file lock,
# `JitSpec.lock_path`) and runs ninja. A start-up that waits there (another process holds the lock, or the
# build never ends) writes nothing else; this wrapper records the entry and the return, with the module
# name and the lock path, in `vllm/jit-rank<N>.jsonl`, so the report can say where the rank is.



def _jit_record(rec: Recorder, **fields: Any) -> None:
    if rec.run_dir is None:
        return
    d = rec.run_dir / "vllm"
    with contextlib.suppress(OSError):
        d.mkdir(parents=True, exist_ok=True)
        with (d / JIT_FILE.format(rank=rec.rank)).open("a") as f:
            f.write(json.dumps({"t": round(time.time(), 3), "pid": os.getpid(), **fields}, default=str) + "\n")
            f.flush()


def _jit_build_and_load(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec = _STATE
        if rec is None:
            return orig(self, *args, **kwargs)
        name = str(getattr(self, "name", "?"))
        lock = ""
        with contextlib.suppress(Exception):
            lock = str(self.lock_path)
        before = rec.progress
        t0 = time.monotonic()
        _jit_record(rec, ev="enter", module=name, lock=lock, phase=before.phase)
        rec.set_phase("jit", size=before.size, label=f"FlashInfer JIT {name}")
        try:
            out = orig(self, *args, **kwargs)
        except BaseException as e:
            _jit_record(rec, ev="error", module=name, error=f"{type(e).__name__}: {e}"[:300],
                        s=round(time.monotonic() - t0, 3))
            raise
        _jit_record(rec, ev="return", module=name, s=round(time.monotonic() - t0, 3))
        rec.resume_phase(before)
        return out

    return wrapper


def install_flashinfer_jit() -> list[str]:
    """Wrap FlashInfer's `JitSpec.build_and_load` (where it exists); returns what was wrapped."""
    try:
        from flashinfer.jit import core
    except Exception:
        return []
    done = []
    for cls_name in ("JitSpec", "JitSpecNvcc"):
        cls = getattr(core, cls_name, None)
        if isinstance(cls, type) and _wrap_method(cls, "build_and_load", _jit_build_and_load):
            done.append(f"flashinfer.jit.core.{cls_name}.build_and_load")
    return done


# ---- vLLM's start-up progress -------------------------------------------------------------------------


def _size_of(item: Any) -> int | None:
    if isinstance(item, int):
        return item
    n = getattr(item, "num_tokens", None)
    if isinstance(n, int):
        return n
    if isinstance(item, tuple) and item and isinstance(item[0], int):
        return item[0]
    return None


class _ProgressList(list[Any]):
    """The capture loop's list of sizes: iterating it writes the capture phase record for each item."""

    label: str = ""

    def __iter__(self) -> Iterator[Any]:
        total = len(self)
        rec = _STATE
        for i, item in enumerate(list.__iter__(self)):
            if rec is not None:
                rec.forward_calls = 0
                rec.set_phase("capture", index=i, total=total, size=_size_of(item), label=self.label)
            yield item
        if rec is not None:
            rec.set_phase("capture", index=total, total=total, label=self.label)


def _wrap_method(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    orig = cls.__dict__.get(name)
    if orig is None or getattr(orig, _WRAPPED_ATTR, False) or not callable(orig):
        return False
    wrapper = make(orig)
    setattr(wrapper, _WRAPPED_ATTR, True)
    setattr(cls, name, wrapper)
    _ORIGINALS.append((cls, name, orig))
    return True


def _phase_on_entry(phase: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            rec = _STATE
            if rec is not None:
                rec.forward_calls = 0
                rec.set_phase(phase)
            return orig(*args, **kwargs)

        return wrapper

    return make


def _dummy_run(orig: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec = _STATE
        if rec is not None:
            rec.forward_calls = 0
            if rec.progress.phase != "capture":
                n = _bind(sig, args, kwargs).get("num_tokens")
                if isinstance(n, int):
                    rec.progress.size = n
        return orig(*args, **kwargs)

    return wrapper


def _capture_cudagraphs(orig: Callable[..., Any]) -> Callable[..., Any]:
    """V1 model runner: `_capture_cudagraphs(self, compilation_cases | batch_descriptors, mode, ...)`."""
    params = list(inspect.signature(orig).parameters)
    first = params[1] if len(params) > 1 else None
    mode_name = next((p for p in params if p == "cudagraph_runtime_mode"), None)

    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        mode = kwargs.get(mode_name) if mode_name in kwargs else (args[1] if len(args) > 1 else None)
        if args and isinstance(args[0], list):
            items = _ProgressList(args[0])
            args = (items, *args[1:])
        elif first is not None and isinstance(kwargs.get(first), list):
            items = _ProgressList(kwargs[first])
            kwargs[first] = items
        else:
            return orig(self, *args, **kwargs)
        uniform = bool(getattr(items[0], "uniform", kwargs.get("uniform_decode", False))) if items else False
        items.label = f"{'decode' if uniform else 'mixed prefill-decode'}, {getattr(mode, 'name', mode)}"
        return orig(self, *args, **kwargs)

    return wrapper


def _graph_manager_capture(orig: Callable[..., Any]) -> Callable[..., Any]:
    """V2 model runner: `CudaGraphManager.capture(self, create_forward_fn, ...)` calls
    `create_forward_fn(desc, warmup=True)` once at the start of each capture."""
    params = list(inspect.signature(orig).parameters)
    if len(params) < 2 or params[1] != "create_forward_fn":
        return orig

    @functools.wraps(orig)
    def wrapper(self: Any, create_forward_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        rec = _STATE
        descs = getattr(self, "_capture_descs", None)
        total = sum(len(v) for v in descs.values()) if isinstance(descs, dict) else 0
        seen = [0]

        def counting(desc: Any, *a: Any, **kw: Any) -> Any:
            warm = kw.get("warmup", a[0] if a else False)
            if rec is not None and warm:
                rec.forward_calls = 0
                mode = getattr(getattr(desc, "cg_mode", None), "name", "")
                rec.set_phase("capture", index=seen[0], total=total, size=_size_of(desc), label=mode)
                seen[0] += 1
            return create_forward_fn(desc, *a, **kw)

        out = orig(self, counting, *args, **kwargs)
        if rec is not None:
            rec.set_phase("capture", index=seen[0], total=total)
        return out

    return wrapper


def install_progress(*, runners: tuple[type, ...] = (), graph_managers: tuple[type, ...] = (),
                     workers: tuple[type, ...] = ()) -> list[str]:
    """Wrap the start-up methods of the given vLLM classes; returns what was wrapped."""
    done: list[str] = []
    for cls in runners:
        for name, make in (("profile_run", _phase_on_entry("profile")), ("capture_model", _phase_on_entry("capture")),
                           ("_dummy_run", _dummy_run), ("_capture_cudagraphs", _capture_cudagraphs)):
            if _wrap_method(cls, name, make):
                done.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    for cls in graph_managers:
        if _wrap_method(cls, "capture", _graph_manager_capture):
            done.append(f"{cls.__module__}.{cls.__qualname__}.capture")
    for cls in workers:
        if _wrap_method(cls, "compile_or_warm_up_model", _phase_on_entry("warmup")):
            done.append(f"{cls.__module__}.{cls.__qualname__}.compile_or_warm_up_model")
    return done


def install_vllm_progress() -> list[str]:
    """Find vLLM's model runners, CUDA-graph managers and GPU worker, and wrap their start-up methods."""
    import importlib

    found: dict[str, list[type]] = {"runners": [], "graph_managers": [], "workers": []}
    for mod_name, attr, kind in (
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "runners"),
        ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "runners"),
        ("vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager", "graph_managers"),
        ("vllm.v1.worker.gpu_worker", "Worker", "workers"),
    ):
        try:
            cls = getattr(importlib.import_module(mod_name), attr)
        except Exception:
            continue
        if isinstance(cls, type):
            found[kind].append(cls)
    return install_progress(runners=tuple(found["runners"]), graph_managers=tuple(found["graph_managers"]),
                            workers=tuple(found["workers"]))


def uninstall() -> None:
    """Put every original back (tests; a worker never needs it)."""
    global _STATE
    for owner, attr, orig in reversed(_ORIGINALS):
        with contextlib.suppress(Exception):
            setattr(owner, attr, orig)
    _ORIGINALS.clear()
    _WRAPPERS.clear()
    _ORIG_FUNCS.clear()
    _STATE = None
