"""The model implementations against HF transformers, on CPU in float32, per family.

Each family's tiny checkpoint runs through the paged ``TorchAttentionBackend``: a batch of
prompts of different lengths prefilled in one flat step, decode steps, and a prompt prefilled in
two chunks next to another sequence (a mixed batch). Every logit row must match HF's forward
over the same tokens within 1e-4, and the ids captured through the batch's capturer must equal
HF's routers' top-k (forward hooks) on >= 99.5% of (token, layer) rows.
Also: the registry, unsupported configurations, shared-expert overlap, and (gpu / triton) the
FlashInfer backend, CUDA-graph decode and the Triton K/V store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paged_batch import PagedBatchBuilder
from transformers import AutoModelForCausalLM

from rollout.layers.attention import (
    AttentionSpec,
    FlashInferAttentionBackend,
    TorchAttentionBackend,
    allocate_kv_cache,
    kv_cache_bytes_per_block,
    make_attention_backend,
)
from rollout.layers.kv_store import store_kv_reference, store_kv_triton
from rollout.layers.moe import RoutingParams, SparseMoeBlock, shared_experts_overlap
from rollout.loader import load_checkpoint, load_hf_config
from rollout.models.registry import MODEL_CLASSES, model_class
from rollout.testing import FAMILIES, make_tiny_moe
from routing_kernels.routing_method import RoutingMethod

BLOCK_SIZE = 4
LOGIT_ATOL = 1e-4
MIN_ROUTER_AGREEMENT = 0.995


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_setup(request, tmp_path_factory):
    family = request.param
    path = make_tiny_moe(family, tmp_path_factory.mktemp(family), seed=0)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = load_checkpoint(path, device="cpu", dtype="float32")
    return family, hf, ours.model


def _hf_reference(hf, model, sequences):
    """HF logits [N, V] and router ids [N, L, K] of each full sequence (forward hooks)."""
    records = {}
    hooks = [
        hf.model.layers[layer].mlp.gate.register_forward_hook(
            lambda _m, _i, out, layer=layer: records.__setitem__(layer, out[2])
        )
        for layer in model.moe_layers
    ]
    try:
        out = []
        with torch.no_grad():
            for tokens in sequences:
                logits = hf(input_ids=torch.tensor([tokens])).logits[0]
                ids = torch.stack([records[layer] for layer in model.moe_layers], dim=1)
                out.append((logits, ids))
        return out
    finally:
        for hook in hooks:
            hook.remove()


def _run(model, builder, chunks):
    batch = builder.step(chunks)
    with torch.no_grad():
        logits = model.compute_logits(model(batch))
    return logits, batch.capture.buffer


def test_dense_layers_match_hf(family_setup):
    _, hf, model = family_setup
    hf_moe = tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    assert model.moe_layers == hf_moe
    assert model.routing_params.num_experts == hf.model.layers[hf_moe[0]].mlp.gate.weight.shape[0]


def test_forward_matches_hf(family_setup, rng):
    family, hf, model = family_setup
    vocab = model.args.vocab_size
    routing = model.routing_params
    spec = model.attention_spec
    kv_cache = allocate_kv_cache(
        spec, num_blocks=64, block_size=BLOCK_SIZE, dtype=torch.float32, device="cpu"
    )
    model.bind_kv_cache(kv_cache)
    builder = PagedBatchBuilder(
        TorchAttentionBackend(spec, block_size=BLOCK_SIZE),
        num_blocks=64,
        block_size=BLOCK_SIZE,
        capture=(len(model.moe_layers), routing.top_k, torch.uint8),
        seed=int(torch.randint(0, 2**31, (1,), generator=rng)),
    )
    prompt_lens, decode_steps = (5, 11, 17), 3
    seqs = [
        torch.randint(0, vocab, (n + decode_steps,), generator=rng).tolist() for n in prompt_lens
    ]
    chunked = torch.randint(0, vocab, (13,), generator=rng).tolist()
    short = torch.randint(0, vocab, (5,), generator=rng).tolist()
    reference = _hf_reference(hf, model, [*seqs, chunked, short])

    rows = []  # (our logits [V], our ids [L, K], HF logits [V], HF ids [L, K])

    def collect(logits, capture, picks):
        for row, (seq, pos) in enumerate(picks):
            rows.append((logits[row], capture[row], reference[seq][0][pos], reference[seq][1][pos]))

    # Prefill three prompts of different lengths in one flat step.
    logits, capture = _run(model, builder, [(i, seqs[i][:n]) for i, n in enumerate(prompt_lens)])
    collect(logits, capture, [(i, p) for i, n in enumerate(prompt_lens) for p in range(n)])
    # Decode steps.
    for step in range(decode_steps):
        chunks = [(i, [seqs[i][n + step]]) for i, n in enumerate(prompt_lens)]
        logits, capture = _run(model, builder, chunks)
        collect(logits, capture, [(i, n + step) for i, n in enumerate(prompt_lens)])
    # Chunked prefill: 6 + 7 tokens over two steps, beside a prompt then its decode token.
    logits, capture = _run(model, builder, [(3, chunked[:6]), (4, short[:4])])
    collect(logits, capture, [(3, p) for p in range(6)] + [(4, p) for p in range(4)])
    logits, capture = _run(model, builder, [(3, chunked[6:]), (4, short[4:])])
    collect(logits, capture, [(3, p) for p in range(6, 13)] + [(4, 4)])

    ours = torch.stack([r[0] for r in rows])
    theirs = torch.stack([r[2] for r in rows])
    diff = (ours - theirs).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{family}: max |logit diff| {diff:.3g} over {len(rows)} rows"

    ids = torch.stack([r[1] for r in rows]).long().sort(dim=-1).values
    hf_ids = torch.stack([r[3] for r in rows]).long().sort(dim=-1).values
    assert ids.shape == hf_ids.shape == (len(rows), len(model.moe_layers), routing.top_k)
    assert int(ids.max()) < routing.num_experts, "a capture row was left unwritten"
    agreement = (ids == hf_ids).all(dim=-1).float().mean().item()
    assert agreement >= MIN_ROUTER_AGREEMENT, f"{family}: router agreement {agreement:.4f}"


def test_no_capture_buffer_means_no_capture(family_setup):
    _, _, model = family_setup
    spec = model.attention_spec
    model.bind_kv_cache(
        allocate_kv_cache(
            spec, num_blocks=8, block_size=BLOCK_SIZE, dtype=torch.float32, device="cpu"
        )
    )
    builder = PagedBatchBuilder(
        TorchAttentionBackend(spec, block_size=BLOCK_SIZE), num_blocks=8, block_size=BLOCK_SIZE
    )
    batch = builder.step([(0, [1, 2, 3])])
    assert batch.capture is None
    with torch.no_grad():
        assert torch.isfinite(model(batch)).all()


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError) as info:
        model_class(["LlamaForCausalLM"])
    for name in MODEL_CLASSES:
        assert name in str(info.value)
    assert model_class(["Foo", "MixtralForCausalLM"]).architecture == "MixtralForCausalLM"


def _write_config(tmp_path, family, **changes):
    path = make_tiny_moe(family, tmp_path / family)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("family", "changes", "field"),
    [
        (
            "qwen3_moe",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 1e6,
                    "original_max_position_embeddings": 256,
                }
            },
            "rope_type",
        ),
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        ("mixtral", {"sliding_window": 64}, "sliding_window"),
        ("glm4_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("olmoe", {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_configs_raise(tmp_path, family, changes, field):
    path = _write_config(tmp_path, family, **changes)
    config = load_hf_config(path)
    with pytest.raises(ValueError, match=field):
        model_class(config.architectures).args_from_config(config)


def test_olmoe_clip_qkv_matches_hf(tmp_path, rng):
    """OLMoE's clip_qkv clamps after the q/k norms; a tight clip makes it bite."""
    path = make_tiny_moe("olmoe", tmp_path / "olmoe", clip_qkv=0.5)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = load_checkpoint(path, device="cpu").model
    spec = model.attention_spec
    model.bind_kv_cache(
        allocate_kv_cache(
            spec, num_blocks=8, block_size=BLOCK_SIZE, dtype=torch.float32, device="cpu"
        )
    )
    builder = PagedBatchBuilder(
        TorchAttentionBackend(spec, block_size=BLOCK_SIZE), num_blocks=8, block_size=BLOCK_SIZE
    )
    tokens = torch.randint(0, model.args.vocab_size, (9,), generator=rng).tolist()
    with torch.no_grad():
        ours = model.compute_logits(model(builder.step([(0, tokens)])))
        theirs = hf(input_ids=torch.tensor([tokens])).logits[0]
    assert (ours - theirs).abs().max().item() <= LOGIT_ATOL


