"""The code that runs on each rank: the worker entry, the replay engine and the real-vLLM engine."""
