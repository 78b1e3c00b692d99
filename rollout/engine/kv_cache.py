"""The paged KV cache of the model runner: how many blocks it gets, the memory profile that
decides it on CUDA, and its release and rebuild around sleep.

Size: ``kv_cache_blocks`` when given. Otherwise on CUDA a profiling step (a prefill of
``max_num_batched_tokens`` tokens, then sampling ``max_num_seqs`` rows with top-k, top-p and
seeds, the costliest path: the runner's ``profile_step``) measures the peak memory; the cache
gets ``(total * gpu_memory_utilization - peak) // bytes_per_block`` blocks, where peak counts the
peak of torch allocations plus memory used outside torch (CUDA context, other processes).
CUDA graphs are captured after the cache and take memory beyond that budget (a few hundred MB:
hence the default utilisation 0.85). On CPU the cache holds ``max_num_seqs`` sequences of
``max_model_len`` tokens, capped at ``CPU_KV_CACHE_BYTES``.

Under ``data_parallel_mode="dp_attention"`` the profile runs on every rank at once, so its MoE
layers see the tokens of all ranks, as real steps do; the model holds only the rank's experts
(``rollout.engine.expert_parallel``), so the weights it measures are the rank's share and the KV
cache gets the memory of the experts it does not hold.

Sleep (a trainer colocated on the GPU): the runner releases the cache (``KVCache.release``)
with the CUDA graphs and the attention backend, then ``return_memory`` empties the CUDA caching
allocator; on wake-up ``KVCache.allocate`` gives a zeroed cache of the same number of blocks
(so the scheduler's block manager stays valid).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from rollout.config import EngineConfig
from rollout.engine.scheduler import ScheduledBatch, ScheduledEntry
from rollout.engine.sequence import Sequence as EngineSequence
from rollout.layers.attention import allocate_kv_cache, kv_cache_bytes_per_block
from rollout.sampling_params import SamplingParams

__all__ = [
    "CPU_KV_CACHE_BYTES",
    "PROFILE_SAMPLING",
    "KVCache",
    "reserved_bytes",
    "return_memory",
]

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30
# The sampling of the profiling step: top-k, top-p and a seed, the sampler's costliest path.
PROFILE_SAMPLING = SamplingParams(max_tokens=1, top_k=50, top_p=0.9, seed=0)


class KVCache:
    """The model's paged KV cache: its size, decided once (see the module docstring), and the
    cache tensor, bound to the model's attention layers as per-layer views.

    Args:
        config: the engine settings.
        model: the model (``attention_spec``, ``bind_kv_cache``, its attention layers).
        dtype, device: the model's.
        max_model_len: the resolved context length.
        profile_step: runs the costliest step over the ``ScheduledBatch`` it is given, as the
            runner's ``prepare`` and forward and sampling do (no routing-capture hook: the
            batch's slots are those of a temporary cache); called only on CUDA without
            ``kv_cache_blocks``, before the cache exists.

    Attributes:
        num_blocks: blocks in the cache (fixed: the scheduler's block manager has as many).
        bytes_per_block: bytes of one block over all layers.
        tensor: the cache ``[layers, num_blocks, 2, block_size, G, D]``, or None while released.
    """

    def __init__(
        self,
        config: EngineConfig,
        model: torch.nn.Module,
        *,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        profile_step: Callable[[ScheduledBatch], None],
    ) -> None:
        self.config = config
        self.model = model
        self.spec = model.attention_spec
        self.dtype = dtype
        self.device = device
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / config.block_size)
        self.bytes_per_block = kv_cache_bytes_per_block(self.spec, config.block_size, dtype)
        self.num_blocks = self._num_blocks(profile_step)
        self.tensor: torch.Tensor | None = None
        self.allocate()
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)",
            self.num_blocks,
            config.block_size,
            self.num_blocks * config.block_size,
            self.num_blocks * self.bytes_per_block / 2**30,
        )

    def allocate(self) -> None:
        """A zeroed cache of ``num_blocks`` blocks, bound to the model's attention layers."""
        self.tensor = allocate_kv_cache(
            self.spec,
            num_blocks=self.num_blocks,
            block_size=self.config.block_size,
            dtype=self.dtype,
            device=self.device,
        )
        self.model.bind_kv_cache(self.tensor)

    def release(self) -> None:
        """Drop the cache and the layers' views of it (its memory is then free)."""
        self.tensor = None
        self._unbind()

    def _unbind(self) -> None:
        # The attention layers hold views of the cache: drop them so that its memory is freed.
        for layer in self.model.model.layers:
            layer.self_attn.attn.kv_cache = None

    def _num_blocks(self, profile_step: Callable[[ScheduledBatch], None]) -> int:
        config = self.config
        if config.kv_cache_blocks is not None:
            return config.kv_cache_blocks
        if self.device.type != "cuda":
            wanted = config.max_num_seqs * self.max_blocks_per_seq
            return max(1, min(wanted, CPU_KV_CACHE_BYTES // self.bytes_per_block))
        peak = self._profile_peak_bytes(profile_step)
        total = torch.cuda.mem_get_info(self.device)[1]
        budget = total * config.gpu_memory_utilization
        blocks = int((budget - peak) // self.bytes_per_block)
        logger.info(
            "memory: %.2f GiB total, budget %.2f GiB, profiled peak %.2f GiB, KV block %.1f KiB",
            total / 2**30,
            budget / 2**30,
            peak / 2**30,
            self.bytes_per_block / 2**10,
        )
        if blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"gpu_memory_utilization: expected room for at least {self.max_blocks_per_seq} "
                f"KV blocks (one sequence of max_model_len {self.max_model_len}), got {blocks} at "
                f"{config.gpu_memory_utilization} (peak use {peak / 2**30:.2f} GiB of "
                f"{total / 2**30:.2f} GiB); raise it or lower max_model_len / "
                "max_num_batched_tokens"
            )
        return blocks

    @torch.no_grad()
    def _profile_peak_bytes(self, profile_step: Callable[[ScheduledBatch], None]) -> int:
        """Peak device memory of the costliest step, KV cache excluded (see the docstring): a
        prefill of as many whole sequences as the token budget holds, over a temporary cache
        of their blocks."""
        config, device = self.config, self.device
        seq_len = min(self.max_model_len, config.max_num_batched_tokens)
        num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens // seq_len)
        blocks_per_seq = math.ceil(seq_len / config.block_size)
        entries = []
        for i in range(num_seqs):
            seq = EngineSequence(i, [0] * seq_len, PROFILE_SAMPLING, block_size=config.block_size)
            seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            entries.append(ScheduledEntry(seq, 0, seq_len, True))
        temporary_kv = allocate_kv_cache(
            self.spec,
            num_blocks=num_seqs * blocks_per_seq,
            block_size=config.block_size,
            dtype=self.dtype,
            device=device,
        )
        self.model.bind_kv_cache(temporary_kv)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        profile_step(ScheduledBatch.build(entries))
        torch.cuda.synchronize(device)
        peak_torch = torch.cuda.max_memory_allocated(device) - temporary_kv.numel() * (
            temporary_kv.element_size()
        )
        free, total = torch.cuda.mem_get_info(device)
        outside_torch = (total - free) - torch.cuda.memory_reserved(device)
        self._unbind()
        del temporary_kv
        torch.cuda.empty_cache()
        return peak_torch + outside_torch


def return_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back to the device (on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reserved_bytes(device: torch.device) -> int:
    """Bytes the caching allocator holds on ``device`` (0 off CUDA)."""
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
