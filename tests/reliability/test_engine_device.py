"""A device this machine cannot give is a ValueError naming ``device`` (issue 13, section 7).

Without CUDA, ``LLM(device="cuda")``, ``"cuda:0"`` and a data-parallel ``"cuda"`` raise
ValueError naming the field, what this machine accepts and the value given, before anything is
loaded or any rank starts (not torch's ``AssertionError: Torch not compiled with CUDA
enabled``). gpu: ``cuda:N`` past the devices, and more data-parallel ranks than devices.
"""

from __future__ import annotations

import pytest
import torch

from rollout import LLM
from rollout.testing import make_tiny_moe


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("device", "ranks"), [("cuda", 1), ("cuda:0", 1), ("cuda", 2)])
def test_cuda_without_cuda_names_the_device(qwen3, device, ranks):
    with pytest.raises(ValueError, match=rf"^device: expected 'cpu' or None .*got '{device}'$"):
        LLM(qwen3, device=device, data_parallel_size=ranks)


@pytest.mark.gpu
def test_a_device_past_the_devices_names_the_device(qwen3):
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"^device: expected .* N < {count}, got 'cuda:{count}'"):
        LLM(qwen3, device=f"cuda:{count}")
    with pytest.raises(ValueError, match=rf"^data_parallel_size: expected at most {count} ranks"):
        LLM(qwen3, device="cuda", data_parallel_size=count + 1)
