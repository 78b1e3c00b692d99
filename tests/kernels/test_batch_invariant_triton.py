"""The Triton kernels of ``routing_kernels.batch_invariant`` against their portable references
(``triton``: on CUDA, or on CPU under ``TRITON_INTERPRET=1`` at small sizes), and (``gpu``)
their batch invariance in bfloat16 at model-like shapes on a CUDA device.

Under the interpreter a tile's ``tl.dot`` is numpy's matmul, whose result for a row may depend
on the row's place in the tile; the row invariance of the dot-based kernels (matmul,
attention, experts) is therefore checked on CUDA (``gpu``), and under the interpreter only for
the same rows in the same tile places (a tile of a bigger batch equals the same rows alone).
"""

from __future__ import annotations

import math

import pytest
import torch

from routing_kernels.batch_invariant.causal_attention import (
    paged_attention_reference,
    paged_attention_triton,
)
from routing_kernels.batch_invariant.log_softmax import token_logprobs_triton
from routing_kernels.batch_invariant.matmul import linear_reference, linear_triton, matmul_tiles
from routing_kernels.batch_invariant.moe import experts_reference
from routing_kernels.batch_invariant.norm import rms_norm_reference, rms_norm_triton
from routing_kernels.fused_moe import fused_experts_triton


def _randn(rng, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=rng) * scale).to(dtype).to(device)


def _rows_alone(fn, x, *others):
    """The batched result and each row computed alone, concatenated."""
    return fn(x, *others), torch.cat([fn(x[i : i + 1], *others) for i in range(x.shape[0])])


