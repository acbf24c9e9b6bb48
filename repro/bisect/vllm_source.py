"""`hook: vllm-source`: the replay's fusion settings, read from a vLLM checkout's own code and pins.

Nothing of the checkout is imported or run. Three facts are read, each with the file and line it came from:

1. **The fusion gate.** The checkout's `enable_allreduce_rms_fusion(cfg)` (vllm/config/vllm.py, or another
   module under vllm/config/) is parsed with `ast` and its body is *interpreted* (never executed) against
   stand-in objects: the scenario's TP and PP (DP 1), a CUDA platform of the stated SM (9.0 by default, or
   10.x) with FlashInfer installed, ROCm off, vLLM's environment variables at their defaults. Only the
   statements and expressions such a gate uses are understood (if/return/and/or/not, comparisons, the
   platform's capability checks); anything else makes the fact unreadable. Where the function does not
   exist, the version decided the fused pass with a `PassConfig` flag (`enable_fi_allreduce_fusion` or
   `fuse_allreduce_rms`); its default is read instead (False: the pass only runs when a user asks). A
   version with neither and no fused pass at all (no `AllReduceFusionPass`, no workspace call) runs unfused.
2. **Whether vLLM passes its TP group to FlashInfer's workspace creation** (vLLM #45917): the call sites of
   `create_allreduce_fusion_workspace` / `trtllm_create_ipc_workspace_for_all_reduce_fusion` under vllm/
   are found with `ast`, and their `group=` / `comm_backend=` arguments are followed (a local assignment,
   a `TorchDistBackend(group=...)` call, an explicit `dist.group.WORLD`, or nothing). Call sites under
   vllm/compilation/ (the fused pass) win over others; call sites that still disagree are unreadable.
3. **The FlashInfer version the checkout pins**: an exact `flashinfer-python==X` (or `flashinfer==X`) in
   requirements/*.txt, requirements*.txt, setup.py or pyproject.toml (requirements/cuda.txt first).
   From FlashInfer's own behaviour (`FLASHINFER_WORLD_DEFAULT` below) follows the group the workspace is
   rendezvoused over when vLLM passes none.

A fact that cannot be read makes the step *skip* (exit 125 semantics) with the reason; nothing is guessed.
A fact that the replay does not need (the workspace when the gate is off) is reported but never skips.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from packaging.version import InvalidVersion, Version

HOOK_NAME = "vllm-source"

GATE_FUNCTION = "enable_allreduce_rms_fusion"
PASS_FLAGS = ("fuse_allreduce_rms", "enable_fi_allreduce_fusion")
FUSION_PASS = "AllReduceFusionPass"
WORKSPACE_CALLS = ("create_allreduce_fusion_workspace", "trtllm_create_ipc_workspace_for_all_reduce_fusion")

# FlashInfer's own behaviour, by version (from its release history; see docs/bisect.md):
# - 0.6.10 to 0.6.14 rendezvous the fused all-reduce workspace over the `group` argument, whose default is
#   WORLD, so a caller that passes no group shares one workspace between all TP groups of a PP>1 job;
#   before and after, a call without a group sets the workspace up among the `world_size` ranks it names.
# - before 0.6.13, `TorchDistBackend.bcast` used a group-local root as a global rank, so a workspace over a
#   TP group that does not contain global rank 0 fails to be created (every PP stage but the first).
FLASHINFER_WORLD_DEFAULT = (Version("0.6.10"), Version("0.6.15"))  # [first, end) of the WORLD-default window
FLASHINFER_BCAST_FIXED = Version("0.6.13")
WINDOW_TEXT = "0.6.10 to 0.6.14"

PIN_FILES_FIRST = ("requirements/cuda.txt", "requirements/common.txt")
_PIN = re.compile(r"""^\s*["']?flashinfer(?:-python)?\s*(==|>=|~=|<=|>|<|!=)\s*([0-9][0-9A-Za-z.+!-]*)""")


@dataclass(frozen=True)
class SourceRead:
    """One fact read from the checkout."""

    what: str  # "fusion gate", "workspace group", "FlashInfer pin"
    value: str
    where: str  # "vllm/config/vllm.py:155" (relative to the checkout)
    detail: str

    def line(self) -> str:
        return f"{self.what}: {self.value} ({self.where}: {self.detail})"


