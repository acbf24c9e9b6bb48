"""Scenario -> vLLM: the `LLM(...)` keyword arguments, the local model folder vLLM reads its config from,
the worker environment, and the reverse direction (`vllm serve MODEL ...` -> scenario YAML).

Nothing here imports vLLM. What differs between vLLM versions (pass-flag names, the compilation-mode key,
whether `external_launcher` runs PP > 1) is described by a `VllmApi`, read from the installed vLLM's source
text by `detect_api()`, so the translation can be tested on a machine without vLLM. See
docs/vllm-engine.md for the versions checked.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repro.errors import ScenarioError
from repro.redact import redact_argv
from repro.scenario import MODEL_PRESETS, Scenario

# ---- what differs between vLLM versions ------------------------------------------------------------


@dataclass(frozen=True)
class VllmApi:
    """The names the installed vLLM uses. Defaults: vLLM 0.14 and newer (checked up to 0.33.0)."""

    version: str = ""
    commit: str = ""
    # PassConfig field that turns the all-reduce + RMSNorm fusion on: `fuse_allreduce_rms` since 0.12,
    # `enable_fi_allreduce_fusion` up to 0.11 (0.12 accepts both; the old one is deprecated there).
    fusion_flag: str = "fuse_allreduce_rms"
    # The no-op elimination the fusion pattern relies on: `eliminate_noops` since 0.12, `enable_noop` before.
    noop_flag: str = "eliminate_noops"
    # CompilationConfig key of the compilation mode: `mode` since 0.12, `level` up to 0.11 (0.12-0.17 both).
    compile_mode_key: str = "mode"
    # Whether `enable_allreduce_rms_fusion` (vllm/config/vllm.py) gates the fusion off for PP > 1:
    # 0.17-0.20 and 0.23 (#35424, restored by #43616); not 0.21-0.22 (#41458) nor 0.24+ (after #45917).
    gate_blocks_pp: bool | None = None
    # V1 model runner's broadcast of the last stage's output (`broadcast_pp_output`): what lets
    # `external_launcher` run PP > 1. Present in every version checked (0.11.0 - 0.33.0).
    external_launcher_pp: bool = True
    # FlashInfer API the fusion calls: "unified" (allreduce_fusion / create_allreduce_fusion_workspace,
    # since 0.17) or "legacy" (trtllm_allreduce_fusion / trtllm_create_ipc_workspace_for_all_reduce_fusion).
    flashinfer_api: str = "unified"
    source: str = "defaults"

    def label(self) -> str:
        v = self.version or "unknown version"
        return f"vLLM {v}" + (f" ({self.commit})" if self.commit else "")


LEGACY_API = VllmApi(
    version="0.11", fusion_flag="enable_fi_allreduce_fusion", noop_flag="enable_noop", compile_mode_key="level",
    gate_blocks_pp=False, flashinfer_api="legacy", source="table",
)
NEWEST_API = VllmApi(version="0.33.0", gate_blocks_pp=False, source="table")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _field_declared(text: str, name: str) -> bool:
    return re.search(rf"^\s+{re.escape(name)}\s*:", text, re.MULTILINE) is not None


def vllm_source_dir() -> Path | None:
    """The installed vLLM package folder, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def detect_api(pkg: Path | None = None) -> VllmApi:
    """Read the installed vLLM's source text (no import) and return the names it uses."""
    pkg = pkg if pkg is not None else vllm_source_dir()
    if pkg is None or not pkg.is_dir():
        return VllmApi(source="defaults (vLLM not found)")
    version_text = _read(pkg / "_version.py")
    m = re.search(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", version_text, re.MULTILINE)
    version = m.group(1) if m else ""
    c = re.search(r"""^__commit_id__\s*=\s*(?:commit_id\s*=\s*)?['"]([^'"]+)['"]""", version_text, re.MULTILINE)
    commit = c.group(1) if c else ""
    comp = _read(pkg / "config" / "compilation.py") or _read(pkg / "config" / "__init__.py") or _read(
        pkg / "config.py"
    )
    fusion_flag = "fuse_allreduce_rms" if _field_declared(comp, "fuse_allreduce_rms") else (
        "enable_fi_allreduce_fusion" if _field_declared(comp, "enable_fi_allreduce_fusion") else "fuse_allreduce_rms"
    )
    noop_flag = "eliminate_noops" if _field_declared(comp, "eliminate_noops") else (
        "enable_noop" if _field_declared(comp, "enable_noop") else "eliminate_noops"
    )
    mode_key = "mode" if _field_declared(comp, "mode") else ("level" if _field_declared(comp, "level") else "mode")
    vcfg = _read(pkg / "config" / "vllm.py")
    gate = re.search(r"def enable_allreduce_rms_fusion\(.*?(?=\n\S|\Z)", vcfg, re.DOTALL)
    gate_blocks_pp = ("pipeline_parallel_size" in gate.group(0)) if gate else None
    runner = _read(pkg / "v1" / "worker" / "gpu_model_runner.py")
    el_pp = "broadcast_pp_output" in runner if runner else True
    fi_api = "legacy"
    for rel in ("distributed/device_communicators/flashinfer_all_reduce.py",
                "compilation/passes/fusion/allreduce_rms_fusion.py", "compilation/collective_fusion.py"):
        if "create_allreduce_fusion_workspace" in _read(pkg / rel):
            fi_api = "unified"
            break
    return VllmApi(
        version=version, commit=commit, fusion_flag=fusion_flag, noop_flag=noop_flag, compile_mode_key=mode_key,
        gate_blocks_pp=gate_blocks_pp, external_launcher_pp=el_pp, flashinfer_api=fi_api, source=str(pkg),
    )


# ---- the scenario's `vllm:` block -------------------------------------------------------------------

VLLM_KEYS = {
    "executor": "auto | external_launcher | mp (auto: external_launcher, or mp where it cannot run PP > 1)",
    "num_layers": "shrink the model to this many decoder layers (hf_overrides.num_hidden_layers)",
    "hf_overrides": "more Hugging Face config overrides, merged over num_layers",
    "max_model_len": "vLLM's max_model_len (unset: vLLM derives it from the config's max_position_embeddings)",
    "gpu_memory_utilization": "vLLM's gpu_memory_utilization (unset: vLLM's default)",
    "enforce_eager": "no compilation and no CUDA graphs (unset: vLLM's default, false)",
    "optimization_level": "vLLM's -O level (0-3), where the installed vLLM has one",
    "compilation_config": "merged over the compilation config vdiag builds (pass flags, capture sizes)",
    "pass_config": "merged into compilation_config.pass_config",
    "llm_kwargs": "any other LLM(...) keyword arguments, passed as given (last word)",
    "env": "environment variables for the workers (VLLM_*, NCCL_*, ...)",
    "instrument": "{sync: true|false, progress: true|false}: see docs/vllm-engine.md",
    "generate": "after start-up, run one request of N prompt tokens (default 0: start-up only)",
    "sampling": "SamplingParams for that request, e.g. {top_p: 0.9} (default: max_tokens 4, ignore_eos)",
    "model_type": "Hugging Face model_type for config.json when the architecture is not known to vdiag",
    "seed": "vLLM's seed (unset: vLLM's default)",
    "command": "the vllm serve command the scenario was written from (informational)",
    "unknown_flags": "vllm serve flags vdiag does not model (informational)",
}

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_MODEL_TYPES = {
    "LlamaForCausalLM": ("llama", 500000.0),
    "MistralForCausalLM": ("mistral", 1000000.0),
    "Qwen2ForCausalLM": ("qwen2", 1000000.0),
    "Qwen3ForCausalLM": ("qwen3", 1000000.0),
}


@dataclass(frozen=True)
class InstrumentOptions:
    sync: bool = True
    progress: bool = True


@dataclass(frozen=True)
class VllmPlan:
    """Everything a worker needs to start vLLM for a scenario."""

    llm_kwargs: dict[str, Any]
    executor: str
    env: dict[str, str]
    instrument: InstrumentOptions
    notes: list[str] = field(default_factory=list)
    generate_tokens: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)


