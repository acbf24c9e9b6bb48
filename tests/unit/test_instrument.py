"""The instrumentation around FlashInfer and vLLM's start-up, on the CPU.

FlashInfer is replaced by a fake package tree (in sys.modules) whose functions carry FlashInfer's REAL
signatures: the parameter names and defaults below were read from flashinfer-python's wheels
(flashinfer/comm/trtllm_ar.py and allreduce.py) for each version named. They are signature facts only,
no code. Where flashinfer-python imports on this machine, a second test checks these facts against the
installed package with `inspect.signature`.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from repro.engines.vllm import instrument
from repro.events import LaunchLogWriter, read_rank_log
from repro.kernel_launch import launch_config

# ---- signature facts: (positional-or-keyword parameters, those with defaults, keyword-only) ----------
_LEGACY_AR = [
    "allreduce_in", "world_size", "world_rank", "token_num", "hidden_dim", "workspace_ptrs", "launch_with_pdl",
    "trigger_completion_at_end", "fp32_acc", "pattern_code", "use_oneshot", "allreduce_out", "residual_in",
    "residual_out", "norm_out", "quant_out", "scale_out", "rms_gamma", "rms_eps", "scale_factor", "layout_code",
    "metadata",
]
_LEGACY_WS_053 = ["tp_rank", "tp_size", "max_token_num", "hidden_dim", "use_fp32_lamport", "group", "create_metadata"]
_LEGACY_WS = [*_LEGACY_WS_053, "comm_backend", "use_symm_dev_mem"]
_UNIFIED_AR_0611 = [
    "input", "workspace", "pattern", "launch_with_pdl", "trigger_completion_at_end", "output", "residual_out",
    "norm_out", "quant_out", "scale_out", "residual_in", "rms_gamma", "rms_eps", "scale_factor", "layout_code",
    "use_oneshot", "fp32_acc", "moe_reduction_device_num_experts", "moe_reduction_scale_input",
    "moe_reduction_active_experts_token_input", "moe_reduction_token_input", "expanded_idx_to_permuted_idx",
    "expert_scale_factor", "shared_expert_output", "block_quant_group_size",
]
_UNIFIED_WS = ["backend", "world_size", "rank", "max_token_num", "hidden_dim", "dtype", "gpus_per_node",
               "comm_backend", "force_oneshot_support", "group"]
_CUTEDSL_KW = ["top_k", "rms_eps", "weight_bias", "routed_scaling_factor", "include_shared_expert", "add_residual",
               "write_residual_output", "apply_rms_norm", "output_dtype", "dynamic_fp8", "write_norm_output", "config"]

SIGNATURES: dict[str, dict[str, tuple[list[str], set[str], list[str]]]] = {
    # vLLM 0.12-0.16 (legacy API)
    "0.5.3": {
        "trtllm_allreduce_fusion": (_LEGACY_AR, {"metadata"}, []),
        "trtllm_create_ipc_workspace_for_all_reduce_fusion": (
            _LEGACY_WS_053, {"use_fp32_lamport", "group", "create_metadata"}, []),
    },
    # vLLM 0.22.0 (gate removed, no TP group passed): the aliasing window
    "0.6.11.post2": {
        "trtllm_allreduce_fusion": ([*_LEGACY_AR, "block_quant_group_size"], {"metadata", "block_quant_group_size"}, []),
        "trtllm_create_ipc_workspace_for_all_reduce_fusion": (
            _LEGACY_WS, {"use_fp32_lamport", "group", "create_metadata", "comm_backend", "use_symm_dev_mem"}, []),
        "allreduce_fusion": (_UNIFIED_AR_0611, set(_UNIFIED_AR_0611[3:]), []),
        "create_allreduce_fusion_workspace": (_UNIFIED_WS, set(_UNIFIED_WS), []),
    },
    # vLLM 0.33.0, the newest on PyPI
    "0.7.2.post1": {
        "trtllm_allreduce_fusion": ([*_LEGACY_AR, "block_quant_group_size", "weight_bias"],
                                    {"metadata", "block_quant_group_size", "weight_bias"}, []),
        "trtllm_create_ipc_workspace_for_all_reduce_fusion": (
            _LEGACY_WS, {"use_fp32_lamport", "group", "create_metadata", "comm_backend", "use_symm_dev_mem"}, []),
        "allreduce_fusion": ([*_UNIFIED_AR_0611, "weight_bias"], set([*_UNIFIED_AR_0611, "weight_bias"][3:]),
                             ["moe_finalize_backend"]),
        "create_allreduce_fusion_workspace": (_UNIFIED_WS, set(_UNIFIED_WS), _CUTEDSL_KW),
    },
}


def _signature(params: list[str], defaults: set[str], kwonly: list[str]) -> inspect.Signature:
    P = inspect.Parameter
    ps = [P(n, P.POSITIONAL_OR_KEYWORD, **({"default": None} if n in defaults else {})) for n in params]
    ps += [P(n, P.KEYWORD_ONLY, default=None) for n in kwonly]
    return inspect.Signature(ps)


# ---- a fake FlashInfer with those signatures ------------------------------------------------------------


@dataclass
class FakeGroup:
    ranks: tuple[int, ...]


class FakeCommBackend:  # FlashInfer's TorchDistBackend keeps its group in `_group`
    def __init__(self, group: FakeGroup | None) -> None:
        self._group = group


class FakeWorkspace:
    def __init__(self, tp_size: int, tp_rank: int, inner: Any) -> None:
        self.world_size = tp_size
        self.rank = tp_rank
        self.ipc_handles, self.workspace_tensor, self.metadata = inner[0], inner[1], inner[-1]

    @property
    def backend(self) -> str:
        return "trtllm"


class FakeFlashInfer:
    """Builds flashinfer, flashinfer.comm, .trtllm_ar and .allreduce modules for one version's signatures."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.sigs = {name: _signature(*facts) for name, facts in SIGNATURES[version].items()}

    def _make(self, name: str) -> Any:
        # Compiled from a string: no source file, as for an installed package whose source cannot be read.
        ns: dict[str, Any] = {"_impl": getattr(self, "_" + name), "_sig": self.sigs[name]}
        exec(compile(f"def {name}(*args, **kwargs):\n    return _impl(_sig.bind(*args, **kwargs))\n",
                     "<fake-flashinfer>", "exec"), ns)
        fn = ns[name]
        fn.__signature__ = self.sigs[name]
        fn.__module__ = "flashinfer.comm.trtllm_ar" if name.startswith("trtllm") else "flashinfer.comm.allreduce"
        return fn

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fi = types.ModuleType("flashinfer")
        fi.__version__ = self.version  # type: ignore[attr-defined]
        fi.__path__ = []  # type: ignore[attr-defined]
        comm = types.ModuleType("flashinfer.comm")
        comm.__path__ = []  # type: ignore[attr-defined]
        ar = types.ModuleType("flashinfer.comm.trtllm_ar")
        al = types.ModuleType("flashinfer.comm.allreduce")
        for name in self.sigs:
            fn = self._make(name)
            home = ar if name.startswith("trtllm") else al
            setattr(home, name, fn)
            setattr(comm, name, fn)
            if name.startswith("trtllm") and "allreduce_fusion" in self.sigs:
                setattr(al, name, fn)  # allreduce.py imports the legacy functions by name, as FlashInfer's does
        fi.comm = comm  # type: ignore[attr-defined]
        for mod in (fi, comm, ar, al):
            monkeypatch.setitem(sys.modules, mod.__name__, mod)

    # behaviour: record the call; return what FlashInfer returns
    def _trtllm_allreduce_fusion(self, ba: inspect.BoundArguments) -> None:
        self.calls.append(("trtllm_allreduce_fusion", dict(ba.arguments)))

    def _trtllm_create_ipc_workspace_for_all_reduce_fusion(self, ba: inspect.BoundArguments) -> Any:
        ba.apply_defaults()
        a = ba.arguments
        self.calls.append(("trtllm_create_ipc_workspace_for_all_reduce_fusion", dict(a)))
        tp = int(a["tp_size"])
        handles = [[0x7F0000000000 + 0x1000 * (b * 8 + p) for p in range(tp)] for b in range(3)]
        tensor = torch.tensor([p for row in handles for p in row], dtype=torch.int64)
        meta = {"tp_rank": a["tp_rank"], "tp_size": tp}
        return (handles, tensor, meta) if a.get("create_metadata") else (handles, tensor)

    def _create_allreduce_fusion_workspace(self, ba: inspect.BoundArguments) -> Any:
        ba.apply_defaults()
        a = ba.arguments
        self.calls.append(("create_allreduce_fusion_workspace", dict(a)))
        legacy = sys.modules["flashinfer.comm.allreduce"].trtllm_create_ipc_workspace_for_all_reduce_fusion
        inner = legacy(tp_rank=a["rank"], tp_size=a["world_size"], max_token_num=a["max_token_num"],
                       hidden_dim=a["hidden_dim"], group=a["group"], comm_backend=a["comm_backend"],
                       create_metadata=True, use_fp32_lamport=False, use_symm_dev_mem=True)
        return FakeWorkspace(a["world_size"], a["rank"], inner)

    def _allreduce_fusion(self, ba: inspect.BoundArguments) -> Any:
        ba.apply_defaults()
        a = ba.arguments
        self.calls.append(("allreduce_fusion", dict(a)))
        ws = a["workspace"]
        x = a["input"]
        legacy = sys.modules["flashinfer.comm.allreduce"].trtllm_allreduce_fusion
        legacy(allreduce_in=x, world_size=ws.world_size, world_rank=ws.rank, token_num=x.shape[0],
               hidden_dim=x.shape[1], workspace_ptrs=ws.workspace_tensor, launch_with_pdl=a["launch_with_pdl"],
               trigger_completion_at_end=a["trigger_completion_at_end"], fp32_acc=a["fp32_acc"],
               pattern_code=a["pattern"], use_oneshot=a["use_oneshot"], allreduce_out=None, residual_in=None,
               residual_out=None, norm_out=None, quant_out=None, scale_out=None, rms_gamma=None, rms_eps=1e-5,
               scale_factor=None, layout_code=None)
        return x