@dataclass
class SourceSettings:
    """What the replay is told for one checkout, or why the step cannot be judged."""

    reads: list[SourceRead] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    skip: str = ""  # non-empty: the step is skipped, and this says why
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.skip:
            return f"skip: {self.skip}"
        return "; ".join(f"{k}={v}" for k, v in self.overrides.items() if k != "hook")


class Unreadable(Exception):
    """A fact of the checkout that cannot be read; the message says what and where."""


# ---- the fusion gate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """The stated platform the gate is evaluated on: CUDA, SM `sm` (90, 100, 103...), FlashInfer present."""

    sm: int = 90

    def describe(self) -> str:
        return f"CUDA SM {self.sm // 10}.{self.sm % 10} with FlashInfer"

    def _cap(self, arg: Any) -> int:
        if isinstance(arg, tuple) and len(arg) == 2:
            return int(arg[0]) * 10 + int(arg[1])
        if isinstance(arg, int):
            return arg
        raise Unreadable(f"a device capability given as {arg!r}")

    def call(self, name: str, args: list[Any]) -> Any:
        if name in ("is_cuda", "is_cuda_alike") and not args:
            return True
        if name in ("is_rocm", "is_cpu", "is_tpu", "is_xpu", "is_out_of_tree") and not args:
            return False
        if name == "is_device_capability" and len(args) == 1:
            return self._cap(args[0]) == self.sm
        if name == "is_device_capability_family" and len(args) == 1:
            return self._cap(args[0]) // 10 == self.sm // 10
        if name == "has_device_capability" and len(args) == 1:
            return self.sm >= self._cap(args[0])
        raise Unreadable(f"`current_platform.{name}()`, a platform check vdiag cannot evaluate")


ENV_DEFAULTS: dict[str, Any] = {"VLLM_BATCH_INVARIANT": False, "VLLM_USE_V1": True}


class _Obj:
    """A stand-in object: attributes from a table; a missing one is unreadable (never a guess)."""

    def __init__(self, name: str, attrs: dict[str, Any], read: Callable[[str, Any], None] | None = None) -> None:
        self.name = name
        self.attrs = attrs
        self.read = read

    def get(self, attr: str) -> Any:
        if attr not in self.attrs:
            raise Unreadable(f"`{self.name}.{attr}`, a setting vdiag states nothing about")
        v = self.attrs[attr]
        if self.read is not None:
            self.read(f"{self.name}.{attr}", v)
        return v


class _Func:
    def __init__(self, fn: Callable[[list[Any]], Any]) -> None:
        self.fn = fn


