"""`vdiag minimize`: shrink a scenario that hangs to the smallest one that still hangs.

The elements are the scenario's ranks (PP stages, then the TP size), its decoder layers, its capture
sizes and its injected faults. The search repeats these reducers until a whole pass changes nothing:

- ranks: try every smaller PP (smallest first), then every smaller allowed TP; faults keep their
  (PP stage, TP rank) place, and a layout where a fault's rank would not exist is not tried;
- layers: try 1, else binary-search the fewest layers that still hang;
- capture sizes (`default` is expanded to vLLM's list) and faults: delta debugging (ddmin) over the list,
  faults trying the empty list first (a hang may need no fault at all).

A candidate "still hangs" when a run of it ends in the same family as the original: a hang class of the
watchdog (spin-deadlock, all-spinning, host-wait, timeout), or wrong results for a scenario whose original
run gave wrong results without hanging. Each distinct candidate runs at most once per try (`--tries N`:
up to N runs, kept at the first that reproduces, for flaky hangs): a candidate wrongly judged clean only
leaves the result bigger, never wrong, so the result always hangs.

At the end of a pass that changes nothing, every single removal (one fault, one capture size, one layer,
one PP stage, the next smaller TP) has been tried on the final scenario and lost the hang: the result is
1-minimal. `single_removals` gives those candidates, so a test can check it independently.
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from repro.bisect.common import make_log_dir, preflight
from repro.errors import ScenarioError
from repro.repeat import RunRecord, record_of, rerun_unjudgeable
from repro.scenario import Scenario, apply_overrides, vllm_default_capture_sizes

Data = dict[str, Any]
Family = Literal["hang", "corruption"]
Progress = Callable[[str], None]

TP_SIZES = (1, 2, 4, 8, 16)


@dataclass
class MinimizeOptions:
    overrides: list[str] = field(default_factory=list)
    reports_dir: Path = Path("reports")
    out: Path | None = None
    tries: int = 1
    max_runs: int = 100
    gpu_state: str = "auto"


@dataclass
class Attempt:
    change: str
    kept: bool
    runs: list[RunRecord]


@dataclass
class MinimizeResult:
    scenario: str
    family: Family
    minimal: Data
    out_path: Path
    log_dir: Path
    attempts: list[Attempt]
    baseline: RunRecord
    seconds: float
    stopped: str  # "" (a fixpoint: 1-minimal), "budget" (--max-runs) or "interrupted" (Ctrl-C)
    final: RunRecord  # a run of the minimal scenario that reproduced
    runs: int  # the original's run included

    def shape(self) -> str:
        sc = Scenario.model_validate(self.minimal)
        sizes = sc.capture.ordered()
        faults = ", ".join(f"{f.kind} on rank {','.join(map(str, f.ranks))}" for f in sc.faults) or "none"
        return (f"{sc.model.num_layers} layer{'s' if sc.model.num_layers != 1 else ''}, "
                f"{len(sizes)} capture size{'s' if len(sizes) != 1 else ''} ({', '.join(map(str, sizes[:8]))}"
                f"{', ...' if len(sizes) > 8 else ''}), {sc.world_size} ranks (TP {sc.parallel.tp} x PP "
                f"{sc.parallel.pp}), faults: {faults}")


class _Budget(Exception):
    pass


# ---- the elements ------------------------------------------------------------------------------------------


def _valid(data: Data) -> Scenario | None:
    try:
        return Scenario.model_validate(data)
    except ValidationError:
        return None


def normalize(data: Data) -> Data:
    """A copy with `model` as a mapping and `capture.sizes` / `parallel` spelled out."""
    d = copy.deepcopy(data)
    sc = Scenario.model_validate(d)
    if isinstance(d.get("model"), str):
        d["model"] = {"preset": d["model"]}
    d["model"]["num_layers"] = sc.model.num_layers
    cap = d.setdefault("capture", {})
    if cap.get("sizes", "default") == "default":
        cap["sizes"] = vllm_default_capture_sizes(sc.capture.max_num_seqs)
    par = d.setdefault("parallel", {})
    par["tp"], par["pp"] = sc.parallel.tp, sc.parallel.pp
    d.setdefault("faults", [])
    return d


def _relayout(data: Data, tp: int, pp: int) -> Data | None:
    """The scenario on TP x PP ranks, faults kept at their (stage, TP rank); None if one cannot be."""
    old_tp = data["parallel"]["tp"]
    d = copy.deepcopy(data)
    d["parallel"]["tp"], d["parallel"]["pp"] = tp, pp
    for f in d["faults"]:
        key = "ranks" if "ranks" in f else "rank"
        ranks = f[key] if isinstance(f[key], list) else [f[key]]
        new = []
        for r in ranks:
            stage, tpr = divmod(int(r), old_tp)
            if stage >= pp or tpr >= tp:
                return None
            new.append(stage * tp + tpr)
        f[key] = new if isinstance(f[key], list) else new[0]
    return d if _valid(d) is not None else None


def rank_candidates(data: Data) -> list[tuple[str, Data]]:
    tp, pp = data["parallel"]["tp"], data["parallel"]["pp"]
    out = []
    for p in range(1, pp):
        d = _relayout(data, tp, p)
        if d is not None:
            out.append((f"PP {pp} -> {p}", d))
    for t in (t for t in TP_SIZES if t < tp):
        d = _relayout(data, t, pp)
        if d is not None:
            out.append((f"TP {tp} -> {t}", d))
    return out


def _with_layers(data: Data, n: int) -> Data:
    d = copy.deepcopy(data)
    d["model"]["num_layers"] = n
    return d


def _with_sizes(data: Data, sizes: list[int]) -> Data:
    d = copy.deepcopy(data)
    d["capture"]["sizes"] = list(sizes)
    return d


def _with_faults(data: Data, faults: list[Any]) -> Data:
    d = copy.deepcopy(data)
    d["faults"] = copy.deepcopy(faults)
    return d


def _fault_text(f: dict[str, Any]) -> str:
    ranks = f.get("ranks", f.get("rank"))
    return f"{f.get('kind')} on rank {ranks}"


def single_removals(data: Data) -> list[tuple[str, Data]]:
    """Every valid scenario with one element less: one fault, one capture size, one layer, one PP stage,
    or the next smaller TP size. A 1-minimal scenario hangs and none of these does."""
    d = normalize(data)
    out: list[tuple[str, Data]] = []
    for i, f in enumerate(d["faults"]):
        out.append((f"drop fault {_fault_text(f)}", _with_faults(d, d["faults"][:i] + d["faults"][i + 1:])))
    sizes = d["capture"]["sizes"]
    if len(sizes) > 1:
        for i, s in enumerate(sizes):
            out.append((f"drop capture size {s}", _with_sizes(d, sizes[:i] + sizes[i + 1:])))
    n = d["model"]["num_layers"]
    if n > 1:
        out.append((f"layers {n} -> {n - 1}", _with_layers(d, n - 1)))
    tp, pp = d["parallel"]["tp"], d["parallel"]["pp"]
    if pp > 1 and (c := _relayout(d, tp, pp - 1)) is not None:
        out.append((f"PP {pp} -> {pp - 1}", c))
    smaller = [t for t in TP_SIZES if t < tp]
    if smaller and (c := _relayout(d, smaller[-1], pp)) is not None:
        out.append((f"TP {tp} -> {smaller[-1]}", c))
    return [(what, c) for what, c in out if _valid(c) is not None]


def ddmin(items: list[Any], test: Callable[[list[Any]], bool], allow_empty: bool) -> list[Any]:
    """Zeller's delta debugging: a 1-minimal sub-list of `items` for which `test` holds."""
    if not items:
        return items
    if allow_empty and test([]):
        return []
    n = 2
    while len(items) >= 2:
        n = min(n, len(items))
        size, extra = divmod(len(items), n)
        chunks, start = [], 0
        for i in range(n):
            end = start + size + (1 if i < extra else 0)
            chunks.append(items[start:end])
            start = end
        reduced = False
        for c in chunks:
            if test(c):
                items, n, reduced = c, 2, True
                break
        if not reduced and n > 2:
            for i in range(n):
                comp = [x for j, ch in enumerate(chunks) if j != i for x in ch]
                if test(comp):
                    items, n, reduced = comp, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(items):
                break
            n = min(2 * n, len(items))
    return items


