"""The MoE rollout engine: generation with a paged KV cache and routed-expert capture."""
