"""The training-loop API in a loop of your own: rollout workers on Ray generate with routing
capture, your loss runs on a replay-patched HF model under the rollout's routing (R3), and the
updated weights go back to the workers. CPU, a tiny random model, a toy reward; ~20 seconds.

    python examples/custom_loop.py
"""

import ray
import torch
import transformers

import replay
import rollout
from replay.trainer import RolloutWorkers, group_advantages, policy_loss, token_logprobs
from rollout.testing import make_tiny_moe

path = make_tiny_moe("qwen3_moe", "runs/custom_loop/model")
ray.init()
workers = RolloutWorkers(path, device="cpu", capture_routing=True)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
ctl = replay.patch(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
sampling = rollout.SamplingParams(max_tokens=8, return_routed_experts=True)
for step in range(3):
    batch = workers.generate(["The answer is"] * 8, sampling)  # 1 prompt x 8 answers
    rewards = torch.tensor([len(set(answer)) / 8 for answer in batch.token_ids])  # your reward
    t = batch.to_tensors()
    with ctl.replay(batch.traces, attention_mask=t.attention_mask_BS):  # the rollout's experts
        logits = model(t.input_ids_BS, attention_mask=t.attention_mask_BS).logits
    logp = token_logprobs(logits, t.input_ids_BS)
    loss = policy_loss(logp, logp.detach(), group_advantages(rewards, 8), t.answer_mask_BS).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    workers.update_weights(model.state_dict())
    kl = replay.kl_k3(t.rollout_logp_BS, logp.detach(), t.answer_mask_BS)
    print(f"step {step}: reward {rewards.mean():.3f}, KL(rollout || train) {kl:.2e}")
workers.shutdown()
ray.shutdown()
