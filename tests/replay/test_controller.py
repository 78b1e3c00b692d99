"""Replay (R3) and record (R2) on tiny models of every family: ids forced, logits reproduced,
gradients equal to a reference written here, activation checkpointing, padding and packing,
and every misuse raising."""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from tiny_moe import (
    EXPECTED,
    FAMILIES,
    NUM_EXPERTS,
    TOP_K,
    VOCAB,
    experts_modules,
    routers,
    tiny_moe,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import replay.contexts
from replay.controller import Mode
from replay.patch import patch
from replay.routed_experts import RoutedExperts
from routing_kernels.replay_weights import replay_topk_triton

# CUDA runs the Triton replay_weights kernel and a backward on the device's autograd thread.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def enable_checkpointing(model: nn.Module, *, reentrant: bool) -> None:
    """HF's gradient_checkpointing_enable (5.23 deprecates the name, 5.17 has only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated")
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )


def random_traces(
    rng: torch.Generator,
    lengths: list[int],
    moe_layers: tuple[int, ...],
    start: int = 0,
) -> list[RoutedExperts]:
    """One trace per sequence of ``lengths`` tokens: distinct random ids per (row, layer)."""
    traces = []
    for n in lengths:
        rows = n - 1 - start
        ids = torch.rand(rows, len(moe_layers), NUM_EXPERTS, generator=rng).argsort(-1)[..., :TOP_K]
        traces.append(RoutedExperts(ids.numpy(), moe_layers, NUM_EXPERTS, start=start))
    return traces


def tokens(rng: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=rng)


def reference_weights(method: str, logits_TE: torch.Tensor, ids_TK: torch.Tensor, factor: float):
    """Gate weights at given ids, as the HF routers compute them for their own ids."""
    x_TE = logits_TE.float()
    if method == "DEFAULT":
        return torch.softmax(x_TE, -1).gather(1, ids_TK)
    if method in ("RENORMALIZE", "RENORMALIZE_NAIVE"):
        p_TK = torch.softmax(x_TE, -1).gather(1, ids_TK)
        return p_TK / p_TK.sum(-1, keepdim=True)
    assert method == "DEEPSEEK_V3"
    s_TK = torch.sigmoid(x_TE).gather(1, ids_TK)
    return s_TK / s_TK.sum(-1, keepdim=True) * factor


def per_token_ids(traces: list[RoutedExperts], seq_len: int, position: int) -> dict[int, list]:
    """Flat token -> trace ids at MoE layer ``position``, for one unpadded sequence per row."""
    out = {}
    for b, trace in enumerate(traces):
        for r in range(trace.num_rows):
            if trace.valid is None or trace.valid[r]:
                out[b * seq_len + trace.start + r] = trace.ids[r, position].tolist()
    return out


def reference_model(model: nn.Module, family: str, traces: list[RoutedExperts], seq_len: int):
    """An unpatched copy whose routers are overridden by forward hooks: trace ids where a row
    exists, weights from ``reference_weights`` of the router's logits."""
    reference = copy.deepcopy(model)
    _, method, factor = EXPECTED[family]
    for position, router in enumerate(routers(reference)):
        table = per_token_ids(traces, seq_len, position)

        def hook(module, args, output, table=table):
            logits_TE, weights_TK, ids_TK = output
            ids_TK = ids_TK.clone()
            replay_T = torch.zeros(ids_TK.shape[0], dtype=torch.bool, device=ids_TK.device)
            for token, ids in table.items():
                ids_TK[token] = torch.tensor(ids, device=ids_TK.device)
                replay_T[token] = True
            replayed_TK = reference_weights(method, logits_TE, ids_TK, factor).to(weights_TK.dtype)
            return (
                logits_TE,
                torch.where(replay_T[:, None], replayed_TK, weights_TK),
                ids_TK,
            )

        router.register_forward_hook(hook)
    return reference


class ExpertsSpy:
    """Records the (ids, weights) each experts module receives and each router's input."""

    def __init__(self, model: nn.Module) -> None:
        self.ids: list[torch.Tensor] = []
        self.router_inputs: list[torch.Tensor] = []
        for experts in experts_modules(model):
            experts.register_forward_pre_hook(self._on_experts)
        for router in routers(model):
            router.register_forward_pre_hook(self._on_router)

    def _on_experts(self, module, args) -> None:
        self.ids.append(args[1].detach().clone())

    def _on_router(self, module, args) -> None:
        self.router_inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())


