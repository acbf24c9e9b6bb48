"""The flake-aware search's arithmetic (repro.bisect.bayes), on simulated runs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from repro.bisect.bayes import BayesSearch, FlakeModel


def _search(n: int, culprit: int, rate: float, model: FlakeModel, seed: int, conf: float = 0.95,
            skip: tuple[int, ...] = ()) -> tuple[list[int], int]:
    rng = random.Random(seed)
    s = BayesSearch(n, model)
    runs = 0
    while True:
        grp, mass = s.best()
        if mass >= conf or runs > 200:
            return grp, runs
        i = s.next_item()
        if i is None:
            return grp, runs
        runs += 1
        if i in skip:
            s.skip(i)
            continue
        s.observe(i, rng.random() < (rate if i >= culprit else model.false_fail_rate))


def test_prior_is_uniform_over_the_candidates_and_the_ends_teach_nothing() -> None:
    s = BayesSearch(9, FlakeModel(repro_rate=1.0, false_fail_rate=0.0))
    post = s.posterior()
    assert post[0] == 0.0 and np.allclose(post[1:], 1 / 8)
    g = s.gains()
    assert g[0] == 0.0 and g[-1] == 0.0
    assert int(np.argmax(g)) == 4  # candidates 1..8: a run of item 4 halves them
    assert g.max() == pytest.approx(1.0)  # one bit for a deterministic run
    # a flaky hang: a clean run says less than a failing one, so the best run is earlier than the middle
    flaky = BayesSearch(9, FlakeModel(repro_rate=None))
    assert int(np.argmax(flaky.gains())) < 4 and flaky.gains().max() < 0.5


def test_deterministic_hang_is_a_plain_binary_search() -> None:
    for culprit in range(1, 16):
        grp, runs = _search(16, culprit, 1.0, FlakeModel(repro_rate=1.0, false_fail_rate=0.0), seed=culprit,
                            conf=0.99)
        assert grp == [culprit] and runs <= 4


def test_flaky_culprit_found_at_the_confidence_with_learned_rate() -> None:
    right = 0
    for seed in range(40):
        grp, _ = _search(12, 1 + seed % 10, 0.5, FlakeModel(None, 0.01), seed)
        right += grp == [1 + seed % 10]
    assert right >= 34  # calibrated: about 95 % right at confidence 0.95


def test_a_clean_run_does_not_clear_a_commit_of_a_flaky_hang() -> None:
    s = BayesSearch(5, FlakeModel(repro_rate=0.5))
    s.observe(2, False)
    post = s.posterior()
    assert post[1] > 0.05 and post[2] > 0.05  # one clean run is weak evidence against items <= 2
    assert post[3] > post[2]


def test_skipped_item_merges_its_hypothesis_with_the_next() -> None:
    s = BayesSearch(6, FlakeModel(1.0, 0.0))
    s.skip(2)
    assert s.groups() == [[1], [2, 3], [4], [5]]
    s.observe(1, False)
    s.observe(3, True)
    grp, mass = s.best()
    assert grp == [2, 3] and mass == pytest.approx(1.0)
    assert s.next_item() is None  # nothing left to learn


def test_impossible_run_is_refused() -> None:
    s = BayesSearch(3, FlakeModel(1.0, 0.0))
    with pytest.raises(ValueError, match="impossible"):
        s.observe(0, True)


def test_a_run_the_model_calls_impossible_stops_the_bisect_with_advice(tmp_path: Path) -> None:
    from repro.bisect.common import BisectError, BisectOptions, BisectResult, Step
    from repro.bisect.judge import bayes_search
    from repro.repeat import RunRecord

    def rec(code: int) -> RunRecord:
        return RunRecord(exit_code=code, verdict="clean" if code == 0 else "all-spinning", headline="-",
                         report_md=str(tmp_path / "report.md"), seconds=0.0)

    opts = BisectOptions(search="bayes", repro_rate=1.0, false_fail_rate=0.0)
    res = BisectResult(mode="pip", target="p", scenario="s", good="0", bad="2", policy=opts.policy,
                       log_dir=tmp_path / "log")
    good = Step(role="good end", rev="0", label="p 0", verdict="good", reason="", runs=[rec(0)])
    bad = Step(role="bad end", rev="2", label="p 2", verdict="bad", reason="", runs=[rec(0), rec(1)])
    with pytest.raises(BisectError, match=r"^p 2: a clean run .* call impossible: the hang is flakier than that"):
        bayes_search(res, ["p 0", "p 1", "p 2"], (good, bad), lambda i: good, opts, lambda _m: None)