def vllm_block(sc: Scenario) -> dict[str, Any]:
    block = dict(sc.vllm or {})
    unknown = sorted(set(block) - set(VLLM_KEYS))
    if unknown:
        raise ScenarioError(
            f"scenario {sc.name}: vllm.{unknown[0]}: unknown key; allowed: {', '.join(VLLM_KEYS)}"
        )
    return block


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_executor(sc: Scenario, api: VllmApi) -> tuple[str, list[str]]:
    """Which executor runs vLLM's workers: `external_launcher` (one vLLM worker per torchrun rank) or
    `mp` (vLLM's own multiprocessing executor, started from torchrun rank 0)."""
    want = str(vllm_block(sc).get("executor", "auto"))
    if want not in ("auto", "external_launcher", "mp"):
        raise ScenarioError(f"scenario {sc.name}: vllm.executor: got {want!r}; allowed values: auto, external_launcher, mp")
    if want != "auto":
        return want, [f"vLLM executor: {want} (set by the scenario)"]
    if sc.parallel.pp > 1 and not api.external_launcher_pp:
        return "mp", [
            f"vLLM executor: mp: {api.label()} has no PP output broadcast for external_launcher, so vLLM's own "
            "multiprocessing executor runs the ranks, started from torchrun rank 0 under vdiag's process control"
        ]
    pp_note = ("; PP > 1 runs there: the V1 model runner broadcasts the last stage's output"
               if sc.parallel.pp > 1 else "")
    return "external_launcher", [
        f"vLLM executor: external_launcher (one vLLM worker per torchrun rank; {api.label()}{pp_note})"
    ]


