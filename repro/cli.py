"""The command line. Commands only parse their arguments and delegate; errors become one line + exit code."""

from __future__ import annotations

import sys
import tempfile
import traceback

import typer

from repro.errors import ExitCode, Interrupted, VdiagError, exit_code_help

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
