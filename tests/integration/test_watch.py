"""`vdiag watch -- COMMAND` on real jobs that vdiag did not write: a torchrun gloo job with a rank that
skips an all_reduce, the sim's protocol spinning under plain torchrun, a slow job, a crashing job.

The hung gloo job is shared: watch reports it and keeps it running (--on-hang report), `vdiag attach` on
the same job gives the same verdict and leaves it alive, then Ctrl-C on watch ends it and nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, VdiagRun, shm_names, vdiag_bin, wait_for

JOBS = Path(__file__).resolve().parent / "jobs"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def torchrun(script: str, n: int = 2) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc-per-node", str(n), str(JOBS / script)]


Done = VdiagRun  # a finished vdiag watch/attach: exit code, output, its report


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def watch(args: list[str], reports: Path, timeout: float = 180, extra_env: dict[str, str] | None = None) -> Done:
    p = subprocess.run([*vdiag_bin(), "watch", "--reports", str(reports), "--quiet", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT, env={**env(), **(extra_env or {})})
    return Done(p.returncode, p.stdout, p.stderr, reports)


@contextlib.contextmanager
def watching(args: list[str], reports: Path) -> Iterator[subprocess.Popen[str]]:
    """`vdiag watch --quiet ARGS` in the background for the test to drive; killed if the test leaves it running."""
    proc = subprocess.Popen([*vdiag_bin(), "watch", "--reports", str(reports), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ctrl_c(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C on vdiag, as a terminal sends it; its stderr once it has exited."""
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    return err


def job_pids(run_dir: Path) -> list[int]:
    return [int(p["pid"]) for p in json.loads((run_dir / "report.json").read_text())["observed"]["processes"]]


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


# ---- the gloo job: watch, then attach on the same hung job, then Ctrl-C --------------------------------


@dataclass
class Shared:
    watch_rc: int
    watch_report: dict[str, Any]
    watch_md: str
    attach: Done
    alive_after_attach: list[int]
    pids: list[int]
    left_after_ctrl_c: list[int]
    watch_stderr: str


