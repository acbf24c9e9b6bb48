"""Scenario files: the pydantic model, the presets, and a loader whose errors name file:line:column.

A scenario describes one vLLM start-up to replay: the model's shape, the TP/PP layout, the fusion flags,
the capture sizes, the backend, and optional injected faults.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from repro.errors import ScenarioError

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Shapes from the models' Hugging Face config.json files.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        name="meta-llama/Llama-3.1-8B-Instruct", hidden_size=4096, num_layers=32, rms_eps=1e-5,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
        architecture="LlamaForCausalLM",
    ),
    "llama-3.1-70b": dict(
        name="meta-llama/Llama-3.1-70B-Instruct", hidden_size=8192, num_layers=80, rms_eps=1e-5,
        num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
        architecture="LlamaForCausalLM",
    ),
    "llama-3.1-405b": dict(
        name="meta-llama/Llama-3.1-405B-Instruct", hidden_size=16384, num_layers=126, rms_eps=1e-5,
        num_attention_heads=128, num_key_value_heads=8, intermediate_size=53248, vocab_size=128256,
        architecture="LlamaForCausalLM",
    ),
    "qwen3-32b": dict(
        name="Qwen/Qwen3-32B", hidden_size=5120, num_layers=64, rms_eps=1e-6,
        num_attention_heads=64, num_key_value_heads=8, intermediate_size=25600, vocab_size=151936,
        head_dim=128, architecture="Qwen3ForCausalLM",
    ),
}

# Device attributes that FlashInfer's launcher reads (SM count, registers per block, cluster limit).
DEVICE_PRESETS: dict[str, dict[str, Any]] = {
    "h100-sxm": dict(name="NVIDIA H100 80GB HBM3", sm_count=132, sm_version=90),
    "h100-pcie": dict(name="NVIDIA H100 PCIe", sm_count=114, sm_version=90),
    "h200": dict(name="NVIDIA H200", sm_count=132, sm_version=90),
    "b200": dict(name="NVIDIA B200", sm_count=148, sm_version=100),
}

Phase = Literal["workspace", "profile", "warmup", "capture"]
PHASES: tuple[str, ...] = ("workspace", "profile", "warmup", "capture")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(_Strict):
    preset: str | None = None
    name: str = "custom"
    hidden_size: Annotated[int, Field(gt=0)] = 4096
    num_layers: Annotated[int, Field(gt=0)] = 32
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    rms_eps: Annotated[float, Field(gt=0)] = 1e-5
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 128256
    head_dim: int | None = None
    architecture: str = "LlamaForCausalLM"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if isinstance(data, dict) and data.get("preset") is not None:
            key = str(data["preset"]).lower()
            if key not in MODEL_PRESETS:
                raise ValueError(f"unknown model preset {data['preset']!r}; allowed: {', '.join(MODEL_PRESETS)}")
            merged = dict(MODEL_PRESETS[key])
            merged.update({k: v for k, v in data.items() if k != "preset"})
            merged["preset"] = key
            return merged
        return data

    @model_validator(mode="after")
    def _vector_aligned(self) -> ModelShape:
        vec = 16 // DTYPE_BYTES[self.dtype]
        if self.hidden_size % vec:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of {vec} "
                f"(FlashInfer moves 16-byte vectors of {self.dtype})"
            )
        return self

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


class Parallel(_Strict):
    tp: Annotated[int, Field(ge=1, le=64)] = 1
    pp: Annotated[int, Field(ge=1, le=64)] = 1
    dp: Annotated[int, Field(ge=1)] = 1

    @field_validator("dp")
    @classmethod
    def _no_dp(cls, v: int) -> int:
        if v != 1:
            raise ValueError("data parallelism (dp > 1) is not replayed yet; set dp: 1 and run one DP replica")
        return v

    @model_validator(mode="after")
    def _fused_sizes(self) -> Parallel:
        if self.tp not in (1, 2, 4, 8, 16):
            raise ValueError(f"tp={self.tp}: FlashInfer's fused all-reduce supports tp in 2, 4, 8, 16 (or 1: no all-reduce)")
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def vllm_default_capture_sizes(max_num_seqs: int = 256) -> list[int]:
    """vLLM's default cudagraph_capture_sizes, ascending: 1, 2, 4, 8..248 by 8, 256.. by 16 up to the cap."""
    cap = min(max_num_seqs * 2, 512)
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, cap + 1, 16)]
    return [s for s in sizes if s <= cap]


