"""Tests marked ``cuda`` need a CUDA GPU: without one they are skipped, saying so."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.py on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
