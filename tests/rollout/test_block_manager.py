"""BlockManager: reference counts, the free pool, and prefix caching (hits, misses, collisions).

``admit``/``feed`` below play the scheduler's part: blocks are registered when their tokens are
scheduled, and the tokens are then computed.
"""

from __future__ import annotations

import random

import pytest

from rollout.engine import block_manager as block_manager_module
from rollout.engine.block_manager import BlockManager
from rollout.engine.sequence import Sequence
from rollout.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=4)


def make_seq(tokens: list[int], block_size: int, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, tokens, PARAMS, block_size=block_size)


def feed(bm: BlockManager, seq: Sequence, num_new_tokens: int) -> None:
    """Schedule and compute ``num_new_tokens`` more tokens of ``seq`` (blocks already there)."""
    start = seq.num_computed_tokens
    bm.cache_full_blocks(seq, start, start + num_new_tokens)
    seq.num_computed_tokens = start + num_new_tokens


def admit(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """Allocate ``seq`` for its first ``num_tokens`` tokens (all by default) and compute them."""
    num_tokens = len(seq) if num_tokens is None else num_tokens
    assert bm.can_allocate(seq, num_tokens)
    bm.allocate(seq, num_tokens)
    feed(bm, seq, num_tokens - seq.num_computed_tokens)


def assert_all_free(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def test_allocate_covers_tokens_and_deallocate_frees_everything() -> None:
    bm = BlockManager(8, 4)
    seq = make_seq(list(range(10)), 4)
    admit(bm, seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    assert bm.num_free_blocks == 5
    assert seq.slots(0, 10) == [seq.slot(p) for p in range(10)]
    assert seq.slot(5) == seq.block_table[1] * 4 + 1
    bm.deallocate(seq)
    assert seq.block_table == []
    assert_all_free(bm)


def test_same_prompt_twice_shares_its_full_blocks() -> None:
    bm = BlockManager(16, 4)
    first, second = make_seq(list(range(10)), 4, 0), make_seq(list(range(10)), 4, 1)
    admit(bm, first)
    admit(bm, second)
    assert second.num_cached_tokens == 8 and first.num_cached_tokens == 0
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]  # the partial last block is private
    assert [bm.ref_count(b) for b in second.block_table] == [2, 2, 1]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (20, 8)
    assert bm.hit_rate == pytest.approx(0.4)
    bm.deallocate(first)
    bm.deallocate(second)
    assert_all_free(bm)


def test_shared_prefix_hits_only_the_common_full_blocks() -> None:
    bm = BlockManager(16, 4)
    base = make_seq([5, 6, 7, 8, 9, 10, 11], 4, 0)  # one full block + 3 tokens
    admit(bm, base)
    longer = make_seq([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 4, 1)
    assert bm.cached_prefix_len(longer) == 4  # base's second block was partial: not cached
    admit(bm, longer)
    assert longer.num_cached_tokens == 4 and longer.block_table[0] == base.block_table[0]
    other = make_seq([5, 6, 7, 0, 9, 10, 11, 12, 1], 4, 2)
    assert bm.cached_prefix_len(other) == 0
    # The longer sequence registered its own second block: a third request now hits both.
    third = make_seq([5, 6, 7, 8, 9, 10, 11, 12, 99], 4, 3)
    assert bm.cached_prefix_len(third) == 8


def test_whole_prompt_cached_still_computes_the_last_token() -> None:
    bm = BlockManager(16, 4)
    admit(bm, make_seq(list(range(8)), 4, 0))
    again = make_seq(list(range(8)), 4, 1)
    assert bm.cached_prefix_len(again) == 4
    bm.allocate(again, 8)
    assert again.num_cached_tokens == again.num_computed_tokens == 4 < len(again)
    single = make_seq([0, 1, 2, 3], 4, 2)  # one full block only: nothing may be cached
    assert bm.cached_prefix_len(single) == 0


def test_freed_block_is_reusable_until_reallocated() -> None:
    bm = BlockManager(3, 2)
    first = make_seq([1, 2, 3, 4, 5], 2, 0)
    admit(bm, first)
    cached_ids = first.block_table[:2]
    bm.deallocate(first)
    again = make_seq([1, 2, 3, 4, 9], 2, 1)
    assert bm.cached_prefix_len(again) == 4
    admit(bm, again)
    assert again.block_table[:2] == cached_ids
    bm.deallocate(again)
    # A different request needs the whole pool: the cached blocks are reallocated.
    other = make_seq([7, 7, 7, 7, 7], 2, 2)
    admit(bm, other)
    bm.deallocate(other)
    late = make_seq([1, 2, 3, 4, 5], 2, 3)
    assert bm.cached_prefix_len(late) == 0
    admit(bm, late)
    bm.deallocate(late)
    assert_all_free(bm)


def test_eviction_takes_unregistered_blocks_first_then_tails() -> None:
    bm = BlockManager(4, 2)
    first = make_seq([1, 2, 3, 4, 5], 2, 0)  # blocks [1 2] [3 4] cached, [5] not
    other = make_seq([6], 2, 1)
    admit(bm, first)
    admit(bm, other)
    head, tail, partial = first.block_table
    (lone,) = other.block_table
    bm.deallocate(first)
    bm.deallocate(other)  # freed last, but holding nothing worth keeping
    taken = []
    for seq_id in range(2, 5):
        seq = make_seq([9], 2, seq_id)
        admit(bm, seq)
        taken += seq.block_table
    assert taken == [lone, partial, tail]
    assert bm.is_cached(head) and not bm.is_cached(tail)
    assert bm.cached_prefix_len(make_seq([1, 2, 3, 4, 5], 2, 5)) == 2  # the head survived


def test_a_broken_chain_stays_broken_for_later_chunks() -> None:
    bm = BlockManager(16, 2)
    a = make_seq([1, 1, 2, 2, 0], 2, 0)
    b = make_seq([1, 1, 2, 2, 0], 2, 1)
    bm.allocate(a, 5)
    bm.allocate(b, 5)  # both allocated before either registered anything: no hit
    feed(bm, a, 2)  # a registers [1 1]
    feed(bm, b, 2)  # b's [1 1] duplicates it: b's chain is broken
    feed(bm, b, 2)  # so b's [2 2], chunked later, must not be registered either
    feed(bm, a, 2)  # and a's [2 2], the canonical one, is
    assert not bm.is_cached(b.block_table[0]) and not bm.is_cached(b.block_table[1])
    assert bm.is_cached(a.block_table[1])
    assert bm.cached_prefix_len(make_seq([1, 1, 2, 2, 7], 2, 2)) == 4


def test_hash_collisions_are_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every block hashes alike, so every lookup after the first registration collides.
    monkeypatch.setattr(block_manager_module, "hash_block", lambda parent, tokens: 0)
    bm = BlockManager(16, 2)
    admit(bm, make_seq([1, 2, 3, 4, 5], 2, 0))
    assert bm.cached_prefix_len(make_seq([8, 9, 3, 4, 5], 2, 1)) == 0
    assert bm.cached_prefix_len(make_seq([1, 2, 3, 4, 5], 2, 2)) == 2  # the true hit survives


def test_a_child_block_is_not_reused_under_another_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hash that ignores the chain: blocks with equal tokens collide whatever their prefix.
    monkeypatch.setattr(block_manager_module, "hash_block", lambda parent, tokens: hash(tokens))
    bm = BlockManager(16, 2)
    admit(bm, make_seq([1, 1, 3, 3, 0], 2, 0))  # registers [1 1] and [3 3] after it
    admit(bm, make_seq([2, 2, 4, 4, 0], 2, 1))  # registers [2 2]
    probe = make_seq([2, 2, 3, 3, 0], 2, 2)
    # [2 2] hits; [3 3] is found by its hash but was computed after [1 1]: a miss.
    assert bm.cached_prefix_len(probe) == 2


def test_a_child_entry_does_not_outlive_its_reallocated_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(block_manager_module, "hash_block", lambda parent, tokens: hash(tokens))
    bm = BlockManager(3, 2)
    first = make_seq([1, 1, 3, 3, 0], 2, 0)
    admit(bm, first)
    parent, child = first.block_table[:2]
    bm.deallocate(first)
    # The free list never evicts a parent before its child (a child is always freed first);
    # force that order to check the generation guard behind it.
    bm._free.move_to_end(parent, last=False)
    reuse = make_seq([2, 2, 0], 2, 1)
    admit(bm, reuse)
    assert reuse.block_table[0] == parent and bm.is_cached(parent) and bm.is_cached(child)
    assert bm.cached_prefix_len(make_seq([2, 2, 3, 3, 0], 2, 2)) == 2


def test_reset_prefix_cache_forgets_every_block() -> None:
    bm = BlockManager(8, 2)
    seq = make_seq([1, 2, 3, 4, 5], 2, 0)
    admit(bm, seq)
    with pytest.raises(RuntimeError, match="expected no blocks in use"):
        bm.reset_prefix_cache()
    bm.deallocate(seq)
    bm.reset_prefix_cache()
    assert bm.cached_prefix_len(make_seq([1, 2, 3, 4, 5], 2, 1)) == 0
    assert not any(bm.is_cached(b) for b in range(8))


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    admit(bm, make_seq([1, 2, 3, 4, 5], 2, 0))
    again = make_seq([1, 2, 3, 4, 5], 2, 1)
    admit(bm, again)
    assert again.num_cached_tokens == 0 and bm.prefix_cache_hits == 0
    assert not any(bm.is_cached(b) for b in range(8))


def test_sharing_an_idle_cached_block_costs_a_free_block() -> None:
    bm = BlockManager(3, 2)
    first = make_seq([1, 2, 3, 4, 5], 2, 0)
    admit(bm, first)
    bm.deallocate(first)  # its two full blocks stay cached, all 3 blocks are free
    holder = make_seq([9, 9], 2, 1)
    admit(bm, holder)  # takes one free block (the unregistered one first)
    again = make_seq([1, 2, 3, 4, 5], 2, 2)
    assert bm.cached_prefix_len(again) == 4
    # Two idle hits plus one new block would need 3 free blocks; only 2 are free.
    assert not bm.can_allocate(again, 5)
    bm.deallocate(holder)
    assert bm.can_allocate(again, 5)


def test_growth_and_appendable_tokens() -> None:
    bm = BlockManager(4, 4)
    seq = make_seq(list(range(6)), 4)
    admit(bm, seq, 3)
    assert len(seq.block_table) == 1 and bm.max_appendable_tokens(seq) == 4 * 4 - 3
    assert bm.can_append(seq, 1) and bm.can_append(seq, 13) and not bm.can_append(seq, 14)
    bm.may_append(seq, 3)  # positions 3..5: crosses into a second block
    assert len(seq.block_table) == 2


def test_random_workloads_keep_reference_counts_exact(seed: int) -> None:
    """Random admit / chunk / decode / preempt / finish sequences against a shadow model.

    The shadow checks every reference count, that a prefix hit only ever returns a block
    whose computed content is exactly the requested prefix, and that everything is free at
    the end.
    """
    trials = random.Random(seed)
    for _ in range(30):
        trial_seed = trials.getrandbits(32)
        _random_workload(random.Random(trial_seed), trial_seed)


def _random_workload(rng: random.Random, seed: int) -> None:
    bs = rng.choice([1, 2, 3, 4])
    bm = BlockManager(rng.randint(4, 24), bs, enable_prefix_caching=rng.random() < 0.8)
    prefixes = [[rng.randrange(6) for _ in range(rng.randint(0, 10))] for _ in range(3)]
    content: dict[int, tuple[int, ...]] = {}  # block -> the prefix its KV was computed from
    live: list[Sequence] = []
    waiting: list[Sequence] = []

    def compute(seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        feed(bm, seq, n)
        for p in range(start, start + n):
            if (p + 1) % bs == 0:
                content[seq.block_table[p // bs]] = tuple(seq.token_ids[: p + 1])

    def check() -> None:
        expected = [0] * bm.num_blocks
        for seq in live:
            for b in seq.block_table:
                expected[b] += 1
        assert [bm.ref_count(b) for b in range(bm.num_blocks)] == expected, seed
        assert bm.num_free_blocks == expected.count(0), seed

    for step in range(120):
        action = rng.random()
        if action < 0.25 or not (live or waiting):
            prompt = rng.choice(prefixes) + [rng.randrange(6) for _ in range(rng.randint(1, 8))]
            waiting.append(Sequence(step, prompt, PARAMS, block_size=bs))
        elif action < 0.5 and waiting:
            seq = waiting[0]
            cached = bm.cached_prefix_len(seq)
            n = rng.randint(cached + 1, len(seq))
            if bm.can_allocate(seq, n):
                waiting.pop(0)
                bm.allocate(seq, n)
                for i, b in enumerate(seq.block_table[: cached // bs]):
                    assert content[b] == tuple(seq.token_ids[: (i + 1) * bs]), seed
                assert seq.num_computed_tokens == cached, seed
                live.append(seq)
                compute(seq, n - cached)
        elif action < 0.8 and live:
            seq = rng.choice(live)
            if seq.num_computed_tokens == len(seq):  # sample a token, then feed it
                seq.append_token(rng.randrange(6), 0.0)
            n = rng.randint(1, len(seq) - seq.num_computed_tokens)
            if bm.can_append(seq, n):
                bm.may_append(seq, n)
                compute(seq, n)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.deallocate(seq)
            if rng.random() < 0.5:  # preempted: comes back later with its tokens
                seq.num_computed_tokens = 0
                seq.num_preemptions += 1
                waiting.append(seq)
        elif rng.random() < 0.5:
            bm.reset_prefix_cache()
            content.clear()
        check()
    for seq in live:
        bm.deallocate(seq)
    live.clear()
    check()
    assert_all_free(bm)
