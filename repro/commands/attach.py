"""`vdiag attach PID [PID...]` / `vdiag attach --tree PID`: the same report for a job that is already hung."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Diagnose a running job without restarting it: sample its activity, take every stack, report.

\b
  vdiag attach --tree $(pgrep -f torchrun | head -1)    # the agent and all its workers
  vdiag attach 4121 4122                                # just these processes

\b
Nothing is stopped for longer than a stack dump takes, and nothing is killed.
Exit codes: 0 nothing hung, 1 hang, 2 bad pid or usage, 3 no permission (another user).
"""


def register(app: typer.Typer) -> None:
    @app.command("attach", help=HELP)
    def attach(
        pids: list[int] = typer.Argument(None, help="process ids of the job"),
        tree: bool = typer.Option(False, "--tree", help="the one pid given and all its descendants"),
        sample_s: float = typer.Option(3.0, "--sample-s", min=0.5, help="seconds of activity sampling"),
        gpu_state: str = typer.Option("auto", "--gpu-state", help="auto or attach (cuda-gdb), or none"),
        reports: Path = typer.Option(Path("reports"), help="where run folders are created"),
        quiet: bool = typer.Option(False, help="no terminal summary"),
    ) -> None:
        from repro.errors import ScenarioError
        from repro.observe.session import ObserveOptions, attach_command

        if gpu_state not in ("auto", "attach", "none"):
            raise ScenarioError(f"--gpu-state {gpu_state!r}: allowed values are auto, attach, none")
        opts = ObserveOptions(reports_dir=reports, gpu_state=gpu_state, quiet=quiet, sample_s=sample_s)
        out = attach_command(list(pids or []), opts, tree=tree)
        raise typer.Exit(out.exit_code)
