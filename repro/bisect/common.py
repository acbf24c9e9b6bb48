"""What the bisect modules share: options, step and result records, the pre-flight check, the log folder,
the workers' environment, the user's --setup command and signal handling."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from repro.bisect.vllm_source import HOOK_NAME
from repro.errors import EnvironmentProblem, ExitCode, VdiagError
from repro.repeat import RunRecord, StepPolicy, Verdict
from repro.tools import ToolTimeout, run_tool

Progress = Callable[[str], None]


class BisectError(VdiagError):
    """A bisect that cannot start or go on; the message says what to change."""

    exit_code = ExitCode.USAGE


@dataclass
class BisectOptions:
    overrides: list[str] = field(default_factory=list)
    reports_dir: Path = Path("reports")
    policy: StepPolicy = field(default_factory=StepPolicy)
    setup: str | None = None
    setup_timeout: float = 3600.0
    gpu_state: str = "auto"
    # commits
    python_only: bool = False
    src_subdir: str = ""
    # package versions
    index_url: str | None = None
    find_links: list[str] = field(default_factory=list)
    no_index: bool = False
    pre: bool = False
    cache_dir: Path | None = None
    install_timeout: float = 1800.0
    # the search: "rule" (binary search, each step judged by `policy`) or "bayes" (repro.bisect.bayes)
    search: Literal["rule", "bayes"] = "rule"
    repro_rate: float | None = None  # bayes: None = learned from the runs
    false_fail_rate: float = 0.01
    max_total_runs: int = 60  # bayes: the run budget of the whole search
    # hook: vllm-source
    platform_sm: int = 90

    def search_text(self) -> str:
        if self.search == "rule":
            return self.policy.describe()
        from repro.bisect.bayes import FlakeModel

        return (f"flake-aware Bayesian search: {FlakeModel(self.repro_rate, self.false_fail_rate).describe()}; "
                f"each run where the expected information gain is largest; found when one candidate's "
                f"posterior reaches {self.policy.confidence:g} (at most {self.max_total_runs} runs); "
                "skip when a run crashes")


@dataclass
class Step:
    role: Literal["good end", "bad end", "step"]
    rev: str  # a full commit hash, or a version
    label: str  # short hash and subject, or "package version"
    verdict: Verdict
    reason: str
    runs: list[RunRecord] = field(default_factory=list)
    seconds: float = 0.0
    setup_log: str | None = None
    started: str = ""
    reads: list[str] = field(default_factory=list)  # hook: vllm-source, what was read from the checkout
    posterior: list[tuple[str, float]] = field(default_factory=list)  # bayes: the top candidates after it


@dataclass
class BisectResult:
    mode: Literal["git", "pip"]
    target: str  # the repository, or the package
    scenario: str
    good: str
    bad: str
    policy: StepPolicy
    log_dir: Path
    status: Literal["running", "found", "inconclusive", "error", "interrupted"] = "running"
    steps: list[Step] = field(default_factory=list)
    first_bad: str | None = None
    first_bad_label: str = ""
    last_good: str | None = None
    diffstat: str = ""
    candidates: list[str] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    search: Literal["rule", "bayes"] = "rule"
    rule_text: str = ""  # how steps are judged and the search stops, as the log says it
    seconds: float = 0.0
    versions: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.status == "found":
            return int(ExitCode.CLEAN)
        if self.status == "inconclusive":
            return int(ExitCode.REPRODUCED)
        return int(ExitCode.USAGE)

    @property
    def runs(self) -> int:
        return sum(len(s.runs) for s in self.steps)

    @property
    def bisect_md(self) -> Path:
        return self.log_dir / "bisect.md"

    @property
    def bisect_json(self) -> Path:
        return self.log_dir / "bisect.json"

    def summary_lines(self) -> list[str]:
        """What the command prints at the end (stdout)."""
        what = "commit" if self.mode == "git" else "version"
        out: list[str] = []
        if self.status == "found":
            out.append(f"first bad {what}: {self.first_bad_label}")
            if self.diffstat:
                out.extend(self.diffstat.rstrip("\n").splitlines())
        elif self.status == "inconclusive":
            out.append(f"the first bad {what} is one of ({len(self.candidates)}; skipped steps left no way to tell):")
            out.extend(f"  {c}" for c in self.candidates)
        out.append(f"{self.runs} runs in {len(self.steps)} steps, {fmt_s(self.seconds)}")
        out.append(f"bisect log: {self.bisect_md}")
        return out





def until_reproduced(max_runs: int) -> StepPolicy:
    """A policy that runs a step until it reproduces, at most `max_runs` times (bad at the first)."""
    return StepPolicy(confidence=1.0 - 0.5**max_runs, min_rate=0.5, max_runs=max_runs)


ONE_RUN = StepPolicy(confidence=0.5, min_rate=1.0, max_runs=1)


def fmt_s(s: float) -> str:
    s = round(s)
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s} s"




def preflight(scenario: Path, overrides: list[str], provides_vllm: bool = False, reads_source: bool = False) -> str:
    """Check the scenario and the environment before any step; return the scenario's name.

    Raises ScenarioError (exit 2) or EnvironmentProblem (exit 3), so that no setup problem is ever
    read as a step verdict. `provides_vllm`: the code under test brings vLLM (a vLLM checkout, or
    `--pip vllm`), so vdiag's own environment need not have it for `engine: vllm`.
    """
    import importlib.util

    from repro.run import resolve_backend
    from repro.scenario import load_scenario

    sc = load_scenario(scenario, overrides)
    if sc.hook == HOOK_NAME:
        if not reads_source:
            raise BisectError(f"scenario {sc.name}: hook: {HOOK_NAME} reads a vLLM checkout; use it with "
                              "`vdiag bisect --repo` (with --pip give a `module:function` hook)")
        if sc.engine == "vllm":
            raise BisectError(f"scenario {sc.name}: hook: {HOOK_NAME} replays what the checkout decides; "
                              "engine: vllm runs the checkout itself: use one of them")
    resolve_backend(sc.model_copy(update={"engine": "replay"}))  # backend, GPU, FlashInfer
    if sc.engine == "vllm" and not provides_vllm and importlib.util.find_spec("vllm") is None:
        raise EnvironmentProblem(f"scenario {sc.name}: engine: vllm needs vLLM; run `pip install -e .[vllm]`")
    if importlib.util.find_spec("torch") is None:
        raise EnvironmentProblem("torch is not installed in vdiag's environment: run `pip install torch`")
    return sc.name


def make_log_dir(reports: Path, name: str, kind: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")[:-4] + "Z"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60] or "scenario"
    root = reports / f"{stamp}-{kind}-{safe}"
    n = 1
    while root.exists():
        n += 1
        root = reports / f"{stamp}-{kind}-{safe}-{n}"
    (root / "runs").mkdir(parents=True)
    return root


def worker_env(code_dirs: list[Path], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the workers: the code under test first on PYTHONPATH, then vdiag, then the rest."""
    import repro

    pkg_root = str(Path(repro.__file__).resolve().parent.parent)
    parts = [str(d) for d in code_dirs] + [pkg_root]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    env = {"PYTHONPATH": os.pathsep.join(parts), "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra or {})
    return env


def run_setup(cmd: str, cwd: Path, env: dict[str, str], timeout: float, log_path: Path) -> tuple[bool, str]:
    """Run the user's setup command; (ok, why). Its output goes to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = run_tool(["bash", "-c", cmd], timeout=timeout, cwd=cwd, env=env)
    except ToolTimeout as e:
        log_path.write_text(f"$ {cmd}\n{e.stdout}{e.stderr}\n[killed after {timeout:g} s]\n")
        return False, f"--setup did not finish within {timeout:g} s"
    log_path.write_text(f"$ {cmd}\n[exit {res.returncode}, {res.seconds:.1f} s]\n{res.output}")
    if res.ok:
        return True, ""
    last = next((ln for ln in reversed(res.output.splitlines()) if ln.strip()), "")
    return False, f"--setup exited {res.returncode}" + (f": {last.strip()[:200]}" if last else "")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a bisect like Ctrl-C does, so the repository is still restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM off while the repository is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)

