"""The live rank view observes watchdog snapshots and shows each rank's phase and progress."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from repro.events import LogTail
from repro.live import LiveView
from repro.watchdog import RankState, Snapshot


def test_live_view_shows_phase_progress_and_pending_call(tmp_path: Path) -> None:
    console = Console(record=True, force_terminal=True, width=140)
    ranks = [RankState(r, LogTail(tmp_path / f"r{r}.jsonl")) for r in range(4)]
    ranks[0].phase, ranks[0].capture_index, ranks[0].capture_total = "capture", 3, 51
    ranks[0].completed, ranks[0].cpu_pct = 412, 99.0
    ranks[0].pending = {"op": "fused", "token_num": 480, "layer": 7}
    ranks[3].done = True
    view = LiveView(console, tp=2, pp=2, title="seed")
    with view:
        view(Snapshot(t=0.0, ranks=ranks, stall_s=2.0, since_progress=2.4, suspected=True))
        assert view.live is not None
        text = console.export_text()
    assert "capture 3/51" in text and "412" in text and "fused T=480 L7" in text
    assert "finished" in text and "stall suspected" in text


def test_live_view_stays_quiet_off_a_terminal(tmp_path: Path) -> None:
    console = Console(record=True, force_terminal=False)
    with LiveView(console, tp=2, pp=1, title="x") as view:
        view(Snapshot(t=0.0, ranks=[RankState(0, LogTail(tmp_path / "r.jsonl"))], stall_s=2, since_progress=0,
                      suspected=False))
    assert console.export_text() == ""
