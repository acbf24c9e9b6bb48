"""The real-vLLM engine: the runner, the instrumentation of FlashInfer's calls, the vLLM arguments."""