WORLD4 = FakeGroup((0, 1, 2, 3))


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A fake FlashInfer of a given version, a rank's launch log, and torch.distributed answers."""

    class Rig:
        log_path: Path
        fake: FakeFlashInfer

        def setup(self, version: str, rank: int = 2, tp: int = 2, pp: int = 2) -> FakeFlashInfer:
            self.fake = FakeFlashInfer(version)
            self.fake.install(monkeypatch)
            self.log_path = tmp_path / f"rank{rank}.jsonl"
            writer = LaunchLogWriter(self.log_path, rank)
            monkeypatch.setattr(instrument, "_dist_rank", lambda default: rank)
            monkeypatch.setattr(instrument, "_group_ranks",
                                lambda g: WORLD4.ranks if g is None else tuple(g.ranks))
            instrument.configure(writer, rank, tp, pp, sync=True,
                                 device=instrument.DeviceFacts(sm_count=132, sm_version=90))
            self.counts = instrument.install_flashinfer()
            return self.fake

        def events(self) -> list[dict[str, Any]]:
            return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    yield Rig()
    instrument.uninstall()


def _bf16(tokens: int, hidden: int) -> torch.Tensor:
    return torch.zeros((tokens, hidden), dtype=torch.bfloat16)


# ---- the legacy API (vLLM 0.12-0.16 call these directly) ----------------------------------------------


