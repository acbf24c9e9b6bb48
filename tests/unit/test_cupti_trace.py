"""The CUPTI launch tracer's pieces that need no GPU: CUlaunchConfig decoding, names, the checks, and
carrying on (with a reason in the report) when CUPTI is unavailable."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

from repro import cupti_trace
from repro.cupti_trace import (
    CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
    CUlaunchAttribute,
    CUlaunchConfig,
    LaunchTracer,
    compare_rank,
    cupti_file,
    cupti_findings,
    decode_launch_config,
    demangle,
    short_name,
)
from repro.events import parse_events

ONESHOT_MANGLED = (
    "_ZN10flashinfer23trtllm_allreduce_fusion39allreduce_fusion_kernel_oneshot_lamportILNS0_22AllReduceFusion"
    "PatternE1E13__nv_bfloat16Li2ELb1ELb1EEEvNS0_21AllReduceFusionParamsIT0_EE"
)


def test_cluster_dimensions_are_decoded_from_a_culaunchconfig_in_memory() -> None:
    attrs = (CUlaunchAttribute * 2)()
    attrs[0].id = 6  # programmatic stream serialization: ignored
    attrs[0].value.u32 = 1
    attrs[1].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attrs[1].value.dims[0], attrs[1].value.dims[1], attrs[1].value.dims[2] = 4, 1, 1
    cfg = CUlaunchConfig(gridDimX=68, gridDimY=1, gridDimZ=1, blockDimX=256, blockDimY=1, blockDimZ=1,
                         sharedMemBytes=0, hStream=0x1234, numAttrs=2)
    cfg.attrs = ctypes.cast(attrs, ctypes.POINTER(CUlaunchAttribute))
    got = decode_launch_config(ctypes.addressof(cfg))
    assert got == {"grid": [68, 1, 1], "block": [256, 1, 1], "cluster": [4, 1, 1], "smem": 0, "stream": "0x1234"}


def test_struct_layout_matches_cuda_h() -> None:
    assert ctypes.sizeof(CUlaunchAttribute) == 72  # id, pad to 8, 64-byte value union
    assert CUlaunchConfig.hStream.offset == 32 and CUlaunchConfig.attrs.offset == 40
    assert CUlaunchConfig.numAttrs.offset == 48


def test_no_cluster_attribute_means_cluster_one() -> None:
    cfg = CUlaunchConfig(gridDimX=8, gridDimY=1, gridDimZ=1, blockDimX=128, blockDimY=1, blockDimZ=1)
    assert decode_launch_config(ctypes.addressof(cfg))["cluster"] == [1, 1, 1]


def test_names_are_demangled_and_shortened() -> None:
    full = demangle(ONESHOT_MANGLED)
    assert "allreduce_fusion_kernel_oneshot_lamport<" in full
    assert short_name(full) == (
        "allreduce_fusion_kernel_oneshot_lamport<(flashinfer::trtllm_allreduce_fusion::AllReduceFusionPattern)1, "
        "__nv_bfloat16, 2, true, true>"
    )
    assert demangle("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "ncclDevKernel_AllReduce_Sum_f32_RING_LL"


def test_default_filter_takes_the_all_reduce_kernels_and_leaves_the_rest() -> None:
    import re

    f = re.compile(cupti_trace.DEFAULT_FILTER, re.IGNORECASE)
    for name in (ONESHOT_MANGLED, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "_ZN4vllm25cross_device_reduce_1stageI",
                 "lamport_initialize_kernel", "twoShotAllReduceKernel"):
        assert f.search(name), name
    for name in ("_ZN2at6native29vectorized_elementwise_kernel", "gemm_kernel", "rms_norm_kernel"):
        assert not f.search(name), name


def _launches(tmp_path: Path) -> dict[int, object]:
    events = [
        {"ev": "launch", "rank": 0, "t": 1.0, "seq": 4, "call": 4, "phase": "capture", "size": 16, "layer": 0,
         "sub": 0, "op": "fused", "token_num": 17, "hidden": 8192, "dtype": "bf16", "oneshot": True,
         "grid": [68, 1, 1], "block": [256, 1, 1], "cluster": [4, 1, 1]},
        {"ev": "launch", "rank": 0, "t": 1.1, "seq": 5, "call": 5, "phase": "capture", "size": 16, "layer": 0,
         "sub": 1, "op": "fused", "token_num": 16, "hidden": 8192, "dtype": "bf16", "oneshot": True,
         "grid": [128, 1, 1], "block": [128, 1, 1], "cluster": [8, 1, 1]},
    ]
    log = parse_events(0, events)
    return {ev.seq: ev for ev in log.launches}


def test_every_observed_grid_equal_to_the_computed_one_reads_agree(tmp_path: Path) -> None:
    recs = [
        {"ev": "cupti_launch", "kernel": "allreduce_fusion_kernel_oneshot_lamport<...>", "grid": [68, 1, 1],
         "block": [256, 1, 1], "cluster": [4, 1, 1], "vdiag_seq": 4},
        {"ev": "cupti_launch", "kernel": "allreduce_fusion_kernel_oneshot_lamport<...>", "grid": [128, 1, 1],
         "block": [128, 1, 1], "cluster": [8, 1, 1], "vdiag_seq": 5},
        {"ev": "cupti_launch", "kernel": "lamport_initialize_kernel<__half>", "grid": [9, 1, 1]},
    ]
    (line,) = compare_rank(0, recs, _launches(tmp_path))
    assert line.endswith(": agree") and "2 of 2" in line


def test_a_different_grid_is_a_named_disagreement(tmp_path: Path) -> None:
    recs = [
        {"ev": "cupti_launch", "kernel": "allreduce_fusion_kernel_oneshot_lamport<...>", "grid": [64, 1, 1],
         "block": [256, 1, 1], "cluster": [4, 1, 1], "vdiag_seq": 4},
    ]
    lines = compare_rank(0, recs, _launches(tmp_path))
    assert "DISAGREE" in lines[0] and "1 fused calls have no CUPTI launch (first seq 5)" in lines[0]
    assert "call seq 4" in lines[1] and "computed grid (68, 1, 1)" in lines[1] and "CUPTI grid (64, 1, 1)" in lines[1]


def test_unavailable_cupti_is_said_and_the_run_carries_on(tmp_path: Path) -> None:
    tr = LaunchTracer(tmp_path / "launch" / "rank0.cupti.jsonl", 0)
    reason = tr.start()  # no cupti-python on the CPU test machine
    tr.stop()
    assert reason.startswith("CUPTI unavailable")
    recs = [json.loads(x) for x in (tmp_path / "launch" / "rank0.cupti.jsonl").read_text().splitlines()]
    assert recs[0]["ev"] == "cupti_status" and recs[0]["ok"] is False
    checks, notes = cupti_findings(tmp_path, {0: parse_events(0, [])})
    assert checks == []
    assert any(n.startswith("CUPTI unavailable") and "ranks 0" in n and "carried on" in n for n in notes)


def test_findings_read_the_files_of_every_rank(tmp_path: Path) -> None:
    p = cupti_file(tmp_path, 0)
    p.parent.mkdir(parents=True)
    p.write_text("\n".join(json.dumps(r) for r in [
        {"ev": "cupti_status", "ok": True, "reason": ""},
        {"ev": "cupti_launch", "kernel": "allreduce_fusion_kernel_oneshot_lamport<...>", "grid": [68, 1, 1],
         "block": [256, 1, 1], "cluster": [4, 1, 1], "vdiag_seq": 4},
    ]) + "\n")

    class Log:
        launches = list(_launches(tmp_path).values())[:1]

    checks, notes = cupti_findings(tmp_path, {0: Log()})
    assert checks and checks[0].endswith(": agree")
    assert any("1 matching kernel launches" in n for n in notes)


def test_enabled_and_sitecustomize() -> None:
    assert cupti_trace.enabled({"VDIAG_CUPTI": "1"}) and not cupti_trace.enabled({})
    compile(cupti_trace.sitecustomize_source(), "sitecustomize.py", "exec")
