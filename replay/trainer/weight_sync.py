"""CUDA IPC weight sync: the trainer's GPU tensors handed to rollout workers on the same GPU.

``trainer.weight_sync`` picks how updated weights reach the rollout workers:

- ``object_store``: the trainer's full weights as CPU tensors, put once into Ray's object
  store; every worker reads them (any placement, any node). See ``workers``.
- ``cuda_ipc`` (this module): the trainer shares its GPU tensors as CUDA IPC handles
  (``torch.multiprocessing.reductions.reduce_tensor``: a few hundred bytes per tensor, sent
  through Ray); each worker opens them (the trainer's device memory itself, no copy), copies
  them into its engine and closes them. The trainer must keep the tensors alive and unchanged
  until every worker has closed them: the driver waits for every worker's acknowledgement
  before telling the trainer to release them.

Devices are matched by UUID, not by index: two processes may number the GPUs differently
(``CUDA_VISIBLE_DEVICES``). A worker that cannot see the trainer's GPU raises.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

__all__ = ["SharedCudaTensors", "open_cuda_tensors", "share_cuda_tensors"]

# Where the producer's device index sits in ``rebuild_cuda_tensor``'s arguments.
_DEVICE_ARG = list(inspect.signature(rebuild_cuda_tensor).parameters).index("storage_device")


@dataclass(kw_only=True, slots=True, frozen=True)
class SharedCudaTensors:
    """CUDA IPC handles of named tensors of one process (picklable; send it through Ray).

    Attributes:
        device_uuid: the UUID of the GPU holding the tensors.
        handles: per tensor, its name and ``rebuild_cuda_tensor``'s arguments.
    """

    device_uuid: str
    handles: tuple[tuple[str, tuple[Any, ...]], ...]

    def __len__(self) -> int:
        return len(self.handles)


def share_cuda_tensors(tensors: Mapping[str, torch.Tensor]) -> SharedCudaTensors:
    """IPC handles of ``tensors`` (detached CUDA tensors, all on one GPU).

    The caller keeps the tensors alive and unmodified until every consumer has closed them
    (``open_cuda_tensors`` returned), then drops them and calls ``torch.cuda.ipc_collect()``.
    """
    if not tensors:
        raise ValueError("tensors: expected at least one tensor to share, got none")
    device = None
    handles = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(tensor)}")
        if tensor.device.type != "cuda":
            raise ValueError(
                f"tensors[{name!r}]: expected a CUDA tensor (trainer.weight_sync 'cuda_ipc' "
                f"shares device memory), got device {tensor.device}"
            )
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ValueError(
                f"tensors[{name!r}]: expected every tensor on {device}, got {tensor.device}"
            )
        if tensor.requires_grad:
            raise ValueError(f"tensors[{name!r}]: expected a detached tensor, got requires_grad")
        rebuild, args = reduce_tensor(tensor)
        assert rebuild is rebuild_cuda_tensor, rebuild
        handles.append((name, args))
    assert device is not None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return SharedCudaTensors(device_uuid=uuid, handles=tuple(handles))


@contextlib.contextmanager
def open_cuda_tensors(shared: SharedCudaTensors) -> Iterator[dict[str, torch.Tensor]]:
    """The shared tensors in this process, by name, on the local index of the producer's GPU.

    On exit the device is synchronised (work queued on the tensors has read them) and the
    tensors are dropped, which closes the handles; do not keep references past the block.
    """
    if not isinstance(shared, SharedCudaTensors):
        raise TypeError(f"shared: expected SharedCudaTensors, got {type(shared).__name__}")
    index = _local_device(shared.device_uuid)
    tensors = {}
    for name, args in shared.handles:
        local = list(args)
        local[_DEVICE_ARG] = index
        tensors[name] = rebuild_cuda_tensor(*local)
    try:
        yield tensors
    finally:
        torch.cuda.synchronize(index)
        tensors.clear()


def _local_device(uuid: str) -> int:
    if not torch.cuda.is_available():
        raise ValueError(
            "trainer.weight_sync: expected CUDA in the receiving process for 'cuda_ipc', got "
            "torch.cuda.is_available() False"
        )
    count = torch.cuda.device_count()
    visible = [str(torch.cuda.get_device_properties(i).uuid) for i in range(count)]
    if uuid not in visible:
        raise ValueError(
            f"trainer.weight_sync: expected the trainer's GPU {uuid} among this process's GPUs "
            f"for 'cuda_ipc' (the rollout worker must share the trainer's GPU), got {visible}"
        )
    return visible.index(uuid)
