"""Routed-expert capture in the engine (``LLM(capture_routing=True)``), end to end on the tiny
checkpoints, CPU float32.

The cases of issue 4 section 3, each its own test: HF transformers' own routers as the oracle
for every family (forward hooks on the router modules over prompt + generated tokens; rows in
``routing_spec.moe_layers`` order, dense layers absent, ids in range and distinct); prefix-cache
hits give the rows of a cold run; preemption keeps the sampling-time rows (the recompute's rows
are corrupted on purpose, so using them would show); ``routed_experts_start``; mixed batches
with requests that do not ask, aborts in flight and while waiting, and freed blocks reused by
later requests; capture off allocates nothing and changes no output; a reader in another
process sees a finished request's rows. gpu: capture adds no kernel launch and no allocation
but its buffer, and CUDA graphs capture the same rows as eager steps.

"Cold" rows are those of a fresh engine without prefix caching and with a KV cache large
enough for no preemption: the rows every other path must reproduce exactly (the tiny models'
routing is decisive, so batch composition does not flip a choice).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import multiprocessing
import os

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from rollout import LLM, RequestOutput, RoutingSpec, SamplingParams
from rollout.capture import (
    CaptureOff,
    ReaderSpec,
    RoutedExpertsCapturer,
    RoutedExpertsReader,
    RoutingStore,
)
from rollout.capture.shm import SEGMENT_PREFIX, segment_name
from rollout.testing import FAMILIES, flashinfer_overrides, make_tiny_moe
from routing_kernels import RoutingMethod

# Small blocks and token budget: many blocks per prompt, chunked prefill, mixed steps.
ENGINE = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
NEW_TOKENS = 16
GREEDY = SamplingParams(
    max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, return_routed_experts=True
)
# Rows where HF's router was this close (in its selection scores) to another choice may differ
# by float rounding between two correct implementations.
NEAR_TIE = 1e-4
MIN_AGREEMENT = 0.995


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    """Dense first layer, grouped selection with a correction bias: the most to get wrong."""
    return make_tiny_moe("glm4_moe", tmp_path_factory.mktemp("glm4"))


def _llm(path, **overrides) -> LLM:
    return LLM(path, **{**ENGINE, "capture_routing": True, **overrides})


def _prompts(rng, lengths, vocab=300) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]


def _cold(path, prompts, sampling) -> list[RequestOutput]:
    with _llm(path, enable_prefix_caching=False, kv_cache_blocks=1024) as llm:
        outs = llm.generate(prompts, sampling, use_tqdm=False)
        assert llm.stats.num_preemptions == 0
    return outs


def _check_rows(out: RequestOutput, spec: RoutingSpec, start: int = 0) -> np.ndarray:
    """The DESIGN.md row contract; returns the rows."""
    rows = out.routed_experts
    assert isinstance(rows, np.ndarray)
    num_tokens = len(out.prompt_token_ids) + len(out.token_ids)
    assert rows.dtype == np.uint8 == spec.id_dtype
    assert rows.shape == (num_tokens - 1 - start, len(spec.moe_layers), spec.top_k)
    assert rows.size == 0 or int(rows.max()) < spec.num_experts
    assert (np.diff(np.sort(rows, axis=-1), axis=-1) > 0).all(), "repeated id within a row"
    return rows


def _assert_same(outs, want, context=""):
    for i, (out, ref) in enumerate(zip(outs, want, strict=True)):
        assert out.token_ids == ref.token_ids, f"{context} request {i}: tokens differ"
        np.testing.assert_array_equal(
            out.routed_experts,
            ref.routed_experts,
            err_msg=f"{context} request {i}: rows differ",
        )


# ---- the oracle: HF transformers' routers ------------------------------------------------------


def _hf_routing(hf, spec: RoutingSpec, tokens: list[int]):
    """HF's router outputs over ``tokens[:-1]`` (rows 0 .. N-2), per MoE layer in
    ``spec.moe_layers`` order: (ids [N-1, L, K] int64, router logits [N-1, L, E])."""
    outputs = {}
    hooks = [
        hf.model.layers[layer].mlp.gate.register_forward_hook(
            lambda module, args, out, layer=layer: outputs.__setitem__(layer, out)
        )
        for layer in spec.moe_layers
    ]
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([tokens[:-1]]))
    finally:
        for hook in hooks:
            hook.remove()
    ids = torch.stack([outputs[layer][2] for layer in spec.moe_layers], dim=1)
    logits = torch.stack([outputs[layer][0].float() for layer in spec.moe_layers], dim=1)
    return ids.numpy().astype(np.int64), logits


def _selection(logits_TLE: torch.Tensor, hf, spec: RoutingSpec):
    """A model of HF's selection: (the experts it keeps [T, L, K] as sorted sets, and how near
    each row was to another choice [T, L]: the gap between the k-th and (k+1)-th selection
    score (logits, or DEEPSEEK_V3's biased sigmoid scores), with grouped selection also between
    the last kept and the first dropped group's score)."""
    k = spec.top_k
    inf = torch.tensor(torch.inf)
    if spec.method is RoutingMethod.DEEPSEEK_V3:
        bias_LE = torch.stack(
            [hf.model.layers[l].mlp.gate.e_score_correction_bias.float() for l in spec.moe_layers]
        )
        choice_TLE = torch.sigmoid(logits_TLE) + bias_LE
    else:
        choice_TLE = logits_TLE  # softmax is increasing: the same top-k
    group_gap_TL = inf.expand(choice_TLE.shape[:2])
    if spec.n_group is not None:
        groups, kept = spec.n_group, spec.topk_group
        score_TLG = choice_TLE.unflatten(-1, (groups, -1)).topk(2, dim=-1).values.sum(-1)
        ranked_TLG = score_TLG.sort(dim=-1, descending=True).values
        if kept < groups:
            group_gap_TL = ranked_TLG[..., kept - 1] - ranked_TLG[..., kept]
        keep_TLG = torch.zeros_like(score_TLG, dtype=torch.bool)
        keep_TLG.scatter_(-1, score_TLG.topk(kept, dim=-1).indices, True)
        keep_TLE = keep_TLG.repeat_interleave(spec.num_experts // groups, dim=-1)
        choice_TLE = choice_TLE.masked_fill(~keep_TLE, -torch.inf)
    top = choice_TLE.topk(k + 1, dim=-1)
    gap_TL = torch.minimum(top.values[..., k - 1] - top.values[..., k], group_gap_TL)
    return np.sort(top.indices[..., :k].numpy(), axis=-1), gap_TL.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_are_what_hf_routers_choose(family, tmp_path, rng):
    """Every family: each (token, MoE layer) row equals the experts HF's own router picks for
    the same tokens (as sets: GLM4's HF top-k is unsorted), on >= 99.5% of rows, any other row
    at a near-tie of HF's selection scores; the row contract holds (uint8, range, distinct, MoE
    layers only, in ``moe_layers`` order)."""
    path = make_tiny_moe(family, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    dense = [i for i, layer in enumerate(hf.model.layers) if not hasattr(layer.mlp, "experts")]
    shared = _prompts(rng, [14])[0]
    prompts = [
        *_prompts(rng, [5, 37]),
        shared + _prompts(rng, [3])[0],
        shared + [7, 8, 9, 10],
    ]
    sampling = SamplingParams(max_tokens=20, temperature=1.0, seed=11, return_routed_experts=True)
    with _llm(path) as llm:
        spec = llm.routing_spec
        outs = llm.generate(prompts, sampling, use_tqdm=False)
    assert not set(dense) & set(spec.moe_layers)
    assert len(spec.moe_layers) == len(hf.model.layers) - len(dense)
    rows = matches = 0
    margins = []
    for out in outs:
        ours = np.sort(_check_rows(out, spec), axis=-1)
        theirs, logits_TLE = _hf_routing(hf, spec, out.prompt_token_ids + out.token_ids)
        theirs = np.sort(theirs, axis=-1)
        modelled, margin_TL = _selection(logits_TLE, hf, spec)
        margins.append(margin_TL.min())
        # The near-tie analysis is only as good as its model of HF's selection.
        assert (margin_TL[(modelled != theirs).any(-1)] < NEAR_TIE).all(), "selection model"
        same_TL = (ours == theirs).all(axis=-1)
        rows += same_TL.size
        matches += int(same_TL.sum())
        for t, l in zip(*np.nonzero(~same_TL)):
            assert margin_TL[t, l] < NEAR_TIE, (
                f"{family}: token {t} layer {spec.moe_layers[l]}: ours {ours[t, l]}, HF "
                f"{theirs[t, l]}, HF selection margin {margin_TL[t, l]:.3g} is no near-tie"
            )
    print(f"{family}: {matches}/{rows} rows equal HF's; smallest HF margin {min(margins):.2g}")
    assert matches >= MIN_AGREEMENT * rows


# ---- prefix caching ----------------------------------------------------------------------------


def test_prefix_cache_hits_return_the_rows_of_a_cold_run(glm4, rng):
    """Hits on blocks computed by an earlier request, by a request of the same step, on
    everything but the last prompt token, and on blocks holding generated tokens (a follow-up
    turn) all return the rows a cold engine computes."""
    block = ENGINE["block_size"]
    base = _prompts(rng, [4 * block + 1])[0]  # all but the last token in full blocks
    sibling = base[: 2 * block + 1] + _prompts(rng, [6])[0]
    with _llm(glm4) as llm:
        spec = llm.routing_spec
        first = llm.generate([base, sibling, base], GREEDY, use_tqdm=False)
        # The same step computes the blocks the second and third request share.
        assert [out.num_cached_tokens for out in first] == [0, 2 * block, 4 * block]
        shared = len(base) + 10
        turn = base + first[0].token_ids[:10] + _prompts(rng, [3])[0]
        second = llm.generate([base, sibling, turn], GREEDY, use_tqdm=False)
    want_cached = [
        4 * block,
        (len(sibling) - 1) // block * block,
        shared // block * block,
    ]
    assert [out.num_cached_tokens for out in second] == want_cached
    cold = _cold(glm4, [base, sibling, base, turn], GREEDY)
    for out in [*first, *second]:
        _check_rows(out, spec)
    _assert_same(first, cold[:3], "first call")
    _assert_same(second, [cold[0], cold[1], cold[3]], "second call")


# ---- preemption --------------------------------------------------------------------------------


def _saved_end(seq) -> int:
    return max((p + len(rows) for p, rows in seq.saved_routing.items()), default=0)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_keeps_the_sampling_time_rows(glm4, rng, prefix_caching):
    """A KV cache too small for all requests forces preemption by recompute. The rows the
    recompute captures for positions fed before a preemption are corrupted on their way to the
    store (ids + 1 mod E), so only the rows saved at preemption time can give the cold run's
    rows, which the outputs must equal (with several ``routed_experts_start`` too)."""
    prompts = _prompts(rng, [5, 17, 23, 9, 30])
    starts = [0, 3, 23, 9, 12]
    params = [dataclasses.replace(GREEDY, max_tokens=24, routed_experts_start=s) for s in starts]
    llm = _llm(glm4, kv_cache_blocks=18, enable_prefix_caching=prefix_caching)
    engine = llm.engine
    num_experts = llm.routing_spec.num_experts
    fed_before_preemption: dict[int, int] = {}
    saves = corrupted = 0
    recorder = engine.capture
    save_rows, after_forward = recorder.on_preempt, recorder.after_forward

    def on_preempt(seq):
        nonlocal saves
        fed, before = seq.num_computed_tokens, _saved_end(seq)
        fed_before_preemption[seq.seq_id] = max(fed, fed_before_preemption.get(seq.seq_id, 0))
        save_rows(seq)
        if fed > max(before, seq.params.routed_experts_start):
            assert (
                _saved_end(seq) == fed and min(seq.saved_routing) == seq.params.routed_experts_start
            )
            saves += 1
        else:
            assert _saved_end(seq) == before

    def corrupt_recompute(batch):
        nonlocal corrupted
        buffer_TLK = recorder.capturer.buffer
        row = 0
        for entry in batch.entries:
            limit = fed_before_preemption.get(entry.seq.seq_id, 0)
            for position in range(entry.start, entry.end):
                if position < limit:
                    buffer_TLK[row] = (buffer_TLK[row].long() + 1) % num_experts
                    corrupted += 1
                row += 1
        after_forward(batch)

    recorder.on_preempt = on_preempt
    recorder.after_forward = corrupt_recompute
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats.num_preemptions > 0 and saves > 0 and corrupted > 0, (
        saves,
        corrupted,
    )
    for out, start in zip(outs, starts):
        _check_rows(out, llm.routing_spec, start)
    _assert_same(outs, _cold(glm4, prompts, params), "preempted run")
    llm.shutdown()


def _run_recording_commits(glm4, prompts, params, kv_cache_blocks):
    """Generate on a pipelined engine; return the outputs, per finished request whether
    saving its rows committed the pending copy, and for each request preempted while its last
    batch was in flight whether saving its rows committed that batch's copy."""
    llm = _llm(glm4, kv_cache_blocks=kv_cache_blocks)
    engine = llm.engine
    recorder = engine.capture
    store = recorder.store
    save_at_finish, save_at_preemption = recorder.on_finish, recorder.on_preempt
    committed_at_finish: dict[int, bool] = {}
    preempted_in_flight = []

    def on_finish(seq):
        pending = store.has_pending
        save_at_finish(seq)
        committed_at_finish[seq.seq_id] = pending and not store.has_pending

    def on_preempt(seq):
        pending = store.has_pending
        save_at_preemption(seq)
        if seq.pending_rows:  # its last batch is in flight: its rows there are pending
            preempted_in_flight.append(pending and not store.has_pending)

    recorder.on_finish, recorder.on_preempt = on_finish, on_preempt
    ids = [engine.add_request(p, s) for p, s in zip(prompts, params)]
    outputs = {}
    while engine.has_unfinished():
        outputs.update((out.request_id, out) for out in engine.step())
    outs = [outputs[i] for i in ids]
    for out in outs:
        _check_rows(out, llm.routing_spec)
    llm.shutdown()
    return outs, [committed_at_finish[i] for i in ids], preempted_in_flight


def test_rows_of_finished_requests_do_not_wait_for_the_batch_in_flight(glm4, rng):
    """The engine launches batch N+1 before it applies batch N's tokens, so when a request
    finishes, N+1's routing copy is pending; the finished request needs none of its rows
    (N+1 feeds at most its stop token, whose row is not returned), so saving its rows does not
    commit (wait for) that copy. A request preempted while its batch is in flight needs that
    batch's pending rows and commits them. Rows equal a cold run's either way."""
    prompts = _prompts(rng, [5, 17, 23, 9, 30])
    # The last request outlives the others: a batch is always in flight when they finish.
    lengths = [16, 9, 12, 7, 40]
    params = [dataclasses.replace(GREEDY, max_tokens=n) for n in lengths]
    free = _cold(glm4, prompts, params)

    # Stops mid-run: finishing requests must not commit the copy in flight.
    stopping = list(params)
    for i in range(4):
        tokens = free[i].token_ids
        firsts = [k for k in range(1, len(tokens) - 1) if tokens[k] not in tokens[:k]]
        if firsts:  # a token first generated mid-run stops the request there
            stopping[i] = dataclasses.replace(params[i], stop_token_ids=(tokens[firsts[-1]],))
    outs, committed, _ = _run_recording_commits(glm4, prompts, stopping, kv_cache_blocks=64)
    assert any(out.finish_reason == "stop" for out in outs)
    assert not any(committed[:4]), committed
    _assert_same(outs, _cold(glm4, prompts, stopping), "pipelined run with stops")

    # No stops and 18 blocks of 4 for 44 blocks' worth of requests: preemption is certain,
    # and a request preempted in steady decode has its last batch in flight.
    outs, committed, preempted_in_flight = _run_recording_commits(
        glm4, prompts, params, kv_cache_blocks=18
    )
    assert preempted_in_flight and all(preempted_in_flight), preempted_in_flight
    _assert_same(outs, free, "pipelined run with preemption")


# ---- routed_experts_start ----------------------------------------------------------------------


def test_routed_experts_start_returns_rows_from_there(qwen3, rng):
    prompt = _prompts(rng, [11])[0]
    with _llm(qwen3) as llm:
        spec = llm.routing_spec
        full = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        for start in (1, 6, 11):
            sampling = dataclasses.replace(GREEDY, routed_experts_start=start)
            out = llm.generate([prompt], sampling, use_tqdm=False)[0]
            assert out.token_ids == full.token_ids
            rows = _check_rows(out, spec, start)
            np.testing.assert_array_equal(rows, full.routed_experts[start:])
        one_token = dataclasses.replace(GREEDY, max_tokens=1, routed_experts_start=11)
        empty = llm.generate([prompt], one_token, use_tqdm=False)[0]
        assert _check_rows(empty, spec, 11).shape[0] == 0  # rows 11 .. 10: none
        too_far = dataclasses.replace(GREEDY, routed_experts_start=12)
        with pytest.raises(
            ValueError,
            match=r"routed_experts_start: expected <= the prompt length 11, got 12",
        ):
            llm.generate([prompt], too_far, use_tqdm=False)
        assert not llm.engine.has_unfinished()


def test_return_routed_experts_needs_capture_routing(qwen3):
    with LLM(qwen3, **ENGINE) as llm:
        with pytest.raises(ValueError, match="return_routed_experts.*capture_routing"):
            llm.generate([[1, 2, 3]], SamplingParams(return_routed_experts=True), use_tqdm=False)
        assert not llm.engine.has_unfinished()


# ---- mixed batches, aborts, reused blocks ------------------------------------------------------


def test_mixed_batches_aborts_and_reused_blocks(glm4, rng):
    """Requests that ask and that do not; one aborted while its step is in flight (its rows
    pending), holding blocks it shares with a running request; one aborted while waiting;
    requests added after others finished, reusing their freed blocks or their cached prefix:
    every request that asks gets its cold rows, the others None, the aborted ones no output."""
    prompts = _prompts(rng, [13, 8, 9, 6, 17, 10, 3])
    prompts[2] = prompts[0][:12] + prompts[2]  # shares three blocks with request 0
    prompts[6] = prompts[0][:12] + prompts[6]  # and with a request added later
    plain = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    asks = [True, False, True, True, False, True, True]
    params = [GREEDY if a else plain for a in asks]
    params[3] = dataclasses.replace(GREEDY, max_tokens=4)  # frees its blocks early
    llm = _llm(glm4, kv_cache_blocks=24, max_num_seqs=4)
    engine = llm.engine
    ids = [engine.add_request(p, s) for p, s in zip(prompts[:5], params[:5])]
    aborted = {ids[2], ids[4]}
    after_forward = engine.capture.after_forward
    steps = 0

    def abort_in_flight(batch):
        after_forward(batch)
        if steps == 3:
            seq = next(e.seq for e in batch.entries if e.seq.seq_id == ids[2])
            assert seq.num_cached_tokens == 12, "expected a prefix shared with request 0"
            engine.abort_request(ids[2])

    engine.capture.after_forward = abort_in_flight
    outputs: dict[int, RequestOutput] = {}
    while engine.has_unfinished():
        if steps == 1:
            assert ids[4] in {seq.seq_id for seq in engine.scheduler.waiting}
            engine.abort_request(ids[4])
        for out in engine.step():
            outputs[out.request_id] = out
        steps += 1
        if ids[3] in outputs and len(ids) == 5:
            ids += [engine.add_request(p, s) for p, s in zip(prompts[5:], params[5:])]
    assert len(ids) == 7 and set(outputs) == set(ids) - aborted
    cold = _cold(glm4, prompts, params)
    for i, request_id in enumerate(ids):
        if request_id in aborted:
            continue
        out = outputs[request_id]
        assert out.token_ids == cold[i].token_ids, f"request {i}"
        if asks[i]:
            _check_rows(out, llm.routing_spec)
            np.testing.assert_array_equal(out.routed_experts, cold[i].routed_experts, str(i))
        else:
            assert out.routed_experts is None
    llm.shutdown()


# ---- capture off -------------------------------------------------------------------------------


def _own_segments() -> set[str]:
    """Shared-memory segments of engines of this process."""
    prefix = f"{SEGMENT_PREFIX}-{os.getpid()}-"
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


def _count_capture_calls(monkeypatch) -> collections.Counter:
    """Count every call of the capturer's write paths and the store's per-step methods."""
    calls: collections.Counter = collections.Counter()
    for cls, name in (
        (RoutedExpertsCapturer, "layer_view"),
        (RoutedExpertsCapturer, "capture"),
        (RoutingStore, "after_forward"),
        (RoutingStore, "read"),
    ):

        def counted(self, *args, _original=getattr(cls, name), _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    return calls


def test_capture_off_creates_nothing_and_changes_no_output(qwen3, rng, monkeypatch):
    """Without ``capture_routing`` the engine's capture is ``CaptureOff``, which holds nothing:
    no buffer, segment, store or capturer for the model, so no capture call at all while it
    generates (counted); the outputs (tokens and logprobs, sampled and greedy) equal those of a
    capturing engine, whether its requests ask for rows or not (prefix caching off: repeated
    prompts would otherwise be computed in other chunks, which changes logprobs by
    rounding)."""
    calls = _count_capture_calls(monkeypatch)
    prompts = _prompts(rng, [5, 18, 9])
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    gc.collect()
    before = _own_segments()
    off = LLM(qwen3, **ENGINE, enable_prefix_caching=False)
    engine = off.engine
    assert isinstance(engine.capture, CaptureOff) and off.routing_reader_spec is None
    assert not hasattr(engine.capture, "__dict__") and CaptureOff.__slots__ == ()
    assert engine.runner.buffers.capturer is None and engine.capture.capturer is None
    assert engine.runner.capture is engine.scheduler.capture is engine.capture
    assert not _own_segments() - before
    assert not os.path.exists(f"/dev/shm/{segment_name(engine.instance_id, 0)}")
    with _llm(qwen3, enable_prefix_caching=False) as on:
        name = on.routing_reader_spec.name
        assert _own_segments() - before == {name}
        for sampling in (sampled, greedy):
            calls.clear()
            want = off.generate(prompts, sampling, use_tqdm=False)
            assert not calls, f"capture off called capture: {dict(calls)}"
            asking = dataclasses.replace(sampling, return_routed_experts=True)
            for got in (
                on.generate(prompts, sampling, use_tqdm=False),
                on.generate(prompts, asking, use_tqdm=False),
            ):
                for g, w in zip(got, want, strict=True):
                    assert g.token_ids == w.token_ids
                    np.testing.assert_array_equal(g.logprobs, w.logprobs)
            assert all(out.routed_experts is None for out in want)
            # The probe sees capture on: every MoE layer of every forward writes its view.
            assert calls["layer_view"] > 0 and calls["after_forward"] > 0 and calls["read"] > 0
            assert calls["layer_view"] % len(on.routing_spec.moe_layers) == 0
    assert name not in _own_segments(), "shutdown unlinks the segment"
    off.shutdown()


# ---- a reader in another process ---------------------------------------------------------------


def _read_in_child(spec: ReaderSpec, slots: list[int]) -> np.ndarray:
    with RoutedExpertsReader.from_spec(spec) as reader:
        return reader.read(slots)


def test_reader_in_another_process_reads_a_finished_requests_rows(qwen3, rng):
    """Between the step that finishes a request and the next one, a trainer-side reader
    attached by ``routing_reader_spec`` in a spawned process reads the request's slots (taken
    while it still held its blocks) and gets exactly its output rows."""
    llm = _llm(qwen3)
    engine = llm.engine
    slots: dict[int, list[int]] = {}
    save_rows = engine.capture.on_finish

    def on_finish(seq):
        slots[seq.seq_id] = seq.slots(0, len(seq) - 1)
        save_rows(seq)

    engine.capture.on_finish = on_finish
    first = engine.add_request(_prompts(rng, [10])[0], dataclasses.replace(GREEDY, max_tokens=3))
    engine.add_request(_prompts(rng, [7])[0], GREEDY)
    finished = []
    while not finished:
        finished = [out for out in engine.step() if out.request_id == first]
    assert engine.has_unfinished()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows = pool.apply(_read_in_child, (llm.routing_reader_spec, slots[first]))
    np.testing.assert_array_equal(rows, _check_rows(finished[0], llm.routing_spec))
    while engine.has_unfinished():
        engine.step()
    name = llm.routing_reader_spec.name
    llm.shutdown()
    assert not os.path.exists(f"/dev/shm/{name}")


# ---- CUDA --------------------------------------------------------------------------------------

GPU_ENGINE = dict(dtype="bfloat16", device="cuda", max_num_seqs=8, kv_cache_blocks=256)


@pytest.fixture(scope="module")
def cuda_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_cuda")
    return make_tiny_moe("qwen3_moe", path, **flashinfer_overrides("qwen3_moe"))


def _decode_profile(path, *, capture: bool, eager: bool, prompts, steps: int):
    """(kernels, memcpys) per decode step over ``steps`` decode steps of ``prompts``."""
    sampling = SamplingParams(
        max_tokens=steps + 4,
        temperature=0.0,
        ignore_eos=True,
        return_routed_experts=capture,
    )
    with LLM(path, **GPU_ENGINE, capture_routing=capture, enforce_eager=eager) as llm:
        engine = llm.engine
        for prompt in prompts:
            engine.add_request(prompt, sampling)
        while (
            not all(seq.is_decoding for seq in engine.scheduler.running) or engine.scheduler.waiting
        ):
            engine.step()
        engine.step()  # one decode step outside the profile (lazy initialisations)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        while engine.has_unfinished():
            engine.step()
    kernels = memcpys = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        if name.startswith("memcpy"):
            memcpys += 1
        elif not name.startswith("memset"):
            kernels += 1
    return kernels / steps, memcpys / steps


@pytest.mark.gpu
@pytest.mark.parametrize("eager", [True, False])
def test_cuda_capture_adds_no_kernel_launch(cuda_qwen3, rng, eager):
    """Per decode step, capture on launches exactly the kernels of capture off (the ids are
    written inside the routing kernel); it adds one device-to-host memcpy (its side-stream
    copy)."""
    prompts = _prompts(rng, [5, 9, 14])
    off = _decode_profile(cuda_qwen3, capture=False, eager=eager, prompts=prompts, steps=8)
    on = _decode_profile(cuda_qwen3, capture=True, eager=eager, prompts=prompts, steps=8)
    print(f"eager={eager}: per decode step kernels/memcpys off {off}, on {on}")
    assert on[0] == off[0] > 0
    assert on[1] == off[1] + 1


def _allocated_by_engine(path, *, capture: bool, prompts) -> tuple[int, int, int]:
    """(bytes the engine holds once built, peak bytes over the baseline while generating,
    capture buffer bytes), all from the caching allocator's counters."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    llm = LLM(path, **GPU_ENGINE, capture_routing=capture)
    built = torch.cuda.memory_allocated() - base
    capturer = llm.engine.capture.capturer
    buffer_bytes = 0 if capturer is None else capturer.buffer.untyped_storage().nbytes()
    torch.cuda.reset_peak_memory_stats()
    sampling = dataclasses.replace(GREEDY, return_routed_experts=capture)
    llm.generate(prompts, sampling, use_tqdm=False)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    llm.shutdown()
    return built, peak, buffer_bytes


@pytest.mark.gpu
def test_cuda_capture_allocates_only_its_buffer(cuda_qwen3, rng):
    """Capture off allocates nothing for capture: an engine with capture on holds exactly its
    capture buffer more (rounded to the allocator's 512 bytes), and its steps allocate nothing
    more at their peak."""
    prompts = _prompts(rng, [5, 9, 14, 20])
    _allocated_by_engine(cuda_qwen3, capture=False, prompts=prompts)  # warm-up: cuBLAS, compile
    off_built, off_peak, _ = _allocated_by_engine(cuda_qwen3, capture=False, prompts=prompts)
    on_built, on_peak, buffer_bytes = _allocated_by_engine(
        cuda_qwen3, capture=True, prompts=prompts
    )
    rounded = -(-buffer_bytes // 512) * 512
    print(
        f"held after build: off {off_built} on {on_built} (buffer {buffer_bytes}); "
        f"peak: off {off_peak} on {on_peak}"
    )
    assert on_built - off_built == rounded
    assert on_peak - off_peak == rounded


@pytest.mark.gpu
def test_cuda_graphs_capture_the_rows_of_eager_steps(cuda_qwen3, rng):
    """The capture buffer is a static input of the decode graphs: replays file the same rows
    as eager steps (the same kernels), and the rows keep the row contract."""
    prompts = _prompts(rng, [5, 9, 14, 20])
    results = []
    for eager in (True, False):
        with LLM(cuda_qwen3, **GPU_ENGINE, capture_routing=True, enforce_eager=eager) as llm:
            assert bool(llm.stats.cuda_graph_sizes) is not eager
            results.append(llm.generate(prompts, GREEDY, use_tqdm=False))
            for out in results[-1]:
                _check_rows(out, llm.routing_spec)
    _assert_same(results[1], results[0], "graphs vs eager")


@pytest.mark.gpu
@pytest.mark.whole_gpu
def test_cuda_capture_with_a_memory_sized_cache(cuda_qwen3, rng):
    """KV sizing profiles a step before the store exists (the capture buffer counts in the
    profile; the hook is not run): generation then captures rows as usual."""
    settings = {**GPU_ENGINE, "kv_cache_blocks": None, "gpu_memory_utilization": 0.3}
    with LLM(cuda_qwen3, **settings, capture_routing=True) as llm:
        outs = llm.generate(_prompts(rng, [5, 30]), GREEDY, use_tqdm=False)
        spec = llm.routing_spec
        stats = llm.stats
        assert llm.routing_reader_spec.num_kv_slots == stats.num_kv_blocks * stats.block_size
    for out in outs:
        _check_rows(out, spec)
