"""Routed-expert capture inside the engine: the device buffer, the shared-memory store and each
request's rows (DESIGN.md conventions: a sequence of N tokens has rows 0 .. N-2, MoE layers
only, compact id dtype).

Legend: N tokens of a sequence, s its ``routed_experts_start``, T tokens of a step, L MoE
layers, K top_k.

The recorder rides along the engine step without a stage of its own:

- run: each MoE layer writes the step's ids into ``buffer[:T, layer]`` inside its routing kernel
  (the buffer is a static input of the runner and its CUDA graphs); the runner's
  ``after_forward`` hook files the previous step's rows into the store by KV slot (its copy is
  done once that step's forward is: by then this step is queued behind it, so the device stays
  busy) and starts the asynchronous copy of this step's rows to the host.
- schedule and postprocess: the scheduler's ``on_preempt`` and ``on_finish`` hooks
  (``save_rows``) copy the rows of a sequence that asked for them out of the store into
  ``seq.saved_routing`` before its blocks are freed, from where the previous save ended up to
  ``seq.num_computed_tokens``. So a preempted sequence keeps the rows of the forward that first
  consumed each token (sampling time), never those of its recompute; a finished one saves the
  rest, positions ``[.., N - 1)``, which every step up to the finishing one has fed.
- outputs: ``rows(seq)`` concatenates the saved blocks: rows ``s .. N-2``, [N - 1 - s, L, K].

Rows are read by KV slot, so a prefix-cache hit reads the rows of the forward that computed the
cached block. A step feeds (and so writes rows into) only slots of blocks its sequences
allocated afresh: a cached block is shared, never recomputed (a hit never covers the last
prompt token, which is fed into a block of the sequence's own), and a reallocated block is
written by its new owner's forward before anything reads it.

The store holds one step's copy pending, whose rows reach the store at the next step's
``after_forward`` (or a commit). The engine runs one batch ahead (``rollout.engine.llm_engine``):
when batch N's tokens finish a sequence, batch N+1 is launched and its copy is the pending one,
and it holds no row the finished sequence reads (it feeds at most the finished sequence's last
token, whose row is not returned); all of batch N's rows were filed at N+1's ``after_forward``.
So ``save_rows`` commits only when the pending batch feeds the sequence a position below the
end it reads, which happens when the next schedule preempts a sequence of the batch in flight:
it then waits for that batch's copy, and the saved rows are the sampling-time rows.
"""

from __future__ import annotations

import numpy as np
import torch

from rollout.capture import (
    ReaderSpec,
    RoutedExpertsCapturer,
    RoutingStore,
    compact_id_dtype,
)
from rollout.engine.scheduler import ScheduledBatch
from rollout.engine.sequence import Sequence
from rollout.outputs import RoutingSpec

__all__ = ["RoutingRecorder"]


