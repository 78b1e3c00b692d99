"""Paged KV-cache bookkeeping: a fixed pool of blocks, reference counts and prefix caching.

Block ``b`` holds KV slots ``[b * block_size, (b + 1) * block_size)``. A sequence owns a
block table; blocks shared through the prefix cache are reference-counted.

Prefix caching. A full block is registered under ``hash_block(parent hash, its tokens)``,
chained so that the hash covers the whole prefix. It is registered when it is scheduled to be
computed, so a request admitted in the same step can already share it: the model runner writes
the KV of all of a layer's new tokens before that layer's attention reads any. A block whose
tokens include a placeholder (a sampled token not yet on the host, ``sequence.PLACEHOLDER``)
has no hash yet: the scheduler registers it once the token is filled in, before the next
schedule. A hit is
verified against the block's stored key (parent block id, parent generation, tokens), so a
hash collision is a miss, never a wrong reuse; the generation, bumped whenever a block is
reallocated, keeps a stale child entry from matching a reused parent id. A block whose
reference count drops to 0 stays registered and reusable until its id is reallocated, which
drops its entry. The free list is least-recently-freed first, with unregistered blocks at its
front (they have no value to keep) and a freed table's tail before its head.
"""

from __future__ import annotations

from collections import OrderedDict

from rollout.config import check_bool, check_int
from rollout.engine.sequence import Sequence

_NO_PARENT = -1


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """The chained prefix-cache hash of a full block (``_NO_PARENT`` for the first block)."""
    return hash((parent_hash, token_ids))