def test_legacy_calls_write_workspace_launch_and_result(rig: Any) -> None:
    rig.setup("0.5.3", rank=2)
    comm = sys.modules["flashinfer.comm"]
    tp_group = FakeGroup((2, 3))
    ipc, ws_tensor, _meta = comm.trtllm_create_ipc_workspace_for_all_reduce_fusion(
        1 - 1, 2, 512, 8192, use_fp32_lamport=False, group=tp_group, create_metadata=True)
    x = _bf16(16, 8192)
    # vLLM's legacy call passes everything by keyword
    comm.trtllm_allreduce_fusion(
        allreduce_in=x, world_size=2, world_rank=0, token_num=16, hidden_dim=8192, workspace_ptrs=ws_tensor,
        launch_with_pdl=True, trigger_completion_at_end=False, fp32_acc=True, pattern_code=1, use_oneshot=True,
        allreduce_out=None, residual_in=x, residual_out=x, norm_out=x, quant_out=None, scale_out=None,
        rms_gamma=None, rms_eps=1e-5, scale_factor=None, layout_code=None)
    evs = rig.events()
    kinds = [e["ev"] for e in evs]
    assert kinds == ["phase", "workspace", "phase", "launch", "result"]
    ws = evs[1]
    assert ws["rendezvous_group"] == [2, 3] and ws["tp_group"] == [2, 3]
    assert ws["peers"] == ["rank2", "rank3"] and ws["peer_owner_ranks"] == [2, 3]
    assert ws["ok"] and not ws["fallback"] and ws["peer_ptrs"][0][0] == hex(ipc[0][0])
    launch = evs[3]
    want = launch_config(token_num=16, hidden=8192, elem_bytes=2, oneshot=True, nranks=2, sm_count=132)
    assert launch["grid"] == list(want.grid) == [128, 1, 1]
    assert launch["cluster"] == [8, 1, 1] and launch["kernel"] == want.kernel
    assert launch["token_num"] == 16 and launch["hidden"] == 8192 and launch["dtype"] == "bf16"
    assert launch["oneshot"] is True and launch["ws"] == "rank2,rank3" and launch["op"] == "fused"
    assert launch["args"]["pattern"] == "residual_rmsnorm" and launch["args"]["world_rank"] == 0
    assert evs[4]["seq"] == launch["seq"] and evs[4]["ok"] is True and evs[4]["kind"] == "unchecked"
    # The typed parse the analysis uses accepts every record.
    parsed = read_rank_log(rig.log_path, 2)
    assert not parsed.errors and parsed.workspace is not None and len(parsed.launches) == 1


