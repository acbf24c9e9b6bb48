"""Who a process is: rank and role from what the process itself shows, never guessed.

Sources, in order of trust:

- the environment (/proc/PID/environ): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (torchrun sets them for its
  workers), ``CUDA_VISIBLE_DEVICES``;
- vLLM's process titles: vLLM names its processes ``<prefix>::<Name>`` (prefix ``VLLM`` unless
  ``VLLM_PROCESS_NAME_PREFIX`` says otherwise), workers ``Worker`` followed by ``_DP<i>``, ``_PP<i>``,
  ``_PCP<i>``, ``_TP<i>``, ``_DCP<i>``, ``_EP<i>`` for each parallel group larger than one, the engine
  ``EngineCore`` (``EngineCore_DP<i>`` with data parallelism), the front end ``APIServer``. A title is read
  from the command line (setproctitle rewrites argv) and then from the kernel's ``comm``
  (PR_SET_NAME, 15 characters).
- NVML's per-device process lists (which GPU a pid holds memory on), where there is a GPU.

A worker's global rank from titles alone is inferred with vLLM's layout (rank = pp x tp_size + tp, where
tp_size is the number of TP ranks seen in the titles); the identity's ``sources`` says so.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from repro.records import ProcessIdentity, ProcessRole

TITLE_RE = re.compile(r"^(?P<prefix>[A-Za-z][\w.-]*)::(?P<name>[A-Za-z]+)(?P<tags>(?:_[A-Z]+\d+)*)")
_TAG_RE = re.compile(r"_(?P<key>[A-Z]+)(?P<val>\d+)")
_ROLES: dict[str, ProcessRole] = {"Worker": "worker", "EngineCore": "engine-core", "APIServer": "api-server"}


def _int(env: Mapping[str, str], key: str) -> int | None:
    with contextlib.suppress(KeyError, ValueError):
        return int(env[key])
    return None


def parse_title(text: str) -> tuple[str, ProcessRole, dict[str, int]] | None:
    """(title, role, {"TP": 0, "PP": 1, ...}) for a vLLM-style process title, else None."""
    m = TITLE_RE.match(text.strip())
    if not m or m["name"] not in _ROLES:
        return None
    tags = {t["key"]: int(t["val"]) for t in _TAG_RE.finditer(m["tags"])}
    return m.group(0), _ROLES[m["name"]], tags


# Python processes that serve a job but do none of its work: multiprocessing's resource tracker and fork
# server, torch.compile's (inductor's) compile-worker pool. They idle in their own loops for the whole job.
HELPER_RE = re.compile(r"multiprocessing\.(resource_tracker|forkserver)|torch\._inductor\.compile_worker"
                       r"|_inductor/compile_worker")


def helper_kind(cmdline: Sequence[str]) -> str:
    """What helper a command line shows ("" when it is none)."""
    m = HELPER_RE.search(" ".join(cmdline[:6]))
    if m is None:
        return ""
    return "torch.compile's compile worker" if "compile_worker" in m.group(0) else f"multiprocessing's {m.group(1).replace('_', ' ')}"


def is_torchrun_agent(cmdline: Sequence[str]) -> bool:
    joined = " ".join(cmdline[:4])
    return "torchrun" in joined or "torch.distributed.run" in joined or "torch.distributed.launch" in joined


def identify(
    pid: int, env: Mapping[str, str] | None, cmdline: Sequence[str], comm: str, nvml_gpus: Sequence[int] = ()
) -> ProcessIdentity:
    """The identity one process shows by itself (the rank from titles is filled in by `infer_title_ranks`)."""
    fields: dict[str, Any] = {"sources": {}}
    src: dict[str, str] = fields["sources"]
    role: ProcessRole = "process"
    if env is not None:
        for key, name in (("RANK", "rank"), ("LOCAL_RANK", "local_rank"), ("WORLD_SIZE", "world_size")):
            v = _int(env, key)
            if v is not None:
                fields[name] = v
                src[name] = f"{key} in /proc/{pid}/environ"
        if "CUDA_VISIBLE_DEVICES" in env:
            fields["cuda_visible_devices"] = env["CUDA_VISIBLE_DEVICES"]
            src["cuda_visible_devices"] = f"/proc/{pid}/environ"
        if fields.get("rank") is not None:
            role = "worker"
    parsed = parse_title(cmdline[0] if cmdline else "") or parse_title(comm)
    if parsed is not None:
        title, trole, tags = parsed
        fields["title"] = title
        role = trole
        from_argv = bool(cmdline) and parse_title(cmdline[0]) is not None
        src["title"] = f"process title (/proc/{pid}/cmdline)" if from_argv else f"process name (/proc/{pid}/comm)"
        for key, name in (("TP", "tp_rank"), ("PP", "pp_rank"), ("DP", "dp_rank")):
            if key in tags:
                fields[name] = tags[key]
                src[name] = "process title"
        # A missing tag means a group of one only in the full title; the kernel's 15-character name may
        # have cut the tags off, so there a missing tag stays unknown.
        if trole == "worker" and from_argv and "TP" not in tags:
            fields["tp_rank"] = 0  # vLLM leaves out the tag of a group of one
            src["tp_rank"] = "process title (no _TP tag: TP size 1)"
        if trole == "worker" and from_argv and "PP" not in tags:
            fields["pp_rank"] = 0
            src["pp_rank"] = "process title (no _PP tag: PP size 1)"
    elif role == "process" and is_torchrun_agent(cmdline):
        role = "torchrun-agent"
    elif role == "process" and helper_kind(cmdline):
        role = "helper"
        src["role"] = f"command line: {helper_kind(cmdline)}"
    if nvml_gpus:
        fields["nvml_gpus"] = sorted(nvml_gpus)
        src["nvml_gpus"] = "NVML's per-device process list"
    fields["role"] = role
    return ProcessIdentity.model_validate(fields)


def infer_title_ranks(ids: dict[int, ProcessIdentity]) -> dict[int, ProcessIdentity]:
    """Global ranks of vLLM workers known only by their titles: rank = pp x tp_size + tp (vLLM's layout),
    tp_size counted from the titles seen. Workers whose environment gave a rank keep it."""
    workers = {p: i for p, i in ids.items() if i.role == "worker" and i.rank is None and i.tp_rank is not None}
    if not workers:
        return ids
    tp_size = max(i.tp_rank or 0 for i in workers.values()) + 1
    out = dict(ids)
    for pid, i in workers.items():
        rank = (i.pp_rank or 0) * tp_size + (i.tp_rank or 0)
        src = {**i.sources, "rank": f"inferred from the process title (pp x {tp_size} + tp, vLLM's layout)"}
        out[pid] = i.model_copy(update={"rank": rank, "sources": src})
    return out


def nvml_process_gpus() -> dict[int, list[int]]:
    """{pid: [device index, ...]} from NVML's compute and graphics process lists; empty without NVML."""
    out: dict[int, list[int]] = {}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return out
    try:
        for idx in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            procs: list[Any] = []
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                with contextlib.suppress(Exception):
                    procs.extend(getattr(pynvml, getter)(h))
            for p in procs:
                out.setdefault(int(p.pid), [])
                if idx not in out[int(p.pid)]:
                    out[int(p.pid)].append(idx)
    except Exception:
        pass
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out
