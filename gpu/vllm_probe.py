"""Plain vLLM (no torchrun, no vdiag instrumentation) with chosen LLM(...) arguments, one child process per
case: does the start-up (and one request) finish, and if not, what was the first error?

    python3 gpu/vllm_probe.py --out DIR case [case ...]       (cases: see CASES)

Each case writes DIR/probe-<case>.log (the child's whole output) and one line of DIR/probe.jsonl: the
arguments, the exit status, the seconds, the first CUDA error / exception line, whether vLLM warned that
max_num_batched_tokens exceeds max_num_seqs * max_model_len, the attention backend vLLM logged, and the
innermost frames of the traceback (with CUDA_LAUNCH_BLOCKING=1 these are where the faulting kernel was
launched). Used by gpu/vllm-validate.sh on the lent GPU for issue 19.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True,
                        "gpu_memory_utilization": 0.5}
# name -> (extra LLM arguments, extra environment)
CASES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    # issue 19's arguments: 8 dummy requests of 1024 tokens against block tables for 512
    "oversized": ({"max_num_batched_tokens": 8192}, {"CUDA_LAUNCH_BLOCKING": "1"}),
    # the same, with vLLM's Triton attention instead of FlashAttention-3 (no FlashAttention at all)
    "oversized-triton": ({"max_num_batched_tokens": 8192, "attention_backend": "TRITON_ATTN"},
                         {"CUDA_LAUNCH_BLOCKING": "1"}),
    # the same 8192 tokens, with max_model_len 1024: each dummy request fits its block table
    "fits-1024": ({"max_num_batched_tokens": 8192, "max_model_len": 1024}, {}),
    # vLLM's own choice (min(16384, 8 x 512) = 4096 on an H200)
    "vllm-default": ({}, {}),
}

CHILD = r"""
import json, sys, time
from vllm import LLM, SamplingParams
kw = json.loads(sys.argv[1])
t0 = time.monotonic()
llm = LLM(**kw)
cfg = llm.llm_engine.vllm_config
print("PROBE_SCHED", cfg.scheduler_config.max_num_batched_tokens, cfg.scheduler_config.max_num_seqs,
      cfg.model_config.max_model_len, flush=True)
out = llm.generate([{"prompt_token_ids": [1] * 16}], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
print("PROBE_OK", round(time.monotonic() - t0, 1), list(out[0].outputs[0].token_ids), flush=True)
"""

ERR = re.compile(r"(CUDA error: .*|torch\.AcceleratorError: .*|RuntimeError: .*|\w+Error: .*|Fatal Python error: .*)")


def _model_dir(root: Path) -> Path:
    from repro.engines.vllm.args import write_model_dir
    from repro.scenario import parse_scenario_text

    sc = parse_scenario_text("name: probe\nengine: vllm\nmodel: llama-3.1-8b\nvllm: {num_layers: 2}\n", "<probe>")
    return write_model_dir(sc, root / "model")


def run_case(name: str, out: Path, model: Path, timeout: float) -> dict[str, Any]:
    extra, env_extra = CASES[name]
    kw = {"model": str(model), "tokenizer": str(model), "skip_tokenizer_init": True, "load_format": "dummy",
          "hf_overrides": {"num_hidden_layers": 2}, **BASE, **extra}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", **env_extra}
    log = out / f"probe-{name}.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        try:
            rc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], stdout=f, stderr=subprocess.STDOUT,
                                env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    first_err = next((m.group(1) for ln in lines for m in [ERR.search(ln)] if m and "Warning" not in ln), "")
    bare = [re.sub(r"^\[rank\d+\]:\s*", "", ln).strip() for ln in lines]  # vLLM prefixes "[rank0]: "
    frames = [ln for ln in bare if ln.startswith('File "')]
    rec = {
        "case": name, "llm_kwargs": {k: v for k, v in kw.items() if k not in ("model", "tokenizer")},
        "env": env_extra, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "ok": "PROBE_OK" in text,
        "first_error": first_err[:400],
        "warned_exceeds": any("exceeds max_num_seqs" in ln for ln in lines),
        "scheduler": next((ln.split(" ", 1)[1] for ln in lines if ln.startswith("PROBE_SCHED")), ""),
        "attention": [ln[ln.find("Using"):][:160] for ln in lines
                      if re.search(r"Using (FlashAttention|AttentionBackend|.*attention backend|.*_ATTN)", ln)][:3],
        "innermost_frames": frames[-8:],
    }
    with (out / "probe.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("case", "rc", "seconds", "ok", "first_error", "warned_exceeds",
                                          "scheduler")}), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=150.0)
    ap.add_argument("cases", nargs="+", choices=sorted(CASES))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = _model_dir(Path(tempfile.mkdtemp(prefix="vdiag-probe-")))
    for c in a.cases:
        run_case(c, a.out, model, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
