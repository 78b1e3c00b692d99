"""Single-device MoE model implementations over a paged KV cache, one file per HF family."""
