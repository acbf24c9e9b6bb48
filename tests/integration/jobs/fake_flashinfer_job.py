"""A job that imports a stand-in `flashinfer.comm` (written next to it by the test, with FlashInfer's real
parameter names for trtllm_allreduce_fusion and no code of FlashInfer's) and makes one fused call; under
`vdiag watch` the instrumentation must record it without the job changing."""

import sys

import torch

sys.path.insert(0, sys.argv[1])
from flashinfer.comm import trtllm_allreduce_fusion

x = torch.zeros(16, 512, dtype=torch.bfloat16)
trtllm_allreduce_fusion(
    allreduce_in=x, world_size=2, world_rank=0, token_num=16, hidden_dim=512, workspace_ptrs=None,
    launch_with_pdl=False, trigger_completion_at_end=True, fp32_acc=True, pattern_code=1, use_oneshot=True,
    allreduce_out=None, residual_in=x, residual_out=x, norm_out=x, quant_out=None, scale_out=None, rms_gamma=x[0],
    rms_eps=1e-5, scale_factor=None, layout_code=None,
)
print("fused call made", flush=True)
