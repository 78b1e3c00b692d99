"""Scheduler: continuous batching, chunked prefill, prefix caching and preemption end to end.

The scheduler is driven by a fake model runner with a simulated paged KV cache. Each slot
stores (token, digest of the whole prefix up to that token), the digest chained from the
previous position's slot as read through the batch's block tables, so the "KV" of a token
depends on every earlier token the way real attention does. The next token and its logprob
are functions of the last digest. Any wrong slot, stale cached block or lost token changes
the generated tokens, which must equal a reference computed straight from the tokens.
Every end-to-end case runs both ways: synchronous (schedule -> run -> postprocess) and
pipelined as the engine steps (schedule N+1 -> run -> advance -> postprocess N, the fake runner
filling N+1's placeholders from N's tokens as the real one does on the device).
Capacity is also the EngineConfig / EngineState validation (they size the scheduler).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import random
import types
from pathlib import Path

import pytest

from rollout.config import EngineConfig, EngineState
from rollout.engine.scheduler import ScheduledBatch, Scheduler
from rollout.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from rollout.sampling_params import SamplingParams

VOCAB = 12
EOS = 0
_MOD = (1 << 61) - 1


def chain(digest: int, token: int) -> int:
    return (digest * 1_000_003 + token + 1) % _MOD


def next_token(digest: int) -> int:
    return (digest >> 7) % VOCAB


def logprob_of(digest: int) -> float:
    return -((digest >> 3) % 1000) / 100.0


def reference(prompt: list[int], params: SamplingParams, max_model_len: int, eos=(EOS,)):
    """(generated tokens, logprobs, finish reason) computed straight from the tokens."""
    tokens, digest = list(prompt), 0
    for token in prompt:
        digest = chain(digest, token)
    generated: list[int] = []
    logprobs: list[float] = []
    while True:
        token = next_token(digest)
        generated.append(token)
        logprobs.append(logprob_of(digest))
        tokens.append(token)
        digest = chain(digest, token)
        if token in params.stop_token_ids or (not params.ignore_eos and token in eos):
            return generated, logprobs, "stop"
        if len(generated) >= params.max_tokens or len(tokens) >= max_model_len:
            return generated, logprobs, "length"


class FakeRunner:
    """Reads and writes a simulated KV cache exactly as the batch's inputs say."""

    def __init__(self, num_slots: int, block_size: int) -> None:
        self.kv: list[tuple[int, int] | None] = [None] * num_slots
        self.block_size = block_size

    def run(
        self, batch: ScheduledBatch, previous: list[int] | None = None
    ) -> tuple[list[int], list[float]]:
        """The batch's sampled tokens and logprobs; ``previous``: the tokens of the batch in
        flight, which the batch's placeholders stand for."""
        bs = self.block_size
        input_ids = list(batch.input_ids)
        for index, row in zip(batch.placeholder_indices, batch.placeholder_rows, strict=True):
            assert input_ids[index] == PLACEHOLDER and previous is not None
            input_ids[index] = previous[row]
        assert PLACEHOLDER not in input_ids, "a placeholder without its source row"
        last_digests = []
        for i, entry in enumerate(batch.entries):
            lo, hi = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            table = batch.block_tables[i]

            def slot(position: int, table: list[int] = table) -> int:
                return table[position // bs] * bs + position % bs

            # "Attention" over the whole context: every cached slot must chain correctly.
            digest = 0
            for position in range(entry.start):
                stored = self.kv[slot(position)]
                assert stored is not None, f"{entry.seq}: read an unwritten slot at {position}"
                assert stored[1] == chain(digest, stored[0]), f"{entry.seq}: stale KV at {position}"
                digest = stored[1]
            for k in range(lo, hi):
                assert batch.slot_mapping[k] == slot(batch.positions[k])
                digest = chain(digest, input_ids[k])
                self.kv[batch.slot_mapping[k]] = (input_ids[k], digest)
            last_digests.append(digest)
        sampled = [last_digests[i] for i in batch.sample_indices]
        return [next_token(d) for d in sampled], [logprob_of(d) for d in sampled]


def make_scheduler(
    *,
    num_blocks: int,
    block_size: int,
    budget: int = 64,
    max_num_seqs: int = 8,
    max_model_len: int = 256,
    prefix_caching: bool = True,
    on_preempt=None,
    on_finish=None,
) -> Scheduler:
    config = EngineConfig(
        model="unused",
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix_caching,
    )
    state = EngineState(num_kv_blocks=num_blocks, max_model_len=max_model_len, eos_token_ids=(EOS,))
    # The scheduler's side of routed-expert capture, as probes.
    capture = types.SimpleNamespace(
        on_preempt=on_preempt or (lambda seq: None), on_finish=on_finish or (lambda seq: None)
    )
    return Scheduler(config, state, capture=capture)


def runner_for(scheduler: Scheduler) -> FakeRunner:
    bm = scheduler.block_manager
    return FakeRunner(bm.num_blocks * bm.block_size, bm.block_size)


def _finishes_in_flight(seq: Sequence) -> bool:
    return bool(seq.pending_rows) and seq.num_generated_tokens >= seq.params.max_tokens


def check_batch(scheduler: Scheduler, batch: ScheduledBatch, running_before, preemptions_before):
    """The invariants of a freshly scheduled batch."""
    bm = scheduler.block_manager
    for seq in scheduler.waiting:
        assert seq.num_computed_tokens == 0 and seq.block_table == [], seq
    ids = [seq.seq_id for seq in scheduler.running]
    assert ids == sorted(ids), "running must stay in arrival order (victims are the newest)"
    scheduled = {e.seq.seq_id for e in batch.entries}
    if batch.num_tokens < scheduler.max_num_batched_tokens:
        # Work conserving: a running sequence left out had no room for a single token, or its
        # last token is in flight.
        for seq in scheduler.running:
            assert (
                seq.seq_id in scheduled
                or bm.max_appendable_tokens(seq) <= 0
                or _finishes_in_flight(seq)
            ), seq
    assert not any(_finishes_in_flight(e.seq) for e in batch.entries)
    if scheduler.num_preemptions > preemptions_before:  # no admission in a preempting step
        assert scheduled <= running_before
    assert batch.num_tokens <= scheduler.max_num_batched_tokens
    assert len(batch.entries) <= scheduler.max_num_seqs
    assert len(scheduled) == len(batch.entries)
    assert len(set(batch.slot_mapping)) == len(batch.slot_mapping)
    for i, entry in enumerate(batch.entries):
        lo, hi = batch.query_start_loc[i], batch.query_start_loc[i + 1]
        assert hi - lo == entry.num_new_tokens >= 1
        assert entry.start == entry.seq.num_computed_tokens
        assert batch.positions[lo:hi] == list(range(entry.start, entry.end))
        assert batch.input_ids[lo:hi] == entry.seq.token_ids[entry.start : entry.end]
        assert entry.samples == (entry.end == len(entry.seq))
        assert batch.seq_lens[i] == entry.end
    assert batch.is_decode == (batch.num_tokens == len(batch.entries)) != batch.is_prefill
    # Exactly the fed placeholders have a source row.
    assert sorted(batch.placeholder_indices) == [
        k for k, token in enumerate(batch.input_ids) if token == PLACEHOLDER
    ]


def drive(
    scheduler: Scheduler,
    runner: FakeRunner | None = None,
    max_steps: int = 10_000,
    *,
    pipelined: bool = False,
) -> list[ScheduledBatch]:
    """Run the steps until every sequence finished: schedule -> fake model -> postprocess, or
    ``pipelined`` as the engine does: schedule N+1 -> fake model (fed N's tokens) -> advance
    N+1 -> postprocess N.

    Checks the per-step invariants and returns the batches. Pass the same ``runner`` to
    drives of one scheduler: its simulated KV cache is what the prefix cache points into.
    """
    bm = scheduler.block_manager
    runner = runner or runner_for(scheduler)
    batches = []
    in_flight: tuple[ScheduledBatch, list[int], list[float]] | None = None
    for _ in range(max_steps):
        if not scheduler.has_unfinished() and in_flight is None:
            break
        running_before = {seq.seq_id for seq in scheduler.running}
        preemptions_before = scheduler.num_preemptions
        batch = scheduler.schedule()
        launched = None
        if batch is None:
            assert in_flight is not None, "nothing scheduled and nothing in flight"
        else:
            assert batch.entries
            check_batch(scheduler, batch, running_before, preemptions_before)
            assert pipelined or not batch.placeholder_indices
            tokens, logprobs = runner.run(batch, None if in_flight is None else in_flight[1])
            batches.append(batch)
            if not pipelined:
                scheduler.postprocess(batch, tokens, logprobs)
                continue
            scheduler.advance(batch)
            launched = (batch, tokens, logprobs)
        if in_flight is not None:
            scheduler.postprocess(*in_flight)
        in_flight = launched
    else:
        raise AssertionError(f"not finished after {max_steps} steps")
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    return batches


def check_outputs(seqs: list[Sequence], max_model_len: int = 256, context: object = "") -> None:
    for seq in seqs:
        generated, logprobs, reason = reference(seq.prompt_token_ids, seq.params, max_model_len)
        assert seq.status is SequenceStatus.FINISHED, context
        assert not seq.pending_rows and seq.num_computed_tokens <= len(seq) - 1, (
            context,
            seq,
        )
        assert seq.generated_token_ids == generated, (context, seq)
        assert seq.logprobs == logprobs, (context, seq)
        assert seq.finish_reason == reason, (context, seq)


# ---------------------------------------------------------------------- end to end


@pytest.mark.parametrize("pipelined", [False, True])
def test_random_workloads_match_the_reference(pipelined: bool, seed: int) -> None:
    """Random requests, pool sizes, budgets and block sizes, each trial from its own seed."""
    exercised = {"preemption": 0, "prefix hit": 0, "mid-prompt chunk": 0, "stop": 0}
    if pipelined:
        exercised.update({"placeholder fed": 0, "stopped in flight": 0, "preempted in flight": 0})

    def on_preempt(seq: Sequence) -> None:
        # A sequence of the batch in flight: its token resolves while it waits.
        exercised["preempted in flight"] += bool(seq.pending_rows)

    trials = random.Random(seed)
    for _ in range(200):
        trial_seed = trials.getrandbits(32)
        rng = random.Random(trial_seed)
        bs = rng.choice([1, 2, 3, 4, 8])
        prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 12))] for _ in range(3)]
        requests = []
        for _ in range(rng.randint(1, 10)):
            prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))]
            params = SamplingParams(
                max_tokens=rng.randint(1, 12),
                ignore_eos=rng.random() < 0.5,
                stop_token_ids=tuple(rng.sample(range(VOCAB), rng.randint(0, 1))),
            )
            requests.append((prompt, params))
        most_blocks = max(-(-(len(p) + sp.max_tokens - 1) // bs) for p, sp in requests)
        scheduler = make_scheduler(
            num_blocks=rng.randint(most_blocks, 2 * most_blocks),
            block_size=bs,
            budget=rng.randint(1, 24),
            max_num_seqs=rng.randint(1, 6),
            prefix_caching=rng.random() < 0.8,
            on_preempt=on_preempt if pipelined else None,
        )
        seqs = [scheduler.add(p, sp) for p, sp in requests]
        batches = drive(scheduler, pipelined=pipelined)
        check_outputs(seqs, context=f"trial seed {trial_seed}")
        exercised["preemption"] += scheduler.num_preemptions > 0
        exercised["prefix hit"] += scheduler.block_manager.prefix_cache_hits > 0
        exercised["mid-prompt chunk"] += any(not e.samples for b in batches for e in b.entries)
        exercised["stop"] += any(s.finish_reason == "stop" for s in seqs)
        # Only a pipelined step feeds a finished sequence's last token: one that stopped.
        last_fed = [e.seq for b in batches for e in b.entries if e.start == len(e.seq) - 1]
        assert all(pipelined and seq.finish_reason == "stop" for seq in last_fed), last_fed
        if pipelined:
            exercised["placeholder fed"] += any(b.placeholder_indices for b in batches)
            exercised["stopped in flight"] += bool(last_fed)
    # Each case occurs in roughly 40-80% of trials; 200 trials make a zero practically impossible.
    assert all(exercised.values()), exercised


@pytest.mark.parametrize("pipelined", [False, True])
def test_preempted_sequence_resumes_and_matches_the_reference(pipelined: bool) -> None:
    seen: list[tuple[int, list[int], int, bool]] = []

    def on_preempt(seq: Sequence) -> None:
        bm = scheduler.block_manager
        intact = (
            seq.status is SequenceStatus.RUNNING
            and len(seq.block_table) >= bm.num_blocks_for(seq.num_computed_tokens)
            and all(bm.ref_count(b) >= 1 for b in seq.block_table)
        )
        seen.append((seq.seq_id, list(seq.block_table), seq.num_computed_tokens, intact))

    # 8 blocks of 2 tokens; three requests of up to 4 + 10 - 1 tokens (7 blocks) each.
    scheduler = make_scheduler(num_blocks=8, block_size=2, budget=16, on_preempt=on_preempt)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    seqs = [scheduler.add([1 + i, 2, 3, 4], params) for i in range(3)]
    drive(scheduler, pipelined=pipelined)
    check_outputs(seqs)
    assert scheduler.num_preemptions > 0 and sum(s.num_preemptions for s in seqs) == len(seen)
    assert all(intact for *_, intact in seen), seen
    assert all(table and computed > 0 for _, table, computed, _ in seen), seen
    assert all(len(s.generated_token_ids) == 10 for s in seqs)
    # Re-admission after preemption does not count as prefix caching of the request.
    assert [s.num_cached_tokens for s in seqs] == [0, 0, 0]
    assert scheduler.block_manager.prefix_cache_queries == 12
    # The oldest request is never the victim of a newer one.
    assert seqs[0].num_preemptions == 0


@pytest.mark.parametrize("pipelined", [False, True])
def test_on_finish_sees_every_fed_token_in_its_blocks(pipelined: bool) -> None:
    """``on_finish`` runs once per finish (stop, length, abort) with the reason set and before
    the blocks are freed: after stop or length, positions [0, len - 1) are computed and their
    KV (where capture reads rows) sits at ``seq.slots(0, len - 1)`` (pipelined too: no
    placeholder is left). A sequence preempted while in flight finishes waiting, without
    blocks (its rows were saved at preemption)."""
    seen: list[tuple[int, str | None, bool]] = []

    def on_finish(seq: Sequence) -> None:
        held = bool(seq.block_table) and all(bm.ref_count(b) >= 1 for b in seq.block_table)
        seen.append((seq.seq_id, seq.finish_reason, held))
        assert not seq.pending_rows
        if seq.finish_reason != "abort" and seq.status is SequenceStatus.WAITING:
            assert pipelined and not held and seq.num_computed_tokens == 0
        elif seq.finish_reason != "abort":
            assert seq.status is SequenceStatus.RUNNING
            assert seq.num_computed_tokens == len(seq) - 1
            stored = [runner.kv[slot] for slot in seq.slots(0, len(seq) - 1)]
            assert [token for token, _ in stored] == seq.token_ids[:-1], seq

    # Small cache and budget: preemption, chunked prefill and prefix hits along the way.
    scheduler = make_scheduler(num_blocks=7, block_size=2, budget=6, on_finish=on_finish)
    bm = scheduler.block_manager
    runner = runner_for(scheduler)
    stop_at = reference([3, 1, 4, 1, 5], SamplingParams(max_tokens=9), 256)[0][2]
    seqs = [
        scheduler.add([3, 1, 4, 1, 5], SamplingParams(max_tokens=9, stop_token_ids=[stop_at])),
        scheduler.add([3, 1, 4, 1, 6], SamplingParams(max_tokens=7, ignore_eos=True)),
        scheduler.add([2, 7], SamplingParams(max_tokens=8, ignore_eos=True)),
        scheduler.add([9] * 5, SamplingParams(max_tokens=3, ignore_eos=True)),
    ]
    scheduler.abort(seqs[3].seq_id)  # waiting: holds no blocks
    running = scheduler.add([8, 8, 8], SamplingParams(max_tokens=8, ignore_eos=True))
    while running.status is not SequenceStatus.RUNNING:
        batch = scheduler.schedule()
        scheduler.postprocess(batch, *runner.run(batch))
    scheduler.abort(running.seq_id)  # running: its blocks are still held
    drive(scheduler, runner, pipelined=pipelined)
    check_outputs(seqs[:3])
    assert seqs[0].finish_reason == "stop" and scheduler.num_preemptions > 0
    by_id = {seq_id: (reason, held) for seq_id, reason, held in seen}
    assert len(seen) == len(by_id) == 5
    assert by_id[seqs[3].seq_id] == ("abort", False)
    assert by_id[running.seq_id] == ("abort", True)
    assert all(by_id[seq.seq_id][1] or seq.num_preemptions for seq in seqs[:3])
    assert all(seq.block_table == [] for seq in [*seqs, running])


@pytest.mark.parametrize("pipelined", [False, True])
def test_preemption_of_a_partly_prefilled_sequence(pipelined: bool) -> None:
    # A long prompt chunked over several steps is preempted by an older decoding sequence.
    scheduler = make_scheduler(num_blocks=6, block_size=2, budget=3)
    first = scheduler.add([1, 2, 3], SamplingParams(max_tokens=9, ignore_eos=True))
    second = scheduler.add([5] * 9, SamplingParams(max_tokens=1, ignore_eos=True))
    drive(scheduler, pipelined=pipelined)
    check_outputs([first, second])
    assert second.num_preemptions > 0 and first.num_preemptions == 0


@pytest.mark.parametrize("pipelined", [False, True])
def test_recompute_refeeds_generated_tokens_and_counts_them(pipelined: bool) -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=2, budget=4, prefix_caching=False)
    seqs = [
        scheduler.add([3, 4], SamplingParams(max_tokens=8, ignore_eos=True)),
        scheduler.add([7, 8], SamplingParams(max_tokens=8, ignore_eos=True)),
    ]
    batches = drive(scheduler, pipelined=pipelined)
    check_outputs(seqs)
    victim = seqs[1]
    assert victim.num_preemptions > 0
    # After a preemption the victim restarts at position 0 and re-feeds generated tokens.
    assert any(e.seq is victim and e.start == 0 and e.end > 2 for b in batches for e in b.entries)
    assert len(victim.generated_token_ids) == 8 == len(victim.logprobs)


# ---------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize(
    ("budget", "expected_chunks"),
    [
        (8, [(0, 8), (8, 8), (16, 7)]),  # every chunk ends on a block boundary (bs 4)
        (6, [(0, 6), (6, 6), (12, 6), (18, 5)]),  # mid-block, boundary, mid-block, end
        (23, [(0, 23)]),
        (1, [(p, 1) for p in range(23)]),
    ],
)
def test_chunked_prefill_boundaries(
    budget: int, expected_chunks: list[tuple[int, int]], pipelined: bool
) -> None:
    scheduler = make_scheduler(num_blocks=16, block_size=4, budget=budget)
    prompt = [1 + (7 * i) % (VOCAB - 1) for i in range(23)]
    seq = scheduler.add(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    batches = drive(scheduler, pipelined=pipelined)
    check_outputs([seq])
    prefill = [b.entries[0] for b in batches if b.entries[0].start < len(prompt)]
    assert [(e.start, e.num_new_tokens) for e in prefill] == expected_chunks
    assert [e.samples for e in prefill] == [False] * (len(prefill) - 1) + [True]
    assert [b.sample_indices for b in batches[: len(prefill) - 1]] == [[]] * (len(prefill) - 1)
    # Each chunk keeps the earlier chunks' blocks.
    tables = [b.block_tables[0] for b in batches[: len(prefill)]]
    assert all(later[: len(earlier)] == earlier for earlier, later in itertools.pairwise(tables))


def test_decodes_come_first_and_prefill_takes_the_rest_of_the_budget() -> None:
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=5)
    decoding = scheduler.add([1, 2], SamplingParams(max_tokens=20, ignore_eos=True))
    first = scheduler.schedule()
    scheduler.postprocess(first, [3], [0.0])
    long = scheduler.add([4] * 12, SamplingParams(max_tokens=1, ignore_eos=True))
    batch = scheduler.schedule()
    assert [(e.seq, e.start, e.num_new_tokens) for e in batch.entries] == [
        (decoding, 2, 1),
        (long, 0, 4),
    ]
    assert batch.is_prefill and batch.sample_indices == [0] and batch.logits_indices == [0]


