"""The command line. Commands only parse their arguments and delegate; errors become one line + exit code."""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from repro.errors import ExitCode, Interrupted, ScenarioError, VdiagError, exit_code_help

if TYPE_CHECKING:
    from repro.repeat import RunRecord
    from repro.run import RunOptions

HELP = """Reproduce and diagnose distributed deadlocks in LLM-serving start-up (vLLM + FlashInfer).

\b
  vdiag run scenarios/llama70b-pp2-tp2-fusion.yaml     # replay vLLM's start-up, report the hang
  vdiag report reports/<run>/                          # render a run's report again

\b
Exit codes:
"""
HELP += exit_code_help() + "\n"

app = typer.Typer(help=HELP, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  rich_markup_mode=None)
scenario_app = typer.Typer(help="Check, show and describe scenario files.", no_args_is_help=True)
app.add_typer(scenario_app, name="scenario")
err_console = Console(stderr=True)


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


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(None, help="a run folder under reports/ (with --merge: every node's)"),
    schema: bool = typer.Option(False, "--schema", help="print the JSON Schema of report.json and exit"),
    merge: bool = typer.Option(False, "--merge", help="combine the run folders of a multi-node run's nodes "
                               "into one report (a new <time>-<scenario>-merged folder beside the first)"),
) -> None:
    """Render a run's report.md, report.json and activity picture again from its records."""
    import json

    from repro.report import json_report
    from repro.run import write_report
    from repro.rundir import RunDir

    if schema:
        print(json.dumps(json_report.schema(), indent=2))
        return
    if merge:
        from repro.merge import merge_runs
        from repro.report.terminal import render_terminal as _render

        merged_dir, merged = merge_runs(list(run_dirs or []))
        _render(merged, err_console)
        print(merged_dir.report_md)
        return
    if not run_dirs:
        raise ScenarioError("vdiag report: give a run folder (reports/<run>/) or --schema")
    if len(run_dirs) > 1:
        raise ScenarioError("vdiag report: give one run folder, or --merge to combine several nodes' folders")
    run_dir = run_dirs[0]
    rd = RunDir(run_dir)
    if rd.report_json.exists():
        rep = json_report.load_report(rd.report_json)
    elif rd.scenario_json.exists():  # vdiag was killed before its report: rebuild it from the records
        from repro.run import rebuild_report

        rep = rebuild_report(rd)
    else:
        raise ScenarioError(f"{run_dir}: no report.json or scenario.json here; give a folder that `vdiag run` created")
    rep = write_report(rd, rep)
    from repro.report.terminal import render_terminal

    render_terminal(rep, err_console)
    print(rd.report_md)


@scenario_app.command("validate")
def scenario_validate(files: list[Path] = typer.Argument(..., help="scenario files")) -> None:
    """Check scenario files; print every problem as file:line:column: field: message."""
    from repro.scenario import all_errors, fault_warnings, load_scenario

    bad = 0
    for f in files:
        errs = all_errors(f)
        if errs:
            bad += 1
            for e in errs:
                sys.stderr.write(e + "\n")
            continue
        warns = fault_warnings(load_scenario(f), str(f))
        for w in warns:
            sys.stderr.write(w + "\n")
        print(f"{f}: ok" + (f" ({len(warns)} warning{'s' if len(warns) != 1 else ''})" if warns else ""))
    if bad:
        raise typer.Exit(int(ExitCode.USAGE))


@scenario_app.command("show")
def scenario_show(file: Path, set_: list[str] = typer.Option([], "--set")) -> None:
    """Print the scenario with every default filled in and the derived values (gate, order, widths)."""
    from repro.scenario import dump_resolved, load_scenario

    print(dump_resolved(load_scenario(file, set_)), end="")


@scenario_app.command("schema")
def scenario_schema() -> None:
    """Print the scenario JSON Schema (for editors)."""
    from repro.scenario import json_schema

    print(json_schema())


def _register_commands() -> None:
    import importlib

    from repro.commands import MODULES

    for name in MODULES:
        try:
            mod = importlib.import_module(f"repro.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"repro.commands.{name}":
                continue
            raise
        mod.register(app)


_register_commands()


def _stop(signum: int, _frame: object) -> None:
    import signal

    raise Interrupted(signal.Signals(signum).name)


def main() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C; `vdiag run` takes them over while it runs
        signal.signal(sig, _stop)
    try:
        rc = app(standalone_mode=False)
        if rc == ExitCode.INTERRUPTED and Interrupted.last:  # typer reads any KeyboardInterrupt as 130
            stop = Interrupted(Interrupted.last)
            sys.stderr.write(f"vdiag: interrupted by {stop.how}; processes and shared memory cleaned up\n")
            rc = int(stop.exit_code)
        sys.exit(rc if isinstance(rc, int) else 0)
    except VdiagError as e:
        sys.stderr.write(f"vdiag: error: {e.message}\n")
        sys.exit(int(e.exit_code))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Interrupted as e:
        sys.stderr.write(f"vdiag: interrupted by {e.how}; processes and shared memory cleaned up\n")
        sys.exit(int(e.exit_code))
    except KeyboardInterrupt:
        sys.stderr.write("vdiag: interrupted; processes and shared memory cleaned up\n")
        sys.exit(130)
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(int(ExitCode.USAGE))
        with tempfile.NamedTemporaryFile("w", prefix="vdiag-crash-", suffix=".txt", delete=False) as f:
            traceback.print_exc(file=f)
        sys.stderr.write(f"vdiag: internal error: {type(e).__name__}: {e} (traceback in {f.name})\n")
        sys.exit(int(ExitCode.INTERNAL))


if __name__ == "__main__":
    main()
