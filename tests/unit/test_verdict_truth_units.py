"""Unit checks for issue 21's pieces: fault selectors that cannot match, the real error in a crashed
rank's log (issue 19), known waits in stacks, and the cause sentence's capitals."""

from __future__ import annotations

import pytest

from repro.analysis import _cause, host_frames, known_wait, where_waiting
from repro.records import Frame, Hypothesis, StackSample, ThreadStack
from repro.scenario import Scenario, fault_warnings
from repro.watchdog import error_line


def _sc(**over: object) -> Scenario:
    data: dict[str, object] = {
        "name": "t", "model": {"preset": "llama-3.1-8b", "num_layers": 4}, "parallel": {"tp": 2},
        "capture": {"sizes": [16, 8], "max_num_batched_tokens": 512},
        "fusion": {"allreduce_rms": "on"}, "backend": "sim",
    }
    data.update(over)
    return Scenario.model_validate(data)


@pytest.mark.parametrize(("fault", "field"), [
    ({"kind": "token_divergence", "rank": 0, "at": {"layer": 4}}, "faults[0].at.layer: 4, but model.num_layers is 4"),
    ({"kind": "delay", "rank": 1, "at": {"size": 24}}, "faults[0].at.size: 24 is not a size any phase runs"),
    ({"kind": "delay", "rank": 1, "at": {"phase": "profile", "size": 16}},
     "faults[0].at.size: 16 is not a size phase profile runs (512)"),
    ({"kind": "delay", "rank": 1, "at": {"call": 10_000}}, "faults[0].at.call: 10000, but the replay makes 48 calls"),
    ({"kind": "delay", "rank": 1, "at": {"phase": "workspace"}}, "faults[0].at.phase: workspace has no all-reduce"),
    ({"kind": "delay", "rank": 1, "at": {"phase": "warmup", "call": 0}}, "faults[0].at: no call matches every field"),
])
def test_a_selector_that_cannot_match_is_named_with_its_field(fault: dict[str, object], field: str) -> None:
    warns = [w.line for w in fault_warnings(_sc(faults=[fault]), "s.yaml")]
    assert len(warns) == 1 and warns[0].startswith(f"s.yaml: warning: {field}"), warns
    assert warns[0].endswith("the fault never fires")


def test_selectors_that_can_match_give_no_warning() -> None:
    faults = [
        {"kind": "token_divergence", "rank": 0, "at": {"phase": "capture", "size": 16, "layer": 3, "sub": 1}},
        {"kind": "delay", "rank": 1, "at": {"phase": "profile", "size": 512}},
        {"kind": "delay", "rank": 1, "at": {"call": 47}},
        {"kind": "workspace_fail", "rank": 1},
    ]
    assert fault_warnings(_sc(faults=faults)) == []


def test_a_fused_only_fault_without_fusion_never_fires() -> None:
    warns = fault_warnings(_sc(fusion={"allreduce_rms": "off"},
                               faults=[{"kind": "protocol_mismatch", "rank": 1, "at": {"layer": 0}}]))
    assert len(warns) == 1 and "faults[0].kind: protocol_mismatch acts on the fused all-reduce" in warns[0].line


def test_every_shipped_scenario_has_faults_that_can_fire() -> None:
    from repro.scenario import load_scenario
    from tests.conftest import SCENARIOS

    for path in sorted(SCENARIOS.glob("*.yaml")):
        assert fault_warnings(load_scenario(path), str(path)) == [], path


# ---- issue 19: the crash line ----------------------------------------------------------------------------

# The shape of the H200 log in issue 19: the CUDA error, then NCCL and extension-module lines after it.
H200_LOG = """\
[rank0]:[W1201 10:02:11 ProcessGroupNCCL.cpp:1250] Warning: WARNING: process group has NOT been destroyed
Traceback (most recent call last):
  File "/work/vllm/v1/worker/gpu_model_runner.py", line 3120, in capture_model
    torch.accelerator.empty_cache()
RuntimeError: CUDA error: an illegal memory access was encountered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
NCCL INFO [Service thread] Connection closed by localRank 0
""".splitlines()


def test_the_crash_line_is_the_cuda_error_not_the_last_nccl_line() -> None:
    assert error_line(H200_LOG) == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_the_crash_line_is_a_python_fatal_error_or_the_exception_after_a_traceback() -> None:
    fatal = ["Starting GPU coredump generation", "Fatal Python error: Aborted", "", "Thread 0x7f (most recent call first):",
             '  File "x.py", line 3 in f', "Extension modules: numpy.core._multiarray_umath, torch._C (total: 40)"]
    assert error_line(fatal) == "Fatal Python error: Aborted"
    tb = ["Traceback (most recent call last):", '  File "r.py", line 9, in one_call',
          '    raise ValueError("x")', "ValueError: 20000 tokens exceed the workspace's max_token_num 16384",
          "W1201 torch/distributed/elastic: Sending process 9 closing signal SIGTERM"]
    assert error_line(tb) == "ValueError: 20000 tokens exceed the workspace's max_token_num 16384"
    assert error_line(["NCCL INFO bye", "all good"]) == ""


# ---- stacks: known waits and stragglers ---------------------------------------------------------------------------


