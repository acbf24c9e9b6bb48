"""Scenario -> vLLM: LLM(...) arguments, the local config folder, version detection, and the worker
hand-over for `engine: vllm`. No vLLM is needed: the version facts are small source trees written here
with the one line each fact is read from (field declarations, the gate's condition)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from repro.engines.vllm import runner as engine_vllm
from repro.engines.vllm.args import (
    LEGACY_API,
    NEWEST_API,
    VllmApi,
    build_plan,
    detect_api,
    hf_config,
    oversized_batch,
    resolve_executor,
    write_model_dir,
)
from repro.errors import EnvironmentProblem, ScenarioError
from repro.scenario import Scenario, load_scenario, parse_scenario_text

ROOT = Path(__file__).resolve().parents[2]


def _sc(extra: str = "", model: str = "llama-3.1-70b", tp: int = 2, pp: int = 2) -> Scenario:
    return parse_scenario_text(f"name: t\nengine: vllm\nmodel: {model}\nparallel: {{tp: {tp}, pp: {pp}}}\n{extra}")


# ---- version detection from source text ----------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "vllm" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "vllm"


V011 = {  # vLLM 0.11.0: old names, legacy FlashInfer API
    "_version.py": "__version__ = version = '0.11.0'\n__commit_id__ = commit_id = 'gf71952c1c'\n",
    "config/compilation.py": "class PassConfig:\n    enable_fi_allreduce_fusion: bool = False\n"
                             "    enable_noop: bool = False\nclass CompilationConfig:\n    level: int | None = None\n",
    "v1/worker/gpu_model_runner.py": "self.broadcast_pp_output = True\n",
    "compilation/collective_fusion.py": "flashinfer_comm.trtllm_create_ipc_workspace_for_all_reduce_fusion(\n",
}
V023 = {  # vLLM 0.23.0: new names, the gate restored by #43616
    "_version.py": "__version__ = version = '0.23.0'\n__commit_id__ = commit_id = 'g0fc695fc6'\n",
    "config/compilation.py": "class PassConfig:\n    fuse_allreduce_rms: bool = None\n    eliminate_noops: bool = True\n"
                             "class CompilationConfig:\n    mode: CompilationMode = None\n",
    "config/vllm.py": "def enable_allreduce_rms_fusion(cfg):\n    return (\n"
                      "        cfg.parallel_config.tensor_parallel_size > 1\n"
                      "        and cfg.parallel_config.pipeline_parallel_size == 1\n    )\n\n\ndef other():\n    pass\n",
    "v1/worker/gpu_model_runner.py": "broadcast_pp_output = True\n",
    "distributed/device_communicators/flashinfer_all_reduce.py": "flashinfer_comm.create_allreduce_fusion_workspace(\n",
}


def test_detect_old_vllm(tmp_path: Path) -> None:
    api = detect_api(_tree(tmp_path, V011))
    assert (api.version, api.commit) == ("0.11.0", "gf71952c1c")
    assert (api.fusion_flag, api.noop_flag, api.compile_mode_key) == ("enable_fi_allreduce_fusion", "enable_noop", "level")
    assert api.flashinfer_api == "legacy" and api.gate_blocks_pp is None and api.external_launcher_pp


def test_detect_gate_restored(tmp_path: Path) -> None:
    api = detect_api(_tree(tmp_path, V023))
    assert api.version == "0.23.0" and api.fusion_flag == "fuse_allreduce_rms" and api.compile_mode_key == "mode"
    assert api.gate_blocks_pp is True and api.flashinfer_api == "unified"


def test_detect_gate_removed_and_no_pp_broadcast(tmp_path: Path) -> None:
    files = dict(V023)
    files["config/vllm.py"] = "def enable_allreduce_rms_fusion(cfg):\n    return cfg.parallel_config.tensor_parallel_size > 1\n"
    files["v1/worker/gpu_model_runner.py"] = "# no PP output broadcast here\n"
    api = detect_api(_tree(tmp_path, files))
    assert api.gate_blocks_pp is False and api.external_launcher_pp is False
    executor, notes = resolve_executor(_sc(), api)
    assert executor == "mp" and "multiprocessing executor" in notes[0]
    assert resolve_executor(_sc(pp=1), api)[0] == "external_launcher"


def test_detect_without_vllm(tmp_path: Path) -> None:
    api = detect_api(tmp_path / "nowhere")
    assert api.fusion_flag == "fuse_allreduce_rms" and "not found" in api.source


# ---- LLM(...) arguments --------------------------------------------------------------------------------


def test_seed_scenario_translates_to_llm_kwargs(tmp_path: Path) -> None:
    sc = load_scenario(ROOT / "scenarios" / "llama70b-pp2-tp2-fusion.yaml",
                       ["engine=vllm", "vllm.num_layers=4", "capture.sizes=[16,1,512]"])
    plan = build_plan(sc, tmp_path / "model", NEWEST_API)
    kw = plan.llm_kwargs
    assert kw["model"] == kw["tokenizer"] == str(tmp_path / "model")
    assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"] is True
    assert kw["distributed_executor_backend"] == "external_launcher" == plan.executor
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"]) == (2, 2)
    assert kw["dtype"] == "bfloat16"
    # Nothing the scenario leaves at vdiag's defaults reaches vLLM: vLLM chooses its own.
    for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization",
                "enforce_eager", "seed"):
        assert key not in kw, key
    assert any("left to vLLM's own defaults: max_num_seqs, max_num_batched_tokens, max_model_len" in n
               for n in plan.notes)
    assert kw["hf_overrides"] == {"num_hidden_layers": 4}
    assert kw["compilation_config"] == {
        "pass_config": {"fuse_allreduce_rms": True, "eliminate_noops": True},
        "cudagraph_capture_sizes": [1, 16, 512],
    }
    assert plan.env["HF_HUB_OFFLINE"] == "1" and plan.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert any("workspace_group: world is not applied" in n for n in plan.notes)
    json.dumps(kw)  # what the report records must be JSON


def test_old_vllm_gets_old_names(tmp_path: Path) -> None:
    sc = _sc('fusion: {allreduce_rms: "on"}\nvllm:\n  compilation_config: {mode: 3, pass_config: {fuse_allreduce_rms: true}}\n')
    cc = build_plan(sc, tmp_path, LEGACY_API).llm_kwargs["compilation_config"]
    assert cc["level"] == 3 and "mode" not in cc
    assert cc["pass_config"] == {"enable_fi_allreduce_fusion": True, "enable_noop": True}


def test_new_vllm_renames_old_flags(tmp_path: Path) -> None:
    sc = _sc("vllm:\n  pass_config: {enable_fi_allreduce_fusion: false}\n  compilation_config: {level: 3}\n")
    cc = build_plan(sc, tmp_path, NEWEST_API).llm_kwargs["compilation_config"]
    assert cc == {"pass_config": {"fuse_allreduce_rms": False}, "mode": 3}


@pytest.mark.parametrize(("setting", "want"), [("on", True), ("off", False), ("auto", None)])
def test_fusion_setting(tmp_path: Path, setting: str, want: bool | None) -> None:
    plan = build_plan(_sc(f'fusion: {{allreduce_rms: "{setting}"}}\n'), tmp_path,
                      VllmApi(gate_blocks_pp=True, version="0.23.0"))
    got = plan.llm_kwargs.get("compilation_config", {}).get("pass_config", {}).get("fuse_allreduce_rms")
    assert got is want
    if setting == "auto":
        assert any("0.23.0's own gate" in n and "turns it off for PP > 1" in n for n in plan.notes)


def test_vllm_block_overrides(tmp_path: Path) -> None:
    sc = _sc("vllm:\n  executor: mp\n  max_model_len: 2048\n  gpu_memory_utilization: 0.5\n  enforce_eager: true\n"
             "  optimization_level: 2\n  env: {VLLM_USE_V2_MODEL_RUNNER: 0}\n  instrument: {sync: false}\n"
             "  hf_overrides: {rope_theta: 10000}\n  llm_kwargs: {seed: 7, max_num_seqs: 8}\n  generate: 12\n")
    plan = build_plan(sc, tmp_path, NEWEST_API)
    kw = plan.llm_kwargs
    assert plan.executor == "mp" and kw["distributed_executor_backend"] == "mp"
    assert kw["max_model_len"] == 2048 and kw["gpu_memory_utilization"] == 0.5 and kw["enforce_eager"] is True
    assert kw["optimization_level"] == 2 and kw["seed"] == 7 and kw["max_num_seqs"] == 8
    assert kw["hf_overrides"] == {"rope_theta": 10000}
    assert plan.env["VLLM_USE_V2_MODEL_RUNNER"] == "0" and plan.instrument.sync is False and plan.generate_tokens == 12


@pytest.mark.parametrize(("extra", "model", "tp", "pp", "message"), [
    ("vllm: {warp_speed: 9}\n", "llama-3.1-8b", 2, 1, "vllm.warp_speed: unknown key"),
    ("vllm: {executor: ray}\n", "llama-3.1-8b", 2, 1, "vllm.executor: got 'ray'"),
    ("vllm: {num_layers: 1}\n", "llama-3.1-8b", 2, 2, "cannot be split over parallel.pp 2"),
    ("vllm: {instrument: {loud: true}}\n", "llama-3.1-8b", 2, 1, "vllm.instrument.loud"),
    ("", "{hidden_size: 4096, num_attention_heads: 24}", 16, 1, "not divisible by parallel.tp 16"),
])
def test_bad_vllm_settings_are_one_line_errors(tmp_path: Path, extra: str, model: str, tp: int, pp: int,
                                               message: str) -> None:
    with pytest.raises(ScenarioError) as e:
        build_plan(_sc(extra, model=model, tp=tp, pp=pp), tmp_path, NEWEST_API)
    assert message in e.value.message and "\n" not in e.value.message


# ---- the local config folder ---------------------------------------------------------------------------


def test_config_json_from_presets(tmp_path: Path) -> None:
    d = write_model_dir(_sc(), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        8192, 80, 64, 8)
    assert cfg["intermediate_size"] == 28672 and cfg["vocab_size"] == 128256 and cfg["torch_dtype"] == "bfloat16"
    assert not (d / "model.safetensors").exists() and (d / "generation_config.json").exists()
    q = hf_config(_sc(model="qwen3-32b", pp=1))
    assert q["model_type"] == "qwen3" and q["head_dim"] == 128 and q["rms_norm_eps"] == 1e-6


def test_unknown_architecture_needs_model_type() -> None:
    inline = "{hidden_size: 1024, num_layers: 4, num_attention_heads: 8, architecture: FooForCausalLM}"
    with pytest.raises(ScenarioError, match=r"set vllm\.model_type"):
        hf_config(_sc(model=inline, pp=1))
    assert hf_config(_sc("vllm: {model_type: foo}\n", model=inline, pp=1))["model_type"] == "foo"


# ---- engine_vllm: before the launch, in the worker, after the run ---------------------------------------


def test_prepare_needs_gpus_and_sets_vllm_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_vllm, "detect_api", lambda: NEWEST_API)
    with pytest.raises(EnvironmentProblem, match="needs 4 GPUs"):
        engine_vllm.prepare(_sc(), gpus=1)
    sc, notes = engine_vllm.prepare(_sc("backend: sim\n"), gpus=4)
    assert sc.backend == "flashinfer" and sc.watchdog.stall_s == engine_vllm.DEFAULT_STALL_S
    assert sc.watchdog.max_run_s == engine_vllm.DEFAULT_MAX_RUN_S and sc.payload_width() == 8192
    assert any("stall_s 300" in n for n in notes) and any("external_launcher" in n for n in notes)
    sc2, _ = engine_vllm.prepare(_sc("watchdog: {stall_s: 30, max_run_s: 100}\n"), gpus=4)
    assert sc2.watchdog.stall_s == 30 and sc2.watchdog.max_run_s == 100


def _run_dir(tmp_path: Path, sc: Scenario) -> Path:
    for sub in ("launch", "logs", "stacks"):
        (tmp_path / sub).mkdir(exist_ok=True)
    (tmp_path / "scenario.json").write_text(sc.model_dump_json())
    return tmp_path


def test_worker_hands_engine_vllm_to_the_vllm_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repro.engines import worker

    run_dir = _run_dir(tmp_path, _sc("backend: sim\n", model="llama-3.1-8b", tp=2, pp=1))
    seen: dict[str, Any] = {}

    def fake(run_dir: Path, rank: int, sc: Scenario, log: Any) -> int:
        seen.update(rank=rank, engine=sc.engine)
        return 0

    monkeypatch.setattr(engine_vllm, "run_rank_vllm", fake)
    assert worker.run_engine(run_dir, 1) == 0
    assert seen == {"rank": 1, "engine": "vllm"}
    first = json.loads((run_dir / "launch" / "rank1.jsonl").read_text().splitlines()[0])
    assert first["ev"] == "hello" and first["tp_rank"] == 1


@pytest.mark.skipif("vllm" in sys.modules, reason="vLLM importable here")
def test_worker_without_vllm_reports_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repro.engines.vllm import instrument
    from repro.events import LaunchLogWriter

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    sc = _sc("vllm: {num_layers: 2}\n", model="llama-3.1-8b", tp=2, pp=1)
    run_dir = _run_dir(tmp_path, sc)
    log = LaunchLogWriter(run_dir / "launch" / "rank0.jsonl", 0)
    try:
        assert engine_vllm.run_rank_vllm(run_dir, 0, sc, log) == 1
    finally:
        instrument.uninstall()
    evs = [json.loads(x) for x in (run_dir / "launch" / "rank0.jsonl").read_text().splitlines()]
    assert evs[-1]["ev"] == "error" and evs[-1]["where"] == "vllm"
    facts = json.loads((run_dir / "vllm" / "rank0.json").read_text())
    assert "ModuleNotFoundError" in facts["error"] and facts["plan"]["llm_kwargs"]["hf_overrides"] == {"num_hidden_layers": 2}
    assert json.loads((run_dir / "vllm" / "model-rank0" / "config.json").read_text())["hidden_size"] == 4096
    notes, _ = engine_vllm.report_facts(run_dir)
    assert any("start-up failed on rank 0: ModuleNotFoundError" in n for n in notes)


class _Cfg:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def test_resolved_config_and_report_facts(tmp_path: Path) -> None:
    vc = _Cfg(
        compilation_config=_Cfg(pass_config=_Cfg(fuse_allreduce_rms=True, eliminate_noops=True), mode=3,
                                cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_capture_sizes=[1, 2, 4],
                                max_cudagraph_capture_size=4),
        parallel_config=_Cfg(tensor_parallel_size=2, pipeline_parallel_size=2,
                             distributed_executor_backend="external_launcher", world_size=4),
        scheduler_config=_Cfg(max_num_seqs=256, max_num_batched_tokens=8192),
        model_config=_Cfg(dtype="torch.bfloat16", max_model_len=4096),
    )
    llm = _Cfg(llm_engine=_Cfg(vllm_config=vc))
    res = engine_vllm.resolved_config(llm, NEWEST_API)
    assert res["pass_config.fuse_allreduce_rms"] is True and res["compilation_config.cudagraph_capture_sizes"] == [1, 2, 4]
    assert res["parallel_config.pipeline_parallel_size"] == "2" and res["scheduler_config.max_num_seqs"] == 256
    (tmp_path / "vllm").mkdir()
    facts = {"rank": 0, "vllm": {"version": "0.33.0", "commit": "g4ba787ec9"}, "flashinfer_version": "0.7.2.post1",
             "notes": ["vLLM executor: external_launcher"], "resolved": res,
             "instrumentation": {"flashinfer": {"allreduce_fusion": 2, "trtllm_allreduce_fusion": 0},
                                 "progress": ["a", "b"]}}
    (tmp_path / "vllm" / "rank0.json").write_text(json.dumps(facts))
    notes, versions = engine_vllm.report_facts(tmp_path)
    assert versions == {"vllm": "0.33.0", "vllm.commit": "g4ba787ec9", "flashinfer": "0.7.2.post1"}
    assert "vLLM executor: external_launcher" in notes
    assert any(n.startswith("instrumentation: wrapped FlashInfer allreduce_fusion") for n in notes)
    assert any('"pass_config.fuse_allreduce_rms": true' in n for n in notes)


# ---- end to end through `vdiag run`, with a stand-in vLLM and FlashInfer ---------------------------------
# Real torchrun workers, the real worker hand-over, the real instrumentation and report; vLLM and
# FlashInfer are small packages written here (FlashInfer's real signatures, vLLM's class and method names),
# because neither runs on a machine without a GPU.

_FAKE_FLASHINFER = {
    "flashinfer/__init__.py": "__version__ = '0.7.2.post1'\n",
    "flashinfer/comm/__init__.py": (
        "from .trtllm_ar import trtllm_allreduce_fusion, trtllm_create_ipc_workspace_for_all_reduce_fusion\n"
        "from .allreduce import allreduce_fusion, create_allreduce_fusion_workspace\n"
        "from .comm_backend import TorchDistBackend\n"
    ),
    "flashinfer/comm/comm_backend.py": "class TorchDistBackend:\n    def __init__(self, group=None):\n        self._group = group\n",
    "flashinfer/comm/trtllm_ar.py": (
        "import torch\n"
        "def trtllm_create_ipc_workspace_for_all_reduce_fusion(tp_rank, tp_size, max_token_num, hidden_dim,\n"
        "        use_fp32_lamport=False, group=None, create_metadata=False, comm_backend=None, use_symm_dev_mem=False):\n"
        "    # stand-in: handles go through SymmDeviceMemory(...) over comm_backend when use_symm_dev_mem\n"
        "    handles = [[0x7f0000000000 + 0x100000 * (8 * b + p) for p in range(tp_size)] for b in range(3)]\n"
        "    t = torch.tensor([p for row in handles for p in row], dtype=torch.int64)\n"
        "    return (handles, t, {'tp_size': tp_size}) if create_metadata else (handles, t)\n"
        "def trtllm_allreduce_fusion(allreduce_in, world_size, world_rank, token_num, hidden_dim, workspace_ptrs,\n"
        "        launch_with_pdl, trigger_completion_at_end, fp32_acc, pattern_code, use_oneshot, allreduce_out,\n"
        "        residual_in, residual_out, norm_out, quant_out, scale_out, rms_gamma, rms_eps, scale_factor,\n"
        "        layout_code, metadata=None, block_quant_group_size=None, weight_bias=None):\n"
        "    return None\n"
    ),
    "flashinfer/comm/allreduce.py": (
        "from .trtllm_ar import trtllm_allreduce_fusion, trtllm_create_ipc_workspace_for_all_reduce_fusion\n"
        "class TRTLLMAllReduceFusionWorkspace:\n"
        "    backend = 'trtllm'\n"
        "    def __init__(self, tp_size, tp_rank, inner):\n"
        "        self.world_size, self.rank = tp_size, tp_rank\n"
        "        self.ipc_handles, self.workspace_tensor, self.metadata = inner\n"
        "def create_allreduce_fusion_workspace(backend='auto', world_size=None, rank=None, max_token_num=None,\n"
        "        hidden_dim=None, dtype=None, gpus_per_node=None, comm_backend=None, force_oneshot_support=False,\n"
        "        group=None):\n"
        "    inner = trtllm_create_ipc_workspace_for_all_reduce_fusion(tp_rank=rank, tp_size=world_size,\n"
        "        max_token_num=max_token_num, hidden_dim=hidden_dim, group=group, comm_backend=comm_backend,\n"
        "        create_metadata=True, use_symm_dev_mem=True)\n"
        "    return TRTLLMAllReduceFusionWorkspace(world_size, rank, inner)\n"
        "def allreduce_fusion(input, workspace, pattern, launch_with_pdl=False, trigger_completion_at_end=True,\n"
        "        output=None, residual_out=None, norm_out=None, quant_out=None, scale_out=None, residual_in=None,\n"
        "        rms_gamma=None, rms_eps=1e-6, scale_factor=None, layout_code=None, use_oneshot=None, fp32_acc=False):\n"
        "    trtllm_allreduce_fusion(input, workspace.world_size, workspace.rank, input.shape[0], input.shape[1],\n"
        "        workspace.workspace_tensor, launch_with_pdl, trigger_completion_at_end, fp32_acc, pattern,\n"
        "        use_oneshot, None, residual_in, residual_out, norm_out, quant_out, scale_out, rms_gamma, rms_eps,\n"
        "        scale_factor, layout_code)\n"
        "    return input\n"
    ),
}

_FAKE_VLLM = {
    "vllm/__init__.py": "from vllm.entrypoints.llm import LLM\n",
    "vllm/_version.py": "__version__ = version = '0.0.0+standin'\n__commit_id__ = commit_id = 'gstandin'\n",
    "vllm/config/__init__.py": "",
    "vllm/config/compilation.py": "class PassConfig:\n    fuse_allreduce_rms: bool = None\n    eliminate_noops: bool = True\n"
                                  "class CompilationConfig:\n    mode: int = 3\n",
    "vllm/config/vllm.py": "def enable_allreduce_rms_fusion(cfg):\n    return cfg.tp > 1\n",
    "vllm/distributed/__init__.py": "",
    "vllm/distributed/parallel_state.py": (
        "import torch.distributed as dist\n"
        "class _G:\n"
        "    def __init__(self, ranks, group):\n"
        "        self.ranks, self.cpu_group = ranks, group\n"
        "    def barrier(self):\n"
        "        dist.barrier(group=self.cpu_group)\n"
        "_TP = None\n"
        "def get_tp_group():\n    return _TP\n"
        "def get_world_group():\n    return _G(list(range(dist.get_world_size())), None)\n"
    ),
    "vllm/entrypoints/__init__.py": "",
    "vllm/entrypoints/llm.py": (
        "import torch, torch.distributed as dist\n"
        "import flashinfer.comm as flashinfer_comm\n"
        "from vllm.distributed import parallel_state\n"
        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner\n"
        "from vllm.v1.worker.gpu_worker import Worker\n"
        "class _O:\n"
        "    def __init__(self, **kw):\n        self.__dict__.update(kw)\n"
        "class LLM:\n"
        "    def __init__(self, **kw):\n"
        "        assert kw['load_format'] == 'dummy' and kw['distributed_executor_backend'] == 'external_launcher'\n"
        "        dist.init_process_group('gloo')\n"
        "        tp, pp = kw['tensor_parallel_size'], kw['pipeline_parallel_size']\n"
        "        rank = dist.get_rank()\n"
        "        for s in range(pp):\n"
        "            ranks = list(range(s * tp, (s + 1) * tp))\n"
        "            g = dist.new_group(ranks)\n"
        "            if rank in ranks:\n"
        "                parallel_state._TP = parallel_state._G(ranks, g)\n"
        "        import json\n"
        "        cfg = json.load(open(kw['model'] + '/config.json'))\n"
        "        layers = kw.get('hf_overrides', {}).get('num_hidden_layers', cfg['num_hidden_layers'])\n"
        "        runner = GPUModelRunner(cfg['hidden_size'], layers // pp, tp,\n"
        "            kw['compilation_config']['cudagraph_capture_sizes'])\n"
        "        runner.profile_run()\n"
        "        Worker(runner).compile_or_warm_up_model()\n"
        "        pc = _O(**kw['compilation_config']['pass_config'])\n"
        "        cc = _O(pass_config=pc, mode=3, cudagraph_capture_sizes=runner.sizes)\n"
        "        self.llm_engine = _O(vllm_config=_O(compilation_config=cc,\n"
        "            parallel_config=_O(tensor_parallel_size=tp, pipeline_parallel_size=pp)))\n"
    ),
    "vllm/v1/__init__.py": "",
    "vllm/v1/worker/__init__.py": "",
    "vllm/v1/worker/gpu_worker.py": (
        "class Worker:\n"
        "    def __init__(self, runner):\n        self.runner = runner\n"
        "    def compile_or_warm_up_model(self):\n"
        "        self.runner._dummy_run(self.runner.sizes[-1])\n"
        "        self.runner.capture_model()\n"
    ),
    "vllm/v1/worker/gpu_model_runner.py": (
        "import torch\n"
        "import flashinfer.comm as flashinfer_comm\n"
        "from flashinfer.comm import TorchDistBackend\n"
        "from vllm.distributed.parallel_state import get_tp_group\n"
        "# a last-stage broadcast_pp_output would live here\n"
        "class _D:\n"
        "    def __init__(self, n):\n        self.num_tokens, self.uniform = n, True\n"
        "class _M:\n    name = 'FULL'\n"
        "class GPUModelRunner:\n"
        "    def __init__(self, hidden, layers, tp, sizes):\n"
        "        self.hidden, self.layers, self.tp, self.sizes, self.ws = hidden, layers, tp, sorted(sizes), None\n"
        "    def _dummy_run(self, num_tokens, cudagraph_runtime_mode=None, **kw):\n"
        "        if self.ws is None:\n"
        "            g = get_tp_group()\n"
        "            self.ws = flashinfer_comm.create_allreduce_fusion_workspace(backend='trtllm', world_size=self.tp,\n"
        "                rank=g.ranks.index(torch.distributed.get_rank()), max_token_num=512, hidden_dim=self.hidden,\n"
        "                dtype=torch.bfloat16, comm_backend=TorchDistBackend(g.cpu_group))\n"
        "        x = torch.zeros((num_tokens, self.hidden), dtype=torch.bfloat16)\n"
        "        for _ in range(2 * self.layers):\n"
        "            flashinfer_comm.allreduce_fusion(input=x, workspace=self.ws, pattern=1, residual_in=x,\n"
        "                residual_out=x, norm_out=x, use_oneshot=None, fp32_acc=True)\n"
        "    def profile_run(self):\n"
        "        self._dummy_run(64)\n"
        "    def capture_model(self):\n"
        "        self._capture_cudagraphs(batch_descriptors=[_D(n) for n in reversed(self.sizes)],\n"
        "                                 cudagraph_runtime_mode=_M())\n"
        "    def _capture_cudagraphs(self, batch_descriptors, cudagraph_runtime_mode, profiler=None):\n"
        "        for d in batch_descriptors:\n"
        "            self._dummy_run(d.num_tokens)\n"
        "            self._dummy_run(d.num_tokens, cudagraph_runtime_mode=cudagraph_runtime_mode)\n"
    ),
}


@pytest.mark.slow
def test_vdiag_run_engine_vllm_end_to_end_with_a_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repro import run as run_mod

    pkgs = tmp_path / "pkgs"
    for rel, text in {**_FAKE_FLASHINFER, **_FAKE_VLLM}.items():
        (pkgs / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkgs / rel).write_text(text)
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setenv("PYTHONPATH", str(pkgs))
    monkeypatch.setattr(run_mod, "gpu_count", lambda: 2)  # the stand-in needs none; prepare() asks for 2
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: standin\nengine: vllm\nmodel: llama-3.1-8b\nparallel: {tp: 2, pp: 1}\n"
        'capture: {sizes: [1, 2, 4]}\nfusion: {allreduce_rms: "on"}\nvllm: {num_layers: 2}\n'
        "watchdog: {stall_s: 60, max_run_s: 120}\n"
    )
    outcome = run_mod.run_scenario(scenario, run_mod.RunOptions(reports_dir=tmp_path / "reports", live=False,
                                                                quiet=True, gpu_state="none"))
    rep = outcome.report
    logs = [(outcome.run_dir.root / "launch" / f"rank{r}.jsonl").read_text() for r in range(2)]
    assert outcome.exit_code == 0, (rep.watchdog, logs, rep.notes)
    assert rep.engine == "vllm" and rep.watchdog.cls == "clean"
    assert rep.env.versions.get("vllm") == "0.0.0+standin" and rep.env.versions.get("vllm.commit") == "gstandin"
    assert any("resolved config" in n and "fuse_allreduce_rms" in n for n in rep.notes)
    assert any(n.startswith("instrumentation: wrapped FlashInfer") for n in rep.notes)
    for r in range(2):
        evs = [json.loads(x) for x in logs[r].splitlines()]
        ws = next(e for e in evs if e["ev"] == "workspace")
        assert ws["rendezvous_group"] == [0, 1] and ws["peers"] == ["rank0", "rank1"]
        launches = [e for e in evs if e["ev"] == "launch"]
        # profile + warm-up + (warm-up + capture) for 3 sizes, 2 layers x 2 calls each
        assert len(launches) == (1 + 1 + 6) * 4 and all(e["grid"] and e["ws"] == "rank0,rank1" for e in launches)
        caps = [(e["index"], e["total"], e.get("size")) for e in evs if e["ev"] == "phase" and e["phase"] == "capture"
                and e.get("total")]
        assert caps == [(0, 3, 4), (1, 3, 2), (2, 3, 1), (3, 3, None)]
        assert evs[-1]["ev"] == "done" and evs[-1]["calls"] == len(launches)


def _tp1(extra: str) -> Scenario:
    return parse_scenario_text("name: t\nengine: vllm\nmodel: llama-3.1-8b\nparallel: {tp: 1}\n"
                               "capture: {sizes: [1, 2, 4, 8], max_num_seqs: 8" + extra, "<t>")


def test_issue_19_scenario_no_longer_passes_vdiag_s_batch_default(tmp_path: Path) -> None:
    # The scenario of issue 19: max_num_seqs 8 and max_model_len 512 set, max_num_batched_tokens not.
    # vdiag used to pass its own 8192, which made vLLM 0.26.0 fault on the H200; now vLLM picks its own
    # (min(16384, 8 x 512) = 4096 there), and the plan says nothing is oversized.
    sc = _tp1("}\nvllm: {num_layers: 2, max_model_len: 512}\n")
    kw = build_plan(sc, tmp_path, NEWEST_API).llm_kwargs
    assert kw["max_num_seqs"] == 8 and kw["max_model_len"] == 512 and "max_num_batched_tokens" not in kw
    assert oversized_batch(kw) == ""


@pytest.mark.parametrize(("tokens", "seqs", "max_len", "faulty"), [
    (8192, 8, 512, True),      # issue 19: 8 dummy requests of 1024 tokens, block tables for 512
    (4096, 8, 512, False),     # exactly max_num_seqs x max_model_len: each request fits
    (8192, 8, 1024, False),
    (8193, 8, 1024, True),
    (16384, 1024, 8192, False),  # vLLM's own H200 defaults
])
def test_oversized_batch_is_computed_from_the_arguments(tokens: int, seqs: int, max_len: int, faulty: bool) -> None:
    note = oversized_batch({"max_num_batched_tokens": tokens, "max_num_seqs": seqs, "max_model_len": max_len})
    assert bool(note) is faulty
    if faulty:
        assert note.startswith("computed: ") and f"> max_num_seqs {seqs} x max_model_len {max_len}" in note
        assert f"up to {-(-tokens // seqs)} tokens" in note


def test_an_explicit_oversized_batch_is_passed_and_named(tmp_path: Path) -> None:
    # Set on purpose (to reproduce the fault): passed as given, and the report's notes name the cause.
    sc = _tp1(", max_num_batched_tokens: 8200}\nvllm: {max_model_len: 512}\n")
    plan = build_plan(sc, tmp_path, NEWEST_API)
    assert plan.llm_kwargs["max_num_batched_tokens"] == 8200
    assert any(n.startswith("computed: max_num_batched_tokens 8200 > max_num_seqs 8 x max_model_len 512")
               for n in plan.notes)
    # vdiag's default value itself is reached through llm_kwargs (the last word), and named the same way.
    sc = _tp1("}\nvllm: {max_model_len: 512, llm_kwargs: {max_num_batched_tokens: 8192}}\n")
    plan = build_plan(sc, tmp_path, NEWEST_API)
    assert plan.llm_kwargs["max_num_batched_tokens"] == 8192
    assert any("8192 > max_num_seqs 8 x max_model_len 512 = 4096" in n for n in plan.notes)


def test_unset_max_model_len_is_the_config_s_and_checked_against_it(tmp_path: Path) -> None:
    sc = _tp1(", max_num_batched_tokens: 65600}\nvllm: {num_layers: 2}\n")
    plan = build_plan(sc, tmp_path, NEWEST_API)
    assert "max_model_len" not in plan.llm_kwargs and hf_config(sc)["max_position_embeddings"] == 8192
    assert any("65600 > max_num_seqs 8 x max_model_len 8192" in n for n in plan.notes)


def test_sampling_block(tmp_path: Path) -> None:
    plan = build_plan(_tp1("}\nvllm: {generate: 8, sampling: {top_p: 0.9}}\n"), tmp_path, NEWEST_API)
    assert plan.generate_tokens == 8 and plan.sampling == {"top_p": 0.9}
    with pytest.raises(ScenarioError, match=r"vllm\.sampling: expected a mapping"):
        build_plan(_tp1("}\nvllm: {sampling: 0.9}\n"), tmp_path, NEWEST_API)
