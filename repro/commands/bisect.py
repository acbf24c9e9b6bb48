"""`vdiag bisect`: parse, delegate to repro.bisect, print the result."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from repro.errors import ScenarioError

BISECT_HELP = """Find the commit (--repo) or package version (--pip) that made a scenario hang.

\b
  vdiag bisect hang.yaml --repo ~/vllm --good v0.10.0 --bad main --python-only
  vdiag bisect hang.yaml --pip flashinfer-python --good 0.6.8.post1 --bad 0.6.11.post2

Drives real `git bisect` in a temporary worktree (your checkout is never touched); each step runs
`vdiag run` with the checkout first on the workers' PYTHONPATH (the scenario's `hook:` comes from it).
The search (--search bayes, the default) keeps a posterior over which commit is the first bad one,
knowing that a bad commit may run clean (--repro-rate, learned when not given) and a good one may fail
for an unrelated reason (--false-fail-rate); it runs where it learns most and stops when one commit
reaches --confidence. --search rule is the plain binary search: a step is bad at its first run that
hangs (or gives wrong results), good after enough clean runs (--confidence, --min-rate). A step is
skipped when --setup fails or a run crashes.
`hook: vllm-source` in the scenario reads the fusion gate, the workspace group and the FlashInfer
pin from each vLLM checkout (CPU only; see docs/bisect.md).