def _check_shape(sc: Scenario, layers: int) -> None:
    m, tp, pp = sc.model, sc.parallel.tp, sc.parallel.pp
    if m.num_attention_heads % tp:
        raise ScenarioError(
            f"scenario {sc.name}: model.num_attention_heads {m.num_attention_heads} is not divisible by "
            f"parallel.tp {tp}; vLLM shards attention heads evenly over TP ranks"
        )
    if m.num_key_value_heads % tp and tp % m.num_key_value_heads:
        raise ScenarioError(
            f"scenario {sc.name}: model.num_key_value_heads {m.num_key_value_heads} and parallel.tp {tp}: one must "
            "divide the other (vLLM shards or replicates KV heads)"
        )
    if layers < pp:
        raise ScenarioError(
            f"scenario {sc.name}: {layers} decoder layers cannot be split over parallel.pp {pp} stages; "
            "raise vllm.num_layers"
        )


def build_plan(sc: Scenario, model_dir: Path, api: VllmApi | None = None) -> VllmPlan:
    """The LLM(...) keyword arguments and the worker environment for a scenario (pure: no vLLM import)."""
    api = api or detect_api()
    block = vllm_block(sc)
    executor, notes = resolve_executor(sc, api)
    layers = int(block.get("num_layers") or sc.model.num_layers)
    _check_shape(sc, layers)

    pass_config: dict[str, Any] = {}
    if sc.fusion.allreduce_rms == "on":
        pass_config[api.fusion_flag] = True
        pass_config[api.noop_flag] = True
    elif sc.fusion.allreduce_rms == "off":
        pass_config[api.fusion_flag] = False
    else:
        notes.append(
            f"fusion.allreduce_rms: auto leaves the decision to {api.label()}'s own gate "
            f"(enable_allreduce_rms_fusion{'' if api.gate_blocks_pp is None else ', which ' + ('turns it off' if api.gate_blocks_pp else 'does not turn it off') + ' for PP > 1'})"
        )
    pass_config = _deep_merge(pass_config, dict(block.get("pass_config") or {}))
    if sc.fusion.workspace_group != "tp":
        notes.append(f"fusion.workspace_group: {sc.fusion.workspace_group} is not applied to real vLLM: the "
                     f"installed vLLM and FlashInfer choose the rendezvous group (the workspace record shows it)")
    if sc.faults:
        notes.append(f"faults: {len(sc.faults)} injected fault(s) ignored: engine: vllm runs vLLM unmodified")

    cc: dict[str, Any] = {}
    if pass_config:
        cc["pass_config"] = pass_config
    if sc.capture.sizes != "default":
        cc["cudagraph_capture_sizes"] = sorted(set(sc.capture.sizes))
    user_cc = dict(block.get("compilation_config") or {})
    if "level" in user_cc and api.compile_mode_key == "mode" and "mode" not in user_cc:
        user_cc["mode"] = user_cc.pop("level")
    if "mode" in user_cc and api.compile_mode_key == "level" and "level" not in user_cc:
        user_cc["level"] = user_cc.pop("mode")
    pc = user_cc.get("pass_config")
    if isinstance(pc, dict):
        user_cc["pass_config"] = _rename_pass_flags(pc, api)
    if isinstance(cc.get("pass_config"), dict):
        cc["pass_config"] = _rename_pass_flags(cc["pass_config"], api)
    cc = _deep_merge(cc, user_cc)

    hf_overrides = {}
    if block.get("num_layers") is not None:
        hf_overrides["num_hidden_layers"] = layers
    hf_overrides.update(dict(block.get("hf_overrides") or {}))

    kw: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        skip_tokenizer_init=True,
        load_format="dummy",
        tensor_parallel_size=sc.parallel.tp,
        pipeline_parallel_size=sc.parallel.pp,
        distributed_executor_backend=executor,
        dtype=_DTYPES[sc.model.dtype],
    )
    # Only what the scenario sets: everything else is left to the installed vLLM's own defaults.
    kw.update(scheduler_args(sc))
    for key, cast in (("max_model_len", int), ("gpu_memory_utilization", float), ("enforce_eager", bool),
                      ("seed", int)):
        if block.get(key) is not None:
            kw[key] = cast(block[key])
    if cc:
        kw["compilation_config"] = cc
    if hf_overrides:
        kw["hf_overrides"] = hf_overrides
    if block.get("optimization_level") is not None:
        kw["optimization_level"] = int(block["optimization_level"])
    kw = _deep_merge(kw, dict(block.get("llm_kwargs") or {}))
    notes.extend(scheduler_notes(kw, sc))

    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Keep vLLM's engine core in the torchrun worker (external_launcher sets this itself).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    env.update({str(k): str(v) for k, v in dict(block.get("env") or {}).items()})
    inst = dict(block.get("instrument") or {})
    unknown = sorted(set(inst) - {"sync", "progress"})
    if unknown:
        raise ScenarioError(f"scenario {sc.name}: vllm.instrument.{unknown[0]}: unknown key; allowed: sync, progress")
    return VllmPlan(
        llm_kwargs=kw, executor=executor, env=env,
        instrument=InstrumentOptions(sync=bool(inst.get("sync", True)), progress=bool(inst.get("progress", True))),
        notes=notes, generate_tokens=int(block.get("generate", 0) or 0), sampling=_sampling(sc, block),
    )


