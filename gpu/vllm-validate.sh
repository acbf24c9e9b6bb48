#!/usr/bin/env bash
# Real vLLM on the lent single-GPU machine (docs/vllm-engine.md, docs/gpu-validation.md, issue 19).
#
# Here, once: `bash gpu/prepare-vllm.sh` builds the bundle (.vla, .vlc, .vlb). There, three calls back to
# back (a machine stays warm 30 s after a call and keeps /root/vl and /root/vsite; if the third call finds
# /root/vl/vllm missing, start again at call 1):
#   1. carry [".vla"]:  bash gpu/vllm-unpack.sh a
#   2. carry [".vlc"]:  bash gpu/vllm-unpack.sh c
#   3. carry [".vlb"]:  bash gpu/vllm-validate.sh          (unpacks .vlb first, then the steps below)
# Steps (VLLM_STEPS, comma-separated): unpack, probe, fault, clean, overflow, jitlock, watch, serve, pytest,
# tp2, pack.
#   probe     versions: GPU, driver, torch, vLLM (and what vdiag's detect_api reads), FlashInfer
#   fault     plain vLLM with issue 19's arguments and three variations (gpu/vllm_probe.py)
#   clean     vdiag run scenarios/vllm-tp1-clean.yaml: compile, CUDA-graph capture, one request
#   overflow  vdiag run scenarios/vllm-tp1-batch-overflow.yaml: vLLM's own fault, reproduced
#   jitlock   vdiag run scenarios/vllm-tp1-jit-lock.yaml with FlashInfer's sampling build lock held by
#             gpu/hold_flashinfer_lock.py (started and ended here, by its pid)
#   watch     (not in the default list) `vdiag watch` over a plain vLLM job it did not launch
#             (gpu/jobs/vllm_offline.py): a clean start-up (exit 0), then the same start-up stalled in
#             FlashInfer's JIT build lock held by gpu/hold_flashinfer_lock.py (exit 1, --on-hang kill);
#             VLLM_WATCH_CASES picks (default "clean jitlock")
#   serve     (not in the default list; needs .vlb/deps-serve) `vdiag watch` over a real `vllm serve`: the
#             start-up, one completion request, the server idle past the stall threshold (not a hang once
#             uvicorn said "Application startup complete."), then Ctrl-C on vdiag (exit 0, nothing left)
#   pytest    (not in the default list) tests/gpu/test_vllm_engine.py: the clean and the fault scenario
#   tp2       (multi-GPU machines only, not in the default list) VLLM_TP2_SCENARIOS, e.g. a TP=2 clean run
#             and the seed with real vLLM: one GPU per rank, NCCL refuses two ranks on one GPU
#   pack      $OUT/summary.json (every run's verdict, notes, phases), vllm-runs.tgz, probes.tgz
# Results go to $OUT (default gpu/results-vllm). NVLink multicast stays off.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu/results-vllm}
mkdir -p "$OUT"
VL=${VDIAG_VLLM_DIR:-/root/vl}
VSITE=${VDIAG_VLLM_SITE:-/root/vsite}
VLB=${VDIAG_VLB:-.vlb}
[[ -d $VLB ]] || VLB=$ROOT/../.vlb
STEPS=${VLLM_STEPS:-unpack,probe,fault,clean,overflow,jitlock,pack}
WORK=${VLLM_WORK:-/tmp/vdiag-vllm}
mkdir -p "$WORK/reports"
exec > >(tee -a "$OUT/vllm-validate.log") 2>&1
has() { [[ ",$STEPS," == *",$1,"* ]]; }
say() { echo "[vllm-validate $(date +%H:%M:%S)] $*"; }
RCS=()

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if has unpack; then
  if [[ ! -d $VL/vllm ]]; then
    say "$VL/vllm is missing: the machine went cold between the bundle calls; start again at call 1"; exit 3
  fi
  t0=$(date +%s)
  xz -dc "$VLB/vl-b.tar.xz" | tar -x -C "$VL" || { say "unpacking $VLB/vl-b.tar.xz failed"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$VSITE" "$VLB"/deps/*.whl 2>&1 | tail -3
  if compgen -G "$VLB/deps-serve/*.whl" > /dev/null; then  # what `vllm serve` needs beyond LLM(...)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$VSITE" "$VLB"/deps-serve/*.whl 2>&1 | tail -3
  fi
  say "bundle unpacked in $(( $(date +%s) - t0 )) s"
fi
# The bundle's FlashInfer is its Python package only (no kernel sources, see docs/vllm-engine.md): vLLM's
# FlashInfer sampler stays off except where a scenario turns it on (vllm-tp1-jit-lock.yaml).
export PYTHONPATH=$ROOT:$VL:$VSITE${PYTHONPATH:+:$PYTHONPATH} PATH=$VSITE/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0
export FLASHINFER_WORKSPACE_BASE=$WORK/fi FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
VDIAG="python3 -m repro.cli"

if has probe; then
  say "probe"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
from repro.engines.vllm.args import detect_api
print("detect_api", detect_api())
for m in ("flashinfer", "filelock", "pydantic"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "ok"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
PY
  which py-spy torchrun || true
fi

if has fault; then
  say "fault: plain vLLM, issue 19's arguments and variations"
  python3 gpu/vllm_probe.py --out "$WORK/probes" --timeout "${VLLM_PROBE_TIMEOUT:-150}" \
    ${VLLM_PROBE_CASES:-oversized oversized-triton fits-1024}
  cp "$WORK/probes/probe.jsonl" "$OUT/" 2>/dev/null || true
fi

vrun() {  # NAME SCENARIO [vdiag run options]
  local name=$1 scen=$2; shift 2
  say "vdiag run $scen $*"
  local t0=$(date +%s)
  timeout -s INT "${VLLM_RUN_TIMEOUT:-420}" $VDIAG run "$scen" --reports "$WORK/reports" --no-live "$@"
  local rc=$?
  say "$name: exit $rc after $(( $(date +%s) - t0 )) s"
  RCS+=(--rc "$name=$rc")
}
if has clean; then vrun clean scenarios/vllm-tp1-clean.yaml --gpu-state none; fi
if has overflow; then vrun overflow scenarios/vllm-tp1-batch-overflow.yaml --gpu-state none; fi
if has jitlock; then
  say "jitlock: another process holds FlashInfer's JIT build lock for its sampling module"
  python3 gpu/hold_flashinfer_lock.py --pid-file "$WORK/holder.pid" > "$OUT/holder.log" 2>&1 &
  HOLDER=$!
  for _ in $(seq 1 60); do grep -q '^holding' "$OUT/holder.log" && break; sleep 0.5; done
  cat "$OUT/holder.log"
  if grep -q '^holding' "$OUT/holder.log"; then
    vrun jitlock scenarios/vllm-tp1-jit-lock.yaml --gpu-state "${VLLM_JITLOCK_GPU_STATE:-none}"
    if kill -0 "$HOLDER" 2>/dev/null; then say "the lock holder (pid $HOLDER) is still running: vdiag left it alone"
    else say "the lock holder (pid $HOLDER) is gone"; fi
  fi
  kill -TERM "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null
fi
MODEL=$WORK/model
if has watch || has serve; then
  python3 - "$MODEL" <<'PY'
import sys
from pathlib import Path
from repro.engines.vllm.args import write_model_dir
from repro.scenario import parse_scenario_text
sc = parse_scenario_text("name: job\nengine: vllm\nmodel: llama-3.1-8b\nvllm: {num_layers: 2}\n", "<job>")
print("model dir", write_model_dir(sc, Path(sys.argv[1])))
PY
fi
left() { ps -eo pid,stat,etime,cmd | grep -E "vllm_offline|vllm serve|VLLM::|repro.cli|hold_flashinfer" | grep -v grep || echo "none"; }
wrun() {  # NAME [vdiag watch options] -- COMMAND...
  local name=$1; shift
  say "vdiag watch $*"
  local t0=$(date +%s)
  timeout -s INT "${VLLM_RUN_TIMEOUT:-420}" $VDIAG watch --reports "$WORK/watch/$name" "$@"
  local rc=$?
  say "$name: exit $rc after $(( $(date +%s) - t0 )) s; left running: $(left | tr '\n' ' ')"
  RCS+=(--rc "$name=$rc")
}
WATCH_CASES=" ${VLLM_WATCH_CASES:-clean jitlock} "
if has watch && [[ $WATCH_CASES == *" clean "* ]]; then
  wrun watch-clean --stall-s 60 -- python3 gpu/jobs/vllm_offline.py --model "$MODEL"
fi
if has watch && [[ $WATCH_CASES == *" jitlock "* ]]; then
  say "watch-jitlock: another process holds FlashInfer's JIT build lock for its sampling module"
  python3 gpu/hold_flashinfer_lock.py --pid-file "$WORK/holder2.pid" > "$OUT/holder-watch.log" 2>&1 &
  HOLDER=$!
  for _ in $(seq 1 60); do grep -q '^holding' "$OUT/holder-watch.log" && break; sleep 0.5; done
  cat "$OUT/holder-watch.log"
  wrun watch-jitlock --stall-s 30 --on-hang kill -- \
    env VLLM_USE_FLASHINFER_SAMPLER=1 python3 gpu/jobs/vllm_offline.py --model "$MODEL" --eager --top-p 0.9
  if kill -0 "$HOLDER" 2>/dev/null; then say "the lock holder (pid $HOLDER) is still running: vdiag left it alone"
  else say "the lock holder (pid $HOLDER) is gone"; fi
  kill -TERM "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null
fi
if has serve; then
  if ! python3 -c "import uvicorn, vllm.entrypoints.openai.api_server" > "$WORK/serve-import.log" 2>&1; then
    say "serve: vllm serve cannot start here (missing modules, see serve-import.log)"; tail -3 "$WORK/serve-import.log"
  else
    PORT=${VLLM_SERVE_PORT:-8011}
    SERVE_EAGER=--enforce-eager  # VLLM_SERVE_EAGER=0: vLLM's default start-up (torch.compile, CUDA graphs)
    [[ ${VLLM_SERVE_EAGER:-1} == 0 ]] && SERVE_EAGER=""
    say "serve: vdiag watch over vllm serve (${SERVE_EAGER:-compiled}) on port $PORT"
    t0=$(date +%s)
    set -m  # its own process group, SIGINT not ignored (a script's background jobs ignore it otherwise)
    $VDIAG watch ${VLLM_SERVE_WATCH_OPTS:---stall-s 15 --patience-s 15} --reports "$WORK/watch/serve" -- \
      python3 -m vllm.entrypoints.cli.main serve "$MODEL" --tokenizer "$MODEL" --skip-tokenizer-init \
      --load-format dummy --dtype bfloat16 --max-model-len 512 --max-num-seqs 8 $SERVE_EAGER \
      --gpu-memory-utilization 0.5 --hf-overrides '{"num_hidden_layers": 2}' --port "$PORT" \
      > "$WORK/serve-watch.log" 2>&1 &
    WPID=$!
    set +m
    python3 - "$PORT" <<'PY'
import json, sys, time, urllib.request
port = sys.argv[1]
t0 = time.monotonic()
while time.monotonic() - t0 < 300:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        break
    except Exception:
        time.sleep(1)
print(f"serve: /health answered after {time.monotonic() - t0:.1f} s", flush=True)
models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10))
name = models["data"][0]["id"]
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                             data=json.dumps({"model": name, "prompt": [1] * 8, "max_tokens": 4}).encode(),
                             headers={"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=60))
print("serve: completion", json.dumps(out.get("choices", [{}])[0])[:300], flush=True)
PY
    IDLE=${VLLM_SERVE_IDLE_S:-45}
    say "serve: the server is idle now; waiting $IDLE s (with the default options stall 15 s + patience 15 s pass)"
    sleep "$IDLE"
    ls "$WORK/watch/serve"/*/report.md 2>/dev/null && say "serve: a report exists before Ctrl-C (it should not)"
    kill -INT "$WPID"; wait "$WPID"; rc=$?
    say "serve: vdiag exit $rc after $(( $(date +%s) - t0 )) s; left running: $(left | tr '\n' ' ')"
    RCS+=(--rc "serve=$rc")
    tail -5 "$WORK/serve-watch.log"
  fi
fi
if has pytest; then say "pytest tests/gpu/test_vllm_engine.py"; python3 -m pytest -q -p no:cacheprovider tests/gpu/test_vllm_engine.py 2>&1 | tail -25; fi
if has tp2; then  # one GPU per rank: nvidia-h200-x2 or larger
  for s in ${VLLM_TP2_SCENARIOS:-}; do vrun "$(basename "$s" .yaml)" "$s" --gpu-state auto; done
fi

if has pack; then
  say "pack"
  python3 gpu/vllm_summary.py "$WORK/reports" "${RCS[@]}" > "$OUT/summary.json"
  tar -C "$WORK" --exclude='core.*' --exclude='pipe.*' --exclude='model-rank*' -czf "$OUT/vllm-runs.tgz" reports 2>/dev/null
  [[ -d $WORK/watch ]] && tar -C "$WORK" --exclude='core.*' --exclude='pipe.*' -czf "$OUT/vllm-watch.tgz" watch serve-watch.log 2>/dev/null
  [[ -d $WORK/probes ]] && tar -C "$WORK" -czf "$OUT/probes.tgz" probes
  ps -eo pid,ppid,stat,etime,cmd | grep -E "repro|torchrun|vllm|hold_flashinfer" | grep -v grep || say "no process of these runs is left"
  ls -la "$OUT"
fi
say "done"
