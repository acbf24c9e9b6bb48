"""`vdiag doctor`: can this machine catch and diagnose a start-up hang? Checks, then a live self-test.

Every check returns a `Check` with a status:

| status | meaning |
|---|---|
| ok   | works |
| warn | vdiag still catches and diagnoses a hang here, with less evidence (the fix says how to get it back) |
| fail | vdiag cannot catch or diagnose a hang here: `vdiag doctor` exits 3 (environment error) |
| skip | not applicable on this machine (no GPU, a self-test not asked for) |

What is fatal and what is a warning, and why:

- fatal: torch missing, `python -m torch.distributed.run` (torchrun) not starting, /dev/shm not writable or
  nearly full (the sim's workspaces live there), and a self-test that does not catch the planted deadlock or
  names the wrong cause. Without those there is no run to watch, or the verdict cannot be trusted.
- warnings: py-spy missing, ptrace refused, even together with a faulthandler fallback that does not work.
  The verdict comes from the launch logs (which call each rank launched and never finished) and the
  watchdog's activity (which ranks burn a core and which idle); stacks only confirm where each rank waits.
  So a machine without any stacks still diagnoses a hang, and the report says stacks are missing.
- warnings on a GPU machine (skip without a GPU): NVML missing (no GPU utilisation next to CPU time),
  cuda-gdb missing (no kernel grid/blocks from the GPU), a GPU whose architecture the fused all-reduce
  does not support, flashinfer-python missing (only the sim replays the kernel's protocols).

The self-test plants a two-rank missing-peer deadlock (rank 1's workspace creation fails, it falls back to
the unfused path, rank 0 spins in the one-shot Lamport poll) and runs it through the whole pipeline: it
passes when the verdict is `spin-deadlock` with rank 0 spinning and the top hypothesis is `missing-peer`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import io
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from repro.tools import (
    INSTALL_ADVICE,
    ToolMissing,
    ToolTimeout,
    looks_like_ptrace_denied,
    ptrace_advice,
    run_tool,
    which,
)

Status = Literal["ok", "warn", "fail", "skip"]

SHM_DIR = Path("/dev/shm")
SHM_FAIL_BYTES = 16 * 1024 * 1024  # the sim needs about 1-5 MB per rank
SHM_WARN_BYTES = 1024 * 1024 * 1024  # NCCL and vLLM's shared-memory broadcast want far more than Docker's 64 MB
SHM_FIX = "give the container more shared memory: docker run --shm-size=16g (or --ipc=host)"
FUSED_SM = "SM 9.0 or 10.x"  # vLLM's gate for FlashInfer's fused all-reduce + RMSNorm (docs/mechanisms.md)
FLASHINFER_FIX = "pip install -e .[flashinfer] (flashinfer-python and nvidia-ml-py)"

SELFTEST_YAML = """\
# vdiag doctor's planted deadlock: rank 1's workspace creation fails and it falls back to the unfused
# path; rank 0 launches the fused kernel and spins in the one-shot Lamport poll for a peer that never comes.
name: doctor-selftest-{kind}
model: {{preset: llama-3.1-70b, num_layers: 1}}
parallel: {{tp: 2, pp: 1}}
capture: {{sizes: [8]}}
fusion: {{allreduce_rms: "on", oneshot: vllm, workspace_group: tp}}
backend: {backend}
faults:
  - kind: workspace_fail
    rank: 1
expect: hang
"""

# A child that reports "ready" on a pipe, then sleeps in a function the stack dump must name.
_CHILD = r"""
import ctypes, faulthandler, os, signal, sys, time
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # die with vdiag doctor
except Exception:
    pass
if sys.argv[2] != "-":
    faulthandler.register(signal.SIGUSR1, file=open(sys.argv[2], "w"), all_threads=True, chain=False)
def vdiag_doctor_waits_here():
    os.write(int(sys.argv[1]), b"ready\n")
    while True:
        time.sleep(60)
