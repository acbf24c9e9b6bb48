"""A user's vLLM job, not vdiag's: offline `LLM(...)` on one GPU (vLLM's own engine-core process, its
torch.compile and CUDA-graph capture), then one request. Used by gpu/vllm-validate.sh's `watch` steps
(issues 17 and 19) under `vdiag watch`:

    python3 gpu/jobs/vllm_offline.py --model DIR                       # a clean start-up
    VLLM_USE_FLASHINFER_SAMPLER=1 python3 gpu/jobs/vllm_offline.py --model DIR --eager --top-p 0.9

DIR holds a model's config.json (dummy weights: nothing is downloaded). With FlashInfer's sampler, vLLM's
warm-up builds FlashInfer's sampling module under FlashInfer's JIT build lock; another process holding that
lock (gpu/hold_flashinfer_lock.py) keeps the start-up waiting.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a folder with config.json")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile, no CUDA graphs)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=a.model, tokenizer=a.model, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
              max_num_seqs=8, max_model_len=512, enforce_eager=a.eager, hf_overrides={"num_hidden_layers": 2},
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]}, gpu_memory_utilization=0.5)
    print(f"job: LLM(...) ready after {time.monotonic() - t0:.1f} s", flush=True)
    params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True, detokenize=False, top_p=a.top_p)
    out = llm.generate([{"prompt_token_ids": [1] * 16}], params)
    print(f"job: generated {len(out[0].outputs[0].token_ids)} tokens after {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
