"""The exit-code table and the one error family every command turns into a message.

| code | meaning |
|------|---------|
| 0 | clean: the run finished and every checked result was right |
| 1 | failure reproduced: a hang, or silent corruption (wrong results) |
| 2 | usage or scenario error |
| 3 | environment error (a missing tool, permissions, no GPU where one is needed) |
| 4 | a worker crashed |
| 70 | internal error (a bug in vdiag; the traceback is written to a temporary file) |
| 125 | bisect only: this step cannot be judged (skip) |
| 129 | `vdiag run` stopped by SIGHUP (the terminal closed); cleaned up, partial report kept |
| 130 | interrupted (Ctrl-C, SIGINT); cleaned up, partial report kept |
| 137 | vdiag itself was killed (SIGKILL, the OOM killer): no report; `vdiag report RUN_DIR` rebuilds one |
| 143 | `vdiag run` stopped by SIGTERM (`timeout`, Slurm, Kubernetes); cleaned up, partial report kept |
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    CLEAN = 0
    REPRODUCED = 1
    USAGE = 2
    ENVIRONMENT = 3
    CRASH = 4
    INTERNAL = 70
    SKIP = 125
    SIGHUP = 129
    INTERRUPTED = 130
    KILLED = 137
    SIGTERM = 143


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
