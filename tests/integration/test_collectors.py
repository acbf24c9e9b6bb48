"""The collectors against real processes: a spinning child, a sleeping child, a real ptrace refusal.

Children tell the test they reached their function through a pipe (no sleeps to wait for readiness),
and every test kills its children in a `finally`.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from repro.collectors.environment import collect_env
from repro.collectors.stacks import collect_stacks, parse_faulthandler
from repro.records import StackSample, ThreadStack
from repro.redact import REDACTED
from repro.rundir import RunDir
from repro.tools import ToolMissing, ToolTimeout, looks_like_ptrace_denied, run_tool, which

NOBODY_PREFIX = "setpriv --reuid=65534 --regid=65534 --clear-groups"
PTRACE_ADVICE = (
    "py-spy could not attach (ptrace denied): run the container with --cap-add SYS_PTRACE, "
    "or set kernel.yama.ptrace_scope=0 (sysctl), or run vdiag as the workers' user"
)
HF = "hf_" + "PlantedSecretValue0123456789"
SK = "sk-" + "plantedSecretArgument0123456"
API = "planted-api-key-value-42"

CHILD = r"""
import ctypes, faulthandler, os, signal, sys, time

ready_fd, mode, fh_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:  # die with the test if it dies
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
except Exception:
    pass
if fh_path != "-":
    fh = open(fh_path, "w")
    faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True, chain=False)


def ready():
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)


def spin_forever_in_test():
    ready()
    x = 0
    while True:
        x += 1


def idle_in_sleep_in_test():
    ready()
    while True:
        time.sleep(60)