class _GateEval:
    """Interprets a gate function's body: the statements and expressions such a gate uses, nothing else."""

    def __init__(self, env: dict[str, Any], platform: Platform) -> None:
        self.env = env
        self.platform = platform
        self.line = 0

    def run(self, body: list[ast.stmt]) -> Any:
        for st in body:
            self.line = st.lineno
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                continue  # docstring
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                for a in st.names:
                    name = a.asname or a.name.split(".")[0]
                    if name not in self.env:
                        raise Unreadable(f"an import of {a.name}, which vdiag has no stand-in for")
                continue
            if isinstance(st, ast.Return):
                return self.expr(st.value) if st.value is not None else None
            if isinstance(st, ast.If):
                out = self.run(st.body if self.truth(self.expr(st.test)) else st.orelse)
                if out is not _NO_RETURN:
                    return out
                continue
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                self.env[st.targets[0].id] = self.expr(st.value)
                continue
            if isinstance(st, ast.Pass):
                continue
            raise Unreadable(f"a `{type(st).__name__}` statement, which vdiag does not interpret")
        return _NO_RETURN

    @staticmethod
    def truth(v: Any) -> bool:
        if isinstance(v, (bool, int, float, str, tuple, type(None))):
            return bool(v)
        raise Unreadable("a condition on something other than a plain value")

    def expr(self, node: ast.expr) -> Any:
        self.line = getattr(node, "lineno", self.line)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(self.expr(e) for e in node.elts)
        if isinstance(node, ast.Name):
            if node.id not in self.env:
                raise Unreadable(f"the name `{node.id}`, which vdiag has no stand-in for")
            return self.env[node.id]
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            v: Any = is_and
            for e in node.values:
                v = self.expr(e)
                if self.truth(v) != is_and:
                    return v
            return v
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not self.truth(self.expr(node.operand))
        if isinstance(node, ast.Compare):
            left = self.expr(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self.expr(right_node)
                if not _compare(op, left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Attribute):
            base = self.expr(node.value)
            if isinstance(base, _Obj):
                return base.get(node.attr)
            raise Unreadable(f"the attribute `.{node.attr}` of a value vdiag does not model")
        if isinstance(node, ast.Call):
            if node.keywords:
                raise Unreadable("a call with keyword arguments")
            args = [self.expr(a) for a in node.args]
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "current_platform":
                return self.platform.call(f.attr, args)
            fn = self.expr(f)
            if isinstance(fn, _Func):
                return fn.fn(args)
            raise Unreadable(f"a call of `{ast.unparse(f)}`, which vdiag does not evaluate")
        raise Unreadable(f"a `{type(node).__name__}` expression, which vdiag does not interpret")


_NO_RETURN = object()


def _compare(op: ast.cmpop, a: Any, b: Any) -> bool:
    if not all(isinstance(x, (int, float, bool, str, type(None))) for x in (a, b)):
        raise Unreadable("a comparison of values vdiag does not model")
    if isinstance(op, ast.Eq):
        return bool(a == b)
    if isinstance(op, ast.NotEq):
        return bool(a != b)
    if isinstance(op, (ast.Is, ast.IsNot)):
        return (a is b) == isinstance(op, ast.Is)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(op, ast.Gt):
            return a > b
        if isinstance(op, ast.GtE):
            return a >= b
        if isinstance(op, ast.Lt):
            return a < b
        if isinstance(op, ast.LtE):
            return a <= b
    raise Unreadable(f"a `{type(op).__name__}` comparison of {a!r} and {b!r}")


def _py_files(root: Path, under: str) -> Iterator[Path]:
    base = root / under
    if base.is_file():
        yield base
        return
    if not base.is_dir():
        return
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in ("tests", "benchmarks", "examples") or part.startswith(".") for part in rel):
            continue
        yield p


def _parse(path: Path, root: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8", errors="replace"), filename=str(path))
    except SyntaxError as e:
        raise Unreadable(f"{path.relative_to(root)}:{e.lineno}: not valid Python ({e.msg})") from None


def _find_gate(root: Path) -> tuple[Path, ast.FunctionDef] | None:
    candidates = [root / "vllm" / "config" / "vllm.py", *(_py_files(root, "vllm/config")), root / "vllm" / "config.py"]
    seen: set[Path] = set()
    for p in candidates:
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        if GATE_FUNCTION not in p.read_text(encoding="utf-8", errors="replace"):
            continue
        for node in ast.walk(_parse(p, root)):
            if isinstance(node, ast.FunctionDef) and node.name == GATE_FUNCTION:
                return p, node
    return None


def read_fusion_gate(root: Path, tp: int, pp: int, platform: Platform) -> SourceRead:
    """The fused pass's gate of this checkout, evaluated for TP/PP on `platform`. Raises Unreadable."""
    found = _find_gate(root)
    if found is None:
        return _read_pass_flag(root, tp)
    path, fn = found
    rel = path.relative_to(root).as_posix()
    if not fn.args.args:
        raise Unreadable(f"{rel}:{fn.lineno}: {GATE_FUNCTION} takes no config argument")
    cfg_name = fn.args.args[0].arg
    used: dict[str, Any] = {}
    read = used.__setitem__
    parallel = _Obj("parallel_config", {
        "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "data_parallel_size": 1,
        "world_size": tp * pp, "enable_expert_parallel": False,
    }, read)
    env: dict[str, Any] = {
        cfg_name: _Obj(cfg_name, {"parallel_config": parallel}),
        "current_platform": _Obj("current_platform", {}),
        "has_flashinfer": _Func(lambda _a: True),
        "envs": _Obj("envs", ENV_DEFAULTS, read),
        "rocm_aiter_ops": _Obj("rocm_aiter_ops", {}),
    }
    ev = _GateEval(env, platform)
    try:
        out = ev.run(fn.body)
    except Unreadable as e:
        raise Unreadable(f"{rel}:{ev.line}: {GATE_FUNCTION} uses {e}") from None
    if not isinstance(out, bool):
        raise Unreadable(f"{rel}:{fn.lineno}: {GATE_FUNCTION} returned {out!r}, not True or False")
    end = getattr(fn, "end_lineno", fn.lineno)
    pp_lines = [n.lineno for n in ast.walk(fn) if isinstance(n, ast.Attribute) and n.attr == "pipeline_parallel_size"]
    facts = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in used.items())
    pp_text = (f"its PP condition is at line {pp_lines[0]}" if pp_lines else "it has no PP condition")
    return SourceRead(
        what="fusion gate", value="on" if out else "off", where=f"{rel}:{fn.lineno}",
        detail=f"{GATE_FUNCTION} (lines {fn.lineno}-{end}) evaluated for TP {tp}, PP {pp} on "
               f"{platform.describe()} gives {out} (read {facts or 'nothing'}); {pp_text}",
    )


