"""What a user sees from `vdiag scenario ...` and from bad input to `vdiag run`: one line, a distinct code."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SCENARIOS, run_vdiag


def test_validate_prints_every_problem_with_its_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: llama-3.1-8b\nparallel: {tp: 2, pp: 1}\nfusion:\n  oneshot: sometimes\nbackend: tpu\n")
    r = run_vdiag(["scenario", "validate", str(bad), str(SCENARIOS / "tp4-clean.yaml")], tmp_path)
    assert r.rc == 2
    lines = r.stderr.strip().splitlines()
    assert any(ln.startswith(f"{bad}:5:") and "fusion.oneshot" in ln for ln in lines)
    assert any(ln.startswith(f"{bad}:6:") and "backend" in ln for ln in lines)
    assert "tp4-clean.yaml: ok" in r.stdout
    assert "Traceback" not in r.stderr


def test_run_with_a_malformed_scenario_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: llama-3.1-8b\nparallel: {tp: 2, pp: 2}\nfaults:\n  - {kind: delay, rank: 9}\n")
    r = run_vdiag(["run", str(bad)], tmp_path / "reports")
    assert r.rc == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"vdiag: error: {bad}:") and "rank 9 does not exist" in r.stderr
    missing = run_vdiag(["run", str(tmp_path / "nope.yaml")], tmp_path / "reports")
    assert missing.rc == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_run_refuses_the_vllm_source_hook_outside_bisect_in_one_line(tmp_path: Path) -> None:
    sc = tmp_path / "seed.yaml"
    sc.write_text("name: s\nmodel: {preset: llama-3.1-8b, num_layers: 2}\nparallel: {tp: 2, pp: 2}\n"
                  "capture: {sizes: [8]}\nbackend: sim\nhook: vllm-source\n")
    r = run_vdiag(["run", str(sc)], tmp_path / "reports")
    assert r.rc == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"vdiag: error: {sc}: hook: vllm-source reads a vLLM checkout")
    assert "vdiag bisect" in r.stderr
    assert not any((tmp_path / "reports").iterdir())  # refused before any run folder is made


def test_a_gpu_backend_without_a_gpu_is_an_environment_error(tmp_path: Path) -> None:
    r = run_vdiag(["run", str(SCENARIOS / "mech-missing-peer.yaml"), "--set", "backend=flashinfer"], tmp_path / "r")
    assert r.rc == 3
    assert "backend: sim" in r.stderr and "Traceback" not in r.stderr


def test_show_resolves_defaults_and_schema_is_json(tmp_path: Path) -> None:
    r = run_vdiag(["scenario", "show", str(SCENARIOS / "llama70b-pp2-tp2-fusion-auto.yaml")], tmp_path)
    assert r.rc == 0
    assert "fusion_enabled: false" in r.stdout and "capture_order:" in r.stdout
    s = run_vdiag(["scenario", "schema"], tmp_path)
    schema = json.loads(s.stdout)
    assert "faults" in schema["properties"]
