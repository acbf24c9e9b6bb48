"""The import hook that `vdiag watch`'s sitecustomize registers in each Python process of the job.

When the process imports FlashInfer's comm package or vLLM's GPU model runner / worker, the hook points
`repro.engines.vllm.instrument` at the run folder (``VDIAG_WATCH_DIR``) and installs its wrappers, so the fused calls
real vLLM makes land in ``launch/rank<R>.jsonl`` with their computed launch configurations. The rank is
read from torch.distributed when the first record is written (vLLM's workers do not all carry ``RANK``).
Nothing is imported before that: a process that never imports FlashInfer or vLLM pays only for this
module and the finder's look-ups.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

TRIGGERS = {
    "flashinfer.comm": "flashinfer",
    "vllm.v1.worker.gpu_model_runner": "vllm",
    "vllm.v1.worker.gpu_worker": "vllm",
    "vllm.v1.worker.gpu.model_runner": "vllm",
}
_lock = threading.RLock()
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    from repro.engines.vllm import instrument

    run_dir = Path(os.environ["VDIAG_WATCH_DIR"])
    (run_dir / "launch").mkdir(parents=True, exist_ok=True)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        world, rank = 1, 0
    rec = instrument.configure(None, rank, max(world, 1), 1, run_dir=run_dir)
    rec.pid = -1  # the writer is opened at the first record, with the rank torch.distributed gives then


def _installed(kind: str) -> None:
    with _lock, contextlib.suppress(Exception):
        _configure()
        from repro.engines.vllm import instrument

        if kind == "flashinfer":
            instrument.install_flashinfer(import_modules=())
            jit = getattr(instrument, "install_flashinfer_jit", None)  # FlashInfer's JIT builds, where vdiag has it
            if jit is not None:
                jit()
        else:
            instrument.install_vllm_progress()
            if any(m.startswith("flashinfer.comm") for m in sys.modules):
                instrument.install_flashinfer(import_modules=())


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, kind: str) -> None:
        self.inner = inner
        self.kind = kind

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _installed(self.kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        kind = TRIGGERS.get(fullname)
        if kind is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, kind)
                return spec
        return None


def register() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
