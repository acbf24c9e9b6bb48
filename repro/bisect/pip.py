"""`vdiag bisect --pip`: package versions from the index, one cached environment per version."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
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
    preflight,
    until_reproduced,
)
from repro.bisect.judge import Stepper, bayes_search, check_ends, finish
from repro.bisect.log import write_log
from repro.errors import EnvironmentProblem
from repro.repeat import StepPolicy, Verdict
from repro.tools import ToolResult, ToolTimeout, run_tool

CACHE_MARKER = ".vdiag-env.json"


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
                       policy=opts.policy, log_dir=log_dir, versions=span, search=opts.search,
                       rule_text=opts.search_text())
    res.notes.append(f"environments: {cache_root(opts) / 'envs'} (pip install --no-deps --target; "
                     "everything else from vdiag's environment)")
    write_log(res)
    stepper = Stepper(bisect_scenario, opts, res, progress)

    def judge_version(role: Literal["good end", "bad end", "step"], version: str,
                      policy: StepPolicy | None = None) -> Step:
        label = f"{package} {version}"
        env_dir, how = version_env(package, version, opts)
        if env_dir is None:
            st = Step(role=role, rev=version, label=label, verdict="skip", reason=how,
                      started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            progress(f"[{role}] {label} -> skip ({how})")
            return stepper._done(st)
        progress(f"[{role}] {label}: environment {how} ({env_dir})")
        setup_env = {"VDIAG_BISECT_ENV": str(env_dir), "VDIAG_BISECT_REV": version}
        return stepper.judge(role, version, label, [env_dir], env_dir, setup_env, policy)

    def search() -> None:
        progress(f"bisecting {package}: {len(span)} versions from {span[0]} (good) to {span[-1]} (bad); "
                 f"log in {log_dir}")
        progress(f"rule: {res.rule_text}")
        if opts.search == "bayes":
            good_end = judge_version("good end", span[0], ONE_RUN)
            check_ends(good_end, None, "version")
            bad_end = judge_version("bad end", span[-1], until_reproduced(opts.policy.max_runs))
            check_ends(good_end, bad_end, "version")
            labels = [f"{package} {v}" for v in span]
            first_i, cands = bayes_search(res, labels, (good_end, bad_end),
                                          lambda i: judge_version("step", span[i], ONE_RUN), opts, progress)
            if first_i is not None:
                res.status = "found"
                res.first_bad = span[first_i]
                res.first_bad_label = labels[first_i]
                prev = next((st for st in res.steps if st.rev == span[first_i - 1] and st.verdict == "good"), None)
                res.last_good = prev.label if prev is not None else None
            else:
                res.status = "inconclusive"
                res.candidates = [labels[c] for c in cands]
            return
        good_end = judge_version("good end", span[0])
        check_ends(good_end, None, "version")
        bad_end = judge_version("bad end", span[-1])
        check_ends(good_end, bad_end, "version")
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

    return finish(res, search, t0)

