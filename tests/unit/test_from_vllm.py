"""`vdiag scenario from-vllm -- vllm serve MODEL [flags]`: the flags that matter become a scenario."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from repro.cli import app
from repro.engines.vllm.args import NEWEST_API, build_plan, parse_serve, preset_for, scenario_yaml_from_serve
from repro.errors import ScenarioError
from repro.scenario import parse_scenario_text

SK = "sk-" + "proj-abcDEF123456ghiJKL789"


def _yaml(cmd: str, **kw: str) -> tuple[str, dict]:
    text = scenario_yaml_from_serve(parse_serve(shlex.split(cmd)), **kw)
    return text, yaml.safe_load(text)


def test_the_bug_report_command() -> None:
    text, _data = _yaml("vllm serve meta-llama/Llama-3.1-70B-Instruct -tp 2 -pp 2")
    sc = parse_scenario_text(text)
    assert sc.engine == "vllm" and sc.model.preset == "llama-3.1-70b"
    assert (sc.parallel.tp, sc.parallel.pp) == (2, 2) and sc.capture.sizes == "default"
    assert sc.fusion.allreduce_rms == "auto" and sc.name == "llama-3.1-70b-instruct-tp2-pp2"
    assert text.startswith("# Written by `vdiag scenario from-vllm` from:\n#   vllm serve meta-llama/Llama-3.1-70B-Instruct")


def test_compilation_config_json() -> None:
    cc = '{"pass_config": {"fuse_allreduce_rms": true, "fi_allreduce_fusion_max_size_mb": 2}, ' \
         '"cudagraph_capture_sizes": [16, 1, 8], "cudagraph_mode": "FULL", "mode": 3}'
    text, _data = _yaml(f"vllm serve Qwen/Qwen3-32B -tp 4 --compilation-config '{cc}' --max-num-seqs 128 "
                       "--max-num-batched-tokens 4096 --max-model-len 32k --dtype bfloat16")
    sc = parse_scenario_text(text)
    assert sc.model.preset == "qwen3-32b" and sc.capture.sizes == [1, 8, 16] and sc.capture.mode == "FULL"
    assert sc.capture.max_num_seqs == 128 and sc.capture.max_num_batched_tokens == 4096
    assert sc.fusion.allreduce_rms == "on"
    assert sc.vllm["max_model_len"] == 32768
    assert sc.vllm["pass_config"] == {"fi_allreduce_fusion_max_size_mb": 2}
    assert sc.vllm["compilation_config"] == {"cudagraph_mode": "FULL", "mode": 3}


def test_dotted_and_underscore_forms() -> None:
    cmd = parse_serve(shlex.split(
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --tensor_parallel_size=2 -cc.pass_config.fuse_allreduce_rms=false "
        "--compilation-config.cudagraph_capture_sizes [1,2,4] --compilation_config.cudagraph_mode PIECEWISE"))
    assert cmd.tp == 2 and cmd.capture_sizes == [1, 2, 4]
    assert cmd.compilation_config == {"pass_config": {"fuse_allreduce_rms": False}, "cudagraph_mode": "PIECEWISE"}
    sc = parse_scenario_text(scenario_yaml_from_serve(cmd))
    assert sc.fusion.allreduce_rms == "off" and sc.capture.mode == "PIECEWISE"


@pytest.mark.parametrize(("flags", "level", "cc"), [
    ("-O3", 3, {}),
    ("-O 2", 2, {}),
    ("-O=1", 1, {}),
    ("--optimization-level 0", 0, {}),
    ("-O '{\"level\": 3}'", None, {"level": 3}),  # vLLM 0.11: -O was --compilation-config
    ("--compilation-config 3", None, {"mode": 3}),
])
def test_optimization_level_forms(flags: str, level: int | None, cc: dict) -> None:
    cmd = parse_serve(shlex.split(f"vllm serve m/llama-3.1-8b {flags}"))
    assert cmd.optimization_level == level and cmd.compilation_config == cc


def test_capture_size_flags_old_and_new() -> None:
    assert parse_serve(shlex.split("vllm serve x --cuda-graph-sizes 1 2 4")).capture_sizes == [1, 2, 4]
    assert parse_serve(shlex.split("vllm serve x --cudagraph-capture-sizes 8,16")).capture_sizes == [8, 16]
    cmd = parse_serve(shlex.split("vllm serve x --max-cudagraph-capture-size 64"))
    assert cmd.compilation_config == {"max_cudagraph_capture_size": 64}


def test_unknown_flags_kept_as_comment_and_secrets_redacted() -> None:
    text, _ = _yaml(f"vllm serve meta-llama/Llama-3.1-8B-Instruct -tp 2 --port 8000 --api-key {SK} "
                    "--enable-prefix-caching --trust-remote-code")
    assert SK not in text
    assert "# Flags vdiag does not model (kept here for reference):\n#   --port 8000 --api-key '<redacted>' " \
           "--enable-prefix-caching --trust-remote-code" in text
    parse_scenario_text(text)


def test_model_without_preset_asks_for_the_shape() -> None:
    text, data = _yaml("vllm serve mistralai/Mistral-Large-Instruct-2411 -tp 8 --dtype float16")
    assert "# FILL IN: vdiag has no preset for this model" in text
    assert data["model"]["name"] == "mistralai/Mistral-Large-Instruct-2411" and data["model"]["dtype"] == "fp16"
    assert parse_scenario_text(text).parallel.tp == 8


def test_other_command_shapes() -> None:
    cmd = parse_serve(shlex.split("python -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-3.1-405B-Instruct -tp 8"))
    assert cmd.model == "meta-llama/Llama-3.1-405B-Instruct" and cmd.tp == 8
    assert parse_serve(["serve", "Qwen/Qwen3-32B", "-pp", "2"]).pp == 2
    assert parse_serve(["Qwen/Qwen3-32B"]).model == "Qwen/Qwen3-32B"


@pytest.mark.parametrize(("model", "preset"), [
    ("meta-llama/Llama-3.1-70B-Instruct", "llama-3.1-70b"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("/models/llama-3.1-405b-fp8", "llama-3.1-405b"),
    ("Qwen/Qwen3-32B", "qwen3-32b"),
    ("Qwen/Qwen3-320B", None),
    ("facebook/opt-125m", None),
])
def test_preset_matching(model: str, preset: str | None) -> None:
    assert preset_for(model) == preset


@pytest.mark.parametrize(("cmd", "message"), [
    ("vllm serve", "no model in the command"),
    ("vllm serve x --compilation-config '{bad'", "--compilation-config '{bad': not valid JSON"),
    ("vllm serve x -dp 2", "-dp 2: data parallelism is not replayed"),
    ("vllm serve x --dtype int8", "--dtype int8: allowed values"),
    ("vllm serve x -tp two", "invalid int value: 'two'"),
    ("vllm serve x --max-model-len lots", "--max-model-len 'lots'"),
])
def test_errors_are_one_line(cmd: str, message: str) -> None:
    with pytest.raises(ScenarioError) as e:
        scenario_yaml_from_serve(parse_serve(shlex.split(cmd)))
    assert message in e.value.message and "\n" not in e.value.message


def test_round_trip_to_llm_kwargs(tmp_path: Path) -> None:
    text, _ = _yaml("vllm serve meta-llama/Llama-3.1-70B-Instruct -tp 2 -pp 2 -cc.pass_config.fuse_allreduce_rms=true "
                    "--cudagraph-capture-sizes 1 2 4 --max-num-seqs 4")
    kw = build_plan(parse_scenario_text(text), tmp_path, NEWEST_API).llm_kwargs
    assert kw["compilation_config"]["pass_config"]["fuse_allreduce_rms"] is True
    assert kw["compilation_config"]["cudagraph_capture_sizes"] == [1, 2, 4] and kw["max_num_seqs"] == 4
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"]) == (2, 2)


# ---- the command line -------------------------------------------------------------------------------------


def test_cli_stdout_and_file(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["scenario", "from-vllm", "--", "vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct",
                              "-tp", "2", "-pp", "2"])
    assert res.exit_code == 0, res.output
    assert parse_scenario_text(res.stdout).model.preset == "llama-3.1-70b"
    out = tmp_path / "s.yaml"
    res = runner.invoke(app, ["scenario", "from-vllm", "-o", str(out), "--engine", "replay", "--name", "mine", "--",
                              "vllm", "serve", "Qwen/Qwen3-32B", "-tp", "2"])
    assert res.exit_code == 0, res.output
    sc = parse_scenario_text(out.read_text())
    assert sc.engine == "replay" and sc.name == "mine"
    res = runner.invoke(app, ["scenario", "from-vllm", "-o", str(out), "--", "vllm", "serve", "x"])
    assert isinstance(res.exception, ScenarioError) and "--force" in res.exception.message


def test_limits_equal_to_vdiag_defaults_still_reach_vllm(tmp_path: Path) -> None:
    text = scenario_yaml_from_serve(parse_serve(["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct",
                                                 "--max-num-batched-tokens", "8192", "--max-num-seqs", "64"]))
    kw = build_plan(parse_scenario_text(text, "<t>"), tmp_path, NEWEST_API).llm_kwargs
    assert kw["max_num_batched_tokens"] == 8192 and kw["max_num_seqs"] == 64
    text = scenario_yaml_from_serve(parse_serve(["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"]))
    kw = build_plan(parse_scenario_text(text, "<t>"), tmp_path, NEWEST_API).llm_kwargs
    assert "max_num_batched_tokens" not in kw and "max_num_seqs" not in kw