{"spin": spin_forever_in_test, "sleep": idle_in_sleep_in_test}[mode]()
"""


@contextmanager
def children(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)


def start_child(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path, mode: str, fh_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in `mode` (spin | sleep) and return once it is inside its function."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r, w = os.pipe()
    env = dict(os.environ, HF_TOKEN=HF, MY_API_KEY=API)
    try:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(w), mode, str(fh_file) if fh_file else "-", "--token", SK],
            pass_fds=(w,),
            env=env,
        )
        procs.append(proc)
    finally:
        os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 10)
        line = os.read(r, 64) if ready else b""
    finally:
        os.close(r)
    assert line.startswith(b"ready"), f"child ({mode}) did not report ready (exit {proc.poll()})"
    return proc


def main_thread(sample: StackSample) -> ThreadStack:
    """The thread running the script (py-spy names it only when `threading` was imported)."""
    return next(t for t in sample.threads if any(f.function == "<module>" for f in t.frames))


def test_stacks_name_the_spinning_function_and_tell_active_from_idle(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path, "stacks")
    with children(tmp_path) as procs:
        spinner = start_child(procs, tmp_path, "spin")
        sleeper = start_child(procs, tmp_path, "sleep")
        # The sleeper reported ready just before time.sleep: sample until py-spy sees it in the sleep.
        deadline = time.monotonic() + 5
        while True:
            samples, runs = collect_stacks({0: spinner.pid, 1: sleeper.pid}, rd, timeout=10)
            by_rank = {s.rank: s for s in samples}
            if (1 in by_rank and not main_thread(by_rank[1]).active) or time.monotonic() > deadline:
                break
        assert all(r.ok for r in runs), runs
        assert sorted(by_rank) == [0, 1]
        spin = by_rank[0]
        assert spin.pid == spinner.pid
        assert spin.source in ("py-spy --native", "py-spy")
        spin_main = main_thread(spin)
        assert spin_main.active
        assert spin_main.frames[0].function == "spin_forever_in_test"  # innermost first
        assert spin_main.frames[0].file.endswith("child.py") and spin_main.frames[0].line
        assert any(f.function == "<module>" for f in spin_main.frames)

        idle_main = main_thread(by_rank[1])
        assert not idle_main.active
        assert "idle_in_sleep_in_test" in [f.function for f in idle_main.frames]

        raw = rd.stack_file(0).read_text()
        assert "(active" in raw and "spin_forever_in_test" in raw
        assert "(idle)" in rd.stack_file(1).read_text()
        # py-spy prints the command line, which carried a token: it must not reach the run folder.
        assert SK not in raw and REDACTED in raw


def test_ptrace_refusal_falls_back_to_faulthandler_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0 or which("setpriv") is None:
        pytest.skip("needs root and setpriv to run py-spy as another user")
    rd = RunDir.create(tmp_path, "denied")
    monkeypatch.setenv("VDIAG_COLLECTOR_PREFIX", NOBODY_PREFIX)
    with children(tmp_path) as procs:
        child = start_child(procs, tmp_path, "spin", fh_file=rd.faulthandler_file(0))
        # The refusal is real: py-spy as nobody may not ptrace root's process.
        direct = run_tool(["py-spy", "dump", "--pid", str(child.pid)], timeout=10, attach=True)
        assert direct.returncode != 0 and looks_like_ptrace_denied(direct.output), direct.output

        samples, runs = collect_stacks({0: child.pid}, rd, timeout=10)
        assert child.poll() is None  # SIGUSR1 went to a faulthandler, not the default action
        (sample,) = samples
        assert sample.source == "faulthandler"
        assert sample.rank == 0 and sample.pid == child.pid
        assert "faulthandler" in sample.warning
        funcs = [f.function for t in sample.threads for f in t.frames]
        assert "spin_forever_in_test" in funcs
        spinning = next(
            t for t in sample.threads if t.frames and t.frames[0].function == "spin_forever_in_test"
        )
        assert spinning.frames[0].file.endswith("child.py")
        pyspy = next(r for r in runs if r.name == "py-spy")
        assert not pyspy.ok and pyspy.advice == PTRACE_ADVICE
        fh = next(r for r in runs if r.name == "faulthandler")
        assert fh.ok and Path(fh.artifact) == rd.stack_file(0)
        assert "spin_forever_in_test" in rd.stack_file(0).read_text()


def test_no_signal_to_a_process_without_faulthandler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0 or which("setpriv") is None:
        pytest.skip("needs root and setpriv to run py-spy as another user")
    rd = RunDir.create(tmp_path, "nohandler")
    monkeypatch.setenv("VDIAG_COLLECTOR_PREFIX", NOBODY_PREFIX)
    with children(tmp_path) as procs:
        child = start_child(procs, tmp_path, "sleep")  # no faulthandler: SIGUSR1 would kill it
        samples, runs = collect_stacks({0: child.pid}, rd, timeout=10)
        assert samples == []
        assert child.poll() is None
        fh = next(r for r in runs if r.name == "faulthandler")
        assert not fh.ok and "SIGUSR1" in fh.error


def test_missing_pyspy_is_recorded_and_faulthandler_still_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr("repro.tools._extra_dirs", lambda: [])
    rd = RunDir.create(tmp_path, "nopyspy")
    with children(tmp_path) as procs:
        child = start_child(procs, tmp_path, "sleep", fh_file=rd.faulthandler_file(5))
        samples, runs = collect_stacks({5: child.pid}, rd, timeout=10)
        pyspy = next(r for r in runs if r.name == "py-spy")
        assert not pyspy.ok and pyspy.advice == "pip install py-spy" and "not found" in pyspy.error
        (sample,) = samples
        assert sample.source == "faulthandler" and sample.rank == 5
        assert "idle_in_sleep_in_test" in [f.function for t in sample.threads for f in t.frames]


def test_collect_env_keeps_no_planted_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("MY_API_KEY", API)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("VLLM_EXTRA", f"--api-key {API}")
    monkeypatch.setattr(sys, "argv", ["vdiag", "run", "seed.yaml", "--token", SK, f"--hf-token={HF}"])
    rd = RunDir.create(tmp_path, "env")
    info = collect_env(rd, f"name: seed\n# HF_TOKEN={HF}\n", timeout=10)
    text = rd.env_json.read_text()
    for secret in (HF, SK, API):
        assert secret not in text
        assert secret not in info.model_dump_json()
        assert secret not in rd.scenario_yaml.read_text()
    data = json.loads(text)
    assert data["variables"]["HF_TOKEN"] == REDACTED
    assert data["variables"]["MY_API_KEY"] == REDACTED
    assert data["variables"]["NCCL_DEBUG"] == "INFO"
    assert data["command_line"] == f"vdiag run seed.yaml --token {REDACTED} --hf-token={REDACTED}"
    assert data["versions"]["vdiag"]
    assert data["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert data["driver"]  # a driver version, or why NVML is not there


def test_run_tool_kills_the_whole_process_group_on_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(ToolTimeout) as info:
        run_tool(["sh", "-c", "sleep 30 & echo $!; wait"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    grandchild = int(info.value.stdout.split()[0])
    try:
        state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    if state not in ("gone", "Z"):
        os.kill(grandchild, signal.SIGKILL)
    assert state in ("gone", "Z")


def test_run_tool_names_a_missing_tool() -> None:
    with pytest.raises(ToolMissing) as info:
        run_tool(["vdiag-no-such-tool-xyz"], timeout=5)
    assert info.value.tool == "vdiag-no-such-tool-xyz"
    assert info.value.exit_code == 3
    assert shutil.which("vdiag-no-such-tool-xyz") is None


def test_native_failure_retries_without_native_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """py-spy issue #822 ("failed to get os threadid") cannot be provoked at will, so a stand-in py-spy
    fails with that message when given --native and prints a real-format dump otherwise."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    fake = bindir / "py-spy"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--native*) echo "Error: failed to get os threadid" >&2; exit 1;; esac\n'
        "cat <<'DUMP'\n"
        "Process 4242: python worker.py --token sk-plantedSecretArgument0123456\n"
        "Python v3.11.7 (/usr/bin/python3.11)\n\n"
        'Thread 4242 (active): "MainThread"\n'
        "    spin_forever_in_test (child.py:20)\n"
        "    <module> (child.py:31)\n"
        "DUMP\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    rd = RunDir.create(tmp_path, "native")
    samples, runs = collect_stacks({0: os.getpid()}, rd, timeout=10)
    (sample,) = samples
    assert sample.source == "py-spy"
    assert "failed to get os threadid" in sample.warning and "#822" in sample.warning
    assert sample.threads[0].frames[0].function == "spin_forever_in_test"
    assert runs[0].ok
    assert SK not in rd.stack_file(0).read_text()


def test_faulthandler_file_with_several_dumps_gives_the_last(tmp_path: Path) -> None:
    import faulthandler

    path = tmp_path / "dumps.txt"

    def first_dump_site() -> None:
        with open(path, "a") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)

    def second_dump_site() -> None:
        with open(path, "a") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)

    first_dump_site()
    second_dump_site()
    threads = parse_faulthandler(path.read_text())
    funcs = [f.function for t in threads for f in t.frames]
    assert "second_dump_site" in funcs and "first_dump_site" not in funcs
    current = [t for t in threads if t.frames and t.frames[0].function == "second_dump_site"]
    assert current and current[0].frames[0].line