vdiag_doctor_waits_here()
"""
CHILD_FUNCTION = "vdiag_doctor_waits_here"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class DoctorResult:
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    @property
    def exit_code(self) -> int:
        from repro.errors import ExitCode

        return int(ExitCode.ENVIRONMENT) if self.failed else int(ExitCode.CLEAN)

    def summary(self) -> str:
        if self.failed:
            names = ", ".join(c.name for c in self.failed)
            return f"vdiag cannot diagnose a hang on this machine: {names} failed (exit 3); see the fixes above"
        warn = f" ({len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}: less evidence)" \
            if self.warnings else ""
        return f"vdiag can catch and diagnose a start-up hang on this machine{warn}"


# ---- small helpers -----------------------------------------------------------------------------------


def _version(*dists: str) -> str:
    for d in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(d)
    return ""


def _gpu_device_nodes() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists()


def _nvml_gpus() -> tuple[str, list[tuple[str, int | None]], str]:
    """(driver, [(name, sm_version)], error). NVML absent or without a GPU gives an error text."""
    try:
        import pynvml
    except ImportError:
        return "", [], "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return "", [], f"NVML did not start ({e})"
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        driver = drv.decode() if isinstance(drv, bytes) else str(drv)
        gpus: list[tuple[str, int | None]] = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            sm: int | None = None
            with contextlib.suppress(Exception):
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                sm = int(major) * 10 + int(minor)
            gpus.append((name.decode() if isinstance(name, bytes) else str(name), sm))
        return driver, gpus, ""
    except Exception as e:
        return "", [], f"NVML error ({e})"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def fused_supported(sm: int | None) -> bool:
    return sm is not None and (sm == 90 or 100 <= sm < 110)


@contextlib.contextmanager
def _waiting_child(fh_file: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A Python child that is inside CHILD_FUNCTION when this yields; killed on exit."""
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(w), str(fh_file) if fh_file else "-"],
        pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 15)
        line = os.read(r, 64) if ready else b""
        os.close(r)
        if not line.startswith(b"ready"):
            raise RuntimeError(f"the test child did not start (exit {proc.poll()})")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def _ptrace_context() -> str:
    """What the kernel says about ptrace here: Yama's scope and whether this process has CAP_SYS_PTRACE."""
    parts = []
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
        parts.append(f"kernel.yama.ptrace_scope={scope}")
    except OSError:
        parts.append("no Yama LSM")
    try:
        m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", Path("/proc/self/status").read_text(), re.MULTILINE)
        if m:
            parts.append("CAP_SYS_PTRACE " + ("held" if int(m[1], 16) >> 19 & 1 else "not held"))
    except OSError:
        pass
    prefix = os.environ.get("VDIAG_COLLECTOR_PREFIX", "").strip()
    if prefix:
        parts.append(f"collectors run under VDIAG_COLLECTOR_PREFIX={prefix!r}")
    return "; ".join(parts)


# ---- the checks --------------------------------------------------------------------------------------


def check_torch() -> Check:
    v = _version("torch")
    if not v:
        return Check("torch", "fail", "torch is not installed: nothing can launch the ranks",
                     "pip install torch (or `make install`)")
    return Check("torch", "ok", f"torch {v}")


def check_torchrun() -> Check:
    path = which("torchrun")
    try:
        res = run_tool([sys.executable, "-m", "torch.distributed.run", "--help"], timeout=60)
    except (ToolMissing, ToolTimeout) as e:
        return Check("torchrun", "fail", str(e), INSTALL_ADVICE["torchrun"])
    if res.returncode != 0 or "--nproc-per-node" not in res.stdout.replace("_", "-"):
        tail = res.output.strip().splitlines()[-1:] or ["no output"]
        return Check("torchrun", "fail", f"`python -m torch.distributed.run` does not start: {tail[0][:200]}",
                     INSTALL_ADVICE["torchrun"])
    where = f"; torchrun on PATH: {path}" if path else "; no torchrun on PATH (vdiag runs it as `python -m`)"
    return Check("torchrun", "ok", f"python -m torch.distributed.run starts{where}")


