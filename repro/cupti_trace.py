"""Launch configurations straight from the CUDA driver: an in-worker CUPTI callback (issue 11).

With ``VDIAG_CUPTI=1`` each worker subscribes to CUPTI's driver-API callbacks for kernel launches
(cuLaunchKernel, cuLaunchKernelEx and their per-thread-stream variants, cuLaunchCooperativeKernel) and,
on API entry, before the launch proceeds, appends one JSON line per launch of a kernel whose name matches
a filter to ``run_dir/launch/rank{r}.cupti.jsonl`` (unbuffered ``os.write``): kernel name, grid, block,
cluster dimensions (decoded from cuLaunchKernelEx's ``CUlaunchConfig`` with ctypes), dynamic shared
memory, stream, a per-rank sequence number and, inside vdiag's replay, the replay call it belongs to.
It needs no change to the code under test: `sitecustomize_source` gives a ``sitecustomize.py`` that
starts the tracer in any Python process (vLLM's workers included) that has it on its path.

Activity records only arrive when a kernel finishes, so a hung kernel would be missing there: only the
callback side sees it (docs/mechanisms.md). Only one CUPTI subscriber may exist per process; when CUPTI cannot be
used (no GPU, no cupti-python, another subscriber such as Nsight) the file's first record says why and
the run carries on. `cupti_findings` turns the files into report notes and launch-configuration checks.

Environment: VDIAG_CUPTI=1 turns it on; VDIAG_CUPTI_FILTER (a regular expression, case-insensitive,
matched against the mangled and the demangled name) replaces DEFAULT_FILTER; VDIAG_CUPTI_OUT names the
output file outside vdiag's replay.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

ENV_ON = "VDIAG_CUPTI"
ENV_FILTER = "VDIAG_CUPTI_FILTER"
ENV_OUT = "VDIAG_CUPTI_OUT"
# FlashInfer's fused kernels (allreduce_fusion_kernel_oneshot_lamport / _twoshot_sync), TRT-LLM and
# vLLM custom all-reduce kernels (cross_device_reduce_1stage/2stage), Lamport and one/two-shot variants,
# and NCCL's device kernels (ncclDevKernel_*, ncclKernel_*).
DEFAULT_FILTER = (
    r"all_?reduce|lamport|one_?shot|two_?shot|cross_device_reduce|custom_?a(ll_)?r|customar|nccl"
)
FUSED_KERNEL = "allreduce_fusion_kernel"

# CUDA driver ABI (cuda.h): CUlaunchAttributeID values and the struct layouts read below.
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
CU_LAUNCH_ATTRIBUTE_COOPERATIVE = 2


class CUlaunchAttributeValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("dims", ctypes.c_uint * 3), ("u32", ctypes.c_uint)]


class CUlaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", CUlaunchAttributeValue)]


class CUlaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(CUlaunchAttribute)),
        ("numAttrs", ctypes.c_uint),
    ]


def decode_launch_config(ptr: int) -> dict[str, Any]:
    """Grid, block, cluster, shared memory and stream from a ``const CUlaunchConfig*`` (cuLaunchKernelEx).

    The cluster is (1,1,1) unless a CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION attribute says otherwise.
    """
    cfg = CUlaunchConfig.from_address(ptr)
    cluster = (1, 1, 1)
    cooperative = False
    n = int(cfg.numAttrs)
    if n and cfg.attrs:
        for i in range(min(n, 32)):
            a = cfg.attrs[i]
            if a.id == CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION:
                d = a.value.dims
                cluster = (int(d[0]), int(d[1]), int(d[2]))
            elif a.id == CU_LAUNCH_ATTRIBUTE_COOPERATIVE:
                cooperative = bool(a.value.u32)
    out: dict[str, Any] = {
        "grid": [int(cfg.gridDimX), int(cfg.gridDimY), int(cfg.gridDimZ)],
        "block": [int(cfg.blockDimX), int(cfg.blockDimY), int(cfg.blockDimZ)],
        "cluster": list(cluster),
        "smem": int(cfg.sharedMemBytes),
        "stream": hex(cfg.hStream or 0),
    }
    if cooperative:
        out["cooperative"] = True
    return out


# ---- names -----------------------------------------------------------------------------------------

_demangler: Any = None
_demangled: dict[str, str] = {}


def demangle(name: str) -> str:
    """The C++ name of a mangled symbol (libstdc++'s __cxa_demangle); the input when it is not mangled."""
    global _demangler
    if not name.startswith("_Z"):
        return name
    hit = _demangled.get(name)
    if hit is not None:
        return hit
    out = name
    try:
        if _demangler is None:
            lib = ctypes.CDLL("libstdc++.so.6")
            fn = lib.__cxa_demangle
            fn.restype = ctypes.c_void_p
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
            libc = ctypes.CDLL(None)
            libc.free.argtypes = [ctypes.c_void_p]
            _demangler = (fn, libc.free)
        fn, free = _demangler
        status = ctypes.c_int(0)
        p = fn(name.encode(), None, None, ctypes.byref(status))
        if p and status.value == 0:
            raw = ctypes.string_at(p)
            out = raw.decode(errors="replace")
            free(p)
    except (OSError, AttributeError):
        _demangler = False
    _demangled[name] = out
    return out


def short_name(demangled: str) -> str:
    """`allreduce_fusion_kernel_oneshot_lamport<...>` without namespaces, return type and parameters."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth = 0
    cut = len(s)
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    head = s[:cut]
    base = head.split("<", 1)[0].rsplit("::", 1)[-1]
    rest = head[len(head.split("<", 1)[0]):]
    return base + rest


# ---- the tracer ------------------------------------------------------------------------------------

_context: dict[str, Any] = {"seq": None, "graph": False}


def set_call(seq: int | None, graph: bool = False) -> None:
    """Tell the tracer which replay call the next launches belong to (cheap: two dict stores)."""
    _context["seq"] = seq
    _context["graph"] = graph


class LaunchTracer:
    """One process's CUPTI subscription. `start` returns "" on success, else the reason it is off."""

    def __init__(self, path: Path, rank: int | None, name_filter: str = DEFAULT_FILTER) -> None:
        self.path = path
        self.rank = rank
        self.filter = re.compile(name_filter, re.IGNORECASE)
        self.fd = -1
        self.seq = 0
        self.seen = 0
        self.subscriber: Any = None
        self.cupti: Any = None
        self.lock = threading.Lock()
        self._kernel_cbids: dict[int, str] = {}

    def _write(self, rec: dict[str, Any]) -> None:
        if self.fd < 0:
            return
        rec.setdefault("t", time.time())
        if self.rank is not None:
            rec.setdefault("rank", self.rank)
        os.write(self.fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def start(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        reason = self._subscribe()
        self._write({"ev": "cupti_status", "ok": not reason, "reason": reason, "pid": os.getpid(),
                     "filter": self.filter.pattern})
        return reason

    def _subscribe(self) -> str:
        try:
            from cupti import cupti
        except Exception as e:  # no cupti-python, or its CUPTI library does not load
            return f"CUPTI unavailable: cupti-python could not be imported ({type(e).__name__}: {e})"
        self.cupti = cupti
        try:
            sub = cupti.subscribe(self._callback, None)
        except Exception as e:
            status = getattr(e, "status", None)
            name = ""
            with contextlib.suppress(Exception):
                name = cupti.Result(status).name if status is not None else ""
            if "MULTIPLE_SUBSCRIBERS" in name or "MULTIPLE_SUBSCRIBERS" in str(e):
                return "CUPTI unavailable: another CUPTI subscriber holds this process (a profiler such as Nsight)"
            if "NO_DEVICE" in name or "NOT_INITIALIZED" in name or "INSUFFICIENT" in name:
                return f"CUPTI unavailable: no usable CUDA device or driver ({name or e})"
            return f"CUPTI unavailable: subscribe failed ({name or type(e).__name__}: {e})"
        self.subscriber = sub
        domain = cupti.CallbackDomain.DRIVER_API
        ids = cupti.DriverApiTraceCbid
        enabled = []
        for api in ("cuLaunchKernel", "cuLaunchKernel_ptsz", "cuLaunchKernelEx", "cuLaunchKernelEx_ptsz",
                    "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel_ptsz"):
            cbid = getattr(ids, api, None)
            if cbid is None:
                continue
            try:
                cupti.enable_callback(1, sub, domain, cbid)
            except Exception:
                continue
            self._kernel_cbids[int(cbid)] = api
            enabled.append(api)
        if not enabled:
            with contextlib.suppress(Exception):
                cupti.unsubscribe(sub)
            return "CUPTI unavailable: no kernel-launch callback could be enabled"
        return ""

    def _params(self, api: str, ptr: int) -> dict[str, Any]:
        c = self.cupti
        if api.startswith("cuLaunchKernelEx"):
            cls = c.CuLaunchKernelExPtszParams if api.endswith("_ptsz") else c.CuLaunchKernelExParams
            p = cls.from_ptr(ptr, readonly=True)
            return decode_launch_config(int(p.config))
        if api.startswith("cuLaunchCooperativeKernel"):
            cls = c.CuLaunchCooperativeKernelPtszParams if api.endswith("_ptsz") else c.CuLaunchCooperativeKernelParams
        else:
            cls = c.CuLaunchKernelPtszParams if api.endswith("_ptsz") else c.CuLaunchKernelParams
        p = cls.from_ptr(ptr, readonly=True)
        return {
            "grid": [int(p.grid_dim_x), int(p.grid_dim_y), int(p.grid_dim_z)],
            "block": [int(p.block_dim_x), int(p.block_dim_y), int(p.block_dim_z)],
            "cluster": [1, 1, 1],
            "smem": int(p.shared_mem_bytes),
            "stream": hex(int(p.h_stream) or 0),
        }

    def _name_of_function(self, api: str, ptr: int) -> str:
        """The kernel's name from its CUfunction (cuFuncGetName) when CUPTI gave no symbol name."""
        c = self.cupti
        if api.startswith("cuLaunchKernelEx"):
            cls = c.CuLaunchKernelExPtszParams if api.endswith("_ptsz") else c.CuLaunchKernelExParams
        elif api.startswith("cuLaunchCooperativeKernel"):
            cls = c.CuLaunchCooperativeKernelPtszParams if api.endswith("_ptsz") else c.CuLaunchCooperativeKernelParams
        else:
            cls = c.CuLaunchKernelPtszParams if api.endswith("_ptsz") else c.CuLaunchKernelParams
        f = int(cls.from_ptr(ptr, readonly=True).f)
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            out = ctypes.c_char_p()
            if lib.cuFuncGetName(ctypes.byref(out), ctypes.c_void_p(f)) == 0 and out.value:
                return out.value.decode(errors="replace")
        except (OSError, AttributeError):
            pass
        return ""

    def _callback(self, userdata: Any, domain: Any, cbid: Any, cbdata: Any) -> None:
        try:
            if cbdata.callback_site != self.cupti.ApiCallbackSite.API_ENTER:
                return
            api = self._kernel_cbids.get(int(cbid))
            if api is None:
                return
            self.seen += 1
            mangled = cbdata.symbol_name or ""
            if not mangled:
                mangled = self._name_of_function(api, int(cbdata.function_params))
            if not self.filter.search(mangled):
                name = demangle(mangled)
                if name == mangled or not self.filter.search(name):
                    return
            else:
                name = demangle(mangled)
            rec: dict[str, Any] = {"ev": "cupti_launch", "api": api, "kernel": short_name(name)}
            rec.update(self._params(api, int(cbdata.function_params)))
            with self.lock:
                rec["cseq"] = self.seq
                self.seq += 1
                if _context["seq"] is not None:
                    rec["vdiag_seq"] = _context["seq"]
                    rec["graph_capture"] = bool(_context["graph"])
                self._write(rec)
        except Exception as e:  # a tracer bug must never break the launch it watches
            with contextlib.suppress(Exception):
                self._write({"ev": "cupti_error", "error": f"{type(e).__name__}: {e}"})

    def stop(self) -> None:
        if self.subscriber is not None and self.cupti is not None:
            with contextlib.suppress(Exception):
                self.cupti.unsubscribe(self.subscriber)
            self.subscriber = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self._write({"ev": "cupti_stop", "launches_seen": self.seen, "recorded": self.seq})
                os.close(self.fd)
            self.fd = -1


_tracer: LaunchTracer | None = None


def enabled(env: dict[str, str] | None = None) -> bool:
    e = os.environ if env is None else env
    return e.get(ENV_ON, "").strip().lower() in ("1", "true", "yes", "on")


def cupti_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "launch" / f"rank{rank}.cupti.jsonl"


def start_in_worker(run_dir: Path, rank: int) -> str:
    """Start the tracer in a replay worker when VDIAG_CUPTI=1; returns "" or the reason it is off."""
    global _tracer
    if not enabled() or _tracer is not None:
        return ""
    _tracer = LaunchTracer(cupti_file(run_dir, rank), rank, os.environ.get(ENV_FILTER) or DEFAULT_FILTER)
    return _tracer.start()


def start_from_env() -> str:
    """For sitecustomize: trace into VDIAG_CUPTI_OUT (``{pid}`` and ``{rank}`` are expanded)."""
    global _tracer
    if not enabled() or _tracer is not None:
        return ""
    rank = os.environ.get("RANK")
    out = os.environ.get(ENV_OUT) or "vdiag-cupti.{pid}.jsonl"
    path = Path(out.format(pid=os.getpid(), rank=rank if rank is not None else "x"))
    _tracer = LaunchTracer(path, int(rank) if rank is not None else None,
                           os.environ.get(ENV_FILTER) or DEFAULT_FILTER)
    return _tracer.start()


def stop() -> None:
    global _tracer
    if _tracer is not None:
        _tracer.stop()
        _tracer = None


def sitecustomize_source() -> str:
    """A sitecustomize.py that starts the tracer in every Python process started with it on the path
    (e.g. real vLLM workers: no change to vLLM's source)."""
    return (
        "# Written by vdiag: CUPTI launch tracing (repro.cupti_trace); harmless when VDIAG_CUPTI is unset.\n"
        "try:\n"
        "    from repro.cupti_trace import start_from_env as _vdiag_cupti\n"
        "    _vdiag_cupti()\n"
        "except Exception:\n"
        "    pass\n"
    )


# ---- reading the files back ------------------------------------------------------------------------


def read_cupti(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
    except OSError:
        pass
    return out


def _t3(v: Any) -> tuple[int, int, int] | None:
    if v is None:
        return None
    t = tuple(int(x) for x in v)
    return (t[0], t[1], t[2]) if len(t) == 3 else None


def compare_rank(rank: int, cupti_recs: list[dict[str, Any]], launches: dict[int, Any],
                 max_lines: int = 5) -> list[str]:
    """Checks for one rank: each CUPTI-observed fused-kernel launch against the computed launch of the
    replay call it belongs to (`launches`: seq -> LaunchEvent). Disagreements are named one by one."""
    fused = [r for r in cupti_recs if r.get("ev") == "cupti_launch" and FUSED_KERNEL in str(r.get("kernel", ""))]
    matched = agree = 0
    bad: list[str] = []
    unmatched = 0
    for r in fused:
        seq = r.get("vdiag_seq")
        ev = launches.get(seq) if seq is not None else None
        if ev is None or ev.grid is None:
            unmatched += 1
            continue
        matched += 1
        obs = (_t3(r.get("grid")), _t3(r.get("block")), _t3(r.get("cluster")))
        exp = (_t3(ev.grid), _t3(ev.block), _t3(ev.cluster))
        if obs == exp:
            agree += 1
        else:
            bad.append(
                f"rank {rank} call seq {seq} ({ev.phase} size={ev.size} layer={ev.layer} sub={ev.sub}, "
                f"{ev.token_num} tokens): computed grid {exp[0]} block {exp[1]} cluster {exp[2]} vs CUPTI "
                f"grid {obs[0]} block {obs[1]} cluster {obs[2]}: DISAGREE"
            )
    out = []
    fused_calls = [s for s, ev in launches.items() if ev.op == "fused"]
    if fused or fused_calls:
        seen = {r.get("vdiag_seq") for r in fused}
        missing = [s for s in fused_calls if s not in seen]
        line = (f"rank {rank}: CUPTI observed {len(fused)} fused-kernel launches; {agree} of {matched} matched "
                f"to a replay call have the computed grid, block and cluster")
        if missing:
            line += f"; {len(missing)} fused calls have no CUPTI launch (first seq {missing[0]})"
        if unmatched:
            line += f"; {unmatched} launches carry no replay call"
        out.append(line + (": agree" if not bad and not missing and matched else ": DISAGREE" if bad else ""))
    out.extend(bad[:max_lines])
    if len(bad) > max_lines:
        out.append(f"rank {rank}: {len(bad) - max_lines} more disagreements in launch/rank{rank}.cupti.jsonl")
    return out


def cupti_findings(run_dir: Path, logs: dict[int, Any], hang: bool = False) -> tuple[list[str], list[str]]:
    """(launch-configuration checks, report notes) from the ranks' CUPTI files; nothing without files."""
    checks: list[str] = []
    notes: list[str] = []
    off: dict[str, list[int]] = {}
    total = 0
    for r in sorted(logs):
        recs = read_cupti(cupti_file(run_dir, r))
        if not recs:
            continue
        status = next((x for x in recs if x.get("ev") == "cupti_status"), None)
        if status is not None and not status.get("ok"):
            off.setdefault(str(status.get("reason") or "unknown"), []).append(r)
            continue
        kern = [x for x in recs if x.get("ev") == "cupti_launch"]
        total += len(kern)
        errors = [x for x in recs if x.get("ev") == "cupti_error"]
        if errors:
            notes.append(f"CUPTI callback errors on rank {r}: {len(errors)} (first: {errors[0].get('error')})")
        launches = {ev.seq: ev for ev in getattr(logs[r], "launches", [])}
        checks.extend(compare_rank(r, recs, launches))
    for reason, ranks in off.items():
        notes.append(f"{reason} (ranks {','.join(map(str, ranks))}); the run carried on without it")
    if total:
        notes.append(f"CUPTI launch trace: {total} matching kernel launches recorded in launch/rank*.cupti.jsonl")
        if hang:
            notes.append(
                "CUPTI was on: the driver disables user-triggered core dumps and cuda-gdb cannot start CUDA "
                "debugging in a process with a CUPTI subscriber (measured on the H100), so the hung launches' "
                "configurations come from the CUPTI records; run without VDIAG_CUPTI for the GPU state"
            )
    return checks, notes
