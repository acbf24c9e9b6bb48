"""Scenario texts that a test and a benchmark both run (written for them, not shipped in scenarios/)."""

# PP=2 TP=2, workspace over the TP group, rank 3 two-shot at one capture call (its peer stays one-shot):
# ranks 2,3 spin in their own kernels, ranks 0,1 finish and wait in the end-of-start-up barrier.
PP2_TWOSHOT = """\
# PP=2 TP=2, workspace over the TP group, rank 3 two-shot at one capture call (its peer stays one-shot).
name: pp2-tp2-rank3-twoshot
model: {preset: llama-3.1-70b, num_layers: 2}
parallel: {tp: 2, pp: 2}
capture: {sizes: [32, 24, 16, 8]}
fusion: {allreduce_rms: "on", oneshot: vllm, workspace_group: tp}
backend: sim
faults:
  - kind: protocol_mismatch
    rank: 3
    mode: twoshot
    at: {phase: capture, size: 24, layer: 0, sub: 0}
expect: hang
"""