def check_optional_packages(has_gpu: bool) -> list[Check]:
    out = []
    fi = _version("flashinfer-python", "flashinfer")
    if fi:
        out.append(Check("flashinfer", "ok", f"flashinfer-python {fi}"))
    elif has_gpu:
        out.append(Check("flashinfer", "warn",
                         "not installed: only the sim can replay the fused all-reduce on this GPU machine",
                         FLASHINFER_FIX))
    else:
        out.append(Check("flashinfer", "skip", "not installed (needed only for backend: flashinfer, on a GPU)"))
    vl = _version("vllm")
    if vl:
        out.append(Check("vllm", "ok", f"vllm {vl}"))
    else:
        out.append(Check("vllm", "skip", "not installed (needed only for engine: vllm); the replay does not use it",
                         "pip install -e .[vllm]"))
    return out


def check_shm(path: Path = SHM_DIR) -> Check:
    if not path.is_dir():
        return Check("/dev/shm", "fail", f"{path} does not exist: the sim's workspaces and NCCL need it", SHM_FIX)
    probe = path / f".vdiag-doctor-probe-{os.getpid()}"  # not a run's name: sweeps ignore it
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
    except OSError as e:
        return Check("/dev/shm", "fail", f"cannot write to {path}: {e.strerror}", SHM_FIX)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    usage = shutil.disk_usage(path)
    free_mb = usage.free / 2**20
    detail = f"{free_mb:,.0f} MiB free of {usage.total / 2**20:,.0f} MiB, writable"
    if usage.free < SHM_FAIL_BYTES:
        return Check("/dev/shm", "fail", detail + ": too little for the ranks' workspaces", SHM_FIX)
    if usage.free < SHM_WARN_BYTES:
        return Check("/dev/shm", "warn", detail + ": enough for the sim, too little for NCCL or real vLLM", SHM_FIX)
    return Check("/dev/shm", "ok", detail)


def check_pyspy() -> Check:
    path = which("py-spy")
    if path is None:
        return Check("py-spy", "warn", "not installed: stacks fall back to Python's faulthandler (no native frames)",
                     INSTALL_ADVICE["py-spy"])
    try:
        res = run_tool(["py-spy", "--version"], timeout=10)
        ver = res.stdout.strip() or "py-spy"
    except (ToolMissing, ToolTimeout) as e:
        return Check("py-spy", "warn", str(e), INSTALL_ADVICE["py-spy"])
    return Check("py-spy", "ok", f"{ver} ({path})")


def check_ptrace() -> Check:
    """Really attach: start a Python child and `py-spy dump` it, as the stack collector does."""
    if which("py-spy") is None:
        return Check("ptrace", "skip", "py-spy is not installed, so nothing attaches; see the py-spy row")
    ctx = _ptrace_context()
    try:
        with _waiting_child() as child:
            res = run_tool(["py-spy", "dump", "--pid", str(child.pid)], timeout=20, attach=True)
    except ToolMissing as e:
        return Check("ptrace", "warn", str(e), e.advice)
    except ToolTimeout as e:
        return Check("ptrace", "warn", f"{e} while attaching to a test child ({ctx})")
    except RuntimeError as e:
        return Check("ptrace", "warn", str(e))
    if res.returncode == 0 and CHILD_FUNCTION in res.stdout:
        return Check("ptrace", "ok", f"py-spy attached to a test child and named its function ({ctx})")
    first = next((ln.strip() for ln in res.output.splitlines() if ln.strip()), "no output")
    if looks_like_ptrace_denied(res.output):
        return Check("ptrace", "warn",
                     f"ptrace denied: py-spy could not attach to a test child ({first[:160]}; {ctx}); "
                     "stacks fall back to faulthandler", ptrace_advice("py-spy"))
    return Check("ptrace", "warn", f"py-spy dump of a test child failed: {first[:200]} ({ctx})",
                 "see py-spy's message; `py-spy dump --pid PID` by hand shows it in full")


