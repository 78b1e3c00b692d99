"""End to end on CPU: rollout.LLM captures routing, the HF model replays it (R3).

The trainer's copy of the policy gets its router weights perturbed, standing in for the
training/inference mismatch that R3 exists for (different kernels, precisions, a policy a
step ahead). Without replay its routers pick other experts on some rows; with replay every
experts module receives exactly the rollout's ids and the logprob gap to the rollout shrinks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import replay
from rollout import LLM, SamplingParams
from rollout.testing import make_tiny_moe


def _experts_inputs(model: torch.nn.Module, ctl: replay.ReplayController) -> list[list]:
    """Forward pre-hooks that keep the ids each MoE layer's experts module receives."""
    seen: list[list] = [[] for _ in ctl.layers]
    handles = []
    for index, layer in enumerate(ctl.layers):

        def hook(module, args, kwargs, index=index):
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen[index].append(ids.detach().clone())

        handles.append(layer.experts.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _sequence_logprobs(logits_1SV: torch.Tensor, tokens: list[int], prompt_len: int) -> np.ndarray:
    """log p(token t | tokens < t) in fp32 for the generated tokens."""
    logp_SV = torch.log_softmax(logits_1SV[0].float(), dim=-1)
    targets = torch.tensor(tokens[prompt_len:])
    return logp_SV[prompt_len - 1 : len(tokens) - 1].gather(1, targets[:, None])[:, 0].numpy()


@pytest.mark.slow
def test_rollout_capture_replayed_in_hf_model(tmp_path, rng):
    path = make_tiny_moe("qwen3_moe", tmp_path / "model", seed=int(rng.initial_seed() % 1000))
    prompts = [[5, 17, 33, 9, 101, 7], [44, 3, 250, 61], [12, 12, 90, 200, 15, 77, 31, 8]]
    with LLM(path, device="cpu", capture_routing=True, kv_cache_blocks=64, block_size=4) as llm:
        outs = llm.generate(
            prompts,
            SamplingParams(max_tokens=12, temperature=1.0, seed=3, return_routed_experts=True),
            use_tqdm=False,
        )
        spec = llm.routing_spec
    traces = [
        replay.RoutedExperts(o.routed_experts, spec.moe_layers, spec.num_experts) for o in outs
    ]

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ctl = replay.patch(model)
    with torch.no_grad():  # the trainer's routers drift away from the rollout's
        for layer in ctl.layers:
            weight = layer.router.weight
            weight.mul_(1 + 0.5 * torch.randn(weight.shape, generator=rng))

    gaps = {"native": [], "replay": []}
    agreement = {"native": [], "replay": []}
    for out, trace in zip(outs, traces):
        tokens = list(out.prompt_token_ids) + list(out.token_ids)
        input_ids = torch.tensor([tokens])
        for mode in ("native", "replay"):
            seen, handles = _experts_inputs(model, ctl)
            with torch.no_grad():
                if mode == "replay":
                    with ctl.replay([trace]):
                        logits = model(input_ids).logits
                else:
                    logits = model(input_ids).logits
            for handle in handles:
                handle.remove()
            used = replay.RoutedExperts(
                np.stack([s[0][: len(tokens) - 1].numpy() for s in seen], axis=1),
                spec.moe_layers,
                spec.num_experts,
            )
            agreement[mode].append(replay.router_agreement(trace, used).overall)
            train_logp = _sequence_logprobs(logits, tokens, len(out.prompt_token_ids))
            gaps[mode].append(
                replay.kl_k3(torch.from_numpy(out.logprobs), torch.from_numpy(train_logp))
            )

    # The perturbation must actually move routing, or the comparison below proves nothing.
    assert min(agreement["native"]) < 1.0, agreement
    assert agreement["replay"] == [1.0] * len(outs), agreement
    assert np.mean(gaps["replay"]) < np.mean(gaps["native"]), gaps