def _sampling(sc: Scenario, block: dict[str, Any]) -> dict[str, Any]:
    val = block.get("sampling") or {}
    if not isinstance(val, dict):
        raise ScenarioError(f"scenario {sc.name}: vllm.sampling: expected a mapping of SamplingParams fields, "
                            f"for example {{top_p: 0.9}}; got {val!r}")
    return dict(val)


# vdiag's own defaults for the capture block (repro/scenario.py): they drive the replay, and a value equal to
# one of them is not passed to vLLM, which then chooses its own. A scenario that needs exactly one of these
# values in vLLM sets it in vllm.llm_kwargs.
_CAPTURE_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192}


def scheduler_args(sc: Scenario) -> dict[str, int]:
    """The scheduler limits the scenario sets (capture.max_num_seqs / max_num_batched_tokens), for LLM(...).

    Scenario files come to the workers as a full dump, so "set" means "differs from vdiag's default";
    a limit left at vdiag's default is vLLM's to choose (vLLM 0.26.0: max_num_batched_tokens =
    min(16384 on a GPU of 70 GiB or more, else 8192; max_num_seqs x max_model_len), see
    EngineArgs._set_default_max_num_seqs_and_batched_tokens_args)."""
    out: dict[str, int] = {}
    for key, default in _CAPTURE_DEFAULTS.items():
        val = int(getattr(sc.capture, key))
        if val != default:
            out[key] = val
    return out


