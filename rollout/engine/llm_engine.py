"""The engine: a scheduler and a model runner driven one step at a time.

``step()`` is the data flow, one line per stage::

    schedule -> prepare inputs -> run (forward, logits) -> sample -> postprocess

Routed-expert capture (issue 4) rides along inside it without a stage of its own: its device
buffer is a static input of the runner (``ModelRunner(routing_capture=...)``), the runner's
``after_forward`` hook enqueues the asynchronous copy of a step's rows, the scheduler's
``on_preempt`` hook saves a preempted sequence's rows, and ``_output`` attaches a finished
request's rows to its ``RequestOutput``. Until then ``capture_routing=True`` is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from rollout.config import EngineConfig, EngineState
from rollout.engine.model_runner import ModelRunner
from rollout.engine.scheduler import Scheduler
from rollout.engine.sequence import Sequence as EngineSequence
from rollout.loader import load_checkpoint
from rollout.outputs import EngineStats, RequestOutput, RoutingSpec
from rollout.sampling_params import SamplingParams

__all__ = ["LLMEngine"]

logger = logging.getLogger(__name__)


class LLMEngine:
    """Loads a checkpoint and generates for the requests added to it, step by step.

    Args:
        config: the engine settings (``rollout.LLM``'s keyword arguments).

    Attributes:
        config, state (KV blocks, context length, eos ids), runner, scheduler,
        tokenizer (``tokenizers.Tokenizer`` or None), routing_spec, vocab_size.
    """

    def __init__(self, config: EngineConfig) -> None:
        if config.capture_routing:
            raise NotImplementedError(
                "capture_routing: routed-expert capture is not available yet (issue 4); "
                "expected False, got True"
            )
        checkpoint = load_checkpoint(
            config.model,
            dtype=config.dtype,
            device=config.device,
            load_format=config.load_format,
            seed=config.seed,
        )
        model = checkpoint.model
        max_model_len = config.resolve_max_model_len(checkpoint.hf_config.max_position_embeddings)
        self.config = config
        self.runner = ModelRunner(config, checkpoint, max_model_len=max_model_len)
        self.state = EngineState(
            num_kv_blocks=self.runner.num_kv_blocks,
            max_model_len=max_model_len,
            eos_token_ids=checkpoint.eos_token_ids,
        )
        self.scheduler = Scheduler(config, self.state)
        self.tokenizer = checkpoint.tokenizer
        self.vocab_size = model.args.vocab_size
        self.routing_spec = RoutingSpec.from_model(model.moe_layers, model.routing_params)
        logger.info(
            "engine ready: %s on %s in %s, max_model_len %d, %d KV blocks, CUDA graphs: %s",
            model.architecture,
            checkpoint.device,
            checkpoint.dtype,
            max_model_len,
            self.runner.num_kv_blocks,
            self.runner.graph_sizes or "off",
        )

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; return its id.

        Raises:
            ValueError: an empty prompt, a token id outside the vocabulary, prompt +
                ``max_tokens`` beyond ``max_model_len`` (or the KV cache), or
                ``return_routed_experts`` without capture.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.return_routed_experts:
            raise ValueError(
                "return_routed_experts: expected False, routed-expert capture is not "
                "available yet (issue 4), got True"
            )
        if prompt_token_ids and not all(0 <= t < self.vocab_size for t in prompt_token_ids):
            bad = next(t for t in prompt_token_ids if not 0 <= t < self.vocab_size)
            raise ValueError(
                f"prompt_token_ids: expected token ids in [0, {self.vocab_size}), got {bad}"
            )
        return self.scheduler.add(prompt_token_ids, params).seq_id

    def abort_request(self, request_id: int) -> None:
        """Finish a request with reason "abort" (nothing if it already finished)."""
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of the requests that finished in it."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        inputs = self.runner.prepare(batch)
        logits_SV = self.runner.run(inputs)
        token_ids, logprobs = self.runner.sample(logits_SV, inputs)
        finished = self.scheduler.postprocess(batch, token_ids, logprobs)
        return [self._output(seq) for seq in finished]

    def _output(self, seq: EngineSequence) -> RequestOutput:
        text = None if self.tokenizer is None else self.tokenizer.decode(seq.generated_token_ids)
        return RequestOutput.from_sequence(seq, text=text)

    # ------------------------------------------------------------------ weights, state

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the model in place and forget the prefix cache.

        Returns the names of the model parameters written completely.

        Raises:
            RuntimeError: a request is unfinished (its KV would mix old and new weights).
            ValueError: an unknown parameter name or a mis-shaped tensor (tensors before it
                were copied; the prefix cache is reset anyway).
        """
        unfinished = self.scheduler.num_unfinished
        if unfinished:
            raise RuntimeError(f"update_weights: expected no unfinished requests, got {unfinished}")
        try:
            return self.runner.update_weights(named_tensors)
        finally:
            self.scheduler.block_manager.reset_prefix_cache()

    @property
    def stats(self) -> EngineStats:
        """The engine's counters."""
        bm = self.scheduler.block_manager
        return EngineStats(
            num_kv_blocks=bm.num_blocks,
            block_size=bm.block_size,
            max_model_len=self.state.max_model_len,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            cuda_graph_sizes=tuple(self.runner.graph_sizes),
        )

    def shutdown(self) -> None:
        """Abort unfinished requests and release the KV cache and CUDA graphs."""
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            self.scheduler.abort(seq.seq_id)
        self.runner.shutdown()