def test_legacy_workspace_without_group_is_world(rig: Any) -> None:
    """vLLM passing no group: the rendezvous is WORLD and rank 2's peers are the stage-0 ranks' buffers."""
    rig.setup("0.5.3", rank=2)
    comm = sys.modules["flashinfer.comm"]
    comm.trtllm_create_ipc_workspace_for_all_reduce_fusion(0, 2, 512, 8192, create_metadata=True)
    ws = next(e for e in rig.events() if e["ev"] == "workspace")
    assert ws["rendezvous_group"] == [0, 1, 2, 3] and ws["tp_group"] == [2, 3]
    assert ws["peers"] == ["rank0", "rank1"]
    assert "WORLD" in ws["rendezvous"]


# ---- the unified API (vLLM 0.17+), nested over the legacy one ---------------------------------------------


def _vllm_022_workspace(comm: Any, tp_group: FakeGroup, *, pass_group: bool) -> Any:
    kwargs: dict[str, Any] = dict(backend="trtllm", world_size=2, rank=0, max_token_num=512, hidden_dim=4096,
                                  dtype=torch.bfloat16, comm_backend=FakeCommBackend(tp_group))
    if pass_group:
        kwargs["group"] = tp_group  # vLLM 0.24+ (#45917)
    return comm.create_allreduce_fusion_workspace(**kwargs)


def test_flashinfer_0611_ignores_comm_backend_so_vllm_022_aliases(rig: Any) -> None:
    fake = rig.setup("0.6.11.post2", rank=2)
    comm = sys.modules["flashinfer.comm"]
    _vllm_022_workspace(comm, FakeGroup((2, 3)), pass_group=False)
    ws = [e for e in rig.events() if e["ev"] == "workspace"]
    assert len(ws) == 1, "the nested legacy call must not write a second record"
    assert ws[0]["rendezvous_group"] == [0, 1, 2, 3] and ws[0]["peers"] == ["rank0", "rank1"]
    assert "ignores comm_backend" in ws[0]["rendezvous"] and "underneath" in ws[0]["rendezvous"]
    assert [c[0] for c in fake.calls] == ["create_allreduce_fusion_workspace",
                                          "trtllm_create_ipc_workspace_for_all_reduce_fusion"]


def test_tp_group_passed_gives_tp_rendezvous(rig: Any) -> None:
    rig.setup("0.6.11.post2", rank=2)
    _vllm_022_workspace(sys.modules["flashinfer.comm"], FakeGroup((2, 3)), pass_group=True)
    ws = next(e for e in rig.events() if e["ev"] == "workspace")
    assert ws["rendezvous_group"] == [2, 3] and ws["peers"] == ["rank2", "rank3"]


