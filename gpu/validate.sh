#!/usr/bin/env bash
# `make gpu-validate`: the whole GPU validation (docs/gpu-validation.md) on a machine with an NVIDIA GPU.
#
# Steps (VALIDATE_STEPS, comma-separated; default below): probe, build (or buildbg ... waitbuild to
# overlap it with nccl), nccl, smoke, scenarios, ptrace, cupti, pytest, sim, run, fixtures, watch (not in
# the default set: `vdiag watch` and `vdiag attach` over gpu/jobs/fi_token_divergence.py, a plain torchrun
# job whose fused kernel spins; VALIDATE_WATCH_CASES picks from "clean spin attach coredump", default the
# first three; reports in $OUT/watch.tgz), and fidelity
# (not in the default set: VALIDATE_FIDELITY_RUNS, VALIDATE_FIDELITY_ONLY=stem,stem, VALIDATE_FIDELITY_BUDGET_S). Results go to
# $OUT (default gpu/results): results.jsonl, table.md (the docs' table), the run folders (runs.tgz, without
# the core dumps), the raw cuda-gdb outputs, and FlashInfer's built trtllm_comm.so.
#
# On the lent single-GPU machine (see /work/shared/gpu/README.md) the whole set takes about 20 minutes, so
# split it over calls that reuse the build: 1) VALIDATE_STEPS=probe,build,smoke (returns trtllm_comm.so:
# keep it as .fiaot/trtllm_comm.so and carry it, the module then loads as an AOT artifact, no rebuild);
# 2) VALIDATE_STEPS=scenarios; 3) VALIDATE_STEPS=ptrace,cupti,pytest,sim,fixtures. Carry .whl, .fiaot and,
# for CUPTI, .whl-cupti (cupti-python + libcupti only); to stay under 64 MiB move nccl4py and cuda-tile
# out of .whl (FlashInfer's all-reduce never imports them). Elsewhere: pip install -e .[flashinfer]
# cupti-python first. NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu/results}
mkdir -p "$OUT"
STEPS=${VALIDATE_STEPS:-probe,build,smoke,scenarios,ptrace,cupti,pytest,sim,fixtures}
SCEN_BUDGET=${VALIDATE_SCENARIO_BUDGET_S:-3600}
ONLY=${VALIDATE_ONLY:-}
WORK=${VALIDATE_WORK:-/tmp/vdiag-validate}
mkdir -p "$WORK"
LOG=$OUT/validate.log
exec > >(tee -a "$LOG") 2>&1
has() { [[ ",$STEPS," == *",$1,"* ]]; }
say() { echo "[validate.sh $(date +%H:%M:%S)] $*"; }

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [[ -f .whl/unpack-wheels.sh ]]; then
  eval "$(bash .whl/unpack-wheels.sh)"
fi
if [[ -d .whl-cupti ]]; then  # cupti-python and its CUPTI library, into the same site folder
  python3 -c "import glob,zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl-cupti/*.whl')+glob.glob('.whl-cupti/*.zip')]"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
# The JIT cache stays outside carried folders so that a warm machine keeps it between calls.
export FLASHINFER_WORKSPACE_BASE=${VDIAG_FI_WORKSPACE:-$ROOT/.fijit}
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PATH=/usr/local/cuda/bin:$PATH
AOT=${VDIAG_FI_AOT:-$ROOT/.fiaot/trtllm_comm.so}
if [[ -f $AOT ]]; then  # a module built earlier: FlashInfer loads it as an AOT artifact, no JIT build
  site=$(python3 -c "import flashinfer,os;print(os.path.dirname(flashinfer.__file__))")
  mkdir -p "$site/data/aot/trtllm_comm" && cp "$AOT" "$site/data/aot/trtllm_comm/trtllm_comm.so"
  say "using the prebuilt trtllm_comm.so ($AOT)"
fi

if has probe; then
  say "probe"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