@pytest.mark.parametrize("pipelined", [False, True])
def test_max_num_seqs_is_respected(pipelined: bool) -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=2, budget=100, max_num_seqs=3)
    seqs = [
        scheduler.add([i + 1, 2], SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(7)
    ]
    batches = drive(scheduler, pipelined=pipelined)
    check_outputs(seqs)
    assert max(len(b.entries) for b in batches) == 3


# ---------------------------------------------------------------------- prefix caching


@pytest.mark.parametrize("pipelined", [False, True])
def test_whole_prompt_cached_still_samples_from_its_last_token(pipelined: bool) -> None:
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    runner = runner_for(scheduler)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    first = scheduler.add(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    drive(scheduler, runner, pipelined=pipelined)
    second = scheduler.add(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    batches = drive(scheduler, runner, pipelined=pipelined)
    entry = batches[0].entries[0]
    assert (entry.start, entry.num_new_tokens, entry.samples) == (4, 4, True)
    assert second.num_cached_tokens == 4 and first.num_cached_tokens == 0
    check_outputs([first, second])


@pytest.mark.parametrize("pipelined", [False, True])
def test_same_step_requests_share_blocks_computed_in_that_step(pipelined: bool) -> None:
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64)
    prompt = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    seqs = [scheduler.add(prompt, SamplingParams(max_tokens=5, seed=i)) for i in range(4)]
    batches = drive(scheduler, pipelined=pipelined)
    check_outputs(seqs)
    assert len(batches[0].entries) == 4
    assert [s.num_cached_tokens for s in seqs] == [0, 8, 8, 8]
    assert scheduler.block_manager.prefix_cache_hits == 24


@pytest.mark.parametrize("pipelined", [False, True])
def test_prefix_caching_off_and_on_give_the_same_outputs(pipelined: bool) -> None:
    outputs = []
    for caching in (False, True):
        scheduler = make_scheduler(num_blocks=12, block_size=2, budget=7, prefix_caching=caching)
        prompts = [[5, 6, 7, 8, 9, 1 + i] for i in range(4)]
        seqs = [scheduler.add(p, SamplingParams(max_tokens=6)) for p in prompts]
        drive(scheduler, pipelined=pipelined)
        outputs.append([s.generated_token_ids for s in seqs])
        assert (scheduler.block_manager.prefix_cache_hits > 0) == caching
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------------- stop rules, abort


@pytest.mark.parametrize("pipelined", [False, True])
def test_stop_rules(pipelined: bool) -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_model_len=12)
    prompt = [4, 4]
    reference_tokens, *_ = reference(prompt, SamplingParams(max_tokens=10, ignore_eos=True), 12)
    stop_at = reference_tokens[2]
    by_stop_id = scheduler.add(
        prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop_at], ignore_eos=True)
    )
    by_length = scheduler.add(prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    drive(scheduler, pipelined=pipelined)
    assert by_stop_id.finish_reason == "stop" and by_stop_id.generated_token_ids[-1] == stop_at
    assert len(by_stop_id.generated_token_ids) == reference_tokens.index(stop_at) + 1
    assert by_length.finish_reason == "length" and len(by_length) == 12


@pytest.mark.parametrize("pipelined", [False, True])
def test_eos_stops_unless_ignored(pipelined: bool) -> None:
    prompt = next(
        [a, b]
        for a in range(1, VOCAB)
        for b in range(1, VOCAB)
        if reference([a, b], SamplingParams(max_tokens=8, ignore_eos=True), 256)[0][1] == EOS
    )
    scheduler = make_scheduler(num_blocks=16, block_size=2)
    stops = scheduler.add(prompt, SamplingParams(max_tokens=8))
    ignores = scheduler.add(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    drive(scheduler, pipelined=pipelined)
    check_outputs([stops, ignores])
    assert stops.finish_reason == "stop" and stops.generated_token_ids[-1] == EOS
    assert len(ignores.generated_token_ids) == 8 and EOS in ignores.generated_token_ids


def test_abort_waiting_running_and_in_flight_sequences() -> None:
    scheduler = make_scheduler(num_blocks=16, block_size=2, budget=4, max_num_seqs=2)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    runner = runner_for(scheduler)
    a, b, c = (scheduler.add([i, i + 1, i + 2], params) for i in (1, 4, 7))
    batch = scheduler.schedule()  # a (3 tokens) and the first token of b; c waits
    assert [(e.seq, e.num_new_tokens) for e in batch.entries] == [(a, 3), (b, 1)]
    assert scheduler.abort(c.seq_id) is c and c.finish_reason == "abort"
    assert scheduler.abort(b.seq_id) is b  # in flight: its entry is skipped by postprocess
    assert b.block_table == [] and b.status is SequenceStatus.FINISHED
    assert scheduler.postprocess(batch, *runner.run(batch)) == []
    assert len(a.generated_token_ids) == 1 and b.generated_token_ids == []
    assert b.num_computed_tokens == 0
    assert scheduler.abort(b.seq_id) is None and scheduler.abort(999) is None
    drive(scheduler, runner)
    check_outputs([a])
    assert scheduler.num_unfinished == 0 and not scheduler.waiting


# ---------------------------------------------------------------------- errors


def test_requests_that_can_never_fit_raise_at_add() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match=r"4 blocks of 4 tokens.*needing 5 blocks"):
        scheduler.add(list(range(1, 15)), SamplingParams(max_tokens=4))
    scheduler.add(list(range(1, 14)), SamplingParams(max_tokens=4))  # 16 KV slots exactly
    with pytest.raises(ValueError, match=r"max_model_len 64, got 65"):
        scheduler.add([1] * 60, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match=r"prompt_token_ids: expected at least 1 token"):
        scheduler.add([], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]: expected an int >= 0, got -1"):
        scheduler.add([1, -1], SamplingParams())
    with pytest.raises(ValueError, match=r"routed_experts_start: expected <= the prompt length 2"):
        scheduler.add([1, 2], SamplingParams(routed_experts_start=3))


def test_step_protocol_errors() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=2)
    scheduler.add([1, 2], SamplingParams(max_tokens=2))
    batch = scheduler.schedule()
    with pytest.raises(RuntimeError, match="not been advanced or postprocessed"):
        scheduler.schedule()
    with pytest.raises(
        ValueError,
        match=r"sampled_token_ids: expected one value per sampling entry \(1\), got 2",
    ):
        scheduler.postprocess(batch, [1, 2], [0.0, 0.0])
    scheduler.postprocess(batch, [1], [0.0])
    with pytest.raises(RuntimeError, match="expected the oldest batch in flight"):
        scheduler.postprocess(batch, [1], [0.0])
    with pytest.raises(RuntimeError, match="advance: expected the batch returned by the last"):
        scheduler.advance(batch)