def scheduler_notes(kw: dict[str, Any], sc: Scenario) -> list[str]:
    """What the report must say about the scheduler limits vLLM gets (computed from the LLM arguments)."""
    notes = []
    left = [k for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len") if k not in kw]
    if left:
        notes.append("LLM arguments left to vLLM's own defaults: " + ", ".join(left))
    eff = dict(kw)
    eff.setdefault("max_model_len", config_max_len(sc))  # vLLM reads it from the config vdiag writes
    fault = oversized_batch(eff)
    if fault:
        notes.append(fault)
    return notes


def oversized_batch(kw: dict[str, Any]) -> str:
    """The argument combination that made vLLM 0.26.0 fault on the H200 (docs/vllm-engine.md, "The
    max_num_batched_tokens fault"): an explicit max_num_batched_tokens above max_num_seqs x max_model_len.

    vLLM only warns about it (SchedulerConfig.verify_max_model_len); its warm-up dummy runs
    (kernel_warmup's FlashInfer autotune, compile_or_warm_up_model's largest compile range) then spread
    max_num_batched_tokens over max_num_seqs dummy requests (GPUModelRunner._dummy_run), each longer than
    max_model_len, whose block tables hold max_model_len tokens. Returns the note for the report, or ""
    when the combination is safe or not fully known (vLLM's own defaults are capped at
    max_num_seqs x max_model_len, so they never are)."""
    try:
        tokens = int(kw["max_num_batched_tokens"])
        seqs = int(kw["max_num_seqs"])
        max_len = int(kw["max_model_len"])
    except (KeyError, TypeError, ValueError):
        return ""
    if tokens <= seqs * max_len:
        return ""
    per_req = -(-tokens // seqs)
    return (f"computed: max_num_batched_tokens {tokens} > max_num_seqs {seqs} x max_model_len {max_len} = "
            f"{seqs * max_len}: vLLM accepts this with a warning, and its warm-up dummy run of {tokens} tokens "
            f"(FlashInfer autotune, compile-range warm-up) then builds {seqs} requests of up to {per_req} tokens, "
            "longer than max_model_len, against block tables sized for max_model_len; vLLM 0.26.0 on an H200 "
            "died there with 'CUDA error: an illegal memory access' in the attention kernel (FlashAttention-3 "
            "and vLLM's Triton attention alike): lower max_num_batched_tokens to max_num_seqs x max_model_len "
            "or raise max_model_len")


_FLAG_ALIASES = {
    "fuse_allreduce_rms": "enable_fi_allreduce_fusion",
    "eliminate_noops": "enable_noop",
}


def _rename_pass_flags(pc: dict[str, Any], api: VllmApi) -> dict[str, Any]:
    """Write pass flags under the names the installed vLLM knows (old <-> new)."""
    out = dict(pc)
    for new, old in _FLAG_ALIASES.items():
        want = api.fusion_flag if new == "fuse_allreduce_rms" else api.noop_flag
        for name in (new, old):
            if name in out and name != want:
                out.setdefault(want, out[name])
                del out[name]
    return out


# ---- the local model folder -------------------------------------------------------------------------


def config_max_len(sc: Scenario) -> int:
    """max_position_embeddings of the config.json vdiag writes (vLLM's max_model_len when unset)."""
    return max(int(vllm_block(sc).get("max_model_len") or 0), 8192)


def hf_config(sc: Scenario) -> dict[str, Any]:
    """A Hugging Face config.json for the scenario's model shape (no weights: load_format=dummy)."""
    m = sc.model
    block = vllm_block(sc)
    model_type, rope_theta = _MODEL_TYPES.get(m.architecture, (str(block.get("model_type") or ""), 1000000.0))
    if not model_type:
        raise ScenarioError(
            f"scenario {sc.name}: model.architecture {m.architecture}: vdiag does not know its Hugging Face "
            f"model_type; set vllm.model_type (known: {', '.join(_MODEL_TYPES)})"
        )
    max_len = config_max_len(sc)
    cfg: dict[str, Any] = {
        "architectures": [m.architecture],
        "model_type": model_type,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "num_hidden_layers": m.num_layers,
        "rms_norm_eps": m.rms_eps,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": max_len,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "torch_dtype": _DTYPES[m.dtype],
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }
    if m.head_dim is not None:
        cfg["head_dim"] = m.head_dim
    return cfg


def write_model_dir(sc: Scenario, dest: Path) -> Path:
    """Write config.json (and a generation config) for the scenario's model; vLLM reads nothing else."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(hf_config(sc), indent=2) + "\n")
    (dest / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (dest / "vdiag.json").write_text(json.dumps(
        {"written_by": "vdiag", "scenario": sc.name, "model": sc.model.name, "weights": "none (load_format=dummy)"}
    ) + "\n")
    return dest


# ---- vllm serve MODEL [flags] -> scenario ------------------------------------------------------------


def _json_or_none(text: str, flag: str) -> dict[str, Any]:
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScenarioError(f"{flag} {text!r}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(val, dict):
        raise ScenarioError(f"{flag} {text!r}: expected a JSON object")
    return val


def _int_list(values: Sequence[str], flag: str) -> list[int]:
    out: list[int] = []
    for v in values:
        for part in re.split(r"[,\s]+", v.strip("[] ")):
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise ScenarioError(f"{flag}: {part!r} is not an integer size") from None
    return out


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(d: dict[str, Any], keys: list[str], value: Any) -> None:
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            nxt = cur[k] = {}
        cur = nxt
    cur[keys[-1]] = value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse calls this on bad input
        raise ScenarioError(f"vllm serve: {message}")


def _serve_parser() -> _Parser:
    p = _Parser(prog="vllm serve", add_help=False, allow_abbrev=False)
    p.add_argument("model", nargs="?")
    p.add_argument("--model", dest="model_flag")
    p.add_argument("-tp", "--tensor-parallel-size", type=int)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int)
    p.add_argument("-dp", "--data-parallel-size", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-model-len")
    p.add_argument("--dtype")
    p.add_argument("--cuda-graph-sizes", nargs="+")
    p.add_argument("--cudagraph-capture-sizes", nargs="+")
    p.add_argument("--max-cudagraph-capture-size", type=int)
    p.add_argument("-cc", "--compilation-config")
    p.add_argument("--optimization-level")
    p.add_argument("--enforce-eager", action="store_true", default=None)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--distributed-executor-backend")
    p.add_argument("--seed", type=int)
    p.add_argument("--hf-overrides")
    return p


@dataclass
class ServeCommand:
    """What `vdiag scenario from-vllm` understood of a `vllm serve` command."""

    model: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    capture_sizes: list[int] | None = None
    compilation_config: dict[str, Any] = field(default_factory=dict)
    optimization_level: int | None = None
    enforce_eager: bool | None = None
    gpu_memory_utilization: float | None = None
    seed: int | None = None
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)


def _normalise(argv: Sequence[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """Strip `vllm serve`, turn -O forms into --optimization-level / --compilation-config, and pull out the
    dotted forms (`-cc.pass_config.fuse_allreduce_rms=true`, `--compilation-config.cudagraph_mode FULL`)."""
    args = list(argv)
    if args and Path(args[0]).name in ("vllm", "python", "python3"):
        args = args[1:]
        if args and args[0] == "-m":
            args = args[2:] if len(args) > 1 and args[1].startswith("vllm") else args[1:]
    if args and args[0] == "serve":
        args = args[1:]
    out: list[str] = []
    dotted: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            # vLLM's own rule: underscores become dashes between the leading -- and the first dot.
            head, sep, rest = a.partition("=")
            first, dot, tail = head[2:].partition(".")
            a = "--" + first.replace("_", "-") + dot + tail + sep + rest
        if a.startswith("-O") and a not in ("-O",):
            val = a[3:] if a[2:3] == "=" else a[2:]
            out += (["--compilation-config", val] if val.lstrip().startswith("{")
                    else ["--optimization-level", val])
        elif a == "-O" and i + 1 < len(args):
            val = args[i + 1]
            out += (["--compilation-config", val] if val.lstrip().startswith("{") else ["--optimization-level", val])
            i += 1
        elif re.match(r"^(-cc|--compilation-config)\.", a):
            key, eq, val = a.partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ScenarioError(f"{a}: needs a value")
                val = args[i + 1]
                i += 1
            path = key.split(".", 1)[1].replace("-", "_").split(".")
            _set_dotted(dotted, path, _scalar(val))
        else:
            out.append(a)
        i += 1
    return out, dotted, args


_KNOWN_WITH_VALUE = {"--port", "--host", "--api-key", "--served-model-name", "--tokenizer", "--download-dir"}


def parse_serve(argv: Sequence[str]) -> ServeCommand:
    """Parse `vllm serve MODEL [flags]` (with or without the leading `vllm serve`)."""
    if not argv:
        raise ScenarioError("from-vllm: give the vllm command after --, for example: "
                            "vdiag scenario from-vllm -- vllm serve meta-llama/Llama-3.1-70B-Instruct -tp 2 -pp 2")
    args, dotted, original = _normalise(argv)
    ns, rest = _serve_parser().parse_known_args(args)
    model = ns.model_flag or ns.model
    if not model:
        raise ScenarioError("from-vllm: no model in the command; write it as `vllm serve MODEL ...`")
    cc: dict[str, Any] = {}
    if ns.compilation_config:
        text = ns.compilation_config.strip()
        if text.isdigit():
            cc["mode"] = int(text)
        else:
            cc = _json_or_none(text, "--compilation-config")
    cc = _deep_merge(cc, dotted)
    sizes: list[int] | None = None
    if ns.cudagraph_capture_sizes:
        sizes = _int_list(ns.cudagraph_capture_sizes, "--cudagraph-capture-sizes")
    elif ns.cuda_graph_sizes:
        sizes = _int_list(ns.cuda_graph_sizes, "--cuda-graph-sizes")
    if "cudagraph_capture_sizes" in cc:
        cc_sizes = cc.pop("cudagraph_capture_sizes")
        sizes = [int(s) for s in (cc_sizes if isinstance(cc_sizes, list) else [cc_sizes])]
    if ns.max_cudagraph_capture_size is not None:
        cc.setdefault("max_cudagraph_capture_size", ns.max_cudagraph_capture_size)
    max_len = None
    if ns.max_model_len:
        txt = str(ns.max_model_len).lower()
        mult = 1024 if txt.endswith("k") else (1024 * 1024 if txt.endswith("m") else 1)
        try:
            max_len = int(float(txt.rstrip("km")) * mult)
        except ValueError:
            raise ScenarioError(f"--max-model-len {ns.max_model_len!r}: not a number of tokens") from None
    opt = None
    if ns.optimization_level is not None:
        try:
            opt = int(ns.optimization_level)
        except ValueError:
            raise ScenarioError(f"-O {ns.optimization_level!r}: expected an optimization level 0-3") from None
    unknown = [r for r in rest]
    return ServeCommand(
        model=model, tp=ns.tensor_parallel_size or 1, pp=ns.pipeline_parallel_size or 1,
        dp=ns.data_parallel_size or 1, max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=max_len, dtype=ns.dtype, capture_sizes=sizes, compilation_config=cc,
        optimization_level=opt, enforce_eager=ns.enforce_eager, gpu_memory_utilization=ns.gpu_memory_utilization,
        seed=ns.seed, hf_overrides=_json_or_none(ns.hf_overrides, "--hf-overrides") if ns.hf_overrides else {},
        unknown=unknown, argv=list(original),
    )


def preset_for(model: str) -> str | None:
    """The model preset a Hugging Face model id stands for, if any (case and `Meta-` prefix ignored)."""
    base = model.rstrip("/").split("/")[-1].lower().replace("meta-llama-", "llama-")
    for key, p in MODEL_PRESETS.items():
        if model.lower() == str(p["name"]).lower() or base == str(p["name"]).split("/")[-1].lower():
            return key
    for key in sorted(MODEL_PRESETS, key=len, reverse=True):
        if base == key or base.startswith(key + "-"):
            return key
    return None


_FUSION_FLAGS = ("fuse_allreduce_rms", "enable_fi_allreduce_fusion")
_VLLM_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16",
                "float32": "fp32", "float": "fp32", "fp32": "fp32"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "scenario"


def _flow(value: Any) -> str:
    """A value as one line of YAML (flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip().removesuffix("...").strip()


def scenario_yaml_from_serve(cmd: ServeCommand, engine: str = "vllm", name: str | None = None) -> str:
    """The scenario YAML for a parsed `vllm serve` command, with comments where the user must look."""
    if cmd.dp != 1:
        raise ScenarioError(f"-dp {cmd.dp}: data parallelism is not replayed; write the scenario for one DP replica")
    cc = copy.deepcopy(cmd.compilation_config)
    pass_config = cc.pop("pass_config", {}) if isinstance(cc.get("pass_config"), dict) else {}
    fusion = "auto"
    for flag in _FUSION_FLAGS:
        if flag in pass_config:
            fusion = "on" if bool(pass_config.pop(flag)) else "off"
    mode = cc.get("cudagraph_mode")
    capture_mode = str(mode).upper() if str(mode).upper() in ("FULL", "PIECEWISE") else None

    preset = preset_for(cmd.model)
    shown = " ".join(shlex.quote(a) for a in redact_argv(["vllm", "serve", *cmd.argv]))
    lines = [
        "# Written by `vdiag scenario from-vllm` from:",
        f"#   {shown}",
    ]
    if cmd.unknown:
        lines.append("# Flags vdiag does not model (kept here for reference):")
        lines.append("#   " + " ".join(shlex.quote(a) for a in redact_argv(cmd.unknown)))
    nm = name or _slug(f"{cmd.model.split('/')[-1]}-tp{cmd.tp}-pp{cmd.pp}")
    lines += [f"name: {_flow(nm)}",
              f"description: {_flow('vllm serve ' + cmd.model + f' with TP={cmd.tp}, PP={cmd.pp}')}",
              f"engine: {engine}"]
    dtype = _VLLM_DTYPES.get(str(cmd.dtype).lower()) if cmd.dtype and cmd.dtype != "auto" else None
    if cmd.dtype and cmd.dtype != "auto" and dtype is None:
        raise ScenarioError(f"--dtype {cmd.dtype}: allowed values: auto, bfloat16, float16, float32")
    if preset is not None:
        if dtype and dtype != "bf16":
            lines += ["model:", f"  preset: {preset}", f"  dtype: {dtype}"]
        else:
            lines.append(f"model: {preset}")
    else:
        lines += [
            "# FILL IN: vdiag has no preset for this model. Copy hidden_size, num_hidden_layers (num_layers),",
            "# num_attention_heads, num_key_value_heads, intermediate_size and vocab_size from its config.json.",
            "model:",
            f"  name: {_flow(cmd.model)}",
            "  hidden_size: 4096        # FILL IN",
            "  num_layers: 32           # FILL IN",
            "  num_attention_heads: 32  # FILL IN",
            "  num_key_value_heads: 8   # FILL IN",
            "  intermediate_size: 14336 # FILL IN",
            "  vocab_size: 128256       # FILL IN",
            "  architecture: LlamaForCausalLM  # FILL IN",
        ]
        if dtype:
            lines.append(f"  dtype: {dtype}")
    lines += ["parallel:", f"  tp: {cmd.tp}", f"  pp: {cmd.pp}"]
    cap: list[str] = []
    if cmd.capture_sizes:
        cap.append(f"  sizes: {_flow(sorted(set(cmd.capture_sizes)))}")
    if cmd.max_num_seqs is not None:
        cap.append(f"  max_num_seqs: {cmd.max_num_seqs}")
    if cmd.max_num_batched_tokens is not None:
        cap.append(f"  max_num_batched_tokens: {cmd.max_num_batched_tokens}")
    if capture_mode:
        cap.append(f"  mode: {capture_mode}")
    if cap:
        lines += ["capture:", *cap]
    lines += ["fusion:", f"  allreduce_rms: {fusion}" + (
        "   # vLLM's own gate decides (engine: vllm); the replay uses the gate after #43616" if fusion == "auto" else "")]
    vb: list[str] = []
    if cmd.max_model_len is not None:
        vb.append(f"  max_model_len: {cmd.max_model_len}")
    if cmd.optimization_level is not None:
        vb.append(f"  optimization_level: {cmd.optimization_level}")
    if cmd.enforce_eager:
        vb.append("  enforce_eager: true")
    if cmd.gpu_memory_utilization is not None:
        vb.append(f"  gpu_memory_utilization: {cmd.gpu_memory_utilization}")
    if cmd.seed is not None:
        vb.append(f"  seed: {cmd.seed}")
    if pass_config:
        vb.append(f"  pass_config: {_flow(pass_config)}")
    if cc:
        vb.append(f"  compilation_config: {_flow(cc)}")
    if cmd.hf_overrides:
        vb.append(f"  hf_overrides: {_flow(cmd.hf_overrides)}")
    # A limit the command sets to exactly vdiag's capture default would read as unset (scheduler_args):
    # pass it to vLLM explicitly.
    same = {k: v for k, v in (("max_num_seqs", cmd.max_num_seqs), ("max_num_batched_tokens", cmd.max_num_batched_tokens))
            if v is not None and v == _CAPTURE_DEFAULTS[k]}
    if same:
        vb.append(f"  llm_kwargs: {_flow(same)}   # set in the command, equal to vdiag's capture defaults")
    if vb:
        lines += ["vllm:", *vb]
    if engine == "vllm":
        lines.append(("" if vb else "# vllm:\n") + "#   num_layers: 4   # shrink the model (hf_overrides.num_hidden_layers)")
    text = "\n".join(lines) + "\n"
    # The result must load as a scenario; an inline model with FILL IN values still does.
    from repro.scenario import parse_scenario_text

    parse_scenario_text(text, "<from-vllm>")
    return text


def plan_summary(plan: VllmPlan, api: VllmApi) -> dict[str, Any]:
    """What the report records about the translation (JSON-safe)."""
    return {
        "api": {k: v for k, v in api.__dict__.items()},
        "executor": plan.executor,
        "llm_kwargs": plan.llm_kwargs,
        "instrument": plan.instrument.__dict__,
    }