def _read_pass_flag(root: Path, tp: int) -> SourceRead:
    for p in [*(_py_files(root, "vllm/config")), root / "vllm" / "config.py"]:
        if not p.is_file():
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if "PassConfig" not in text or not any(f in text for f in PASS_FLAGS):
            continue
        for node in ast.walk(_parse(p, root)):
            if not (isinstance(node, ast.ClassDef) and node.name == "PassConfig"):
                continue
            for st in node.body:
                if (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
                        and st.target.id in PASS_FLAGS):
                    rel = f"{p.relative_to(root).as_posix()}:{st.lineno}"
                    if not (isinstance(st.value, ast.Constant) and isinstance(st.value.value, bool)):
                        raise Unreadable(f"{rel}: PassConfig.{st.target.id} has a default vdiag cannot read "
                                         f"({ast.unparse(st.value) if st.value is not None else 'none'})")
                    on = bool(st.value.value) and tp > 1
                    return SourceRead(
                        what="fusion gate", value="on" if on else "off", where=rel,
                        detail=f"no {GATE_FUNCTION} in this version; the fused pass follows "
                               f"PassConfig.{st.target.id}, whose default is {st.value.value}"
                               + ("" if st.value.value else " (the pass runs only when a user turns it on)"),
                    )
    has_pass = next((p for p in _py_files(root, "vllm") if any(
        name in p.read_text(encoding="utf-8", errors="replace") for name in (*WORKSPACE_CALLS, FUSION_PASS))), None)
    if has_pass is None and (root / "vllm").is_dir():
        return SourceRead(
            what="fusion gate", value="off", where="vllm/",
            detail=f"no {GATE_FUNCTION}, no PassConfig flag ({', '.join(PASS_FLAGS)}), no {FUSION_PASS} and no "
                   f"FlashInfer workspace call under vllm/: this version has no fused all-reduce + RMSNorm pass")
    raise Unreadable(f"neither {GATE_FUNCTION} (vllm/config/) nor a PassConfig flag ({', '.join(PASS_FLAGS)}) "
                     "was found" + (f", though {has_pass.relative_to(root).as_posix()} has a fused pass"
                                    if has_pass is not None else " (no vllm/ folder)")
                     + ": the version's fusion gate cannot be read")


# ---- the workspace call ---------------------------------------------------------------------------------

GroupArg = Literal["group", "world", "none"]


