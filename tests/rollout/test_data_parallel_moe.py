"""Expert parallelism of the MoE block under ``dp_attention`` (``rollout.engine.expert_parallel``
applied to ``rollout.layers.moe.SparseMoeBlock``).

In one process: the fused experts over a slice of the experts (other experts' pairs masked with
``MASKED_ID``), summed over the slices, equal the unsharded experts, on the reference path and
the Triton path; ``expert_slice`` partitions the experts and rejects what does not split.

A block holding a slice of the experts (``local_experts``) allocates only that slice, accepts
only the dispatch that computes it, and refuses to run without one; ``MoEParallelConfig``
validates its ranks.

Across two gloo ranks (spawned processes): ``SparseMoeBlock`` holding the rank's half of the
experts, with a ``NaiveDispatch``, gives each rank the unsharded block's output for its own
tokens (uneven counts, a rank with none, equal counts), for a block without shared experts and
two with them, and the capturer it writes through holds exactly what its DP rule takes from the
routed batch of all ranks.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import traceback

import pytest
import torch

from rollout.capture import DPMetadata, RoutedExpertsCapturer
from rollout.config import EngineConfig
from rollout.engine.expert_parallel import MoEParallelConfig, NaiveDispatch, expert_slice
from rollout.layers.moe import Experts, RoutingParams, SparseMoeBlock
from routing_kernels.fused_moe import (
    MASKED_ID,
    fused_experts_reference,
    fused_experts_triton,
)
from routing_kernels.route import route
from routing_kernels.routing_method import RoutingMethod

HIDDEN, INTER, EXPERTS = 32, 16, 8

# Block configurations: (routing, block keyword arguments).
BLOCKS = {
    "renormalize": (
        RoutingParams(method=RoutingMethod.RENORMALIZE, top_k=2, num_experts=EXPERTS),
        {},
    ),
    "shared_gate": (
        RoutingParams(method=RoutingMethod.DEFAULT, top_k=4, num_experts=EXPERTS),
        {
            "shared_intermediate_size": 24,
            "shared_name": "shared_expert",
            "shared_gate": True,
        },
    ),
    "deepseek_shared": (
        RoutingParams(
            method=RoutingMethod.DEEPSEEK_V3,
            top_k=2,
            num_experts=EXPERTS,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        ),
        {"shared_intermediate_size": 24, "router_float32": True},
    ),
}
# Token counts of the two ranks in successive steps: uneven, one rank without tokens, equal.
STEPS = ([5, 3], [0, 4], [2, 2], [1, 6])


def _random_experts(num_tokens, top_k, num_experts, rng):
    ids = torch.stack(
        [torch.randperm(num_experts, generator=rng)[:top_k] for _ in range(num_tokens)]
    )
    weights = torch.rand(num_tokens, top_k, generator=rng)
    return weights, ids.to(torch.int32)


def _expert_inputs(num_tokens, top_k, rng):
    hidden = torch.randn(num_tokens, HIDDEN, generator=rng)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=rng) / HIDDEN**0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER, generator=rng) / INTER**0.5
    return hidden, gate_up, down, *_random_experts(num_tokens, top_k, EXPERTS, rng)


def _sliced_sum(experts_fn, hidden, gate_up, down, weights, ids, num_slices):
    total = torch.zeros_like(hidden)
    for rank in range(num_slices):
        mine = expert_slice(EXPERTS, rank, num_slices)
        local = torch.full((EXPERTS,), MASKED_ID, dtype=torch.int32, device=ids.device)
        local[mine.start : mine.stop] = torch.arange(len(mine), dtype=torch.int32)
        total += experts_fn(
            hidden,
            gate_up[mine.start : mine.stop],
            down[mine.start : mine.stop],
            weights,
            local[ids.long()],
            masked=True,
        )
    return total


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("num_slices", [2, 4])
def test_reference_expert_slices_sum_to_the_unsharded_experts(top_k, num_slices, rng):
    inputs = _expert_inputs(13, top_k, rng)
    want = fused_experts_reference(*inputs)
    got = _sliced_sum(fused_experts_reference, *inputs, num_slices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("top_k", [1, 3])
def test_triton_expert_slices_sum_to_the_unsharded_experts(top_k, triton_device, rng):
    inputs = [t.to(triton_device) for t in _expert_inputs(13, top_k, rng)]
    want = fused_experts_reference(*[t.cpu() for t in inputs])
    got = _sliced_sum(fused_experts_triton, *inputs, 2)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_masked_ids_only_with_masked(rng):
    hidden, gate_up, down, weights, ids = _expert_inputs(4, 2, rng)
    ids[1, 0] = MASKED_ID
    with pytest.raises(ValueError, match=r"topk_ids_TK: expected values in \[0, 8\), got min -1"):
        fused_experts_reference(hidden, gate_up, down, weights, ids)
    ids[2, 1] = -2
    with pytest.raises(ValueError, match=r"expected values in \[-1, 8\), got min -2"):
        fused_experts_reference(hidden, gate_up, down, weights, ids, masked=True)
    ids[2, 1] = MASKED_ID
    ids[3] = MASKED_ID  # a token with no local expert gets zeros
    out = fused_experts_reference(hidden, gate_up, down, weights, ids, masked=True)
    assert torch.equal(out[3], torch.zeros(HIDDEN))


def test_expert_slice_partitions_the_experts():
    for world in (1, 2, 4, 8):
        slices = [expert_slice(16, rank, world) for rank in range(world)]
        assert [e for s in slices for e in s] == list(range(16))
        assert {len(s) for s in slices} == {16 // world}
    with pytest.raises(
        ValueError,
        match=r"num_experts: expected a multiple of data_parallel_size=3 .*got 8",
    ):
        expert_slice(8, 0, 3)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\), got 2"):
        expert_slice(8, 2, 2)


def test_dispatch_needs_its_process_group():
    with pytest.raises(ValueError, match="data_parallel_size: expected rank 0 of an initialized"):
        NaiveDispatch(num_experts=EXPERTS, rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="num_experts: expected a multiple of"):
        NaiveDispatch(num_experts=EXPERTS, rank=0, world_size=3, device=torch.device("cpu"))


def test_parallel_config_checks_its_ranks():
    assert MoEParallelConfig(ep_rank=3, ep_size=4).local_experts(16) == range(12, 16)
    dp_attention = EngineConfig(
        model="unused", data_parallel_size=2, data_parallel_mode="dp_attention"
    )
    assert MoEParallelConfig.of_rank(dp_attention, 1) == MoEParallelConfig(ep_rank=1, ep_size=2)
    replicas = dataclasses.replace(dp_attention, data_parallel_mode="replicas")
    assert MoEParallelConfig.of_rank(replicas, 1) is None
    assert NaiveDispatch.of_rank(replicas, 1, num_experts=EXPERTS, device="cpu") is None
    with pytest.raises(ValueError, match=r"ep_rank: expected an int in \[0, 2\), got 2"):
        MoEParallelConfig(ep_rank=2, ep_size=2)
    with pytest.raises(ValueError, match="ep_size: expected an int >= 1, got 0"):
        MoEParallelConfig(ep_rank=0, ep_size=0)
    with pytest.raises(TypeError, match="ep_rank: expected an int, got float"):
        MoEParallelConfig(ep_rank=1.0, ep_size=2)


def test_experts_allocate_only_their_slice():
    experts = Experts(EXPERTS, HIDDEN, INTER, local=range(4, 8))
    assert experts.gate_up_proj.shape == (4, 2 * INTER, HIDDEN)
    assert experts.down_proj.shape == (4, HIDDEN, INTER)
    assert not experts.holds_all and Experts(EXPERTS, HIDDEN, INTER).holds_all
    for bad in (range(4, 4), range(0, 8, 2), range(6, 10), [0, 1]):
        with pytest.raises(ValueError, match=r"local: expected a non-empty range of step 1"):
            Experts(EXPERTS, HIDDEN, INTER, local=bad)


def test_block_with_a_slice_needs_its_dispatch(rng):
    block = _block("renormalize", seed=0, experts=expert_slice(EXPERTS, 1, 2))
    with pytest.raises(ValueError, match=r"dispatch: expected a NaiveDispatch .* \[4, 8\)"):
        block(torch.randn(3, HIDDEN, generator=rng))
    with pytest.raises(
        ValueError,
        match=r"dispatch: expected one computing experts \[4, 8\) .* got \[0, 8\)",
    ):
        block.dispatch = None
    whole = _block("renormalize", seed=0)
    whole.dispatch = None  # a block of every expert computes them itself


# ---------------------------------------------------------------------------------------------
# Two gloo ranks
# ---------------------------------------------------------------------------------------------


def _block(name: str, seed: int, experts: range | None = None) -> SparseMoeBlock:
    """A random block (the same for a seed); with ``experts``, holding only those experts'
    weights (the rows of the whole block's)."""
    routing, kwargs = BLOCKS[name]
    whole = SparseMoeBlock(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        routing=routing,
        moe_index=1,
        **kwargs,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in whole.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    if experts is None:
        return whole
    block = SparseMoeBlock(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        routing=routing,
        moe_index=1,
        local_experts=experts,
        **kwargs,
    )
    with torch.no_grad():
        for param_name, param in block.named_parameters():
            source = whole.get_parameter(param_name)
            if param_name.startswith("experts."):
                assert param.shape[0] == len(experts), param_name
                source = source[experts.start : experts.stop]
            param.copy_(source)
    return block


def _tokens(counts: list[int], seed: int) -> torch.Tensor:
    return torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(seed))


def _rank_worker(rank: int, world: int, init_method: str, conn) -> None:
    """Run every block over every step as rank ``rank``; send back outputs and captured rows."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        results = {}
        for b, name in enumerate(BLOCKS):
            block = _block(name, seed=b, experts=expert_slice(EXPERTS, rank, world))
            top_k = block.routing.top_k
            capturer = RoutedExpertsCapturer(8, 2, top_k, device="cpu", dp_rank=rank)
            block.dispatch = NaiveDispatch(
                num_experts=EXPERTS,
                rank=rank,
                world_size=world,
                device=torch.device("cpu"),
            )
            for s, counts in enumerate(STEPS):
                start = sum(counts[:rank])
                x_TH = _tokens(counts, seed=s)[start : start + counts[rank]]
                capturer.buffer.fill_(255)
                assert block.dispatch.begin_step(counts[rank]).num_tokens_across_dp == tuple(counts)
                with torch.no_grad():
                    out_TH = block(x_TH, capturer)
                # As numpy arrays: pickled by value (tensors would go as file descriptors that
                # die with this process).
                results[name, s] = (out_TH.numpy(), capturer.buffer.numpy().copy())
        conn.send(("ok", results))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports the rank's failure
        conn.send(("error", traceback.format_exc()))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """What each of two gloo ranks computed, by (block, step)."""
    init_method = f"file://{tmp_path_factory.mktemp('rendezvous') / 'file'}"
    context = multiprocessing.get_context("spawn")
    conns, processes = [], []
    for rank in range(2):
        parent, child = context.Pipe()
        process = context.Process(target=_rank_worker, args=(rank, 2, init_method, child))
        process.start()
        child.close()
        conns.append(parent)
        processes.append(process)
    try:
        replies = [conn.recv() for conn in conns]
    finally:
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.kill()
    for rank, reply in enumerate(replies):
        assert reply[0] == "ok", f"rank {rank}:\n{reply[1]}"
    return [reply[1] for reply in replies]


@pytest.mark.parametrize("name", list(BLOCKS))
def test_two_ranks_equal_the_unsharded_block(name, rank_results, one_thread):
    block = _block(name, seed=list(BLOCKS).index(name))
    routing = block.routing
    for s, counts in enumerate(STEPS):
        x_XH = _tokens(counts, seed=s)
        with torch.no_grad():
            want_XH = block(x_XH)
        _, ids_XK = route(
            block.gate.logits(x_XH),
            routing.top_k,
            routing.method,
            correction_bias=block.gate.e_score_correction_bias,
            n_group=routing.n_group,
            topk_group=routing.topk_group,
            routed_scaling_factor=routing.routed_scaling_factor,
        )
        dp = DPMetadata(num_tokens_across_dp=counts)
        for rank in range(2):
            out_TH, buffer = map(torch.from_numpy, rank_results[rank][name, s])
            start, mine = sum(counts[:rank]), counts[rank]
            torch.testing.assert_close(out_TH, want_XH[start : start + mine], rtol=1e-5, atol=1e-5)
            # The capture entry's DP rule on the routed batch of all ranks gives the same rows.
            entry = RoutedExpertsCapturer(8, 2, routing.top_k, device="cpu", dp_rank=rank)
            entry.buffer.fill_(255)
            assert entry.capture(1, ids_XK, dp) == mine
            assert torch.equal(buffer, entry.buffer), (name, counts, rank)
            assert torch.equal(buffer[:mine, 1], ids_XK[start : start + mine].to(buffer.dtype))
