"""`vdiag bisect --repo`: real `git bisect` in a linked worktree of the user's repository."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from repro.bisect.common import (
    ONE_RUN,
    BisectError,
    BisectOptions,
    BisectResult,
    Progress,
    Step,
    make_log_dir,
    no_interrupts,
    preflight,
    until_reproduced,
)
from repro.bisect.judge import Stepper, bayes_search, check_ends, finish
from repro.bisect.log import write_log
from repro.errors import EnvironmentProblem, VdiagError
from repro.repeat import StepPolicy
from repro.tools import ToolResult, run_tool, which

GIT_TIMEOUT_S = 300.0
BINARY_SUFFIXES = (".so", ".pyd", ".dylib")


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
    name = preflight(scenario, opts.overrides, provides_vllm=True, reads_source=True)
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
    is_ancestor = git(["merge-base", "--is-ancestor", good_sha, bad_sha], repo, check=False).ok
    lin: list[str] = []
    if opts.search == "bayes":
        if not is_ancestor:
            raise BisectError(f"--search bayes: --good {good} is not an ancestor of --bad {bad}; give a --good on "
                              "the history of --bad (or use --search rule, which lets git bisect test merge bases)")
        revs = git(["rev-list", "--reverse", "--first-parent", "--ancestry-path", f"{good_sha}..{bad_sha}"], repo)
        lin = [good_sha, *revs.stdout.split()]
        if lin[-1] != bad_sha:
            raise BisectError(f"--search bayes: --bad {bad} is not on the first-parent line from --good {good}")
    res = BisectResult(mode="git", target=str(repo), scenario=str(scenario), good=good_sha, bad=bad_sha,
                       policy=opts.policy, log_dir=log_dir, search=opts.search, rule_text=opts.search_text())
    if opts.search == "bayes":
        res.notes.append(f"{len(lin) - 2} commits between the ends on the first-parent line (oldest first)")
    if not is_ancestor:
        res.notes.append("--good is not an ancestor of --bad: git bisect tests their merge base first")
    write_log(res)
    wt = Worktree(repo)
    stepper = Stepper(bisect_scenario, opts, res, progress)
    code_dir = wt.path / opts.src_subdir if opts.src_subdir else wt.path
    setup_env = {"VDIAG_BISECT_CHECKOUT": str(wt.path)}
    if opts.python_only:
        setup_env["VLLM_USE_PRECOMPILED"] = "1"

    def subject(sha: str) -> str:
        return git(["log", "-1", "--format=%s", sha], repo).stdout.strip()

    def judge_here(role: Literal["good end", "bad end", "step"], sha: str, policy: StepPolicy | None = None,
                   setup: bool = True) -> Step:
        env = dict(setup_env, VDIAG_BISECT_REV=sha)
        return stepper.judge(role, sha, f"{sha[:10]} {subject(sha)}", [code_dir], wt.path, env, policy, code_dir,
                             setup)

    def search() -> None:
        progress(f"bisecting {repo} from {good_sha[:10]} (good) to {bad_sha[:10]} (bad); log in {log_dir}")
        progress(f"rule: {res.rule_text}")
        wt.add(good_sha)
        if opts.python_only:
            linked = wt.link_binaries(opts.src_subdir)
            res.notes.append(f"--python-only: {len(linked)} prebuilt {'binary' if len(linked) == 1 else 'binaries'} "
                             f"linked from {repo}"
                             + (f" ({', '.join(linked[:4])}{', ...' if len(linked) > 4 else ''})" if linked else ""))
            if not linked:
                progress(f"--python-only: no ignored *.so/*.pyd/*.dylib in {repo}; steps run on Python files only")
        if opts.search == "bayes":
            bayes(lin)
            return
        good_end = judge_here("good end", good_sha)
        check_ends(good_end, None, "commit")
        wt.checkout(bad_sha)
        bad_end = judge_here("bad end", bad_sha)
        check_ends(good_end, bad_end, "commit")
        wt.discard_changes()
        out = wt.git(["bisect", "start", bad_sha, good_sha], check=False)
        wt.bisecting = True
        while True:
            text = out.output
            m = _FIRST_BAD.search(text)
            if m:
                found(m.group(1))
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

    def found(sha: str) -> None:
        res.status = "found"
        res.first_bad = sha
        res.first_bad_label = f"{sha} {subject(sha)}"
        res.diffstat = git(["-c", "color.ui=never", "show", "--stat=100", "--format=", sha], repo).stdout.strip("\n")
        goods = [s for s in res.steps if s.verdict == "good"]
        parent = git(["rev-parse", "--verify", "--quiet", f"{sha}^"], repo, check=False).stdout.strip()
        last = next((s for s in goods if s.rev == parent), None)
        if last is not None:
            res.last_good = last.label

    def bayes(shas: list[str]) -> None:
        good_end = judge_here("good end", good_sha, ONE_RUN)
        check_ends(good_end, None, "commit")
        wt.checkout(bad_sha)
        bad_end = judge_here("bad end", bad_sha, until_reproduced(opts.policy.max_runs))
        check_ends(good_end, bad_end, "commit")
        labels = [f"{sha[:10]} {subject(sha)}" for sha in shas]

        current = {"sha": bad_sha, "ready": bad_end.verdict != "skip"}

        def at(i: int) -> Step:
            # runs of the commit that is checked out already (and whose --setup passed) need no new checkout
            same = current["sha"] == shas[i] and current["ready"]
            if not same:
                wt.checkout(shas[i])
            st = judge_here("step", shas[i], ONE_RUN, setup=not same)
            current.update(sha=shas[i], ready=st.verdict != "skip")
            return st

        first, cands = bayes_search(res, labels, (good_end, bad_end), at, opts, progress)
        wt.discard_changes()
        if first is not None:
            found(shas[first])
        else:
            res.status = "inconclusive"
            res.candidates = [f"{shas[c]} {subject(shas[c])}" for c in cands]

    try:
        finish(res, search, t0)
    finally:
        with no_interrupts():
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


