"""A rollout worker's routing on its way to the trainer: one Ray object per worker and step.

Routing is the bulk of a step's rollout data (Qwen3-30B-A3B: 48 MoE layers x top-8 uint8 =
384 bytes per token, about 0.8 GB for 256 answers of 8k tokens), and only the trainer needs
it. So a worker returns it as its own Ray object beside the answers (``RolloutWorker.
generate_split``): the driver fetches the answers only and hands the routing's ObjectRefs to
the trainer, which reads them from the object store on its own node (Ray copies an object
between nodes once; on the same node a numpy array comes back as a read-only view of the
store, no copy). (Ray returns an object under 100 KB inline to its owner, the driver,
instead: a toy model's routing.) Shared memory never crosses nodes: see
``open_routing_readers``.

One object per worker, not one per answer (each object costs Ray a put, a location record and
a fetch), holding the answers' arrays as they are: Ray serializes each array as a buffer of
its own inside the object, so the worker's one copy is the one into the object store; a
concatenated buffer would add a copy into freshly allocated memory, which measured 3x slower
at 0.8 GB (``examples/benchmarks/bench_routing_transfer.py``, BENCHMARKS.md).

Legend: R rows of an answer, L MoE layers, K top_k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray

from replay.routed_experts import RoutedExperts
from replay.trainer.batch import Batch
from rollout import RequestOutput, RoutingSpec
from rollout.capture import ReaderSpec, RoutedExpertsReader

__all__ = [
    "NodeReaderSpecs",
    "WorkerRouting",
    "attach_routing",
    "open_routing_readers",
    "split_routing",
]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class WorkerRouting:
    """The routing rows of consecutive answers (one worker's share of a step).

    Attributes:
        rows: per answer, its rows ``[R, L, K]`` (DESIGN.md: ``N - 1`` rows for ``N`` tokens,
            start 0) in the id dtype of ``num_experts``.
        moe_layers: the model's MoE layers (the layer axis).
        num_experts: routed experts per MoE layer.
    """

    rows: tuple[np.ndarray, ...]
    moe_layers: tuple[int, ...]
    num_experts: int

    def __len__(self) -> int:
        """The number of answers."""
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows."""
        return sum(rows_RLK.nbytes for rows_RLK in self.rows)

    def traces(self) -> tuple[RoutedExperts, ...]:
        """One trace per answer (each validated and copied by ``RoutedExperts``)."""
        return tuple(
            RoutedExperts(rows_RLK, self.moe_layers, self.num_experts, start=0)
            for rows_RLK in self.rows
        )


def split_routing(
    outputs: Sequence[RequestOutput], spec: RoutingSpec
) -> tuple[list[RequestOutput], WorkerRouting | None]:
    """Split engine outputs into the outputs without their routed experts and one
    ``WorkerRouting`` of them all (None when no output carries routing).

    Raises:
        ValueError: some outputs carry routing and others do not, naming the first without.
    """
    routed = [out.routed_experts is not None for out in outputs]
    if not any(routed):
        return list(outputs), None
    if not all(routed):
        raise ValueError(
            f"outputs[{routed.index(False)}].routed_experts: expected routing for every output "
            f"(the others have it), got None"
        )
    routing = WorkerRouting(
        rows=tuple(out.routed_experts for out in outputs),
        moe_layers=spec.moe_layers,
        num_experts=spec.num_experts,
    )
    return [dataclasses.replace(out, routed_experts=None) for out in outputs], routing


def attach_routing(batch: Batch, parts: Sequence[WorkerRouting]) -> Batch:
    """``batch`` (answers without traces) with the traces of ``parts``, whose answers are the
    batch's in order.

    Raises:
        ValueError: the parts hold another number of answers than the batch (or rows that do
            not match them: ``Batch`` checks every trace's length).
    """
    count = sum(len(part) for part in parts)
    if count != len(batch):
        raise ValueError(
            f"parts: expected routing for the batch's {len(batch)} answers, got {count}"
        )
    traces = tuple(trace for part in parts for trace in part.traces())
    return dataclasses.replace(batch, traces=traces)


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeReaderSpecs:
    """A rollout worker's routing stores (one ``ReaderSpec`` per engine rank) and the node whose
    shared memory holds them."""

    node_id: str
    specs: tuple[ReaderSpec, ...]


def open_routing_readers(stores: NodeReaderSpecs) -> list[RoutedExpertsReader]:
    """Attach readers to a rollout worker's routing stores from this process (in a Ray actor or
    driver), which must be on the stores' node.

    Shared memory is node-local: on another node a segment of that name is absent, or another
    segment altogether (and on a simulated cluster, where every node is this machine, it would
    be the store itself, hiding the bug until a real cluster). Routing crosses nodes through the
    object store (``RolloutWorkers.rollout``).

    Raises:
        ValueError: this process is on another node than the stores, naming both.
    """
    here = ray.get_runtime_context().get_node_id()
    if here != stores.node_id:
        raise ValueError(
            f"routing stores {[s.name for s in stores.specs]}: expected a reader on their node "
            f"{stores.node_id}, got one on node {here}: shared memory is node-local, so "
            f"routing reaches another node through Ray's object store (RolloutWorkers.rollout)"
        )
    return [RoutedExpertsReader.from_spec(spec) for spec in stores.specs]
