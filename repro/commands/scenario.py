"""`vdiag scenario validate|show|schema`: check, show and describe scenario files (logic in repro.scenario)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from repro.errors import ExitCode


def register(app: typer.Typer) -> None:
    scenario_app = typer.Typer(help="Check, show and describe scenario files.", no_args_is_help=True)
    app.add_typer(scenario_app, name="scenario")

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
                sys.stderr.write(w.line + "\n")
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