# ---- the search --------------------------------------------------------------------------------------------


class _Search:
    def __init__(self, family: Family, opts: MinimizeOptions, log_dir: Path, progress: Progress) -> None:
        self.family = family
        self.opts = opts
        self.log_dir = log_dir
        self.progress = progress
        self.cache: dict[str, bool] = {}
        self.kept: dict[str, RunRecord] = {}  # a reproducing run of each kept candidate
        self.attempts: list[Attempt] = []
        self.runs = 1  # the baseline

    def reproduces(self, rec: RunRecord) -> bool:
        if self.family == "hang":
            return rec.hang
        return rec.corrupt and not rec.hang

    def test(self, data: Data, change: str) -> bool:
        key = json.dumps(data, sort_keys=True)
        if key in self.cache:
            return self.cache[key]
        if _valid(data) is None:
            self.cache[key] = False
            return False
        from rich.console import Console

        from repro.run import RunOptions, run_scenario

        runs: list[RunRecord] = []
        kept = False
        for _ in range(self.opts.tries):
            if self.runs >= self.opts.max_runs:
                raise _Budget
            self.runs += 1
            path = self.log_dir / "candidates" / f"{self.runs:03d}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {change}\n" + yaml.safe_dump(data, sort_keys=False))
            ro = RunOptions(reports_dir=self.log_dir / "runs", live=False, quiet=True, gpu_state=self.opts.gpu_state)

            def once(path: Path = path, ro: RunOptions = ro) -> RunRecord:
                t0 = time.monotonic()
                return record_of(run_scenario(path, ro, Console(file=io.StringIO())), time.monotonic() - t0)

            rec = rerun_unjudgeable(once)()
            runs.append(rec)
            if self.reproduces(rec):
                kept = True
                break
        self.cache[key] = kept
        if kept:
            self.kept[key] = runs[-1]
        self.attempts.append(Attempt(change=change, kept=kept, runs=runs))
        self.progress(f"run {self.runs}: {change}: {'still ' + self.family + 's' if kept else 'lost the ' + self.family}"
                      f" ({runs[-1].verdict}, {runs[-1].seconds:.1f} s)")
        return kept

    # reducers: each returns the reduced scenario (or the same one)
    def ranks(self, d: Data) -> Data:
        for what, c in rank_candidates(d):
            if self.test(c, what):
                return c
        return d

    def layers(self, d: Data) -> Data:
        n = d["model"]["num_layers"]
        if n <= 1:
            return d
        if self.test(_with_layers(d, 1), f"layers {n} -> 1"):
            return _with_layers(d, 1)
        lo, hi = 1, n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.test(_with_layers(d, mid), f"layers {hi} -> {mid}"):
                hi = mid
            else:
                lo = mid
        return _with_layers(d, hi)

    def sizes(self, d: Data) -> Data:
        def t(sizes: list[Any]) -> bool:
            return bool(sizes) and self.test(_with_sizes(d, sizes), f"capture sizes -> {sizes}")

        return _with_sizes(d, ddmin(list(d["capture"]["sizes"]), t, allow_empty=False))

    def faults(self, d: Data) -> Data:
        def t(faults: list[Any]) -> bool:
            what = ", ".join(_fault_text(f) for f in faults) or "none"
            return self.test(_with_faults(d, faults), f"faults -> {what}")

        return _with_faults(d, ddmin(list(d["faults"]), t, allow_empty=True))