\b
Exit codes: 0 first bad commit/version found, 1 inconclusive (skipped steps leave several
candidates), 2 usage or scenario error (also: --good/--bad the wrong way round), 3 environment
error, 130 interrupted (the repository is restored).
"""

def progress_line(msg: str) -> None:
    sys.stderr.write(msg + "\n")  # one unwrapped line each: logs and CI keep them greppable
    sys.stderr.flush()


def _platform_sm(text: str) -> int:
    m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d)", text.strip().lower()) or re.fullmatch(r"sm_?(\d+)(\d)", text.strip().lower())
    sm = int(m.group(1)) * 10 + int(m.group(2)) if m else 0
    if sm // 10 not in (9, 10):
        raise ScenarioError(f"--platform {text!r}: give the CUDA SM the fusion gate is evaluated for: 9.0 (Hopper) "
                            "or 10.x (Blackwell), e.g. --platform 10.0")
    return sm


def bisect_cmd(
    scenario: Path = typer.Argument(..., help="scenario YAML file that hangs at --bad"),
    repo: Path = typer.Option(None, "--repo", help="git repository to bisect (commits)"),
    pip: str = typer.Option(None, "--pip", help="package to bisect (versions from the package index)"),
    good: str = typer.Option(..., "--good", help="a commit or version whose start-up is clean"),
    bad: str = typer.Option(..., "--bad", help="a commit or version that hangs"),
    setup: str = typer.Option(None, "--setup", help="shell command run in each step's checkout first; "
                              "non-zero exit skips the step (e.g. 'pip install -e .')"),
    setup_timeout: float = typer.Option(3600.0, help="seconds --setup may take before the step is skipped"),
    python_only: bool = typer.Option(False, "--python-only", help="checkout on prebuilt binaries "
                                     "(VLLM_USE_PRECOMPILED): link the checkout's compiled files, build nothing"),
    src_subdir: str = typer.Option("", help="folder of the repository to put on PYTHONPATH (default: its root)"),
    confidence: float = typer.Option(0.95, help="how sure a good verdict must be"),
    min_rate: float = typer.Option(0.3, help="the lowest hang rate to rule out before calling a step good "
                                   "(1: the hang is deterministic, one run per step)"),
    max_runs: int = typer.Option(10, help="most runs of one step (--search bayes: of the bad end, run until it reproduces)"),
    search: str = typer.Option("bayes", help="bayes (default): flake-aware Bayesian search, stops at --confidence; "
                               "rule: binary search, each step good after enough clean runs (--confidence, --min-rate)"),
    repro_rate: float = typer.Option(None, help="--search bayes: how often a bad commit reproduces "
                                     "(default: learned from the runs)"),
    false_fail_rate: float = typer.Option(0.01, help="--search bayes: how often a good commit fails for an "
                                          "unrelated reason"),
    max_total_runs: int = typer.Option(60, help="--search bayes: run budget of the whole search"),
    platform: str = typer.Option("9.0", help="hook: vllm-source: the CUDA SM the gate is evaluated for "
                                 "(9.0, 10.0, 10.3...)"),
    set_: list[str] = typer.Option([], "--set", help="override a scenario field: --set model.num_layers=4"),
    reports: Path = typer.Option(Path("reports"), help="where the bisect folder is created"),
    gpu_state: str = typer.Option("auto", help="GPU state collector: auto, attach, coredump or none"),
    index_url: str = typer.Option(None, help="--pip: package index URL (pip's --index-url)"),
    find_links: list[str] = typer.Option([], "--find-links", help="--pip: extra folder or page of packages"),
    no_index: bool = typer.Option(False, "--no-index", help="--pip: only --find-links, no index"),
    pre: bool = typer.Option(False, "--pre", help="--pip: include pre-releases"),
    cache_dir: Path = typer.Option(None, help="--pip: cache of per-version environments "
                                   "(default $VDIAG_CACHE_DIR or ~/.cache/vdiag)"),
) -> None:
    from repro.bisect import BisectOptions, bisect_git, bisect_pip
    from repro.repeat import StepPolicy

    if (repo is None) == (pip is None):
        raise ScenarioError("vdiag bisect: give exactly one of --repo PATH (commits) or --pip PACKAGE (versions)")
    if gpu_state not in ("auto", "attach", "coredump", "none"):
        raise ScenarioError(f"--gpu-state {gpu_state!r}: allowed values are auto, attach, coredump, none")
    if pip is not None and (python_only or src_subdir):
        raise ScenarioError("--python-only and --src-subdir are for --repo; --pip installs each version")
    if search not in ("rule", "bayes"):
        raise ScenarioError(f"--search {search!r}: allowed values are rule, bayes")
    if repro_rate is not None and not 0.0 < repro_rate <= 1.0:
        raise ScenarioError(f"--repro-rate {repro_rate}: give a rate in (0, 1], e.g. 0.5")
    if not 0.0 <= false_fail_rate < 1.0:
        raise ScenarioError(f"--false-fail-rate {false_fail_rate}: give a rate in [0, 1), e.g. 0.01")
    if max_total_runs < 1:
        raise ScenarioError(f"--max-total-runs {max_total_runs}: give at least 1")
    sm = _platform_sm(platform)
    if search == "bayes":  # --min-rate is the rule's; the search's confidence is the posterior's
        policy = StepPolicy(confidence=confidence, min_rate=1.0, max_runs=max_runs)
    else:
        policy = StepPolicy(confidence=confidence, min_rate=min_rate, max_runs=max_runs)
    opts = BisectOptions(
        overrides=list(set_), reports_dir=reports, policy=policy, setup=setup, setup_timeout=setup_timeout,
        gpu_state=gpu_state, python_only=python_only, src_subdir=src_subdir, index_url=index_url,
        find_links=list(find_links), no_index=no_index, pre=pre, cache_dir=cache_dir,
        search="bayes" if search == "bayes" else "rule", repro_rate=repro_rate, false_fail_rate=false_fail_rate,
        max_total_runs=max_total_runs, platform_sm=sm,
    )
    if repo is not None:
        res = bisect_git(scenario, repo, good, bad, opts, progress_line)
    else:
        res = bisect_pip(scenario, pip, good, bad, opts, progress_line)
    for line in res.summary_lines():
        print(line)
    raise typer.Exit(res.exit_code)


def register(app: typer.Typer) -> None:
    app.command("bisect", help=BISECT_HELP)(bisect_cmd)
