"""Real vLLM on one GPU (`engine: vllm`, TP=1): skipped without a GPU or without vLLM. On the lent machine
gpu/vllm-validate.sh runs the same scenarios (and the fault probes) and collects their reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import run_vdiag

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (gpu/prepare-vllm.sh)"),
]


def test_real_vllm_tp1_starts_clean_with_progress_from_its_capture_loop(tmp_path: Path) -> None:
    r = run_vdiag(["run", "scenarios/vllm-tp1-clean.yaml", "--quiet", "--gpu-state", "none"], tmp_path, timeout=600)
    assert r.rc == 0, r.stderr[-3000:]
    rep = r.report
    assert rep["engine"] == "vllm" and rep["watchdog"]["cls"] == "clean"
    assert rep["env"]["versions"].get("vllm")
    from repro.events import read_rank_log

    phases = [e.model_dump() for e in read_rank_log(r.run_dir / "launch" / "rank0.jsonl", 0).phases]
    capture = [e for e in phases if e["phase"] == "capture" and e.get("total")]
    assert capture and {e.get("size") for e in capture} >= {1, 2, 4, 8}
    assert any("left to vLLM's own defaults: max_num_batched_tokens" in n for n in rep["notes"])


def test_real_vllm_oversized_batch_crash_names_the_computed_cause(tmp_path: Path) -> None:
    r = run_vdiag(["run", "scenarios/vllm-tp1-batch-overflow.yaml", "--quiet", "--gpu-state", "none"], tmp_path,
                  timeout=600)
    assert r.rc == 4, r.stderr[-3000:]
    assert any(n.startswith("computed: max_num_batched_tokens 8192 > max_num_seqs 8 x max_model_len 512")
               for n in r.report["notes"])
