"""Repeated runs: the hang rate of a flaky scenario, and the rule that judges one bisect step.

Hang rate (`vdiag run --repeat N`)
----------------------------------
N independent runs give k hangs. The rate is k/N with a Wilson score interval,

    centre = (p + z²/2N) / (1 + z²/N)
    half   = z / (1 + z²/N) * sqrt(p(1-p)/N + z²/4N²)

where p = k/N and z is the normal quantile for the confidence (1.96 for 95 %). Unlike p ± z·sqrt(p(1-p)/N)
it stays inside [0, 1] and does not collapse to a zero-width interval when k = 0 or k = N.

Judging one step (bisect, minimize)
-----------------------------------
A step (one commit, one package version) is run again and again:

- the first run that reproduces (exit 1: a hang or wrong results) makes the step **bad** at once: a hang
  seen once is real;
- a run that crashes (exit 4: an import error, a worker that died) makes the step **skip** at once: it
  cannot be judged, and a crash is rarely flaky;
- the step is **good** only after `n` clean runs in a row, where `n` is the smallest count with

      (1 - min_rate) ** n <= 1 - confidence

  i.e. if the step really hung in at least `min_rate` of its runs, the chance of seeing `n` clean runs
  would be at most `1 - confidence`. With the defaults (confidence 0.95, min_rate 0.3) n = 9: a hang seen
  30 % of the time is labelled good with probability 0.7⁹ ≈ 4 %. `min_rate 1` means "the hang is
  deterministic": one clean run is enough.

`max_runs` caps the runs of one step; a rule that would need more clean runs than that is refused before
the first run, with the confidence that `max_runs` clean runs would give.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from repro.diagnose import HANG_CLASSES
from repro.errors import EnvironmentProblem, ExitCode, ScenarioError

if TYPE_CHECKING:
    from rich.console import Console

    from repro.run import RunOptions, RunOutcome

Verdict = Literal["good", "bad", "skip"]


# ---- the arithmetic ---------------------------------------------------------------------------------------


def z_for(confidence: float) -> float:
    """The two-sided normal quantile for a confidence level (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    return statistics.NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be between 0 and n={n}")
    z = z_for(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: no rounding past the observed rate
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def runs_needed(confidence: float, min_rate: float) -> int:
    """Clean runs needed so that (1 - min_rate) ** n <= 1 - confidence (1 when min_rate >= 1)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    if not 0.0 < min_rate <= 1.0:
        raise ValueError(f"min_rate must be in (0, 1], got {min_rate}")
    if min_rate >= 1.0:
        return 1
    n = 1
    miss = 1.0 - min_rate
    while miss**n > (1.0 - confidence) + 1e-12:
        n += 1
    return n


def confidence_after(clean_runs: int, min_rate: float) -> float:
    """How sure `clean_runs` clean runs make us that the hang rate is below `min_rate`."""
    if min_rate >= 1.0:
        return 1.0 if clean_runs >= 1 else 0.0
    return 1.0 - (1.0 - min_rate) ** clean_runs


@dataclass(frozen=True)
class StepPolicy:
    """How many runs one step gets (see the module docstring)."""

    confidence: float = 0.95
    min_rate: float = 0.3
    max_runs: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ScenarioError(f"--confidence {self.confidence}: give a number between 0 and 1, e.g. 0.95")
        if not 0.0 < self.min_rate <= 1.0:
            raise ScenarioError(
                f"--min-rate {self.min_rate}: give the lowest hang rate to rule out, in (0, 1]; "
                "1 means the hang is deterministic"
            )
        if self.max_runs < 1:
            raise ScenarioError(f"--max-runs {self.max_runs}: give at least 1")
        need = runs_needed(self.confidence, self.min_rate)
        if need > self.max_runs:
            got = confidence_after(self.max_runs, self.min_rate)
            raise ScenarioError(
                f"--confidence {self.confidence:g} against a hang rate of {self.min_rate:.0%} needs {need} clean "
                f"runs per good step, more than --max-runs {self.max_runs}; raise --max-runs to {need}, or "
                f"accept --confidence {math.floor(got * 100) / 100:g} ({self.max_runs} clean runs)"
            )

    @property
    def clean_needed(self) -> int:
        return runs_needed(self.confidence, self.min_rate)

    def describe(self) -> str:
        n = self.clean_needed
        if self.min_rate >= 1.0:
            return "one run per step (the hang is taken as deterministic): bad if it reproduces, good if clean"
        return (
            f"bad at the first run that reproduces; good after {n} clean runs in a row "
            f"(a hang seen in {self.min_rate:.0%} of runs or more would show up with probability "
            f"{confidence_after(n, self.min_rate):.1%}); skip when a run crashes"
        )


# ---- runs and their judgement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What one `vdiag run` said, kept for logs."""

    exit_code: int
    verdict: str  # the watchdog class: spin-deadlock, clean, crash, ...
    headline: str
    report_md: str
    seconds: float
    corrupt: bool = False
    started: bool = True  # some worker reached the replay (said hello); False: torchrun itself failed
    all_done: bool = False  # every rank logged the end of its start-up

    @property
    def hang(self) -> bool:
        return self.verdict in HANG_CLASSES

    @property
    def reproduced(self) -> bool:
        return self.exit_code == ExitCode.REPRODUCED

    @property
    def crashed(self) -> bool:
        return self.exit_code == ExitCode.CRASH

    def short(self) -> str:
        if self.reproduced:
            return "hang" if self.hang else "wrong results"
        return "crash" if self.crashed else "clean"


def record_of(outcome: RunOutcome, seconds: float) -> RunRecord:
    v = outcome.report.analysis.verdict
    return RunRecord(
        exit_code=int(outcome.exit_code), verdict=v.cls, headline=v.headline,
        report_md=str(outcome.run_dir.report_md), seconds=round(seconds, 2),
        corrupt=bool(outcome.report.analysis.corruption),
        started=any(r.pid is not None for r in outcome.report.ranks),
        all_done=len(outcome.report.watchdog.finished_ranks) >= outcome.report.world_size > 0,
    )


START_RETRIES = 2


def unjudgeable(rec: RunRecord) -> str:
    """Why a run says nothing about the code under test ("" when it does)."""
    if rec.crashed and not rec.started:
        return "no worker started (torchrun itself failed)"
    if rec.hang and rec.all_done:
        return "reported a hang although every rank had finished its start-up (slow process exit)"
    return ""


def rerun_unjudgeable(run_once: Callable[[], RunRecord], retries: int = START_RETRIES,
                    on_retry: Callable[[RunRecord], None] | None = None) -> Callable[[], RunRecord]:
    """Run again when a run says nothing about the code under test (see `unjudgeable`).

    - No worker started at all (torchrun's rendezvous failed, a port was taken...): the hook runs only
      after a worker starts, so this is never the code's fault and must not become a skip. If it
      persists it is an environment error (exit 3).
    - The watchdog called a hang after every rank had logged the end of its start-up (the processes
      were slow to exit on a loaded machine): the start-up did not hang, so the run is not evidence
      of one. If it persists the run is returned as it is.
    """

    def once() -> RunRecord:
        for _ in range(retries):
            rec = run_once()
            if not unjudgeable(rec):
                return rec
            if on_retry is not None:
                on_retry(rec)
        rec = run_once()
        if rec.crashed and not rec.started:
            raise EnvironmentProblem(
                f"torchrun did not start any worker in {retries + 1} tries ({rec.headline}); see "
                f"{Path(rec.report_md).parent / 'logs' / 'torchrun.log'}"
            )
        return rec

    return once


@dataclass
class Judgement:
    verdict: Verdict
    runs: list[RunRecord] = field(default_factory=list)
    reason: str = ""

    @property
    def seconds(self) -> float:
        return round(sum(r.seconds for r in self.runs), 2)

    def runs_text(self) -> str:
        if not self.runs:
            return "no run"
        return ", ".join(r.short() for r in self.runs)


def judge(run_once: Callable[[], RunRecord], policy: StepPolicy,
          on_run: Callable[[int, RunRecord], None] | None = None) -> Judgement:
    """Run a step until its verdict is certain enough under `policy` (see the module docstring)."""
    j = Judgement(verdict="good")
    need = policy.clean_needed
    while True:
        rec = run_once()
        j.runs.append(rec)
        if on_run is not None:
            on_run(len(j.runs), rec)
        if rec.reproduced:
            j.verdict = "bad"
            j.reason = f"{rec.short()} in run {len(j.runs)}: {rec.headline}"
            return j
        if rec.crashed or rec.exit_code != ExitCode.CLEAN:
            j.verdict = "skip"
            j.reason = f"run {len(j.runs)} could not be judged (exit {rec.exit_code}): {rec.headline}"
            return j
        if len(j.runs) >= need:
            j.reason = f"{len(j.runs)} clean runs" if need > 1 else "clean"
            return j


# ---- vdiag run --repeat N -------------------------------------------------------------------------------------


@dataclass
class RepeatSummary:
    scenario: str
    runs: list[RunRecord]
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def hangs(self) -> int:
        return sum(1 for r in self.runs if r.hang)

    @property
    def failures(self) -> int:
        return sum(1 for r in self.runs if r.reproduced)

    @property
    def crashes(self) -> int:
        return sum(1 for r in self.runs if r.crashed)

    def hang_interval(self) -> tuple[float, float]:
        return wilson_interval(self.hangs, self.n, self.confidence)

    @property
    def exit_code(self) -> int:
        if self.failures:
            return int(ExitCode.REPRODUCED)
        if self.crashes:
            return int(ExitCode.CRASH)
        return int(ExitCode.CLEAN)

    def headline(self) -> str:
        lo, hi = self.hang_interval()
        rate = self.hangs / self.n if self.n else 0.0
        text = (
            f"hang in {self.hangs} of {self.n} runs: rate {rate:.0%}, "
            f"{self.confidence:.0%} interval {lo:.0%}-{hi:.0%} (Wilson score)"
        )
        wrong = self.failures - self.hangs
        if wrong:
            text += f"; wrong results without a hang in {wrong}"
        if self.crashes:
            text += f"; {self.crashes} crashed"
        return text

    def lines(self) -> list[str]:
        out = [f"{i}. {r.short():<13} {r.seconds:6.1f} s  {r.report_md}" for i, r in enumerate(self.runs, 1)]
        out.append(self.headline())
        return out


def run_repeated(path: str | Path, opts: RunOptions, n: int, console: Console | None = None,
                 on_run: Callable[[int, RunRecord], None] | None = None,
                 confidence: float = 0.95) -> RepeatSummary:
    """Run a scenario n times (each with its own report) and count the hangs."""
    from repro.run import run_scenario

    if n < 1:
        raise ScenarioError(f"--repeat {n}: give at least 1")
    runs: list[RunRecord] = []
    name = str(path)
    for i in range(1, n + 1):
        t0 = time.monotonic()
        outcome = run_scenario(path, opts, console)
        rec = record_of(outcome, time.monotonic() - t0)
        name = outcome.report.scenario_name
        runs.append(rec)
        if on_run is not None:
            on_run(i, rec)
    return RepeatSummary(scenario=name, runs=runs, confidence=confidence)
