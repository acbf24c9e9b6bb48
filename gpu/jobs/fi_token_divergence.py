"""A user's job, not vdiag's: two ranks on one GPU call FlashInfer's fused all-reduce + residual + RMSNorm
directly (FlashInfer's public API, no vdiag code), and at the third call rank 0 passes 17 tokens where
rank 1 passes 16, as two TP peers do whose padded batch sizes disagree. The one-shot kernel of rank 0
then polls its Lamport buffer for a token row that no peer writes, on the GPU, for ever; its host thread
waits in torch.cuda.synchronize(). Used by gpu/validate.sh's `watch` step (issue 17's GPU row):

    torchrun --nproc-per-node 2 gpu/jobs/fi_token_divergence.py
    vdiag watch --stall-s 15 --on-hang kill -- torchrun --nproc-per-node 2 gpu/jobs/fi_token_divergence.py

Both ranks share one GPU (NCCL refuses that, so the host group is gloo and the workspace is FlashInfer's
symmetric device memory over that group). FI_DIVERGE=0 runs the same job with agreeing token counts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

HIDDEN = 4096
MAX_TOKENS = 64
CALLS = 3


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(0)  # every rank on the one GPU
    group = dist.new_group(list(range(world)))

    from flashinfer.comm import (
        AllReduceFusionPattern,
        trtllm_allreduce_fusion,
        trtllm_create_ipc_workspace_for_all_reduce_fusion,
    )
    from flashinfer.comm.mnnvl import TorchDistBackend

    ipc, workspace, memory, metadata = trtllm_create_ipc_workspace_for_all_reduce_fusion(
        rank, world, MAX_TOKENS, HIDDEN, group=group, create_metadata=True, use_symm_dev_mem=True,
        comm_backend=TorchDistBackend(group=group))
    dev = torch.device("cuda", 0)
    gamma = torch.ones(HIDDEN, dtype=torch.bfloat16, device=dev)
    diverge = os.environ.get("FI_DIVERGE", "1") == "1"
    print(f"rank {rank}: workspace ready, {CALLS} fused calls", flush=True)
    for i in range(CALLS):
        tokens = 17 if (diverge and rank == 0 and i == CALLS - 1) else 16
        x = torch.full((tokens, HIDDEN), 0.5, dtype=torch.bfloat16, device=dev)
        residual = torch.zeros_like(x)
        residual_out, norm_out = torch.empty_like(x), torch.empty_like(x)
        trtllm_allreduce_fusion(
            allreduce_in=x, world_size=world, world_rank=rank, token_num=tokens, hidden_dim=HIDDEN,
            workspace_ptrs=workspace, launch_with_pdl=True, trigger_completion_at_end=True, fp32_acc=True,
            pattern_code=AllReduceFusionPattern.kARResidualRMSNorm, use_oneshot=True, allreduce_out=None,
            residual_in=residual, residual_out=residual_out, norm_out=norm_out, quant_out=None,
            scale_out=None, rms_gamma=gamma, rms_eps=1e-5, scale_factor=None, layout_code=None,
            metadata=metadata)
        torch.cuda.synchronize()  # the spinning rank's host thread stays here
        expect = 0.5 * world
        got = float(residual_out[0, 0])
        print(f"rank {rank}: fused call {i + 1}/{CALLS} with {tokens} tokens: residual {got:g} "
              f"(expected {expect:g})", flush=True)
    dist.barrier(group)
    print(f"rank {rank}: done", flush=True)
    del ipc, memory
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
