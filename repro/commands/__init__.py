"""The commands; cli.py only registers them. Each module defines `register(app: typer.Typer) -> None`."""

MODULES = ("run", "report", "scenario", "bisect", "minimize", "doctor", "vllm_scenario", "watch", "attach")