def _group_of(node: ast.expr, fn: ast.AST | None) -> tuple[GroupArg, str]:
    """What a `group=`/`comm_backend=` argument amounts to: a group, WORLD, or none."""
    if isinstance(node, ast.Constant) and node.value is None:
        return "none", "None"
    if isinstance(node, ast.Attribute) and node.attr == "WORLD":
        return "world", ast.unparse(node)
    if isinstance(node, ast.Call):
        args = [*node.args, *(k.value for k in node.keywords if k.arg in ("group", "device_group", "cpu_group"))]
        if any(k.arg is None for k in node.keywords):
            raise Unreadable(f"`{ast.unparse(node)}` passes **kwargs")
        if not args:
            return "none", ast.unparse(node)
        kinds = [_group_of(a, fn)[0] for a in args]
        kind: GroupArg = "world" if "world" in kinds else ("group" if "group" in kinds else "none")
        return kind, ast.unparse(node)
    if isinstance(node, ast.Name):
        if fn is not None:
            for st in ast.walk(fn):
                if (isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)
                        and st.targets[0].id == node.id):
                    kind, _ = _group_of(st.value, None)
                    return kind, f"{node.id} = {ast.unparse(st.value)}"
        return "group", node.id  # a parameter or attribute holding the caller's group
    if isinstance(node, ast.Attribute):
        return "group", ast.unparse(node)
    raise Unreadable(f"`{ast.unparse(node)}` as the group")


@dataclass(frozen=True)
class _CallSite:
    where: str
    kind: GroupArg
    how: str


def _call_sites(root: Path) -> list[_CallSite]:
    out: list[_CallSite] = []
    for p in _py_files(root, "vllm"):
        text = p.read_text(encoding="utf-8", errors="replace")
        if not any(c in text for c in WORKSPACE_CALLS):
            continue
        tree = _parse(p, root)
        parents: dict[ast.AST, ast.AST] = {}
        for n in ast.walk(tree):
            for ch in ast.iter_child_nodes(n):
                parents[ch] = n
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call):
                continue
            name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            if name not in WORKSPACE_CALLS:
                continue
            fn: ast.AST | None = n
            while fn is not None and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn = parents.get(fn)
            where = f"{p.relative_to(root).as_posix()}:{n.lineno}"
            if any(k.arg is None for k in n.keywords):
                raise Unreadable(f"{where}: {name}(**...) passes its arguments through a dict")
            kinds: list[tuple[GroupArg, str]] = []
            for k in n.keywords:
                if k.arg in ("group", "comm_backend"):
                    try:
                        kinds.append(_group_of(k.value, fn))
                    except Unreadable as e:
                        raise Unreadable(f"{where}: {name} gets {e}") from None
            if not kinds:
                out.append(_CallSite(where, "none", f"{name}(...) without group= or comm_backend="))
                continue
            kind: GroupArg = ("world" if any(k == "world" for k, _ in kinds)
                              else "group" if any(k == "group" for k, _ in kinds) else "none")
            out.append(_CallSite(where, kind, f"{name}(..., " + ", ".join(h for _, h in kinds) + ")"))
    return out


def read_workspace_call(root: Path) -> SourceRead:
    """Whether vLLM passes a group to FlashInfer's workspace creation. Raises Unreadable."""
    sites = _call_sites(root)
    if not sites:
        raise Unreadable(f"no call of {' or '.join(WORKSPACE_CALLS)} under vllm/: the workspace creation "
                         "cannot be read")
    pass_sites = [s for s in sites if s.where.startswith("vllm/compilation/")] or sites
    kinds = {s.kind for s in pass_sites}
    if len(kinds) > 1:
        raise Unreadable("the workspace call sites disagree: "
                         + "; ".join(f"{s.where} ({s.kind})" for s in pass_sites))
    kind = kinds.pop()
    value = {"group": "passes its group", "world": "passes WORLD", "none": "passes no group"}[kind]
    first = pass_sites[0]
    others = f" (+{len(pass_sites) - 1} more call sites alike)" if len(pass_sites) > 1 else ""
    return SourceRead(what="workspace group argument", value=value, where=first.where, detail=first.how + others)


# ---- the FlashInfer pin -----------------------------------------------------------------------------------


def _pin_files(root: Path) -> list[Path]:
    files = [root / f for f in PIN_FILES_FIRST]
    files += sorted((root / "requirements").glob("*.txt")) if (root / "requirements").is_dir() else []
    files += [*sorted(root.glob("requirements*.txt")), root / "setup.py", root / "pyproject.toml"]
    out: list[Path] = []
    for f in files:
        if f.is_file() and f not in out:
            out.append(f)
    return out