# ---- shared-expert overlap -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "deterministic", "expected"),
    [("cpu", False, False), ("cuda", False, True), ("cuda", True, False), ("cpu", True, False)],
)
def test_shared_experts_overlap_cases(device, deterministic, expected):
    """On CUDA unless deterministic: the expert placement (dp_attention's all-gather/
    reduce-scatter) never turns it off."""
    assert shared_experts_overlap(device=device, deterministic=deterministic) is expected


def test_a_block_overlaps_shared_experts_on_its_side_stream():
    routing = RoutingParams(method=RoutingMethod.DEFAULT, top_k=2, num_experts=4)
    with_shared = SparseMoeBlock(
        hidden_size=8,
        intermediate_size=4,
        routing=routing,
        moe_index=0,
        shared_intermediate_size=4,
    )
    without_shared = SparseMoeBlock(
        hidden_size=8, intermediate_size=4, routing=routing, moe_index=0
    )
    assert not with_shared.shared_experts_overlap and not without_shared.shared_experts_overlap
    # The model attaches its side stream where the rule says so; the stream alone decides.
    side_stream = object()  # stands for a torch.cuda.Stream, which needs a device
    with_shared.aux_stream = without_shared.aux_stream = side_stream
    assert with_shared.shared_experts_overlap and not without_shared.shared_experts_overlap