def test_flashinfer_072_uses_comm_backend(rig: Any) -> None:
    rig.setup("0.7.2.post1", rank=3)
    _vllm_022_workspace(sys.modules["flashinfer.comm"], FakeGroup((2, 3)), pass_group=False)
    ws = next(e for e in rig.events() if e["ev"] == "workspace")
    assert ws["rendezvous_group"] == [2, 3] and ws["peers"] == ["rank2", "rank3"]
    assert ws["rendezvous"].startswith("comm_backend")


@pytest.mark.parametrize("version", ["0.6.11.post2", "0.7.2.post1"])
def test_unified_fused_call_is_recorded_once(rig: Any, version: str) -> None:
    fake = rig.setup(version, rank=2)
    comm = sys.modules["flashinfer.comm"]
    ws = _vllm_022_workspace(comm, FakeGroup((2, 3)), pass_group=True)
    x = _bf16(17, 4096)
    # as vLLM 0.22-0.33 call it (keywords); use_oneshot None lets FlashInfer choose
    comm.allreduce_fusion(input=x, workspace=ws, pattern=1, launch_with_pdl=True, output=None, residual_out=x,
                          norm_out=x, quant_out=None, scale_out=None, residual_in=x, rms_gamma=None, rms_eps=1e-5,
                          scale_factor=None, layout_code=None, use_oneshot=None, fp32_acc=True,
                          trigger_completion_at_end=True)
    launches = [e for e in rig.events() if e["ev"] == "launch"]
    assert len(launches) == 1 and [c[0] for c in fake.calls][-2:] == ["allreduce_fusion", "trtllm_allreduce_fusion"]
    ev = launches[0]
    assert ev["token_num"] == 17 and ev["hidden"] == 4096 and ev["oneshot"] is True  # FlashInfer's size rule
    assert ev["args"]["entry"] == "allreduce_fusion" and ev["args"]["fi_backend"] == "trtllm"
    assert ev["ws"] == "rank2,rank3" and ev["args"]["world_size"] == 2
    want = launch_config(token_num=17, hidden=4096, elem_bytes=2, oneshot=True, nranks=2, sm_count=132)
    assert ev["grid"] == list(want.grid)