def _stack(*funcs: tuple[str, str, int]) -> StackSample:
    frames = [Frame(function=f, file=file, line=line) for f, file, line in funcs]
    return StackSample(rank=1, pid=1, source="py-spy", threads=[ThreadStack(thread="0x1", name="MainThread",
                                                                           frames=frames)])


def test_known_waits_and_a_host_straggler_are_told_apart() -> None:
    in_collective = _stack(("all_reduce", "/t/torch/distributed/distributed_c10d.py", 2800),
                           ("one_call", "/w/repro/engines/replay/replay.py", 240))
    in_event = _stack(("wait", "/usr/lib/python3.11/threading.py", 331), ("main", "/w/x.py", 3))
    on_host = _stack(("run_rank.<locals>.one_call", "/w/repro/engines/replay/replay.py", 212),
                     ("run_rank.<locals>.forward", "/w/repro/engines/replay/replay.py", 290), ("run_rank", "/w/repro/engines/replay/replay.py", 300))
    assert "all_reduce" in known_wait(in_collective)
    assert known_wait(in_event).startswith("wait (")
    assert known_wait(on_host) == ""
    assert host_frames(on_host) == "one_call (replay/replay.py:212) <- forward <- run_rank"


def test_the_cause_sentence_keeps_an_acronyms_capitals() -> None:
    def hyp(title: str) -> Hypothesis:
        return Hypothesis(key="workspace-aliasing", title=title, status="supported", score=3)

    assert _cause(hyp("TP peers launched different configurations")) == \
        " Most likely cause: TP peers launched different configurations (supported)."
    assert _cause(hyp("Workspace rendezvoused over the wrong group")) == \
        " Most likely cause: workspace rendezvoused over the wrong group (supported)."


def test_the_readme_table_is_the_exit_code_enum() -> None:
    from repro import errors
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert "\n".join(rows) == errors.exit_code_table()
    assert {int(c) for c in errors.ExitCode} == {0, 1, 2, 3, 4, 70, 125, 129, 130, 137, 143}
    assert all(c.meaning for c in errors.ExitCode)


def test_a_host_thread_blocked_on_its_gpu_is_a_known_wait() -> None:
    """A rank whose kernel spins keeps its host thread in a CUDA synchronisation: torch's Python frame where
    there is one, else (a D2H copy such as `.cpu()`) only the CUDA runtime's native frame shows it."""
    py_sync = _stack(("synchronize", "/v/lib/python3.12/site-packages/torch/cuda/__init__.py", 1090),
                     ("main", "/job/fi_token_divergence.py", 80))
    stream_sync = _stack(("synchronize", "/v/torch/cuda/streams.py", 105), ("main", "/job/j.py", 9))
    native = StackSample(rank=0, pid=1, source="py-spy --native", threads=[ThreadStack(
        thread="0x1", name="MainThread", frames=[
            Frame(function="0x7f00a1b2 (libcuda.so.1)", native=True),
            Frame(function="cudaMemcpyAsync", file="libcudart.so.13", native=True),
            Frame(function="at::native::copy_(at::Tensor&, at::Tensor const&, bool)", native=True),
            Frame(function="main", file="/job/j.py", line=12)])])
    own_sync = _stack(("synchronize", "/job/mylib.py", 4), ("main", "/job/j.py", 9))  # not torch's
    assert where_waiting(py_sync) == ("a CUDA synchronisation (the host thread waits for its GPU: "
                                      "synchronize (torch/cuda/__init__.py:1090))")
    assert "streams.py:105" in where_waiting(stream_sync)
    assert where_waiting(native) == ("a CUDA synchronisation (the host thread waits for its GPU: cudaMemcpyAsync "
                                     "(native))")
    assert where_waiting(own_sync) == ""


def test_a_barrier_is_named_as_the_replays_end_of_start_up_barrier_only_when_the_replay_called_it() -> None:
    replay = _stack(("barrier", "/t/torch/distributed/distributed_c10d.py", 4800),
                    ("run_rank", "/w/repro/engines/replay/replay.py", 310))
    job = _stack(("barrier", "/t/torch/distributed/distributed_c10d.py", 4800),
                 ("wrapper", "/t/torch/distributed/c10d_logger.py", 81), ("main", "/job/fi_token_divergence.py", 63))
    assert where_waiting(replay) == "the end-of-start-up barrier, waiting for the other ranks"
    assert where_waiting(job) == "a torch.distributed barrier (job/fi_token_divergence.py:63), waiting for the other ranks"


def test_a_fused_call_of_a_job_that_is_not_vllm_is_named_without_an_inferred_layer() -> None:
    from repro.records import LaunchEvent
    from repro.report.format import call_fields, call_ref_text, call_text

    ev = LaunchEvent(rank=0, t=0.0, seq=2, call=2, phase="starting", size=17, op="fused", token_num=17, hidden=4096,
                     dtype="bf16", oneshot=True)
    assert call_ref_text(ev) == "call 2 (17 tokens)"
    assert call_text(call_fields(ev)) == "size=17 call=2 token_num=17 op=fused oneshot=True"
    vllm = ev.model_copy(update={"phase": "capture", "layer": 1, "sub": 0})
    assert call_ref_text(vllm) == "capture size=17 layer=1 sub=0 (call 2)"
