"""Building blocks of the rollout models: paged attention and its backends, the K/V store,
RoPE, RMSNorm, linear and MLP layers, and the sparse MoE block."""
