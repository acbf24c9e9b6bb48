#!/usr/bin/env bash
# Builds the real-vLLM bundle for the lent single-GPU machine (docs/vllm-engine.md, "Real vLLM on the lent
# GPU"): vLLM's wheel and FlashInfer's, stripped of what vdiag's runs never load, plus the wheels the
# machine's image lacks, as three carry folders that each fit one call (64 MiB):
#   .vla  vLLM's _C extension                                   -> unpacked into /root/vl
#   .vlc  FlashAttention-3's extension + FlashInfer's Python code -> /root/vl, /root/vsite
#   .vlb  the rest of vLLM's Python code and the wheels the image lacks (py-spy and setproctitle among
#         them; .vlb/deps-serve: the five more that `vllm serve`'s API server imports)
# Then three calls back to back: gpu/vllm-unpack.sh a, gpu/vllm-unpack.sh c, gpu/vllm-validate.sh.
# Run from the checkout's root; it adds the three folders to .git/info/exclude and writes
# .vlb/stripped.txt (every file left out, with its size). VLLM_WHEEL_CACHE=DIR reuses downloaded wheels.
# vLLM 0.20.0-0.27.x require torch==2.11.0, the image's own torch, so no torch travels.
set -euo pipefail
V=${VLLM_VERSION:-0.26.0}
FI=${FI_VERSION:-0.7.2.post1}
root=$(git rev-parse --show-toplevel); cd "$root"
for d in .vla .vlb .vlc; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
CACHE=${VLLM_WHEEL_CACHE:-$W}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in 5 17 24 26 27 28 31 34 35 36 38 39; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$CACHE" "vllm==$V" "flashinfer-python==$FI"
cp "$CACHE/vllm-$V-"*.whl "$CACHE/flashinfer_python-$FI-"*.whl "$W/" 2>/dev/null || true
mkdir -p "$W/x" "$W/fa3" .vla .vlb/deps .vlc
python3 - "$W" "$root/.vlb/stripped.txt" <<'PY'
import glob, sys, zipfile
w, manifest = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(glob.glob(f"{w}/vllm-*.whl")[0])
left_out = []
skip = ("vllm/vllm-rs", "vllm/_moe_C", "vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/",
        "vllm/_flashmla", "vllm/_qutlass", "vllm/entrypoints/serve/instrumentator/static/")
for i in z.infolist():
    f = i.filename
    if f.startswith(skip) or (f.startswith("vllm/vllm_flash_attn/") and f.endswith("_fa2_C.abi3.so")):
        left_out.append((i.file_size, f))
        continue
    z.extract(i, f"{w}/fa3" if f.endswith("_fa3_C.abi3.so") else f"{w}/x")
fi = zipfile.ZipFile(glob.glob(f"{w}/flashinfer_python-*.whl")[0])
with zipfile.ZipFile(".vlc/flashinfer_pyonly.zip", "w", zipfile.ZIP_DEFLATED) as o:
    for i in fi.infolist():
        if not i.filename.startswith("flashinfer/data/"):
            o.writestr(i, fi.read(i))
        else:
            left_out.append((i.file_size, i.filename))
with open(manifest, "w") as m:
    m.write(f"# left out of the bundle: {len(left_out)} files, {sum(s for s, _ in left_out) / 2**20:.1f} MiB unpacked\n")
    for size, name in sorted(left_out, key=lambda x: x[1]):
        m.write(f"{size}\t{name}\n")
PY
so=$(cd "$W/x" && ls vllm/_C*.so | head -1)
(cd "$W/x" && tar -cf - "$so" | xz -6 -T0 > "$root/.vla/vl-a.tar.xz")
(cd "$W/x" && tar -cf - --exclude="$so" --exclude='*.pyc' vllm vllm-*.dist-info | xz -6 -T0 > "$root/.vlb/vl-b.tar.xz")
(cd "$W/fa3" && tar -cf - vllm | xz -6 -T0 > "$root/.vlc/vl-fa3.tar.xz")
# What `import vllm` and LLM(...) needed on that image (found on a CPU machine, then on the H200).
python3 -m pip download -q --no-deps "${plat[@]}" -d .vlb/deps \
  cachetools==8.0.2 cbor2==6.3.0 msgspec==0.23.0 pybase64==1.5.1 pyzmq==27.3.0 fastapi==0.136.3 \
  starlette==1.10.0 python-multipart==0.0.34 email-validator==2.4.0 dnspython==2.9.2 openai==3.57.0 \
  openai-harmony==0.0.8 mistral_common==1.13.1 pycountry==26.2.16 pydantic-extra-types==2.11.1 \
  xgrammar==0.2.8 llguidance==1.7.6 partial-json-parser==0.2.1.1.post7 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 orjson==3.13.0 more-itertools \
  truststore==0.10.5 httpx2==2.16.2 httpcore2==2.16.2 dill==0.4.1 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 apache-tvm-ffi==0.1.15.post2 typing_extensions==4.16.0 \
  anyio==4.16.0 sniffio==1.3.1 h11==0.16.0 setproctitle==1.3.8 py-spy
# What `vllm serve` needs beyond that (its API server's imports at start-up, found on a CPU machine).
mkdir -p .vlb/deps-serve
python3 -m pip download -q --no-deps "${plat[@]}" -d .vlb/deps-serve \
  uvicorn==0.54.0 watchfiles==1.3.0 model-hosting-container-standards==0.1.16 jmespath==1.1.0 \
  prometheus-fastapi-instrumentator==8.1.0
du -sh .vla .vlb .vlc
cat <<'MSG'
Three calls, back to back:
  1. carry [".vla"]:  bash gpu/vllm-unpack.sh a
  2. carry [".vlc"]:  bash gpu/vllm-unpack.sh c
  3. carry [".vlb"]:  bash gpu/vllm-validate.sh      (OUT=$OUT; VLLM_STEPS picks steps)
If call 3 finds /root/vl/vllm missing, the machine went cold between calls: start again at call 1.
MSG