def read_flashinfer_pin(root: Path) -> tuple[SourceRead, Version]:
    """The FlashInfer version the checkout pins. Raises Unreadable."""
    loose: str = ""
    for f in _pin_files(root):
        rel = f.relative_to(root).as_posix()
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            text = line.split("#", 1)[0]
            m = _PIN.search(text)
            if not m:
                continue
            if m.group(1) != "==":
                loose = loose or f"{rel}:{i} `{text.strip()}`"
                continue
            raw = m.group(2).rstrip("\"',")
            try:
                v = Version(raw)
            except InvalidVersion:
                raise Unreadable(f"{rel}:{i}: `{text.strip()}` is not a version vdiag can read") from None
            return SourceRead(what="FlashInfer pin", value=str(v), where=f"{rel}:{i}", detail=text.strip()), v
    if loose:
        raise Unreadable(f"FlashInfer is not pinned to one version ({loose}): which FlashInfer runs is not "
                         "decided by the checkout")
    raise Unreadable("no FlashInfer requirement in requirements/*.txt, requirements*.txt, setup.py or "
                     "pyproject.toml: the FlashInfer version cannot be read")


def flashinfer_world_default(v: Version) -> bool:
    lo, hi = FLASHINFER_WORLD_DEFAULT
    return lo <= v < hi


# ---- all together ---------------------------------------------------------------------------------------


def derive(root: Path, tp: int, pp: int, platform: Platform | None = None) -> SourceSettings:
    """The replay's settings for the checkout at `root`, or the reason it cannot be judged."""
    platform = platform or Platform()
    out = SourceSettings()
    try:
        gate = read_fusion_gate(root, tp, pp, platform)
    except Unreadable as e:
        out.skip = f"fusion gate: {e}"
        return out
    out.reads.append(gate)
    fused = gate.value == "on"
    out.overrides["fusion.allreduce_rms"] = "on" if fused else "off"
    try:
        call = read_workspace_call(root)
        out.reads.append(call)
    except Unreadable as e:
        if fused:
            out.skip = f"workspace group: {e}"
            return out
        out.notes.append(f"workspace group not needed (fusion off): {e}")
        call = None
    pin: tuple[SourceRead, Version] | None = None
    try:
        pin = read_flashinfer_pin(root)
        out.reads.append(pin[0])
    except Unreadable as e:
        if fused and call is not None and call.value == "passes no group":
            out.skip = f"FlashInfer pin: {e}"
            return out
        out.notes.append(f"FlashInfer pin not needed: {e}")
    group: str | None = None
    why = ""
    if call is not None and call.value == "passes WORLD":
        group, why = "world", "vLLM passes WORLD itself"
    elif call is not None and call.value == "passes its group":
        group, why = "tp", "vLLM passes its TP group"
        if pin is not None and pin[1] < FLASHINFER_BCAST_FIXED and flashinfer_world_default(pin[1]) and pp > 1:
            out.notes.append(f"FlashInfer {pin[1]} predates the bcast fix ({FLASHINFER_BCAST_FIXED}): workspace "
                             "creation over a TP group without global rank 0 fails on real GPUs; not replayed")
    elif call is not None and pin is not None:
        inside = flashinfer_world_default(pin[1])
        group = "world" if inside else "tp"
        why = (f"vLLM passes no group and FlashInfer {pin[1]} is {'inside' if inside else 'outside'} "
               f"{WINDOW_TEXT}, the versions whose workspace creation without a group rendezvouses over WORLD")
    if group is not None:
        out.reads.append(SourceRead(what="workspace group", value=group, where="computed", detail=why))
        out.overrides["fusion.workspace_group"] = group
    else:  # only reachable with the fused pass off: the replay creates no workspace
        out.notes.append("workspace group not derived (the fused pass is off, so no workspace is created)")
    out.overrides["hook"] = None
    return out


def override_args(settings: SourceSettings) -> list[str]:
    """The settings as `--set` overrides for `vdiag run`."""
    import json

    return [f"{k}={json.dumps(v)}" for k, v in settings.overrides.items()]
