import numpy as np
import pytest
import torch

from routing_kernels.expert_ids import compact_id_dtype, numpy_id_dtype


@pytest.mark.parametrize(
    ("num_experts", "dtype"),
    [(1, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16),
     (32769, torch.int32), (2**31, torch.int32)],
)  # fmt: skip
def test_smallest_dtype_that_holds_every_id(num_experts, dtype):
    assert compact_id_dtype(num_experts) == dtype
    assert numpy_id_dtype(num_experts) == np.dtype(str(dtype).removeprefix("torch."))
    # The largest id survives the round trip through the dtype.
    assert int(torch.tensor(num_experts - 1, dtype=torch.int64).to(dtype)) == num_experts - 1


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (2**31 + 1, ValueError),
                                              (8.0, TypeError), (True, TypeError)])  # fmt: skip
def test_bad_num_experts_raise_naming_the_field(value, error):
    with pytest.raises(error, match="num_experts"):
        compact_id_dtype(value)