class RoutingRecorder:
    """One DP rank's routed-expert capture: the capturer's device buffer and the routing store.

    Built before the model runner (the buffer is one of its static inputs); the store is opened
    with ``open_store`` once the KV cache is sized (it has one row per KV slot).

    Args:
        spec: the model's routing (L = ``spec.num_moe_layers``, K, and E for the id dtype).
        max_num_tokens: the most tokens a step feeds (``max_num_batched_tokens``).
        device: the model's device.
        dp_rank: this engine's data-parallel rank.

    Attributes:
        capturer: the ``RoutedExpertsCapturer`` (its ``buffer`` [max_num_tokens, L, K]).
        store: the ``RoutingStore``, None until ``open_store``.
    """

    def __init__(
        self,
        spec: RoutingSpec,
        *,
        max_num_tokens: int,
        device: torch.device,
        dp_rank: int = 0,
    ) -> None:
        self.capturer = RoutedExpertsCapturer(
            max_num_tokens,
            spec.num_moe_layers,
            spec.top_k,
            device=device,
            dp_rank=dp_rank,
            dtype=compact_id_dtype(spec.num_experts),
        )
        self.store: RoutingStore | None = None
        # The batch whose rows the store's pending copy holds, and its entries' first positions
        # by sequence id (built when a read first asks).
        self._pending_batch: ScheduledBatch | None = None
        self._pending_starts: dict[int, int] | None = None

    @property
    def buffer(self) -> torch.Tensor:
        """The device capture buffer the MoE layers write ([max_num_tokens, L, K])."""
        return self.capturer.buffer

    def open_store(self, *, name: str, num_kv_slots: int) -> None:
        """Create the shared-memory store ``name`` with a row per KV slot."""
        assert self.store is None, f"open_store: store {self.store.name!r} is open already"
        self.store = RoutingStore.for_capturer(self.capturer, name=name, num_kv_slots=num_kv_slots)

    def reader_spec(self) -> ReaderSpec:
        """What a ``RoutedExpertsReader`` in another process needs to attach to the store."""
        return self._store().reader_spec()

    # ------------------------------------------------------------------ engine hooks

    def after_forward(self, batch: ScheduledBatch) -> None:
        """The runner's hook: start copying the step's rows ``buffer[:T]`` to the store.

        ``batch`` holds the real tokens only (a CUDA-graph replay's padding rows come after
        them and are not copied).
        """
        self.commit()  # the previous step's rows, when no read needed them earlier
        self._store().after_forward(self.capturer.buffer, batch.num_tokens, batch.slot_mapping)
        self._pending_batch = batch

    def commit(self) -> None:
        """File the pending step's rows into the store (waits for that step's forward)."""
        self._store().commit()
        self._pending_batch = self._pending_starts = None

    def save_rows(self, seq: Sequence) -> None:
        """The scheduler's ``on_preempt`` and ``on_finish`` hook: copy the rows of positions
        ``[saved end, seq.num_computed_tokens)`` into ``seq.saved_routing`` while its blocks
        are still held. Nothing for a sequence that did not ask, or that was aborted (it
        gets no output)."""
        if not seq.params.return_routed_experts or seq.finish_reason == "abort":
            return
        start, end = _saved_end(seq), seq.num_computed_tokens
        if end > start:
            if self._pending_rows_needed(seq, end):
                self.commit()
            seq.saved_routing[start] = self._store().read(seq.slots(start, end))

    def _pending_rows_needed(self, seq: Sequence, end: int) -> bool:
        """Whether the pending copy holds rows of ``seq`` below position ``end``: its batch has
        an entry for ``seq`` starting there. (Rows of a block shared through the prefix cache
        and computed by that batch come with such an entry: the sharing sequence was admitted
        into the same batch.)"""
        batch = self._pending_batch
        if batch is None:
            return False
        if self._pending_starts is None:
            self._pending_starts = {entry.seq.seq_id: entry.start for entry in batch.entries}
        start = self._pending_starts.get(seq.seq_id)
        return start is not None and start < end

    def rows(self, seq: Sequence) -> np.ndarray:
        """The rows ``s .. N-2`` of a sequence that finished (stop or length): [N - 1 - s, L,
        K] in the compact id dtype."""
        saved = sorted(seq.saved_routing.items())
        spec = self._store().spec
        rows = (
            np.concatenate([block for _, block in saved])
            if saved
            else np.empty((0, spec.num_moe_layers, spec.top_k), dtype=spec.dtype)
        )
        start = seq.params.routed_experts_start
        assert (not saved or saved[0][0] == start) and rows.shape[0] == len(seq) - 1 - start, (
            f"{seq}: saved routing rows {[(p, len(b)) for p, b in saved]}, expected positions "
            f"[{start}, {len(seq) - 1})"
        )
        return rows

    def close(self) -> None:
        """Unlink the store's segment (idempotent)."""
        if self.store is not None:
            self.store.close()

    def _store(self) -> RoutingStore:
        assert self.store is not None, "the routing store is not open yet (open_store)"
        return self.store


def _saved_end(seq: Sequence) -> int:
    """One past the last position whose row ``seq.saved_routing`` holds (the saved blocks are
    contiguous from ``routed_experts_start``)."""
    if not seq.saved_routing:
        return seq.params.routed_experts_start
    last = max(seq.saved_routing)
    return last + len(seq.saved_routing[last])