class Capture(_Strict):
    sizes: list[Annotated[int, Field(gt=0)]] | Literal["default"] = "default"
    max_num_seqs: Annotated[int, Field(gt=0)] = 256
    mode: Literal["FULL", "PIECEWISE"] = "FULL"
    warmup_steps: Annotated[int, Field(ge=0)] = 1
    max_num_batched_tokens: Annotated[int, Field(gt=0)] = 8192

    def ordered(self) -> list[int]:
        """Capture sizes in the order vLLM captures them: largest first, no duplicates."""
        base = vllm_default_capture_sizes(self.max_num_seqs) if self.sizes == "default" else self.sizes
        return sorted(set(base), reverse=True)


class Fusion(_Strict):
    allreduce_rms: Literal["on", "off", "auto"] = "auto"
    oneshot: Literal["flashinfer", "vllm", "always", "never"] = "vllm"
    workspace_group: Literal["tp", "world"] = "tp"
    pattern: Literal["residual_rmsnorm", "residual_rmsnorm_fp8", "residual_rmsnorm_fp4"] = "residual_rmsnorm"
    fp32_acc: bool = True
    trigger_completion_at_end: bool = True
    max_token_num: Annotated[int, Field(gt=0)] | None = None

    @field_validator("allreduce_rms", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        # YAML 1.1 reads bare on/off as booleans.
        if v is True:
            return "on"
        if v is False:
            return "off"
        return v


class Device(_Strict):
    preset: str | None = None
    name: str = "NVIDIA H100 80GB HBM3"
    sm_count: Annotated[int, Field(gt=0)] = 132
    sm_version: Annotated[int, Field(ge=70)] = 90
    max_registers_per_block: Annotated[int, Field(gt=0)] = 65536
    regs_per_thread: Annotated[int, Field(gt=0)] = 64
    max_cluster_size: Annotated[int, Field(ge=1, le=16)] = 8

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if isinstance(data, dict) and data.get("preset") is not None:
            key = str(data["preset"]).lower()
            if key not in DEVICE_PRESETS:
                raise ValueError(f"unknown device preset {data['preset']!r}; allowed: {', '.join(DEVICE_PRESETS)}")
            merged = dict(DEVICE_PRESETS[key])
            merged.update({k: v for k, v in data.items() if k != "preset"})
            merged["preset"] = key
            return merged
        return data


class Selector(_Strict):
    """Which calls a fault applies to. Every field given must match; none given matches every call."""

    phase: Phase | None = None
    size: int | None = None
    layer: int | None = None
    sub: Literal[0, 1] | None = None
    call: int | None = None

    def matches(self, phase: str, size: int, layer: int, sub: int, call: int) -> bool:
        return (
            (self.phase is None or self.phase == phase)
            and (self.size is None or self.size == size)
            and (self.layer is None or self.layer == layer)
            and (self.sub is None or self.sub == sub)
            and (self.call is None or self.call == call)
        )


FaultKind = Literal["token_divergence", "protocol_mismatch", "workspace_fail", "flag_offset", "delay", "jit_lock"]


class Fault(_Strict):
    kind: FaultKind
    ranks: list[int]
    at: Selector = Selector()
    once: bool = True
    tokens: int = 1
    mode: Literal["oneshot", "twoshot"] = "twoshot"
    offset: int = 1
    seconds: Annotated[float, Field(ge=0)] = 5.0

    @model_validator(mode="before")
    @classmethod
    def _rank_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rank" in data:
            data = dict(data)
            r = data.pop("rank")
            data["ranks"] = r if isinstance(r, list) else [r]
        return data


class Watchdog(_Strict):
    stall_s: Annotated[float, Field(gt=0)] | None = None
    floor_s: Annotated[float, Field(gt=0)] = 2.0
    multiple: Annotated[float, Field(gt=0)] = 4.0
    sample_interval_s: Annotated[float, Field(gt=0)] = 0.2
    max_run_s: Annotated[float, Field(gt=0)] = 900.0
    busy_cpu_pct: Annotated[float, Field(gt=0, le=100)] = 20.0
    # How long to keep watching a suspected stall whose idle ranks are outside every known wait (a
    # straggler busy on the host: a JIT build, torch.compile, a slow file system) before calling it a hang.
    patience_s: Annotated[float, Field(ge=0)] = 60.0


class Sim(_Strict):
    payload_width: Annotated[int, Field(gt=0)] | None = 64


class Scenario(_Strict):
    name: str
    description: str = ""
    engine: Literal["replay", "vllm"] = "replay"
    model: ModelShape
    parallel: Parallel = Parallel()
    capture: Capture = Capture()
    fusion: Fusion = Fusion()
    backend: Literal["sim", "flashinfer", "nccl", "auto"] = "auto"
    device: Device = Device()
    faults: list[Fault] = []
    expect: Literal["hang", "clean", "corruption", "failure"] | None = None
    watchdog: Watchdog = Watchdog()
    sim: Sim = Sim()
    hook: str | None = None
    vllm: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check_layout(self) -> Scenario:
        world = self.parallel.world_size
        for i, f in enumerate(self.faults):
            for r in f.ranks:
                if not 0 <= r < world:
                    raise ValueError(
                        f"faults[{i}].ranks: rank {r} does not exist; tp x pp = {world} ranks (0..{world - 1})"
                    )
        if self.capture.sizes != "default" and not self.capture.sizes:
            raise ValueError("capture.sizes: empty; give at least one size or 'default'")
        too_big = self.largest_fused_call()
        if too_big > WORKSPACE_MAX_TOKENS:
            field = ("fusion.max_token_num" if self.fusion.max_token_num is not None
                     else "capture.max_num_batched_tokens")
            raise ValueError(
                f"{field}: a fused call of {too_big} tokens (fusion limit {self.fusion_max_token_num()}) is larger "
                f"than the {WORKSPACE_MAX_TOKENS} tokens vdiag's workspace holds; set fusion.max_token_num to at "
                f"most {WORKSPACE_MAX_TOKENS} (larger calls then take the unfused path, as in vLLM) or keep "
                f"capture.max_num_batched_tokens and capture.sizes at most {WORKSPACE_MAX_TOKENS}"
            )
        return self

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def fusion_enabled(self) -> bool:
        """Whether vLLM would run the fused all-reduce + RMSNorm for this layout.

        `auto` is vLLM's gate after #43616 (`enable_allreduce_rms_fusion`): TP > 1 and PP == 1.
        `on` forces it, as vLLM did between #41458 and #43616 (and with the pass flag set).
        """
        if self.parallel.tp == 1:
            return False
        if self.fusion.allreduce_rms == "on":
            return True
        if self.fusion.allreduce_rms == "off":
            return False
        return self.parallel.pp == 1

    def fusion_max_token_num(self) -> int:
        """The largest token count the fused op handles; larger inputs take the unfused path (vLLM)."""
        if self.fusion.max_token_num is not None:
            return self.fusion.max_token_num
        mb = FI_ALLREDUCE_FUSION_MAX_SIZE_MB.get(self.device.sm_version, {}).get(self.parallel.tp, 64)
        return max(1, int(mb * MIB) // (self.model.hidden_size * self.model.elem_bytes))

    def phase_sizes(self) -> dict[str, list[int]]:
        """The token counts each phase runs, as the replay runs them."""
        order = self.capture.ordered()
        return {"profile": [self.capture.max_num_batched_tokens], "warmup": order[:1], "capture": order}

    def call_plan(self) -> Iterator[tuple[str, int, int, int, int]]:
        """Every call of the replay in order, as (phase, size, layer, sub, call) (repro/engines/replay/replay.py's loop)."""
        call = 0
        steps = [("profile", self.capture.max_num_batched_tokens), ("warmup", self.capture.ordered()[0])]
        for size in self.capture.ordered():
            steps += [("capture", size)] * (self.capture.warmup_steps + 1)
        for phase, size in steps:
            for layer in range(self.model.num_layers):
                for sub in (0, 1):
                    yield phase, size, layer, sub, call
                    call += 1

    def largest_fused_call(self) -> int:
        """The most tokens one fused call will carry (0 when fusion is off): sizes up to the fusion limit,
        plus a token-divergence fault's extra tokens."""
        if not self.fusion_enabled():
            return 0
        limit = self.fusion_max_token_num()
        extra = max([f.tokens for f in self.faults if f.kind == "token_divergence"] + [0])
        sizes = {s for ss in self.phase_sizes().values() for s in ss}
        return max([t for s in sizes for t in (s, s + extra) if t <= limit] + [0])

    def payload_width(self) -> int:
        """Elements per token the sim carries (docs/mechanisms.md, "Payload scaling": the protocols do not depend on row width)."""
        w = self.sim.payload_width
        if w is None or w >= self.model.hidden_size:
            return self.model.hidden_size
        return w

    def payload_scaled(self) -> bool:
        return self.payload_width() != self.model.hidden_size


MIB = 1024 * 1024
# The most tokens the workspace vdiag creates holds, on every backend (the sim keeps it in /dev/shm).
WORKSPACE_MAX_TOKENS = 16384

FUSED_ONLY_KINDS = ("protocol_mismatch", "workspace_fail", "jit_lock")
SELECTOR_FREE_KINDS = ("workspace_fail", "jit_lock")  # act at workspace creation, whatever `at:` says


@dataclass(frozen=True)
class FaultWarning:
    """An injected fault that can never fire: which fault, and why, naming the field."""

    path: str  # the scenario file, for the printed line
    index: int  # faults[index]
    why: str  # "at.layer: 5, but model.num_layers is 4 ...", the field first

    @property
    def message(self) -> str:
        return f"faults[{self.index}].{self.why}; the fault never fires"

    @property
    def line(self) -> str:
        """As `scenario validate` and `run` print it: `FILE: warning: faults[i].FIELD: ...`."""
        return f"{self.path}: warning: {self.message}"


def fault_warnings(sc: Scenario, path: str = "<scenario>") -> list[FaultWarning]:
    """One warning for each injected fault that can never fire in this scenario, naming the field."""
    out: list[FaultWarning] = []
    plan = list(sc.call_plan()) if sc.faults else []
    n_calls = len(plan)
    sizes = sc.phase_sizes()
    limit = sc.fusion_max_token_num()
    for i, f in enumerate(sc.faults):
        if f.kind in FUSED_ONLY_KINDS and not sc.fusion_enabled():
            out.append(FaultWarning(path, i, f"kind: {f.kind} acts on the fused all-reduce, which this scenario "
                                             "does not run (fusion off or gated)"))
            continue
        if f.kind in SELECTOR_FREE_KINDS:
            continue
        at = f.at
        why = ""
        if at.phase == "workspace":
            why = "at.phase: workspace has no all-reduce calls; use profile, warmup or capture"
        elif at.layer is not None and at.layer >= sc.model.num_layers:
            why = f"at.layer: {at.layer}, but model.num_layers is {sc.model.num_layers} (layers 0..{sc.model.num_layers - 1})"
        elif at.call is not None and at.call >= n_calls:
            why = f"at.call: {at.call}, but the replay makes {n_calls} calls (0..{n_calls - 1})"
        elif at.size is not None and at.size not in {s for ss in sizes.values() for s in ss}:
            why = f"at.size: {at.size} is not a size any phase runs (capture sizes {_short(sizes['capture'])}, " \
                  f"profile {sizes['profile'][0]})"
        elif at.size is not None and at.phase is not None and at.size not in sizes[at.phase]:
            why = f"at.size: {at.size} is not a size phase {at.phase} runs ({_short(sizes[at.phase])})"
        else:
            hits = [c for c in plan if at.matches(*c)]
            if not hits:
                why = "at: no call matches every field given together (" + ", ".join(
                    f"{k}={v}" for k, v in at.model_dump().items() if v is not None) + ")"
            elif f.kind == "protocol_mismatch" and all(c[1] > limit for c in hits):
                why = (f"at: every matching call has more tokens than the fusion limit {limit}, so it takes the "
                       "unfused path and has no protocol to switch")
        if why:
            out.append(FaultWarning(path, i, why))
    return out


def _short(sizes: Sequence[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else ", ".join(map(str, sizes[:6])) + f", ... ({len(sizes)})"


# vLLM's tables (vllm/compilation/passes/fusion/allreduce_rms_fusion.py): inputs above the first use the
# unfused path; inputs up to the second use one-shot.
FI_ALLREDUCE_FUSION_MAX_SIZE_MB: dict[int, dict[int, float]] = {
    90: {2: 64, 4: 2, 8: 0.5},
    100: {2: 64, 4: 32, 8: 1},
    103: {2: 64, 4: 64, 8: 2},
}
FI_ALLREDUCE_ONE_SHOT_MAX_SIZES_MB: dict[int, dict[int, float]] = {
    90: {2: 32, 4: 2, 8: 0.5},
    100: {2: 32, 4: 4, 8: 1},
    103: {2: 32, 4: 4, 8: 2},
}
# FlashInfer's own rule (`_should_use_oneshot` in flashinfer/comm/trtllm_ar.py).
FLASHINFER_ONESHOT_HEURISTIC_MB: dict[int, float] = {2: 512, 4: 64, 8: 42}


def choose_oneshot(policy: str, token_num: int, hidden: int, elem_bytes: int, tp: int, sm_version: int) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy == "flashinfer":
        mb = token_num * hidden * 2 * tp * elem_bytes / MIB
        return mb <= FLASHINFER_ONESHOT_HEURISTIC_MB.get(tp, 42)
    limit = FI_ALLREDUCE_ONE_SHOT_MAX_SIZES_MB.get(sm_version, {}).get(tp)
    return limit is None or token_num * hidden * elem_bytes <= limit * MIB


# ---- loading ------------------------------------------------------------------------------------


def _node_at(node: yaml.Node | None, loc: Sequence[int | str]) -> yaml.Node | None:
    """Walk a composed YAML node along a pydantic error location; return the deepest node found."""
    cur = node
    for key in loc:
        if isinstance(cur, yaml.MappingNode):
            nxt = None
            for k, v in cur.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                    nxt = v
                    break
            if nxt is None:
                return cur
            cur = nxt
        elif isinstance(cur, yaml.SequenceNode) and isinstance(key, int):
            if key >= len(cur.value):
                return cur
            cur = cur.value[key]
        else:
            return cur
    return cur


def _loc_text(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_apply_preset(), ModelShape]",) or ("[" in str(part) and "(" in str(part)):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _fmt_error(path: str, root: yaml.Node | None, err: dict[str, Any]) -> str:
    loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and ("function" in p or p in ("str", "dict")))]
    node = _node_at(root, loc)
    line = col = 1
    if node is not None:
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    m = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg)
    if m and not loc:
        # a cross-field check names its own field path: locate that node
        loc = [int(x) if x.isdigit() else x for x in re.findall(r"[A-Za-z_]\w*|\d+", m.group(1))]
        msg = m.group(2)
        node = _node_at(root, loc)
        if node is not None:
            line, col = node.start_mark.line + 1, node.start_mark.column + 1
    if err.get("type") == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"got {err.get('input')!r}; allowed values: {expected}"
    elif err.get("type") == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling (see `vdiag scenario schema`)"
    elif err.get("type") == "missing":
        msg = "required field is missing"
    return f"{path}:{line}:{col}: {_loc_text(loc)}: {msg}"


def parse_scenario_text(text: str, path: str = "<scenario>") -> Scenario:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{where}: not valid YAML: {problem}; fix the syntax at that position") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}:1:1: a scenario must be a YAML mapping with at least `name` and `model`")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        lines = [_fmt_error(path, root, dict(err)) for err in errs]
        more = f" (and {len(lines) - 1} more: run `vdiag scenario validate {path}`)" if len(lines) > 1 else ""
        raise ScenarioError(lines[0] + more, ) from None


def all_errors(path: Path) -> list[str]:
    """Every problem in a scenario file, one line each (for `vdiag scenario validate`)."""
    try:
        text = path.read_text()
    except OSError as e:
        return [f"{path}: cannot read the scenario file: {e.strerror}; check the path"]
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        try:
            parse_scenario_text(text, str(path))
        except ScenarioError as se:
            return [se.message]
        return []
    if not isinstance(data, dict):
        return [f"{path}:1:1: a scenario must be a YAML mapping with at least `name` and `model`"]
    try:
        Scenario.model_validate(data)
    except ValidationError as e:
        return [_fmt_error(str(path), root, dict(err)) for err in e.errors()]
    return []


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a scenario mapping."""
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set {item!r}: expected KEY=VALUE, for example --set model.num_layers=4")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        cur: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(cur.get(p), str) and p in ("model", "device"):
                cur[p] = {"preset": cur[p]}
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ScenarioError(f"--set {key}: {p} is not a mapping in this scenario")
        cur[parts[-1]] = value
    return data


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ScenarioError(f"{p}: scenario file not found; check the path (shipped ones are in scenarios/)") from None
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read the scenario file: {e.strerror}") from None
    if not overrides:
        return parse_scenario_text(text, str(p))
    sc = parse_scenario_text(text, str(p))  # report file errors with positions first
    data = sc.model_dump(mode="json", exclude_defaults=False)
    data = apply_overrides(data, overrides)
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = _loc_text(err["loc"])
        m = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg)
        if m and not err["loc"]:  # a cross-field check names its own field
            where, msg = m.group(1), m.group(2)
        raise ScenarioError(f"{p}: --set: {where}: {msg}") from None


def dump_resolved(sc: Scenario) -> str:
    data = sc.model_dump(mode="json")
    data["resolved"] = {
        "world_size": sc.world_size,
        "fusion_enabled": sc.fusion_enabled(),
        "fusion_max_token_num": sc.fusion_max_token_num(),
        "capture_order": sc.capture.ordered(),
        "payload_width": sc.payload_width(),
    }
    return yaml.safe_dump(data, sort_keys=False)


def json_schema() -> str:
    return json.dumps(Scenario.model_json_schema(), indent=2)
