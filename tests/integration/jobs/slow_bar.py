"""A job that is slow but progressing: a tqdm-style bar that advances every few seconds, then exit 0."""

import sys
import time

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
PERIOD = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0

for i in range(STEPS + 1):
    pct = 100 * i // STEPS
    sys.stderr.write(f"\rCapturing CUDA graphs (decode, FULL): {pct:3d}%|{'#' * (pct // 10):<10}| {i}/{STEPS} [00:0{i}<00:0{STEPS - i}]")
    sys.stderr.flush()
    if i < STEPS:
        time.sleep(PERIOD)
sys.stderr.write("\n")
print("start-up finished", flush=True)
