"""The GPU backends' host-side pieces that run without a GPU: kernel names and register counts from the
JIT module, device placement on a CPU machine, and the report's placement line."""

from __future__ import annotations

from pathlib import Path

from repro.backends.flashinfer import parse_kernel_args, parse_resource_usage
from repro.backends.gpu_reference import DeviceChoice, host_backend, placement_text, select_device
from repro.cupti_trace import demangle

H100 = Path(__file__).resolve().parent.parent / "fixtures" / "cuda_gdb" / "h100"


def test_kernel_variants_from_demangled_names() -> None:
    one = ("void flashinfer::trtllm_allreduce_fusion::allreduce_fusion_kernel_oneshot_lamport<(flashinfer::"
           "trtllm_allreduce_fusion::AllReduceFusionPattern)1, __nv_bfloat16, 2, true, true>(flashinfer::"
           "trtllm_allreduce_fusion::AllReduceFusionParams<__nv_bfloat16>)")
    two = ("void flashinfer::trtllm_allreduce_fusion::allreduce_fusion_kernel_twoshot_sync<(flashinfer::"
           "trtllm_allreduce_fusion::AllReduceFusionPattern)11, float, 16, false>(flashinfer::"
           "trtllm_allreduce_fusion::AllReduceFusionParams<float>, std::array<int, 16>, std::array<int, 16>)")
    assert parse_kernel_args(one) == ("oneshot", 1, "__nv_bfloat16", 2, True, True)
    assert parse_kernel_args(two) == ("twoshot", 11, "float", 16, False, None)
    assert parse_kernel_args("void at::native::vectorized_elementwise_kernel<4>()") is None


def test_register_counts_from_real_cuobjdump_output() -> None:
    regs = parse_resource_usage((H100 / "cuobjdump_resource_usage_bf16_tp2.txt").read_text())
    keys = {parse_kernel_args(demangle(m)): n for m, n in regs.items()}
    assert len(keys) == 6 and set(keys.values()) == {56}
    assert ("oneshot", 1, "__nv_bfloat16", 2, True, True) in keys
    assert ("twoshot", 1, "__nv_bfloat16", 2, True, None) in keys


def test_cpu_machine_selects_no_gpu() -> None:
    choice = select_device("sim", 0)
    assert choice.device == "cpu" and choice.cuda_index is None
    assert host_backend(choice) == "gloo"
    assert host_backend(DeviceChoice("cuda:0", 0, 0, shared=True)) == "gloo"
    assert host_backend(DeviceChoice("cuda:1", 1, 1, shared=False)) == "cpu:gloo,cuda:nccl"


def test_placement_says_ranks_shared_a_gpu_and_how() -> None:
    shared = placement_text({r: ("cuda:0", None) for r in range(4)}, "flashinfer", "tp", fused=True)
    assert "4 ranks on 1 GPU" in shared and "SHARED" in shared and "cuda:0: ranks 0,1,2,3" in shared
    assert "use_symm_dev_mem" in shared and "gloo" in shared and "NVML" in shared
    world = placement_text({r: ("cuda:0", None) for r in range(4)}, "flashinfer", "world", fused=True)
    assert "overlapping devices" in world and "WORLD" in world
    own = placement_text({0: ("cuda:0", None), 1: ("cuda:1", None)}, "nccl", "tp", fused=False)
    assert "one rank per GPU" in own and "NCCL" in own
    assert placement_text({0: ("cpu", None)}, "nccl", "tp", fused=False).startswith("CPU processes")
