"""report.md: the diagnosis as a GitHub issue body.

Summary first (the verdict, a table of ranks, the hypotheses), the details after it in collapsible
`<details>` blocks. The whole document stays under GitHub's body limit: the summary is never cut; the
detail sections share what is left and, where they do not fit, end in "N more … in report.json".

Stacks are printed in py-spy's shape (`function (file:line)`, innermost first) and grouped across ranks,
so that the odd rank stands out. At many ranks, rows that say the same thing collapse into one
("ranks 4-63").

The helpers that format ranks, rank groups, pending calls and stack frames are public: the terminal
renderer uses them too.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.errors import exit_meaning
from repro.records import (
    Frame,
    Hypothesis,
    RankSummary,
    Report,
    StackSample,
    ThreadStack,
)
from repro.report.format import (
    TABLE,
    call_text,
    format_dims,
    pending_call_text,
    rank_label,
    ranks_text,
    value_text,
)

#: GitHub rejects issue bodies of 65,536 characters or more; keep a margin below it.
MARKDOWN_LIMIT = 65_000
_MARGIN = 500

#: Frames printed per thread, innermost first; the rest are counted.
MAX_FRAMES = 40
#: Threads printed for a representative stack.
MAX_THREADS = 6
#: Any single free-text string (evidence, detail, error) is clipped to this length.
MAX_TEXT = 1_500

_STATUS_ORDER = {"supported": 0, "consistent": 1, "no-evidence": 2, "refuted": 3}


# ---- small formatting helpers (shared with the terminal renderer) --------------------------------------


def table_ranks(ranks: Iterable[int]) -> str:
    """Ranks as a table cell: "1,2,3", "0,4-63"."""
    return ranks_text(ranks, run=TABLE, empty="")


def _span(values: Sequence[int]) -> str:
    """One value, or the range of several: "1234" or "1200-1234"."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def frame_text(frame: Frame, *, short: bool = False) -> str:
    """py-spy's frame line: `function (file:line)`; native frames name their library."""
    where = frame.file
    if short and where:
        where = where.replace("\\", "/").rsplit("/", 1)[-1]
    if where and frame.line is not None:
        return f"{frame.function} ({where}:{frame.line})"
    if where:
        return f"{frame.function} ({where})"
    return frame.function


def _n(count: int, word: str, plural: str = "") -> str:
    """ "1 rank", "3 ranks"."""
    return f"{count} {word if count == 1 else (plural or word + 's')}"


def _clip(text: str, limit: int = MAX_TEXT, *, strip: bool = True) -> str:
    text = text.strip() if strip else text.rstrip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _md(text: str, limit: int = MAX_TEXT) -> str:
    """Free text from the analysis, safe in Markdown: HTML-looking brackets are escaped."""
    return _clip(text, limit).replace("<", "\\<").replace(">", "\\>")


def _cell(text: str) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """An inline code span that survives backticks in the text."""
    if not text:
        return ""
    ticks = "``" if "`" in text else "`"
    pad = " " if ticks == "``" else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fence(lang: str, text: str) -> tuple[str, str]:
    """Opening and closing fence lines long enough for the text inside."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return ticks + lang, ticks


# ---- rank groups --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankGroup:
    """Ranks that look the same in the ranks table: same state, last phase, pending call, wrong or not."""

    ranks: list[int]
    state: str
    last_phase: str
    pending: str
    pp_stages: list[int]
    tp_ranks: list[int]
    calls_done: list[int]
    wrong_calls: list[int]
    outlier: bool = False


def group_ranks(ranks: Sequence[RankSummary]) -> list[RankGroup]:
    """Collapse identical rows, ordered by first rank.

    Outliers are the groups outside the commonest (state, last phase, wrong or not) class, so a spinning
    rank stands out even when every rank's pending call differs.
    """
    buckets: dict[tuple[str, str, str, bool], list[RankSummary]] = {}
    for r in sorted(ranks, key=lambda r: r.rank):
        key = (r.state or "unknown", r.last_phase, pending_call_text(r.pending), r.wrong_calls > 0)
        buckets.setdefault(key, []).append(r)
    classes: dict[tuple[str, str, bool], int] = {}
    for key, members in buckets.items():
        classes[(key[0], key[1], key[3])] = classes.get((key[0], key[1], key[3]), 0) + len(members)
    common = max(classes.items(), key=lambda kv: kv[1])[0] if classes else None
    out: list[RankGroup] = []
    for key, members in buckets.items():
        out.append(
            RankGroup(
                ranks=[m.rank for m in members],
                state=key[0],
                last_phase=key[1],
                pending=key[2],
                pp_stages=sorted({m.pp_stage for m in members}),
                tp_ranks=sorted({m.tp_rank for m in members}),
                calls_done=[m.calls_done for m in members],
                wrong_calls=[m.wrong_calls for m in members],
                outlier=len(classes) > 1 and (key[0], key[1], key[3]) != common,
            )
        )
    out.sort(key=lambda g: g.ranks[0])
    return out


def sorted_hypotheses(hyps: Sequence[Hypothesis]) -> list[Hypothesis]:
    return sorted(hyps, key=lambda h: (-h.score, _STATUS_ORDER.get(h.status, 9), h.title))


# ---- stack groups -------------------------------------------------------------------------------------


@dataclass
class StackGroup:
    ranks: list[int]
    sample: StackSample
    thread: ThreadStack | None
    odd: bool = False
    warnings: list[str] = field(default_factory=list)

    def state(self) -> str:
        """py-spy's word for the main thread: active (on CPU) or idle."""
        if self.thread is None:
            return "no thread"
        return "active" if self.thread.active else "idle"

    def where(self) -> str:
        """The innermost frame of the main thread, short: `wait (threading.py:607)`."""
        if self.thread is None or not self.thread.frames:
            return ""
        return frame_text(self.thread.frames[0], short=True)

    def headline(self) -> str:
        """The group in one line: "ranks 1,2,3: idle in wait (threading.py:607)"."""
        where = self.where()
        return f"{rank_label(self.ranks)}: {self.state()}" + (f" in {where}" if where else "")


