"""A flake-aware bisection (`vdiag bisect --search bayes`): a posterior over which item is the first bad one.

The range is items 0..n-1 (commits oldest first, or versions), item 0 the good end and item n-1 the bad end.
The hypotheses are "item c is the first bad one", c = 1..n-1, with a uniform prior. One run of item i:

- if c <= i (i has the change) it reproduces with the reproduction rate r: a flaky hang is missed with
  probability 1 - r;
- if c > i it reproduces with the false-fail rate f: a good item that fails for an unrelated reason.

r is either given (`--repro-rate`) or learned from the runs themselves: the posterior is joint over (c, r)
with r on a grid from 0.1 to 1 (uniform prior), so the runs of the bad end and of every bad item measure it.
Each next run goes where the expected information gain about c (the entropy of c's posterior now minus
its expected entropy after the run) is largest; the search stops when one item's posterior reaches
`--confidence`. A run that cannot be judged (a crash, exit 125 semantics) marks the item skipped: it is
never run again, and "c" and "c + 1" can then no longer be told apart (only a run of item c separates
them), so their posterior is merged; when a merged group reaches the confidence the result is
inconclusive with the group's items as candidates.

This is the approach of flake-aware culprit finding (Google: Henderson et al., "Flake Aware Culprit Finding",
ICST 2023) and of BBChop (Ealdwulf Wuffinga's Bayesian bisection for intermittent bugs); the code is
written from the model above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RATE_GRID = np.round(np.linspace(0.1, 1.0, 19), 3)
MIN_GAIN = 1e-9  # bits: below this no run can tell the candidates apart any more


@dataclass(frozen=True)
class FlakeModel:
    repro_rate: float | None = None  # None: learned from the runs
    false_fail_rate: float = 0.01

    def describe(self) -> str:
        r = "learned from the runs" if self.repro_rate is None else f"{self.repro_rate:g}"
        return f"reproduction rate {r}, false-fail rate {self.false_fail_rate:g}"


def _xlogx(a: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a)
    pos = a > 0
    out[pos] = a[pos] * np.log2(a[pos])
    return out


def _entropy(w: np.ndarray) -> float:
    total = float(w.sum())
    if total <= 0:
        return 0.0
    return float(np.log2(total) - _xlogx(w).sum() / total)


@dataclass
class BayesSearch:
    n: int
    model: FlakeModel = field(default_factory=FlakeModel)
    joint: np.ndarray = field(init=False)
    rates: np.ndarray = field(init=False)
    skipped: set[int] = field(default_factory=set)
    tested: dict[int, list[bool]] = field(default_factory=dict)  # item -> outcomes (True: reproduced)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError("a search needs a good and a bad end")
        if not 0.0 <= self.model.false_fail_rate < 1.0:
            raise ValueError("the false-fail rate must be in [0, 1)")
        self.rates = (RATE_GRID if self.model.repro_rate is None
                      else np.array([float(self.model.repro_rate)]))
        self.joint = np.ones((self.n, len(self.rates)))
        self.joint[0, :] = 0.0
        self.joint /= self.joint.sum()

    # ---- beliefs -----------------------------------------------------------------------------------
    def posterior(self) -> np.ndarray:
        """P(item c is the first bad one), c = 0..n-1 (item 0, the good end, is 0)."""
        return self.joint.sum(axis=1)

    def rate_mean(self) -> float:
        return float((self.joint.sum(axis=0) * self.rates).sum())

    def groups(self) -> list[list[int]]:
        """Hypotheses that no run can tell apart: c merges with c + 1 when item c is skipped."""
        out: list[list[int]] = []
        cur: list[int] = []
        for c in range(1, self.n):
            cur.append(c)
            if c not in self.skipped:
                out.append(cur)
                cur = []
        if cur:
            out.append(cur)
        return out

    def best(self) -> tuple[list[int], float]:
        """The most likely group of candidates and its posterior mass."""
        post = self.posterior()
        g = max(self.groups(), key=lambda grp: float(post[grp].sum()))
        return g, float(post[g].sum())

    # ---- runs --------------------------------------------------------------------------------------
    def observe(self, i: int, reproduced: bool) -> None:
        c = np.arange(self.n)[:, None]
        p_fail = np.where(c <= i, self.rates[None, :], self.model.false_fail_rate)
        self.joint *= p_fail if reproduced else 1.0 - p_fail
        total = self.joint.sum()
        if total <= 0:
            raise ValueError(f"item {i}: a run that the model calls impossible (false-fail rate 0 and a "
                             "failure of an item every hypothesis calls good)")
        self.joint /= total
        self.tested.setdefault(i, []).append(reproduced)

    def skip(self, i: int) -> None:
        self.skipped.add(i)

    def gains(self) -> np.ndarray:
        """Expected information gain about c (bits) of one run of each item i (0 for the ends)."""
        m = self.posterior()
        a = (self.joint * self.rates[None, :]).sum(axis=1)  # P(c) * P(fail | c bad)
        b = self.model.false_fail_rate * m  # P(c) * P(fail | c good)
        h0 = _entropy(m)
        ca, cxa = np.cumsum(a), np.cumsum(_xlogx(a))
        cna, cxna = np.cumsum(m - a), np.cumsum(_xlogx(m - a))
        cb, cxb = np.cumsum(b), np.cumsum(_xlogx(b))
        cnb, cxnb = np.cumsum(m - b), np.cumsum(_xlogx(m - b))
        out = np.zeros(self.n)
        for i in range(1, self.n - 1):
            # the run fails: weights a for c <= i, b for c > i; it passes: m - a, m - b
            wf = ca[i] + (cb[-1] - cb[i])
            xf = cxa[i] + (cxb[-1] - cxb[i])
            wp = cna[i] + (cnb[-1] - cnb[i])
            xp = cxna[i] + (cxnb[-1] - cxnb[i])
            hf = float(np.log2(wf) - xf / wf) if wf > 0 else 0.0
            hp = float(np.log2(wp) - xp / wp) if wp > 0 else 0.0
            out[i] = h0 - (wf * hf + wp * hp)
        return out

    def next_item(self, max_runs_per_item: int | None = None) -> int | None:
        """The item whose run is expected to teach most, or None when no run can teach anything."""
        g = self.gains()
        for i in range(self.n):
            if i in self.skipped or i in (0, self.n - 1) or (
                    max_runs_per_item is not None and len(self.tested.get(i, [])) >= max_runs_per_item):
                g[i] = -1.0
        i = int(np.argmax(g))
        return i if g[i] > MIN_GAIN else None

    def top(self, k: int = 4) -> list[tuple[int, float]]:
        post = self.posterior()
        order = sorted(range(1, self.n), key=lambda c: (-post[c], c))[:k]
        return [(c, float(post[c])) for c in order]
