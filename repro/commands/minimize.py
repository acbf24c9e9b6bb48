"""`vdiag minimize`: parse, delegate to repro.bisect.minimize, print the result."""

from __future__ import annotations

from pathlib import Path

import typer

from repro.commands.bisect import progress_line

MINIMIZE_HELP = """Shrink a hanging scenario while it still hangs: fewer ranks, layers, capture sizes, faults.

\b
  vdiag minimize scenarios/mech-token-divergence.yaml

Writes <name>-min.yaml (or --out): a minimal reproducer from which removing any one fault, capture
size, layer or rank loses the hang. Prints how many runs the search took.

\b
Exit codes: 0 written, 2 the scenario does not hang (or is invalid), 3 environment error.
"""



def minimize_cmd(
    scenario: Path = typer.Argument(..., help="scenario YAML file that hangs"),
    out: Path = typer.Option(None, "--out", help="where to write the minimal scenario "
                             "(default: <reports>/<time>-minimize-<name>/<name>-min.yaml)"),
    tries: int = typer.Option(1, help="runs per candidate before calling it clean (for flaky hangs)"),
    max_runs: int = typer.Option(100, help="run budget of the whole search"),
    set_: list[str] = typer.Option([], "--set", help="override a scenario field first"),
    reports: Path = typer.Option(Path("reports"), help="where the minimize folder is created"),
    gpu_state: str = typer.Option("auto", help="GPU state collector: auto, attach, coredump or none"),
) -> None:
    from repro.bisect.minimize import MinimizeOptions, minimize

    opts = MinimizeOptions(overrides=list(set_), reports_dir=reports, out=out, tries=tries, max_runs=max_runs,
                           gpu_state=gpu_state)
    res = minimize(scenario, opts, progress_line)
    progress_line(f"minimal reproducer: {res.shape()}")
    progress_line(f"found in {res.runs} runs ({res.seconds:.0f} s); log: {res.log_dir / 'minimize.md'}")
    print(res.out_path)
    print(f"{res.runs} runs")



def register(app: typer.Typer) -> None:
    app.command("minimize", help=MINIMIZE_HELP)(minimize_cmd)
