"""`vdiag bisect`: the commit or the package version that brought a hang in.

Commits (`--repo`)
------------------
vdiag drives real `git bisect` in a linked worktree of the repository (`git worktree add --detach` under a
temporary folder), so the user's own checkout, branch, index and uncommitted changes are never touched,
and its bisect state (per worktree in git) never mixes with one the user may have going. Each step:

1. `--setup CMD` (when given) runs in the step's checkout; a non-zero exit or a timeout makes the step
   `skip` (a commit that does not build cannot be judged);
2. `vdiag run` replays the scenario with the checkout (or `--src-subdir` of it) first on the workers'
   PYTHONPATH, so the scenario's `hook:` (and anything it imports) comes from that commit;
3. the runs are judged by `repro.repeat.judge`: a hang or wrong results -> `git bisect bad`, only clean
   runs -> `git bisect good`, a crash (import error, dead worker) -> `git bisect skip`.

Before the first step the scenario and the environment are checked (exit 2 or 3, never a step verdict),
the revisions are resolved, `--bad` must not be an ancestor of `--good`, and both ends are run: `--good`
must start cleanly and `--bad` must reproduce, else the bisect stops with a one-line error (exit 2).
Whatever happens (an error, Ctrl-C, SIGTERM) `git bisect reset` runs in the worktree, the worktree is
removed, and the repository's HEAD is checked to be the one it had.

`--python-only` is for checkouts that run on prebuilt binaries (vLLM's VLLM_USE_PRECOMPILED=1): the
ignored compiled files of the user's checkout (`*.so`, `*.pyd`, `*.dylib`) are linked into the
worktree at the same paths, so every step is a checkout and no build. `--setup` still runs when given,
with VLLM_USE_PRECOMPILED=1 set.

Package versions (`--pip`)
--------------------------
The ordered version list comes from the package index (`pip index versions`), sorted with
packaging.version and cut to [--good, --bad]. Each version gets its own environment, a
`pip install --no-deps --target` folder cached under ~/.cache/vdiag/envs/ (or $VDIAG_CACHE_DIR,
or --cache-dir), put first on the workers' PYTHONPATH; everything else (torch, ...) comes from vdiag's
environment. The search is a binary search over the list with the same judging rule and skips.

The log
-------
reports/<UTC time>-bisect-<scenario>/ holds bisect.md (for people), bisect.json (for machines), the
scenario as bisected, git-bisect.log (`git bisect log`), setup logs, and runs/ with every run's report.
The log is rewritten after every step, so an interrupted bisect keeps what it learned.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from repro.errors import EnvironmentProblem, ExitCode, VdiagError
from repro.repeat import (
    Judgement,
    RunRecord,
    StepPolicy,
    Verdict,
    judge,
    record_of,
    rerun_unjudgeable,
    unjudgeable,
)
from repro.tools import ToolResult, ToolTimeout, run_tool, which

Progress = Callable[[str], None]

GIT_TIMEOUT_S = 300.0
BINARY_SUFFIXES = (".so", ".pyd", ".dylib")
CACHE_MARKER = ".vdiag-env.json"


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
        out.append(f"{self.runs} runs in {len(self.steps)} steps, {_fmt_s(self.seconds)}")
        out.append(f"bisect log: {self.bisect_md}")
        return out


# ---- the log ----------------------------------------------------------------------------------------------


def _fmt_s(s: float) -> str:
    s = round(s)
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s} s"


def _rel(path: str, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path


def write_log(res: BisectResult) -> None:
    """bisect.md and bisect.json, from the result as it stands (called after every step)."""
    res.log_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(res)
    data["log_dir"] = str(res.log_dir)
    data["policy"] = {**asdict(res.policy), "clean_runs_for_good": res.policy.clean_needed,
                      "rule": res.policy.describe()}
    data["exit_code"] = res.exit_code
    data["runs"] = res.runs
    tmp = res.bisect_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, res.bisect_json)
    tmp = res.bisect_md.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(res))
    os.replace(tmp, res.bisect_md)


def render_markdown(res: BisectResult) -> str:
    what = "commit" if res.mode == "git" else "version"
    lines = [f"# vdiag bisect: {Path(res.scenario).stem}", ""]
    if res.status == "found":
        lines.append(f"**first bad {what}: {res.first_bad_label}**")
        if res.last_good:
            lines += ["", f"last good {what}: {res.last_good}"]
        if res.diffstat:
            lines += ["", "```", res.diffstat.rstrip("\n"), "```"]
    elif res.status == "inconclusive":
        lines.append(f"**inconclusive: skipped steps leave {len(res.candidates)} candidates for the first bad {what}**")
        lines += [""] + [f"- {c}" for c in res.candidates]
    elif res.status == "error":
        lines.append(f"**stopped: {res.error}**")
    elif res.status == "interrupted":
        lines.append("**interrupted (Ctrl-C): the steps below were judged before it**")
    else:
        lines.append("**running**")
    lines.append("")
    if res.mode == "git":
        lines.append(f"- repository: `{res.target}`, good `{res.good[:12]}`, bad `{res.bad[:12]}`")
    else:
        n = len(res.versions)
        lines.append(f"- package: `{res.target}` from {res.good} (good) to {res.bad} (bad), {n} versions in between"
                     f" and at the ends")
    lines.append(f"- scenario: `{res.scenario}`")
    lines.append(f"- rule: {res.policy.describe()}")
    lines.append(f"- {res.runs} runs in {len(res.steps)} steps, {_fmt_s(res.seconds)}")
    lines.extend(f"- note: {n}" for n in res.notes)
    lines += ["", "## Steps", "", f"| # | {what} | verdict | runs | started (UTC) | took | why | report |",
              "|---|---|---|---|---|---|---|---|"]
    i = 0
    for st in res.steps:
        if st.role == "step":
            i += 1
        num = str(i) if st.role == "step" else st.role
        report = ""
        if len(st.runs) == 1:
            report = f"[report]({_rel(st.runs[0].report_md, res.log_dir)})"
        elif st.runs:
            report = ", ".join(f"[run {i}]({_rel(r.report_md, res.log_dir)})" for i, r in enumerate(st.runs, 1))
        elif st.setup_log:
            report = f"[setup log]({_rel(st.setup_log, res.log_dir)})"
        label = st.label.replace("|", "\\|")
        why = st.reason.replace("|", "\\|").replace("\n", " ")
        runs = ", ".join(r.short() for r in st.runs) or "-"
        started = st.started[11:19] if len(st.started) >= 19 else st.started
        lines.append(f"| {num} | `{label}` | {st.verdict} | {runs} | {started} | {st.seconds:.1f} s | {why} | {report} |")
    lines.append("")
    if res.mode == "git" and (res.log_dir / "git-bisect.log").exists():
        lines += ["`git bisect log`: [git-bisect.log](git-bisect.log)", ""]
    return "\n".join(lines)


# ---- shared pieces ----------------------------------------------------------------------------------------


def preflight(scenario: Path, overrides: list[str], provides_vllm: bool = False) -> str:
    """Check the scenario and the environment before any step; return the scenario's name.

    Raises ScenarioError (exit 2) or EnvironmentProblem (exit 3), so that no setup problem is ever
    read as a step verdict. `provides_vllm`: the code under test brings vLLM (a vLLM checkout, or
    `--pip vllm`), so vdiag's own environment need not have it for `engine: vllm`.
    """
    import importlib.util

    from repro.run import resolve_backend
    from repro.scenario import load_scenario

    sc = load_scenario(scenario, overrides)
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
def _sigterm_as_interrupt() -> Iterator[None]:
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
def _no_interrupts() -> Iterator[None]:
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


class _Stepper:
    """Runs the scenario for one step and judges it; shared by the git and pip searches."""

    def __init__(self, scenario: Path, opts: BisectOptions, res: BisectResult, progress: Progress) -> None:
        self.scenario = scenario
        self.opts = opts
        self.res = res
        self.progress = progress
        self.t0 = time.monotonic()

    def judge(self, role: Literal["good end", "bad end", "step"], rev: str, label: str,
              code_dirs: list[Path], setup_cwd: Path, setup_env: dict[str, str]) -> Step:
        tag = f"[{role}]" if role != "step" else f"[step {sum(1 for s in self.res.steps if s.role == 'step') + 1}]"
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.progress(f"{tag} {label}")
        t0 = time.monotonic()
        setup_log: str | None = None
        if self.opts.setup:
            log = self.res.log_dir / "setup" / f"{len(self.res.steps):02d}-{re.sub(r'[^A-Za-z0-9_.-]', '-', rev)[:40]}.log"
            ok, why = run_setup(self.opts.setup, setup_cwd, setup_env, self.opts.setup_timeout, log)
            setup_log = str(log)
            if not ok:
                st = Step(role=role, rev=rev, label=label, verdict="skip", reason=why,
                          seconds=round(time.monotonic() - t0, 1), setup_log=setup_log, started=started)
                self.progress(f"{tag} -> skip ({why})")
                return self._done(st)
        env = worker_env(code_dirs)

        def once() -> RunRecord:
            from rich.console import Console

            from repro.run import RunOptions, run_scenario

            ro = RunOptions(overrides=list(self.opts.overrides), reports_dir=self.res.log_dir / "runs", live=False,
                            quiet=True, gpu_state=self.opts.gpu_state, extra_env=env)
            t = time.monotonic()
            outcome = run_scenario(self.scenario, ro, Console(file=io.StringIO()))
            return record_of(outcome, time.monotonic() - t)

        def on_run(i: int, rec: RunRecord) -> None:
            self.progress(f"{tag}   run {i}: {rec.short()} ({rec.verdict}, {rec.seconds:.1f} s)")

        def on_retry(rec: RunRecord) -> None:
            self.progress(f"{tag}   run not judged: {unjudgeable(rec)} ({rec.report_md}); running again")

        j: Judgement = judge(rerun_unjudgeable(once, on_retry=on_retry), self.opts.policy, on_run)
        st = Step(role=role, rev=rev, label=label, verdict=j.verdict, reason=j.reason, runs=j.runs,
                  seconds=round(time.monotonic() - t0, 1), setup_log=setup_log, started=started)
        self.progress(f"{tag} -> {j.verdict} ({j.reason})")
        return self._done(st)

    def _done(self, st: Step) -> Step:
        self.res.steps.append(st)
        self.res.seconds = round(time.monotonic() - self.t0, 1)
        write_log(self.res)
        return st


def _check_ends(good: Step, bad: Step | None, what: str) -> None:
    """Both ends must behave, or the bisect would label the wrong commit."""
    if good.verdict == "bad":
        raise BisectError(
            f"--good {good.label} reproduces the failure ({good.reason}; {good.runs[-1].report_md}): "
            f"--good and --bad look the wrong way round, or the hang is older than --good; give a {what} "
            "whose start-up is clean as --good"
        )
    if good.verdict == "skip":
        raise BisectError(f"--good {good.label} cannot be judged ({good.reason}); give a {what} that runs as --good")
    if bad is None:
        return
    if bad.verdict == "good":
        raise BisectError(
            f"--bad {bad.label} does not reproduce the failure ({bad.reason}; {bad.runs[-1].report_md}): "
            f"--good and --bad look the wrong way round, or the scenario does not reach the hang; give a {what} "
            "that hangs as --bad"
        )
    if bad.verdict == "skip":
        raise BisectError(f"--bad {bad.label} cannot be judged ({bad.reason}); give a {what} that runs as --bad")


def _finish(res: BisectResult, fn: Callable[[], None], t0: float) -> BisectResult:
    """Run the search; record errors and interrupts in the log before they propagate."""
    try:
        with _sigterm_as_interrupt():
            fn()
    except VdiagError as e:
        res.status = "error"
        res.error = e.message
        raise
    except KeyboardInterrupt:
        res.status = "interrupted"
        raise
    finally:
        res.seconds = round(time.monotonic() - t0, 1)
        with contextlib.suppress(OSError):
            write_log(res)
    return res


# ---- commits ----------------------------------------------------------------------------------------------


def _git_env() -> dict[str, str]:
    # git's messages are parsed: keep them in English; never prompt.
    return {"LC_ALL": "C", "LANG": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0"}


def git(args: list[str], cwd: Path, check: bool = True, timeout: float = GIT_TIMEOUT_S) -> ToolResult:
    res = run_tool(["git", *args], timeout=timeout, cwd=cwd, env=_git_env())
    if check and not res.ok:
        msg = next((ln for ln in res.stderr.splitlines() if ln.strip()), res.stdout.strip()[:200])
        raise BisectError(f"git {' '.join(args)} failed in {cwd}: {msg}")
    return res


def resolve_commit(repo: Path, rev: str, flag: str) -> str:
    res = git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], repo, check=False)
    if not res.ok:
        raise BisectError(f"{flag} {rev}: no such commit in {repo}; check with `git -C {repo} log --oneline`")
    return res.stdout.strip()


@dataclass(frozen=True)
class RepoState:
    head: str
    branch: str  # symbolic ref, or "" when detached
    worktrees: str

    @classmethod
    def of(cls, repo: Path) -> RepoState:
        head = git(["rev-parse", "--verify", "--quiet", "HEAD"], repo, check=False).stdout.strip()
        branch = git(["symbolic-ref", "--quiet", "HEAD"], repo, check=False).stdout.strip()
        wts = git(["worktree", "list", "--porcelain"], repo, check=False).stdout
        return cls(head=head, branch=branch, worktrees=wts)


class Worktree:
    """A detached linked worktree of the repository for the bisect, removed (with its bisect state) at the end."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.tmp = Path(tempfile.mkdtemp(prefix="vdiag-bisect-"))
        self.path = self.tmp / "checkout"
        self.added = False
        self.bisecting = False

    def add(self, rev: str) -> None:
        res = git(["worktree", "add", "--detach", str(self.path), rev], self.repo, check=False, timeout=1800)
        if not res.ok:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise EnvironmentProblem(f"could not create a worktree of {self.repo} in {self.path}: "
                                     f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        self.added = True

    def git(self, args: list[str], check: bool = True) -> ToolResult:
        return git(args, self.path, check=check)

    def checkout(self, rev: str) -> None:
        self.discard_changes()
        self.git(["checkout", "--quiet", "--detach", rev])

    def discard_changes(self) -> None:
        """Undo what a --setup did (tracked files, untracked files git does not ignore) so that git can
        check out the next commit. Only ever in our own worktree; ignored build outputs stay."""
        self.git(["reset", "--hard", "--quiet"], check=False)
        self.git(["clean", "-fdq"], check=False)

    def head(self) -> str:
        return self.git(["rev-parse", "HEAD"]).stdout.strip()

    def link_binaries(self, subdir: str) -> list[str]:
        """Link the user's checkout's ignored compiled files (precompiled wheels put them there) into ours."""
        args = ["ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--"]
        args += [f"{subdir.rstrip('/') + '/' if subdir else ''}*{s}" for s in BINARY_SUFFIXES]
        res = git(args, self.repo)
        linked = []
        for rel in filter(None, res.stdout.split("\0")):
            parts = Path(rel).parts
            if any(p.startswith(".") or p in ("site-packages", "dist-packages", "build", "node_modules") for p in parts):
                continue
            dst = self.path / rel
            if dst.exists() or dst.is_symlink():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(self.repo / rel, dst)
            linked.append(rel)
        return linked

    def cleanup(self) -> list[str]:
        """`git bisect reset`, remove the worktree and its folder. Returns problems (never raises)."""
        problems: list[str] = []
        if self.added:
            if self.bisecting:
                with contextlib.suppress(VdiagError):
                    r = self.git(["bisect", "reset"], check=False)
                    if not r.ok and "not bisecting" not in r.output.lower():
                        problems.append(f"git bisect reset: {r.output.strip()[:200]}")
            try:
                r = git(["worktree", "remove", "--force", "--force", str(self.path)], self.repo, check=False)
                if not r.ok:
                    shutil.rmtree(self.path, ignore_errors=True)
                    git(["worktree", "prune"], self.repo, check=False)
            except VdiagError as e:
                problems.append(str(e))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


_FIRST_BAD = re.compile(r"^([0-9a-f]{40}) is the first bad commit", re.MULTILINE)
_ANY_OF = re.compile(r"could be any of:\s*\n((?:[0-9a-f]{40}\s*\n?)+)")


def bisect_git(scenario: Path, repo: Path, good: str, bad: str, opts: BisectOptions,
               progress: Progress = lambda _m: None) -> BisectResult:
    """Find the first commit in (good, bad] whose checkout makes the scenario hang. See the module docstring."""
    t0 = time.monotonic()
    name = preflight(scenario, opts.overrides, provides_vllm=True)
    if which("git") is None:
        raise EnvironmentProblem("git not found: install git (e.g. `apt-get install git`)")
    repo = repo.resolve()
    if not repo.is_dir():
        raise BisectError(f"--repo {repo}: no such folder")
    top = git(["rev-parse", "--show-toplevel"], repo, check=False)
    if not top.ok:
        raise BisectError(f"--repo {repo}: not a git repository")
    repo = Path(top.stdout.strip())
    good_sha = resolve_commit(repo, good, "--good")
    bad_sha = resolve_commit(repo, bad, "--bad")
    if good_sha == bad_sha:
        raise BisectError(f"--good {good} and --bad {bad} are the same commit ({good_sha[:12]})")
    if git(["merge-base", "--is-ancestor", bad_sha, good_sha], repo, check=False).ok:
        raise BisectError(
            f"--bad {bad} ({bad_sha[:12]}) is an ancestor of --good {good} ({good_sha[:12]}): --good and --bad are "
            "the wrong way round; --good is the older commit that starts cleanly, --bad the newer one that hangs"
        )
    if opts.src_subdir and Path(opts.src_subdir).is_absolute():
        raise BisectError(f"--src-subdir {opts.src_subdir}: give a path inside the repository")
    before = RepoState.of(repo)

    log_dir = make_log_dir(opts.reports_dir, name, "bisect")
    bisect_scenario = log_dir / f"{name}.yaml"
    shutil.copyfile(scenario, bisect_scenario)
    res = BisectResult(mode="git", target=str(repo), scenario=str(scenario), good=good_sha, bad=bad_sha,
                       policy=opts.policy, log_dir=log_dir)
    if not git(["merge-base", "--is-ancestor", good_sha, bad_sha], repo, check=False).ok:
        res.notes.append("--good is not an ancestor of --bad: git bisect tests their merge base first")
    write_log(res)
    wt = Worktree(repo)
    stepper = _Stepper(bisect_scenario, opts, res, progress)
    code_dir = wt.path / opts.src_subdir if opts.src_subdir else wt.path
    setup_env = {"VDIAG_BISECT_CHECKOUT": str(wt.path)}
    if opts.python_only:
        setup_env["VLLM_USE_PRECOMPILED"] = "1"

    def subject(sha: str) -> str:
        return git(["log", "-1", "--format=%s", sha], repo).stdout.strip()

    def judge_here(role: Literal["good end", "bad end", "step"], sha: str) -> Step:
        env = dict(setup_env, VDIAG_BISECT_REV=sha)
        return stepper.judge(role, sha, f"{sha[:10]} {subject(sha)}", [code_dir], wt.path, env)

    def search() -> None:
        progress(f"bisecting {repo} from {good_sha[:10]} (good) to {bad_sha[:10]} (bad); log in {log_dir}")
        progress(f"rule: {opts.policy.describe()}")
        wt.add(good_sha)
        if opts.python_only:
            linked = wt.link_binaries(opts.src_subdir)
            res.notes.append(f"--python-only: {len(linked)} prebuilt {'binary' if len(linked) == 1 else 'binaries'} "
                             f"linked from {repo}"
                             + (f" ({', '.join(linked[:4])}{', ...' if len(linked) > 4 else ''})" if linked else ""))
            if not linked:
                progress(f"--python-only: no ignored *.so/*.pyd/*.dylib in {repo}; steps run on Python files only")
        good_end = judge_here("good end", good_sha)
        _check_ends(good_end, None, "commit")
        wt.checkout(bad_sha)
        bad_end = judge_here("bad end", bad_sha)
        _check_ends(good_end, bad_end, "commit")
        wt.discard_changes()
        out = wt.git(["bisect", "start", bad_sha, good_sha], check=False)
        wt.bisecting = True
        while True:
            text = out.output
            m = _FIRST_BAD.search(text)
            if m:
                sha = m.group(1)
                res.status = "found"
                res.first_bad = sha
                res.first_bad_label = f"{sha} {subject(sha)}"
                res.diffstat = git(["-c", "color.ui=never", "show", "--stat=100", "--format=", sha], repo).stdout.strip("\n")
                goods = [s for s in res.steps if s.verdict == "good"]
                parent = git(["rev-parse", "--verify", "--quiet", f"{sha}^"], repo, check=False).stdout.strip()
                last = next((s for s in goods if s.rev == parent), None)
                if last is not None:
                    res.last_good = last.label
                break
            many = _ANY_OF.search(text)
            if many:
                res.status = "inconclusive"
                res.candidates = [f"{c} {subject(c)}" for c in many.group(1).split()]
                break
            if not out.ok:
                raise BisectError(f"git bisect stopped: {text.strip().splitlines()[-1] if text.strip() else out.returncode}")
            sha = wt.head()
            st = judge_here("step", sha)
            wt.discard_changes()
            out = wt.git(["bisect", st.verdict, sha], check=False)
        log = wt.git(["bisect", "log"], check=False)
        (log_dir / "git-bisect.log").write_text(log.stdout)

    try:
        _finish(res, search, t0)
    finally:
        with _no_interrupts():
            if wt.bisecting:
                log = wt.git(["bisect", "log"], check=False)
                if log.ok and not (log_dir / "git-bisect.log").exists():
                    (log_dir / "git-bisect.log").write_text(log.stdout)
            problems = wt.cleanup()
            after = RepoState.of(repo)
            if after.head != before.head or after.branch != before.branch:
                problems.append(f"HEAD moved from {before.head[:12]} ({before.branch or 'detached'}) to "
                                f"{after.head[:12]} ({after.branch or 'detached'})")
            if after.worktrees != before.worktrees:
                problems.append("the worktree list changed; check `git worktree list`")
            if problems:
                res.notes.extend(f"clean-up: {p}" for p in problems)
                progress("clean-up problems: " + "; ".join(problems))
            write_log(res)
    return res


# ---- package versions ---------------------------------------------------------------------------------------


def _index_args(opts: BisectOptions) -> list[str]:
    args: list[str] = []
    if opts.index_url:
        args += ["--index-url", opts.index_url]
    for fl in opts.find_links:
        args += ["--find-links", fl]
    if opts.no_index:
        args.append("--no-index")
    return args


def _pip(args: list[str], timeout: float) -> ToolResult:
    return run_tool([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"], timeout=timeout,
                    env={"PIP_NO_INPUT": "1"})


def list_versions(package: str, opts: BisectOptions) -> list[str]:
    """Every version of `package` the index offers, oldest first (packaging.version order)."""
    from packaging.version import InvalidVersion, Version

    args = ["index", "versions", package, *_index_args(opts)]
    if opts.pre:
        args.append("--pre")
    try:
        res = _pip(args, timeout=300)
    except ToolTimeout as e:
        raise EnvironmentProblem(f"pip index versions {package} did not answer within 300 s; check the index") from e
    m = re.search(r"^Available versions:\s*(.+)$", res.stdout, re.MULTILINE)
    if not res.ok or not m:
        why = next((ln for ln in res.stderr.splitlines() if "ERROR" in ln), res.stderr.strip()[-200:])
        raise BisectError(f"--pip {package}: the package index lists no versions ({why or 'no output'}); "
                          "check the name, --index-url and --find-links")
    out: list[tuple[Version, str]] = []
    for raw in m.group(1).split(","):
        v = raw.strip()
        try:
            out.append((Version(v), v))
        except InvalidVersion:
            continue
    out.sort()
    return [v for _, v in out]


def _find_version(versions: list[str], want: str, flag: str, package: str) -> int:
    from packaging.version import InvalidVersion, Version

    try:
        target = Version(want)
    except InvalidVersion:
        raise BisectError(f"{flag} {want}: not a version (PEP 440), e.g. 0.6.8.post1") from None
    for i, v in enumerate(versions):
        if Version(v) == target:
            return i
    near = ", ".join(versions[-8:]) if versions else "none"
    hint = "; pre-releases are listed with --pre" if target.is_prerelease and not any(
        Version(v).is_prerelease for v in versions) else ""
    raise BisectError(f"{flag} {want}: the index has no such version of {package} (newest: {near}){hint}")


class VersionSearch:
    """Binary search over an ordered list whose first item is good and last is bad, with skips.

    `probe()` names the next index to test (the untested, unskipped one nearest the middle of the
    remaining range), or None when the search is over; `found()` then gives the first bad index, or
    `candidates()` the indices it could be when skipped items leave no way to tell.
    """

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ValueError("a search needs a good and a bad end")
        self.lo = 0
        self.hi = n - 1
        self.skipped: set[int] = set()

    def probe(self) -> int | None:
        cands = [i for i in range(self.lo + 1, self.hi) if i not in self.skipped]
        if not cands:
            return None
        mid = (self.lo + self.hi) / 2
        return min(cands, key=lambda i: (abs(i - mid), i))

    def mark(self, i: int, verdict: Verdict) -> None:
        if verdict == "good":
            self.lo = i
        elif verdict == "bad":
            self.hi = i
        else:
            self.skipped.add(i)

    def found(self) -> int | None:
        if self.probe() is None and not any(self.lo < i < self.hi for i in self.skipped):
            return self.hi
        return None

    def candidates(self) -> list[int]:
        return [i for i in range(self.lo + 1, self.hi + 1)]


def cache_root(opts: BisectOptions) -> Path:
    if opts.cache_dir is not None:
        return opts.cache_dir
    if os.environ.get("VDIAG_CACHE_DIR"):
        return Path(os.environ["VDIAG_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vdiag"


def version_env(package: str, version: str, opts: BisectOptions) -> tuple[Path | None, str]:
    """The cached environment of one version: (folder, "cached"/"installed"), or (None, why it failed)."""
    from packaging.utils import canonicalize_name

    pytag = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = cache_root(opts) / "envs" / f"{canonicalize_name(package)}-{version}-{pytag}"
    if (root / CACHE_MARKER).exists():
        return root, "cached"
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        try:
            res = _pip(["install", "--no-deps", "--no-input", "--quiet", "--target", str(tmp),
                        f"{package}=={version}", *_index_args(opts)], timeout=opts.install_timeout)
        except ToolTimeout:
            return None, f"pip install {package}=={version} did not finish within {opts.install_timeout:g} s"
        if not res.ok:
            last = next((ln for ln in reversed(res.output.splitlines()) if ln.strip()), "")
            return None, f"pip install {package}=={version} failed: {last.strip()[:200]}"
        (tmp / CACHE_MARKER).write_text(json.dumps({
            "package": package, "version": version, "python": sys.version.split()[0],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }) + "\n")
        try:
            os.replace(tmp, root)
        except OSError:  # another vdiag made it meanwhile
            if not (root / CACHE_MARKER).exists():
                raise
        return root, "installed"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bisect_pip(scenario: Path, package: str, good: str, bad: str, opts: BisectOptions,
               progress: Progress = lambda _m: None) -> BisectResult:
    """Find the first version in (good, bad] of `package` with which the scenario hangs."""
    from packaging.utils import canonicalize_name

    t0 = time.monotonic()
    name = preflight(scenario, opts.overrides, provides_vllm=canonicalize_name(package) == "vllm")
    progress(f"asking the package index for the versions of {package}")
    versions = list_versions(package, opts)
    gi = _find_version(versions, good, "--good", package)
    bi = _find_version(versions, bad, "--bad", package)
    if gi == bi:
        raise BisectError(f"--good {good} and --bad {bad} are the same version")
    if gi > bi:
        raise BisectError(
            f"--good {good} is newer than --bad {bad}: --good and --bad are the wrong way round; --good is the "
            "older version that starts cleanly, --bad the newer one that hangs"
        )
    span = versions[gi:bi + 1]
    log_dir = make_log_dir(opts.reports_dir, name, "bisect")
    bisect_scenario = log_dir / f"{name}.yaml"
    shutil.copyfile(scenario, bisect_scenario)
    res = BisectResult(mode="pip", target=package, scenario=str(scenario), good=span[0], bad=span[-1],
                       policy=opts.policy, log_dir=log_dir, versions=span)
    res.notes.append(f"environments: {cache_root(opts) / 'envs'} (pip install --no-deps --target; "
                     "everything else from vdiag's environment)")
    write_log(res)
    stepper = _Stepper(bisect_scenario, opts, res, progress)

    def judge_version(role: Literal["good end", "bad end", "step"], version: str) -> Step:
        label = f"{package} {version}"
        env_dir, how = version_env(package, version, opts)
        if env_dir is None:
            st = Step(role=role, rev=version, label=label, verdict="skip", reason=how,
                      started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            progress(f"[{role}] {label} -> skip ({how})")
            return stepper._done(st)
        progress(f"[{role}] {label}: environment {how} ({env_dir})")
        setup_env = {"VDIAG_BISECT_ENV": str(env_dir), "VDIAG_BISECT_REV": version}
        return stepper.judge(role, version, label, [env_dir], env_dir, setup_env)

    def search() -> None:
        progress(f"bisecting {package}: {len(span)} versions from {span[0]} (good) to {span[-1]} (bad); "
                 f"log in {log_dir}")
        progress(f"rule: {opts.policy.describe()}")
        good_end = judge_version("good end", span[0])
        _check_ends(good_end, None, "version")
        bad_end = judge_version("bad end", span[-1])
        _check_ends(good_end, bad_end, "version")
        s = VersionSearch(len(span))
        while (i := s.probe()) is not None:
            st = judge_version("step", span[i])
            s.mark(i, st.verdict)
        first = s.found()
        if first is not None:
            res.status = "found"
            res.first_bad = span[first]
            res.first_bad_label = f"{package} {span[first]}"
            res.last_good = f"{package} {span[s.lo]}"
        else:
            res.status = "inconclusive"
            res.candidates = [f"{package} {span[i]}" for i in s.candidates()]

    return _finish(res, search, t0)
