"""One step of a search: the --setup command, then `vdiag run` until `repro.repeat.judge` has a verdict."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from repro.bisect.bayes import BayesSearch, FlakeModel
from repro.bisect.common import (
    BisectError,
    BisectOptions,
    BisectResult,
    Progress,
    Step,
    run_setup,
    sigterm_as_interrupt,
    worker_env,
)
from repro.bisect.log import write_log
from repro.bisect.vllm_source import HOOK_NAME, Platform, derive, override_args
from repro.errors import VdiagError
from repro.repeat import Judgement, RunRecord, StepPolicy, judge, record_of, rerun_unjudgeable, unjudgeable


class Stepper:
    """Runs the scenario for one step and judges it; shared by the git and pip searches."""

    def __init__(self, scenario: Path, opts: BisectOptions, res: BisectResult, progress: Progress) -> None:
        self.scenario = scenario
        self.opts = opts
        self.res = res
        self.progress = progress
        self.t0 = time.monotonic()
        from repro.scenario import load_scenario

        sc = load_scenario(scenario, opts.overrides)
        self.source_hook = sc.hook == HOOK_NAME
        self.tp, self.pp = sc.parallel.tp, sc.parallel.pp

    def judge(self, role: Literal["good end", "bad end", "step"], rev: str, label: str,
              code_dirs: list[Path], setup_cwd: Path, setup_env: dict[str, str],
              policy: StepPolicy | None = None, source: Path | None = None, setup: bool = True) -> Step:
        """Judge one step; `policy` replaces the options' rule, `source` is the checkout `hook: vllm-source`
        reads, `setup=False` skips --setup (the checkout is the one it last ran in)."""
        tag = f"[{role}]" if role != "step" else f"[step {sum(1 for s in self.res.steps if s.role == 'step') + 1}]"
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.progress(f"{tag} {label}")
        t0 = time.monotonic()
        setup_log: str | None = None
        if self.opts.setup and setup:
            log = self.res.log_dir / "setup" / f"{len(self.res.steps):02d}-{re.sub(r'[^A-Za-z0-9_.-]', '-', rev)[:40]}.log"
            ok, why = run_setup(self.opts.setup, setup_cwd, setup_env, self.opts.setup_timeout, log)
            setup_log = str(log)
            if not ok:
                st = Step(role=role, rev=rev, label=label, verdict="skip", reason=why,
                          seconds=round(time.monotonic() - t0, 1), setup_log=setup_log, started=started)
                self.progress(f"{tag} -> skip ({why})")
                return self._done(st)
        env = worker_env(code_dirs)
        overrides = list(self.opts.overrides)
        reads: list[str] = []
        if self.source_hook:
            if source is None:
                raise BisectError(f"hook: {HOOK_NAME} reads a vLLM checkout: use it with `vdiag bisect --repo`")
            settings = derive(source, self.tp, self.pp, Platform(self.opts.platform_sm))
            reads = [r.line() for r in settings.reads] + [f"note: {n}" for n in settings.notes]
            for line in reads:
                self.progress(f"{tag}   read {line}")
            if settings.skip:
                st = Step(role=role, rev=rev, label=label, verdict="skip", reason=settings.skip,
                          seconds=round(time.monotonic() - t0, 1), setup_log=setup_log, started=started, reads=reads)
                self.progress(f"{tag} -> skip ({settings.skip})")
                return self._done(st)
            overrides += override_args(settings)
            self.progress(f"{tag}   replay with {settings.summary()}")

        def once() -> RunRecord:
            from rich.console import Console

            from repro.run import RunOptions, run_scenario

            ro = RunOptions(overrides=overrides, reports_dir=self.res.log_dir / "runs", live=False,
                            quiet=True, gpu_state=self.opts.gpu_state, extra_env=env)
            t = time.monotonic()
            outcome = run_scenario(self.scenario, ro, Console(file=io.StringIO()))
            return record_of(outcome, time.monotonic() - t)

        def on_run(i: int, rec: RunRecord) -> None:
            self.progress(f"{tag}   run {i}: {rec.short()} ({rec.verdict}, {rec.seconds:.1f} s)")

        def on_retry(rec: RunRecord) -> None:
            self.progress(f"{tag}   run not judged: {unjudgeable(rec)} ({rec.report_md}); running again")

        j: Judgement = judge(rerun_unjudgeable(once, on_retry=on_retry), policy or self.opts.policy, on_run)
        st = Step(role=role, rev=rev, label=label, verdict=j.verdict, reason=j.reason, runs=j.runs,
                  seconds=round(time.monotonic() - t0, 1), setup_log=setup_log, started=started, reads=reads)
        self.progress(f"{tag} -> {j.verdict} ({j.reason})")
        return self._done(st)

    def _done(self, st: Step) -> Step:
        self.res.steps.append(st)
        self.res.seconds = round(time.monotonic() - self.t0, 1)
        write_log(self.res)
        return st


def check_ends(good: Step, bad: Step | None, what: str) -> None:
    """Both ends must behave, or the bisect would label the wrong commit."""
    if good.verdict == "bad":
        raise BisectError(
            f"--good {good.label} reproduces the failure ({good.reason}; {good.runs[-1].report_md}): "
            f"--good and --bad look the wrong way round, or the hang is older than --good; give a {what} "
            "whose start-up is clean as --good"
        )
    if good.verdict == "skip":
        raise BisectError(f"--good {good.label} cannot be judged ({good.reason}); give a {what} that runs as --good")
    if bad is None:
        return
    if bad.verdict == "good":
        raise BisectError(
            f"--bad {bad.label} does not reproduce the failure ({bad.reason}; {bad.runs[-1].report_md}): "
            f"--good and --bad look the wrong way round, or the scenario does not reach the hang; give a {what} "
            "that hangs as --bad"
        )
    if bad.verdict == "skip":
        raise BisectError(f"--bad {bad.label} cannot be judged ({bad.reason}); give a {what} that runs as --bad")


def finish(res: BisectResult, fn: Callable[[], None], t0: float) -> BisectResult:
    """Run the search; record errors and interrupts in the log before they propagate."""
    try:
        with sigterm_as_interrupt():
            fn()
    except VdiagError as e:
        res.status = "error"
        res.error = e.message
        raise
    except KeyboardInterrupt:
        res.status = "interrupted"
        raise
    finally:
        res.seconds = round(time.monotonic() - t0, 1)
        with contextlib.suppress(OSError):
            write_log(res)
    return res




def _feed(s: BayesSearch, i: int, st: Step) -> None:
    for r in st.runs:
        if not r.reproduced and r.exit_code != 0:
            continue
        try:
            s.observe(i, r.reproduced)
        except ValueError:
            m = s.model
            raise BisectError(
                f"{st.label}: a {'failing' if r.reproduced else 'clean'} run ({r.report_md}) that --repro-rate "
                f"{'(learned)' if m.repro_rate is None else f'{m.repro_rate:g}'} and --false-fail-rate "
                f"{m.false_fail_rate:g} call impossible: the hang is flakier than that; give a lower --repro-rate "
                "(or leave it out to learn it) and a --false-fail-rate above 0"
            ) from None


def bayes_search(res: BisectResult, labels: list[str], ends: tuple[Step, Step],
                 judge_at: Callable[[int], Step], opts: BisectOptions, progress: Progress) -> tuple[int | None, list[int]]:
    """The flake-aware search over items 0..n-1 (0 the good end, n-1 the bad end, both judged already).

    `judge_at(i)` runs item i once. Returns (the first bad item, []) when one candidate's posterior reaches
    the confidence, else (None, the candidates left). The log holds the posterior after every run.
    """
    n = len(labels)
    s = BayesSearch(n, FlakeModel(opts.repro_rate, opts.false_fail_rate))
    _feed(s, 0, ends[0])
    _feed(s, n - 1, ends[1])
    conf = opts.policy.confidence

    def show(st: Step | None) -> None:
        top = [(labels[c], round(p, 4)) for c, p in s.top()]
        if st is not None:
            st.posterior = top
        rate = "" if opts.repro_rate is not None else f"; reproduction rate ~{s.rate_mean():.2f}"
        progress("  posterior: " + ", ".join(f"{lab.split()[0]} {p:.2f}" for lab, p in top) + rate)
        write_log(res)

    show(ends[1])
    while True:
        grp, mass = s.best()
        if mass >= conf:
            if len(grp) == 1:
                res.notes.append(f"posterior of the first bad item: {mass:.3f} (confidence {conf:g})"
                                 + ("" if opts.repro_rate is not None
                                    else f"; reproduction rate learned: ~{s.rate_mean():.2f}"))
                return grp[0], []
            res.notes.append(f"skipped items leave {len(grp)} candidates with posterior {mass:.3f} together")
            return None, grp
        if res.runs >= opts.max_total_runs:
            res.notes.append(f"run budget ({opts.max_total_runs}, --max-total-runs) spent before a candidate "
                             f"reached {conf:g}; best: {labels[grp[0]]} at {mass:.3f}")
            break
        i = s.next_item()
        if i is None:
            res.notes.append(f"no run can tell the candidates apart any more (skipped items); best: "
                             f"{labels[grp[0]]} at {mass:.3f}")
            break
        st = judge_at(i)
        if st.verdict == "skip":
            s.skip(i)
        else:
            _feed(s, i, st)
        show(st)
    post = s.posterior()
    cands = [c for c in range(1, n) if post[c] >= 0.01] or [grp[0]]
    return None, sorted(cands, key=lambda c: -post[c])
