"""The model runner: runs the model over scheduled batches, prepare -> run -> sample. Its
pieces have modules of their own: the step's static inputs (``rollout.engine.step_inputs``),
the paged KV cache, sized from a memory profile on CUDA (``rollout.engine.kv_cache``), and the
decode CUDA graphs (``rollout.engine.cuda_graphs``).

Legend: T tokens fed in a step, B sequences in it, S sampling rows, M KV blocks per sequence
(the block-table width), H hidden size, V vocabulary.

One step is three calls, each the engine's line of the same name; none waits for the device,
so the engine launches a step while the previous one still runs (``rollout.engine.llm_engine``):

- ``prepare(batch, previous)`` writes the ``ScheduledBatch`` lists into pinned host buffers,
  copies them into the static device inputs (non-blocking), plans attention once and builds
  the sampling inputs. A decode batch of a captured size is padded to its CUDA-graph bucket
  (padding rows: token 0, position 0, slot -1, length 0, no blocks). The tokens the previous
  step samples are not on the host yet: the batch feeds placeholders there, and ``prepare``
  copies the real tokens from ``previous`` (that step's ``SampledTokens``) into the static
  ``input_ids`` on the device (``batch.placeholder_indices`` / ``placeholder_rows``), before
  the forward on the same stream. The pinned buffers are rewritten only once the previous
  ``prepare``'s copies have run (an event: by then the device is on that step's forward).
- ``run(inputs)`` runs the forward (eager, or the bucket's graph replay), then routed-expert
  capture's ``after_forward`` (``rollout.capture``), and returns the float32 logits of the
  sampling rows only (``batch.logits_indices``).
- ``sample_async(logits, inputs)`` draws the tokens on the device and starts their copy to the
  host: ``SampledTokens.tolist()`` waits for it. ``sample`` does both (tests and tools).

Static inputs live in one place, ``StepBuffers``, the routed-expert capturer (its buffer
[max_num_batched_tokens, L, K], or None) among them: a CUDA graph replays whatever ``prepare``
last wrote there.

``data_parallel_mode="dp_attention"`` (``dispatch``, a
``rollout.engine.expert_parallel.NaiveDispatch`` the runner sets on the model's MoE blocks):
every forward is collective across the ranks.
``prepare`` exchanges the step's token counts first (``dispatch.begin_step``), a rank without
work calls ``run_idle`` (a forward of one padding token, outputs discarded) whenever another
rank steps, and everything runs eager (no CUDA graphs).

Sleep (a trainer colocated on the GPU): ``sleep()`` frees the KV cache, the CUDA graphs and the
attention backend's workspaces and empties the CUDA caching allocator; ``wake_up()`` rebuilds
them, the cache with the same number of blocks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from rollout.capture import CaptureOff
from rollout.config import EngineConfig
from rollout.engine.cuda_graphs import MAX_CUDA_GRAPH_SIZE, DecodeGraphs, cuda_graph_sizes
from rollout.engine.kv_cache import PROFILE_SAMPLING, KVCache, reserved_bytes, return_memory
from rollout.engine.scheduler import ScheduledBatch
from rollout.engine.step_inputs import StepBuffers, StepInputs
from rollout.forward_batch import ForwardBatch
from rollout.layers.attention import (
    AttentionBackend,
    FlashInferAttentionBackend,
    make_attention_backend,
)
from rollout.layers.invariant_attention import InvariantAttentionBackend
from rollout.layers.moe import SparseMoeBlock
from rollout.loader import LoadedCheckpoint
from rollout.sampler import SampledTokens, Sampler

if TYPE_CHECKING:
    from rollout.capture import RoutedExpertsCapturer, RoutingCapture
    from rollout.engine.expert_parallel import NaiveDispatch

__all__ = ["ModelRunner"]

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs a loaded model over scheduled batches (see the module docstring).

    Args:
        config: the engine settings.
        checkpoint: the loaded model (its dtype and device are the runner's).
        max_model_len: the resolved context length.
        capture: routed-expert capture (``rollout.capture.RoutingCapture``; None: off): its
            ``capturer`` (buffer ``[>= max_num_batched_tokens, L, K]`` on the model's device)
            is a static input, and its ``after_forward`` runs with each step's batch right after
            the forward is enqueued, on the current stream (not for the memory-profiling step).
        dispatch: the ``NaiveDispatch`` of a ``dp_attention`` rank (set on every MoE block
            here, before the memory profile), or None.

    Attributes:
        model, backend, sampler, num_kv_blocks, max_blocks_per_seq, kv (the ``KVCache``),
        kv_cache (its tensor), graphs (the ``DecodeGraphs``), graph_sizes (their buckets, empty
        when no CUDA graphs are used), is_sleeping (``sleep`` released the KV cache, graphs and
        backend: ``kv_cache`` and ``backend`` are None until ``wake_up``).
    """

    def __init__(
        self,
        config: EngineConfig,
        checkpoint: LoadedCheckpoint,
        *,
        max_model_len: int,
        capture: RoutingCapture | None = None,
        sampler_seed: int | None = None,
        dispatch: NaiveDispatch | None = None,
    ) -> None:
        self.config = config
        self.model = checkpoint.model
        self.dispatch = dispatch
        for module in self.model.modules():
            if isinstance(module, SparseMoeBlock):
                module.dispatch = dispatch
        self.dtype = checkpoint.dtype
        self.device = checkpoint.device
        self.max_model_len = max_model_len
        self.vocab_size = self.model.args.vocab_size
        self.capture = CaptureOff() if capture is None else capture
        self.max_blocks_per_seq = math.ceil(max_model_len / config.block_size)
        # Naive dispatch changes the collectives' shapes every step: eager only.
        use_graphs = self.device.type == "cuda" and not config.enforce_eager and dispatch is None
        max_graph = min(config.max_num_seqs, config.max_num_batched_tokens, MAX_CUDA_GRAPH_SIZE)
        self.spec = self.model.attention_spec
        # Kept for wake_up, which rebuilds the backend that sleep released.
        self._backend_kwargs = dict(
            block_size=config.block_size,
            dtype=self.dtype,
            device=self.device,
            cuda_graph_max_batch_size=max_graph if use_graphs else 0,
            max_blocks_per_seq=self.max_blocks_per_seq,
        )
        self.backend: AttentionBackend | None = self._make_backend()
        graph_backends = (FlashInferAttentionBackend, InvariantAttentionBackend)
        if use_graphs and not isinstance(self.backend, graph_backends):
            logger.info(
                "no CUDA graphs: the attention backend is %s",
                type(self.backend).__name__,
            )
            use_graphs = False
        self.sampler = Sampler(
            vocab_size=self.vocab_size,
            device=self.device,
            seed=config.seed if sampler_seed is None else sampler_seed,
            deterministic=config.deterministic,
        )
        tokens, seqs = config.max_num_batched_tokens, config.max_num_seqs
        self.buffers = StepBuffers(
            {
                "input_ids": (tokens, torch.int64),
                "positions": (tokens, torch.int64),
                "slot_mapping": (tokens, torch.int64),
                "query_start_loc": (seqs + 1, torch.int32),
                "seq_lens": (seqs, torch.int32),
                "block_tables": (seqs * self.max_blocks_per_seq, torch.int32),
                "logits_indices": (seqs, torch.int64),
                # Placeholder positions in input_ids, then their rows in the previous step's ids.
                "placeholders": (2 * seqs, torch.int64),
            },
            self.device,
            capturer=self._check_capturer(self.capture.capturer),
        )
        # Step state, set before the memory profile (on CUDA it runs a step).
        self.graphs = DecodeGraphs(self.device)
        self.is_sleeping = False
        # The buckets sleep released, recaptured by wake_up.
        self._slept_graph_sizes: list[int] = []
        self.kv = KVCache(
            config,
            self.model,
            dtype=self.dtype,
            device=self.device,
            max_model_len=max_model_len,
            profile_step=self._profile_step,
        )
        self.num_kv_blocks = self.kv.num_blocks
        if use_graphs:
            self._capture_graphs(cuda_graph_sizes(max_graph))

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """The KV cache tensor (None while asleep)."""
        return self.kv.tensor

    @property
    def graph_sizes(self) -> list[int]:
        """The decode batch sizes with a CUDA graph (empty: every step runs eager)."""
        return self.graphs.sizes

    # ------------------------------------------------------------------ the step

    def prepare(self, batch: ScheduledBatch, previous: SampledTokens | None = None) -> StepInputs:
        """Stage ``batch`` into the static inputs, plan attention and build sampling inputs.

        ``previous``: the sampled tokens of the step in flight, which the batch's placeholders
        stand for (required when it has any).
        """
        assert not self.is_sleeping, "prepare: the runner is asleep (wake_up first)"
        self.buffers.wait_reusable()
        if self.dispatch is not None:
            self.dispatch.begin_step(len(batch.input_ids))
        graph_size = self.graphs.bucket(len(batch.entries)) if batch.is_decode else None
        sampling_seqs = [batch.entries[i].seq for i in batch.sample_indices]
        _, logits_indices = self.buffers.stage(
            "logits_indices", batch.logits_indices, len(batch.logits_indices), 0
        )
        forward = self._forward_batch(
            input_ids=batch.input_ids,
            positions=batch.positions,
            slot_mapping=batch.slot_mapping,
            query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens,
            block_tables=batch.block_tables,
            is_decode=batch.is_decode,
            graph_size=graph_size,
        )
        self.buffers.fill_placeholders(batch, forward.input_ids, previous)
        inputs = StepInputs(
            batch=batch,
            forward=forward,
            logits_indices=logits_indices,
            # A placeholder counts as generated: seeded rows get the counter a synchronous
            # step gives them.
            sampling=self.sampler.prepare(
                [seq.params for seq in sampling_seqs],
                [seq.num_generated_tokens for seq in sampling_seqs],
            ),
            graph_size=graph_size,
        )
        self.buffers.mark_staged()
        return inputs

    @torch.no_grad()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The forward of one step, then capture's ``after_forward``; float32 logits [S, V] of
        its sampling rows."""
        hidden_TH = self._forward(inputs)
        self.capture.after_forward(inputs.batch)
        return self._logits(hidden_TH, inputs)

    @torch.no_grad()
    def sample_async(self, logits_SV: torch.Tensor, inputs: StepInputs) -> SampledTokens:
        """Sample one token per sampling row on the device and start copying the ids and
        their logprobs to the host (no synchronisation)."""
        return SampledTokens(*self.sampler(logits_SV, inputs.sampling))

    def sample(self, logits_SV: torch.Tensor, inputs: StepInputs) -> tuple[list[int], list[float]]:
        """Sampled token ids and their logprobs, one per sampling row, as host lists (waits)."""
        return self.sample_async(logits_SV, inputs).tolist()

    @torch.no_grad()
    def run_idle(self) -> None:
        """``dp_attention`` only: a step without work of this rank's while another rank steps.
        Forwards one padding token (token 0, position 0, slot -1: no KV written, length 0) so
        that this rank joins the MoE layers' collectives; the output is discarded, nothing is
        sampled and no hook runs."""
        assert self.dispatch is not None, "run_idle: only a dp_attention rank steps without work"
        assert not self.is_sleeping, "run_idle: the runner is asleep (wake_up first)"
        self.buffers.wait_reusable()
        self.dispatch.begin_step(1)
        forward = self._forward_batch(
            input_ids=[0],
            positions=[0],
            slot_mapping=[-1],
            query_start_loc=[0, 1],
            seq_lens=[0],
            block_tables=[[]],
            is_decode=True,
            graph_size=None,
        )
        self.buffers.mark_staged()
        self.model(forward)

    # ------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the model in place (storage kept: graphs stay valid);
        return the names of the parameters written completely."""
        return self.model.load_weights(named_tensors)

    def shutdown(self) -> None:
        """Drop the CUDA graphs, the KV cache and the attention backend (the engine is unusable
        afterwards)."""
        self._release()

    # ------------------------------------------------------------------ sleep

    def sleep(self) -> None:
        """Release the device memory that ``wake_up`` can rebuild: the KV cache, the CUDA graphs
        (their memory pool with them) and the attention backend (FlashInfer's float workspace,
        each wrapper's index workspace, the graphs' static page-index buffers). The weights, the
        step buffers, the sampler and the routing capture buffer stay. On CUDA the freed memory
        is returned to the device (``torch.cuda.empty_cache``), for a trainer on the same GPU.

        The KV contents are lost: the caller must hold no sequence and forget its prefix cache.
        A no-op when already asleep.
        """
        if self.is_sleeping:
            return
        kv_bytes = 0 if self.kv_cache is None else self.kv_cache.nbytes
        reserved = reserved_bytes(self.device)
        self._slept_graph_sizes = self.graph_sizes
        self._release()
        self.is_sleeping = True
        return_memory(self.device)
        logger.info(
            "asleep: released the KV cache (%.2f GiB), %d CUDA graphs and the attention backend; "
            "%.2f GiB returned to the device",
            kv_bytes / 2**30,
            len(self._slept_graph_sizes),
            (reserved - reserved_bytes(self.device)) / 2**30,
        )

    def wake_up(self) -> None:
        """Rebuild what ``sleep`` released: the attention backend, a zeroed KV cache of the same
        ``num_kv_blocks`` (so the scheduler's block manager stays valid) bound to the model, and
        the CUDA graphs of the same buckets (captured again: the cache and the workspaces have
        new addresses). A no-op when awake.

        Raises:
            torch.OutOfMemoryError (or any error of the capture): whatever was rebuilt is
            released again and the runner stays asleep.
        """
        if not self.is_sleeping:
            return
        start = time.perf_counter()
        try:
            self.backend = self._make_backend()
            self.kv.allocate()
            if self._slept_graph_sizes:
                self._capture_graphs(self._slept_graph_sizes)
        except BaseException:
            self._release()
            return_memory(self.device)
            raise
        self.is_sleeping = False
        logger.info(
            "awake: KV cache and CUDA graphs rebuilt in %.1f s",
            time.perf_counter() - start,
        )

    # ------------------------------------------------------------------ internals

    def _make_backend(self) -> AttentionBackend:
        """The batch-invariant backend in deterministic mode, else the fastest available."""
        if self.config.deterministic:
            return InvariantAttentionBackend(self.spec, block_size=self.config.block_size)
        return make_attention_backend(self.spec, **self._backend_kwargs)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, H] of the step: the bucket's graph replay, or an eager forward."""
        if inputs.graph_size is None:
            return self.model(inputs.forward)
        return self.graphs.replay(inputs.graph_size)

    def _logits(self, hidden_TH: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        return self.model.compute_logits(hidden_TH[inputs.logits_indices]).float()

    @torch.no_grad()
    def _profile_step(self, batch: ScheduledBatch) -> None:
        """The costliest step, whose peak memory sizes the KV cache (``KVCache``): ``batch``'s
        forward and sampling, then sampling ``max_num_seqs`` rows of ``PROFILE_SAMPLING``; the
        sampler's generator is left as it was."""
        generator_state = self.sampler.generator.get_state()
        inputs = self.prepare(batch)
        # Not run(): its hook files rows by slot, and these slots are the temporary cache's.
        self.sample(self._logits(self._forward(inputs), inputs), inputs)
        rows = self.config.max_num_seqs
        logits_SV = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=self.device)
        self.sampler(logits_SV, self.sampler.prepare([PROFILE_SAMPLING] * rows, [0] * rows))
        self.sampler.generator.set_state(generator_state)

    def _capture_graphs(self, sizes: list[int]) -> None:
        """The decode CUDA graphs of ``sizes``, each over an all-padding batch of its size."""
        self.graphs.capture(
            self.model,
            sizes,
            lambda size: self._forward_batch(
                input_ids=[],
                positions=[],
                slot_mapping=[],
                query_start_loc=[0],
                seq_lens=[],
                block_tables=[],
                is_decode=True,
                graph_size=size,
            ),
        )

    def _release(self) -> None:
        """Drop the CUDA graphs, the KV cache and the attention backend."""
        self.graphs.release()
        self.kv.release()
        self.backend = None

    def _check_capturer(
        self, capturer: RoutedExpertsCapturer | None
    ) -> RoutedExpertsCapturer | None:
        if capturer is None:
            return None
        layers, top_k = len(self.model.moe_layers), self.model.routing_params.top_k
        buffer = capturer.buffer
        rows, shape = self.config.max_num_batched_tokens, tuple(buffer.shape)
        if shape[0] < rows or shape[1:] != (layers, top_k) or buffer.device != self.device:
            raise ValueError(
                f"capturer: expected a buffer [>= {rows}, {layers}, {top_k}] on {self.device}, "
                f"got {shape} on {buffer.device}"
            )
        return capturer

    def _forward_batch(
        self,
        *,
        input_ids: Sequence[int],
        positions: Sequence[int],
        slot_mapping: Sequence[int],
        query_start_loc: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        is_decode: bool,
        graph_size: int | None,
    ) -> ForwardBatch:
        """Stage a step's inputs and plan it; ``graph_size`` pads a decode step with padding
        rows up to that many sequences and plans it for that size's CUDA graph."""
        buf = self.buffers
        num_seqs = graph_size or len(seq_lens)
        num_tokens = graph_size or len(input_ids)
        # A padding row feeds one token, so its query range is one past the previous row's.
        last = query_start_loc[-1]
        query_start = [
            *query_start_loc,
            *range(last + 1, last + 1 + num_seqs - len(seq_lens)),
        ]
        _, ids = buf.stage("input_ids", input_ids, num_tokens, 0)
        _, pos = buf.stage("positions", positions, num_tokens, 0)
        _, slots = buf.stage("slot_mapping", slot_mapping, num_tokens, -1)
        qsl_cpu, qsl = buf.stage("query_start_loc", query_start, num_seqs + 1, 0)
        lens_cpu, lens = buf.stage("seq_lens", seq_lens, num_seqs, 0)
        tables_cpu, tables = buf.stage_table("block_tables", block_tables, num_seqs)
        forward = ForwardBatch(
            input_ids=ids,
            positions=pos,
            slot_mapping=slots,
            query_start_loc=qsl,
            seq_lens=lens,
            block_tables=tables,
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=lens_cpu,
            block_tables_cpu=tables_cpu,
            is_decode=is_decode,
            attn_backend=self.backend,
            capture=buf.capturer,
        )
        forward.attn_state = self.backend.plan(forward, cuda_graph=graph_size is not None)
        return forward