def param_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------- replay fidelity


@pytest.mark.parametrize("family", FAMILIES)
def test_record_then_replay_reproduces_native_logits(family: str, rng: torch.Generator) -> None:
    model = tiny_moe(family)
    spy = ExpertsSpy(model)
    ctl = patch(model)
    x = tokens(rng, 2, 7)
    native = model(x).logits
    native_ids = list(spy.ids)
    with ctl.record() as rec:
        recorded = model(x).logits
    traces = rec.traces
    assert torch.equal(recorded, native)
    moe_layers = EXPECTED[family][0]
    assert [(t.moe_layers, t.num_rows, t.start, t.valid) for t in traces] == [
        (moe_layers, 6, 0, None)
    ] * 2
    for position, ids_TK in enumerate(native_ids):  # the record is what the experts got
        got = np.stack([t.ids[:, position] for t in traces])
        assert got.tolist() == ids_TK.view(2, 7, TOP_K)[:, :6].tolist()

    with ctl.replay(traces):
        replayed = model(x).logits
    torch.testing.assert_close(replayed, native, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_forces_trace_ids_and_routes_the_rest_natively(
    family: str, rng: torch.Generator
) -> None:
    model = tiny_moe(family)
    ctl = patch(model)
    spy = ExpertsSpy(model)
    moe_layers = EXPECTED[family][0]
    seq_len = 6
    traces = [random_traces(rng, [seq_len], moe_layers)[0]]
    # Sequence 1 starts its trace at token 2 and has an invalid row: those route natively.
    ids = random_traces(rng, [seq_len], moe_layers, start=2)[0].ids
    traces.append(RoutedExperts(ids, moe_layers, NUM_EXPERTS, start=2, valid=[True, False, True]))
    with ctl.replay(traces):
        model(tokens(rng, 2, seq_len))

    for position, router in enumerate(routers(model)):
        table = per_token_ids(traces, seq_len, position)
        assert sorted(table) == [0, 1, 2, 3, 4, 8, 10]
        got_TK = spy.ids[position]
        with torch.no_grad():  # the router's own choice, through its class forward
            _, _, native_TK = type(router).forward(router, spy.router_inputs[position])
        for token in range(2 * seq_len):
            expected = table.get(token, native_TK[token].tolist())
            assert got_TK[token].tolist() == expected, (position, token)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_gradients_equal_the_reference_formula(
    family: str, device: str, rng: torch.Generator
) -> None:
    check_gradients_against_reference(family, device, rng)


@pytest.mark.triton
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_replay_through_the_triton_kernel(
    family: str, triton_device: torch.device, rng: torch.Generator, monkeypatch
) -> None:
    # On CPU the controller's replay_topk takes the reference path; force the fused kernels.
    launches = []

    def triton_topk(*args, **kwargs):
        launches.append(1)
        return replay_topk_triton(*args, **kwargs)

    monkeypatch.setattr(replay.contexts, "replay_topk", triton_topk)
    check_gradients_against_reference(family, str(triton_device), rng)
    assert len(launches) == len(EXPECTED[family][0])


def check_gradients_against_reference(family: str, device: str, rng: torch.Generator) -> None:
    """Replayed logits and every parameter's gradient equal those of the reference model."""
    model = tiny_moe(family).to(device)
    seq_len = 6
    traces = random_traces(rng, [seq_len, seq_len], EXPECTED[family][0])
    reference = reference_model(model, family, traces, seq_len)
    ctl = patch(model)
    x = tokens(rng, 2, seq_len).to(device)
    probe = torch.randn(2, seq_len, VOCAB, generator=rng).to(device)

    with ctl.replay(traces):
        logits = model(x).logits
    (logits * probe).sum().backward()
    expected_logits = reference(x).logits
    (expected_logits * probe).sum().backward()

    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    grads, expected = param_grads(model), param_grads(reference)
    assert_grads_close(grads, expected)
    router_grads = [n for n in grads if n.endswith(".mlp.gate.weight")]
    assert len(router_grads) == len(EXPECTED[family][0])
    assert all(grads[n].abs().sum() > 0 for n in router_grads)


def test_traces_without_valid_rows_leave_the_router_output_alone(
    rng: torch.Generator, monkeypatch
) -> None:
    """Decided on the host from the traces: nothing replays, so no replay kernel runs and the
    forward is the native one (its consumption still counted)."""
    model = tiny_moe("qwen3_moe")
    ctl = patch(model)
    calls = []
    monkeypatch.setattr(replay.contexts, "replay_topk", lambda *a, **k: calls.append(a))
    x = tokens(rng, 2, 5)
    traces = random_traces(rng, [5, 5], EXPECTED["qwen3_moe"][0])
    invalid = [
        RoutedExperts(t.ids, t.moe_layers, NUM_EXPERTS, valid=np.zeros(4, dtype=bool))
        for t in traces
    ]
    with ctl.replay(invalid):
        logits = model(x).logits
    assert calls == []
    torch.testing.assert_close(logits, model(x).logits, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["off", "replay", "record"])
def test_routers_never_synchronize_with_the_host(mode: str, rng: torch.Generator) -> None:
    """Every router call (its own forward plus the seam) runs under sync debug mode "error":
    a host synchronization anywhere in the patched routing raises."""
    model = tiny_moe("qwen3_moe").cuda().train()
    ctl = patch(model)
    x = tokens(rng, 2, 6).cuda()
    traces = random_traces(rng, [6, 6], EXPECTED["qwen3_moe"][0])
    contexts = {
        "off": nullcontext,
        "replay": lambda: ctl.replay(traces),
        "record": ctl.record,
    }

    def step() -> None:
        with contexts[mode]():
            model(x).logits.sum().backward()

    step()  # compiles the Triton kernels outside the check
    for router in routers(model):
        router.register_forward_pre_hook(lambda m, a: torch.cuda.set_sync_debug_mode("error"))
        router.register_forward_hook(lambda m, a, o: torch.cuda.set_sync_debug_mode("default"))
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------- checkpointing


def _loss(model: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    return (model(x).logits * probe).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("how", ["hf_reentrant", "hf_non_reentrant", "whole_model"])
def test_checkpoint_recompute_after_exit_replays_the_same_ids(
    family: str, how: str, device: str, rng: torch.Generator
) -> None:
    model = tiny_moe(family).train().to(device)
    ctl = patch(model)
    x = tokens(rng, 2, 6).to(device)
    probe = torch.randn(2, 6, VOCAB, generator=rng).to(device)
    traces = random_traces(rng, [6, 6], EXPECTED[family][0])

    with ctl.replay(traces):
        loss = _loss(model, x, probe)
    loss.backward()
    expected = param_grads(model)
    model.zero_grad()
    _loss(model, x, probe).backward()
    native = param_grads(model)
    model.zero_grad()

    if how == "whole_model":
        with ctl.replay(traces):
            out = checkpoint(model, x, use_reentrant=False)
        loss = (out.logits * probe).sum()
    else:
        enable_checkpointing(model, reentrant=how == "hf_reentrant")
        with ctl.replay(traces):
            loss = _loss(model, x, probe)
    assert ctl.mode is Mode.OFF
    loss.backward()  # recomputes outside the context

    # CUDA's eager experts accumulate with atomics: equal up to summation order there.
    assert_grads_close(param_grads(model), expected, atol=1e-6 if device == "cpu" else 1e-5)
    assert any(not torch.allclose(native[n], expected[n]) for n in native)  # replay mattered


@pytest.mark.parametrize("second", ["replay", "native"])
def test_checkpointed_forwards_keep_their_own_routing(second: str, rng: torch.Generator) -> None:
    model = tiny_moe("qwen3_moe").train()
    ctl = patch(model)
    moe_layers = EXPECTED["qwen3_moe"][0]
    x_a, x_b = tokens(rng, 2, 6), tokens(rng, 2, 6)
    probe = torch.randn(2, 6, VOCAB, generator=rng)
    traces_a = random_traces(rng, [6, 6], moe_layers)
    traces_b = random_traces(rng, [6, 6], moe_layers)

    def run_b() -> torch.Tensor:
        if second == "native":
            return _loss(model, x_b, probe)
        with ctl.replay(traces_b):
            return _loss(model, x_b, probe)

    with ctl.replay(traces_a):
        _loss(model, x_a, probe).backward()
    expected = param_grads(model)
    model.zero_grad()
    run_b().backward()
    expected_b = param_grads(model)
    model.zero_grad()

    enable_checkpointing(model, reentrant=False)
    with ctl.replay(traces_a):
        loss_a = _loss(model, x_a, probe)
    loss_b = run_b()
    loss_a.backward()  # after B's forward: must still recompute A with traces_a
    assert_grads_close(param_grads(model), expected, atol=1e-6)
    model.zero_grad()
    loss_b.backward()
    assert_grads_close(param_grads(model), expected_b, atol=1e-6)


def test_one_backward_through_two_checkpointed_forwards_raises(
    rng: torch.Generator,
) -> None:
    model = tiny_moe("qwen3_moe").train()
    enable_checkpointing(model, reentrant=True)
    ctl = patch(model)
    probe = torch.randn(1, 5, VOCAB, generator=rng)
    with ctl.replay(random_traces(rng, [5], EXPECTED["qwen3_moe"][0])):
        loss_a = _loss(model, tokens(rng, 1, 5), probe)
    loss_b = _loss(model, tokens(rng, 1, 5), probe)
    with pytest.raises(RuntimeError, match="recomputed .* backward through 2 forwards"):
        (loss_a + loss_b).backward()


def test_record_ignores_recompute(rng: torch.Generator) -> None:
    model = tiny_moe("glm4_moe")
    ctl = patch(model)
    x = tokens(rng, 2, 5)
    with ctl.record() as plain:
        model(x)
    enable_checkpointing(model.train(), reentrant=False)
    with ctl.record() as rec:
        model(x).logits.sum().backward()  # the recompute runs inside the context
    assert rec.traces == plain.traces


# ---------------------------------------------------------------------- batch layouts


def _single(model, ctl, ids: torch.Tensor) -> tuple[torch.Tensor, RoutedExperts]:
    with ctl.record() as rec:
        logits = model(ids[None]).logits[0]
    return logits, rec.traces[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_replays_and_records_like_single_sequences(
    side: str, rng: torch.Generator
) -> None:
    model = tiny_moe("qwen2_moe")
    ctl = patch(model)
    seqs = [tokens(rng, 7), tokens(rng, 4)]
    singles = [_single(model, ctl, s) for s in seqs]
    x = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    spans = []
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(7 - len(s), 7)
        x[b, span], mask[b, span] = s, 1
        spans.append(span)

    with ctl.replay([t for _, t in singles], attention_mask=mask):
        logits = model(x, attention_mask=mask).logits
    with ctl.record(attention_mask=mask) as rec:
        model(x, attention_mask=mask)
    for b, (single_logits, trace) in enumerate(singles):
        torch.testing.assert_close(logits[b, spans[b]], single_logits, atol=1e-5, rtol=1e-5)
        assert rec.traces[b] == trace


@pytest.mark.parametrize("described_by", ["position_ids", "cu_seqlens"])
def test_packed_batch_replays_and_records_like_single_sequences(
    described_by: str, rng: torch.Generator
) -> None:
    model = tiny_moe("mixtral")
    ctl = patch(model)
    seqs = [tokens(rng, 5), tokens(rng, 3), tokens(rng, 4)]
    singles = [_single(model, ctl, s) for s in seqs]
    x = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    layout = (
        {"position_ids": position_ids}
        if described_by == "position_ids"
        else {"cu_seqlens": torch.tensor([0, 5, 8, 12])}
    )
    # use_cache=False: HF only splits attention by position_ids without a KV cache.
    forward = dict(position_ids=position_ids, use_cache=False)

    with ctl.replay([t for _, t in singles], **layout):
        logits = model(x, **forward).logits[0]
    with ctl.record(**layout) as rec:
        model(x, **forward)
    starts = [0, 5, 8, 12]
    for i, (single_logits, trace) in enumerate(singles):
        torch.testing.assert_close(
            logits[starts[i] : starts[i + 1]], single_logits, atol=1e-5, rtol=1e-5
        )
        assert rec.traces[i] == trace


def test_traces_of_different_lengths_need_a_layout(rng: torch.Generator) -> None:
    model = tiny_moe("olmoe")
    ctl = patch(model)
    traces = random_traces(rng, [5, 4], EXPECTED["olmoe"][0])
    with pytest.raises(ValueError, match=r"got lengths \[5, 4\]"):
        ctl.replay(traces)


# ---------------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            "layer_count",
            r"traces\[1\]\.moe_layers: expected the model's 2 MoE layers .*got 3",
        ),
        ("moe_layers", r"traces\[1\]\.moe_layers: .*got 2 layers \[1, 2\]"),
        ("top_k", r"traces\[1\]\.top_k: expected 2 \(the model's\), got 3"),
        ("num_experts", r"traces\[1\]\.num_experts: expected 8 \(the model's\), got 9"),
        (
            "too_few_rows",
            r"traces\[1\]: expected 5 rows \(sequence 1 has 6 tokens.*got 4",
        ),
        (
            "too_many_rows",
            r"traces\[1\]: expected 5 rows \(sequence 1 has 6 tokens.*got 6",
        ),
        ("trace_count", r"traces: expected 2 \(one per sequence of the batch\), got 3"),
    ],
)
def test_bad_traces_raise(change: str, match: str, rng: torch.Generator) -> None:
    model = tiny_moe("qwen3_moe")
    ctl = patch(model)
    good = random_traces(rng, [6], EXPECTED["qwen3_moe"][0])[0]
    rows, layers, top_k, experts = 5, EXPECTED["qwen3_moe"][0], TOP_K, NUM_EXPERTS
    rows = {"too_few_rows": 4, "too_many_rows": 6}.get(change, rows)
    layers = {"layer_count": (0, 1, 2), "moe_layers": (1, 2)}.get(change, layers)
    top_k = 3 if change == "top_k" else top_k
    experts = 9 if change == "num_experts" else experts
    ids = torch.rand(rows, len(layers), experts, generator=rng).argsort(-1)[..., :top_k]
    bad = RoutedExperts(ids.numpy(), layers, experts)
    traces = [good, bad] + ([good] if change == "trace_count" else [])
    mask = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        ctl.replay(traces, attention_mask=mask)
    assert ctl.mode is Mode.OFF