def test_pipelined_protocol_errors() -> None:
    """One batch in flight when the next is scheduled; batches are postprocessed in order."""
    scheduler = make_scheduler(num_blocks=16, block_size=2)
    runner = runner_for(scheduler)
    scheduler.add([1, 2], SamplingParams(max_tokens=8, ignore_eos=True))
    first = scheduler.schedule()
    first_tokens = runner.run(first)
    scheduler.advance(first)
    second = scheduler.schedule()
    with pytest.raises(RuntimeError, match="advance: expected the batch returned by the last"):
        scheduler.advance(first)
    scheduler.advance(second)
    with pytest.raises(RuntimeError, match=r"not been advanced or postprocessed \(2 in flight\)"):
        scheduler.schedule()
    with pytest.raises(RuntimeError, match="expected the oldest batch in flight"):
        scheduler.postprocess(second, [1], [0.0])
    scheduler.postprocess(first, *first_tokens)
    scheduler.postprocess(second, *runner.run(second, first_tokens[0]))
    assert scheduler.schedule() is not None


# ---------------------------------------------------------------------- pipelining


def _batch_shapes(batches: list[ScheduledBatch]) -> list[list[tuple[int, int, int]]]:
    return [[(e.seq.seq_id, e.start, e.num_new_tokens) for e in b.entries] for b in batches]


