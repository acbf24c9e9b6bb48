"""The exit-code table and the one error family every command turns into a message.

| code | meaning |
|------|---------|
| 0 | clean: the run finished and every checked result was right |
| 1 | failure reproduced: a hang, or silent corruption (wrong results) |
| 2 | usage or scenario error |
| 3 | environment error (a missing tool, permissions, no GPU where one is needed) |
| 4 | a worker crashed |
| 125 | bisect only: this step cannot be judged (skip) |
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    CLEAN = 0
    REPRODUCED = 1
    USAGE = 2
    ENVIRONMENT = 3
    CRASH = 4
    SKIP = 125


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
