"""The model runner: the model, its paged KV cache, the attention backend, the step inputs,
CUDA graphs for decode, and the sampler.

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

Static inputs live in one place, ``StepBuffers``: the device tensors every step (eager or
graph) reads, so a CUDA graph captured over views of them replays whatever ``prepare`` last
wrote. The routed-expert capturer (its buffer [max_num_batched_tokens, L, K], or None) is one
of them.

KV cache size: ``kv_cache_blocks`` when given. Otherwise on CUDA a profiling step (a prefill
of ``max_num_batched_tokens`` tokens, then sampling ``max_num_seqs`` rows with top-k, top-p and
seeds, the costliest path) measures the peak memory; the cache gets
``(total * gpu_memory_utilization - peak) // bytes_per_block`` blocks, where peak counts the
peak of torch allocations plus memory used outside torch (CUDA context, other processes).
CUDA graphs are captured after the cache and take memory beyond that budget (a few hundred MB:
hence the default utilisation 0.85). On CPU the cache holds ``max_num_seqs`` sequences of
``max_model_len`` tokens, capped at ``CPU_KV_CACHE_BYTES``.

``data_parallel_mode="dp_attention"`` (``dispatch``, a
``rollout.engine.expert_parallel.NaiveDispatch`` the runner sets on the model's MoE blocks):
every forward is collective across the ranks.
``prepare`` exchanges the step's token counts first (``dispatch.begin_step``), a rank without
work calls ``run_idle`` (a forward of one padding token, outputs discarded) whenever another
rank steps, and everything runs eager (no CUDA graphs). The memory profile runs on every rank at
once, so its MoE layers see the tokens of all ranks, as real steps do; the model holds only the
rank's experts (``MoEParallelConfig``), so the weights it measures are the rank's share and the
KV cache gets the memory of the experts it does not hold.

Sleep (a trainer colocated on the GPU): ``sleep()`` frees the KV cache, the CUDA graphs and the
attention backend's workspaces and empties the CUDA caching allocator; ``wake_up()`` allocates
a zeroed cache of the same number of blocks, a fresh backend and captures the graphs again.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rollout.capture import CaptureOff
from rollout.config import EngineConfig
from rollout.engine.scheduler import ScheduledBatch, ScheduledEntry
from rollout.engine.sequence import Sequence as EngineSequence
from rollout.forward_batch import ForwardBatch
from rollout.layers.attention import (
    AttentionBackend,
    FlashInferAttentionBackend,
    allocate_kv_cache,
    kv_cache_bytes_per_block,
    make_attention_backend,
)
from rollout.layers.invariant_attention import InvariantAttentionBackend
from rollout.layers.moe import SparseMoeBlock
from rollout.loader import LoadedCheckpoint
from rollout.sampler import SampledTokens, Sampler, SamplingInputs
from rollout.sampling_params import SamplingParams

if TYPE_CHECKING:
    from rollout.capture import RoutedExpertsCapturer, RoutingCapture
    from rollout.engine.expert_parallel import NaiveDispatch

__all__ = [
    "CPU_KV_CACHE_BYTES",
    "MAX_CUDA_GRAPH_SIZE",
    "ModelRunner",
    "StepBuffers",
    "StepInputs",
    "cuda_graph_sizes",
]

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30
MAX_CUDA_GRAPH_SIZE = 512


def cuda_graph_sizes(max_size: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, then multiples of 8, then
    ``max_size`` (a batch runs in the smallest graph that holds it)."""
    sizes = [s for s in (1, 2, 4) if s < max_size] + list(range(8, max_size, 8))
    return [*sizes, max_size] if max_size >= 1 else []


