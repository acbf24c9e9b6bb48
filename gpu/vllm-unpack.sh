#!/usr/bin/env bash
# The first two of the three back-to-back bundle calls (gpu/vllm-validate.sh runs the third):
#   bash gpu/vllm-unpack.sh a    (carry [".vla"]): vLLM's _C extension            -> /root/vl
#   bash gpu/vllm-unpack.sh c    (carry [".vlc"]): FlashAttention-3 + FlashInfer   -> /root/vl, /root/vsite
set -euo pipefail
cd "$(dirname "$0")/.."
VL=${VDIAG_VLLM_DIR:-/root/vl}
VSITE=${VDIAG_VLLM_SITE:-/root/vsite}
case ${1:-} in
  a) mkdir -p "$VL" && xz -dc .vla/vl-a.tar.xz | tar -x -C "$VL" ;;
  c) xz -dc .vlc/vl-fa3.tar.xz | tar -x -C "$VL" && mkdir -p "$VSITE" &&
     python3 -c "import sys, zipfile; zipfile.ZipFile('.vlc/flashinfer_pyonly.zip').extractall(sys.argv[1])" "$VSITE" ;;
  *) echo "usage: bash gpu/vllm-unpack.sh a|c  (then bash gpu/vllm-validate.sh in the third call)" >&2; exit 2 ;;
esac
ls "$VL/vllm" | head -3
