"""The injected faults of a replay run: which call each one hits on this rank, and the record of each firing."""

from __future__ import annotations

from typing import Any

from repro.events import LaunchLogWriter
from repro.records import FaultEvent
from repro.scenario import Fault


class FaultBook:
    """Matches injected faults against calls; a `once` fault fires on its first matching call only.

    Every firing is written to the launch log (a `fault` record naming the fault by its index in the
    scenario's `faults:` list), so the report can say which injected faults fired and which never did."""

    def __init__(self, faults: list[Fault], rank: int, log: LaunchLogWriter | None = None) -> None:
        self.mine = [f for f in faults if rank in f.ranks]
        self.index = [i for i, f in enumerate(faults) if rank in f.ranks]  # each mine's place in `faults:`
        self.fired: set[int] = set()
        self.log = log

    def _record(self, i: int, **where: Any) -> None:
        if self.log is not None:
            self.log.emit(FaultEvent(rank=self.log.rank, index=self.index[i], kind=self.mine[i].kind, **where))

    def hits(self, kind: str, phase: str, size: int, layer: int, sub: int, call: int) -> list[Fault]:
        out = []
        for i, f in enumerate(self.mine):
            if f.kind != kind or (f.once and i in self.fired):
                continue
            if f.at.matches(phase, size, layer, sub, call):
                self.fired.add(i)
                self._record(i, phase=phase, size=size, layer=layer, sub=sub, call=call)
                out.append(f)
        return out

    def fire(self, kind: str) -> bool:
        """A fault that acts once at workspace creation (workspace_fail, jit_lock): record it, say if any."""
        mine = [i for i, f in enumerate(self.mine) if f.kind == kind]
        for i in mine:
            self.fired.add(i)
            self._record(i, phase="workspace")
        return bool(mine)

    def workspace_fails(self) -> bool:
        return self.fire("workspace_fail")
