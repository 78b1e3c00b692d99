"""A step's inputs: the static buffers every step reads, and what ``ModelRunner.prepare``
built for one step.

Legend: S sampling rows.

``StepBuffers`` holds every per-step input tensor in one place: the device tensors every step
(eager or graph) reads, so a CUDA graph captured over views of them replays whatever
``prepare`` last wrote (``rollout.engine.cuda_graphs``), and on CUDA the pinned host buffers
they are copied from, without blocking. The host buffers are rewritten only once the previous
step's copies have run (``wait_reusable``: by then the device is on that step's forward).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rollout.engine.scheduler import ScheduledBatch
from rollout.forward_batch import ForwardBatch
from rollout.sampler import SampledTokens, SamplingInputs

if TYPE_CHECKING:
    from rollout.capture import RoutedExpertsCapturer

__all__ = ["StepBuffers", "StepInputs"]


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
        self._cuda_device = device if pinned else None
        # Recorded after a step's input copies were enqueued: the pinned host buffers they
        # read (ours and FlashInfer's plan workspace) are rewritten only once it completed.
        self._staged: torch.cuda.Event | None = None

    def wait_reusable(self) -> None:
        """Wait until the copies of the previous step's staged inputs have run (on CUDA the
        device is then past them, on that step's forward: the wait is short)."""
        if self._staged is not None:
            self._staged.synchronize()

    def mark_staged(self) -> None:
        """Mark the end of this step's input copies on the stream (``wait_reusable``): call it
        once they are all enqueued, the attention backend's plan included."""
        if self._cuda_device is not None:
            if self._staged is None:
                self._staged = torch.cuda.Event()
            self._staged.record(torch.cuda.current_stream(self._cuda_device))

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

    def fill_placeholders(
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
        _, index = self.stage(
            "placeholders",
            batch.placeholder_indices + batch.placeholder_rows,
            2 * count,
            0,
        )
        positions, rows = index.view(2, count)
        input_ids.index_copy_(0, positions, previous.ids_S.index_select(0, rows))

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
