"""The compact summary printed at the end of a run: verdict panel, ranks, top hypotheses, where report.md is.

`render_terminal` draws on a rich Console; `render` writes the same summary as plain text to a file.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console, Group, JustifyMethod
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from repro.errors import exit_meaning
from repro.records import Report
from repro.report.format import rank_label
from repro.report.markdown import group_ranks, sorted_hypotheses, table_ranks
from repro.rundir import RunDir

#: Rows of the ranks table before the rest are counted.
MAX_RANK_ROWS = 16
#: Hypotheses shown.
TOP_HYPOTHESES = 3
#: The verdict paragraph is clipped to this many characters in the terminal.
MAX_PARAGRAPH = 600

_CLASS_STYLE = {
    "spin-deadlock": "red",
    "all-spinning": "red",
    "timeout": "red",
    "host-wait": "yellow",
    "slow": "yellow",
    "crash": "magenta",
    "corruption": "magenta",
    "clean": "green",
}
_STATE_STYLE = {"spinning": "bold red", "idle": "yellow", "finished": "green", "crashed": "bold magenta"}
_STATUS_STYLE = {"supported": "bold green", "consistent": "cyan", "refuted": "dim", "no-evidence": "dim"}


def verdict_style(cls: str) -> str:
    """The colour of a verdict class; unknown classes are cyan."""
    return _CLASS_STYLE.get(cls, "cyan")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _verdict_panel(report: Report) -> Panel:
    v = report.analysis.verdict
    style = verdict_style(v.cls)
    body = Text()
    if v.headline:
        body.append(v.headline, style="bold")
    if v.paragraph:
        body.append("\n" + _clip(v.paragraph, MAX_PARAGRAPH))
    if not body.plain:
        body.append(
            f"no verdict text from the analysis; the watchdog classed the run as {report.watchdog.cls}"
        )
    facts: list[str] = []
    if v.spinning:
        facts.append(f"spinning: {rank_label(v.spinning)}" + (f" in {v.kernel}" if v.kernel else ""))
    if v.idle:
        facts.append(f"idle: {rank_label(v.idle)}")
    if facts:
        body.append("\n" + "\n".join(facts), style="dim")
    title = Text.assemble(("vdiag ", "bold"), (v.cls, f"bold {style}"), f" · {report.scenario_name}")
    subtitle = (
        f"world {report.world_size} (PP {report.pp} × TP {report.tp}) · {report.backend} · "
        f"{report.duration_s:.1f} s"
    )
    return Panel(body, title=title, subtitle=subtitle, border_style=style, expand=True)


def _ranks_table(report: Report) -> Table | None:
    if not report.ranks:
        return None
    table = Table(show_edge=False, pad_edge=False, expand=False)
    columns: list[tuple[str, JustifyMethod]] = [
        ("ranks", "left"),
        ("pp", "right"),
        ("tp", "right"),
        ("state", "left"),
        ("last phase", "left"),
        ("calls", "right"),
        ("wrong", "right"),
        ("pending call", "left"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    groups = group_ranks(report.ranks)
    # Outliers first when there are too many rows, shown in rank order.
    shown = sorted(groups, key=lambda g: (not g.outlier, g.ranks[0]))[:MAX_RANK_ROWS]
    shown.sort(key=lambda g: g.ranks[0])
    for g in shown:
        calls = (
            f"{min(g.calls_done)}"
            if min(g.calls_done) == max(g.calls_done)
            else (f"{min(g.calls_done)}-{max(g.calls_done)}")
        )
        wrong = max(g.wrong_calls)
        table.add_row(
            Text(rank_label(g.ranks), style="bold" if g.outlier else ""),
            table_ranks(g.pp_stages),
            table_ranks(g.tp_ranks),
            Text(g.state, style=_STATE_STYLE.get(g.state, "")),
            g.last_phase,
            calls,
            Text(
                str(wrong) if min(g.wrong_calls) == wrong else f"{min(g.wrong_calls)}-{wrong}",
                style="bold magenta" if wrong else "",
            ),
            g.pending,
        )
    if len(groups) > MAX_RANK_ROWS:
        table.caption = f"{len(groups) - MAX_RANK_ROWS} more rows in report.md"
    return table


def _hypotheses(report: Report) -> Text | None:
    hyps = sorted_hypotheses(report.analysis.hypotheses)[:TOP_HYPOTHESES]
    if not hyps:
        return None
    text = Text("top hypotheses\n", style="bold")
    for h in hyps:
        text.append(f"  {h.score:4.2f} ")
        text.append(f"{h.status:<11}", style=_STATUS_STYLE.get(h.status, ""))
        text.append(f" {h.title}\n")
    return text


def _footer(report: Report) -> Text:
    text = Text()
    failed = [c for c in report.collectors if not c.ok]
    if failed:
        noun = "collector run" if len(failed) == 1 else "collector runs"
        text.append(f"{len(failed)} {noun} failed", style="yellow")
        first = next((c for c in failed if c.advice), failed[0])
        text.append(f" (e.g. {first.name}: {_clip(first.advice or first.error, 160)})\n")
    text.append("report: ", style="bold")
    text.append(str(RunDir(Path(report.run_dir)).report_md) + "\n")
    text.append(f"exit {report.exit_code}: {exit_meaning(report.exit_code)}", style="dim")
    return text


def render_terminal(report: Report, console: Console) -> None:
    """Print the compact summary on `console`."""
    parts: list[Panel | Table | Text] = [_verdict_panel(report)]
    table = _ranks_table(report)
    if table is not None:
        parts.append(table)
    hyps = _hypotheses(report)
    if hyps is not None:
        parts.append(hyps)
    parts.append(_footer(report))
    console.print(Group(*parts))


def render(report: Report, out: Path) -> None:
    """Write the terminal summary as plain text (no colour codes) to `out`."""
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None, force_terminal=False)
    render_terminal(report, console)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(console.export_text(), encoding="utf-8")
