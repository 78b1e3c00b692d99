"""``PagedBatchBuilder``: a stand-in for the block manager and input preparation in engine
tests. It hands out KV blocks and turns a step's chunks of tokens into a planned
``ForwardBatch``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from rollout.capture import RoutedExpertsCapturer
from rollout.forward_batch import ForwardBatch
from rollout.layers.attention import AttentionBackend

__all__ = ["PagedBatchBuilder"]


class PagedBatchBuilder:
    """A minimal stand-in for the block manager and input preparation, for tests.

    Hands out KV blocks from a shuffled free list (so block tables are not contiguous) and
    turns one step's chunks ``[(seq_id, new_token_ids), ...]`` into a planned ``ForwardBatch``:
    each chunk continues its sequence (a prompt, a prefill chunk or one decode token).

    Args:
        backend: the attention backend that plans each batch.
        num_blocks: KV blocks available; ``block_size``: tokens per block.
        device: where the batch's device tensors go (host mirrors stay on the CPU).
        capture: ``(num_moe_layers, top_k, dtype)`` to attach a fresh capturer to each batch
            (a row per token), its buffer filled with the dtype's largest value (an id no model
            has), or None.
        seed: shuffles the free list.
    """

    def __init__(
        self,
        backend: AttentionBackend,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        capture: tuple[int, int, torch.dtype] | None = None,
        seed: int = 0,
    ) -> None:
        self.backend = backend
        self.block_size = block_size
        self.device = torch.device(device)
        self.capture = capture
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free_blocks: list[int] = order.tolist()
        self.blocks: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    def step(
        self,
        chunks: Sequence[tuple[Hashable, Sequence[int]]],
        *,
        pad_to: int | None = None,
        cuda_graph: bool = False,
    ) -> ForwardBatch:
        """The planned batch for this step's chunks (every chunk non-empty).

        ``pad_to`` pads a decode step to that many sequences the way a CUDA-graph bucket is
        padded: each padding row has token 0, position 0, slot -1, length 0 and no blocks.
        ``cuda_graph`` is passed to the backend's ``plan``.
        """
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        tables_rows: list[list[int]] = []
        for seq_id, tokens in chunks:
            if not tokens:
                raise ValueError(f"chunks: expected non-empty token lists, got none for {seq_id!r}")
            start = self.lengths.get(seq_id, 0)
            end = start + len(tokens)
            blocks = self.blocks.setdefault(seq_id, [])
            while len(blocks) * self.block_size < end:
                if not self.free_blocks:
                    raise ValueError("num_blocks: expected enough KV blocks for the test, ran out")
                blocks.append(self.free_blocks.pop())
            self.lengths[seq_id] = end
            ids.extend(tokens)
            for pos in range(start, end):
                positions.append(pos)
                slots.append(
                    blocks[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            tables_rows.append(list(blocks))
        is_decode = all(len(tokens) == 1 for _, tokens in chunks)
        if pad_to is not None:
            if not is_decode or pad_to < len(chunks):
                raise ValueError(
                    f"pad_to: expected a decode step of at most {pad_to} sequences, "
                    f"got {len(chunks)} chunks (decode: {is_decode})"
                )
            for _ in range(pad_to - len(chunks)):
                ids.append(0)
                positions.append(0)
                slots.append(-1)
                starts.append(starts[-1] + 1)
                seq_lens.append(0)
                tables_rows.append([])
        width = max(1, max((len(row) for row in tables_rows), default=0))
        tables = torch.full((len(tables_rows), width), -1, dtype=torch.int32)
        for i, row in enumerate(tables_rows):
            tables[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        query_start_loc = torch.tensor(starts, dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        dev = self.device
        capturer = None
        if self.capture is not None:
            layers, top_k, dtype = self.capture
            capturer = RoutedExpertsCapturer(len(ids), layers, top_k, device=dev, dtype=dtype)
            capturer.buffer.fill_(torch.iinfo(dtype).max)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=query_start_loc.to(dev),
            seq_lens=lens.to(dev),
            block_tables=tables.to(dev),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=lens,
            block_tables_cpu=tables,
            is_decode=is_decode,
            attn_backend=self.backend,
            capture=capturer,
        )
        batch.attn_state = self.backend.plan(batch, cuda_graph=cuda_graph)
        return batch