def _paged_problem(
    rng, device, dtype, *, page_size=4, q_lens=(7, 1, 3, 2, 0), ctx=(7, 1, 19, 5, 0)
):
    """A step of sequences over shuffled pages: (q, k_pages, v_pages, index kwargs)."""
    heads, kv_heads, dim = 4, 2, 16
    width = max(-(-c // page_size) for c in ctx) or 1
    pages = len(ctx) * width
    k = _randn(rng, pages, page_size, kv_heads, dim, dtype=dtype, device=device)
    v = _randn(rng, pages, page_size, kv_heads, dim, dtype=dtype, device=device)
    tables = torch.randperm(pages, generator=rng).view(len(ctx), width).int().to(device)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = _randn(rng, int(starts[-1]), heads, dim, dtype=dtype, device=device)
    index = dict(
        query_start_B1=starts.to(device),
        seq_lens_B=torch.tensor(ctx, dtype=torch.int32, device=device),
        block_tables_BM=tables,
        scale=dim**-0.5,
    )
    return q, k, v, index


# ---------------------------------------------------------------------- against the references


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_triton_matches_the_reference(dtype, triton_device, rng):
    x, w, b = _randn(rng, 37, 100), _randn(rng, 70, 100), _randn(rng, 70)
    got = linear_triton(*(t.to(dtype).to(triton_device) for t in (x, w, b)))
    want = linear_reference(x.to(dtype), w.to(dtype), b.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol * 10)
    # The same rows in the same tile places give the same bits in a bigger batch.
    tile = matmul_tiles(dtype).block_m
    xs, ws = _randn(rng, 3 * tile, 48, dtype=dtype), _randn(rng, 33, 48, dtype=dtype)
    whole = linear_triton(xs.to(triton_device), ws.to(triton_device))
    alone = linear_triton(xs[tile : 2 * tile].to(triton_device), ws.to(triton_device))
    assert torch.equal(whole[tile : 2 * tile], alone)


@pytest.mark.triton
def test_row_kernels_match_the_reference_and_are_row_invariant(triton_device, rng):
    x, w = _randn(rng, 9, 200, scale=3.0), _randn(rng, 200)
    batched, alone = _rows_alone(lambda t: rms_norm_triton(t, w.to(triton_device), 1e-6),
                                 x.to(triton_device))  # fmt: skip
    torch.testing.assert_close(batched.cpu(), rms_norm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    assert torch.equal(batched, alone)
    logits = _randn(rng, 6, 9000, scale=4.0)  # more than one 4096-wide chunk
    ids = torch.randint(0, 9000, (6,), generator=rng)
    got = token_logprobs_triton(logits.to(triton_device), ids.to(triton_device)).cpu()
    want = torch.log_softmax(logits.double(), -1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    alone = torch.cat([token_logprobs_triton(logits[i : i + 1].to(triton_device),
                                             ids[i : i + 1].to(triton_device)).cpu()
                       for i in range(6)])  # fmt: skip
    assert torch.equal(got, alone)


@pytest.mark.triton
def test_paged_attention_triton_matches_the_reference(triton_device, rng):
    q, k, v, index = _paged_problem(rng, "cpu", torch.float32)
    want = paged_attention_reference(q, k, v, **index)
    got = paged_attention_triton(
        q.to(triton_device), k.to(triton_device), v.to(triton_device),
        **{name: t.to(triton_device) if torch.is_tensor(t) else t for name, t in index.items()},
    )  # fmt: skip
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(got).any()  # the sequence without context gets zeros, not 0 / 0


@pytest.mark.triton
def test_invariant_fused_experts_match_the_reference(triton_device, rng):
    x, gate_up, down = _randn(rng, 21, 64), _randn(rng, 8, 96, 64), _randn(rng, 8, 64, 48)
    weights = torch.rand(21, 3, generator=rng)
    ids = torch.stack([torch.randperm(8, generator=rng)[:3] for _ in range(21)]).int()
    got = fused_experts_triton(
        *(t.to(triton_device) for t in (x, gate_up, down, weights, ids)), invariant=True
    )
    want = experts_reference(x, gate_up, down, weights, ids)
    scale = float(want.abs().max())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------- invariance on CUDA


@pytest.mark.gpu
def test_cuda_kernels_are_batch_invariant_in_bfloat16(rng):
    dev, bf16 = "cuda", torch.bfloat16
    x, w = (
        _randn(rng, 300, 2048, dtype=bf16, device=dev),
        _randn(rng, 768, 2048, dtype=bf16, device=dev),
    )
    batched = linear_triton(x, w)
    for rows in (1, 3, 64, 129):
        assert torch.equal(linear_triton(x[:rows], w), batched[:rows]), rows
    assert torch.equal(linear_triton(x[17:18], w), batched[17:18])
    norm_w = _randn(rng, 2048, dtype=bf16, device=dev)
    assert torch.equal(rms_norm_triton(x[5:6], norm_w, 1e-6), rms_norm_triton(x, norm_w, 1e-6)[5:6])
    logits = _randn(rng, 64, 151_936, device=dev, scale=3.0)
    ids = torch.randint(0, 151_936, (64,), device=dev)
    assert torch.equal(token_logprobs_triton(logits[9:10], ids[9:10]),
                       token_logprobs_triton(logits, ids)[9:10])  # fmt: skip
    gate_up = _randn(rng, 16, 1536, 2048, dtype=bf16, device=dev, scale=0.02)
    down = _randn(rng, 16, 2048, 768, dtype=bf16, device=dev, scale=0.02)
    weights = torch.rand(300, 4, device=dev)
    expert_ids = torch.stack([torch.randperm(16)[:4] for _ in range(300)]).int().to(dev)
    whole = fused_experts_triton(x, gate_up, down, weights, expert_ids, invariant=True)
    for rows in (slice(0, 1), slice(7, 8), slice(0, 64)):
        part = fused_experts_triton(
            x[rows], gate_up, down, weights[rows], expert_ids[rows], invariant=True
        )
        assert torch.equal(part, whole[rows]), rows


@pytest.mark.gpu
def test_cuda_attention_decode_equals_prefill_and_chunks(rng):
    dev, bf16 = "cuda", torch.bfloat16
    context, heads, kv_heads, dim, page = 300, 32, 4, 128, 16
    k = _randn(rng, context, kv_heads, dim, dtype=bf16, device=dev)
    v = _randn(rng, context, kv_heads, dim, dtype=bf16, device=dev)
    q = _randn(rng, context, heads, dim, dtype=bf16, device=dev)
    pages = math.ceil(context / page)
    order = torch.randperm(pages, generator=rng)
    k_pages = torch.zeros(pages, page, kv_heads, dim, dtype=bf16, device=dev)
    v_pages = torch.zeros_like(k_pages)
    k_pages.view(-1, kv_heads, dim)[
        (order[:, None] * page + torch.arange(page)).view(-1)[:context].to(dev)
    ] = k  # noqa: E501
    v_pages.view(-1, kv_heads, dim)[
        (order[:, None] * page + torch.arange(page)).view(-1)[:context].to(dev)
    ] = v  # noqa: E501
    table = order[None].int().to(dev)

    def run(first, last):
        return paged_attention_triton(
            q[first:last], k_pages, v_pages,
            query_start_B1=torch.tensor([0, last - first], dtype=torch.int32, device=dev),
            seq_lens_B=torch.tensor([last], dtype=torch.int32, device=dev),
            block_tables_BM=table, scale=dim**-0.5,
        )  # fmt: skip

    whole = run(0, context)
    for p in (0, 1, 63, 64, 65, 200, 299):
        assert torch.equal(run(p, p + 1), whole[p : p + 1]), p
    chunks = torch.cat([run(a, b) for a, b in ((0, 37), (37, 130), (130, 300))])
    assert torch.equal(chunks, whole)
