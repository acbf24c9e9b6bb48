"""The arithmetic behind `vdiag run --repeat` and the bisect step rule (repro/repeat.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from repro.errors import EnvironmentProblem, ScenarioError
from repro.repeat import (
    RepeatSummary,
    RunRecord,
    StepPolicy,
    confidence_after,
    judge,
    rerun_unjudgeable,
    runs_needed,
    wilson_interval,
    z_for,
)


def _rec(code: int, verdict: str = "") -> RunRecord:
    verdict = verdict or {0: "clean", 1: "spin-deadlock", 4: "crash"}[code]
    return RunRecord(exit_code=code, verdict=verdict, headline=verdict, report_md=f"/r/{verdict}/report.md",
                     seconds=1.0)


def test_z_for_the_usual_confidences() -> None:
    assert z_for(0.95) == pytest.approx(1.959964, abs=1e-5)
    assert z_for(0.99) == pytest.approx(2.575829, abs=1e-5)
    assert z_for(0.90) == pytest.approx(1.644854, abs=1e-5)


@pytest.mark.parametrize("k,n,lo,hi", [
    (3, 10, 0.1078, 0.6032),   # the textbook example
    (0, 10, 0.0, 0.2775),      # no hang seen: the interval still admits a rate up to 28 %
    (10, 10, 0.7225, 1.0),
    (1, 2, 0.0945, 0.9055),
    (30, 100, 0.2189, 0.3958),
])
def test_wilson_interval_matches_reference_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n, 0.95)
    assert got[0] == pytest.approx(lo, abs=5e-4)
    assert got[1] == pytest.approx(hi, abs=5e-4)


def test_wilson_interval_contains_the_rate_and_stays_in_bounds() -> None:
    for n in (1, 2, 5, 17, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n, 0.95)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            lo99, hi99 = wilson_interval(k, n, 0.99)
            assert lo99 <= lo and hi <= hi99  # more confidence, wider interval
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@pytest.mark.parametrize("confidence,min_rate,n", [
    (0.95, 0.3, 9),   # 0.7**8 = 0.058 > 0.05 >= 0.7**9 = 0.040
    (0.75, 0.5, 2),
    (0.70, 0.5, 2),
    (0.5, 0.5, 1),
    (0.99, 0.1, 44),
    (0.95, 1.0, 1),   # deterministic
])
def test_runs_needed(confidence: float, min_rate: float, n: int) -> None:
    assert runs_needed(confidence, min_rate) == n
    assert confidence_after(n, min_rate) >= confidence - 1e-12
    if n > 1:
        assert confidence_after(n - 1, min_rate) < confidence


def test_policy_refuses_a_rule_that_max_runs_cannot_meet() -> None:
    with pytest.raises(ScenarioError, match=r"needs 9 clean runs per good step, more than --max-runs 5; raise "
                                            r"--max-runs to 9, or accept --confidence 0.83"):
        StepPolicy(confidence=0.95, min_rate=0.3, max_runs=5)
    with pytest.raises(ScenarioError, match=r"--confidence 1\.5"):
        StepPolicy(confidence=1.5)
    with pytest.raises(ScenarioError, match="--min-rate 0"):
        StepPolicy(min_rate=0)
    assert StepPolicy().clean_needed == 9
    assert "good after 9 clean runs" in StepPolicy().describe()
    assert "deterministic" in StepPolicy(min_rate=1).describe()


def test_judge_bad_at_first_hang_good_only_after_enough_clean_runs() -> None:
    policy = StepPolicy(confidence=0.75, min_rate=0.5, max_runs=5)  # two clean runs

    def runs(*codes: int) -> Callable[[], RunRecord]:
        return iter(map(_rec, codes)).__next__

    j = judge(runs(0, 1), policy)
    assert j.verdict == "bad" and len(j.runs) == 2 and "run 2" in j.reason
    j = judge(runs(1), policy)
    assert j.verdict == "bad" and len(j.runs) == 1
    j = judge(runs(0, 0, 1), policy)
    assert j.verdict == "good" and len(j.runs) == 2  # the third run is never made
    j = judge(runs(4), policy)
    assert j.verdict == "skip" and "exit 4" in j.reason
    j = judge(runs(0, 4), policy)
    assert j.verdict == "skip"
    seen: list[int] = []
    judge(runs(0, 0), policy, on_run=lambda i, r: seen.append(i))
    assert seen == [1, 2]


def test_judge_labels_a_30_percent_hang_good_rarely() -> None:
    """Over every pattern of 9 runs, the default rule calls a step good only when all 9 are clean."""
    policy = StepPolicy()
    for pattern in itertools.product((0, 1), repeat=9):
        j = judge(iter(map(_rec, pattern)).__next__, policy)
        assert (j.verdict == "good") == (sum(pattern) == 0)


def test_repeat_summary_headline_and_exit_code() -> None:
    s = RepeatSummary("x", [_rec(0), _rec(1), _rec(0), _rec(0)])
    assert s.hangs == 1 and s.n == 4 and s.exit_code == 1
    assert s.headline() == "hang in 1 of 4 runs: rate 25%, 95% interval 5%-70% (Wilson score)"
    s = RepeatSummary("x", [_rec(0), _rec(4)])
    assert s.exit_code == 4 and s.headline().endswith("; 1 crashed")
    s = RepeatSummary("x", [_rec(1, "clean"), _rec(0)])  # wrong results without a hang
    assert s.hangs == 0 and s.failures == 1 and "wrong results without a hang in 1" in s.headline()
    assert len(s.lines()) == 3


def test_a_run_whose_workers_never_started_is_retried_then_an_environment_error() -> None:
    unstarted = RunRecord(exit_code=4, verdict="crash", headline="torchrun failed", report_md="/r/x/report.md",
                          seconds=1.0, started=False)
    seq = iter([unstarted, _rec(1)])
    retried: list[RunRecord] = []
    assert rerun_unjudgeable(seq.__next__, on_retry=retried.append)().hang  # the crash never reaches judge
    assert retried == [unstarted]
    seq = iter([unstarted] * 3)
    with pytest.raises(EnvironmentProblem, match=r"torchrun did not start any worker in 3 tries .*/r/x/logs"):
        rerun_unjudgeable(seq.__next__)()
    # a crash after the workers started is the code's: no retry, the step is skipped
    seq = iter([_rec(4), _rec(0)])
    assert judge(rerun_unjudgeable(seq.__next__), StepPolicy(min_rate=1)).verdict == "skip"


def test_a_hang_called_after_every_rank_finished_is_run_again() -> None:
    finished = RunRecord(exit_code=1, verdict="host-wait", headline="host-wait", report_md="/r/y/report.md",
                         seconds=1.0, all_done=True)
    seq = iter([finished, _rec(0)])
    assert rerun_unjudgeable(seq.__next__)().exit_code == 0
    seq = iter([finished] * 3)
    assert rerun_unjudgeable(seq.__next__)() == finished  # persistent: returned as it is