def check_faulthandler() -> Check:
    """The fallback where py-spy cannot attach: SIGUSR1 to a child with faulthandler registered."""
    from repro.collectors.stacks import faulthandler_dump
    from repro.rundir import RunDir

    with tempfile.TemporaryDirectory(prefix="vdiag-doctor-fh-") as tmp:
        rd = RunDir(Path(tmp))
        (rd.root / "stacks").mkdir()
        try:
            with _waiting_child(rd.faulthandler_file(0)) as child:
                sample, run = faulthandler_dump(0, child.pid, rd, reason="doctor")
                alive = child.poll() is None
        except RuntimeError as e:
            return Check("faulthandler", "warn", str(e))
    funcs = [f.function for t in (sample.threads if sample else []) for f in t.frames]
    if run.ok and CHILD_FUNCTION in funcs and alive:
        return Check("faulthandler", "ok", "SIGUSR1 dump of a test child read back (the fallback without ptrace)")
    return Check("faulthandler", "warn",
                 f"fallback stacks unavailable: {run.error or 'the dump did not name the test function'}; "
                 "reports will lack stacks where py-spy cannot attach (the verdict still comes from the "
                 "launch logs and the activity)", run.advice or "run vdiag as the workers' user")


def check_nvml() -> tuple[Check, list[tuple[str, int | None]]]:
    driver, gpus, err = _nvml_gpus()
    devices = _gpu_device_nodes()
    if err:
        if devices:
            return Check("NVML", "warn", f"{err}, but this machine has NVIDIA devices: no GPU utilisation "
                         "or power in the activity", "pip install nvidia-ml-py"), []
        return Check("NVML", "skip", f"{err}; no NVIDIA driver here (the sim needs none)"), []
    if not gpus:
        return Check("NVML", "skip", f"driver {driver}, no GPU visible"), []
    return Check("NVML", "ok", f"driver {driver}, {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"), gpus


def check_gpus(gpus: list[tuple[str, int | None]]) -> Check:
    if not gpus:
        return Check("GPUs", "skip", "no GPU: the sim backend (CPU shared memory) replays the kernel's protocols")
    desc = "; ".join(f"{i}: {n} (" + (f"sm_{sm}" if sm else "sm unknown") + ")" for i, (n, sm) in enumerate(gpus))
    bad = [i for i, (_, sm) in enumerate(gpus) if not fused_supported(sm)]
    if bad:
        return Check("GPUs", "warn", f"{desc}: FlashInfer's fused all-reduce needs {FUSED_SM} (vLLM's gate); "
                     f"GPU {', '.join(map(str, bad))} can run backend: nccl or sim only",
                     "use an H100/H200 (sm_90) or B200 (sm_100) to replay the real kernel")
    return Check("GPUs", "ok", desc)


def check_cuda_gdb(has_gpu: bool) -> Check:
    path = which("cuda-gdb")
    if path is None:
        if has_gpu:
            return Check("cuda-gdb", "warn", "not installed: no kernel grid or running blocks from the hung GPU",
                         INSTALL_ADVICE["cuda-gdb"])
        return Check("cuda-gdb", "skip", "not installed (it reads GPU kernel state; no GPU here)")
    try:
        res = run_tool([path, "--version"], timeout=30)
        # "NVIDIA (R) cuda-gdb 13.0" (the wrapper may print an "exec: ..." line first)
        lines = [ln.strip() for ln in res.output.splitlines() if ln.strip() and not ln.startswith("exec:")]
        ver = next((ln for ln in lines if "cuda-gdb" in ln.lower()), lines[0] if lines else "cuda-gdb")
    except (ToolMissing, ToolTimeout) as e:
        return Check("cuda-gdb", "warn", str(e), INSTALL_ADVICE["cuda-gdb"])
    return Check("cuda-gdb", "ok", f"{ver} ({path})")


# ---- the live self-test ------------------------------------------------------------------------------


