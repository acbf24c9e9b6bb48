"""Issue 21: verdicts that tell the truth about every rank (real `vdiag run`, real torchrun workers, sim).

The scenarios are written here, not shipped: each case is what a user reported, scaled down so that the
runs are cheap (2 layers, a few capture sizes). Expensive runs are shared through module fixtures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCENARIOS, VdiagRun, leftovers, run_vdiag, shm_names, vdiag_bin, wait_for
from tests.shared_scenarios import PP2_TWOSHOT

STALL = """\
# TP=2: rank 1 stalls {seconds} s on the host (a JIT build, torch.compile, a slow file system) before one call.
name: host-stall-{tag}
model: {{preset: llama-3.1-70b, num_layers: 2}}
parallel: {{tp: 2, pp: 1}}
capture: {{sizes: [16, 8, 4]}}
fusion: {{allreduce_rms: "on", oneshot: vllm, workspace_group: tp}}
backend: sim
watchdog: {{patience_s: {patience}}}
faults:
  - kind: delay
    rank: 1
    seconds: {seconds}
    at: {{phase: capture, size: 8, layer: 1, sub: 0}}
"""

LAYER5 = """\
# A token-divergence fault at layer 5: it can only fire when the model has 6 layers or more.
name: fault-at-layer-5
model: {preset: llama-3.1-70b, num_layers: %d}
parallel: {tp: 2, pp: 1}
capture: {sizes: [16, 8]}
fusion: {allreduce_rms: "on", oneshot: vllm, workspace_group: tp}
backend: sim
faults:
  - kind: token_divergence
    rank: 0
    at: {phase: capture, size: 16, layer: 5}
