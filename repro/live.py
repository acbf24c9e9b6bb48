"""The live rank view: a rich table that observes the watchdog's snapshots (it never drives the run)."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table

from repro.layout import place
from repro.watchdog import Snapshot


class LiveView:
    def __init__(self, console: Console, tp: int, pp: int, title: str, max_rows: int = 32) -> None:
        self.console = console
        self.tp, self.pp = tp, pp
        self.title = title
        self.max_rows = max_rows
        self.live: Live | None = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    def __call__(self, snap: Snapshot) -> None:
        if self.live is None:
            return
        t = Table(title=f"{self.title}   no progress for {snap.since_progress:4.1f}s / stall at {snap.stall_s:.1f}s"
                  + ("   [yellow]stall suspected[/]" if snap.suspected else ""))
        for col in ("rank", "pp", "tp", "phase", "calls", "wrong", "cpu %", "pending"):
            t.add_column(col)
        for st in snap.ranks[: self.max_rows]:
            p = place(st.rank, self.tp, self.pp)
            pend = ""
            if st.pending is not None:
                pend = f"{st.pending.get('op')} T={st.pending.get('token_num')} L{st.pending.get('layer')}"
            t.add_row(str(st.rank), str(p.pp_stage), str(p.tp_rank), st.label(), str(st.completed),
                      str(st.wrong) if st.wrong else "", f"{st.cpu_pct:.0f}", pend)
        if len(snap.ranks) > self.max_rows:
            t.caption = f"{len(snap.ranks) - self.max_rows} more ranks not shown"
        self.live.update(t, refresh=True)
