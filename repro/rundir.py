"""Where a run's artifacts live: reports/<UTC time>-<scenario name>/ and its files."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls, base: Path, scenario_name: str) -> RunDir:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")[:-4] + "Z"
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", scenario_name)[:60] or "scenario"
        root = base / f"{stamp}-{safe}"
        n = 1
        while root.exists():
            n += 1
            root = base / f"{stamp}-{safe}-{n}"
        for sub in ("launch", "logs", "stacks", "gpu"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return cls(root)

    # inputs
    @property
    def scenario_json(self) -> Path:
        return self.root / "scenario.json"

    @property
    def scenario_yaml(self) -> Path:
        return self.root / "scenario.yaml"

    # written by workers
    def launch_log(self, rank: int) -> Path:
        return self.root / "launch" / f"rank{rank}.jsonl"

    def stderr_log(self, rank: int) -> Path:
        return self.root / "logs" / f"rank{rank}.log"

    def faulthandler_file(self, rank: int) -> Path:
        return self.root / "stacks" / f"rank{rank}.faulthandler.txt"

    @property
    def torchrun_log(self) -> Path:
        return self.root / "logs" / "torchrun.log"

    # written by the watchdog and the collectors
    @property
    def activity(self) -> Path:
        return self.root / "activity.jsonl"

    def stack_file(self, rank: int) -> Path:
        return self.root / "stacks" / f"rank{rank}.txt"

    def gpu_file(self, rank: int, source: str) -> Path:
        return self.root / "gpu" / f"rank{rank}.{source}.txt"

    @property
    def env_json(self) -> Path:
        return self.root / "env.json"

    @property
    def watchdog_json(self) -> Path:
        return self.root / "watchdog.json"

    @property
    def collectors_json(self) -> Path:
        return self.root / "collectors.json"

    # the report
    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def activity_svg(self) -> Path:
        return self.root / "activity.svg"

    def ranks(self) -> list[int]:
        out = []
        for p in (self.root / "launch").glob("rank*.jsonl"):
            try:
                out.append(int(p.stem[4:]))
            except ValueError:
                continue
        return sorted(out)
