"""The engine: a scheduler and a model runner driven one step at a time.

``step()`` is the data flow, one line per stage::

    schedule -> prepare inputs -> run (forward, logits) -> sample -> postprocess

Routed-expert capture (``capture_routing=True``, ``rollout.engine.routing``) rides along
inside it without a stage of its own: its device buffer is a static input of the runner
(``ModelRunner(routing_capture=...)``), the runner's ``after_forward`` hook enqueues the
asynchronous copy of a step's rows into the shared-memory store, the scheduler's
``on_preempt`` and ``on_finish`` hooks save a sequence's rows before its blocks are freed, and
``_output`` attaches a finished request's rows to its ``RequestOutput``. With capture off none
of it exists: no buffer, no hook, no segment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from rollout import shm
from rollout.capture import ReaderSpec
from rollout.config import EngineConfig, EngineState, check_int
from rollout.engine.model_runner import ModelRunner
from rollout.engine.routing import RoutingRecorder
from rollout.engine.scheduler import Scheduler
from rollout.engine.sequence import Sequence as EngineSequence
from rollout.loader import load_checkpoint
from rollout.outputs import EngineStats, RequestOutput, RoutingSpec
from rollout.sampling_params import SamplingParams

__all__ = ["LLMEngine"]

logger = logging.getLogger(__name__)


# Spaces the ranks' sampling seeds apart (a prime, so nearby engine seeds do not collide).
_RANK_SEED_STRIDE = 1_000_003


class LLMEngine:
    """Loads a checkpoint and generates for the requests added to it, step by step.

    Args:
        config: the engine settings (``rollout.LLM``'s keyword arguments).
        instance_id: names this engine's shared-memory segments
            (``rollout.shm.segment_name(instance_id, dp_rank)``); None draws a fresh one.
        dp_rank: this engine's data-parallel rank (its capturer's slice of a DP batch).

    Attributes:
        config, state (KV blocks, context length, eos ids), runner, scheduler,
        tokenizer (``tokenizers.Tokenizer`` or None), routing_spec, vocab_size, instance_id,
        dp_rank, routing (the ``RoutingRecorder`` with ``capture_routing``, else None).
    """

    def __init__(
        self, config: EngineConfig, *, instance_id: str | None = None, dp_rank: int = 0
    ) -> None:
        self.instance_id = shm.new_instance_id() if instance_id is None else instance_id
        self.dp_rank = check_int("dp_rank", dp_rank, minimum=0)
        # Checks the id's characters before anything is loaded.
        segment = shm.segment_name(self.instance_id, self.dp_rank)
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
        self.routing_spec = RoutingSpec.from_model(model.moe_layers, model.routing_params)
        # The capture buffer exists before the runner: it is a static input of its CUDA graphs
        # and counts in its memory profile.
        routing = (
            RoutingRecorder(
                self.routing_spec,
                max_num_tokens=config.max_num_batched_tokens,
                device=checkpoint.device,
                dp_rank=self.dp_rank,
            )
            if config.capture_routing
            else None
        )
        self.runner = ModelRunner(
            config,
            checkpoint,
            max_model_len=max_model_len,
            routing_capture=None if routing is None else routing.buffer,
            after_forward=None if routing is None else routing.after_forward,
            # Data-parallel ranks share the weights' seed but not the sampling stream:
            # otherwise the same unseeded prompt on two ranks would draw the same answer.
            sampler_seed=config.seed + self.dp_rank * _RANK_SEED_STRIDE,
        )
        self.state = EngineState(
            num_kv_blocks=self.runner.num_kv_blocks,
            max_model_len=max_model_len,
            eos_token_ids=checkpoint.eos_token_ids,
        )
        if routing is not None:
            routing.open_store(
                name=segment, num_kv_slots=self.runner.num_kv_blocks * config.block_size
            )
        self.routing = routing
        self.scheduler = Scheduler(
            config,
            self.state,
            on_preempt=None if routing is None else routing.save_rows,
            on_finish=None if routing is None else routing.save_rows,
        )
        self.tokenizer = checkpoint.tokenizer
        self.vocab_size = model.args.vocab_size
        logger.info(
            "engine ready: %s on %s in %s, max_model_len %d, %d KV blocks, CUDA graphs: %s, "
            "routing capture: %s",
            model.architecture,
            checkpoint.device,
            checkpoint.dtype,
            max_model_len,
            self.runner.num_kv_blocks,
            self.runner.graph_sizes or "off",
            segment if routing is not None else "off",
        )

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; return its id.

        Raises:
            ValueError: an empty prompt, a token id outside the vocabulary, prompt +
                ``max_tokens`` beyond ``max_model_len`` (or the KV cache),
                ``return_routed_experts`` without ``capture_routing``, or
                ``routed_experts_start`` beyond the prompt.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.return_routed_experts and self.routing is None:
            raise ValueError(
                "return_routed_experts: expected False on an engine built with "
                "capture_routing=False (set capture_routing=True to record routed experts), "
                "got True"
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
        routed_experts = (
            self.routing.rows(seq)
            if self.routing is not None and seq.params.return_routed_experts
            else None
        )
        return RequestOutput.from_sequence(seq, text=text, routed_experts=routed_experts)

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
    def routing_reader_spec(self) -> ReaderSpec | None:
        """How a ``rollout.capture.RoutedExpertsReader`` in another process on this node
        attaches to this engine's routing store; None without ``capture_routing``."""
        return None if self.routing is None else self.routing.reader_spec()

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
        """Abort unfinished requests, release the KV cache and CUDA graphs and unlink the
        routing store's segment."""
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            self.scheduler.abort(seq.seq_id)
        self.runner.shutdown()
        if self.routing is not None:
            self.routing.close()