def test_cpu_models_do_not_overlap_shared_experts(family_setup):
    _, _, model = family_setup
    blocks = [layer.mlp for layer in model.model.layers if layer.moe_index is not None]
    assert not any(block.shared_experts_overlap or block.aux_stream for block in blocks)


@pytest.mark.gpu
def test_shared_expert_overlap_identical_on_cuda(tmp_path, rng):
    path = make_tiny_moe("qwen2_moe", tmp_path / "qwen2_moe")
    results = []
    tokens = torch.randint(0, 384, (2, 7), generator=rng).tolist()
    model = load_checkpoint(path, device="cuda", dtype="bfloat16").model
    blocks = [layer.mlp for layer in model.model.layers if layer.moe_index is not None]
    assert all(block.shared_experts_overlap for block in blocks)
    for overlap in (True, False):
        if not overlap:  # the same model with its shared experts on the main stream
            for block in blocks:
                block.aux_stream = None
        assert all(block.shared_experts_overlap is overlap for block in blocks)
        spec = model.attention_spec
        model.bind_kv_cache(
            allocate_kv_cache(
                spec, num_blocks=16, block_size=BLOCK_SIZE, dtype=torch.bfloat16, device="cuda"
            )
        )
        builder = PagedBatchBuilder(
            TorchAttentionBackend(spec, block_size=BLOCK_SIZE),
            num_blocks=16,
            block_size=BLOCK_SIZE,
            device="cuda",
        )
        with torch.no_grad():
            results.append(model(builder.step([(0, tokens[0]), (1, tokens[1])])))
    assert torch.equal(results[0], results[1])


# ---- FlashInfer, CUDA graphs, the Triton K/V store ---------------------------------------------


