"""vdiag: reproduce and diagnose distributed deadlocks in LLM-serving start-up."""

__version__ = "0.1.0"
