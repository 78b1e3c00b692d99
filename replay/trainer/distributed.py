"""Data parallelism of the trainer over several processes: the process group, FSDP2 sharding of
an HF policy, and gathering of full tensors, state dicts and Python objects.

``Learner`` is single-device model code; with ``trainer.world_size > 1`` it applies
``shard_policy`` to the loaded (and ``replay.patch``-ed) model from outside, STYLE's rule 9.
Every function here that communicates is a collective: all ranks call it, in the same order.

The process group is joined by ``init_process_group`` (the Ray ``TrainerWorker`` does it with
rank 0's address; ``torchrun`` users call ``torch.distributed.init_process_group`` themselves,
after ``torch.cuda.set_device`` of their local rank on CUDA).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

__all__ = [
    "all_gather_objects",
    "backend_for",
    "check_process_group",
    "free_port",
    "full_model_state",
    "full_optimizer_state",
    "full_tensor",
    "init_process_group",
    "load_full_optimizer_state",
    "shard_policy",
]

logger = logging.getLogger(__name__)

# Full (unsharded) state dicts, gathered to the CPU of rank 0 (the others get empty dicts).
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def backend_for(device: torch.device | str) -> str:
    """The collective backend of a device type: NCCL on CUDA, gloo on CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port that is free on this host now (for rank 0's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def init_process_group(
    *, rank: int, world_size: int, master_addr: str, master_port: int, device: str
) -> None:
    """Join the trainer's process group at ``tcp://master_addr:master_port`` (rank 0 hosts it).

    Blocks until all ``world_size`` ranks have joined. On CUDA each rank uses its current device
    (a Ray actor with one GPU sees only that one).
    """
    if dist.is_initialized():
        raise RuntimeError(
            f"init_process_group: expected no process group in this process (rank {rank}), "
            f"got one of world size {dist.get_world_size()}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank}")
    dist.init_process_group(
        backend_for(device),
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
    )
    logger.info("rank %d of %d joined %s:%d", rank, world_size, master_addr, master_port)


def check_process_group(world_size: int) -> int:
    """This process's rank: 0 for ``world_size`` 1, else the rank in the initialised group of
    exactly ``world_size`` ranks (ValueError naming ``trainer.world_size`` otherwise)."""
    if world_size == 1:
        return 0
    have = dist.get_world_size() if dist.is_initialized() else None
    if have != world_size:
        raise ValueError(
            f"trainer.world_size: expected an initialised torch.distributed process group of "
            f"{world_size} ranks (TrainerWorker joins one), got "
            f"{'none' if have is None else f'one of {have}'}"
        )
    return dist.get_rank()


def shard_policy(model: nn.Module) -> None:
    """FSDP2 in place: ``fully_shard`` every decoder layer (the classes HF lists in
    ``model._no_split_modules``), then the root (embeddings, final norm, LM head).

    Call after ``replay.patch``: the router seams and hooks live on the HF modules, which
    ``fully_shard`` keeps (it swaps their class for an FSDP subclass and turns parameters into
    DTensor shards; names are unchanged).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"model: expected decoder layers named by _no_split_modules {sorted(names)} to shard "
            f"with FSDP2, got none in {type(model).__name__}"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), or ``tensor`` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on rank 0's CPU (empty on the other ranks)."""
    return get_model_state_dict(model, options=_FULL_ON_RANK0)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name, on rank 0's CPU (empty elsewhere).

    Keyed by name, not by position, so a checkpoint resumes on any number of ranks.
    """
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a ``full_optimizer_state`` (every rank passes the whole of it; each keeps its shard)."""
    set_optimizer_state_dict(
        model,
        optimizer,
        optim_state_dict=state,
        options=StateDictOptions(full_state_dict=True),
    )


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; CPU tensors only), in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