def main_thread(sample: StackSample) -> ThreadStack | None:
    """The thread that stands for the rank: MainThread, else the first active thread, else the first."""
    for t in sample.threads:
        if t.name == "MainThread":
            return t
    for t in sample.threads:
        if t.active:
            return t
    return sample.threads[0] if sample.threads else None


def group_stacks(report: Report) -> list[StackGroup]:
    """Ranks whose main threads have the same stack, odd groups first, then by first rank."""
    buckets: dict[tuple[Any, ...] | None, StackGroup] = {}
    cluster_of = {r: i for i, c in enumerate(report.analysis.stack_clusters) for r in c.ranks}
    for sample in sorted(report.stacks, key=lambda s: s.rank):
        t = main_thread(sample)
        # The analysis' clusters (same Python frames) decide; native addresses differ in every process.
        key: tuple[Any, ...] | None
        if sample.rank in cluster_of:
            key = ("cluster", cluster_of[sample.rank])
        elif t is None:
            key = None
        else:
            key = (t.active, tuple((f.function, f.file) for f in t.frames if not f.native))
        group = buckets.get(key)
        if group is None:
            group = buckets[key] = StackGroup(ranks=[], sample=sample, thread=t)
        group.ranks.append(sample.rank)
        if sample.warning:
            group.warnings.append(f"rank {sample.rank}: {sample.warning}")
    groups = list(buckets.values())
    odd_ranks = {r for c in report.analysis.stack_clusters if c.odd for r in c.ranks}
    if report.analysis.stack_clusters:
        for g in groups:
            g.odd = bool(odd_ranks & set(g.ranks))
    elif len(groups) > 1:
        # Without the analysis' clusters: odd is outside the commonest (state, innermost function) class,
        # so line numbers alone do not make a rank odd.
        def cls(g: StackGroup) -> tuple[str, str, str]:
            top = g.thread.frames[0] if g.thread is not None and g.thread.frames else None
            return (g.state(), top.function if top else "", top.file if top else "")

        counts: dict[tuple[str, str, str], int] = {}
        for g in groups:
            counts[cls(g)] = counts.get(cls(g), 0) + len(g.ranks)
        common = max(counts.items(), key=lambda kv: kv[1])[0]
        for g in groups:
            g.odd = len(counts) > 1 and cls(g) != common
    groups.sort(key=lambda g: (not g.odd, g.ranks[0]))
    return groups


def _thread_lines(thread: ThreadStack) -> list[str]:
    state = "active" if thread.active else "idle"
    name = f': "{thread.name}"' if thread.name else ""
    lines = [f"Thread {thread.thread} ({state}){name}"]
    for f in thread.frames[:MAX_FRAMES]:
        lines.append(f"    {frame_text(f)}")
    if len(thread.frames) > MAX_FRAMES:
        lines.append(f"    … {len(thread.frames) - MAX_FRAMES} more frames (outermost)")
    return lines


