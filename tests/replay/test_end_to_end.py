"""End to end on CPU: rollout.LLM captures routing, the HF model replays it (R3).

The trainer's copy of the policy gets its router weights perturbed, standing in for the
training/inference mismatch that R3 exists for (different kernels, precisions, a policy a
step ahead). Without replay its routers pick other experts on some rows; with replay every
experts module receives exactly the rollout's ids and the logprob gap to the rollout shrinks.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import replay
from rollout import LLM, SamplingParams
from rollout.testing import make_tiny_moe


# Enough tokens that the comparison is not decided by noise: with these sizes and a 20% router
# perturbation, replayed / native KL measured 0.49 median, 0.64 worst over 40 seeds.
NUM_PROMPTS, NEW_TOKENS, ROUTER_NOISE = 6, 24, 0.2


@pytest.mark.slow
def test_rollout_capture_replayed_in_hf_model(tmp_path, rng):
    path = make_tiny_moe("qwen3_moe", tmp_path / "model", seed=int(rng.initial_seed() % 1000))
    prompts = [
        torch.randint(3, 300, (4 + 2 * i,), generator=rng).tolist() for i in range(NUM_PROMPTS)
    ]
    with LLM(path, device="cpu", capture_routing=True, kv_cache_blocks=128, block_size=4) as llm:
        sampling = SamplingParams(
            max_tokens=NEW_TOKENS,
            temperature=1.0,
            seed=3,
            ignore_eos=True,
            return_routed_experts=True,
        )
        outs = llm.generate(prompts, sampling, use_tqdm=False)
        spec = llm.routing_spec
    samples = [
        replay.RolloutSample.from_output(o, moe_layers=spec.moe_layers, num_experts=spec.num_experts)
        for o in outs
    ]

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ctl = replay.patch(model)
    exact = replay.measure_mismatch(model, ctl, samples, replay=False)
    assert exact.router_agreement == 1.0 and exact.kl_k3 < 1e-8, exact

    with torch.no_grad():  # the trainer's routers drift away from the rollout's
        for layer in ctl.layers:
            weight = layer.router.weight
            weight.mul_(1 + ROUTER_NOISE * torch.randn(weight.shape, generator=rng))
    native = replay.measure_mismatch(model, ctl, samples, replay=False)
    replayed = replay.measure_mismatch(model, ctl, samples, replay=True)

    # The perturbation must actually move routing, or the comparison below proves nothing.
    assert native.router_agreement < 1.0, native
    assert replayed.router_agreement == 1.0, replayed
    assert replayed.kl_k3 < native.kl_k3, (native, replayed)
    assert replayed.tokens == native.tokens == sum(len(o.token_ids) for o in outs)
