"""A simulated two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, as Ray's own
tests do): a head node started with the custom resource ``trainer_node`` and a second node with
``rollout_node``, standing for two machines.

One GRPO run (tiny config, two rollout workers, routing r3) with the rollout workers pinned to
the rollout node and the trainer to the head gives the same per-step records as the same run
with everything on the head node. In the two-node run the routing reaches the trainer through
the object store: each worker's routing object lives on the rollout node until the trainer's
step pulls a copy to the head; a shared-memory reader of a worker's store is refused on the
trainer's node and attaches on the worker's own.

Slow (the cluster alone takes ~30 s to start on a 2-core box): ``-m slow``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

import rollout
from replay.trainer.config import load_config
from replay.trainer.loop import GRPOTrainer
from replay.trainer.routing_transfer import open_routing_readers

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"
TIMING = ("time_", "tokens_per_s", "trainer_compute_s")


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING)}


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, str]]:
    """The cluster; yields each custom resource's node id."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"trainer_node": 1},
            "include_dashboard": False,
            # A real step's routing is megabytes, far above Ray's 100 KB limit for returning an
            # object inline to its owner (the driver); the tiny model's is bytes. Storing every
            # return in the object store makes it travel as a real run's would.
            "_system_config": {"max_direct_call_object_size": 0},
        },
    )
    try:
        cluster.add_node(num_cpus=2, resources={"rollout_node": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = {
            name: node["NodeID"]
            for node in ray.nodes()
            for name in ("trainer_node", "rollout_node")
            if name in node["Resources"]
        }
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def config(tmp_path: Path, run: str, rollout_node: str):
    return load_config(
        TINY,
        [
            f"model={tmp_path / 'model'}",
            f"log.out_dir={tmp_path / run}",
            "log.progress=false",
            "log.tensorboard=false",
            "log.checkpoint_every=0",
            "rollout.num_workers=2",
            "rollout.num_cpus_per_worker=0.5",
            "trainer.num_cpus=0.5",
            f"rollout.node_resource={rollout_node}",
            "trainer.node_resource=trainer_node",
        ],
    )


@pytest.mark.timeout(600)
def test_two_node_run_matches_one_node_and_routing_goes_through_the_object_store(
    two_nodes: dict[str, str], tmp_path: Path
) -> None:
    head, other = two_nodes["trainer_node"], two_nodes["rollout_node"]
    assert head != other

    one_node = GRPOTrainer(config(tmp_path, "one_node", rollout_node="trainer_node"))
    try:
        assert {i.node_id for i in one_node.workers.infos + one_node.trainer.infos} == {head}
        single = one_node.run()
    finally:
        one_node.shutdown()

    split = GRPOTrainer(config(tmp_path, "two_nodes", rollout_node="rollout_node"))
    try:
        assert {i.node_id for i in split.workers.infos} == {other}
        assert {i.node_id for i in split.trainer.infos} == {head}
        records = split.run()
        assert [comparable(r) for r in records] == [comparable(r) for r in single]
        assert all(r["router_agreement"] == 1.0 for r in records)  # r3 replayed the rollout

        # One more rollout by hand: its routing objects stay on the rollout node until the
        # trainer's step reads them, which copies them to the trainer's node.
        result = split.workers.rollout(
            ["1+2=", "30+4=", "5+6=", "7+80="],
            rollout.SamplingParams(max_tokens=4, seed=1, return_routed_experts=True),
        )
        assert len(result.routing) == 2
        where = ray.experimental.get_object_locations(list(result.routing))
        assert [set(where[ref]["node_ids"]) for ref in result.routing] == [{other}, {other}]
        split.trainer.step(result.batch, np.array([1.0, -1.0, 1.0, -1.0]), result.routing)
        where = ray.experimental.get_object_locations(list(result.routing))
        assert [set(where[ref]["node_ids"]) for ref in result.routing] == [{other, head}] * 2

        # Shared memory is node-local: a reader on the trainer's node is refused.
        (stores, _) = split.workers.routing_readers()
        assert stores.node_id == other and stores.specs

        @ray.remote(num_cpus=0)
        def attach(stores) -> list[int]:
            return [reader.spec.nbytes for reader in open_routing_readers(stores)]

        on_head = attach.options(resources={"trainer_node": 0.001}).remote(stores)
        with pytest.raises(ValueError, match="shared memory is node-local") as err:
            ray.get(on_head)
        assert f"expected a reader on their node {other}, got one on node {head}" in str(err.value)
        on_rollout_node = attach.options(resources={"rollout_node": 0.001}).remote(stores)
        assert ray.get(on_rollout_node) == [spec.nbytes for spec in stores.specs]
    finally:
        split.shutdown()
