"""CUDA graphs for decode steps: one per batch-size bucket, captured over the runner's static
inputs and replayed in place of the eager forward.

Legend: T tokens fed in a step, H hidden size.

A decode batch runs in the smallest bucket that holds it (``cuda_graph_sizes``), padded to that
size by the runner (padding rows: token 0, position 0, slot -1, length 0, no blocks). A graph
records the addresses of the tensors its forward read: the runner's static inputs
(``rollout.engine.step_inputs.StepBuffers``, the routing capture buffer among them), the KV
cache and the attention backend's workspaces. So a replay reads whatever the runner last staged
and planned there, and a graph is captured again whenever one of them is allocated anew
(``ModelRunner.wake_up``). The buckets share one memory pool: captured largest first, the
smaller ones reuse its memory, and ``release`` frees it with the graphs.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from rollout.forward_batch import ForwardBatch

__all__ = ["MAX_CUDA_GRAPH_SIZE", "DecodeGraphs", "cuda_graph_sizes"]

logger = logging.getLogger(__name__)

MAX_CUDA_GRAPH_SIZE = 512


def cuda_graph_sizes(max_size: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, then multiples of 8, then
    ``max_size`` (a batch runs in the smallest graph that holds it)."""
    sizes = [s for s in (1, 2, 4) if s < max_size] + list(range(8, max_size, 8))
    return [*sizes, max_size] if max_size >= 1 else []


class DecodeGraphs:
    """The decode CUDA graphs of one model, one per bucket, and the hidden states each writes.

    Args:
        device: the model's CUDA device.

    Attributes:
        sizes: the captured buckets, ascending (empty: none, every step runs eager).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sizes: list[int] = []
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest captured size that holds ``num_seqs`` sequences, or None."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.no_grad()
    def capture(
        self,
        model: torch.nn.Module,
        sizes: list[int],
        stage: Callable[[int], ForwardBatch],
    ) -> None:
        """One graph of ``model``'s forward per size in ``sizes`` (ascending), largest first so
        that the smaller ones reuse its memory pool. ``stage(size)`` stages and plans an
        all-padding decode batch of that many rows in the static inputs; each bucket runs once
        eagerly first (torch.compile specialisations, Triton autotuning) so that nothing
        compiles inside a capture."""
        start = time.perf_counter()
        pool = None
        for size in reversed(sizes):
            forward = stage(size)
            model(forward)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden_TH = model(forward)
            pool = graph.pool()
            self._graphs[size] = (graph, hidden_TH)
        torch.cuda.synchronize(self.device)
        self.sizes = sizes
        logger.info(
            "captured %d CUDA graphs (decode batch sizes %d..%d) in %.1f s",
            len(sizes),
            sizes[0],
            sizes[-1],
            time.perf_counter() - start,
        )

    def replay(self, size: int) -> torch.Tensor:
        """Replay bucket ``size`` over what the static inputs hold now; its hidden states
        [size, H] (a static output: the next replay of this bucket overwrites it)."""
        graph, hidden_TH = self._graphs[size]
        graph.replay()
        return hidden_TH

    def release(self) -> None:
        """Drop every graph and its memory pool; ``sizes`` becomes empty."""
        for graph, _ in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self.sizes = []