def test_lookahead_skips_a_last_token_in_flight_and_frees_its_seat() -> None:
    """Without stops or a full cache the pipelined schedule is the synchronous one: a sequence
    whose placeholder reaches ``max_tokens`` is not scheduled again, and a waiting request
    takes its seat (``max_num_seqs``) in the same batch as it would synchronously."""
    shapes = []
    for pipelined in (False, True):
        scheduler = make_scheduler(num_blocks=32, block_size=2, budget=16, max_num_seqs=2)
        seqs = [
            scheduler.add([3, 1, 4], SamplingParams(max_tokens=6, ignore_eos=True)),
            scheduler.add([2, 7, 1, 8], SamplingParams(max_tokens=2, ignore_eos=True)),
            scheduler.add([5, 5], SamplingParams(max_tokens=3, ignore_eos=True)),
        ]
        batches = drive(scheduler, pipelined=pipelined)
        check_outputs(seqs)
        shapes.append(_batch_shapes(batches))
    assert shapes[0] == shapes[1]
    assert [seq_id for seq_id, *_ in shapes[1][2]] == [0, 2], "request 2 takes 1's seat"


def test_a_stop_in_flight_costs_one_entry_and_is_undone() -> None:
    """A sequence that stops at batch N was scheduled in N+1 already (its stop token fed): the
    pipelined batches are the synchronous ones plus that entry, and at its finish the
    placeholder N+1 appended is gone: tokens, logprobs and ``num_computed_tokens == len - 1``
    are those of the synchronous step."""
    prompt = [3, 1, 4]
    free = reference(prompt, SamplingParams(max_tokens=8, ignore_eos=True), 256)[0]
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    params = SamplingParams(max_tokens=8, stop_token_ids=[free[k]], ignore_eos=True)
    shapes, states = [], []
    for pipelined in (False, True):

        def on_finish(seq: Sequence) -> None:
            states.append((list(seq.token_ids), list(seq.logprobs), seq.num_computed_tokens))

        scheduler = make_scheduler(num_blocks=32, block_size=2, on_finish=on_finish)
        seq = scheduler.add(prompt, params)
        shapes.append(_batch_shapes(drive(scheduler, pipelined=pipelined)))
        check_outputs([seq])
        assert seq.finish_reason == "stop" and len(seq.generated_token_ids) == k + 1
    assert states[0] == states[1] and states[0][2] == len(prompt) + k
    assert shapes[1] == [*shapes[0], [(0, len(prompt) + k, 1)]]