def _family(rec: RunRecord) -> Family | None:
    if rec.hang:
        return "hang"
    if rec.corrupt:
        return "corruption"
    return None


def minimize(scenario: Path, opts: MinimizeOptions, progress: Progress = lambda _m: None) -> MinimizeResult:
    """Shrink `scenario` while it still hangs; write the smallest one found (see the module docstring)."""
    from rich.console import Console

    from repro.run import RunOptions, run_scenario

    t_start = time.monotonic()
    if opts.tries < 1:
        raise ScenarioError(f"--tries {opts.tries}: give at least 1")
    if opts.max_runs < 2:
        raise ScenarioError(f"--max-runs {opts.max_runs}: give at least 2 (the original and one candidate)")
    name = preflight(scenario, opts.overrides)
    raw = yaml.safe_load(scenario.read_text())
    data = normalize(apply_overrides(raw, opts.overrides) if opts.overrides else raw)
    data.pop("expect", None)
    log_dir = make_log_dir(opts.reports_dir, name, "minimize")
    progress(f"minimizing {scenario}; runs and candidates in {log_dir}")
    base_path = log_dir / "candidates" / "001.yaml"
    base_path.parent.mkdir(parents=True, exist_ok=True)
    base_path.write_text("# the original\n" + yaml.safe_dump(data, sort_keys=False))
    ro = RunOptions(reports_dir=log_dir / "runs", live=False, quiet=True, gpu_state=opts.gpu_state)

    def original() -> RunRecord:
        t0 = time.monotonic()
        return record_of(run_scenario(base_path, ro, Console(file=io.StringIO())), time.monotonic() - t0)

    baseline = rerun_unjudgeable(original)()
    fam = _family(baseline)
    if fam is None:
        raise ScenarioError(
            f"{scenario}: the original scenario does not hang ({baseline.verdict}: {baseline.headline}; "
            f"{baseline.report_md}); minimize needs a scenario that reproduces"
        )
    progress(f"run 1: the original: {baseline.verdict} ({baseline.seconds:.1f} s)")
    s = _Search(fam, opts, log_dir, progress)
    s.cache[json.dumps(data, sort_keys=True)] = True
    cur = data
    stopped = ""
    try:
        while True:
            before = json.dumps(cur, sort_keys=True)
            for reducer in (s.ranks, s.layers, s.sizes, s.faults):
                cur = reducer(cur)
            if json.dumps(cur, sort_keys=True) == before:
                break
    except _Budget:
        stopped = "budget"
        progress(f"stopped at --max-runs {opts.max_runs}: the result is smaller but not proven minimal")
    except KeyboardInterrupt:
        stopped = "interrupted"
        progress("interrupted: writing the smallest scenario found so far")
    out = opts.out or log_dir / f"{name}-min.yaml"
    minimal = copy.deepcopy(cur)
    minimal["name"] = f"{name}-min"
    minimal["expect"] = fam
    res = MinimizeResult(scenario=str(scenario), family=fam, minimal=minimal, out_path=out, log_dir=log_dir,
                         attempts=s.attempts, baseline=baseline, seconds=round(time.monotonic() - t_start, 1),
                         stopped=stopped, final=s.kept.get(json.dumps(cur, sort_keys=True), baseline), runs=s.runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_yaml(res))
    (log_dir / "minimize.md").write_text(render_log(res))
    if stopped == "interrupted":
        raise KeyboardInterrupt
    return res


