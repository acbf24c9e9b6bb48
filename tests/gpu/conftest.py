"""GPU tests: marked `gpu` and skipped on machines without an NVIDIA GPU (CI), or without FlashInfer."""

from __future__ import annotations

import importlib.util

import pytest

from repro.run import gpu_count

HAVE_GPU = gpu_count() > 0
HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "flashinfer: needs flashinfer-python as well as a GPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if not HAVE_GPU:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (NVML found none)"))
        elif "flashinfer" in item.keywords and not HAVE_FLASHINFER:
            item.add_marker(pytest.mark.skip(reason="needs flashinfer-python (pip install -e .[flashinfer])"))