def test_a_sequence_preempted_in_flight_gets_its_token_while_waiting() -> None:
    """The lookahead schedule preempts the newest sequence, whose last token is in flight:
    ``on_preempt`` sees it running with the batch's progress and its placeholder; the token
    fills in while it waits, and it finishes from the waiting queue (no blocks left)."""
    events = []

    def on_preempt(seq: Sequence) -> None:
        assert seq.status is SequenceStatus.RUNNING and seq.block_table
        events.append(("preempt", seq.seq_id, len(seq.pending_rows), seq.num_computed_tokens))

    def on_finish(seq: Sequence) -> None:
        events.append(("finish", seq.seq_id, seq.status, seq.num_computed_tokens))

    scheduler = make_scheduler(
        num_blocks=4, block_size=2, budget=8, on_preempt=on_preempt, on_finish=on_finish
    )
    old = scheduler.add([1, 2], SamplingParams(max_tokens=6, ignore_eos=True))
    new = scheduler.add([7, 8], SamplingParams(max_tokens=3, ignore_eos=True))
    drive(scheduler, pipelined=True)
    check_outputs([old, new])
    assert ("preempt", new.seq_id, 1, len(new) - 1) in events
    assert ("finish", new.seq_id, SequenceStatus.WAITING, 0) in events
    assert new.num_preemptions == 1 and old.num_preemptions == 0