@pytest.mark.triton
def test_store_kv_triton_matches_reference(triton_device, rng):
    pages, page, heads, dim = 6, 4, 2, 8
    slots = torch.tensor([5, -1, 0, 23, 12, -1, 7], dtype=torch.int64)
    k = torch.randn(len(slots), heads, 3 * dim, generator=rng)[:, :, :dim]  # strided rows
    v = torch.randn(len(slots), heads, dim, generator=rng)
    expected = torch.randn(pages, 2, page, heads, dim, generator=rng)
    got = expected.clone().to(triton_device)
    store_kv_reference(k.contiguous(), v, expected, slots)
    # Slice on the device: copying a strided view across devices makes it contiguous.
    k_strided = torch.cat([k, k, k], dim=-1).to(triton_device)[:, :, :dim]
    with pytest.raises(ValueError, match="k: expected contiguous"):
        store_kv_triton(k_strided, v.to(triton_device), got, slots.to(triton_device))
    store_kv_triton(
        k.contiguous().to(triton_device), v.to(triton_device), got, slots.to(triton_device)
    )
    assert torch.equal(got.cpu(), expected)


def _attention_inputs(spec, tokens, rng, device, dtype):
    q = torch.randn(tokens, spec.num_heads, spec.head_dim, generator=rng).to(device, dtype)
    k = torch.randn(tokens, spec.num_kv_heads, spec.head_dim, generator=rng).to(device, dtype)
    v = torch.randn(tokens, spec.num_kv_heads, spec.head_dim, generator=rng).to(device, dtype)
    return q, k, v


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_flashinfer_matches_torch_backend(rng, use_tensor_cores):
    spec = AttentionSpec(num_layers=1, num_heads=8, num_kv_heads=2, head_dim=128, scale=128**-0.5)
    dtype, block = torch.bfloat16, 16
    caches = [
        allocate_kv_cache(spec, num_blocks=64, block_size=block, dtype=dtype, device="cuda")[0]
        for _ in range(2)
    ]
    backends = [
        TorchAttentionBackend(spec, block_size=block),
        FlashInferAttentionBackend(
            spec, block_size=block, dtype=dtype, device="cuda", use_tensor_cores=use_tensor_cores
        ),
    ]
    builders = [
        PagedBatchBuilder(b, num_blocks=64, block_size=block, device="cuda", seed=3)
        for b in backends
    ]
    steps = [
        [(0, list(range(37))), (1, list(range(5)))],  # prefill
        [(0, [1]), (1, [2])],  # decode
        [(0, [3]), (1, list(range(20))), (2, list(range(9)))],  # mixed: decode + chunk + prompt
    ]
    for chunks in steps:
        tokens = sum(len(t) for _, t in chunks)
        q, k, v = _attention_inputs(spec, tokens, rng, "cuda", dtype)
        outs = [
            backend.forward(q, k, v, cache, builder.step(chunks))
            for backend, cache, builder in zip(backends, caches, builders, strict=True)
        ]
        torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(caches[1], caches[0])


