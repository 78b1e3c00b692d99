"""``rollout.LLM``: the user-facing generation API over one ``LLMEngine``.

::

    with rollout.LLM("path/to/checkpoint") as llm:
        outs = llm.generate(["The answer is"], rollout.SamplingParams(max_tokens=32))
        outs[0].token_ids, outs[0].logprobs, outs[0].text
        llm.update_weights(trainer_model.named_parameters())   # between generate calls

A trainer on the same GPU gets the KV cache's memory back between rollouts::

    llm.sleep()                     # KV cache, CUDA graphs, attention workspaces released
    ...train...
    llm.update_weights(weights)     # works while asleep: the weights are kept
    llm.wake_up()                   # same KV cache size, graphs captured again
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf
from typing import Any, Self

import numpy as np
import torch
from tqdm.auto import tqdm

from rollout.capture import ReaderSpec
from rollout.config import EngineConfig
from rollout.engine.data_parallel import DataParallelEngine
from rollout.engine.llm_engine import LLMEngine, NonFiniteLogitsError
from rollout.hub import resolve_model
from rollout.outputs import EngineStats, RequestOutput, RoutingSpec
from rollout.sampling_params import SamplingParams

__all__ = ["LLM"]

logger = logging.getLogger(__name__)

Prompt = str | SequenceOf[int] | np.ndarray


class LLM:
    """Generate with an HF-format MoE checkpoint.

    Args:
        model: the checkpoint folder (config.json, *.safetensors, optional tokenizer.json), or
            a Hugging Face Hub id (``"org/name"``) resolved through the Hugging Face cache
            (``rollout.hub.resolve_model``: downloaded when missing, unless HF_HUB_OFFLINE).
        revision: a Hub id's branch, tag or commit hash (None: ``main``).
        dtype: ``"auto"`` (the checkpoint's dtype on CUDA, float32 on CPU), ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or a torch dtype.
        device: None (CUDA when available, else CPU), ``"cpu"``, ``"cuda[:N]"`` or a
            torch device.
        max_num_seqs: most sequences generated at once.
        max_num_batched_tokens: most tokens fed forward in one step (chunked prefill budget).
        max_model_len: longest prompt + generation; None: the model's maximum.
        block_size: tokens per KV block.
        kv_cache_blocks: fix the number of KV blocks (else sized from memory: see
            ``rollout.engine.kv_cache``).
        gpu_memory_utilization: fraction of GPU memory for weights, activations and KV cache.
        enable_prefix_caching: reuse the KV of prompt prefixes seen before.
        enforce_eager: no CUDA graphs.
        seed: seeds dummy weights and the sampling of requests without their own seed.
        load_format: ``"safetensors"`` or ``"dummy"`` (random weights from config.json).
        capture_routing: record each token's routed experts (a device buffer the routing
            kernels write and a shared-memory store, ``rollout.capture``), so that
            requests with ``SamplingParams(return_routed_experts=True)`` get them in
            ``RequestOutput.routed_experts``. Off: nothing of it is allocated.
        data_parallel_size: engine ranks. 1: the engine runs in this process. N > 1: N rank
            processes (``rollout.engine.data_parallel``), one GPU each on CUDA; requests are
            spread across them and each output carries the rows of the rank that served it.
        data_parallel_mode: ``"replicas"`` (independent engines) or ``"dp_attention"``
            (attention per rank on its own requests; the MoE layers all-gather the tokens of
            all ranks, each rank computes ``num_experts / N`` experts, a reduce-scatter sums
            them: expert parallelism; ``num_experts`` must be a multiple of N). The ranks step
            in lockstep and run eager (``enforce_eager`` is implied: no CUDA graphs). Outputs
            and routed-expert rows are those of a single-rank engine either way.
        deterministic: the true on-policy mode: batch-invariant numerics, so a request's tokens
            and logprobs do not depend on what else is batched with it, how its prefill was
            chunked, prefix-cache hits or recompute after preemption, and equal bit for bit
            those the policy of ``rollout.load_policy(..., deterministic=True)`` computes on
            the same tokens and weights (with ``replay`` R3 on its side).

    Raises:
        ValueError / TypeError: a bad argument, naming it.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        revision: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_blocks: int | None = None,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        seed: int = 0,
        load_format: str = "safetensors",
        capture_routing: bool = False,
        data_parallel_size: int = 1,
        data_parallel_mode: str = "replicas",
        deterministic: bool = False,
    ) -> None:
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if isinstance(device, torch.device):
            device = str(device)
        self.config = EngineConfig(
            model=resolve_model(model, revision=revision),
            dtype=dtype,
            device=device,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            block_size=block_size,
            kv_cache_blocks=kv_cache_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            seed=seed,
            load_format=load_format,
            capture_routing=capture_routing,
            data_parallel_size=data_parallel_size,
            data_parallel_mode=data_parallel_mode,
            deterministic=deterministic,
        )
        self._engine: LLMEngine | DataParallelEngine | None = (
            LLMEngine(self.config) if data_parallel_size == 1 else DataParallelEngine(self.config)
        )

    # ------------------------------------------------------------------ properties

    @property
    def engine(self) -> LLMEngine | DataParallelEngine:
        """The engine, or the front end of the ranks with ``data_parallel_size`` > 1
        (RuntimeError after ``shutdown``)."""
        if self._engine is None:
            raise RuntimeError("LLM: expected a live engine, got one that was shut down")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's ``tokenizers.Tokenizer``, or None."""
        return self.engine.tokenizer

    @property
    def routing_spec(self) -> RoutingSpec:
        """MoE layers, experts, top-k and routing method of the model."""
        return self.engine.routing_spec

    @property
    def parameter_names(self) -> frozenset[str]:
        """The engine model's parameter names (the same on every data-parallel rank): the set
        ``update_weights`` returns when it was given every weight."""
        return self.engine.parameter_names

    @property
    def routing_reader_spec(self) -> ReaderSpec | None:
        """How a ``rollout.capture.RoutedExpertsReader`` in another process on this node (a
        trainer) attaches to the routing store; None without ``capture_routing``. With
        ``data_parallel_size`` > 1 there is a store per rank: see ``routing_reader_specs``."""
        return self.engine.routing_reader_spec

    @property
    def routing_reader_specs(self) -> tuple[ReaderSpec, ...]:
        """One ``ReaderSpec`` per DP rank, in rank order; empty without ``capture_routing``."""
        engine = self.engine
        if isinstance(engine, DataParallelEngine):
            return engine.routing_reader_specs
        spec = engine.routing_reader_spec
        return () if spec is None else (spec,)

    @property
    def stats(self) -> EngineStats:
        """KV cache size, preemptions and prefix-cache counters so far."""
        return self.engine.stats

    @property
    def is_sleeping(self) -> bool:
        """Whether ``sleep`` released the KV cache (until ``wake_up``)."""
        return self.engine.is_sleeping

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: SequenceOf[Prompt],
        sampling: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in the order of ``prompts``.

        Args:
            prompts: strings (encoded with the checkpoint's tokenizer) or token-id lists.
            sampling: one ``SamplingParams`` for all prompts, one per prompt, or None
                (``SamplingParams()``).
            use_tqdm: show a progress bar over finished requests.

        Raises:
            ValueError: an empty prompt, a token id outside the vocabulary, a string without
                a tokenizer, prompt + ``max_tokens`` beyond ``max_model_len``, or a sampling
                list whose length differs from the prompts'. Nothing is generated then.
            RuntimeError: the engine is asleep (``sleep``).
            NonFiniteLogitsError (a ValueError): ``prompts[i]: logits: ...``: the final logits
                request ``i`` sampled from held a NaN or an inf (a broken weight or activation).

        Whatever a step raises (that, a model error, a ``KeyboardInterrupt``) drops every
        request of the call; the engine then serves the next call like a fresh one with the
        same weights (``rollout.engine.llm_engine``).
        """
        engine = self.engine
        if engine.is_sleeping:
            raise RuntimeError("generate: engine is asleep: call wake_up()")
        token_ids = [self._encode(i, prompt) for i, prompt in enumerate(self._as_list(prompts))]
        params = self._sampling_list(sampling, len(token_ids))
        if isinstance(engine, DataParallelEngine):
            return engine.generate(token_ids, params, use_tqdm=use_tqdm)
        request_ids: list[int] = []
        try:
            for i, (tokens, p) in enumerate(zip(token_ids, params, strict=True)):
                try:
                    request_ids.append(engine.add_request(tokens, p))
                except ValueError as exc:
                    raise ValueError(f"prompts[{i}]: {exc}") from exc
            outputs: dict[int, RequestOutput] = {}
            with tqdm(
                total=len(request_ids),
                desc="generate",
                unit="req",
                disable=not use_tqdm,
            ) as bar:
                steps = 0
                while len(outputs) < len(request_ids):
                    for out in engine.step():
                        outputs[out.request_id] = out
                        bar.update(1)
                    # Requests of one batch tend to finish together: the step count shows
                    # progress in between (update(0) redraws at most every mininterval).
                    steps += 1
                    bar.set_postfix_str(f"step {steps}", refresh=False)
                    bar.update(0)
        except NonFiniteLogitsError as exc:
            index = request_ids.index(exc.request_id)
            raise NonFiniteLogitsError(
                f"prompts[{index}]: {exc}", exc.request_id, exc.dp_rank
            ) from exc
        except BaseException:
            for request_id in request_ids:
                engine.abort_request(request_id)
            raise
        return [outputs[i] for i in request_ids]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors (e.g. a trainer's ``named_parameters()``) into the model in
        place: no reallocation, CUDA graphs stay valid, the prefix cache is reset.

        Returns the names of the model parameters written completely.

        Raises:
            RuntimeError: called while requests are unfinished.
            ValueError: an unknown name or a mis-shaped tensor.
        """
        return self.engine.update_weights(named_tensors)

    def sleep(self) -> None:
        """Release the KV cache, the CUDA graphs and the attention workspaces (on every DP rank)
        and return the memory to the device, e.g. while a trainer on the same GPU runs. The
        weights stay (``update_weights`` works while asleep), and so does the routing store
        (rows of finished requests stay readable); the prefix cache is forgotten. ``generate``
        raises until ``wake_up``. A no-op when already asleep.

        Raises:
            RuntimeError: called while requests are unfinished.
        """
        self.engine.sleep()

    def wake_up(self) -> None:
        """Reallocate the KV cache with the same number of blocks and capture the CUDA graphs
        again; outputs are then what they were before ``sleep`` (with the same weights). A
        no-op when awake."""
        self.engine.wake_up()

    def shutdown(self) -> None:
        """Release the KV cache, CUDA graphs and model (idempotent)."""
        if self._engine is None:
            return
        self._engine.shutdown()
        self._engine = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ input checks

    @staticmethod
    def _as_list(prompts: SequenceOf[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (SequenceOf, np.ndarray)):
            raise TypeError(
                "prompts: expected a list of str or of token-id lists, "
                f"got {type(prompts).__name__}"
            )
        return list(prompts)

    def _encode(self, index: int, prompt: Prompt) -> list[int]:
        name = f"prompts[{index}]"
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError(
                    f"{name}: expected token ids, the checkpoint has no tokenizer "
                    f"(tokenizer.json), got a str"
                )
            tokens = self.engine.tokenizer.encode(prompt).ids
        elif isinstance(prompt, (SequenceOf, np.ndarray)) and not isinstance(prompt, bytes):
            tokens = list(prompt)
            for token in tokens:
                if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                    raise TypeError(
                        f"{name}: expected int token ids, got {type(token).__name__} {token!r}"
                    )
            tokens = [int(t) for t in tokens]
        else:
            raise TypeError(
                f"{name}: expected a str or a list of token ids, got {type(prompt).__name__}"
            )
        if not tokens:
            raise ValueError(f"{name}: expected at least 1 token, got 0")
        vocab = self.engine.vocab_size
        low, high = min(tokens), max(tokens)
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: expected token ids in [0, {vocab}), got {bad}")
        return tokens

    @staticmethod
    def _sampling_list(
        sampling: SamplingParams | SequenceOf[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if sampling is None:
            return [SamplingParams()] * count
        if isinstance(sampling, SamplingParams):
            return [sampling] * count
        if not isinstance(sampling, SequenceOf):
            raise TypeError(
                "sampling: expected SamplingParams or a list of them, "
                f"got {type(sampling).__name__}"
            )
        if len(sampling) != count:
            raise ValueError(
                f"sampling: expected one SamplingParams per prompt ({count}), got {len(sampling)}"
            )
        for i, p in enumerate(sampling):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling[{i}]: expected SamplingParams, got {type(p).__name__}")
        return list(sampling)
