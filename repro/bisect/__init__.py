"""`vdiag bisect` and `vdiag minimize`: the commit or package version that brought a hang in, and the
smallest scenario that still hangs.

Commits (`--repo`)
------------------
vdiag drives real `git bisect` in a linked worktree of the repository (`git worktree add --detach` under a
temporary folder), so the user's own checkout, branch, index and uncommitted changes are never touched,
and its bisect state (per worktree in git) never mixes with one the user may have going. Each step:

1. `--setup CMD` (when given) runs in the step's checkout; a non-zero exit or a timeout makes the step
   `skip` (a commit that does not build cannot be judged);
2. `vdiag run` replays the scenario with the checkout (or `--src-subdir` of it) first on the workers'
   PYTHONPATH, so the scenario's `hook:` (and anything it imports) comes from that commit; with the
   built-in `hook: vllm-source` nothing is imported: the checkout's fusion gate, workspace call and
   FlashInfer pin are read (repro.bisect.vllm_source) and passed to the replay as overrides, and a fact
   that cannot be read skips the step;
3. the runs are judged by `repro.repeat.judge`: a hang or wrong results -> `git bisect bad`, only clean
   runs -> `git bisect good`, a crash (import error, dead worker) -> `git bisect skip`.

`--search bayes` replaces steps 3 and git bisect: one run at a time over the first-parent line, where a
posterior over the first bad commit expects to learn most, until one commit reaches --confidence
(repro.bisect.bayes).

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

Modules
-------
common (options, records, pre-flight, log folder, worker environment), log (bisect.md/json), judge (one
step: --setup, runs, verdict), git (--repo), pip (--pip), bayes (the flake-aware search, --search bayes),
vllm_source (the built-in `hook: vllm-source`), minimize (`vdiag minimize`).
"""

from __future__ import annotations

from repro.bisect.common import BisectError, BisectOptions, BisectResult, Step, make_log_dir, preflight
from repro.bisect.git import bisect_git
from repro.bisect.pip import VersionSearch, bisect_pip, list_versions

__all__ = [
    "BisectError", "BisectOptions", "BisectResult", "Step", "VersionSearch", "bisect_git", "bisect_pip",
    "list_versions", "make_log_dir", "preflight",
]
