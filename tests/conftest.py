"""Test-suite wiring: the ``gpu`` and ``triton`` markers and the device a Triton test runs on.

``gpu`` tests need CUDA and are skipped without it. ``triton`` tests run the Triton kernels:
on CUDA when there is a device, else on CPU when the interpreter is on
(``TRITON_INTERPRET=1 python -m pytest -m triton tests/kernels``), else they are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not (HAS_CUDA or TRITON_INTERPRET):
            item.add_marker(skip_triton)


@pytest.fixture
def triton_device() -> torch.device:
    """Where a ``triton``-marked test runs its kernel: CUDA if present, else the interpreter's
    CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def rng() -> torch.Generator:
    """A generator seeded afresh per test from the OS, so every run draws new inputs.

    The seed is printed on failure through the test id's captured output.
    """
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return torch.Generator().manual_seed(seed)
