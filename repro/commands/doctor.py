"""`vdiag doctor`: check this machine, then catch a planted deadlock live (the logic is in repro.doctor)."""

from __future__ import annotations

import json
import os

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

STYLE = {"ok": ("ok", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "bold red"), "skip": ("skip", "dim")}


def _console() -> Console:
    """stdout; wide enough off a terminal that a fix is never broken across lines in a log."""
    con = Console()
    if not con.is_terminal:
        con = Console(width=max(160, int(os.environ.get("COLUMNS", "0") or 0)))
    return con


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        selftest: bool = typer.Option(True, help="end with the live self-test: a planted two-rank deadlock"),
        gpu: bool = typer.Option(True, help="also run the GPU self-test where a GPU and flashinfer exist"),
        keep: bool = typer.Option(False, help="keep the self-test's run folders (kept anyway when it fails)"),
        as_json: bool = typer.Option(False, "--json", help="print the checks as JSON instead of a table"),
    ) -> None:
        """Check that this machine can catch and diagnose a start-up hang; exit 3 when it cannot.

        Checks py-spy and ptrace (by attaching to a child), the faulthandler fallback, NVML, the GPUs and
        their architecture, cuda-gdb, torch/vllm/flashinfer, /dev/shm and torchrun, then runs a planted
        two-rank missing-peer deadlock through the whole pipeline (and a GPU one where a GPU exists).

        Fatal (exit 3): torch or torchrun unusable, /dev/shm unwritable or nearly full, or a self-test that
        misses or misdiagnoses the planted deadlock. Warnings (exit 0): py-spy missing, ptrace denied (even
        without the faulthandler fallback), NVML, cuda-gdb, GPU architecture, flashinfer: the verdict comes
        from the launch logs and the activity, these only add evidence.
        """
        from repro.doctor import run_checks

        con = _console()
        err = Console(stderr=True)
        if not as_json and selftest:
            err.print("vdiag doctor: checking tools, then the live self-test (about 15 s)...", highlight=False)
        result = run_checks(selftest=selftest, gpu=gpu, keep=keep)
        if as_json:
            print(json.dumps({"checks": [c.as_dict() for c in result.checks], "exit_code": result.exit_code,
                              "summary": result.summary()}, indent=2))
            raise typer.Exit(result.exit_code)
        table = Table(title="vdiag doctor", show_lines=False, expand=False)
        table.add_column("check", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("detail", overflow="fold")
        table.add_column("how to fix", overflow="fold")
        for c in result.checks:
            word, style = STYLE[c.status]
            table.add_row(c.name, Text(word, style=style), Text(c.detail), Text(c.fix if c.status != "ok" else ""))
        con.print(table)
        # The fixes again, one per line and never wrapped, to copy from or grep in a CI log.
        for c in result.checks:
            if c.status in ("fail", "warn") and c.fix:
                con.print(f"{STYLE[c.status][0]}: {c.name}: {c.fix}", soft_wrap=True, highlight=False, markup=False)
        con.print(result.summary(), soft_wrap=True, highlight=False, markup=False,
                  style="bold red" if result.failed else "green")
        raise typer.Exit(result.exit_code)