def test_a_layer_that_did_not_consume_its_trace_raises(rng: torch.Generator) -> None:
    model = tiny_moe("qwen3_moe")
    ctl = patch(model)
    traces = random_traces(rng, [5], EXPECTED["qwen3_moe"][0])
    model.config.num_hidden_layers = 2  # the forward now skips decoder layer 2
    not_consumed = r"layer 2 \(model\.layers\.2\.mlp\) 0 times in forward 0"
    with pytest.raises(RuntimeError, match=not_consumed), ctl.replay(traces):
        model(tokens(rng, 1, 5))
    assert ctl.mode is Mode.OFF
    model.config.num_hidden_layers = 3
    with (
        pytest.raises(RuntimeError, match=r"expected a forward of the model inside the context"),
        ctl.replay(traces),
    ):
        pass


def test_consumption_check_counts_every_forward(rng: torch.Generator) -> None:
    model = tiny_moe("qwen3_moe")
    ctl = patch(model)
    traces = random_traces(rng, [5], EXPECTED["qwen3_moe"][0])
    x = tokens(rng, 1, 5)
    with ctl.replay(traces):
        first = model(x).logits
        second = model(x).logits  # e.g. old log-probs, then the training forward
    assert torch.equal(first, second)
    model.config.num_hidden_layers = 2
    with pytest.raises(RuntimeError, match=r"layer 2 .* 0 times in forward 1"):
        with ctl.replay(traces):
            model.config.num_hidden_layers = 3
            model(x)
            model.config.num_hidden_layers = 2
            model(x)
    model.config.num_hidden_layers = 3


def test_misuse_of_contexts_raises(rng: torch.Generator) -> None:
    model = tiny_moe("olmoe")
    ctl = patch(model)
    traces = random_traces(rng, [5], EXPECTED["olmoe"][0])
    context = ctl.replay(traces)
    with ctl.record():
        with pytest.raises(RuntimeError, match="mode: expected OFF to enter REPLAY, got RECORD"):
            context.__enter__()
        model(tokens(rng, 1, 5))
    wrong_shape = r"replay: expected a forward of batch shape \(1, 5\).*got \(1, 6\)"
    with pytest.raises(ValueError, match=wrong_shape), ctl.replay(traces):
        model(tokens(rng, 1, 6))
    with (
        pytest.raises(RuntimeError, match="ran outside a forward of the patched model"),
        ctl.replay(traces),
    ):
        model.model.layers[0].mlp(torch.randn(1, 5, 32))
    with pytest.raises(RuntimeError, match="expected one forward per record context"):
        with ctl.record():
            model(tokens(rng, 1, 5))
            model(tokens(rng, 1, 5))
    with pytest.raises(RuntimeError, match="fresh context"):
        with context:
            model(tokens(rng, 1, 5))
        with context:
            pass
    assert ctl.mode is Mode.OFF
