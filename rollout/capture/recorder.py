"""The engine's one handle on routed-expert capture: the interface ``RoutingCapture``, the
recorder behind it (``RoutingRecorder``: the capturer's device buffer and the routing store) and
capture off (``CaptureOff``). The story, hook by hook: ``rollout.capture``.

Legend: N tokens of a sequence, s its ``routed_experts_start``, L MoE layers, K top_k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from rollout.capture.capturer import RoutedExpertsCapturer, compact_id_dtype
from rollout.capture.reader import ReaderSpec
from rollout.capture.store import RoutingStore

if TYPE_CHECKING:
    from rollout.engine.scheduler import ScheduledBatch
    from rollout.engine.sequence import Sequence
    from rollout.outputs import RoutingSpec

__all__ = ["CaptureOff", "RoutingCapture", "RoutingRecorder"]


class RoutingCapture(Protocol):
    """What the engine's parts ask of capture: the runner ``capturer`` (a static input its
    model writes through; None: none) and ``after_forward``; the scheduler ``on_preempt`` and
    ``on_finish``; the engine the rest."""

    @property
    def capturer(self) -> RoutedExpertsCapturer | None:
        """The device buffer's owner the MoE layers write through, or None."""
        ...

    def open_store(self, *, name: str, num_kv_slots: int) -> None:
        """Open the store of a row per KV slot (the cache is sized once the runner exists)."""
        ...

    def after_forward(self, batch: ScheduledBatch) -> None:
        """After a step's forward is enqueued: start moving its rows towards the store."""
        ...

    def on_preempt(self, seq: Sequence) -> None:
        """Before a preempted sequence's blocks are freed: keep the rows it needs."""
        ...

    def on_finish(self, seq: Sequence) -> None:
        """Before a finished sequence's blocks are freed: set ``seq.routed_experts``."""
        ...

    def commit(self) -> None:
        """File every row on its way into the store (waits for the step that computed them)."""
        ...

    def reader_spec(self) -> ReaderSpec | None:
        """How a reader in another process attaches to the store, or None."""
        ...

    def close(self) -> None:
        """Release the store (idempotent)."""
        ...


class CaptureOff:
    """Capture off (``capture_routing=False``): holds nothing and does nothing. The model gets
    no capturer, so capture costs it no allocation, kernel or per-layer work."""

    __slots__ = ()

    capturer = None

    def open_store(self, *, name: str, num_kv_slots: int) -> None:
        pass

    def after_forward(self, batch: ScheduledBatch) -> None:
        pass

    def on_preempt(self, seq: Sequence) -> None:
        pass

    def on_finish(self, seq: Sequence) -> None:
        pass

    def commit(self) -> None:
        pass

    def reader_spec(self) -> None:
        return None

    def close(self) -> None:
        pass


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

    def open_store(self, *, name: str, num_kv_slots: int) -> None:
        """Create the shared-memory store ``name`` with a row per KV slot."""
        assert self.store is None, f"open_store: store {self.store.name!r} is open already"
        self.store = RoutingStore.for_capturer(self.capturer, name=name, num_kv_slots=num_kv_slots)

    def reader_spec(self) -> ReaderSpec:
        """What a ``RoutedExpertsReader`` in another process needs to attach to the store."""
        return self._store().reader_spec()

    def after_forward(self, batch: ScheduledBatch) -> None:
        """The runner's hook: file the previous step's rows, start copying this step's rows
        ``buffer[:T]`` to the store.

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

    def on_preempt(self, seq: Sequence) -> None:
        """The scheduler's hook before a preemption frees the blocks: copy the rows of positions
        ``[saved end, seq.num_computed_tokens)`` into ``seq.saved_routing``. Nothing for a
        sequence that did not ask."""
        if not seq.params.return_routed_experts:
            return
        start, end = _saved_end(seq), seq.num_computed_tokens
        if end > start:
            seq.saved_routing[start] = self._read(seq, start, end)

    def on_finish(self, seq: Sequence) -> None:
        """The scheduler's hook before a finish frees the blocks: ``seq.routed_experts`` =
        the rows ``s .. N-2`` [N - 1 - s, L, K] in the compact id dtype, the blocks saved at
        preemptions first, then the rest read from the store straight into it. Nothing for a
        sequence that did not ask, or that was aborted (it gets no output)."""
        if not seq.params.return_routed_experts or seq.finish_reason == "abort":
            return
        first, last = seq.params.routed_experts_start, len(seq) - 1
        spec = self._store().spec
        rows = np.empty((last - first, spec.num_moe_layers, spec.top_k), dtype=spec.dtype)
        saved = sorted(seq.saved_routing.items())
        position = first
        for start, block in saved:
            assert start == position, f"{seq}: saved routing rows start at {start}, not {position}"
            rows[start - first : start - first + len(block)] = block
            position += len(block)
        end = seq.num_computed_tokens
        if end > position:
            self._read(seq, position, end, out=rows[position - first : end - first])
        assert max(position, end) == last, (
            f"{seq}: saved routing rows {[(p, len(b)) for p, b in saved]} and the cache's up to "
            f"{end}, expected positions [{first}, {last})"
        )
        seq.saved_routing.clear()
        seq.routed_experts = rows

    def close(self) -> None:
        """Unlink the store's segment (idempotent)."""
        if self.store is not None:
            self.store.close()

    def _read(
        self, seq: Sequence, start: int, end: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The store's rows of ``seq``'s positions ``[start, end)``, after filing the pending
        copy when it holds some of them."""
        if self._pending_rows_needed(seq, end):
            self.commit()
        return self._store().read(seq.slots(start, end), out)

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
