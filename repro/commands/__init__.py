"""Sub-command groups that live outside cli.py. Each module defines `register(app: typer.Typer) -> None`."""

MODULES = ("bisect", "minimize", "doctor", "vllm_scenario", "watch", "attach")
