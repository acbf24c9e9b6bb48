"""Sub-command groups that live outside cli.py. Each module defines `register(app: typer.Typer) -> None`."""

MODULES = ("bisect", "doctor", "vllm_scenario", "watch", "attach")
