"""`vdiag scenario from-vllm -- vllm serve MODEL [flags]`: write the scenario YAML for a vLLM command.

It reads the flags that matter to the fused all-reduce hang (-tp, -pp, --max-num-seqs,
--max-num-batched-tokens, --max-model-len, --dtype, capture sizes, --compilation-config / -cc.* / -O, the
pass-config fusion flags) and keeps every other flag as a comment. The parsing lives in
`repro.engines.vllm.args` so that it is tested without the command line.
"""

from __future__ import annotations

from pathlib import Path

import typer

from repro.errors import ScenarioError

HELP = """Write the scenario YAML that matches a `vllm serve` command.

\b
  vdiag scenario from-vllm -- vllm serve meta-llama/Llama-3.1-70B-Instruct -tp 2 -pp 2
  vdiag scenario from-vllm -o mine.yaml -- vllm serve Qwen/Qwen3-32B -tp 4 -cc.pass_config.fuse_allreduce_rms=true

Everything after `--` is the vLLM command. The scenario runs real vLLM (`engine: vllm`) unless
`--engine replay` is given. Flags vdiag does not model are kept as a comment.
"""


def from_vllm(
    command: list[str] = typer.Argument(..., help="the vllm command, after --", metavar="-- vllm serve MODEL ..."),
    output: Path = typer.Option(None, "-o", "--output", help="write the YAML here instead of stdout"),
    engine: str = typer.Option("vllm", help="engine of the written scenario: vllm (real vLLM) or replay"),
    name: str = typer.Option(None, help="scenario name (default: from the model and the layout)"),
    force: bool = typer.Option(False, help="overwrite --output if it exists"),
) -> None:
    from repro.engines.vllm.args import parse_serve, scenario_yaml_from_serve

    if engine not in ("vllm", "replay"):
        raise ScenarioError(f"--engine {engine!r}: allowed values are vllm, replay")
    text = scenario_yaml_from_serve(parse_serve(command), engine=engine, name=name)
    if output is None:
        print(text, end="")
        return
    if output.exists() and not force:
        raise ScenarioError(f"{output}: exists; pass --force to overwrite it or choose another -o")
    try:
        output.write_text(text)
    except OSError as e:
        raise ScenarioError(f"{output}: cannot write: {e.strerror}") from None
    print(output)


def _scenario_group(app: typer.Typer) -> typer.Typer | None:
    for info in app.registered_groups:
        if info.name == "scenario" and info.typer_instance is not None:
            return info.typer_instance
    return None


def register(app: typer.Typer) -> None:
    """Add `from-vllm` to the `scenario` group (or, if there is none, as a top-level `from-vllm`)."""
    target = _scenario_group(app)
    settings = {"allow_interspersed_args": False}
    if target is not None:
        target.command("from-vllm", help=HELP, context_settings=settings)(from_vllm)
    else:
        app.command("from-vllm", help=HELP, context_settings=settings)(from_vllm)