def test_a_block_completed_by_a_placeholder_is_cached_when_its_token_arrives() -> None:
    """Prefix-cache hashes need token values: the block that batch N+1 completes with batch
    N's token is registered by N's postprocess, and a later request hits it."""
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    runner = runner_for(scheduler)
    prompt = [3, 1, 4]
    seq = scheduler.add(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    first = scheduler.schedule()
    first_tokens = runner.run(first)
    scheduler.advance(first)
    second = scheduler.schedule()  # feeds position 3, the placeholder: block 0 is full
    assert second.placeholder_indices == [0] and second.placeholder_rows == [0]
    block = seq.block_table[0]
    assert not scheduler.block_manager.is_cached(block)
    second_tokens = runner.run(second, first_tokens[0])
    scheduler.advance(second)
    scheduler.postprocess(first, *first_tokens)
    assert scheduler.block_manager.is_cached(block)
    follow_up = scheduler.add(seq.token_ids[:4] + [9], SamplingParams(max_tokens=2))
    scheduler.postprocess(second, *second_tokens)
    drive(scheduler, runner, pipelined=True)
    check_outputs([seq, follow_up])
    assert follow_up.num_cached_tokens == 4


def test_schedule_returns_none_when_idle() -> None:
    assert make_scheduler(num_blocks=4, block_size=2).schedule() is None


# ---------------------------------------------------------------------- configs


def test_engine_config_defaults_and_validation() -> None:
    config = EngineConfig(model=Path("/ckpt"))
    assert config.model == "/ckpt" and config.block_size == 16 and config.max_num_seqs == 256
    assert config.resolve_max_model_len(4096) == 4096
    assert EngineConfig(model="m", max_model_len=128).resolve_max_model_len(4096) == 128
    with pytest.raises(ValueError, match=r"max_model_len: expected <= .* 4096, got 8192"):
        EngineConfig(model="m", max_model_len=8192).resolve_max_model_len(4096)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_size = 8  # type: ignore[misc]
    bad = [
        ({"dtype": "fp8"}, ValueError, "dtype"),
        ({"device": "tpu"}, ValueError, "device"),
        ({"max_num_seqs": 0}, ValueError, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, ValueError, "max_num_batched_tokens"),
        ({"max_model_len": 1}, ValueError, "max_model_len"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"kv_cache_blocks": 0}, ValueError, "kv_cache_blocks"),
        ({"gpu_memory_utilization": 0.0}, ValueError, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.2}, ValueError, "gpu_memory_utilization"),
        ({"enable_prefix_caching": 1}, TypeError, "enable_prefix_caching"),
        ({"seed": -1}, ValueError, "seed"),
        ({"load_format": "pt"}, ValueError, "load_format"),
        ({"capture_routing": None}, TypeError, "capture_routing"),
        ({"model": ""}, ValueError, "model"),
    ]
    for kwargs, error, field in bad:
        with pytest.raises(error, match=rf"^{field}: expected"):
            EngineConfig(**{"model": "m", **kwargs})
    assert EngineConfig(model="m", device="cuda:1", dtype="bfloat16").device == "cuda:1"


def test_engine_state_validation() -> None:
    state = EngineState(num_kv_blocks=3, max_model_len=16, eos_token_ids=[2, 7])
    assert state.eos_token_ids == (2, 7)
    state.num_kv_blocks = 5  # run-time values may change after construction
    with pytest.raises(ValueError, match=r"^num_kv_blocks: expected an int >= 1, got 0"):
        EngineState(num_kv_blocks=0, max_model_len=16)
    with pytest.raises(ValueError, match=r"^eos_token_ids\[0\]: expected an int >= 0, got -1"):
        EngineState(num_kv_blocks=1, max_model_len=16, eos_token_ids=(-1,))


def test_control_plane_modules_do_not_import_torch() -> None:
    root = Path(__file__).resolve().parents[2] / "rollout"
    paths = [root / "sampling_params.py", root / "config.py"] + sorted(
        (root / "engine").glob("*.py")
    )
    owned = {"__init__.py", "sequence.py", "block_manager.py", "scheduler.py"}
    for path in paths:
        if path.parent.name == "engine" and path.name not in owned:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] in {"torch", "numpy"} for n in names), (
                path,
                names,
            )