def run_selftest(kind: str, backend: str, keep: bool = False) -> Check:
    """Plant the two-rank missing-peer deadlock, run the whole pipeline on it, and judge the verdict."""
    from rich.console import Console

    from repro.errors import VdiagError
    from repro.run import RunOptions, run_scenario

    name = f"self-test ({kind})"
    tmp = Path(tempfile.mkdtemp(prefix=f"vdiag-doctor-{kind}-"))
    scenario = tmp / "selftest.yaml"
    scenario.write_text(SELFTEST_YAML.format(kind=kind, backend=backend))
    opts = RunOptions(reports_dir=tmp / "reports", live=False, quiet=True)
    ok = False
    t0 = time.monotonic()
    try:
        outcome = run_scenario(scenario, opts, Console(file=io.StringIO()))
    except VdiagError as e:
        return Check(name, "fail", f"the planted deadlock could not be run: {e.message} (files in {tmp})",
                     "fix the failing rows above, then run `vdiag doctor` again")
    except Exception as e:
        return Check(name, "fail", f"the pipeline broke on the planted deadlock: {type(e).__name__}: {e} "
                     f"(files in {tmp})", "report this as a vdiag bug with the files above")
    rep = outcome.report
    wd = rep.watchdog
    v = rep.analysis.verdict
    sources = sorted({s.source for s in rep.stacks})
    stacks = f"stacks from {', '.join(sources)}" if sources else "no stacks (verdict from launch logs and activity)"
    latency = wd.verdict_t - wd.last_progress_t if wd.last_progress_t else float("nan")
    caught = f"verdict {v.cls}, spinning {wd.busy_ranks or 'none'}, top hypothesis {v.top_hypothesis or 'none'}"
    ok = v.cls == "spin-deadlock" and wd.busy_ranks == [0] and v.top_hypothesis == "missing-peer"
    try:
        if ok:
            return Check(name, "ok", f"planted missing-peer deadlock caught {latency:.1f} s after the last progress "
                         f"and diagnosed ({caught}; {stacks}; {time.monotonic() - t0:.0f} s in all)")
        return Check(name, "fail",
                     f"the planted deadlock was not diagnosed: {caught}; expected spin-deadlock, rank 0 spinning, "
                     f"missing-peer (report: {outcome.run_dir.report_md})",
                     "read the report; a loaded machine can hide the spin: run again on an idle machine")
    finally:
        if ok and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def gpu_selftest(n_gpus: int, keep: bool = False) -> Check:
    name = "self-test (GPU)"
    if n_gpus == 0:
        return Check(name, "skip", "no GPU on this machine: the sim self-test covers the CPU path")
    if importlib.util.find_spec("flashinfer") is None:
        return Check(name, "skip", f"{n_gpus} GPU(s), but flashinfer-python is not installed: nothing to replay "
                     "the real kernel with", FLASHINFER_FIX)
    if importlib.util.find_spec("repro.backends.flashinfer") is None:
        return Check(name, "skip", "this vdiag build has no flashinfer backend")
    return run_selftest("gpu", "flashinfer", keep=keep)


# ---- all of it ---------------------------------------------------------------------------------------


def run_checks(
    selftest: bool = True, gpu: bool = True, keep: bool = False,
    on_check: Callable[[Check], Any] | None = None,
) -> DoctorResult:
    """The quick checks in parallel (each one starts processes and waits), then the self-tests in turn."""
    nvml, gpus = check_nvml()
    has_gpu = bool(gpus) or _gpu_device_nodes()
    jobs: list[Callable[[], Check | list[Check]]] = [
        check_pyspy, check_ptrace, check_faulthandler, lambda: nvml, lambda: check_gpus(gpus),
        lambda: check_cuda_gdb(has_gpu), check_torch, lambda: check_optional_packages(has_gpu), check_shm,
        check_torchrun,
    ]
    checks: list[Check] = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="vdiag-doctor") as ex:
        for fut in [ex.submit(j) for j in jobs]:
            try:
                res = fut.result()
            except Exception as e:  # a check's own bug must not hide the others
                res = Check("doctor", "warn", f"a check failed to run: {type(e).__name__}: {e}")
            for c in res if isinstance(res, list) else [res]:
                checks.append(c)
                if on_check:
                    on_check(c)
    fatal_before = any(c.status == "fail" for c in checks)
    tests: list[Callable[[], Check]] = []
    if selftest:
        tests.append(lambda: run_selftest("sim", "sim", keep=keep))
    if selftest and gpu:
        tests.append(lambda: gpu_selftest(len(gpus), keep=keep))
    for t in tests:
        c = Check("self-test", "skip", "not run: fix the failed checks first") if fatal_before else t()
        checks.append(c)
        if on_check:
            on_check(c)
        if fatal_before:
            break
    if not selftest:
        checks.append(Check("self-test", "skip", "not run (--no-selftest)"))
    return DoctorResult(checks)