class StepBuffers:
    """Every per-step input tensor in one place: device tensors (the static inputs of the CUDA
    graphs) and, on CUDA, the pinned host buffers they are copied from.

    On a CPU device the host buffers are the device tensors (no copy).

    Args:
        sizes: name -> (number of elements, dtype) of each flat buffer.
        device: where the model runs.
        capturer: the routed-expert capturer (its buffer written by the model, never staged),
            or None.
    """

    def __init__(
        self,
        sizes: dict[str, tuple[int, torch.dtype]],
        device: torch.device,
        *,
        capturer: RoutedExpertsCapturer | None = None,
    ) -> None:
        self.capturer = capturer
        pinned = device.type == "cuda"
        self.host = {
            name: torch.zeros(n, dtype=dtype, pin_memory=pinned)
            for name, (n, dtype) in sizes.items()
        }
        self.device = (
            {name: torch.zeros(n, dtype=dtype, device=device) for name, (n, dtype) in sizes.items()}
            if pinned
            else self.host
        )
        self._arrays = {name: tensor.numpy() for name, tensor in self.host.items()}

    def stage(
        self, name: str, values: Sequence[int] | np.ndarray, size: int, pad: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``values`` then ``pad`` up to ``size`` elements of buffer ``name``; start the
        copy to the device; return the (host, device) views of those elements."""
        array = self._arrays[name]
        count = len(values)
        array[:count] = values
        array[count:size] = pad
        return self._copy(name, size)

    def stage_table(
        self, name: str, rows: Sequence[Sequence[int]], num_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``rows`` as a ``[num_rows, width]`` table padded with -1 (width: the longest
        row, at least 1) into buffer ``name``; return its (host, device) views."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        width = max(1, int(lengths.max(initial=0)))
        table = self._arrays[name][: num_rows * width].reshape(num_rows, width)
        table.fill(-1)
        total = int(lengths.sum())
        if total:
            flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=table.dtype, count=total)
            row_ids = np.repeat(np.arange(len(rows)), lengths)
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            table[row_ids, np.arange(total) - starts] = flat
        host, device = self._copy(name, num_rows * width)
        return host.view(num_rows, width), device.view(num_rows, width)

    def _copy(self, name: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        host, device = self.host[name][:size], self.device[name][:size]
        if device is not host:
            device.copy_(host, non_blocking=True)
        return host, device


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What ``prepare`` built for one step.

    Attributes:
        batch: the scheduled batch.
        forward: the planned ``ForwardBatch`` (padded to ``graph_size`` rows for a replay).
        logits_indices: [S] int64 device rows of the forward's output that sample.
        sampling: the sampler's inputs for those rows.
        graph_size: the CUDA-graph bucket this step replays, or None for an eager step.
    """

    batch: ScheduledBatch
    forward: ForwardBatch
    logits_indices: torch.Tensor
    sampling: SamplingInputs
    graph_size: int | None


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
        model, kv_cache, backend, sampler, num_kv_blocks, max_blocks_per_seq,
        graph_sizes (empty when no CUDA graphs are used), is_sleeping (``sleep`` released the
        KV cache, graphs and backend: ``kv_cache`` and ``backend`` are None until ``wake_up``).
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
        self.bytes_per_block = kv_cache_bytes_per_block(self.spec, config.block_size, self.dtype)
        # Step state, set before the memory profile (on CUDA it runs a step).
        # Recorded after a step's input copies were enqueued: the pinned host buffers they
        # read (ours and FlashInfer's plan workspace) are rewritten only once it completed.
        self._staged: torch.cuda.Event | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = []
        self.is_sleeping = False
        # The buckets sleep released, recaptured by wake_up.
        self._slept_graph_sizes: list[int] = []
        self.num_kv_blocks = self._num_kv_blocks()
        self.kv_cache: torch.Tensor | None = None
        self._allocate_kv_cache()
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)",
            self.num_kv_blocks,
            config.block_size,
            self.num_kv_blocks * config.block_size,
            self.num_kv_blocks * self.bytes_per_block / 2**30,
        )
        if use_graphs:
            self._capture_cuda_graphs(cuda_graph_sizes(max_graph))

    # ------------------------------------------------------------------ the step

    def prepare(self, batch: ScheduledBatch, previous: SampledTokens | None = None) -> StepInputs:
        """Stage ``batch`` into the static inputs, plan attention and build sampling inputs.

        ``previous``: the sampled tokens of the step in flight, which the batch's placeholders
        stand for (required when it has any).
        """
        assert not self.is_sleeping, "prepare: the runner is asleep (wake_up first)"
        self._wait_staging_reusable()
        if self.dispatch is not None:
            self.dispatch.begin_step(len(batch.input_ids))
        graph_size = self._graph_size(batch)
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
        self._fill_placeholders(batch, forward.input_ids, previous)
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
        self._staging_enqueued()
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
        self._wait_staging_reusable()
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
        self._staging_enqueued()
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
        reserved = self._reserved_bytes()
        self._slept_graph_sizes = self.graph_sizes
        self._release()
        self.is_sleeping = True
        self._return_memory()
        logger.info(
            "asleep: released the KV cache (%.2f GiB), %d CUDA graphs and the attention backend; "
            "%.2f GiB returned to the device",
            kv_bytes / 2**30,
            len(self._slept_graph_sizes),
            (reserved - self._reserved_bytes()) / 2**30,
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
            self._allocate_kv_cache()
            if self._slept_graph_sizes:
                self._capture_cuda_graphs(self._slept_graph_sizes)
        except BaseException:
            self._release()
            self._return_memory()
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

    def _fill_placeholders(
        self,
        batch: ScheduledBatch,
        input_ids: torch.Tensor,
        previous: SampledTokens | None,
    ) -> None:
        """Copy the previous step's sampled ids into the placeholder positions of the staged
        ``input_ids`` (the static buffer a graph replays), on the device, before the forward."""
        count = len(batch.placeholder_indices)
        if count == 0:
            return
        assert previous is not None and max(batch.placeholder_rows) < previous.num_rows, (
            f"prepare: {count} placeholders without their source rows "
            f"(previous step: {None if previous is None else previous.num_rows} rows)"
        )
        _, index = self.buffers.stage(
            "placeholders",
            batch.placeholder_indices + batch.placeholder_rows,
            2 * count,
            0,
        )
        positions, rows = index.view(2, count)
        input_ids.index_copy_(0, positions, previous.ids_S.index_select(0, rows))

    def _wait_staging_reusable(self) -> None:
        """Wait until the copies of the previous step's staged inputs have run (on CUDA the
        device is then past them, on that step's forward: the wait is short)."""
        if self._staged is not None:
            self._staged.synchronize()

    def _staging_enqueued(self) -> None:
        """Mark the end of this step's input copies on the stream (``_wait_staging_reusable``)."""
        if self.device.type == "cuda":
            if self._staged is None:
                self._staged = torch.cuda.Event()
            self._staged.record(torch.cuda.current_stream(self.device))

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, H] of the step: the bucket's graph replay, or an eager forward."""
        if inputs.graph_size is None:
            return self.model(inputs.forward)
        graph, hidden_TH = self._graphs[inputs.graph_size]
        graph.replay()
        return hidden_TH

    def _logits(self, hidden_TH: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        return self.model.compute_logits(hidden_TH[inputs.logits_indices]).float()

    def _allocate_kv_cache(self) -> None:
        """A zeroed cache of ``num_kv_blocks`` blocks, bound to the model's attention layers."""
        self.kv_cache = allocate_kv_cache(
            self.spec,
            num_blocks=self.num_kv_blocks,
            block_size=self.config.block_size,
            dtype=self.dtype,
            device=self.device,
        )
        self.model.bind_kv_cache(self.kv_cache)

    def _release(self) -> None:
        """Drop the CUDA graphs, the KV cache and the attention backend."""
        for graph, _ in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self.graph_sizes = []
        self.kv_cache = None
        self._unbind_kv_cache()
        self.backend = None

    def _return_memory(self) -> None:
        """Hand the caching allocator's free blocks back to the device (on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _reserved_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0

    def _unbind_kv_cache(self) -> None:
        # The attention layers hold views of the cache: drop them so that its memory is freed.
        for layer in self.model.model.layers:
            layer.self_attn.attn.kv_cache = None

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

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        if not batch.is_decode or not self.graph_sizes:
            return None
        i = bisect.bisect_left(self.graph_sizes, len(batch.entries))
        return self.graph_sizes[i] if i < len(self.graph_sizes) else None

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

    @torch.no_grad()
    def _capture_cuda_graphs(self, sizes: list[int]) -> None:
        """One graph per decode bucket, largest first so that the smaller ones reuse its
        memory pool; each bucket runs once eagerly first (torch.compile specialisations,
        Triton autotuning) so that nothing compiles inside a capture."""
        start = time.perf_counter()
        pool = None
        for size in reversed(sizes):
            forward = self._forward_batch(
                input_ids=[],
                positions=[],
                slot_mapping=[],
                query_start_loc=[0],
                seq_lens=[],
                block_tables=[],
                is_decode=True,
                graph_size=size,
            )
            self.model(forward)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden_TH = self.model(forward)
            pool = graph.pool()
            self._graphs[size] = (graph, hidden_TH)
        torch.cuda.synchronize(self.device)
        self.graph_sizes = sizes
        logger.info(
            "captured %d CUDA graphs (decode batch sizes %d..%d) in %.1f s",
            len(sizes),
            sizes[0],
            sizes[-1],
            time.perf_counter() - start,
        )

    def _num_kv_blocks(self) -> int:
        config = self.config
        if config.kv_cache_blocks is not None:
            return config.kv_cache_blocks
        if self.device.type != "cuda":
            wanted = config.max_num_seqs * self.max_blocks_per_seq
            return max(1, min(wanted, CPU_KV_CACHE_BYTES // self.bytes_per_block))
        peak = self._profile_peak_bytes()
        total = torch.cuda.mem_get_info(self.device)[1]
        budget = total * config.gpu_memory_utilization
        blocks = int((budget - peak) // self.bytes_per_block)
        logger.info(
            "memory: %.2f GiB total, budget %.2f GiB, profiled peak %.2f GiB, KV block %.1f KiB",
            total / 2**30,
            budget / 2**30,
            peak / 2**30,
            self.bytes_per_block / 2**10,
        )
        if blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"gpu_memory_utilization: expected room for at least {self.max_blocks_per_seq} "
                f"KV blocks (one sequence of max_model_len {self.max_model_len}), got {blocks} at "
                f"{config.gpu_memory_utilization} (peak use {peak / 2**30:.2f} GiB of "
                f"{total / 2**30:.2f} GiB); raise it or lower max_model_len / "
                "max_num_batched_tokens"
            )
        return blocks

    @torch.no_grad()
    def _profile_peak_bytes(self) -> int:
        """Peak device memory of the costliest step, KV cache excluded (see the docstring)."""
        config, device = self.config, self.device
        seq_len = min(self.max_model_len, config.max_num_batched_tokens)
        num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens // seq_len)
        params = SamplingParams(max_tokens=1, top_k=50, top_p=0.9, seed=0)
        blocks_per_seq = math.ceil(seq_len / config.block_size)
        entries = []
        for i in range(num_seqs):
            seq = EngineSequence(i, [0] * seq_len, params, block_size=config.block_size)
            seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            entries.append(ScheduledEntry(seq, 0, seq_len, True))
        temporary_kv = allocate_kv_cache(
            self.spec,
            num_blocks=num_seqs * blocks_per_seq,
            block_size=config.block_size,
            dtype=self.dtype,
            device=device,
        )
        self.model.bind_kv_cache(temporary_kv)
        generator_state = self.sampler.generator.get_state()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        inputs = self.prepare(ScheduledBatch.build(entries))
        # Not run(): its hook files rows by slot, and these slots are the temporary cache's.
        self.sample(self._logits(self._forward(inputs), inputs), inputs)
        rows = config.max_num_seqs
        logits_SV = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=device)
        self.sampler(logits_SV, self.sampler.prepare([params] * rows, [0] * rows))
        torch.cuda.synchronize(device)
        peak_torch = torch.cuda.max_memory_allocated(device) - temporary_kv.numel() * (
            temporary_kv.element_size()
        )
        free, total = torch.cuda.mem_get_info(device)
        outside_torch = (total - free) - torch.cuda.memory_reserved(device)
        self.sampler.generator.set_state(generator_state)
        self._unbind_kv_cache()
        del inputs, logits_SV, temporary_kv
        torch.cuda.empty_cache()
        return peak_torch + outside_torch