@pytest.mark.gpu
def test_flashinfer_cuda_graph_decode_replays_like_eager(rng):
    spec = AttentionSpec(num_layers=1, num_heads=8, num_kv_heads=2, head_dim=128, scale=128**-0.5)
    dtype, block, batch_size = torch.bfloat16, 16, 4
    backend = FlashInferAttentionBackend(
        spec,
        block_size=block,
        dtype=dtype,
        device="cuda",
        cuda_graph_max_batch_size=8,
        max_blocks_per_seq=8,
    )
    cache = allocate_kv_cache(spec, num_blocks=64, block_size=block, dtype=dtype, device="cuda")[0]
    builder = PagedBatchBuilder(backend, num_blocks=64, block_size=block, device="cuda")
    prompt = [(i, list(range(10 + 7 * i))) for i in range(batch_size)]
    q, k, v = _attention_inputs(spec, sum(len(t) for _, t in prompt), rng, "cuda", dtype)
    backend.forward(q, k, v, cache, builder.step(prompt))

    # Static inputs of the graph: the step's q/k/v and batch tensors, refilled before replay.
    batch = builder.step([(i, [0]) for i in range(batch_size)], cuda_graph=True)
    static_q, static_k, static_v = _attention_inputs(spec, batch_size, rng, "cuda", dtype)
    backend.forward(static_q, static_k, static_v, cache.clone(), batch)  # warm-up outside capture
    graph_cache = cache.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward(static_q, static_k, static_v, graph_cache, batch)
    for _ in range(3):
        step = builder.step([(i, [0]) for i in range(batch_size)], cuda_graph=True)
        q, k, v = _attention_inputs(spec, batch_size, rng, "cuda", dtype)
        eager_cache = graph_cache.clone()
        eager = builder.backend.forward(q, k, v, eager_cache, _eager_plan(backend, step))
        for static, new in ((static_q, q), (static_k, k), (static_v, v)):
            static.copy_(new)
        batch.slot_mapping.copy_(step.slot_mapping)
        graph.replay()
        torch.testing.assert_close(static_out, eager, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(graph_cache, eager_cache)


def _eager_plan(backend, batch):
    from dataclasses import replace

    eager = replace(batch)
    eager.attn_state = backend.plan(eager)
    return eager


def test_flashinfer_import_is_lazy():
    """The package runs without flashinfer: importing the models and backends does not load it."""
    code = (
        "import sys, rollout.loader, rollout.layers.attention; "
        "assert 'flashinfer' not in sys.modules, 'flashinfer imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_padded_decode_rows_do_not_disturb_real_rows(family_setup, rng):
    """CUDA-graph padding (slot -1, length 0) changes nothing for the real sequences."""
    _, _, model = family_setup
    spec = model.attention_spec
    routing = model.routing_params
    outputs = []
    for pad_to in (None, 5):
        cache = allocate_kv_cache(
            spec, num_blocks=32, block_size=BLOCK_SIZE, dtype=torch.float32, device="cpu"
        )
        model.bind_kv_cache(cache)
        builder = PagedBatchBuilder(
            TorchAttentionBackend(spec, block_size=BLOCK_SIZE),
            num_blocks=32,
            block_size=BLOCK_SIZE,
            capture=(len(model.moe_layers), routing.top_k, torch.uint8),
        )
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
        prompts = [
            (i, torch.randint(0, 384, (4 + 3 * i,), generator=gen).tolist()) for i in range(3)
        ]
        builder.step(prompts)
        batch = builder.step([(i, [7 + i]) for i in range(3)], pad_to=pad_to)
        with torch.no_grad():
            logits = model.compute_logits(model(batch))
        outputs.append((logits[:3], batch.capture.buffer[:3], cache.clone()))
        assert batch.num_seqs == (pad_to or 3)
    # Equal up to the rounding of GEMMs over a different number of rows.
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs[0][1], outputs[1][1])
    torch.testing.assert_close(outputs[0][2], outputs[1][2], atol=1e-5, rtol=1e-5)
    assert int(outputs[1][2].count_nonzero()) == int(outputs[0][2].count_nonzero()), (
        "a padding row wrote the KV cache"
    )


@pytest.mark.gpu
def test_model_flashinfer_cuda_graph_decode(tmp_path, rng):
    """The runner's decode path: FlashInfer, one CUDA graph per bucket with padded rows, the
    capture buffer as a static input; replay equals the same step run eagerly, bit for bit."""
    path = make_tiny_moe(
        "qwen3_moe", tmp_path / "q", hidden_size=128, head_dim=64, num_key_value_heads=1
    )
    model = load_checkpoint(path, device="cuda", dtype="bfloat16").model
    spec = model.attention_spec
    block, bucket = 16, 4
    backend = FlashInferAttentionBackend(
        spec,
        block_size=block,
        dtype=torch.bfloat16,
        device="cuda",
        cuda_graph_max_batch_size=8,
        max_blocks_per_seq=8,
    )
    model.bind_kv_cache(
        allocate_kv_cache(
            spec, num_blocks=64, block_size=block, dtype=torch.bfloat16, device="cuda"
        )
    )
    capture = (len(model.moe_layers), model.routing_params.top_k, torch.uint8)
    builder = PagedBatchBuilder(
        backend, num_blocks=64, block_size=block, device="cuda", capture=capture
    )
    vocab = model.args.vocab_size
    prompts = [(i, torch.randint(0, vocab, (5 + 9 * i,), generator=rng).tolist()) for i in range(3)]
    with torch.no_grad():
        prefill = model.compute_logits(model(builder.step(prompts)))
        assert torch.isfinite(prefill).all()

        def decode_step():
            tokens = torch.randint(0, vocab, (3,), generator=rng).tolist()
            return builder.step(
                [(i, [t]) for i, t in enumerate(tokens)], pad_to=bucket, cuda_graph=True
            )

        static = decode_step()
        model(static)  # warm-up (compiles the Triton kernels) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_hidden = model(static)
        for _ in range(3):
            step = decode_step()
            for name in ("input_ids", "positions", "slot_mapping"):
                getattr(static, name).copy_(getattr(step, name))
            static.attn_state = step.attn_state  # plan() refilled the graph wrapper's buffers
            eager_hidden = model(static).clone()
            eager_ids = static.capture.buffer.clone()
            static.capture.buffer.fill_(255)
            graph.replay()
            assert torch.equal(static_hidden, eager_hidden)
            assert torch.equal(static.capture.buffer, eager_ids)
            assert int(static.capture.buffer[:3].max()) < model.routing_params.num_experts


def test_cpu_path_never_compiles(family_setup, monkeypatch):
    """CPU runs the eager reference ops; torch.compile is for CUDA tensors only."""
    _, _, model = family_setup

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called on the CPU path")

    monkeypatch.setattr(torch, "compile", refuse)
    spec = model.attention_spec
    model.bind_kv_cache(
        allocate_kv_cache(
            spec, num_blocks=8, block_size=BLOCK_SIZE, dtype=torch.float32, device="cpu"
        )
    )
    backend = TorchAttentionBackend(spec, block_size=BLOCK_SIZE)
    builder = PagedBatchBuilder(backend, num_blocks=8, block_size=BLOCK_SIZE)
    with torch.no_grad():
        assert torch.isfinite(model(builder.step([(0, [1, 2, 3]), (1, [4])]))).all()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_compiled_elementwise_ops_match_eager_on_cuda(rng, tokens):
    from rollout.layers.mlp import silu_and_mul
    from rollout.layers.norm import add_rms_norm
    from rollout.layers.rotary import apply_rotary

    def rand(*shape):
        return torch.randn(*shape, generator=rng).to("cuda", torch.bfloat16)

    cases = [
        (add_rms_norm, (rand(tokens, 256), rand(tokens, 256), rand(256), 1e-6)),
        (apply_rotary, (rand(tokens, 8, 128), rand(tokens, 64), rand(tokens, 64))),
        (silu_and_mul, (rand(tokens, 512),)),
    ]
    for fn, args in cases:
        compiled = fn(*args)
        eager = fn.__wrapped__(*args)
        for got, want in zip(
            compiled if isinstance(compiled, tuple) else (compiled,),
            eager if isinstance(eager, tuple) else (eager,),
            strict=True,
        ):
            # Eager's rounding is emulated; libdevice math may still move a value by one ulp.
            torch.testing.assert_close(got, want, atol=1e-2, rtol=8e-3)


def test_kv_cache_allocation_and_backend_choice():
    spec = AttentionSpec(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)
    cache = allocate_kv_cache(spec, num_blocks=5, block_size=8, dtype=torch.float32, device="cpu")
    assert cache.shape == (3, 5, 2, 8, 2, 16) and not cache.any()
    assert kv_cache_bytes_per_block(spec, 8, torch.bfloat16) * 5 == cache.numel() * 2
    for dtype in (torch.float32, torch.bfloat16):
        backend = make_attention_backend(spec, block_size=8, dtype=dtype, device="cpu")
        assert isinstance(backend, TorchAttentionBackend)
    with pytest.raises(ValueError, match="num_heads"):
        AttentionSpec(num_layers=1, num_heads=3, num_kv_heads=2, head_dim=8, scale=1.0)
