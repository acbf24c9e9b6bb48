"""The replay engine: vLLM's start-up replayed call by call, the faults it injects, the JIT build it models."""