class BlockManager:
    """Allocates KV blocks to sequences, sharing full prefix blocks when caching is on.

    Args:
        num_blocks: size of the pool.
        block_size: tokens per block.
        enable_prefix_caching: reuse registered full blocks across sequences.

    Attributes:
        prefix_cache_queries: tokens looked up at first admission of each sequence.
        prefix_cache_hits: of those, tokens served from the cache.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.enable_prefix_caching = check_bool("enable_prefix_caching", enable_prefix_caching)
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._generation = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_key: list[tuple[int, int, tuple[int, ...]] | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds (registered ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def hit_rate(self) -> float:
        """``prefix_cache_hits / prefix_cache_queries`` (0 before any query)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    def ref_count(self, block_id: int) -> int:
        """How many sequences hold ``block_id``."""
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is registered in the prefix cache."""
        return self._block_hash[block_id] is not None

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def cached_prefix_len(self, seq: Sequence) -> int:
        """Tokens of ``seq`` that ``allocate`` would take from the cache (always < len(seq))."""
        return len(self._match(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``allocate(seq, num_tokens)`` has enough free blocks."""
        return self._free_blocks_needed(self._match(seq), num_tokens) <= len(self._free)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        """Whether ``may_append(seq, num_new_tokens)`` has enough free blocks."""
        return self._blocks_to_grow(seq, num_new_tokens) <= len(self._free)

    def max_appendable_tokens(self, seq: Sequence) -> int:
        """Most new tokens ``seq`` can be given now: its table's room plus all free blocks."""
        return (len(seq.block_table) + len(self._free)) * self.block_size - seq.num_computed_tokens

    # ------------------------------------------------------------------ transitions

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give a sequence without blocks a table covering its tokens ``[0, num_tokens)``.

        The leading full blocks found in the prefix cache are shared (never all of the
        sequence's tokens: its last token is always fed so that there are logits to sample);
        ``seq.num_computed_tokens`` is set to the tokens they hold. At first admission
        ``seq.num_cached_tokens`` records them and the hit counters are updated.
        """
        assert not seq.block_table, f"allocate: {seq} already holds blocks"
        assert not seq.pending_rows, f"allocate: {seq} has placeholders (its tokens are hashed)"
        matched = self._match(seq)
        num_cached = len(matched) * self.block_size
        assert num_cached < num_tokens <= len(seq), (num_cached, num_tokens, seq)
        assert self._free_blocks_needed(matched, num_tokens) <= len(self._free)
        for block_id in matched:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
        seq.block_table = matched
        seq.num_computed_tokens = num_cached
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += num_cached
        self._grow(seq, self.num_blocks_for(num_tokens) - len(matched))

    def may_append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Grow the table of ``seq`` to cover ``num_new_tokens`` tokens past the computed ones."""
        grow = self._blocks_to_grow(seq, num_new_tokens)
        assert grow <= len(self._free), f"may_append: {grow} blocks needed, {len(self._free)} free"
        self._grow(seq, grow)

    def cache_full_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Register the full blocks of ``seq`` that tokens ``[start, end)`` complete.

        Called when those tokens are scheduled, and again when a placeholder among them is
        filled in: only blocks of resolved tokens are registered. A block is registered only
        if its hash is new and its parent is this sequence's own registered block, so that the
        stored parent is exactly the block a lookup matches one step earlier in the chain.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        end = min(end, seq.num_resolved_tokens)
        hashes = self._hashes(seq, end // bs)
        for i in range(start // bs, end // bs):
            block_id = seq.block_table[i]
            if self._block_hash[block_id] is not None:
                continue  # a prefix hit, or registered by an earlier chunk
            parent = seq.block_table[i - 1] if i else _NO_PARENT
            if (parent != _NO_PARENT and self._block_hash[parent] is None) or (
                hashes[i] in self._hash_to_block
            ):
                return  # the chain is broken (duplicate or collision): later blocks stay private
            self._block_hash[block_id] = hashes[i]
            self._block_key[block_id] = self._key(parent, seq, i)
            self._hash_to_block[hashes[i]] = block_id

    def deallocate(self, seq: Sequence) -> None:
        """Release every block of ``seq`` and empty its table (registered blocks stay cached)."""
        for block_id in reversed(seq.block_table):
            assert self._ref_counts[block_id] > 0, f"deallocate: block {block_id} is not held"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._block_hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (after a weight update their KV is stale).

        Raises RuntimeError while any block is held: a running sequence would go on
        registering blocks whose KV mixes old and new weights.
        """
        in_use = self.num_blocks - len(self._free)
        if in_use:
            raise RuntimeError(
                f"reset_prefix_cache: expected no blocks in use (no running sequences), "
                f"got {in_use}"
            )
        self._hash_to_block.clear()
        self._block_hash = [None] * self.num_blocks
        self._block_key = [None] * self.num_blocks

    def reset(self) -> None:
        """Free every block and forget every registration, keeping the hit counters: the pool
        of an engine that dropped every sequence after a failed step (``Scheduler.abort_all``).
        Rebuilt rather than released block by block, so that a transition the failure
        interrupted half-way leaves nothing behind; a registered block's KV may be incomplete.
        """
        self._ref_counts = [0] * self.num_blocks
        self._free = OrderedDict.fromkeys(range(self.num_blocks))
        self._hash_to_block.clear()
        self._block_hash = [None] * self.num_blocks
        self._block_key = [None] * self.num_blocks

    # ------------------------------------------------------------------ internals

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        # seq.block_hashes only ever grows: full blocks never change.
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else _NO_PARENT
            hashes.append(hash_block(parent, tuple(seq.block_token_ids(i))))
        return hashes

    def _key(self, parent: int, seq: Sequence, index: int) -> tuple[int, int, tuple[int, ...]]:
        generation = self._generation[parent] if parent != _NO_PARENT else 0
        return (parent, generation, tuple(seq.block_token_ids(index)))

    def _match(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(seq) - 1) // self.block_size
        hashes = self._hashes(seq, max_blocks)
        matched: list[int] = []
        parent = _NO_PARENT
        for i in range(max_blocks):
            block_id = self._hash_to_block.get(hashes[i])
            if block_id is None or self._block_key[block_id] != self._key(parent, seq, i):
                break
            matched.append(block_id)
            parent = block_id
        return matched

    def _free_blocks_needed(self, matched: list[int], num_tokens: int) -> int:
        # A matched block nobody holds sits in the free list, so sharing it costs a free block.
        idle_hits = sum(1 for block_id in matched if self._ref_counts[block_id] == 0)
        return max(self.num_blocks_for(num_tokens) - len(matched), 0) + idle_hits

    def _blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        grow = self.num_blocks_for(total) - len(seq.block_table)
        return max(0, grow)

    def _grow(self, seq: Sequence, count: int) -> None:
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            if self._block_hash[block_id] is not None:
                del self._hash_to_block[self._block_hash[block_id]]
                self._block_hash[block_id] = None
                self._block_key[block_id] = None
            self._generation[block_id] += 1
            self._ref_counts[block_id] = 1
            seq.block_table.append(block_id)
