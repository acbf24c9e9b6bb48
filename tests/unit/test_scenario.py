"""The scenario model: presets, vLLM's gate, capture order, and errors that name file:line:column."""

from __future__ import annotations

from pathlib import Path

import pytest

from repro.errors import ScenarioError
from repro.scenario import (
    MODEL_PRESETS,
    all_errors,
    choose_oneshot,
    load_scenario,
    parse_scenario_text,
    vllm_default_capture_sizes,
)

ROOT = Path(__file__).resolve().parents[2]


def test_vllm_default_capture_sizes_are_the_51_sizes_captured_largest_first() -> None:
    sizes = vllm_default_capture_sizes(256)
    assert len(sizes) == 51
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 512
    sc = parse_scenario_text("name: x\nmodel: llama-3.1-70b\n")
    order = sc.capture.ordered()
    assert order[0] == 512 and order[-1] == 1 and len(order) == 51


@pytest.mark.parametrize("preset,hidden,layers", [
    ("llama-3.1-8b", 4096, 32), ("llama-3.1-70b", 8192, 80), ("llama-3.1-405b", 16384, 126), ("qwen3-32b", 5120, 64),
])
def test_presets_carry_the_config_shapes(preset: str, hidden: int, layers: int) -> None:
    sc = parse_scenario_text(f"name: x\nmodel: {preset}\n")
    assert (sc.model.hidden_size, sc.model.num_layers) == (hidden, layers)
    assert preset in MODEL_PRESETS


@pytest.mark.parametrize("tp,pp,mode,enabled", [
    (2, 2, "auto", False), (2, 1, "auto", True), (4, 1, "auto", True), (1, 1, "auto", False),
    (2, 2, "on", True), (2, 1, "off", False),
])
def test_fusion_auto_is_vllms_gate_after_43616(tp: int, pp: int, mode: str, enabled: bool) -> None:
    sc = parse_scenario_text(
        f"name: x\nmodel: llama-3.1-8b\nparallel: {{tp: {tp}, pp: {pp}}}\nfusion: {{allreduce_rms: {mode}}}\n"
    )
    assert sc.fusion_enabled() is enabled


def test_yaml_on_off_are_read_as_the_flag_values() -> None:
    sc = parse_scenario_text("name: x\nmodel: llama-3.1-8b\nparallel: {tp: 2}\nfusion: {allreduce_rms: on}\n")
    assert sc.fusion.allreduce_rms == "on"


def test_oneshot_rules() -> None:
    # vLLM: tensor bytes <= 32 MiB at TP=2 on SM90; FlashInfer: comm size MB <= 512 at TP=2
    assert choose_oneshot("vllm", 512, 8192, 2, 2, 90) is True
    assert choose_oneshot("vllm", 4096, 8192, 2, 4, 90) is False
    assert choose_oneshot("flashinfer", 4096, 8192, 2, 2, 90) is True
    assert choose_oneshot("never", 1, 8192, 2, 2, 90) is False


def _err(text: str) -> str:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario_text(text, "s.yaml")
    return ei.value.message


def test_errors_name_file_line_column_field_and_allowed_values() -> None:
    msg = _err("name: x\nmodel: llama-3.1-8b\nfusion:\n  allreduce_rms: maybe\n")
    assert msg.startswith("s.yaml:4:")
    assert "fusion.allreduce_rms" in msg and "'on'" in msg and "'auto'" in msg


def test_unknown_fields_and_bad_yaml_are_located() -> None:
    msg = _err("name: x\nmodel: llama-3.1-8b\nparalel: {tp: 2}\n")
    assert msg.startswith("s.yaml:3:") and "paralel" in msg and "unknown field" in msg
    msg = _err("name: x\nmodel: [unclosed\n")
    assert msg.startswith("s.yaml:") and "not valid YAML" in msg


def test_impossible_layouts_are_refused_with_a_fix() -> None:
    assert "rank 7 does not exist" in _err(
        "name: x\nmodel: llama-3.1-8b\nparallel: {tp: 2, pp: 2}\nfaults: [{kind: delay, rank: 7}]\n"
    )
    assert "dp > 1" in _err("name: x\nmodel: llama-3.1-8b\nparallel: {tp: 2, dp: 2}\n")
    assert "tp=3" in _err("name: x\nmodel: llama-3.1-8b\nparallel: {tp: 3}\n")
    assert "unknown model preset" in _err("name: x\nmodel: llama-9\n")
    assert "multiple of 8" in _err("name: x\nmodel: {hidden_size: 100, num_layers: 2}\n")


def test_every_shipped_scenario_is_valid() -> None:
    files = sorted((ROOT / "scenarios").glob("*.yaml"))
    assert len(files) >= 11
    for f in files:
        assert all_errors(f) == [], f


def test_overrides_apply_to_presets_and_report_bad_keys(tmp_path: Path) -> None:
    sc = load_scenario(ROOT / "scenarios" / "llama70b-pp2-tp2-fusion.yaml", ["model.num_layers=3", "capture.sizes=[8,4]"])
    assert sc.model.num_layers == 3 and sc.model.hidden_size == 8192 and sc.capture.ordered() == [8, 4]
    with pytest.raises(ScenarioError, match="KEY=VALUE"):
        load_scenario(ROOT / "scenarios" / "llama70b-pp2-tp2-fusion.yaml", ["oops"])
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")