p = torch.cuda.get_device_properties(0)
print("device", p.name, "SMs", p.multi_processor_count, "cc", f"{p.major}.{p.minor}")
for m in ("flashinfer", "pydantic", "cupti", "pynvml", "cuda.bindings"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "ok"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
PY
  cuda-gdb --version | head -2; which setpriv py-spy cuobjdump || true
fi

build() {
  say "build: FlashInfer trtllm_comm (JIT, about 6 minutes cold)"
  local t0=$(date +%s)
  python3 -c "from flashinfer.comm.trtllm_ar import get_trtllm_comm_module as g; g(); \
from flashinfer.jit.comm import gen_trtllm_comm_module as s; print('module', s().get_library_path())" \
    || say "build FAILED"
  say "build took $(( $(date +%s) - t0 )) s"
  local so
  so=$(python3 -c "from flashinfer.jit.comm import gen_trtllm_comm_module as s; print(s().get_library_path())" 2>/dev/null)
  if [[ -f $so && ! -f $OUT/trtllm_comm.so && $so != */data/aot/* ]]; then cp "$so" "$OUT/trtllm_comm.so"; fi
  [[ -f $so ]] && cuobjdump --dump-resource-usage "$so" > "$WORK/resource-usage.txt" 2>&1
}
if has build; then build; fi
if has buildbg; then build > "$WORK/build.log" 2>&1 & BUILD_PID=$!; say "build started in the background"; fi

V="python3 gpu/validate.py"
if has nccl; then  # the unfused reference on CUDA tensors; CUPTI on torch's own kernels
  say "nccl backend on the GPU"
  VDIAG_CUPTI=1 VDIAG_CUPTI_FILTER='elementwise|reduce|copy' $V scenarios --backend flashinfer --only seed-auto-nccl \
    --out "$WORK" --gpu-state both
fi
if has waitbuild && [[ -n ${BUILD_PID:-} ]]; then say "waiting for the build"; wait "$BUILD_PID"; cat "$WORK/build.log"; fi
if has smoke; then say "smoke"; $V smoke --out "$WORK" ${VALIDATE_CUPTI:+--cupti}; fi
if has scenarios; then
  say "scenarios (flashinfer, both GPU-state collectors)"
  $V scenarios --backend flashinfer --out "$WORK" --gpu-state coredump --compare attach \
    --budget-s "$SCEN_BUDGET" ${ONLY:+--only "$ONLY"}
  say "one hang with the CUPTI launch trace (core dumps are off under CUPTI: GPU state by attach)"
  $V scenarios --backend flashinfer --out "$WORK" --gpu-state auto --cupti --tag=-cupti --only mech-token-divergence
fi
if has ptrace; then say "ptrace refused"; $V ptrace --out "$WORK"; fi
if has cupti; then say "CUPTI overhead"; $V cupti-bench --out "$WORK" --repeat "${VALIDATE_CUPTI_REPEAT:-2}"; fi
if has sim; then say "the same cases on the sim"; $V scenarios --backend sim --out "$WORK" --gpu-state none ${ONLY:+--only "$ONLY"}; fi
if has run; then  # VALIDATE_RUN: '|'-separated validate.py command lines, each given --out
  IFS='|' read -ra cmds <<< "${VALIDATE_RUN:-}"
  for c in "${cmds[@]}"; do say "run: $c"; $V $c --out "$WORK"; done
fi
if has watch; then  # issue 17's GPU row: jobs vdiag did not launch (docs/watch.md, docs/gpu-validation.md)
  J=(torchrun --standalone --nproc-per-node 2 gpu/jobs/fi_token_divergence.py)
  W=$WORK/watch; mkdir -p "$W"
  VD="python3 -m repro.cli"
  WCASES=" ${VALIDATE_WATCH_CASES:-clean spin attach} "  # also: coredump
  left() { ps -eo pid,stat,etime,cmd | grep -E "fi_token_divergence|torchrun|repro.cli" | grep -v grep || echo "none"; }
  if [[ $WCASES == *" clean "* ]]; then
    say "watch clean: the same job with agreeing token counts, under vdiag watch (expect exit 0)"
    t0=$(date +%s); FI_DIVERGE=0 timeout -s INT 240 $VD watch --stall-s 15 --reports "$W/clean" -- "${J[@]}"
    say "watch-clean: exit $? after $(( $(date +%s) - t0 )) s; left running: $(left | tr '\n' ' ')"
  fi
  if [[ $WCASES == *" spin "* ]]; then
    say "watch spin: rank 0 passes 17 tokens, rank 1 16 (expect exit 1, the job ended by --on-hang kill)"
    t0=$(date +%s); timeout -s INT 300 $VD watch --stall-s 15 --on-hang kill --reports "$W/spin" -- "${J[@]}"
    rc=$?
    say "watch-spin: exit $rc after $(( $(date +%s) - t0 )) s; left running: $(left | tr '\n' ' ')"
    if [[ $rc != 1 ]]; then
      say "watch spin 2b: the same without vdiag's instrumentation (--no-instrument)"
      t0=$(date +%s); timeout -s INT 300 $VD watch --no-instrument --stall-s 15 --on-hang kill --reports "$W/spin-noinst" -- "${J[@]}"
      say "watch-spin-noinst: exit $? after $(( $(date +%s) - t0 )) s"
    fi
  fi
  if [[ $WCASES == *" coredump "* ]]; then
    say "watch coredump: the spinning job, GPU state from CUDA core dumps asked for at start (--core-dump; it ends the dumped rank)"
    t0=$(date +%s); timeout -s INT 300 $VD watch --core-dump --gpu-state none --stall-s 15 --on-hang kill --reports "$W/coredump" -- "${J[@]}"
    say "watch-coredump: exit $? after $(( $(date +%s) - t0 )) s; left running: $(left | tr '\n' ' ')"
  fi
  if [[ $WCASES == *" attach "* ]]; then
    say "attach: the same hung job started by plain torchrun, then vdiag attach --tree (expect exit 1, job alive)"
    setsid "${J[@]}" > "$W/attach-job.log" 2>&1 &
    JPID=$!
    for _ in $(seq 1 120); do [[ $(grep -c "fused call 2/3" "$W/attach-job.log") -ge 2 ]] && break; sleep 0.5; done
    sleep 8
    t0=$(date +%s); $VD attach --tree "$JPID" --reports "$W/attach"
    rc=$?
    if kill -0 "$JPID" 2>/dev/null; then alive=yes; else alive=no; fi
    say "attach: exit $rc after $(( $(date +%s) - t0 )) s; job still alive after attach: $alive"
    kill -TERM -- -"$JPID" 2>/dev/null; sleep 3; kill -KILL -- -"$JPID" 2>/dev/null; wait "$JPID" 2>/dev/null
  fi
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv
  tar -C "$WORK" --exclude='core.*' --exclude='pipe.*' -czf "$OUT/watch.tgz" watch
fi
if has fidelity; then  # each shipped scenario N times on the real kernel (docs/fidelity.md); rows in $OUT/fidelity
  say "fidelity (flashinfer, ${VALIDATE_FIDELITY_RUNS:-3} runs per scenario)"
  $V fidelity --backend flashinfer --runs "${VALIDATE_FIDELITY_RUNS:-3}" --out "$OUT/fidelity" --work "$WORK/fidelity-runs" \
    --budget-s "${VALIDATE_FIDELITY_BUDGET_S:-3600}" ${VALIDATE_FIDELITY_ONLY:+--only "$VALIDATE_FIDELITY_ONLY"}
fi
if has pytest; then say "pytest tests/gpu"; python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -15; fi
if has fixtures; then $V fixtures --out "$WORK"; fi

say "packing"
cp "$WORK/results.jsonl" "$OUT/results.jsonl" 2>/dev/null || true
for f in resource-usage.txt build.log; do [[ -f $WORK/$f ]] && cp "$WORK/$f" "$OUT/"; done
# run folders without the core dumps and pipes (the dumps stay in the run folders on the machine)
tar -C "$WORK" --exclude='core.*' --exclude='pipe.*' -czf "$OUT/runs.tgz" runs fixtures 2>/dev/null || true
ls -la "$OUT"
$V render "$WORK" > "$OUT/table.md" 2>/dev/null || true
say "done"
