"""A synthetic git repository whose files are shaped like vLLM's (written for vdiag's tests, not copied).

The files hold what `hook: vllm-source` reads: the fusion gate in vllm/config/vllm.py, the FlashInfer
workspace call in vllm/compilation/collective_fusion.py and the FlashInfer pin in requirements/cuda.txt.
`make_history` commits a timeline in which the PP gate is added, removed and restored, the TP group is
passed to the workspace, and the pin moves into and out of FlashInfer's WORLD-rendezvous window.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GATE_HEAD = '''\
"""Configuration of the whole engine (a test fixture shaped like vLLM's)."""

from vllm import envs


def enable_norm_fusion(cfg: "VllmConfig") -> bool:
    return cfg.compilation_config.is_custom_op_enabled("rms_norm")


def enable_allreduce_rms_fusion(cfg: "VllmConfig") -> bool:
    """Fuse the TP all-reduce with the RMSNorm after it (FlashInfer, Hopper/Blackwell)."""
    from vllm.platforms import current_platform
    from vllm.utils.flashinfer import has_flashinfer

    if envs.VLLM_BATCH_INVARIANT:
        return False

    if current_platform.is_rocm():
        return False

    return (
        cfg.parallel_config.tensor_parallel_size > 1
        and current_platform.is_cuda()
        and has_flashinfer()
        and (
            current_platform.is_device_capability_family(100)
            or current_platform.is_device_capability(90)
        )
'''

GATE_PP = '''\
        # the fused kernel's TP peers hang when PP stages warm up concurrently
        and cfg.parallel_config.pipeline_parallel_size == 1
'''

GATE_TAIL = '''\
    )


OPTIMIZATION_LEVEL_02 = {
    "compilation_config": {
        "pass_config": {
            "fuse_norm_quant": enable_norm_fusion,
            "fuse_allreduce_rms": enable_allreduce_rms_fusion,
        },
    },
}
'''

# a version whose gate asks something vdiag states nothing about (the model's quantization)
GATE_UNREADABLE = GATE_HEAD.replace(
    "        cfg.parallel_config.tensor_parallel_size > 1\n",
    "        cfg.parallel_config.tensor_parallel_size > 1\n        and not cfg.model_config.is_quantized()\n",
) + GATE_TAIL

PASS_HEAD = '''\
"""The fused all-reduce + RMSNorm pass (a test fixture shaped like vLLM's)."""

import flashinfer.comm as flashinfer_comm
from flashinfer.comm.mnnvl import TorchDistBackend

from vllm.distributed import get_tp_group


class AllReduceFusionPass:
    def __init__(self, config, rank):
        self.tp_size = config.parallel_config.tensor_parallel_size
        self.max_token_num = 2048
        self.hidden_dim = config.model_config.get_hidden_size()
'''

PASS_NO_GROUP = PASS_HEAD + '''\
        self.workspace = flashinfer_comm.create_allreduce_fusion_workspace(
            backend="trtllm",
            world_size=self.tp_size,
            rank=rank,
            max_token_num=self.max_token_num,
            hidden_dim=self.hidden_dim,
            dtype=config.model_config.dtype,
        )
'''

PASS_TP_GROUP = PASS_HEAD + '''\
        comm_backend = TorchDistBackend(group=get_tp_group().cpu_group)
        self.workspace = flashinfer_comm.create_allreduce_fusion_workspace(
            backend="trtllm",
            world_size=self.tp_size,
            rank=rank,
            max_token_num=self.max_token_num,
            hidden_dim=self.hidden_dim,
            dtype=config.model_config.dtype,
            comm_backend=comm_backend,
        )
'''

REQUIREMENTS = '''\
# Dependencies for NVIDIA GPUs
-r common.txt
torch==2.11.0
flashinfer-python=={fi}  # the fused all-reduce kernels
'''


def gate(pp_condition: bool) -> str:
    return GATE_HEAD + (GATE_PP if pp_condition else "") + GATE_TAIL


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="Toy Dev", GIT_AUTHOR_EMAIL="dev@toy.invalid",
               GIT_COMMITTER_NAME="Toy Dev", GIT_COMMITTER_EMAIL="dev@toy.invalid", LC_ALL="C")
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


def write_checkout(root: Path, *, pp_gate: bool | None = True, tp_group: bool = False, fi: str = "0.6.8.post1",
                   gate_text: str | None = None) -> None:
    """Write one version's files (pp_gate None: no gate function at all, the old PassConfig flag)."""
    (root / "vllm" / "config").mkdir(parents=True, exist_ok=True)
    (root / "vllm" / "compilation").mkdir(parents=True, exist_ok=True)
    (root / "requirements").mkdir(parents=True, exist_ok=True)
    if pp_gate is None:
        (root / "vllm" / "config" / "vllm.py").write_text('"""Engine configuration."""\n')
        (root / "vllm" / "config" / "compilation.py").write_text(
            "class PassConfig:\n    enable_fusion: bool = True\n    enable_fi_allreduce_fusion: bool = False\n"
            '    """Whether to enable flashinfer allreduce fusion."""\n')
    else:
        (root / "vllm" / "config" / "vllm.py").write_text(gate_text or gate(pp_gate))
    (root / "vllm" / "compilation" / "collective_fusion.py").write_text(PASS_TP_GROUP if tp_group else PASS_NO_GROUP)
    (root / "requirements" / "cuda.txt").write_text(REQUIREMENTS.format(fi=fi))
    (root / "requirements" / "common.txt").write_text("numpy\nregex\n")


# The timeline: (subject, settings). What the replay gets at PP=2, TP=2 on SM 9.0 is in the comment.
HISTORY: list[tuple[str, dict[str, object]]] = [
    ("Initial import", dict(pp_gate=False, fi="0.6.8.post1")),  # on, FlashInfer outside the window: tp
    ("Docs: explain the fusion pass", dict(pp_gate=False, fi="0.6.8.post1", doc="fusion")),
    ("Bump flashinfer-python to 0.6.11.post2", dict(pp_gate=False, fi="0.6.11.post2")),  # on, world: HANG
    ("Docs: mention the new kernels", dict(pp_gate=False, fi="0.6.11.post2", doc="kernels")),  # hang
    ("Disable all-reduce fusion when PP > 1", dict(pp_gate=True, fi="0.6.11.post2")),  # off: clean
    ("Gate the fusion on the model's quantization", dict(gate_text=GATE_UNREADABLE, fi="0.6.11.post2")),  # skip
    ("Drop the quantization condition", dict(pp_gate=True, fi="0.6.11.post2", doc="quant")),  # off: clean
    ("Re-enable all-reduce fusion for DP/PP", dict(pp_gate=False, fi="0.6.11.post2")),  # on, world: HANG
    ("Tests: more capture sizes", dict(pp_gate=False, fi="0.6.11.post2", doc="tests")),  # hang
    ("Disable all-reduce fusion when PP > 1 (again)", dict(pp_gate=True, fi="0.6.11.post2")),  # off: clean
    ("Pass TP group to FlashInfer all-reduce fusion", dict(pp_gate=True, tp_group=True, fi="0.6.11.post2")),
    ("Bump flashinfer-python to 0.6.16", dict(pp_gate=True, tp_group=True, fi="0.6.16")),  # off: clean
]


def make_history(repo: Path) -> list[str]:
    """Commit HISTORY into a new repository at `repo`; returns the commits, oldest first."""
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    shas: list[str] = []
    for subject, settings in HISTORY:
        kw = dict(settings)
        doc = kw.pop("doc", None)
        write_checkout(repo, **kw)  # type: ignore[arg-type]
        if doc is not None:
            (repo / "docs").mkdir(exist_ok=True)
            (repo / "docs" / f"{doc}.md").write_text(f"# {subject}\n")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", subject)
        shas.append(_git(repo, "rev-parse", "HEAD"))
    return shas