def _stack_item(g: StackGroup) -> str:
    where = g.where()
    first = f"{rank_label(g.ranks)}: {g.state()}" + (f" in {_code(where)}" if where else "")
    first += " ← odd one out" if g.odd else ""
    meta = f"representative: rank {g.sample.rank}, pid {g.sample.pid}, {g.sample.source}"
    lines = [f"Process {g.sample.pid}: rank {g.sample.rank} ({g.sample.source})"]
    threads = list(g.sample.threads)
    if g.thread is not None:
        threads.remove(g.thread)
        threads.insert(0, g.thread)
    for t in threads[:MAX_THREADS]:
        lines.extend(_thread_lines(t))
    if len(threads) > MAX_THREADS:
        lines.append(f"… {len(threads) - MAX_THREADS} more threads")
    body = "\n".join(lines)
    open_, close = _fence("text", body)
    out = [f"{first}  \n{_md(meta, 400)}"]
    for w in g.warnings[:4]:
        out.append(f"> ⚠ {_md(w, 400)}")
    if len(g.warnings) > 4:
        out.append(f"> ⚠ {len(g.warnings) - 4} more warnings in report.json")
    out.append(f"{open_}\n{body}\n{close}")
    return "\n\n".join(out)


# ---- sections and the character budget -----------------------------------------------------------------


@dataclass
class _Section:
    """A block of the document that can drop trailing items to fit a budget."""

    title: str
    items: list[str]
    noun: str
    head: str = ""
    tail: str = ""
    sep: str = "\n"
    collapsible: bool = True
    weight: float = 1.0

    def _wrap(self, body: str) -> str:
        if self.collapsible:
            return f"<details><summary>{html.escape(self.title)}</summary>\n\n{body}\n\n</details>"
        return f"{self.title}\n\n{body}" if self.title else body

    def build(self, k: int) -> str:
        body = self.head
        if k:
            body += ("\n" if body else "") + self.sep.join(self.items[:k])
        if self.tail:
            body += ("\n" if body else "") + self.tail
        left = len(self.items) - k
        if left:
            body += f"\n\n_{left} more {self.noun} in report.json_"
        return self._wrap(body.strip("\n"))

    def full_len(self) -> int:
        return len(self.build(len(self.items)))

    def min_len(self) -> int:
        return len(self.build(0))

    def render(self, budget: int) -> str:
        text = self.build(len(self.items))
        if len(text) <= budget:
            return text
        # Largest k that fits, from prefix sums; then verify on the real text.
        base = len(self.build(0))
        total, k = base, 0
        for item in self.items:
            step = len(item) + len(self.sep)
            if total + step > budget:
                break
            total += step
            k += 1
        text = self.build(k)
        while k > 0 and len(text) > budget:
            k -= 1
            text = self.build(k)
        return text


def _allocate(sections: Sequence[_Section], budget: int) -> list[int]:
    """Budgets per section: everyone gets its minimal form, the rest is water-filled by weight."""
    mins = [s.min_len() for s in sections]
    wants = [max(0, s.full_len() - m) for s, m in zip(sections, mins, strict=True)]
    extra = max(0, budget - sum(mins))
    alloc = [0] * len(sections)
    order = sorted(range(len(sections)), key=lambda i: wants[i] / sections[i].weight)
    weight_left = sum(s.weight for s in sections)
    for i in order:
        share = int(extra * sections[i].weight / weight_left) if weight_left > 0 else 0
        alloc[i] = min(wants[i], share)
        extra -= alloc[i]
        weight_left -= sections[i].weight
    return [m + a for m, a in zip(mins, alloc, strict=True)]


# ---- the parts of the document -------------------------------------------------------------------------


def _title(report: Report) -> str:
    return f"# vdiag: {report.analysis.verdict.cls} in {report.scenario_name}"


