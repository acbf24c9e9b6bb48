"""`hook: vllm-source`: the readers against checkouts shaped like vLLM's (tests/vllm_shaped.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from repro.bisect.vllm_source import (
    Platform,
    derive,
    read_flashinfer_pin,
    read_fusion_gate,
    read_workspace_call,
)
from tests.vllm_shaped import GATE_UNREADABLE, HISTORY, write_checkout


def _checkout(tmp_path: Path, **kw: object) -> Path:
    root = tmp_path / "co"
    write_checkout(root, **kw)  # type: ignore[arg-type]
    return root


def test_gate_with_pp_condition_is_off_for_pp2_and_names_file_and_line(tmp_path: Path) -> None:
    root = _checkout(tmp_path, pp_gate=True)
    r = read_fusion_gate(root, tp=2, pp=2, platform=Platform(90))
    assert r.value == "off"
    lines = (root / "vllm/config/vllm.py").read_text().splitlines()
    def_line = next(i for i, ln in enumerate(lines, 1) if ln.startswith("def enable_allreduce_rms_fusion"))
    pp_line = next(i for i, ln in enumerate(lines, 1) if "pipeline_parallel_size == 1" in ln)
    assert r.where == f"vllm/config/vllm.py:{def_line}"
    assert f"its PP condition is at line {pp_line}" in r.detail
    assert "gives False" in r.detail and "pipeline_parallel_size=2" in r.detail
    assert read_fusion_gate(root, tp=2, pp=1, platform=Platform(90)).value == "on"


def test_gate_without_pp_condition_follows_tp_and_the_stated_sm(tmp_path: Path) -> None:
    root = _checkout(tmp_path, pp_gate=False)
    assert read_fusion_gate(root, tp=2, pp=2, platform=Platform(90)).value == "on"
    assert read_fusion_gate(root, tp=2, pp=2, platform=Platform(103)).value == "on"  # SM 10.x family
    assert read_fusion_gate(root, tp=2, pp=2, platform=Platform(80)).value == "off"  # Ampere: no fused pass
    assert read_fusion_gate(root, tp=1, pp=2, platform=Platform(90)).value == "off"
    assert "it has no PP condition" in read_fusion_gate(root, 2, 2, Platform()).detail


def test_version_without_gate_function_reads_the_pass_flag_default(tmp_path: Path) -> None:
    root = _checkout(tmp_path, pp_gate=None)
    r = read_fusion_gate(root, tp=2, pp=2, platform=Platform())
    assert r.value == "off" and r.where == "vllm/config/compilation.py:3"
    assert "PassConfig.enable_fi_allreduce_fusion, whose default is False" in r.detail


def test_gate_that_asks_what_vdiag_does_not_state_skips_with_the_line(tmp_path: Path) -> None:
    root = _checkout(tmp_path, gate_text=GATE_UNREADABLE)
    s = derive(root, tp=2, pp=2)
    line = next(i for i, ln in enumerate(GATE_UNREADABLE.splitlines(), 1) if "is_quantized" in ln)
    assert s.skip.startswith(f"fusion gate: vllm/config/vllm.py:{line}: enable_allreduce_rms_fusion uses ")
    assert s.skip.endswith("uses `cfg.model_config`, a setting vdiag states nothing about") and not s.overrides


def test_workspace_call_site_with_and_without_the_tp_group(tmp_path: Path) -> None:
    r = read_workspace_call(_checkout(tmp_path / "a", tp_group=False))
    assert r.value == "passes no group" and r.where.startswith("vllm/compilation/collective_fusion.py:")
    r = read_workspace_call(_checkout(tmp_path / "b", tp_group=True))
    assert r.value == "passes its group"
    assert "comm_backend = TorchDistBackend(group=get_tp_group().cpu_group)" in r.detail


def test_flashinfer_pin_is_read_from_requirements_with_its_line(tmp_path: Path) -> None:
    read, v = read_flashinfer_pin(_checkout(tmp_path, fi="0.6.11.post2"))
    assert str(v) == "0.6.11.post2" and read.where == "requirements/cuda.txt:4"


def test_loose_or_missing_pin_skips_only_when_the_group_depends_on_it(tmp_path: Path) -> None:
    root = _checkout(tmp_path, pp_gate=False)
    (root / "requirements" / "cuda.txt").write_text("flashinfer-python>=0.6.8\n")
    s = derive(root, tp=2, pp=2)
    assert s.skip.startswith("FlashInfer pin: FlashInfer is not pinned to one version (requirements/cuda.txt:1")
    (root / "requirements" / "cuda.txt").unlink()
    assert derive(root, tp=2, pp=2).skip.startswith("FlashInfer pin: no FlashInfer requirement")
    # with the PP gate the fused pass is off at PP=2: the pin is not needed, so no skip
    write_checkout(root, pp_gate=True)
    (root / "requirements" / "cuda.txt").unlink()
    s = derive(root, tp=2, pp=2)
    assert not s.skip and s.overrides["fusion.allreduce_rms"] == "off"
    assert any(n.startswith("FlashInfer pin not needed") for n in s.notes)


@pytest.mark.parametrize("index,expect", [
    (0, ("on", "tp")), (2, ("on", "world")), (4, ("off", "world")), (7, ("on", "world")),
    (9, ("off", "world")), (10, ("off", "tp")), (11, ("off", "tp")),
])
def test_each_commit_of_the_planted_history_gets_the_settings_of_its_code(
        tmp_path: Path, index: int, expect: tuple[str, str]) -> None:
    kw = {k: v for k, v in HISTORY[index][1].items() if k != "doc"}
    s = derive(_checkout(tmp_path, **kw), tp=2, pp=2)
    assert not s.skip, s.skip
    assert (s.overrides["fusion.allreduce_rms"], s.overrides["fusion.workspace_group"]) == expect
    assert s.overrides["hook"] is None
    whats = [r.what for r in s.reads]
    assert whats == ["fusion gate", "workspace group argument", "FlashInfer pin", "workspace group"]
    group = s.reads[-1]
    assert group.where == "computed" and group.value == expect[1]


def test_flashinfer_window_decides_the_group_when_vllm_passes_none(tmp_path: Path) -> None:
    for fi, group in [("0.6.9", "tp"), ("0.6.10", "world"), ("0.6.14.post1", "world"), ("0.6.15", "tp")]:
        s = derive(_checkout(tmp_path / fi, pp_gate=False, fi=fi), tp=2, pp=2)
        assert s.overrides["fusion.workspace_group"] == group, (fi, s.reads[-1].detail)
        inside = "inside" if group == "world" else "outside"
        assert f"FlashInfer {fi} is {inside} 0.6.10 to 0.6.14" in s.reads[-1].detail


def test_bisect_step_on_an_unreadable_checkout_is_a_skip_without_any_run(tmp_path: Path) -> None:
    from repro.bisect.common import BisectOptions, BisectResult
    from repro.bisect.judge import Stepper

    sc = tmp_path / "seed.yaml"
    sc.write_text("name: s\nmodel: {preset: llama-3.1-70b, num_layers: 2}\nparallel: {tp: 2, pp: 2}\n"
                  "backend: sim\nhook: vllm-source\n")
    root = _checkout(tmp_path, gate_text=GATE_UNREADABLE)
    opts = BisectOptions(reports_dir=tmp_path / "r")
    res = BisectResult(mode="git", target=str(root), scenario=str(sc), good="g", bad="b", policy=opts.policy,
                       log_dir=tmp_path / "log")
    lines: list[str] = []
    st = Stepper(sc, opts, res, lines.append).judge("step", "abc", "abc gate", [root], root, {}, source=root)
    assert st.verdict == "skip" and not st.runs
    assert st.reason.startswith("fusion gate: vllm/config/vllm.py:") and "cfg.model_config" in st.reason
    assert "| skip | - |" in (md := (tmp_path / "log" / "bisect.md").read_text()) and st.reason in md
    assert any(ln.startswith("[step 1] -> skip (fusion gate: ") for ln in lines)


def _vdiag(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "repro.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(root)), timeout=120)


def test_bisect_refuses_bad_search_options_and_the_hook_without_a_checkout(tmp_path: Path) -> None:
    sc = tmp_path / "seed.yaml"
    sc.write_text("name: s\nmodel: {preset: llama-3.1-70b, num_layers: 2}\nparallel: {tp: 2, pp: 2}\n"
                  "backend: sim\nhook: vllm-source\n")
    base = ["bisect", str(sc), "--good", "a", "--bad", "b"]
    p = _vdiag(*base, "--repo", str(tmp_path), "--platform", "8.0", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "vdiag: error: --platform '8.0': give the CUDA SM the fusion gate is evaluated for: 9.0 (Hopper) or 10.x "
        "(Blackwell), e.g. --platform 10.0"]
    p = _vdiag(*base, "--repo", str(tmp_path), "--search", "fast", cwd=tmp_path)
    assert p.returncode == 2 and "--search 'fast': allowed values are rule, bayes" in p.stderr
    p = _vdiag(*base, "--pip", "flashinfer-python", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "hook: vllm-source reads a vLLM checkout; use it with `vdiag bisect --repo`" in p.stderr


def test_version_before_the_fused_pass_runs_unfused_and_a_pass_without_gate_skips(tmp_path: Path) -> None:
    root = tmp_path / "old"
    (root / "vllm" / "config").mkdir(parents=True)
    (root / "vllm" / "config" / "__init__.py").write_text("class PassConfig:\n    enable_fusion: bool = True\n")
    r = read_fusion_gate(root, tp=2, pp=2, platform=Platform())
    assert r.value == "off" and "this version has no fused all-reduce + RMSNorm pass" in r.detail
    (root / "vllm" / "compilation").mkdir()
    (root / "vllm" / "compilation" / "collective_fusion.py").write_text("class AllReduceFusionPass:\n    pass\n")
    s = derive(root, tp=2, pp=2)
    assert s.skip == ("fusion gate: neither enable_allreduce_rms_fusion (vllm/config/) nor a PassConfig flag "
                      "(fuse_allreduce_rms, enable_fi_allreduce_fusion) was found, though "
                      "vllm/compilation/collective_fusion.py has a fused pass: the version's fusion gate cannot be read")
