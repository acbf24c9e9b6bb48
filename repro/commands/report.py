"""`vdiag report`: render a run folder's report again, re-analyse its records, or merge nodes' folders."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from repro.errors import ScenarioError

err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        run_dirs: list[Path] = typer.Argument(None, help="a run folder under reports/ (with --merge: every node's)"),
        schema: bool = typer.Option(False, "--schema", help="print the JSON Schema of report.json and exit"),
        merge: bool = typer.Option(False, "--merge", help="combine the run folders of a multi-node run's nodes "
                                   "into one report (a new <time>-<scenario>-merged folder beside the first)"),
        again: bool = typer.Option(False, "--reanalyse", help="run the analysis again on the folder's stored records "
                                   "(launch logs, verdict, stacks, GPU state, locks; also of watch/attach folders) instead of "
                                   "re-rendering report.json"),
    ) -> None:
        """Render a run's report.md, report.json and activity picture again from its records.

        With --reanalyse, the analysis of this vdiag version runs again over the stored records and the
        report is written anew; without it, the stored report.json is rendered as it is."""
        import json

        from repro.diagnose import reanalyse, rebuild_report, write_report
        from repro.report import json_report
        from repro.rundir import RunDir

        if schema:
            print(json.dumps(json_report.schema(), indent=2))
            return
        if merge:
            from repro.merge import merge_runs
            from repro.report.terminal import render_terminal

            merged_dir, merged = merge_runs(list(run_dirs or []))
            render_terminal(merged, err_console)
            print(merged_dir.report_md)
            return
        if not run_dirs:
            raise ScenarioError("vdiag report: give a run folder (reports/<run>/) or --schema")
        if len(run_dirs) > 1:
            raise ScenarioError("vdiag report: give one run folder, or --merge to combine several nodes' folders")
        run_dir = run_dirs[0]
        rd = RunDir(run_dir)
        if not rd.report_json.exists() and not rd.scenario_json.exists():
            raise ScenarioError(f"{run_dir}: no report.json or scenario.json here; give a folder that `vdiag run` created")
        if again:
            rep = reanalyse(rd)
        elif rd.report_json.exists():
            rep = write_report(rd, json_report.load_report(rd.report_json))
        else:  # vdiag was killed before its report: rebuild it from the records
            rep = rebuild_report(rd)
        from repro.report.terminal import render_terminal

        render_terminal(rep, err_console)
        print(rd.report_md)