@pytest.fixture(scope="module")
def gloo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    reports = tmp_path_factory.mktemp("watch-gloo")
    attach_reports = tmp_path_factory.mktemp("attach-gloo")
    with watching(["--stall-s", "3", "--", *torchrun("gloo_skip.py")], reports) as proc:
        wait_for(lambda: any(reports.glob("*/report.json")), 120, "watch's report")
        run_dir = next(reports.glob("*/report.json")).parent
        time.sleep(0.5)
        rep = json.loads((run_dir / "report.json").read_text())
        md = (run_dir / "report.md").read_text()
        pids = job_pids(run_dir)
        assert proc.poll() is None, "watch --on-hang report must keep running while the job runs"
        root = rep["observed"]["root_pids"][0]
        a = subprocess.run([*vdiag_bin(), "attach", "--tree", str(root), "--reports", str(attach_reports), "--quiet"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env=env())
        attach = Done(a.returncode, a.stdout, a.stderr, attach_reports)
        still = alive(pids)
        err = ctrl_c(proc)
        wait_for(lambda: not alive(pids), 20, "the job to end after Ctrl-C")
        yield Shared(proc.returncode, rep, md, attach, still, pids, alive(pids), err)


def test_watch_reports_host_wait_naming_the_rank_that_skipped_the_all_reduce(gloo: Shared) -> None:
    v = gloo.watch_report["analysis"]["verdict"]
    assert v["cls"] == "host-wait"
    assert "rank 0 waits in all_reduce for rank 1, which never reached it" in v["headline"]
    assert "Rank 1 never entered that all_reduce" in v["paragraph"] and "barrier" in v["paragraph"]
    lines = (JOBS / "gloo_skip.py").read_text().splitlines()
    call = next(i for i, ln in enumerate(lines, 1) if "dist.all_reduce(t)" in ln and "rank != SKIP" in lines[i - 2])
    assert f"gloo_skip.py:{call}" in v["paragraph"]  # where rank 0 called it, from its stack
    ob = gloo.watch_report["observed"]
    assert ob["mode"] == "watch" and "gloo_skip.py" in ob["command"]
    workers = {p["identity"]["rank"]: p for p in ob["processes"] if p["identity"]["role"] == "worker"}
    assert set(workers) == {0, 1}
    assert workers[0]["identity"]["sources"]["rank"].startswith("RANK in /proc/")
    assert any(p["identity"]["role"] == "torchrun-agent" for p in ob["processes"])
    hows = {f["how"] for f in ob["facts"]}
    assert {"observed", "inferred"} <= hows
    md = gloo.watch_md
    assert "## The job (watch)" in md and "RANK in /proc/" in md
    assert "Exit code 1" in md


def test_watch_keeps_the_job_running_and_ctrl_c_ends_it_leaving_nothing(gloo: Shared) -> None:
    assert len(gloo.alive_after_attach) == len(gloo.pids) >= 3  # agent + 2 workers, alive after the report
    assert gloo.watch_rc == 1, gloo.watch_stderr  # a hang was reported
    assert gloo.left_after_ctrl_c == []
    # torchrun prints its own traceback when it is ended; none comes from vdiag
    assert "internal error" not in gloo.watch_stderr
    assert not [ln for ln in gloo.watch_stderr.splitlines() if ln.strip().startswith("File ") and "/repro/" in ln]


def test_a_watch_folder_is_analysed_again_from_its_records(gloo: Shared, tmp_path: Path) -> None:
    """`vdiag report --reanalyse` on a watch folder: today's analysis over the stored evidence, the same
    verdict, nothing added twice; the original folder is left as it was (a copy is re-analysed)."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(gloo.watch_report["run_dir"], run_dir)
    r = subprocess.run([*vdiag_bin(), "report", "--reanalyse", str(run_dir)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=env())
    assert r.returncode == 0, r.stderr  # the report was written; the job's own outcome is in it
    again = json.loads((run_dir / "report.json").read_text())
    assert again["exit_code"] == gloo.watch_report["exit_code"] == 1
    assert again["analysis"]["verdict"]["headline"] == gloo.watch_report["analysis"]["verdict"]["headline"]
    assert again["notes"] == gloo.watch_report["notes"]
    assert [f["text"] for f in again["observed"]["facts"]] == [f["text"] for f in gloo.watch_report["observed"]["facts"]]


def test_attach_on_the_same_hung_job_gives_the_same_verdict_and_leaves_it_alive(gloo: Shared) -> None:
    a = gloo.attach
    assert a.rc == 1, a.stderr
    v = a.report["analysis"]["verdict"]
    assert v["cls"] == gloo.watch_report["analysis"]["verdict"]["cls"]
    assert v["headline"] == gloo.watch_report["analysis"]["verdict"]["headline"]
    assert a.report["observed"]["mode"] == "attach"
    assert "never stops or kills" in a.markdown
    assert sorted(gloo.alive_after_attach) == sorted(gloo.pids)  # attach left every process of the job alive


def test_a_straggler_past_the_patience_window_is_named_not_called_a_deadlock(tmp_path: Path) -> None:
    # Rank 1 skips the all_reduce and then spends 60 s on the host outside any collective: rank 0 waits in
    # the all_reduce (a known wait), rank 1 is outside every known wait, so vdiag keeps watching for the
    # patience window (4 s here) and then reports, naming rank 1 as the straggler.
    d = watch(["--stall-s", "2", "--patience-s", "4", "--on-hang", "kill", "--", *torchrun("gloo_skip.py")],
              tmp_path, extra_env={"JOB_STRAGGLE_S": "60"})
    assert d.rc == 1, d.stderr
    assert "keeps watching" in d.stderr
    rep = d.report
    assert rep["observed"]["stragglers"] == [1]
    v = rep["analysis"]["verdict"]
    assert v["cls"] == "host-wait"
    assert "rank 0 waits in all_reduce for rank 1" in v["headline"]
    assert "Rank 1 stayed outside every known wait" in v["paragraph"] and "gloo_skip.py:" in v["paragraph"]
    assert alive(job_pids(d.run_dir)) == []


# ---- a job that spins: the sim's protocol under plain torchrun ----------------------------------------


def test_spinning_job_names_the_spinning_rank_and_its_idle_peer(tmp_path: Path) -> None:
    before = shm_names()
    d = watch(["--stall-s", "3", "--on-hang", "kill", "--", *torchrun("sim_spin.py")], tmp_path)
    assert d.rc == 1, d.stderr
    v = d.report["analysis"]["verdict"]
    assert v["cls"] == "spin-deadlock"
    assert v["spinning"] == [0] and v["idle"] == [1]
    assert "one-shot Lamport poll" in v["paragraph"]
    assert "rank 1 is idle in torch.distributed's barrier" in v["paragraph"]
    assert alive(job_pids(d.run_dir)) == []
    assert shm_names() <= before


# ---- slow but progressing; crashing ---------------------------------------------------------------------


def test_slow_job_whose_bar_advances_is_never_called_hung(tmp_path: Path) -> None:
    # The bar moves every 5 s; the stall threshold is 2 s: each pause is suspected, the stack shows the job
    # outside every known wait (time.sleep), so vdiag keeps watching and the bar's next step clears it.
    d = watch(["--stall-s", "2", "--patience-s", "30", "--", sys.executable, str(JOBS / "slow_bar.py"), "3", "5"],
              tmp_path)
    assert d.rc == 0, d.stderr
    rep = d.report
    assert rep["analysis"]["verdict"]["cls"] == "slow"
    assert rep["watchdog"]["slow_resumed"] >= 1
    assert "keeps watching" in d.stderr
    bars = rep["observed"]["progress"]
    assert bars and bars[-1]["n"] == 3 and bars[-1]["total"] == 3 and bars[-1]["updates"] == 4
    assert "Capturing CUDA graphs" in bars[-1]["label"]
    assert "\r" in d.stderr or "3/3" in d.stderr  # the bar itself passed through


SECRET_ARG = "sk-proj-0123456789abcdefABCDEF"
SECRET_ENV = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def test_crashing_job_exits_4_with_its_status_and_last_lines(tmp_path: Path) -> None:
    d = watch(["--stall-s", "30", "--", sys.executable, str(JOBS / "crash.py"), "--api-key", SECRET_ARG], tmp_path,
              extra_env={"HF_TOKEN": SECRET_ENV})
    assert d.rc == 4, d.stderr
    rep = d.report
    assert rep["analysis"]["verdict"]["cls"] == "crash"
    assert "exit status 3" in rep["analysis"]["verdict"]["headline"]
    assert rep["observed"]["returncode"] == 3
    assert any("CUDA out of memory" in ln for ln in rep["observed"]["output_tail"])
    assert "CUDA out of memory" in d.markdown
    assert "loading weights 2/2" in d.stdout  # stdout passed through
    assert SECRET_ARG in d.stderr  # the job printed its own secret: it passes through to the user's terminal...
    for path in d.run_dir.rglob("*"):  # ...but nothing of it, or of the environment's, reaches the run folder
        if path.is_file():
            text = path.read_text(errors="replace")
            assert SECRET_ARG not in text and SECRET_ENV not in text, path


def test_missing_command_is_a_one_line_usage_error(tmp_path: Path) -> None:
    d = watch(["--", "no-such-program-xyz"], tmp_path)
    assert d.rc == 2
    assert d.stderr.strip().count("\n") == 0 and "no-such-program-xyz" in d.stderr and "Traceback" not in d.stderr
    assert "command not found" in d.stderr and list(tmp_path.iterdir()) == []  # no half-made run folder


def test_ctrl_c_before_a_hang_ends_the_job_and_keeps_a_report(tmp_path: Path) -> None:
    with watching(["--stall-s", "60", "--", sys.executable, str(JOBS / "slow_bar.py"), "1", "60"], tmp_path) as proc:
        wait_for(lambda: any(p.stat().st_size > 0 for p in tmp_path.glob("*/logs/output.log")), 60, "the bar")
        job = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert job
        err = ctrl_c(proc)
    assert proc.returncode == 130, err
    assert alive(job) == []
    d = Done(proc.returncode, "", err, tmp_path)
    v = d.report["analysis"]["verdict"]
    assert v["cls"] == "interrupted"
    assert "process 0 was idle in <module> (slow_bar.py:14)" in v["paragraph"]  # where it was, from its stack
    assert d.report["observed"]["interrupted"] is True
    assert d.report["observed"]["progress"][0]["n"] == 0


def test_a_server_that_finished_its_start_up_and_idles_is_not_a_stall(tmp_path: Path) -> None:
    """After uvicorn's "Application startup complete." an idle server prints nothing for ever: with a stall
    threshold and patience that would call it hung within seconds, vdiag reports nothing while it serves,
    and Ctrl-C ends it with exit 0 and a clean report that quotes the line."""
    import urllib.request

    port_file = tmp_path / "port"
    reports = tmp_path / "reports"
    with watching(["--stall-s", "1", "--patience-s", "1", "--", sys.executable, str(JOBS / "ready_server.py"),
                   str(port_file)], reports) as proc:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 60, "the server's port")
        url = f"http://127.0.0.1:{port_file.read_text().strip()}/health"
        time.sleep(8)  # well past stall + confirmation + patience
        assert not list(reports.glob("*/report.json")), "no report while the server serves"
        assert urllib.request.urlopen(url, timeout=10).read() == b"ok\n"  # it serves
        job = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert job and proc.poll() is None
        err = ctrl_c(proc)
    assert proc.returncode == 0, err
    assert "start-up is over ('INFO:     Application startup complete.')" in err
    assert alive(job) == []
    d = Done(proc.returncode, "", err, reports)
    v = d.report["analysis"]["verdict"]
    assert v["cls"] == "clean" and "start-up finished" in v["headline"] and "Ctrl-C" in v["headline"]
    assert d.report["observed"]["ready_line"] == "INFO:     Application startup complete."
    assert d.report["observed"]["ended_by_user"] is True
    assert "Start-up finished after" in d.markdown


FAKE_COMM = """
def trtllm_allreduce_fusion(allreduce_in, world_size, world_rank, token_num, hidden_dim, workspace_ptrs,
                            launch_with_pdl, trigger_completion_at_end, fp32_acc, pattern_code, use_oneshot,
                            allreduce_out, residual_in, residual_out, norm_out, quant_out, scale_out, rms_gamma,
                            rms_eps, scale_factor, layout_code, metadata=None):
    return None
"""


def test_instrumentation_records_fused_calls_in_a_watched_python_process(tmp_path: Path) -> None:
    pkg = tmp_path / "site" / "flashinfer" / "comm"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(FAKE_COMM)
    d = watch(["--stall-s", "30", "--", sys.executable, str(JOBS / "fake_flashinfer_job.py"), str(tmp_path / "site")],
              tmp_path / "reports")
    assert d.rc == 0, d.stderr
    events = [json.loads(ln) for ln in (d.run_dir / "launch" / "rank0.jsonl").read_text().splitlines()]
    launch = next(e for e in events if e["ev"] == "launch")
    assert launch["token_num"] == 16 and launch["hidden"] == 512 and launch["oneshot"] is True
    assert launch["grid"] and launch["block"]  # computed by repro.kernel_launch
    assert d.report["observed"]["instrumented"] is True
    plain = watch(["--no-instrument", "--stall-s", "30", "--", sys.executable, str(JOBS / "fake_flashinfer_job.py"),
                   str(tmp_path / "site")], tmp_path / "plain")
    assert plain.rc == 0 and not (plain.run_dir / "launch" / "rank0.jsonl").exists()
