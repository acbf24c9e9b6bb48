"""The real GPU path end to end (`make gpu-validate` runs the full set; see docs/gpu-validation.md).

Several ranks may share the one GPU: host groups then run over gloo and FlashInfer's workspace over
symmetric device memory. Sizes are cut down (gpu/validate.py's LIMITS) so each run takes under a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_vdiag

LIMITS = ["model.num_layers=2", "fusion.max_token_num=512", "capture.max_num_batched_tokens=1024"]
pytestmark = pytest.mark.gpu


def _sets(*extra: str) -> list[str]:
    out: list[str] = []
    for s in [*LIMITS, *extra]:
        out += ["--set", s]
    return out


@pytest.mark.flashinfer
def test_flashinfer_token_divergence_hangs_with_the_gpu_state_from_a_core_dump(tmp_path: Path) -> None:
    r = run_vdiag(["run", "scenarios/mech-token-divergence.yaml", "--quiet", *_sets("backend=flashinfer",
                   "capture.sizes=[32,16,8]")], tmp_path, timeout=400)
    assert r.rc == 1, r.stderr[-2000:]
    rep = r.report
    assert rep["watchdog"]["cls"] in ("all-spinning", "spin-deadlock")
    assert rep["analysis"]["verdict"]["top_hypothesis"] == "launch-divergence"
    assert "SHARED" in rep["placement"] or "one rank per GPU" in rep["placement"]
    dumps = [g for g in rep["gpu"] if g["source"] == "cuda core dump"]
    assert dumps, rep["collectors"]
    assert all("allreduce_fusion_kernel_oneshot_lamport" in g["kernels"][0]["name"] for g in dumps)
    assert all(c.endswith("agree") for c in rep["analysis"]["grid_checks"]), rep["analysis"]["grid_checks"]


@pytest.mark.flashinfer
def test_flashinfer_clean_startup_is_right_with_cuda_graphs_and_cupti(tmp_path: Path) -> None:
    r = run_vdiag(["run", "scenarios/mech-token-divergence.yaml", "--quiet", *_sets(
        "backend=flashinfer", "capture.sizes=[32,16,8]", "faults=[]")], tmp_path, env={"VDIAG_CUPTI": "1"},
        timeout=400)
    assert r.rc == 0, r.stderr[-2000:]
    rep = r.report
    assert rep["analysis"]["verdict"]["cls"] in ("clean", "slow")
    launches = (r.run_dir / "launch" / "rank0.jsonl").read_text()
    assert '"graph":true' in launches and '"fn":"flashinfer.comm.trtllm_allreduce_fusion"' in launches
    cupti = [c for c in rep["analysis"]["grid_checks"] if "CUPTI" in c]
    assert cupti and all(c.endswith(": agree") for c in cupti), cupti


def test_nccl_reference_on_cuda_tensors_is_clean(tmp_path: Path) -> None:
    r = run_vdiag(["run", "scenarios/llama70b-pp2-tp2-fusion-auto.yaml", "--quiet", *_sets(
        "backend=nccl", "capture.sizes=[16,8]")], tmp_path, timeout=400)
    assert r.rc == 0, r.stderr[-2000:]
    rep = r.report
    assert all(x["device"].startswith("cuda") for x in rep["ranks"])
    assert rep["analysis"]["verdict"]["cls"] in ("clean", "slow")