def render_yaml(res: MinimizeResult) -> str:
    proof = {"": "removing any one fault, capture size, layer or rank loses it",
             "budget": "the search stopped at its run budget, so a smaller one may exist",
             "interrupted": "the search was interrupted, so a smaller one may exist"}[res.stopped]
    head = [
        f"# Minimal reproducer found by `vdiag minimize` from {res.scenario} in {res.runs} runs "
        f"({res.seconds:.0f} s).",
        f"# It still {'hangs' if res.family == 'hang' else 'gives wrong results'}: {res.final.headline}",
        f"# {proof[0].upper() + proof[1:]}.",
        f"# Shape: {res.shape()}.",
        "# Reproduce: vdiag run THIS_FILE",
    ]
    return "\n".join(head) + "\n" + yaml.safe_dump(res.minimal, sort_keys=False, default_flow_style=None)


def render_log(res: MinimizeResult) -> str:
    lines = [
        f"# vdiag minimize: {Path(res.scenario).stem}", "",
        f"**{res.runs} runs, {res.seconds:.0f} s: {res.shape()}**", "",
        f"- minimal scenario: `{res.out_path}`",
        f"- original: {res.baseline.verdict} ([report]({os.path.relpath(res.baseline.report_md, res.log_dir)}))",
    ]
    if res.stopped:
        lines.append(f"- stopped ({'--max-runs reached' if res.stopped == 'budget' else 'Ctrl-C'}): "
                     "not proven 1-minimal")
    lines += ["", "| # | change | result | verdict | time | report |", "|---|---|---|---|---|---|"]
    for i, a in enumerate(res.attempts, 2):
        r = a.runs[-1]
        link = f"[report]({os.path.relpath(r.report_md, res.log_dir)})"
        lines.append(f"| {i} | {a.change} | {'kept (still reproduces)' if a.kept else 'rejected'} | {r.verdict} | "
                     f"{sum(x.seconds for x in a.runs):.1f} s | {link} |")
    return "\n".join(lines) + "\n"
