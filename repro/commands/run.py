"""`vdiag run`: replay a scenario's start-up under torchrun, watch it, report (the pipeline is repro.run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from repro.errors import ScenarioError

if TYPE_CHECKING:
    from repro.repeat import RunRecord
    from repro.run import RunOptions

err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        scenario: Path = typer.Argument(..., help="scenario YAML file"),
        set_: list[str] = typer.Option([], "--set", help="override a field: --set model.num_layers=4"),
        reports: Path = typer.Option(Path("reports"), help="where run folders are created"),
        live: bool = typer.Option(True, help="show the live rank view on a terminal"),
        quiet: bool = typer.Option(False, help="no terminal summary"),
        gpu_state: str = typer.Option("auto", help="GPU state collector: auto, attach, coredump or none"),
        check_expect: bool = typer.Option(False, help="exit 0 when the outcome matches the scenario's `expect`, else 1"),
        nnodes: int = typer.Option(None, help="number of nodes (multi-node runs; read from SLURM inside srun)"),
        node_rank: int = typer.Option(None, help="this node's rank (default 0, or SLURM_NODEID)"),
        rdzv_endpoint: str = typer.Option("", help="HOST:PORT of the c10d rendezvous (multi-node)"),
        rdzv_id: str = typer.Option("", help="rendezvous id, the same on every node (default: VDIAG_RDZV_ID, "
                                    "SLURM's job.step, or the endpoint)"),
        repeat: int = typer.Option(1, "--repeat", min=1, help="run N times; report the hang rate with a 95% interval"),
    ) -> None:
        """Replay a scenario's start-up under torchrun, watch it, and report."""
        from repro.run import RunOptions, run_scenario
        from repro.torchrun import resolve_node

        if gpu_state not in ("auto", "attach", "coredump", "none"):
            raise ScenarioError(f"--gpu-state {gpu_state!r}: allowed values are auto, attach, coredump, none")
        try:
            node = resolve_node(nnodes, node_rank, rdzv_endpoint or None, rdzv_id or None)
        except ValueError as e:
            raise ScenarioError(str(e)) from None
        opts = RunOptions(overrides=list(set_), reports_dir=reports, live=live, quiet=quiet, gpu_state=gpu_state,
                          node=node)
        if repeat > 1:
            _run_repeated(scenario, opts, repeat, check_expect)
        outcome = run_scenario(scenario, opts, err_console)
        print(outcome.run_dir.report_md)
        if outcome.merge_message:
            err_console.print(outcome.merge_message, markup=False, highlight=False)
        if outcome.merged_dir is not None:
            print(outcome.merged_dir.report_md)
        if check_expect:
            met = outcome.expectation_met
            if met is None:
                raise ScenarioError(f"{scenario}: --check-expect needs `expect:` in the scenario")
            raise typer.Exit(0 if met else 1)
        raise typer.Exit(outcome.exit_code)


def _run_repeated(scenario: Path, opts: RunOptions, repeat: int, check_expect: bool) -> None:
    """`vdiag run --repeat N`: N runs, then the hang rate; exit 1 if any run reproduced (see repro/repeat.py)."""
    from repro.repeat import run_repeated
    from repro.scenario import load_scenario

    expect = load_scenario(scenario, opts.overrides).expect
    if check_expect and expect is None:
        raise ScenarioError(f"{scenario}: --check-expect needs `expect:` in the scenario")
    opts.quiet = True
    opts.live = False

    def on_run(i: int, rec: RunRecord) -> None:
        sys.stderr.write(f"run {i}/{repeat}: {rec.short()} ({rec.verdict}, {rec.seconds:.1f} s) {rec.report_md}\n")

    summary = run_repeated(scenario, opts, repeat, err_console, on_run=on_run)
    for rec in summary.runs:
        print(rec.report_md)
    print(summary.headline())
    if check_expect:
        met = {"hang": summary.hangs == summary.n, "failure": summary.failures == summary.n,
               "clean": summary.failures == 0 and summary.crashes == 0,
               "corruption": all(r.corrupt for r in summary.runs)}[str(expect)]
        raise typer.Exit(0 if met else 1)
    raise typer.Exit(summary.exit_code)
