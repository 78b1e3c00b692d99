"""The engine: a scheduler and a model runner driven one step at a time, one batch ahead.

``step()`` is the data flow::

    schedule N+1 -> prepare inputs -> run (forward, logits) -> sample -> advance N+1
                 -> wait for batch N's tokens -> postprocess N

Pipelining: batch N+1 is scheduled, prepared and launched while batch N still runs on the
device, so the host work of a step (scheduling, staging, attention planning, launches, then
applying the previous tokens and building outputs) overlaps the device's work instead of
adding to it. Nothing on the way to the launch waits for the device: N+1's sampled tokens
stay on the device and their copy to the host is started (``runner.sample_async``); the
scheduler appends placeholders for them (``Scheduler.advance``), and N+1's decode entries,
which feed N's tokens, get them on the device from N's sampled ids (``runner.prepare(batch,
previous)``). Then the step waits for N's tokens, and ``postprocess`` fills the placeholders
and applies the stop rules (dropping the placeholder a stopped sequence got in N+1).

The batches are those of a synchronous step (``pipelined=False``: launch, then wait for that
batch at once), and so are all outputs, bit for bit, unless a sequence stops on a stop token
(the lookahead has scheduled it once more; the result is dropped) or the KV cache is full (a
finishing sequence keeps its blocks until its last token arrives, one schedule longer, which
can change a preemption). Then tokens (greedy and seeded), finish reasons and routed-expert
rows are still the same, logprobs equal up to the float rounding of a differently composed
batch, and unseeded samples (keyed by batch row) may differ.
One batch is in flight between two steps (``has_unfinished`` counts it); ``update_weights``,
``sleep`` and ``shutdown`` wait for it.

A step that raises (a model layer's error, non-finite logits, a ``KeyboardInterrupt``) first
drops every unfinished request (``abort_all``): the batch scheduled and the one in flight are
discarded (the device finishes them; later batches run after them on the same stream), every KV
block is freed and the prefix cache forgotten (the failed step may have left registered blocks
half-written), the routing store files its pending rows. Then the exception propagates, and the
next request is served as by a fresh engine with the same weights (tokens, logprobs and rows of
greedy and seeded requests; unseeded ones draw on from the engine's generator).

Non-finite logits. The sampler marks a row whose final logits hold a NaN or an inf with a NaN
logprob (``rollout.sampler``), decided on the device; it reaches the host with the tokens the
step waits for anyway, and a marked row of an unfinished request raises
``NonFiniteLogitsError`` naming the request: never silent garbage tokens.

Routed-expert capture rides along inside the step without a stage of its own: the runner and
the scheduler are handed the engine's one capture object (``self.capture``: a
``RoutingRecorder`` with ``capture_routing=True``, else ``CaptureOff``), and a finished request's
output takes the rows capture left on its sequence. The story: ``rollout.capture``.

``data_parallel_mode="dp_attention"`` (``config.dp_attention``): this engine is one rank of a
``torch.distributed`` group; its model holds only this rank's slice of the experts and its
runner gets a ``NaiveDispatch`` (``rollout.engine.expert_parallel``), so its MoE layers run over
the tokens of all ranks and compute that slice. Every forward is then collective: the ranks
build their engines together and step in lockstep, a rank without work running
``runner.run_idle()`` (``rollout.engine.data_parallel`` drives this). Such an engine steps
synchronously: a pipelined step without a new batch would skip a collective forward, and each
lockstep round waits for the device anyway.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from rollout.capture import CaptureOff, ReaderSpec, RoutingCapture, RoutingRecorder, shm
from rollout.config import EngineConfig, EngineState, check_int
from rollout.engine.expert_parallel import MoEParallelConfig, NaiveDispatch
from rollout.engine.model_runner import ModelRunner
from rollout.engine.scheduler import ScheduledBatch, Scheduler
from rollout.engine.sequence import Sequence as EngineSequence
from rollout.loader import load_checkpoint
from rollout.outputs import EngineStats, RequestOutput, RoutingSpec
from rollout.sampler import SampledTokens
from rollout.sampling_params import SamplingParams

__all__ = ["LLMEngine", "NonFiniteLogitsError", "check_device"]

logger = logging.getLogger(__name__)


# Spaces the ranks' sampling seeds apart (a prime, so nearby engine seeds do not collide).
_RANK_SEED_STRIDE = 1_000_003


def check_device(device: str | None, *, ranks: int = 1) -> None:
    """Raise ValueError when ``device`` (an ``EngineConfig.device``) asks for CUDA that this
    process cannot use: no CUDA at all, ``cuda:N`` past the devices, or fewer devices than
    ``ranks`` (data-parallel ranks on CUDA take one each; ``None`` means CUDA where it is
    available)."""
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return
    if not torch.cuda.is_available():
        reason = "no CUDA device found" if torch.backends.cuda.is_built() else "built without CUDA"
        raise ValueError(
            f"device: expected 'cpu' or None on this machine (torch {torch.__version__}: "
            f"{reason}), got {device!r}"
        )
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2]) if device is not None and ":" in device else 0
    if index >= count:
        raise ValueError(f"device: expected 'cuda' or 'cuda:N' with N < {count}, got {device!r}")
    if ranks > count:
        raise ValueError(
            f"data_parallel_size: expected at most {count} ranks on CUDA (one device each; "
            f"device='cpu' runs them on the CPU), got {ranks}"
        )


class NonFiniteLogitsError(ValueError):
    """The final logits of a request's sampled row held a NaN or an inf.

    Attributes:
        request_id: the request (``add_request``'s id on the engine that raised).
        dp_rank: the data-parallel rank of that engine.
    """

    def __init__(self, message: str, request_id: int, dp_rank: int) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.dp_rank = dp_rank

    def __reduce__(self):  # through a data-parallel rank's pipe
        return type(self), (str(self), self.request_id, self.dp_rank)


class _InFlight(NamedTuple):
    """A launched batch and its sampled tokens, on their way to the host."""

    batch: ScheduledBatch
    sampled: SampledTokens


class LLMEngine:
    """Loads a checkpoint and generates for the requests added to it, step by step.

    Args:
        config: the engine settings (``rollout.LLM``'s keyword arguments).
        instance_id: names this engine's shared-memory segments
            (``rollout.capture.shm.segment_name(instance_id, dp_rank)``); None draws a fresh one.
        dp_rank: this engine's data-parallel rank (its capturer's slice of a DP batch); with
            ``config.dp_attention`` also its rank in the default process group, which must be
            initialized with ``data_parallel_size`` ranks that build their engines at the same
            time (the memory profile's forward is collective).
        pipelined: launch each step's batch before waiting for the previous one's tokens (see
            the module docstring); None: unless ``config.dp_attention``, which needs
            synchronous steps. False is the synchronous reference (same outputs).

    Attributes:
        config, state (KV blocks, context length, eos ids), runner, scheduler,
        tokenizer (``tokenizers.Tokenizer`` or None), routing_spec, vocab_size, instance_id,
        dp_rank, capture (``rollout.capture.RoutingCapture``: the ``RoutingRecorder`` with
        ``capture_routing``, else ``CaptureOff``), pipelined.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        instance_id: str | None = None,
        dp_rank: int = 0,
        pipelined: bool | None = None,
    ) -> None:
        check_device(config.device)
        self.instance_id = shm.new_instance_id() if instance_id is None else instance_id
        self.dp_rank = check_int("dp_rank", dp_rank, minimum=0)
        if pipelined is None:
            pipelined = not config.dp_attention
        if not isinstance(pipelined, bool):
            raise TypeError(f"pipelined: expected None or a bool, got {type(pipelined).__name__}")
        if pipelined and config.dp_attention:
            raise ValueError(
                "pipelined: expected None or False with data_parallel_mode='dp_attention' "
                "(its ranks step in lockstep), got True"
            )
        self.pipelined = pipelined
        self._in_flight: _InFlight | None = None
        # Checks the id's characters before anything is loaded.
        segment = shm.segment_name(self.instance_id, self.dp_rank)
        checkpoint = load_checkpoint(
            config.model,
            dtype=config.dtype,
            device=config.device,
            load_format=config.load_format,
            seed=config.seed,
            parallel=MoEParallelConfig.of_rank(config, self.dp_rank),
            deterministic=config.deterministic,
        )
        model = checkpoint.model
        max_model_len = config.resolve_max_model_len(checkpoint.hf_config.max_position_embeddings)
        self.config = config
        self.routing_spec = RoutingSpec.from_model(model.moe_layers, model.routing_params)
        # The capture buffer exists before the runner: it is a static input of its CUDA graphs
        # and counts in its memory profile.
        self.capture: RoutingCapture = (
            RoutingRecorder(
                self.routing_spec,
                max_num_tokens=config.max_num_batched_tokens,
                device=checkpoint.device,
                dp_rank=self.dp_rank,
            )
            if config.capture_routing
            else CaptureOff()
        )
        self.runner = ModelRunner(
            config,
            checkpoint,
            max_model_len=max_model_len,
            capture=self.capture,
            # Data-parallel ranks share the weights' seed but not the sampling stream:
            # otherwise the same unseeded prompt on two ranks would draw the same answer.
            sampler_seed=config.seed + self.dp_rank * _RANK_SEED_STRIDE,
            dispatch=NaiveDispatch.of_rank(
                config,
                self.dp_rank,
                num_experts=model.routing_params.num_experts,
                device=checkpoint.device,
            ),
        )
        self.state = EngineState(
            num_kv_blocks=self.runner.num_kv_blocks,
            max_model_len=max_model_len,
            eos_token_ids=checkpoint.eos_token_ids,
        )
        self.capture.open_store(
            name=segment, num_kv_slots=self.runner.num_kv_blocks * config.block_size
        )
        self.scheduler = Scheduler(config, self.state, capture=self.capture)
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
            segment if config.capture_routing else "off",
        )

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; return its id.

        Raises:
            ValueError: an empty prompt, a token id outside the vocabulary, prompt +
                ``max_tokens`` beyond ``max_model_len`` (or the KV cache),
                ``return_routed_experts`` without ``capture_routing``, or
                ``routed_experts_start`` beyond the prompt.
            RuntimeError: the engine is asleep.
        """
        self._check_awake("add_request")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.return_routed_experts and not self.config.capture_routing:
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
        """Whether any request is waiting or running, or a batch is in flight (``step``
        until it is False)."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Launch the next batch, then apply the previous one's tokens; return the outputs of
        the requests that finished.

        Raises:
            RuntimeError: the engine is asleep.
            NonFiniteLogitsError: the logits a request sampled from were not finite.
            Whatever else a step raises. Every unfinished request is then dropped first
            (``abort_all``): the engine is ready for new requests.
        """
        self._check_awake("step")
        try:
            batch = self.scheduler.schedule()  # N+1, built while batch N runs on the device
            launched = None if batch is None else self._launch(batch)
            previous, self._in_flight = self._in_flight, launched
            finished = self._complete(previous)  # waits for batch N's tokens
            if not self.pipelined:
                finished += self._drain()
            return [self._output(seq) for seq in finished]
        except BaseException:
            self.abort_all()
            raise

    def abort_all(self) -> None:
        """Drop every unfinished request (reason "abort", no output) and the batch in flight,
        free every KV block and forget the prefix cache (``Scheduler.abort_all``); the routing
        store files its pending rows. What a failed step does before it raises."""
        self._in_flight = None
        self.scheduler.abort_all()
        self.capture.commit()

    def _launch(self, batch: ScheduledBatch) -> _InFlight:
        """Enqueue ``batch`` on the device without waiting for it: its inputs (placeholders
        from the batch in flight's sampled ids), forward and sampling; the scheduler then
        counts its tokens as placeholders."""
        previous = None if self._in_flight is None else self._in_flight.sampled
        inputs = self.runner.prepare(batch, previous)
        sampled = self.runner.sample_async(self.runner.run(inputs), inputs)
        self.scheduler.advance(batch)
        return _InFlight(batch, sampled)

    def _complete(self, step: _InFlight | None) -> list[EngineSequence]:
        """Wait for a launched batch's tokens and apply them; the sequences that finished."""
        if step is None:
            return []
        token_ids, logprobs = step.sampled.tolist()
        if any(map(math.isnan, logprobs)):
            self._raise_non_finite(step.batch, logprobs)
        return self.scheduler.postprocess(step.batch, token_ids, logprobs)

    def _raise_non_finite(self, batch: ScheduledBatch, logprobs: list[float]) -> None:
        """Raise for the first row the sampler marked (a NaN logprob) whose request is still
        unfinished (a finished one's row is dropped anyway)."""
        for row, logprob in enumerate(logprobs):
            seq = batch.entries[batch.sample_indices[row]].seq
            if math.isnan(logprob) and not seq.is_finished:
                rank = (
                    f" of data parallel rank {self.dp_rank}"
                    if self.config.data_parallel_size > 1
                    else ""
                )
                raise NonFiniteLogitsError(
                    f"logits: expected finite final logits for request {seq.seq_id}{rank} (its "
                    f"generated token {seq.num_resolved_tokens - seq.num_prompt_tokens}), got "
                    "NaN or inf in the row it samples from: a non-finite weight or activation",
                    request_id=seq.seq_id,
                    dp_rank=self.dp_rank,
                )

    def _drain(self) -> list[EngineSequence]:
        """Complete the batch in flight, if any (the device is then done with it)."""
        step, self._in_flight = self._in_flight, None
        return self._complete(step)

    def _output(self, seq: EngineSequence) -> RequestOutput:
        text = None if self.tokenizer is None else self.tokenizer.decode(seq.generated_token_ids)
        return RequestOutput.from_sequence(seq, text=text, routed_experts=seq.routed_experts)

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
        self._drain()  # a batch of finished requests may still read the weights
        try:
            return self.runner.update_weights(named_tensors)
        finally:
            self.scheduler.block_manager.reset_prefix_cache()

    # ------------------------------------------------------------------ sleep

    @property
    def is_sleeping(self) -> bool:
        """Whether ``sleep`` released the KV cache (until ``wake_up``)."""
        return self.runner.is_sleeping

    def sleep(self) -> None:
        """Release the KV cache, the CUDA graphs and the attention workspaces
        (``ModelRunner.sleep``) and forget the prefix cache (its KV is gone). The weights stay,
        so ``update_weights`` works while asleep; so does the routing store: the rows of
        finished requests stay readable. A no-op when already asleep.

        Raises:
            RuntimeError: a request is unfinished (its KV would be lost).
        """
        unfinished = self.scheduler.num_unfinished
        if unfinished:
            raise RuntimeError(f"sleep: expected no unfinished requests, got {unfinished}")
        if self.is_sleeping:
            return
        self._drain()  # a batch of finished requests may still use the KV cache
        # File the last step's rows now: the store is read by slot while we sleep.
        self.capture.commit()
        self.scheduler.block_manager.reset_prefix_cache()
        self.runner.sleep()

    def wake_up(self) -> None:
        """Reallocate the KV cache (same number of blocks, empty prefix cache) and recapture the
        CUDA graphs (``ModelRunner.wake_up``). A no-op when awake."""
        self.runner.wake_up()

    def _check_awake(self, name: str) -> None:
        if self.runner.is_sleeping:
            raise RuntimeError(f"{name}: engine is asleep: call wake_up()")

    @property
    def parameter_names(self) -> frozenset[str]:
        """The model's parameter names: what a full ``update_weights`` writes."""
        return frozenset(name for name, _ in self.runner.model.named_parameters())

    @property
    def routing_reader_spec(self) -> ReaderSpec | None:
        """How a ``rollout.capture.RoutedExpertsReader`` in another process on this node
        attaches to this engine's routing store; None without ``capture_routing``."""
        return self.capture.reader_spec()

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
        try:
            self._drain()  # the device finishes the last batch before its memory goes
        finally:
            self.runner.shutdown()
            self.capture.close()
