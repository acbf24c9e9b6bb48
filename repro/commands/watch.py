"""`vdiag watch [OPTIONS] -- COMMAND [ARGS...]`: run a job, notice its stall, report it (repro/observe/)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from repro.observe.monitor import DEFAULT_PATIENCE_S, DEFAULT_STALL_S
from repro.observe.progress import READY_PATTERNS

HELP = f"""Run COMMAND in its own process group, follow its process tree, and report a hang.

\b
  vdiag watch -- torchrun --nproc-per-node 2 job.py
  vdiag watch --stall-s 60 -- vllm serve meta-llama/Llama-3.1-70B -tp 2 -pp 2
  vdiag watch --on-hang kill --stall-s 30 -- python train.py

\b
Output passes through (colours and progress bars too) and is scanned for N/M progress. When nothing
progressed for --stall-s (default {DEFAULT_STALL_S:g} s) and every rank is in a known wait, vdiag takes
every stack, the GPU state and the environment and writes reports/<time>-watch-<program>/report.md.
Ranks still working outside every known wait are given up to --patience-s (default {DEFAULT_PATIENCE_S:g} s).
Once the job prints that its start-up is over (uvicorn's "Application startup complete", under
`vllm serve`; --ready-pattern adds others), an idle server is not a stall: vdiag follows it until it ends.
Exit codes: 0 the command finished and no hang was seen (also Ctrl-C after the start-up finished),
1 hang, 2 usage, 3 environment, 4 the command failed (its status is in the report), 130 interrupted
before a hang.
"""


def register(app: typer.Typer) -> None:
    @app.command("watch", help=HELP, context_settings={"allow_interspersed_args": False})
    def watch(
        command: list[str] = typer.Argument(None, help="the command to run, after --"),
        stall_s: float = typer.Option(DEFAULT_STALL_S, "--stall-s", min=0.1,
                                      help="seconds without progress before a stall is suspected"),
        patience_s: float = typer.Option(DEFAULT_PATIENCE_S, "--patience-s", min=0.0,
                                         help="how long ranks outside every known wait may stay there"),
        on_hang: str = typer.Option("report", "--on-hang", help="report (keep the job running) or kill"),
        instrument: bool = typer.Option(True, "--instrument/--no-instrument",
                                        help="load vdiag's FlashInfer/vLLM instrumentation (sitecustomize)"),
        gpu_state: str = typer.Option("auto", "--gpu-state", help="auto or attach (cuda-gdb), or none"),
        core_dump: bool = typer.Option(False, "--core-dump",
                                       help="on a hang, take CUDA core dumps (ends the dumped processes)"),
        reports: Path = typer.Option(Path("reports"), help="where run folders are created"),
        max_s: float = typer.Option(None, "--max-s", help="stop watching after this many seconds"),
        quiet: bool = typer.Option(False, help="no terminal summary"),
        ready_pattern: list[str] = typer.Option(
            None, "--ready-pattern", metavar="REGEX",
            help="a line that means start-up is over (repeatable; uvicorn's 'Application startup complete' "
                 "is known): after it an idle job is not a stall"),
    ) -> None:
        from repro.errors import ScenarioError
        from repro.observe.monitor import WatchConfig
        from repro.observe.session import ObserveOptions, watch_command

        if gpu_state not in ("auto", "attach", "none"):
            raise ScenarioError(f"--gpu-state {gpu_state!r}: allowed values are auto, attach, none")
        for rx in ready_pattern or []:
            try:
                re.compile(rx)
            except re.error as e:
                raise ScenarioError(f"--ready-pattern {rx!r}: not a regular expression ({e}); "
                                    "give one such as 'Server ready'") from None
        cfg = WatchConfig(stall_s=stall_s, patience_s=patience_s, max_s=max_s,
                          ready_patterns=(*READY_PATTERNS, *(ready_pattern or [])))
        opts = ObserveOptions(reports_dir=reports, watch=cfg,
                              on_hang=on_hang, instrument=instrument, gpu_state=gpu_state, core_dump=core_dump,
                              quiet=quiet)
        out = watch_command(list(command or []), opts)
        raise typer.Exit(out.exit_code)