def test_failed_workspace_is_a_fallback_record(rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = rig.setup("0.7.2.post1", rank=1, tp=2, pp=1)

    def boom(ba: inspect.BoundArguments) -> Any:
        raise RuntimeError("bcast root out of range")

    monkeypatch.setattr(fake, "_create_allreduce_fusion_workspace", boom)
    instrument.uninstall()
    fake.install(monkeypatch)
    writer = LaunchLogWriter(rig.log_path, 1)
    instrument.configure(writer, 1, 2, 1)
    instrument.install_flashinfer()
    with pytest.raises(RuntimeError):
        _vllm_022_workspace(sys.modules["flashinfer.comm"], FakeGroup((0, 1)), pass_group=True)
    ws = next(e for e in rig.events() if e["ev"] == "workspace")
    assert ws["ok"] is False and ws["fallback"] is True and "bcast root" in ws["error"] and ws["peers"] == []


def test_wrappers_keep_signatures_and_uninstall(rig: Any) -> None:
    rig.setup("0.7.2.post1")
    comm = sys.modules["flashinfer.comm"]
    al = sys.modules["flashinfer.comm.allreduce"]
    for name, facts in SIGNATURES["0.7.2.post1"].items():
        fn = getattr(comm, name)
        assert getattr(fn, "__vdiag_wrapped__", False)
        assert inspect.signature(fn) == _signature(*facts)
    assert getattr(al.trtllm_create_ipc_workspace_for_all_reduce_fusion, "__vdiag_wrapped__", False)
    assert rig.counts["allreduce_fusion"] == 2 and rig.counts["trtllm_allreduce_fusion"] == 3
    instrument.uninstall()
    assert not getattr(comm.allreduce_fusion, "__vdiag_wrapped__", False)
    assert not getattr(al.trtllm_allreduce_fusion, "__vdiag_wrapped__", False)


def test_reinstall_reaches_names_imported_later(rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM modules imported after the first install that did `from flashinfer.comm import ...`."""
    rig.setup("0.7.2.post1")
    late = types.ModuleType("vllm.fake_late")
    late.allreduce_fusion = instrument._ORIG_FUNCS["allreduce_fusion"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.fake_late", late)
    counts = instrument.install_flashinfer()
    assert counts["allreduce_fusion"] == 1 and getattr(late.allreduce_fusion, "__vdiag_wrapped__", False)


def test_honours_symm_dev_mem_by_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_source(*a: Any, **k: Any) -> None: ...

    no_source.__code__ = compile("def f(): pass", "<nosrc>", "exec").co_consts[0]
    for version, want in (("0.6.8.post1", True), ("0.6.11.post2", False), ("0.6.14", False),
                          ("0.6.16.post3", True), ("0.7.2.post1", True)):
        fi = types.ModuleType("flashinfer")
        fi.__version__ = version  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "flashinfer", fi)
        assert instrument.honours_symm_dev_mem(no_source) is want, version


# ---- vLLM's start-up progress, with classes shaped like vLLM's ------------------------------------------


@dataclass
class Desc:  # vLLM's BatchDescriptor / BatchExecutionDescriptor: what the loop iterates
    num_tokens: int
    uniform: bool = True
    cg_mode: Any = None


@dataclass
class Mode:
    name: str


class FakeV1Runner:
    """Shaped like vLLM 0.18-0.33's V1 GPUModelRunner: capture_model -> _capture_cudagraphs -> _dummy_run."""

    def __init__(self, comm: Any, ws: Any, layers: int) -> None:
        self.comm, self.ws, self.layers = comm, ws, layers

    def _dummy_run(self, num_tokens: int, cudagraph_runtime_mode: Any = None, **kw: Any) -> None:
        x = _bf16(num_tokens, 4096)
        for _ in range(self.layers * 2):
            self.comm.allreduce_fusion(input=x, workspace=self.ws, pattern=1, use_oneshot=None, fp32_acc=True)

    def profile_run(self) -> None:
        self._dummy_run(64)

    def capture_model(self) -> int:
        self._capture_cudagraphs(batch_descriptors=[Desc(8, uniform=False), Desc(4, uniform=False)],
                                 cudagraph_runtime_mode=Mode("PIECEWISE"))
        self._capture_cudagraphs(batch_descriptors=[Desc(4), Desc(2), Desc(1)], cudagraph_runtime_mode=Mode("FULL"))
        return 0

    def _capture_cudagraphs(self, batch_descriptors: list[Desc], cudagraph_runtime_mode: Any,
                            profiler: Any = None) -> None:
        if not batch_descriptors:
            return
        assert batch_descriptors[0].num_tokens > 0
        for d in batch_descriptors:  # warm-up run, then the captured run
            self._dummy_run(d.num_tokens, cudagraph_runtime_mode=None)
            self._dummy_run(d.num_tokens, cudagraph_runtime_mode=cudagraph_runtime_mode)


class FakeOldV1Runner(FakeV1Runner):
    """vLLM 0.12-0.17: `_capture_cudagraphs(self, compilation_cases: list[int], mode, uniform_decode)`."""

    def capture_model(self) -> int:
        self._capture_cudagraphs([4, 2, 1], Mode("FULL"), True)  # type: ignore[arg-type]
        return 0

    def _capture_cudagraphs(self, compilation_cases: list[int], cudagraph_runtime_mode: Any,  # type: ignore[override]
                            uniform_decode: bool = False) -> None:
        for n in compilation_cases:
            self._dummy_run(n)


class FakeWorker:
    def __init__(self, runner: FakeV1Runner) -> None:
        self.runner = runner

    def compile_or_warm_up_model(self) -> None:
        self.runner._dummy_run(16)
        self.runner.capture_model()


class FakeGraphManager:
    """Shaped like vLLM 0.22-0.33's V2 CudaGraphManager.capture(create_forward_fn, progress_bar_desc)."""

    def __init__(self, sizes: list[int]) -> None:
        self._capture_descs = {"FULL": [Desc(n, cg_mode=Mode("FULL")) for n in sizes]}

    def capture(self, create_forward_fn: Any, progress_bar_desc: str = "Capturing CUDA graphs") -> None:
        for descs in self._capture_descs.values():
            for d in descs:
                create_forward_fn(d, warmup=True)("NONE")
                create_forward_fn(d, warmup=False)("FULL")


def _phases(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["phase"], e.get("index", 0), e.get("total", 0), e.get("size")) for e in events if e["ev"] == "phase"]


def test_v1_startup_progress(rig: Any) -> None:
    rig.setup("0.7.2.post1", rank=0, tp=2, pp=1)
    comm = sys.modules["flashinfer.comm"]
    ws = _vllm_022_workspace(comm, FakeGroup((0, 1)), pass_group=True)
    runner = FakeV1Runner(comm, ws, layers=2)
    done = instrument.install_progress(runners=(FakeV1Runner,), workers=(FakeWorker,))
    assert len(done) == 5
    runner.profile_run()
    FakeWorker(runner).compile_or_warm_up_model()
    evs = rig.events()
    phases = _phases(evs)
    assert phases[:2] == [("workspace", 0, 0, None), ("starting", 0, 0, None)]
    assert ("profile", 0, 0, None) in phases and ("warmup", 0, 0, None) in phases
    caps = [p for p in phases if p[0] == "capture" and p[2]]
    assert caps == [("capture", 0, 2, 8), ("capture", 1, 2, 4), ("capture", 2, 2, None),
                    ("capture", 0, 3, 4), ("capture", 1, 3, 2), ("capture", 2, 3, 1), ("capture", 3, 3, None)]
    labels = {e.get("label") for e in evs if e["ev"] == "phase" and e["phase"] == "capture" and e.get("total")}
    assert labels == {"mixed prefill-decode, PIECEWISE", "decode, FULL"}
    launches = [e for e in evs if e["ev"] == "launch"]
    profile = [e for e in launches if e["phase"] == "profile"]
    assert len(profile) == 4 and profile[0]["size"] == 64 and profile[0]["token_num"] == 64
    assert [(e["layer"], e["sub"]) for e in profile] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    cap = [e for e in launches if e["phase"] == "capture"]
    assert len(cap) == 5 * 2 * 4 and {e["size"] for e in cap} == {8, 4, 2, 1}
    assert [e["seq"] for e in launches] == list(range(len(launches)))
    assert sum(1 for e in evs if e["ev"] == "result") == len(launches)


def test_old_v1_capture_loop_with_positional_sizes(rig: Any) -> None:
    rig.setup("0.5.3", rank=0, tp=2, pp=1)
    instrument.install_progress(runners=(FakeOldV1Runner,))

    class NoFI:
        def allreduce_fusion(self, **kw: Any) -> None: ...

    FakeOldV1Runner(NoFI(), None, layers=1).capture_model()
    caps = [p for p in _phases(rig.events()) if p[0] == "capture" and p[2]]
    assert caps == [("capture", 0, 3, 4), ("capture", 1, 3, 2), ("capture", 2, 3, 1), ("capture", 3, 3, None)]


def test_v2_graph_manager_progress(rig: Any) -> None:
    rig.setup("0.7.2.post1", rank=0, tp=2, pp=1)
    assert instrument.install_progress(graph_managers=(FakeGraphManager,))
    seen: list[tuple[int, bool]] = []

    def create_forward_fn(desc: Desc, warmup: bool = False) -> Any:
        seen.append((desc.num_tokens, warmup))
        return lambda mode: None

    FakeGraphManager([16, 8]).capture(create_forward_fn)
    assert seen == [(16, True), (16, False), (8, True), (8, False)]
    caps = [p for p in _phases(rig.events()) if p[0] == "capture"]
    assert caps == [("capture", 0, 2, 16), ("capture", 1, 2, 8), ("capture", 2, 2, None)]


def test_forked_child_writes_its_own_rank_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's mp executor forks its workers: the first record in the child opens that rank's log with a hello."""
    (tmp_path / "launch").mkdir()
    rec = instrument.configure(None, 0, 2, 2, run_dir=tmp_path)
    rec.pid = -1  # as if this process were a fork of the one that configured
    monkeypatch.setattr(instrument, "_dist_rank", lambda default: 3)
    try:
        rec.set_phase("profile")
    finally:
        instrument.uninstall()
    evs = [json.loads(line) for line in (tmp_path / "launch" / "rank3.jsonl").read_text().splitlines()]
    assert [e["ev"] for e in evs] == ["hello", "phase"] and evs[0]["pp_stage"] == 1 and evs[0]["tp_rank"] == 1


# ---- the installed FlashInfer, where it imports ---------------------------------------------------------


def _real_flashinfer_comm() -> Any:
    if importlib.util.find_spec("flashinfer") is None:
        return None
    try:
        import flashinfer.comm as comm
    except Exception:  # needs cuda-python and friends; a CPU machine may lack them
        return None
    return comm


@pytest.mark.skipif(_real_flashinfer_comm() is None, reason="flashinfer-python does not import here")
def test_signature_facts_match_installed_flashinfer() -> None:
    import flashinfer

    comm = _real_flashinfer_comm()
    version = str(flashinfer.__version__)
    facts = SIGNATURES.get(version)
    if facts is None:
        pytest.skip(f"no signature facts recorded for flashinfer {version}")
    for name, f in facts.items():
        real = inspect.signature(getattr(comm, name))
        assert [p for p in real.parameters] == [*f[0], *f[2]], name
        assert {n for n, p in real.parameters.items() if p.default is not p.empty} >= f[1], name
    # and the wrappers install over the real package, keeping its signatures
    instrument.configure(None, 0, 2, 1)
    try:
        instrument.install_flashinfer()
        for name, f in facts.items():
            wrapped = getattr(comm, name)
            assert getattr(wrapped, "__vdiag_wrapped__", False)
            assert [*inspect.signature(wrapped).parameters] == [*f[0], *f[2]], name
        assert instrument.honours_symm_dev_mem(comm.trtllm_create_ipc_workspace_for_all_reduce_fusion) is True
    finally:
        instrument.uninstall()


# ---- FlashInfer's JIT build lock, with real processes and a real file lock ----------------------------

_FAKE_JIT_CORE = '''
from pathlib import Path
from filelock import FileLock


class JitSpec:
    """FlashInfer's JitSpec as far as the wrapper sees it: a name, a lock path, build_and_load, which takes
    the module's build lock with filelock before building (flashinfer/jit/core.py does the same)."""

    def __init__(self, name, lock_path):
        self.name = name
        self.lock_path = Path(lock_path)

    def build_and_load(self):
        with FileLock(self.lock_path, thread_local=False):
            return "module " + self.name
'''

_CHILD = '''
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
run = Path(sys.argv[2])
from repro.engines.vllm import instrument
from repro.events import LaunchLogWriter
(run / "launch").mkdir(parents=True, exist_ok=True)
rec = instrument.configure(LaunchLogWriter(run / "launch" / "rank0.jsonl", 0), 0, 1, 1, run_dir=run)
rec.set_phase("generate", size=16)
print(instrument.install_flashinfer_jit(), flush=True)
from flashinfer.jit.core import JitSpec
print(JitSpec("sampling", sys.argv[3]).build_and_load(), flush=True)
'''


def test_a_jit_build_waiting_on_a_held_lock_is_named_in_the_report_notes(tmp_path: Path) -> None:
    import subprocess
    import time

    from filelock import FileLock

    from repro.engines.vllm import runner as engine_vllm

    pkg = tmp_path / "fake" / "flashinfer" / "jit"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text(_FAKE_JIT_CORE)
    run, lock_path = tmp_path / "run", tmp_path / "sampling.lock"
    held = FileLock(str(lock_path), thread_local=False)
    held.acquire()  # another process's build of the same module
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "fake"), str(run), str(lock_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jit = run / "vllm" / "jit-rank0.jsonl"
        deadline = time.monotonic() + 60
        while not (jit.exists() and '"enter"' in jit.read_text()) and time.monotonic() < deadline:
            assert child.poll() is None, child.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        assert child.poll() is None  # still waiting for the lock
        notes = engine_vllm.jit_notes(run)
        assert any(n.startswith("rank 0: entered FlashInfer's JIT build of module 'sampling' (phase generate")
                   and str(lock_path) in n for n in notes), notes
        log = read_rank_log(run / "launch" / "rank0.jsonl", 0)
        assert [p.phase for p in log.phases][-2:] == ["generate", "jit"]
        held.release()
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert "flashinfer.jit.core.JitSpec.build_and_load" in out and "module sampling" in out
        notes = engine_vllm.jit_notes(run)
        assert not any("never returned" in n for n in notes)
        assert any(n.startswith("rank 0: FlashInfer JIT modules loaded: sampling (") for n in notes), notes
        log = read_rank_log(run / "launch" / "rank0.jsonl", 0)
        assert [p.phase for p in log.phases][-1] == "generate"  # back to the phase it interrupted
    finally:
        if held.is_locked:
            held.release()
        if child.poll() is None:
            child.kill()
            child.wait()
