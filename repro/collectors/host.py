"""The host-side collectors, in parallel: the environment, py-spy stacks and the file locks ranks hold.

Native stacks go where the wait is (`native`), Python-only stacks elsewhere (`rest`); the locks collector
reads /proc/locks for `lock_pids`. A collector that raises is recorded as a failed CollectorRun and does
not stop the others. Used by `vdiag run` (repro/run.py) and by watch/attach (repro/observe/collect.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from repro.collectors.environment import collect_env
from repro.collectors.locks import collect_locks
from repro.collectors.stacks import collect_stacks
from repro.records import CollectorRun, EnvInfo, StackSample
from repro.rundir import RunDir


def collect_host(
    run_dir: RunDir, scenario_yaml: str, native: dict[int, int], rest: dict[int, int], lock_pids: dict[int, int]
) -> tuple[EnvInfo, list[StackSample], list[CollectorRun]]:
    """{rank: pid} maps in; the environment, the stacks and every collector's record out."""
    jobs: dict[str, Callable[[], Any]] = {"env": lambda: collect_env(run_dir, scenario_yaml)}
    if native:
        jobs["stacks"] = lambda: collect_stacks(native, run_dir)
    if rest:
        jobs["stacks-python"] = lambda: collect_stacks(rest, run_dir, native=False)
    if lock_pids:
        jobs["locks"] = lambda: collect_locks(lock_pids, run_dir)  # file locks held by a rank: locks.json
    env = EnvInfo()
    stacks: list[StackSample] = []
    runs: list[CollectorRun] = []
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(jobs)) as ex:
        futs = {name: ex.submit(fn) for name, fn in jobs.items()}
        for name, fut in futs.items():
            try:
                res = fut.result()
            except Exception as e:  # a collector bug must not lose the others' evidence
                runs.append(CollectorRun(name=name, ok=False, seconds=round(time.monotonic() - t0, 3),
                                         error=f"{type(e).__name__}: {e}"))
                continue
            if name == "env":
                env = res
                runs.append(CollectorRun(name="environment", ok=True, seconds=round(time.monotonic() - t0, 3),
                                         artifact=str(run_dir.env_json.relative_to(run_dir.root))))
            elif name == "locks":
                runs.extend(res[1])
            else:
                st, r = res
                stacks.extend(st)
                runs.extend(r)
    return env, stacks, runs
