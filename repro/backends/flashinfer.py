"""The `flashinfer` backend: FlashInfer's real fused all-reduce + residual + RMSNorm on CUDA.

* Workspace: `trtllm_create_ipc_workspace_for_all_reduce_fusion` over the scenario's group.
  - `workspace_group: tp`, ranks with a GPU each: the default path (torch symmetric memory) over the TP
    group, as vLLM does since #45917.
  - `workspace_group: tp`, ranks sharing a GPU: `use_symm_dev_mem=True, create_metadata=True,
    comm_backend=TorchDistBackend(tp_group)`; the torch symmetric-memory path refuses overlapping devices.
  - `workspace_group: world`: FlashInfer 0.6.10-0.6.14's behaviour when vLLM passed no group: the
    symmetric-memory rendezvous over WORLD with the TP size, so every rank takes the buffers of WORLD
    ranks 0..tp-1 (the stage-0 ranks with PP > 1). In 0.7.2.post1 that is still the default path with
    `group=None`; ranks that share a GPU need TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1, set here.
  After the rendezvous every rank writes a marker into the buffer it believes its own and reads the
  markers behind each peer pointer, so the workspace record names who really owns each buffer.
* Calls: `flashinfer.comm.trtllm_allreduce_fusion` with the scenario's pattern, dtype, fp32_acc and
  trigger_completion_at_end, vLLM's launch_with_pdl=True and the replay's one-shot choice. In the capture
  loop's captured run, the call is captured into a real CUDA graph (torch.cuda.CUDAGraph) and the graph
  replayed, as vLLM replays its captured decode graphs; warm-up runs launch eagerly. Outputs come back to
  the host per call for repro/checking.py (the whole row: the payload is the full hidden width).
* Launch arithmetic inputs from this device: SM count from torch.cuda.get_device_properties, registers
  per block from the driver, each kernel variant's register count from the JIT module's cubin
  (cuobjdump) and the max cluster size from the same occupancy query FlashInfer makes since 0.6.16
  (cuOccupancyMaxPotentialClusterSize, 128 threads). What could not be measured falls back to the
  scenario's device and is said so in the rank's log.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from repro.backends.base import CallSpec, WorkspaceInfo
from repro.backends.gpu_reference import TORCH_DTYPES, unfused_allreduce_rmsnorm_cuda

PATTERN_CODES = {"allreduce": 0, "residual_rmsnorm": 1, "residual_rmsnorm_fp8": 2, "residual_rmsnorm_fp4": 3}
CTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
SHARED_ENV = "VDIAG_SHARED_GPU"


def _log(msg: str) -> None:
    print(f"[vdiag flashinfer] {msg}", file=sys.stderr, flush=True)


class _CudaArray:
    """A raw device pointer seen as a 1-D array (__cuda_array_interface__), for torch.as_tensor."""

    def __init__(self, ptr: int, n: int, typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": (n,), "typestr": typestr, "data": (int(ptr), False), "version": 2, "strides": None,
        }


def raw_tensor(ptr: int, n: int, typestr: str = "<i8") -> Any:
    import torch

    return torch.as_tensor(_CudaArray(ptr, n, typestr), device=torch.device("cuda", torch.cuda.current_device()))


# ---- kernel facts from the JIT module ---------------------------------------------------------------

_KERNEL_RE = re.compile(
    r"allreduce_fusion_kernel_(?P<kind>oneshot_lamport|twoshot_sync)<(?P<args>[^()]*(?:\([^()]*\)[^()<>]*)*)>"
)


def parse_kernel_args(demangled: str) -> tuple[str, int, str, int, bool, bool | None] | None:
    """(kind, pattern code, C type, NRanks, Fp32Acc, TriggerCompletionAtEnd or None) of a demangled
    `allreduce_fusion_kernel_*<...>` name; None for any other kernel."""
    m = _KERNEL_RE.search(demangled)
    if not m:
        return None
    args = [a.strip() for a in m["args"].split(",")]
    if len(args) < 4:
        return None
    pm = re.search(r"(\d+)\s*$", args[0])
    if pm is None:
        return None
    kind = "oneshot" if m["kind"].startswith("oneshot") else "twoshot"
    trig = None if len(args) < 5 else args[4] == "true"
    try:
        nranks = int(args[2])
    except ValueError:
        return None
    return kind, int(pm[1]), args[1], nranks, args[3] == "true", trig


def parse_resource_usage(text: str) -> dict[str, int]:
    """mangled kernel name -> registers per thread, from `cuobjdump --dump-resource-usage`."""
    out: dict[str, int] = {}
    for m in re.finditer(r"Function\s+(\S+?)\s*:\s*REG:(\d+)", text):
        out[m[1]] = int(m[2])
    return out


def _cluster_limit(cubin: bytes, mangled: str, block: int = 128) -> int:
    """cuOccupancyMaxPotentialClusterSize for `mangled` in `cubin` with `block` threads (FlashInfer's
    GetMaxClusterSize: grid 8, no cluster attribute)."""
    from cuda.bindings import driver

    err, mod = driver.cuModuleLoadData(cubin)
    if int(err) != 0:
        raise RuntimeError(f"cuModuleLoadData: {err}")
    try:
        err, fn = driver.cuModuleGetFunction(mod, mangled.encode())
        if int(err) != 0:
            raise RuntimeError(f"cuModuleGetFunction: {err}")
        cfg = driver.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = 8, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
        cfg.sharedMemBytes = 0
        cfg.numAttrs = 0
        err, n = driver.cuOccupancyMaxPotentialClusterSize(fn, cfg)
        if int(err) != 0 or int(n) < 1:
            return 1
        return int(n)
    finally:
        driver.cuModuleUnload(mod)


def kernel_facts(lib_path: Path, sm_version: int) -> dict[str, Any]:
    """Registers per kernel variant and the one-shot kernels' max cluster size, from the module's cubin.

    Cached next to the module (one cuobjdump per build). Keys of "regs"/"cluster": "kind|pattern|ctype|
    nranks|acc|trig". Never raises: {"error": ...} when the facts cannot be had.
    """
    cache = lib_path.with_name(lib_path.name + f".vdiag-facts-sm{sm_version}.json")
    with contextlib.suppress(OSError, ValueError):
        if cache.stat().st_mtime >= lib_path.stat().st_mtime:
            data: dict[str, Any] = json.loads(cache.read_text())
            return data
    from repro.cupti_trace import demangle
    from repro.tools import which

    exe = which("cuobjdump")
    if exe is None:
        return {"error": "cuobjdump not found (CUDA toolkit)"}
    try:
        res = subprocess.run([exe, "--dump-resource-usage", str(lib_path)], capture_output=True, text=True,
                             timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"cuobjdump failed: {e}"}
    regs: dict[str, int] = {}
    mangled_of: dict[str, str] = {}
    for mangled, n in parse_resource_usage(res.stdout).items():
        key = parse_kernel_args(demangle(mangled))
        if key is None:
            continue
        k = "|".join(str(x) for x in key)
        regs[k] = n
        mangled_of[k] = mangled
    facts: dict[str, Any] = {"regs": regs, "cluster": {}, "lib": str(lib_path)}
    if not regs:
        facts["error"] = "no allreduce_fusion kernels in cuobjdump's resource usage"
    try:
        with tempfile.TemporaryDirectory(prefix="vdiag-cubin-") as d:
            subprocess.run([exe, "-xelf", "all", str(lib_path)], cwd=d, capture_output=True, timeout=120,
                           check=False)
            arch = f"sm_{sm_version}"
            cubins = sorted(glob.glob(os.path.join(d, f"*{arch}a*.cubin"))) + sorted(
                glob.glob(os.path.join(d, f"*{arch}*.cubin")))
            blobs = [Path(c).read_bytes() for c in dict.fromkeys(cubins)]
            for k, mangled in mangled_of.items():
                if not k.startswith("oneshot"):
                    continue
                for blob in blobs:
                    if mangled.encode() not in blob:
                        continue
                    try:
                        facts["cluster"][k] = _cluster_limit(blob, mangled)
                    except Exception as e:
                        facts.setdefault("cluster_error", f"{type(e).__name__}: {e}")
                    break
    except Exception as e:
        facts["cluster_error"] = f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(facts))
        os.replace(tmp, cache)
    return facts


def _max_registers_per_block(device_index: int) -> int | None:
    with contextlib.suppress(Exception):
        from cuda.bindings import driver

        attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK
        err, v = driver.cuDeviceGetAttribute(attr, device_index)
        if int(err) == 0:
            return int(v)
    return None


# ---- the backend ------------------------------------------------------------------------------------


class FlashInferBackend:
    name = "flashinfer"

    def __init__(self, *, sc: Any, rank: int, tp_group: Any, tp_ranks: tuple[int, ...], max_tokens: int,
                 shared: bool) -> None:
        import torch

        self.torch = torch
        self.sc = sc
        self.rank = rank
        self.tp = sc.parallel.tp
        self.tp_rank = tp_ranks.index(rank)
        self.tp_group = tp_group
        self.tp_ranks = tp_ranks
        self.max_tokens = max_tokens
        self.shared = shared
        self.hidden = sc.model.hidden_size
        self.dtype = sc.model.dtype
        self.tdtype = getattr(torch, TORCH_DTYPES[self.dtype])
        self.pattern = sc.fusion.pattern
        self.pattern_code = PATTERN_CODES[self.pattern]
        self.fp32_acc = bool(sc.fusion.fp32_acc) and self.dtype != "fp32"
        self.trigger = bool(sc.fusion.trigger_completion_at_end)
        self.device_index = torch.cuda.current_device()
        self.device = torch.device("cuda", self.device_index)
        props = torch.cuda.get_device_properties(self.device_index)
        self.device_name = str(props.name)
        self.sm_count = int(props.multi_processor_count)
        self.sm_version = int(props.major) * 10 + int(props.minor)
        self.max_regs = _max_registers_per_block(self.device_index) or sc.device.max_registers_per_block
        self.facts: dict[str, Any] = {}
        self.ipc: Any = None
        self.ws_tensor: Any = None
        self.metadata: dict[str, Any] | None = None
        self.keep: list[Any] = []
        self.path = ""
        self._gamma_src: np.ndarray | None = None
        n, h = max_tokens, self.hidden
        self.d_in = torch.empty((n, h), dtype=self.tdtype, device=self.device)
        self.d_res = torch.empty_like(self.d_in)
        self.d_res_out = torch.empty_like(self.d_in)
        self.d_norm = torch.empty_like(self.d_in) if self.pattern in ("residual_rmsnorm",) else None
        self.d_gamma = torch.ones((h,), dtype=self.tdtype, device=self.device)
        self.d_quant: Any = None
        self.d_scale_out: Any = None
        self.d_scale_factor: Any = None
        if self.pattern == "residual_rmsnorm_fp8":
            self.d_quant = torch.empty((n, h), dtype=torch.float8_e4m3fn, device=self.device)
            self.d_scale_factor = torch.ones((1,), dtype=torch.float32, device=self.device)
        elif self.pattern == "residual_rmsnorm_fp4":
            from flashinfer.comm import trtllm_ar

            self.d_quant = torch.empty((n, h // 2), dtype=torch.uint8, device=self.device)
            sf = trtllm_ar.compute_fp4_swizzled_layout_sf_size(n, h // 16)
            self.d_scale_out = torch.empty((sf,), dtype=torch.uint8, device=self.device)
            self.d_scale_factor = torch.ones((1,), dtype=torch.float32, device=self.device)
        pin = torch.cuda.is_available()
        self.h_x = torch.empty((n, h), dtype=torch.float32, pin_memory=pin)
        self.h_r = torch.empty((n, h), dtype=torch.float32, pin_memory=pin)
        self.h_x_np = self.h_x.numpy()
        self.h_r_np = self.h_r.numpy()
        self.capture_stream = torch.cuda.Stream(device=self.device)

    # ---- what the launch arithmetic uses ----------------------------------------------------------
    def _fact_key(self, oneshot: bool) -> str:
        ctype = CTYPES[self.dtype]
        acc = "True" if self.fp32_acc else "False"
        if oneshot:
            return f"oneshot|{self.pattern_code}|{ctype}|{self.tp}|{acc}|{self.trigger}"
        return f"twoshot|{self.pattern_code}|{ctype}|{self.tp}|{acc}|None"

    def launch_attrs(self, oneshot: bool) -> dict[str, int]:
        """Keyword arguments for repro.kernel_launch.launch_config from this device and module."""
        dev = self.sc.device
        regs = self.facts.get("regs", {}).get(self._fact_key(oneshot), dev.regs_per_thread)
        # FlashInfer queries the one-shot kernel's cluster limit (trigger=true variant) for both protocols.
        ckey = f"oneshot|{self.pattern_code}|{CTYPES[self.dtype]}|{self.tp}|{'True' if self.fp32_acc else 'False'}|True"
        cluster = self.facts.get("cluster", {}).get(ckey, dev.max_cluster_size)
        return dict(sm_count=self.sm_count, sm_version=self.sm_version, max_registers_per_block=self.max_regs,
                    regs_per_thread=int(regs), max_cluster_size=int(cluster))

    def call_args(self, spec: CallSpec) -> dict[str, Any]:
        """The arguments the fused call passes to FlashInfer (for the launch record)."""
        return {
            "fn": "flashinfer.comm.trtllm_allreduce_fusion", "world_size": self.tp, "world_rank": self.tp_rank,
            "token_num": spec.token_num, "hidden_dim": self.hidden, "dtype": self.dtype,
            "use_oneshot": spec.oneshot, "launch_with_pdl": True, "trigger_completion_at_end": self.trigger,
            "fp32_acc": self.fp32_acc, "pattern_code": self.pattern_code, "rms_eps": spec.eps,
            "cuda_graph": spec.graph, "workspace": self.path, "device": f"cuda:{self.device_index}",
            **{f"dev_{k}": v for k, v in self.launch_attrs(spec.oneshot).items()},
        }

    # ---- workspace ----------------------------------------------------------------------------------
    def _load_module(self) -> None:
        from flashinfer.comm.trtllm_ar import get_trtllm_comm_module

        get_trtllm_comm_module()
        with contextlib.suppress(Exception):
            from flashinfer.jit.comm import gen_trtllm_comm_module

            lib = Path(gen_trtllm_comm_module().get_library_path())
            self.facts = kernel_facts(lib, self.sm_version)
        if self.facts.get("error") or not self.facts.get("regs"):
            _log(f"kernel register counts not measured ({self.facts.get('error', 'no module')}); using the "
                 f"scenario device's {self.sc.device.regs_per_thread}")
        if self.facts.get("cluster_error") or not self.facts.get("cluster"):
            _log(f"cluster limit not measured ({self.facts.get('cluster_error', 'no cubin')}); using "
                 f"{self.sc.device.max_cluster_size}")

    def create_workspace(self, rendezvous: str) -> WorkspaceInfo:
        import torch.distributed as dist

        world = dist.get_world_size()
        error = ""
        kwargs: dict[str, Any] = {"create_metadata": True, "use_fp32_lamport": self.dtype == "fp32"}
        symm_dev = False
        if rendezvous == "world":
            group_ranks = tuple(range(world))
            kwargs["group"] = None  # FlashInfer falls back to WORLD, as 0.6.10-0.6.14 did for vLLM
            self.path = "torch symmetric memory over WORLD with the TP size (FlashInfer 0.6.10-0.6.14, no group passed)"
            if self.shared:
                os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
        elif self.shared:
            from flashinfer.comm.mnnvl import TorchDistBackend

            group_ranks = self.tp_ranks
            symm_dev = True
            kwargs.update(group=self.tp_group, use_symm_dev_mem=True, comm_backend=TorchDistBackend(group=self.tp_group))
            self.path = "symmetric device memory over the TP group (use_symm_dev_mem, TorchDistBackend)"
        else:
            group_ranks = self.tp_ranks
            kwargs["group"] = self.tp_group
            self.path = "torch symmetric memory over the TP group"
        try:
            self._load_module()
            from flashinfer.comm import trtllm_create_ipc_workspace_for_all_reduce_fusion

            out = trtllm_create_ipc_workspace_for_all_reduce_fusion(
                self.tp_rank, self.tp, self.max_tokens, self.hidden, **kwargs)
            if symm_dev:
                self.ipc, self.ws_tensor, mem, self.metadata = out
                self.keep.append(mem)
            else:
                self.ipc, self.ws_tensor, self.metadata = out
            self.keep.append(self.ipc)
        except Exception as e:  # vLLM logs a warning and falls back to the unfused path
            error = f"workspace creation failed: {type(e).__name__}: {e}"
            traceback.print_exc()
            self.ipc = None
        writers = self._identify_buffers(world)
        owners = tuple(min(w) if w else -1 for w in writers)
        peers = tuple(
            f"cuda{self.device_index}:buffers-of-rank{min(w)}" if w else f"unidentified-{self.rank}-{i}"
            for i, w in enumerate(writers)
        )
        _log(f"workspace: {self.path}; peer buffers used as own by ranks {writers}; error={error!r}")
        return WorkspaceInfo(
            ok=not error, rendezvous_group=group_ranks, tp_group=self.tp_ranks, peers=peers,
            peer_owner_ranks=owners, error=error,
            extra={"path": self.path, "writers": writers, "device": f"cuda:{self.device_index}"},
        )

    def _identify_buffers(self, world: int) -> list[list[int]]:
        """Which ranks treat each of this rank's peer buffers as their own (a marker per rank in the
        two-shot comm buffer, written before any kernel runs). Every rank joins the barriers."""
        import torch
        import torch.distributed as dist

        own = None
        ptrs: list[int] = []
        me = dist.get_rank()
        if self.ipc is not None:
            ptrs = [int(p) for p in self.ipc[0]]
            own = raw_tensor(ptrs[self.tp_rank], world)
            own.zero_()
            torch.cuda.synchronize()
        dist.barrier()
        if own is not None:
            own[me] = me + 1
            torch.cuda.synchronize()
        dist.barrier()
        writers: list[list[int]] = []
        for p in ptrs:
            vals = raw_tensor(p, world).cpu().tolist()
            writers.append([r for r, v in enumerate(vals) if v == r + 1])
        dist.barrier()
        if own is not None:
            own.zero_()
            torch.cuda.synchronize()
        dist.barrier()
        return writers

    def offset_flag(self, offset: int) -> None:
        """Move this rank's Lamport flag (control flags[2], the triple-buffer index) by `offset`."""
        if self.ws_tensor is None:
            return
        torch = self.torch
        torch.cuda.synchronize()
        flag_ptr = int(self.ws_tensor[-1].item())
        flags = raw_tensor(flag_ptr, 5, "<i4")
        v = int(flags[2].item())
        flags[2] = (v + offset) % 3
        torch.cuda.synchronize()
        _log(f"Lamport flag moved from {v} to {(v + offset) % 3}")

    # ---- calls --------------------------------------------------------------------------------------
    def _launch(self, n: int, spec: CallSpec) -> None:
        from flashinfer.comm import trtllm_allreduce_fusion

        trtllm_allreduce_fusion(
            allreduce_in=self.d_in[:n], world_size=self.tp, world_rank=self.tp_rank, token_num=n,
            hidden_dim=self.hidden, workspace_ptrs=self.ws_tensor, launch_with_pdl=True,
            trigger_completion_at_end=self.trigger, fp32_acc=self.fp32_acc, pattern_code=self.pattern_code,
            use_oneshot=spec.oneshot, allreduce_out=None, residual_in=self.d_res[:n],
            residual_out=self.d_res_out[:n], norm_out=self.d_norm[:n] if self.d_norm is not None else None,
            quant_out=self.d_quant[:n] if self.d_quant is not None else None, scale_out=self.d_scale_out,
            rms_gamma=self.d_gamma, rms_eps=spec.eps, scale_factor=self.d_scale_factor,
            layout_code=0 if self.pattern == "residual_rmsnorm_fp4" else None, metadata=self.metadata,
        )

    def fused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, spec: CallSpec
    ) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        n = x.shape[0]
        if self.ws_tensor is None:
            raise RuntimeError("the fused call needs a workspace; creation failed on this rank")
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens exceed the workspace's max_token_num {self.max_tokens}")
        if x.shape[1] != self.hidden:
            raise ValueError(f"the flashinfer backend carries the full hidden width {self.hidden}, got {x.shape[1]}")
        if self._gamma_src is not gamma:
            self.d_gamma.copy_(torch.from_numpy(np.array(gamma, dtype=np.float32)))
            self._gamma_src = gamma
        self.h_x_np[:n] = x
        self.h_r_np[:n] = residual
        self.d_in[:n].copy_(self.h_x[:n], non_blocking=True)
        self.d_res[:n].copy_(self.h_r[:n], non_blocking=True)
        from repro import cupti_trace

        cupti_trace.set_call(spec.seq, spec.graph)
        if spec.graph:
            # A private memory pool per graph (nothing is allocated inside): reusing one pool handle after
            # its graphs were freed trips an allocator assertion in torch 2.11.
            g = torch.cuda.CUDAGraph()
            s = self.capture_stream
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                g.capture_begin(capture_error_mode="thread_local")
                try:
                    self._launch(n, spec)
                finally:
                    g.capture_end()
            torch.cuda.current_stream().wait_stream(s)
            g.replay()
        else:
            self._launch(n, spec)
        res_out = self.d_res_out[:n].float().cpu().numpy()  # waits for the kernel (a hang stops here)
        cupti_trace.set_call(None)
        norm = self.d_norm[:n].float().cpu().numpy() if self.d_norm is not None else None
        return res_out, norm  # type: ignore[return-value]  # norm is None for the quantising patterns

    def unfused(
        self, x: np.ndarray, residual: np.ndarray, gamma: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        return unfused_allreduce_rmsnorm_cuda(x, residual, gamma, eps, self.tp_group, dtype=self.dtype,
                                              nccl=not self.shared)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.torch.cuda.synchronize()


def make(sc: Any, rank: int, tp_group: Any, tp_ranks: tuple[int, ...], max_tokens: int) -> FlashInferBackend:
    """The replay's factory (repro.engines.replay.replay._make_backend)."""
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    shared = os.environ.get(SHARED_ENV) == "1" or local_world > torch.cuda.device_count()
    return FlashInferBackend(sc=sc, rank=rank, tp_group=tp_group, tp_ranks=tp_ranks, max_tokens=max_tokens,
                             shared=shared)
