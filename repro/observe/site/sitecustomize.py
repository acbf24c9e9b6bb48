"""Loaded by every Python process of a job under `vdiag watch` (this folder is put first on PYTHONPATH).

It only registers an import hook (`repro.observe.instrument_hook`); nothing of vdiag is imported until the
process imports FlashInfer's comm module or vLLM's model runner. A sitecustomize that this one shadows is
still run.
"""

from __future__ import annotations

import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    mine = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        import importlib

        try:
            importlib.import_module("sitecustomize")
        except ImportError:
            pass
    finally:
        sys.path[:] = saved
        if mine is not None:
            sys.modules["sitecustomize"] = mine


if os.environ.get("VDIAG_WATCH_DIR"):
    try:
        from repro.observe import instrument_hook

        instrument_hook.register()
    except Exception as e:  # never break the user's program
        sys.stderr.write(f"vdiag: instrumentation not loaded: {type(e).__name__}: {e}\n")
_chain()
