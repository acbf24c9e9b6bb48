"""The exit codes (each code carries its meaning) and the one error family every command turns into a message.

README's table, the CLI's help and the report's footer read `ExitCode.meaning`; a test keeps README's table
equal to the enum.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """vdiag's exit codes; `meaning` is each code's one description."""

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.meaning = meaning
        return obj

    CLEAN = 0, "clean: the run finished and every checked result was right"
    REPRODUCED = 1, "failure reproduced: a hang, or silent corruption (wrong results)"
    USAGE = 2, "usage or scenario error"
    ENVIRONMENT = 3, "environment error (a missing tool or package, permissions, no GPU where one is needed)"
    CRASH = 4, "a worker crashed"
    INTERNAL = 70, "internal error (a bug in vdiag; the traceback is written to a temporary file, named on stderr)"
    SKIP = 125, "bisect only: this step cannot be judged (skip)"
    SIGHUP = 129, "`vdiag run` stopped by SIGHUP (the terminal closed); cleaned up, partial report kept"
    INTERRUPTED = 130, "interrupted (Ctrl-C, SIGINT); cleaned up, partial report kept"
    KILLED = (
        137,
        "vdiag itself was killed (SIGKILL, the OOM killer): no report; `vdiag report RUN_DIR` rebuilds one "
        "(which says 137)"
    )
    SIGTERM = 143, "`vdiag run` stopped by SIGTERM (`timeout`, Slurm, Kubernetes); cleaned up, partial report kept"


def exit_meaning(code: int) -> str:
    """The meaning of an exit code (its one home is `ExitCode`)."""
    return next((c.meaning for c in ExitCode if c == code), "not a vdiag exit code")


def exit_code_table() -> str:
    """The Markdown table of every exit code and its meaning (README's "Exit codes" section is this table)."""
    rows = ["| code | meaning |", "|---|---|"] + [f"| {int(c)} | {c.meaning} |" for c in ExitCode]
    return "\n".join(rows)


def exit_code_help() -> str:
    """The exit codes as the CLI's help lists them, one per line."""
    return "\n".join(f"  {int(c):>3}  {c.meaning}" for c in ExitCode)


class VdiagError(Exception):
    """An error with advice for the user and a distinct exit code. Never shown as a traceback."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ScenarioError(VdiagError):
    exit_code = ExitCode.USAGE


class EnvironmentProblem(VdiagError):
    exit_code = ExitCode.ENVIRONMENT


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT, SIGTERM, SIGHUP): clean up, keep a partial report, exit 128 + N.

    A KeyboardInterrupt, so every path that already cleans up after Ctrl-C does the same for the others."""

    last: str = ""  # the latest signal that stopped something in this process (the CLI's exit code)

    def __init__(self, signame: str = "SIGINT") -> None:
        super().__init__(signame)
        self.signame = signame
        Interrupted.last = signame

    @property
    def exit_code(self) -> ExitCode:
        return {"SIGTERM": ExitCode.SIGTERM, "SIGHUP": ExitCode.SIGHUP}.get(self.signame, ExitCode.INTERRUPTED)

    @property
    def how(self) -> str:
        return {"SIGINT": "Ctrl-C (SIGINT)"}.get(self.signame, self.signame)
