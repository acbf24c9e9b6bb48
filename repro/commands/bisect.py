"""`vdiag bisect` and `vdiag minimize`: parse, delegate to repro.bisect / repro.minimize, print the result."""

from __future__ import annotations

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
A step is bad at its first run that hangs (or gives wrong results), good after enough clean runs
(--confidence, --min-rate), skipped when --setup fails or a run crashes.

\b
Exit codes: 0 first bad commit/version found, 1 inconclusive (skipped steps leave several
candidates), 2 usage or scenario error (also: --good/--bad the wrong way round), 3 environment
error, 130 interrupted (the repository is restored).
"""

MINIMIZE_HELP = """Shrink a hanging scenario while it still hangs: fewer ranks, layers, capture sizes, faults.

\b
  vdiag minimize scenarios/mech-token-divergence.yaml

Writes <name>-min.yaml (or --out): a minimal reproducer from which removing any one fault, capture
size, layer or rank loses the hang. Prints how many runs the search took.

\b
Exit codes: 0 written, 2 the scenario does not hang (or is invalid), 3 environment error.
"""


def _progress(msg: str) -> None:
    sys.stderr.write(msg + "\n")  # one unwrapped line each: logs and CI keep them greppable
    sys.stderr.flush()


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
    max_runs: int = typer.Option(10, help="most runs of one step"),
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
    policy = StepPolicy(confidence=confidence, min_rate=min_rate, max_runs=max_runs)
    opts = BisectOptions(
        overrides=list(set_), reports_dir=reports, policy=policy, setup=setup, setup_timeout=setup_timeout,
        gpu_state=gpu_state, python_only=python_only, src_subdir=src_subdir, index_url=index_url,
        find_links=list(find_links), no_index=no_index, pre=pre, cache_dir=cache_dir,
    )
    if repo is not None:
        res = bisect_git(scenario, repo, good, bad, opts, _progress)
    else:
        res = bisect_pip(scenario, pip, good, bad, opts, _progress)
    for line in res.summary_lines():
        print(line)
    raise typer.Exit(res.exit_code)


def minimize_cmd(
    scenario: Path = typer.Argument(..., help="scenario YAML file that hangs"),
    out: Path = typer.Option(None, "--out", help="where to write the minimal scenario "
                             "(default: <reports>/<time>-minimize-<name>/<name>-min.yaml)"),
    tries: int = typer.Option(1, help="runs per candidate before calling it clean (for flaky hangs)"),
    max_runs: int = typer.Option(100, help="run budget of the whole search"),
    set_: list[str] = typer.Option([], "--set", help="override a scenario field first"),
    reports: Path = typer.Option(Path("reports"), help="where the minimize folder is created"),
    gpu_state: str = typer.Option("auto", help="GPU state collector: auto, attach, coredump or none"),
) -> None:
    from repro.minimize import MinimizeOptions, minimize

    opts = MinimizeOptions(overrides=list(set_), reports_dir=reports, out=out, tries=tries, max_runs=max_runs,
                           gpu_state=gpu_state)
    res = minimize(scenario, opts, _progress)
    _progress(f"minimal reproducer: {res.shape()}")
    _progress(f"found in {res.runs} runs ({res.seconds:.0f} s); log: {res.log_dir / 'minimize.md'}")
    print(res.out_path)
    print(f"{res.runs} runs")


def register(app: typer.Typer) -> None:
    app.command("bisect", help=BISECT_HELP)(bisect_cmd)
    app.command("minimize", help=MINIMIZE_HELP)(minimize_cmd)
