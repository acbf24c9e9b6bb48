"""Per-rank launch logs: JSONL written by the workers before each launch, read by the watchdog and the
collectors. One home for the format: the writer, the incremental tail, and the typed parse."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from repro.records import (
    DoneEvent,
    FaultEvent,
    HelloEvent,
    LaunchEvent,
    LogEvent,
    PhaseEvent,
    RankLog,
    ResultEvent,
    WorkspaceEvent,
)


class LaunchLogWriter:
    """Append-only JSONL, one line per event, flushed before the call it announces."""

    def __init__(self, path: Path, rank: int) -> None:
        self.rank = rank
        self.f: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115

    def emit(self, rec: LogEvent) -> None:
        """Write one record (its every field), flushed: the record's model is the format."""
        if rec.rank != self.rank:
            raise ValueError(f"a rank-{rec.rank} record written to rank {self.rank}'s launch log")
        self.f.write(rec.model_dump_json() + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class LogTail:
    """Reads the complete lines appended to a log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_events(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        if not data:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def parse_events(rank: int, events: list[dict[str, Any]]) -> RankLog:
    hello = workspace = done = None
    phases: list[PhaseEvent] = []
    launches: list[LaunchEvent] = []
    results: list[ResultEvent] = []
    errors: list[str] = []
    faults: list[FaultEvent] = []
    for e in events:
        kind = e.get("ev")
        try:
            if kind == "launch":
                launches.append(LaunchEvent.model_validate(e))
            elif kind == "result":
                results.append(ResultEvent.model_validate(e))
            elif kind == "phase":
                phases.append(PhaseEvent.model_validate(e))
            elif kind == "hello":
                hello = HelloEvent.model_validate(e)
            elif kind == "workspace":
                workspace = WorkspaceEvent.model_validate(e)
            elif kind == "done":
                done = DoneEvent.model_validate(e)
            elif kind == "fault":
                faults.append(FaultEvent.model_validate(e))
            elif kind == "error":
                errors.append(f"{e.get('where', '?')}: {e.get('error', '')}")
        except ValidationError as ve:
            errors.append(f"unreadable {kind} record: {ve.errors()[0].get('msg')}")
    return RankLog(
        rank=rank, hello=hello, workspace=workspace, phases=phases, launches=launches, results=results,
        done=done, errors=errors, faults=faults,
    )


def read_rank_log(path: Path, rank: int) -> RankLog:
    return parse_events(rank, LogTail(path).new_events())


def per_call_timings(launch_dir: Path) -> dict[str, Any]:
    """Over every rank's launch log: mean seconds per call (launch -> return: the record's call_s, else
    launch -> result), the replay's span per call (first launch to last result, divided by the calls), and
    how many calls each token count had."""
    import statistics

    durations: list[float] = []
    spans: list[float] = []
    tokens: dict[int, int] = {}
    for log in sorted(launch_dir.glob("rank*.jsonl")):
        if log.name.endswith(".cupti.jsonl"):
            continue
        rl = read_rank_log(log, -1)
        launched = {ev.seq: ev for ev in rl.launches}
        for ev in rl.launches:
            tokens[ev.token_num] = tokens.get(ev.token_num, 0) + 1
        done = [r for r in rl.results if r.seq in launched]
        durations.extend(r.call_s if r.call_s is not None else r.t - launched[r.seq].t for r in done)
        if done:
            spans.append((done[-1].t - rl.launches[0].t) / len(done))
    nan = float("nan")
    return {"mean_call_s": statistics.fmean(durations) if durations else nan,
            "span_per_call_s": statistics.fmean(spans) if spans else nan,
            "calls": len(durations), "token_counts": tokens}


# ---- FlashInfer JIT records (vllm/jit-rank<N>.jsonl, written by repro.engines.vllm.instrument) ----------

JIT_FILE = "jit-rank{rank}.jsonl"


def read_jit_records(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Every rank's JIT records (vllm/jit-rank<N>.jsonl), oldest first."""
    out: dict[int, list[dict[str, Any]]] = {}
    for f in sorted((run_dir / "vllm").glob("jit-rank*.jsonl")):
        m = re.fullmatch(r"jit-rank(\d+)\.jsonl", f.name)
        if not m:
            continue
        recs = []
        with contextlib.suppress(OSError):
            for line in f.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    recs.append(json.loads(line))
        out[int(m.group(1))] = recs
    return out


def unfinished_jit(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The builds a rank entered and never left (no `return` or `error` for the same module after it)."""
    open_: dict[str, dict[str, Any]] = {}
    for r in recs:
        mod = str(r.get("module"))
        if r.get("ev") == "enter":
            open_[mod] = r
        elif r.get("ev") in ("return", "error"):
            open_.pop(mod, None)
    return list(open_.values())