def _summary(report: Report) -> str:
    v = report.analysis.verdict
    w = report.watchdog
    out: list[str] = []
    if v.headline:
        out.append(f"**{_md(v.headline, 4_000)}**")
    if v.paragraph:
        out.append(_md(v.paragraph, 12_000))
    if not out:
        out.append(f"**No verdict text from the analysis; the watchdog classed the run as {w.cls}.**")
    facts: list[str] = []
    word = "process" if report.observed is not None and report.observed.numbered else "rank"
    kernels: dict[str, list[int]] = {}
    for rw in v.ranks:
        if rw.state == "spinning":
            kernels.setdefault(rw.kernel, []).append(rw.rank)
    if v.spinning and len(kernels) > 1:  # ranks in different kernels: each with its own
        facts.append("- spinning: " + "; ".join(
            f"{rank_label(rs, word=word)} in {_code(k)}" if k else rank_label(rs, word=word) for k, rs in kernels.items()))
    elif v.spinning:
        where = f" in {_code(v.kernel)}" if v.kernel else ""
        call = f" ({_md(call_text(v.call), 400)})" if v.call else ""
        facts.append(f"- spinning: {rank_label(v.spinning, word=word)}{where}{call}")
    elif v.kernel:
        facts.append(f"- kernel: {_code(v.kernel)}")
    if v.idle:
        facts.append(f"- idle: {rank_label(v.idle, word=word)}")
    for st in w.stragglers:
        facts.append(f"- straggler: rank {st.rank}, on the host outside every known wait in {_code(st.where)}, "
                     f"{st.idle_s:g} s without progress" + (" (it resumed)" if w.cls == "slow" else ""))
    if v.top_hypothesis:
        title = next((h.title for h in report.analysis.hypotheses if h.key == v.top_hypothesis), "")
        facts.append(f"- top hypothesis: {_md(title or v.top_hypothesis, 400)}")
    wd = f"- watchdog: {w.cls}"
    if w.is_hang:
        wd += f", no progress for {w.stall_s:.1f} s"
    groups = [("busy", w.busy_ranks), ("idle", w.idle_ranks), ("finished", w.finished_ranks)]
    listed = [f"{name} {table_ranks(rs)}" for name, rs in groups if rs]
    if w.crashed:
        listed.append(f"crashed {table_ranks(c.rank for c in w.crashed)}")
    if listed:
        wd += " (" + "; ".join(listed) + ")"
    facts.append(wd)
    if report.observed is not None:
        ob = report.observed
        facts.append(
            f"- job ({ob.mode}): {_code(ob.command[:300])}, {_n(len(ob.processes), 'process', 'processes')} "
            f"followed, world {report.world_size}, {report.duration_s:.1f} s"
            + (f", started {report.started}" if report.started else "")
        )
        out.append("\n".join(facts))
        return "\n\n".join(out)
    run = (
        f"- run: scenario {_code(report.scenario_name)}"
        + (f" ({_code(report.scenario_file)})" if report.scenario_file else "")
        + f", backend {_code(report.backend)}, engine {_code(report.engine)}, "
        f"world {report.world_size} = PP {report.pp} × TP {report.tp}, "
        f"fusion {'on' if report.fusion_enabled else 'off'}, {report.duration_s:.1f} s"
        + (f", started {report.started}" if report.started else "")
    )
    facts.append(run)
    if report.expect:
        facts.append(f"- expected: {_md(report.expect, 200)}")
    if report.placement:
        facts.append(f"- placement: {_md(report.placement, 400)}")
    if _payload_scaled(report):
        facts.append(f"- payload scaled: {report.payload_width} of {report.hidden} elements per token")
    out.append("\n".join(facts))
    return "\n\n".join(out)


def _payload_scaled(report: Report) -> bool:
    return 0 < report.payload_width < report.hidden