"""


def _scenario(tmp: Path, name: str, text: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verdict-truth")


@pytest.fixture(scope="module")
def pp2_twoshot(work: Path) -> VdiagRun:
    return run_vdiag(["run", str(_scenario(work, "pp2", PP2_TWOSHOT))], work / "pp2")


@pytest.fixture(scope="module")
def stuck(work: Path) -> VdiagRun:
    """A straggler that never comes back (a 10-minute stall), watched for a short patience window."""
    sc = _scenario(work, "stuck", STALL.format(seconds=600, tag="stuck", patience=4))
    return run_vdiag(["run", str(sc)], work / "stuck")


# ---- 1. each rank's own kernel and wait site --------------------------------------------------------


def test_each_hung_rank_gets_its_own_kernel_and_wait_site(pp2_twoshot: VdiagRun) -> None:
    r = pp2_twoshot
    assert r.rc == 1, r.stderr
    v = r.report["analysis"]["verdict"]
    assert v["spinning"] == [2, 3], v
    by_rank = {w["rank"]: w for w in v["ranks"]}
    assert by_rank[2]["kernel"] == "allreduce_fusion_kernel_oneshot_lamport"
    assert "Lamport poll" in by_rank[2]["site"]
    assert by_rank[3]["kernel"] == "allreduce_fusion_kernel_twoshot_sync", by_rank[3]
    assert "Barrier::sync" in by_rank[3]["site"]
    for rk in (2, 3):  # on the sim the kernel is computed, and the report says so
        assert by_rank[rk]["kernel_source"] == "computed from the launch record"
        assert by_rank[rk]["state"] == "spinning"
    assert {by_rank[0]["state"], by_rank[1]["state"]} <= {"idle", "finished"}
    para = v["paragraph"]
    # never grouped under one kernel: each rank's clause names its own
    assert "Rank 2 (pp 1, tp 0) spins in allreduce_fusion_kernel_oneshot_lamport, inside the one-shot Lamport poll" in para
    assert "rank 3 (pp 1, tp 1) spins in allreduce_fusion_kernel_twoshot_sync, inside the two-shot Barrier::sync" in para
    assert "(kernels computed from the launch record)" in para
    assert "ranks 2,3 spin in allreduce_fusion_kernel_oneshot_lamport" not in para
    md = r.markdown
    assert "## Where each hung rank waits" in md
    assert "rank 3 in `allreduce_fusion_kernel_twoshot_sync`" in md
    assert r.report["analysis"]["hypotheses"][0]["key"] == "protocol-mismatch"
    assert "Most likely cause: TP peers chose different protocols" in para  # an acronym keeps its capitals
    assert leftovers(r.run_dir) == []


def test_the_call_plan_is_the_replays_own_order(pp2_twoshot: VdiagRun) -> None:
    """scenario.call_plan (what the fault warnings reason over) is the order the replay really runs."""
    from repro.events import read_rank_log
    from repro.scenario import Scenario

    sc = Scenario.model_validate_json((pp2_twoshot.run_dir / "scenario.json").read_text())
    log = read_rank_log(pp2_twoshot.run_dir / "launch" / "rank0.jsonl", 0)  # rank 0 finished every call
    seen = [(e.phase, e.size, e.layer, e.sub, e.call) for e in log.launches]
    assert seen == list(sc.call_plan())


def test_injected_faults_that_fired_are_listed_with_where(pp2_twoshot: VdiagRun) -> None:
    faults = pp2_twoshot.report["faults"]
    assert len(faults) == 1 and faults[0]["kind"] == "protocol_mismatch"
    assert faults[0]["fired_on"] == {"3": [{"phase": "capture", "size": 24, "layer": 0, "sub": 0, "call": 16}]}
    assert "1 of 1 injected faults fired." in pp2_twoshot.markdown
    rec = [json.loads(x) for x in (pp2_twoshot.run_dir / "launch" / "rank3.jsonl").read_text().splitlines()]
    assert [e["index"] for e in rec if e["ev"] == "fault"] == [0]


# ---- 2. a straggler is not a deadlock ------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [6, 20])
def test_a_host_stall_that_resumes_is_slow_and_exits_0(work: Path, seconds: int) -> None:
    sc = _scenario(work, f"stall{seconds}", STALL.format(seconds=seconds, tag=f"{seconds}s", patience=60))
    r = run_vdiag(["run", str(sc)], work / f"stall{seconds}")
    assert r.rc == 0, r.stderr + r.markdown[:3000]
    wd = r.report["watchdog"]
    assert wd["cls"] == "slow" and wd["slow_resumed"] >= 1
    assert [s["rank"] for s in wd["stragglers"]] == [1]
    assert wd["stragglers"][0]["idle_s"] >= seconds - 4  # measured from its last record, before the stall
    assert "one_call" in wd["stragglers"][0]["where"]
    assert r.report["analysis"]["verdict"]["cls"] == "slow"
    assert "A straggler, not a deadlock" in r.report["analysis"]["verdict"]["paragraph"]
    assert r.markdown.splitlines()[0] == f"# vdiag: slow in host-stall-{seconds}s"
    assert leftovers(r.run_dir) == []


def test_a_straggler_that_never_resumes_is_named_and_nothing_is_supported_by_exclusion(stuck: VdiagRun) -> None:
    r = stuck
    assert r.rc == 1, r.stderr
    wd = r.report["watchdog"]
    assert [s["rank"] for s in wd["stragglers"]] == [1]
    assert wd["patience_s"] == 4
    v = r.report["analysis"]["verdict"]
    assert "Rank 1 (pp 0, tp 1) is a straggler: idle on the host outside every known wait, in one_call (replay/replay.py:" in v["paragraph"]
    hyps = {h["key"]: h for h in r.report["analysis"]["hypotheses"]}
    assert hyps["flag-out-of-step"]["status"] != "supported"
    assert any("straggler" in a for a in hyps["flag-out-of-step"]["evidence_against"])
    assert hyps["straggler"]["status"] == "supported"
    assert any("one_call" in e for e in hyps["straggler"]["evidence_for"])
    # the stall was confirmed, then watched for the patience window before the verdict
    assert wd["verdict_t"] - wd["last_progress_t"] >= wd["stall_s"] + 4
    # the straggler's stack came from the watchdog's probe, once: the collectors did not take it again
    pyspy1 = [c for c in r.report["collectors"] if c["name"] == "py-spy" and c["rank"] == 1]
    assert len(pyspy1) == 1
    assert leftovers(r.run_dir) == []


# ---- 3. a fault that never fires ----------------------------------------------------------------------------


def test_scenario_validate_warns_about_a_fault_that_cannot_fire(work: Path) -> None:
    sc = _scenario(work, "layer5-of-4", LAYER5 % 4)
    r = run_vdiag(["scenario", "validate", str(sc)], work / "validate")
    assert r.rc == 0, r.stderr
    assert r.stdout.strip() == f"{sc}: ok (1 warning)"
    assert r.stderr.strip() == (f"{sc}: warning: faults[0].at.layer: 5, but model.num_layers is 4 (layers 0..3); "
                                "the fault never fires")


def test_run_warns_and_the_report_lists_a_fault_that_never_fired(work: Path) -> None:
    sc = _scenario(work, "layer5-of-8", LAYER5 % 8)
    r = run_vdiag(["run", str(sc), "--set", "model.num_layers=4"], work / "layer5")
    assert r.rc == 0, r.stderr
    assert "warning: faults[0].at.layer: 5, but model.num_layers is 4" in r.stderr
    f = r.report["faults"][0]
    assert f["fired_on"] == {} and f["warning"].startswith("faults[0].at.layer: 5, but model.num_layers is 4")
    md = r.markdown
    assert "0 of 1 injected faults fired." in md
    assert "faults[0] token_divergence (phase=capture, size=16, layer=5) on rank 0: **never fired**" in md
    assert leftovers(r.run_dir) == []


# ---- 6. a valid-looking scenario that would crash the workers -------------------------------------------------


def test_a_fused_call_larger_than_the_workspace_is_refused_up_front(tmp_path: Path) -> None:
    r = run_vdiag(["run", str(SCENARIOS / "tp4-clean.yaml"), "--set", "capture.max_num_batched_tokens=20000",
                   "--set", "fusion.max_token_num=20000"], tmp_path)
    assert r.rc == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith(f"vdiag: error: {SCENARIOS / 'tp4-clean.yaml'}: --set: fusion.max_token_num: ")
    assert "20000 tokens" in lines[0] and "at most 16384" in lines[0]
    assert not any(p.is_dir() for p in tmp_path.iterdir()), "no run folder for a refused scenario"


# ---- 5. SIGTERM and SIGHUP keep the report ------------------------------------------------------------------------

LONG_CLEAN = ["--set", "model.num_layers=80", "--set", "capture.sizes=default"]


def _start(reports: Path) -> subprocess.Popen[str]:
    reports.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [*vdiag_bin(), "run", str(SCENARIOS / "llama70b-pp2-tp2-fusion-tpgroup.yaml"), *LONG_CLEAN,
         "--reports", str(reports), "--no-live"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ))


def _mid_run(run_dir: Path) -> None:
    def started() -> bool:
        return all((run_dir / "launch" / f"rank{r}.jsonl").exists()
                   and '"ev":"result"' in (run_dir / "launch" / f"rank{r}.jsonl").read_text() for r in range(4))

    wait_for(started, 90, "every rank to complete a call")


@pytest.mark.parametrize(("sig", "code", "when"), [
    (signal.SIGTERM, 143, "3s"), (signal.SIGTERM, 143, "mid-run"), (signal.SIGHUP, 129, "mid-run"),
])
def test_sigterm_and_sighup_clean_up_and_keep_a_partial_report(tmp_path: Path, sig: int, code: int, when: str) -> None:
    before = shm_names()
    reports = tmp_path / "reports"
    p = _start(reports)
    try:
        if when == "3s":
            time.sleep(3.0)
        wait_for(lambda: any(x.is_dir() for x in reports.iterdir()), 30, "the run folder")
        rd = next(x for x in reports.iterdir() if x.is_dir())
        if when == "mid-run":
            _mid_run(rd)
        p.send_signal(sig)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    name = signal.Signals(sig).name
    assert p.returncode == code, err
    assert "Traceback" not in err
    assert f"vdiag: interrupted by {name}" in err
    rep = json.loads((rd / "report.json").read_text())
    assert rep["exit_code"] == code
    assert rep["watchdog"]["interrupted_by"] == name
    v = rep["analysis"]["verdict"]
    assert v["cls"] == "interrupted" and v["headline"].startswith(f"interrupted: the run was stopped by {name}")
    assert f"interrupted by {name}" in " ".join(rep["notes"])
    assert (rd / "report.md").read_text().splitlines()[0].startswith("# vdiag: interrupted in ")
    assert leftovers(rd) == []
    assert shm_names() <= before


# ---- issue 19 point 3: a crash report names the real error ---------------------------------------------------------

CRASH_HOOK = '''\
"""A scenario hook that dies as a worker does on a CUDA fault, then prints harmless lines on the way out."""
import atexit
import sys


def _noise() -> None:
    sys.stderr.write("NCCL INFO comm 0x55d0 rank 0 nranks 2 cudaDev 0 busId 1000 - Destroy COMPLETE\\n")
    sys.stderr.write("extension module loaded: vdiag_test_ext\\n")


def configure(scenario, rank):
    atexit.register(_noise)
    if rank == 1:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return {}
'''


def test_a_crash_report_quotes_the_real_error_not_the_last_stderr_line(tmp_path: Path) -> None:
    (tmp_path / "vdiag_crash_hook.py").write_text(CRASH_HOOK)
    sc = _scenario(tmp_path, "crash", "name: crash-hook\nmodel: {preset: llama-3.1-8b, num_layers: 1}\n"
                   "parallel: {tp: 2}\ncapture: {sizes: [8]}\nbackend: sim\nhook: \"vdiag_crash_hook:configure\"\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run_vdiag(["run", str(sc)], tmp_path / "reports", env=env)
    assert r.rc == 4, r.stderr
    crashed = {c["rank"]: c for c in r.report["watchdog"]["crashed"]}
    assert crashed[1]["error_line"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "Destroy COMPLETE" in " ".join(crashed[1]["stderr_tail"])  # the noise really came last
    para = r.report["analysis"]["verdict"]["paragraph"]
    assert "Its error: 'RuntimeError: CUDA error: an illegal memory access was encountered'" in para
    assert "Destroy COMPLETE" not in para
    assert leftovers(r.run_dir) == []
