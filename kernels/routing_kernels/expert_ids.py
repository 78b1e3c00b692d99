"""The compact dtype of expert ids (DESIGN.md): ``uint8`` up to 256 experts, ``int16`` up to
32768, else ``int32``. One rule for the capture buffer, the routing kernel's ``capture_out``,
the engine's outputs and the trainer's traces, so that they cannot drift apart."""

from __future__ import annotations

import numpy as np
import torch

# The most experts whose ids each integer dtype holds.
ID_DTYPE_CAPACITY: dict[torch.dtype, int] = {
    torch.uint8: 256,
    torch.int16: 32768,
    torch.int32: 2**31,
}


def compact_id_dtype(num_experts: int) -> torch.dtype:
    """The smallest id dtype for ``num_experts`` experts (``numpy_id_dtype`` for numpy).

    Raises:
        TypeError: ``num_experts`` is not an int.
        ValueError: ``num_experts`` < 1 or more than int32 holds.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise TypeError(f"num_experts: expected an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
    for dtype, capacity in ID_DTYPE_CAPACITY.items():
        if num_experts <= capacity:
            return dtype
    raise ValueError(f"num_experts: expected <= {2**31}, got {num_experts}")


def numpy_id_dtype(num_experts: int) -> np.dtype:
    """``compact_id_dtype`` as a numpy dtype."""
    return np.dtype(str(compact_id_dtype(num_experts)).removeprefix("torch."))