def _ranks_section(report: Report) -> _Section | None:
    if not report.ranks:
        return None
    head = (
        "| ranks | pp stage | tp rank | state | last phase | calls done | wrong calls | pending call |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows: list[str] = []
    for g in group_ranks(report.ranks):
        label = rank_label(g.ranks)
        state = g.state
        if g.outlier:
            label, state = f"**{label}**", f"**{state}**"
        cells = [
            label,
            table_ranks(g.pp_stages),
            table_ranks(g.tp_ranks),
            _cell(_md(state, 100)),
            _cell(_md(g.last_phase, 200)),
            _span(g.calls_done),
            _span(g.wrong_calls),
            _cell(_md(g.pending, 400)),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return _Section(title="## Ranks", items=rows, noun="rank rows", head=head, collapsible=False, weight=4)


def _where_section(report: Report) -> _Section | None:
    """Every hung rank's own kernel and wait site, and where each came from."""
    ranks = report.analysis.verdict.ranks
    if not ranks:
        return None
    head = "| ranks | state | kernel | source | waits in | call |\n|---|---|---|---|---|---|"
    groups: dict[tuple[str, ...], list[int]] = {}
    for rw in ranks:  # ranks that agree on everything share a row
        kernel = rw.kernel + (f" ({rw.geometry})" if rw.geometry else "")
        site = rw.site + (f"; its host thread: {rw.host_wait}" if rw.host_wait else "")
        key = (rw.state, kernel, rw.kernel_source, site, call_text(rw.call) if rw.call else "")
        groups.setdefault(key, []).append(rw.rank)
    rows = []
    for (state, kernel, source, site, call), rs in groups.items():
        rows.append("| " + " | ".join([
            rank_label(rs), state, _cell(_md(kernel, 300)) or "-", _cell(_md(source, 100)) or "-",
            _cell(_md(site, 300)) or "-", _cell(_md(call, 300)) or "-",
        ]) + " |")
    return _Section(title="## Where each hung rank waits", items=rows, noun="rank rows", head=head,
                    collapsible=False, weight=3)


def _faults_section(report: Report) -> _Section | None:
    """The scenario's injected faults: which fired, where, and which never did."""
    if not report.faults:
        return None
    fired = [f for f in report.faults if f.fired]
    head = f"{len(fired)} of {len(report.faults)} injected faults fired."
    rows = []
    for f in report.faults:
        sel = ", ".join(f"{k}={v}" for k, v in f.selector.items()) or "every call"
        if f.fired:
            where = "; ".join(
                f"rank {r} at " + ", ".join(call_text(c) for c in calls[:3]) + (f" (+{len(calls) - 3})" if len(calls) > 3 else "")
                for r, calls in sorted(f.fired_on.items()))
            missing = [r for r in f.ranks if r not in f.fired_on]
            rows.append(f"- faults[{f.index}] {f.kind} ({sel}): **fired** on {where}"
                        + (f"; not on {rank_label(missing)}" if missing else ""))
        else:
            why = f": {_md(f.warning, 400)}" if f.warning else (
                ": no matching call was reached before the run stopped" if report.watchdog.cls not in
                ("clean", "slow", "corruption") else "")
            rows.append(f"- faults[{f.index}] {f.kind} ({sel}) on {rank_label(f.ranks)}: **never fired**{why}")
    return _Section(title="## Injected faults", items=rows, noun="faults", head=head, collapsible=False, weight=2)


def _hypotheses_section(report: Report) -> _Section | None:
    hyps = sorted_hypotheses(report.analysis.hypotheses)
    if not hyps:
        return None
    head = "| status | score | hypothesis |\n|---|---|---|"
    rows = []
    for h in hyps:
        status = f"**{h.status}**" if h.status == "supported" else h.status
        rows.append(f"| {status} | {h.score:.2f} | {_cell(_md(h.title, 300))} |")
    return _Section(
        title="## Hypotheses", items=rows, noun="hypotheses", head=head, collapsible=False, weight=4
    )


def _evidence_section(report: Report) -> _Section | None:
    hyps = [h for h in sorted_hypotheses(report.analysis.hypotheses) if h.evidence_for or h.evidence_against]
    if not hyps:
        return None
    items = []
    for h in hyps:
        lines = [f"**{_md(h.title, 300)}** ({h.status}, score {h.score:.2f})"]
        lines += [f"- for: {_md(e)}" for e in h.evidence_for]
        lines += [f"- against: {_md(e)}" for e in h.evidence_against]
        items.append("\n".join(lines))
    return _Section(
        title="### Evidence",
        items=items,
        noun="hypotheses' evidence",
        sep="\n\n",
        collapsible=False,
        weight=3,
    )


def _divergence_section(report: Report) -> _Section | None:
    a = report.analysis
    if not a.divergences and not a.grid_checks:
        return None
    by_group: dict[tuple[int, ...], list[Any]] = {}
    for d in a.divergences:
        by_group.setdefault(tuple(d.tp_group), []).append(d)
    items: list[str] = []
    for group, divs in sorted(by_group.items()):
        first = min(d.index for d in divs)
        at_first = [d for d in divs if d.index == first]
        later = len({d.index for d in divs}) - 1
        call = next((call_text(d.call) for d in at_first if d.call), "")
        lines = [f"**TP group ({','.join(str(r) for r in group)})**: first divergent call #{first}"]
        if call:
            lines[0] += f" ({_md(call, 300)})"
        for d in at_first:
            values = ", ".join(f"rank {r}: {value_text(v)}" for r, v in sorted(d.values.items()))
            line = f"- {_code(d.field)}: {_md(values, 600)}"
            if d.text:
                line += f" — {_md(d.text, 600)}"
            lines.append(line)
        if later:
            lines.append(f"- {later} later divergent call{'s' if later > 1 else ''} in this group")
        items.append("\n".join(lines))
    if a.grid_checks:
        items.append("Launch-configuration checks:\n" + "\n".join(f"- {_md(c, 600)}" for c in a.grid_checks))
    return _Section(
        title=f"Launch divergences ({_n(len(by_group), 'TP group')})",
        items=items,
        noun="divergence groups",
        sep="\n\n",
    )


def _aliasing_section(report: Report) -> _Section | None:
    if not report.analysis.aliasing:
        return None
    items = []
    for al in report.analysis.aliasing:
        lines = [f"**{rank_label(list(al.ranks))}**" + (f": {_md(al.text, 800)}" if al.text else "")]
        by_rdv: dict[tuple[int, ...], list[int]] = {}
        for r, grp in al.rendezvous_groups.items():
            by_rdv.setdefault(tuple(grp), []).append(r)
        for grp, rs in sorted(by_rdv.items(), key=lambda kv: min(kv[1])):
            lines.append(f"- workspace rendezvoused over ({table_ranks(grp)}) by {rank_label(rs)}")
        for buf, owners in sorted(al.shared_buffers.items()):
            lines.append(f"- buffer {_code(_clip(buf, 120))} mapped by {rank_label(list(owners))}")
        items.append("\n".join(lines))
    return _Section(
        title=f"Workspace identity and aliasing ({_n(len(items), 'finding')})",
        items=items,
        noun="aliasing findings",
        sep="\n\n",
    )


def _corruption_section(report: Report) -> _Section | None:
    found = report.analysis.corruption
    if not found:
        return None
    head = "| rank | wrong / total | kind | first wrong call | detail |\n|---|---|---|---|---|"
    rows = []
    for c in sorted(found, key=lambda c: c.rank):
        rows.append(
            f"| {c.rank} | {c.wrong_calls} / {c.total_calls} | {_cell(c.kind)} | "
            f"{_cell(_md(call_text(c.first), 300))} | {_cell(_md(c.detail, 400))} |"
        )
    total = sum(c.wrong_calls for c in found)
    return _Section(
        title=f"Silent corruption ({_n(total, 'wrong call')} on {_n(len(found), 'rank')})",
        items=rows,
        noun="corruption rows",
        head=head,
    )


def _stacks_section(report: Report) -> _Section | None:
    if report.stacks:
        groups = group_stacks(report)
        items = [_stack_item(g) for g in groups]
        missing = sorted({r.rank for r in report.ranks} - {s.rank for s in report.stacks})
        head = f"No stack sample for {rank_label(missing)}." if missing else ""
        return _Section(
            title=f"Stacks ({_n(len(report.stacks), 'rank')} in {_n(len(groups), 'group')})",
            items=items,
            noun="stack groups",
            head=head,
            sep="\n\n",
            weight=2,
        )
    clusters = report.analysis.stack_clusters
    if not clusters:
        return None
    items = []
    for c in sorted(clusters, key=lambda c: (not c.odd, min(c.ranks, default=0))):
        first = f"{rank_label(c.ranks)}: {c.top[0] if c.top else c.signature}"
        body = "\n".join(f"    {line}" for line in c.top[:MAX_FRAMES])
        open_, close = _fence("text", body)
        items.append(f"{_md(first, 400)}{' ← odd one out' if c.odd else ''}\n\n{open_}\n{body}\n{close}")
    return _Section(
        title=f"Stacks ({_n(len(clusters), 'group')})", items=items, noun="stack groups", sep="\n\n", weight=2
    )


def _gpu_section(report: Report) -> _Section | None:
    if not report.gpu:
        return None
    head = (
        "| ranks | kernel | grid | block | cluster | running blocks | source |\n|---|---|---|---|---|---|---|"
    )
    buckets: dict[tuple[Any, ...], list[int]] = {}
    rows_for: dict[tuple[Any, ...], list[list[str]]] = {}
    for st in sorted(report.gpu, key=lambda s: s.rank):
        rows: list[list[str]] = []
        for k in st.kernels:
            running = "" if k.running_blocks is None else str(k.running_blocks)
            if k.block_ranges:
                shown = ", ".join(k.block_ranges[:3]) + (" …" if len(k.block_ranges) > 3 else "")
                running = f"{running} ({shown})" if running else shown
            rows.append(
                [
                    _code(_clip(k.name, 300)),
                    format_dims(k.grid),
                    format_dims(k.block),
                    format_dims(k.cluster),
                    running,
                ]
            )
        if not rows:
            rows.append(["no kernel running", "", "", "", ""])
        key = (st.source, tuple(tuple(r) for r in rows))
        buckets.setdefault(key, []).append(st.rank)
        rows_for[key] = rows
    items = []
    for key, ranks in sorted(buckets.items(), key=lambda kv: kv[1][0]):
        for row in rows_for[key]:
            items.append("| " + " | ".join(_cell(c) for c in [rank_label(ranks), *row, key[0]]) + " |")
    return _Section(
        title=f"GPU state ({_n(len(report.gpu), 'rank')})", items=items, noun="GPU rows", head=head
    )


def _collectors_section(report: Report) -> _Section | None:
    runs = report.collectors
    if not runs:
        return None
    failed = [c for c in runs if not c.ok]
    head = f"{_n(len(runs), 'collector run')}, {len(runs) - len(failed)} ok, {len(failed)} failed."
    buckets: dict[tuple[str, str, str], list[Any]] = {}
    for c in failed:
        buckets.setdefault((c.name, c.error, c.advice), []).append(c)
    items = []
    for (name, error, advice), cs in buckets.items():
        ranks = [c.rank for c in cs if c.rank is not None]
        who = f" ({rank_label(ranks)})" if ranks else ""
        secs = max(c.seconds for c in cs)
        line = f"- **{_md(name, 100)}**{who}, {secs:.1f} s: {_md(error or 'failed', 800)}"
        if advice:
            line += f"\n  - what to do: {_md(advice, 800)}"
        items.append(line)
    title = f"Collectors ({len(failed)} failed)" if failed else "Collectors (all ok)"
    return _Section(title=title, items=items, noun="collector failures", head=head)


def _activity_section(report: Report) -> _Section | None:
    w = report.watchdog
    items: list[str] = []
    if report.activity_plot:
        plot = Path(report.activity_plot)
        try:
            rel = plot.relative_to(report.run_dir) if plot.is_absolute() else plot
        except ValueError:
            rel = plot
        items.append(f"![activity]({rel.as_posix()})")
    lines = [f"- watchdog class: {w.cls}, stall threshold {w.stall_s:.1f} s"]
    if w.last_progress_t is not None:
        lines.append(f"- last progress {w.last_progress_t - w.started_t:.1f} s after start")
    lines.append(f"- verdict {w.verdict_t - w.started_t:.1f} s after start")
    if w.slow_resumed:
        lines.append(f"- progress resumed {w.slow_resumed} times after looking stuck")
    if w.note:
        lines.append(f"- {_md(w.note, 800)}")
    items.append("\n".join(lines))
    if w.cpu_pct or w.gpu_util:
        by_reading: dict[tuple[str, str], list[int]] = {}
        for r in sorted(set(w.cpu_pct) | set(w.gpu_util)):
            cpu = f"{w.cpu_pct[r]:.0f}%" if r in w.cpu_pct else "-"
            gpu = f"{w.gpu_util[r]:.0f}%" if r in w.gpu_util else "-"
            by_reading.setdefault((cpu, gpu), []).append(r)
        rows = ["| ranks | CPU | GPU util |", "|---|---|---|"]
        rows += [f"| {rank_label(rs)} | {c} | {g} |" for (c, g), rs in by_reading.items()]
        items.append("\n".join(rows))
    for c in w.crashed:
        how = c.signal or (f"exit code {c.returncode}" if c.returncode is not None else "unknown exit")
        tail = "\n".join(c.stderr_tail[-20:])
        text = f"rank {c.rank} crashed ({how})"
        if tail:
            open_, close = _fence("text", tail)
            text += f":\n\n{open_}\n{tail}\n{close}"
        items.append(text)
    return _Section(title="Activity and watchdog", items=items, noun="activity items", sep="\n\n")


def _notes_section(report: Report) -> _Section | None:
    notes = list(report.notes)
    if _payload_scaled(report) and not any("payload" in n.lower() for n in notes):
        notes.append(
            f"payload scaled: the sim carried {report.payload_width} of {report.hidden} elements per token "
            "(launch arithmetic and records use the real shape)"
        )
    if not notes:
        return None
    return _Section(title=f"Notes ({len(notes)})", items=[f"- {_md(n)}" for n in notes], noun="notes")


def _env_section(report: Report) -> _Section:
    e = report.env
    lines = [f"vdiag version: {report.vdiag_version}", f"report schema: {report.schema_version}"]
    lines.append(f"Python: {e.python or 'unknown'}")
    lines.append(f"platform: {e.platform or 'unknown'}")
    if e.versions:
        lines.append("versions:")
        lines += [f"  {k}: {v}" for k, v in sorted(e.versions.items())]
    lines.append(f"driver: {e.driver or 'unknown'}")
    if e.gpus:
        lines.append("GPUs:")
        lines += [f"  GPU {i}: {g}" for i, g in enumerate(e.gpus)]
    if e.topology:
        lines.append("topology:")
        lines += [f"  {t}" for t in e.topology.splitlines()]
    if e.variables:
        lines.append("variables:")
        lines += [f"  {k}={v}" for k, v in sorted(e.variables.items())]
    if e.command_line:
        lines.append(f"command line: {e.command_line}")
    lines = [_clip(line, 400, strip=False) for line in lines]
    open_, close = _fence("text", "\n".join(lines))
    return _Section(title="Environment", items=lines, noun="environment lines", head=open_, tail=close)


def _observed_section(report: Report) -> _Section | None:
    """A job vdiag did not launch: its processes, who each is and how vdiag knows, what it printed."""
    ob = report.observed
    if ob is None:
        return None
    items: list[str] = []
    items.append("| pid | parent | role | rank | title | state | CPU % | wait | identity from |")
    items.append("|---|---|---|---|---|---|---|---|---|")
    for p in ob.processes:
        i = p.identity
        rank = "unknown" if i.rank is None else str(i.rank)
        src = "; ".join(f"{k}: {v}" for k, v in sorted(i.sources.items())) or "nothing the process showed"
        cells = [str(p.pid), str(p.ppid or ""), i.role, rank, _cell(_md(i.title, 60)), p.state,
                 "" if p.cpu_pct is None else f"{p.cpu_pct:.0f}", _cell(_md(p.wait_site, 120)), _cell(_md(src, 300))]
        items.append("| " + " | ".join(cells) + " |")
    if ob.facts:
        items.append("")
        items.append("What vdiag observed, inferred and computed:")
        for f in ob.facts:
            items.append(f"- {f.how}: {_md(f.text, 400)}" + (f" ({_md(f.source, 200)})" if f.source else ""))
    if ob.ready_line:
        items.append("")
        when = f" after {ob.ready_s:g} s" if ob.ready_s is not None else ""
        items.append(f"Start-up finished{when}: the job printed `{_md(ob.ready_line, 200)}`; from then on vdiag "
                     "no longer looked for a stall (a serving job that idles is not stalled).")
    if ob.progress:
        items.append("")
        items.append("Progress bars in the output (last value):")
        for m in ob.progress[-8:]:
            items.append(f"- {_md(m.label, 120)}: {m.n}/{m.total} ({m.updates} updates)")
    if ob.output_tail:
        items.append("")
        items.append(f"Last lines of output ({ob.output_lines} lines in all, logs/output.log):")
        open_, close = _fence("text", "\n".join(ob.output_tail))
        items.append(open_)
        items.extend(ob.output_tail[-15:])
        items.append(close)
    return _Section(title=f"## The job ({ob.mode})", items=items, noun="lines about the job", collapsible=False,
                    weight=3)


def _scenario_section(report: Report) -> _Section | None:
    if not report.scenario_yaml.strip():
        return None
    lines = report.scenario_yaml.rstrip("\n").splitlines()
    open_, close = _fence("yaml", report.scenario_yaml)
    name = report.scenario_file or report.scenario_name
    return _Section(
        title=f"Scenario ({name})", items=lines, noun="lines of the scenario YAML", head=open_, tail=close
    )


def _footer(report: Report) -> str:
    return f"**Exit code {report.exit_code}**: {exit_meaning(report.exit_code)}."


# ---- entry points ---------------------------------------------------------------------------------------


def render_markdown(report: Report, *, limit: int = MARKDOWN_LIMIT) -> str:
    """The report as Markdown, shorter than `limit` characters (a GitHub issue body by default)."""
    head = [_title(report), _summary(report)]
    footer = _footer(report)
    makers = (
        _ranks_section,
        _where_section,
        _faults_section,
        _observed_section,
        _hypotheses_section,
        _evidence_section,
        _divergence_section,
        _aliasing_section,
        _corruption_section,
        _stacks_section,
        _gpu_section,
        _collectors_section,
        _activity_section,
        _notes_section,
        _env_section,
        _scenario_section,
    )
    sections = [s for s in (make(report) for make in makers) if s is not None]
    fixed = sum(len(p) for p in head) + len(footer) + 2 * (len(head) + len(sections) + 1)
    budget = limit - _MARGIN - fixed
    parts = list(head)
    if sections:
        parts += [s.render(b) for s, b in zip(sections, _allocate(sections, budget), strict=True)]
    parts.append(footer)
    text = "\n\n".join(p for p in parts if p) + "\n"
    if len(text) >= limit:
        # Only reachable with a pathological verdict text: keep the start, the end and the size promise.
        note = "\n\n_report clipped to fit; the full text is in report.json_\n\n" + footer + "\n"
        text = text[: limit - _MARGIN - len(note)] + note
    return text


def render(report: Report, out: Path) -> None:
    """Write report.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(report), encoding="utf-8")
