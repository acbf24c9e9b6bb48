"""Progress from what the job prints anyway: tqdm-style ``N/M`` bars and lines not seen before.

tqdm redraws its bar with a carriage return, so output is split at ``\\r`` as well as ``\\n``. A bar is
keyed by its label (the text before the counter, with percentages and digits blanked) and advances when
its N changes. Any other line counts as progress only the first time its shape (digits blanked) is seen:
a job that repeats the same warning every minute while it hangs (vLLM prints "No available shared memory
broadcast block found in 60 seconds") is not making progress.

A server tells when its start-up is over: uvicorn, under vLLM's and SGLang's OpenAI servers, prints
"Application startup complete."; SGLang adds "The server is fired up and ready to roll!". After such a
line a serving job that idles (no requests, so nothing printed) is not a stalled start-up, and the watch
stops looking for one (`ready_line`). `--ready-pattern` adds a job's own line.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from repro.records import ProgressMark
from repro.redact import redact_text

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")
_BAR = re.compile(r"(?<![\w/.:-])(?P<n>\d{1,9})/(?P<total>\d{1,9})(?![\w/.:-])")
_DIGITS = re.compile(r"\d+")
MAX_SHAPES = 4096
READY_PATTERNS = (r"Application startup complete", r"The server is fired up and ready to roll")


def clean(text: str) -> str:
    return _ANSI.sub("", text).strip()


def find_bar(line: str) -> tuple[str, int, int] | None:
    """(label, n, total) for a line that shows a tqdm-style counter such as ``Capturing CUDA graphs:
    45%|####5     | 23/51 [00:05<00:06]`` or ``Capturing CUDA graphs 0/51``; None otherwise."""
    for m in _BAR.finditer(line):
        n, total = int(m["n"]), int(m["total"])
        if total <= 0 or n > total:
            continue
        label = line[: m.start()]
        label = label.split("|")[0] if "|" in label else label
        label = _DIGITS.sub("#", re.sub(r"\d+%", "", label)).strip(" :|-")
        if not any(c.isalpha() for c in label):
            label = label or "progress"
        return label[:120], n, total
    return None


@dataclass
class ProgressScanner:
    """Fed with the job's output; tells when it last showed progress. Thread-safe."""

    tail_lines: int = 40
    last_progress: float = field(default_factory=time.monotonic)
    lines: int = 0
    bars: dict[str, ProgressMark] = field(default_factory=dict)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    ready_patterns: tuple[str, ...] = READY_PATTERNS
    ready_line: str = ""  # the first line that said start-up is over (redacted), "" until one does
    ready_t: float | None = None  # time.monotonic() when it came
    _shapes: set[str] = field(default_factory=set)
    _partial: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, data: str) -> bool:
        """Scan a chunk of output; True when it showed progress."""
        with self._lock:
            text = self._partial + data
            parts = re.split(r"[\r\n]", text)
            self._partial = parts.pop()  # the unfinished last piece
            moved = False
            for raw in parts:
                moved |= self._line(raw)
            # a bar redrawn without a newline yet: scan the partial piece for a counter too
            if self._partial:
                bar = find_bar(clean(self._partial))
                if bar is not None:
                    moved |= self._bar(*bar)
            if moved:
                self.last_progress = time.monotonic()
            return moved

    def _line(self, raw: str) -> bool:
        line = clean(raw)
        if not line:
            return False
        self.lines += 1
        if not self.ready_line and any(re.search(p, line) for p in self.ready_patterns):
            self.ready_line, self.ready_t = redact_text(line)[:400], time.monotonic()
        bar = find_bar(line)
        if bar is not None:
            if not self.tail or not _same_bar(self.tail[-1], bar[0]):
                self.tail.append(redact_text(line)[:400])
            else:
                self.tail[-1] = redact_text(line)[:400]
            return self._bar(*bar)
        self.tail.append(redact_text(line)[:400])
        shape = _DIGITS.sub("#", line)
        if shape in self._shapes:
            return False
        if len(self._shapes) < MAX_SHAPES:
            self._shapes.add(shape)
        return True

    def _bar(self, label: str, n: int, total: int) -> bool:
        now = time.time()
        key = f"{label}/{total}"
        old = self.bars.get(key)
        if old is not None and old.n == n:
            return False
        self.bars[key] = ProgressMark(label=label, n=n, total=total, t=now,
                                      updates=(old.updates + 1) if old else 1)
        return True

    def since_progress(self) -> float:
        return time.monotonic() - self.last_progress

    def marks(self) -> list[ProgressMark]:
        with self._lock:
            return sorted(self.bars.values(), key=lambda m: m.t)

    def last_lines(self, n: int = 15) -> list[str]:
        with self._lock:
            lines = list(self.tail)
            if self._partial.strip():
                lines.append(redact_text(clean(self._partial))[:400])
            return lines[-n:]


def _same_bar(line: str, label: str) -> bool:
    bar = find_bar(line)
    return bar is not None and bar[0] == label
