"""replay.trainer.placement: the bundle layout of a run, the check against the cluster that fails
before any actor starts, and the timeout of a placement group that cannot be placed.

The layout and the check are plain data (no Ray); the last tests run on a 2-CPU local Ray: the
issue's reproduction (two rollout workers and a trainer of 1 CPU each used to wait forever at
``grpo r3: 0/2``) now fails within seconds naming what is missing, a request that waits for
resources in use times out with the same description, and a colocated layout puts each pair
of actors in its bundle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from replay.trainer.config import TrainConfig, config_from_dict, load_config
from replay.trainer.loop import GRPOTrainer
from replay.trainer.placement import (
    NODE_RESOURCE_AMOUNT,
    ActorGroup,
    ClusterView,
    Placement,
    PlacementError,
    check_placement,
    plan_from_config,
    plan_placement,
)

TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"


def rollout(count: int, cpus: float = 1.0, gpus: float = 0.0, node: str | None = None):
    return ActorGroup(role="rollout", count=count, num_cpus=cpus, num_gpus=gpus, node_resource=node)


def trainer(count: int, cpus: float = 1.0, gpus: float = 0.0, node: str | None = None):
    return ActorGroup(role="trainer", count=count, num_cpus=cpus, num_gpus=gpus, node_resource=node)


def fixed(cpus: float, gpus: float = 0.0, nodes: int = 1, **custom: float) -> ClusterView:
    """A fixed cluster of ``nodes`` equal nodes holding ``cpus`` / ``gpus`` in total."""
    total = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}
    node = {name: amount / nodes for name, amount in total.items()}
    return ClusterView(total=total, available=dict(total), nodes=(node,) * nodes)


# ---------------------------------------------------------------------- layout


def test_separate_layout_is_one_bundle_per_actor() -> None:
    plan = plan_placement([rollout(2, cpus=0.5), trainer(1, cpus=1.0)])
    assert [b.resources for b in plan.bundles] == [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1.0}]
    assert [b.members for b in plan.bundles] == [
        (("rollout", 0),),
        (("rollout", 1),),
        (("trainer", 0),),
    ]
    assert plan.bundle_of("rollout", 1) == 1 and plan.bundle_of("trainer", 0) == 2
    assert plan.totals() == {"CPU": 2.0}
    assert plan.describe().splitlines() == [
        "placement separate: 3 bundles (strategy PACK)",
        "  bundle 0 {CPU: 0.5}: rollout worker 0",
        "  bundle 1 {CPU: 0.5}: rollout worker 1",
        "  bundle 2 {CPU: 1}: trainer 0",
    ]


def test_colocated_layout_pairs_worker_and_rank_in_one_gpu_bundle() -> None:
    plan = plan_placement(
        [rollout(2, cpus=1, gpus=0.5), trainer(2, cpus=1, gpus=0.5)], mode="colocated"
    )
    assert [dict(b.resources) for b in plan.bundles] == [{"CPU": 2.0, "GPU": 1.0}] * 2
    assert [b.members for b in plan.bundles] == [
        (("rollout", 0), ("trainer", 0)),
        (("rollout", 1), ("trainer", 1)),
    ]
    assert plan.describe().splitlines()[1] == (
        "  bundle 0 {CPU: 2, GPU: 1}: rollout worker 0 + trainer 0"
    )
    with pytest.raises(ValueError, match="as many rollout workers as trainer ranks.*2 and 1"):
        plan_placement([rollout(2), trainer(1)], mode="colocated")
    with pytest.raises(ValueError, match="a rollout and a trainer group"):
        plan_placement([rollout(1)], mode="colocated")


def test_node_pin_and_actors_without_resources() -> None:
    plan = plan_placement([rollout(2, cpus=0.25, node="rollout_node"), trainer(1, cpus=0)])
    assert [dict(b.resources) for b in plan.bundles] == [
        {"CPU": 0.25, "rollout_node": NODE_RESOURCE_AMOUNT}
    ] * 2
    # A trainer asking for nothing needs no reservation (Ray refuses empty bundles).
    assert plan.bundle_of("trainer", 0) is None and len(plan.bundles) == 2


def test_config_plan_and_validation() -> None:
    config = load_config(
        TINY,
        [
            "model=m",
            "placement=colocated",
            "rollout.num_workers=2",
            "trainer.world_size=2",
            "rollout.num_cpus_per_worker=0.5",
            "trainer.num_cpus=0.5",
        ],
    )
    plan = plan_from_config(config)
    assert (
        plan.mode == "colocated" and [dict(b.resources) for b in plan.bundles] == [{"CPU": 1.0}] * 2
    )
    gpu = {
        "model": "m",
        "placement": "colocated",
        "rollout": {"num_gpus_per_worker": 0.6},
        "trainer": {"num_gpus": 0.5},
    }
    with pytest.raises(ValueError, match=r"rollout\.num_gpus_per_worker: expected at most 1 - "):
        config_from_dict(gpu)
    gpu["rollout"]["num_gpus_per_worker"] = 0.5
    assert plan_from_config(config_from_dict(gpu)).bundles[0].resources == {"CPU": 2, "GPU": 1}
    with pytest.raises(ValueError, match=r"rollout\.num_workers: expected trainer\.world_size"):
        config_from_dict({**gpu, "rollout": {"num_workers": 2, "num_gpus_per_worker": 0.5}})


def test_config_fields_name_themselves() -> None:
    def build(**sections: object) -> TrainConfig:
        return config_from_dict({"model": "m", **sections})

    with pytest.raises(ValueError, match=r"rollout\.num_workers: expected at most .* = 4\), got 5"):
        build(grpo={"prompts_per_step": 2, "group_size": 2}, rollout={"num_workers": 5})
    with pytest.raises(ValueError, match=r"rollout\.num_gpus_per_worker: expected 2 \(data_para"):
        build(rollout={"data_parallel_size": 2, "num_gpus_per_worker": 1})
    with pytest.raises(ValueError, match=r"trainer\.node_resource: expected null or a resource"):
        build(trainer={"node_resource": ""})
    with pytest.raises(ValueError, match=r"placement: expected one of \['separate', 'colo"):
        build(placement="spread")
    with pytest.raises(ValueError, match=r"placement: expected 'separate' with trainer\.world"):
        build(placement="colocated", rollout={"num_workers": 2}, trainer={"world_size": 2})
    with pytest.raises(ValueError, match=r"placement_timeout_s: expected a float > 0, got 0"):
        build(placement_timeout_s=0)


# ---------------------------------------------------------------------- the check


def test_too_few_cpus_fail_naming_the_request() -> None:
    plan = plan_placement([rollout(2), trainer(1)])
    with pytest.raises(PlacementError) as err:
        check_placement(plan, fixed(cpus=2))
    assert str(err.value).startswith(
        "placement separate: 3 CPUs requested: 2 rollout workers x 1 + trainer 1; "
        "the cluster has 2 ("
    )
    assert check_placement(plan_placement([rollout(2, 0.5), trainer(1, 0.5)]), fixed(2)) is None


def test_gpus_and_custom_resources_fail_naming_each_short_resource() -> None:
    plan = plan_placement([rollout(3, gpus=1, node="rollout_node"), trainer(2, gpus=1)])
    with pytest.raises(PlacementError) as err:
        check_placement(plan, fixed(cpus=16, gpus=4))
    message = str(err.value)
    assert "5 GPUs requested: 3 rollout workers x 1 + 2 trainer ranks x 1; the cluster has 4" in (
        message
    )
    assert (
        "0.003 of the custom resource 'rollout_node' requested: 3 rollout workers x 0.001; "
        "the cluster has 0" in message
    )


def test_a_bundle_larger_than_any_node_fails() -> None:
    # Two nodes of 1 GPU: 2 GPUs in total, but a worker of 2 GPUs fits on neither.
    plan = plan_placement([rollout(1, gpus=2)])
    with pytest.raises(PlacementError, match=r"bundle 0 \{CPU: 1, GPU: 2\}: rollout worker 0 "):
        check_placement(plan, fixed(cpus=4, gpus=2, nodes=2))
    with pytest.raises(
        PlacementError, match=r"no node has that much \(the largest: CPU 2, GPU 1\)"
    ):
        check_placement(plan, fixed(cpus=4, gpus=2, nodes=2))


def test_autoscaling_cluster_and_resources_in_use_are_pending() -> None:
    plan = plan_placement([rollout(2, gpus=1), trainer(1, gpus=1)])
    growing = ClusterView(
        total={"CPU": 8, "GPU": 1},
        available={"CPU": 8, "GPU": 1},
        nodes=({"CPU": 8, "GPU": 1},),
        max_total={"CPU": 64, "GPU": 8},
    )
    assert check_placement(plan, growing) == (
        "waiting for the autoscaler: 3 GPUs requested: 2 rollout workers x 1 + trainer 1; "
        "the cluster has 1, 1 available"
    )
    capped = ClusterView(
        total=growing.total, available=growing.available, nodes=growing.nodes, max_total={"GPU": 2}
    )
    with pytest.raises(PlacementError, match=r"the cluster has at most \(autoscaler limit\) 2"):
        check_placement(plan, capped)
    busy = ClusterView(
        total={"CPU": 8, "GPU": 4}, available={"CPU": 8, "GPU": 2}, nodes=({"CPU": 8, "GPU": 4},)
    )
    assert check_placement(plan, busy) == (
        "waiting for resources in use: 3 GPUs requested: 2 rollout workers x 1 + trainer 1; "
        "the cluster has 4, 2 available"
    )


# ---------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.timeout(120)
def test_issue_reproduction_fails_within_seconds(local_ray: None, tmp_path: Path) -> None:
    """``train_grpo.py --config tiny_cpu.yaml --set rollout.num_workers=2`` on 2 CPUs."""
    config = load_config(
        TINY,
        [
            f"model={tmp_path / 'model'}",
            f"log.out_dir={tmp_path / 'run'}",
            "rollout.num_workers=2",
            "log.progress=false",
        ],
    )
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        GRPOTrainer(config)
    assert time.monotonic() - start < 20  # the model write included; no actor was started
    assert "3 CPUs requested: 2 rollout workers x 1 + trainer 1; the cluster has 2" in str(
        err.value
    )
    assert ray.available_resources()["CPU"] == 2.0  # nothing reserved, nothing left running


@pytest.mark.timeout(120)
def test_resources_in_use_time_out_with_the_same_description(local_ray: None) -> None:
    other = placement_group([{"CPU": 1.5}])  # another job's reservation
    ray.get(other.ready(), timeout=30)
    try:
        plan = plan_placement([rollout(1, cpus=1.0)])
        start = time.monotonic()
        with pytest.raises(PlacementError) as err:
            Placement.reserve(plan, timeout_s=1.0)
        assert time.monotonic() - start < 10
        assert str(err.value).startswith(
            "placement separate: not placed within 1 s: waiting for resources in use: "
            "1 CPU requested: rollout worker 1; the cluster has 2, 0.5 available"
        )
    finally:
        remove_placement_group(other)
    # The timed-out group was removed: the same request is placed once the CPUs are free.
    placed = Placement.reserve(plan, timeout_s=30)
    placed.remove()


@ray.remote
class Probe:
    def placement_group_id(self) -> str:
        return ray.get_runtime_context().get_placement_group_id()


@pytest.mark.timeout(120)
def test_colocated_pairs_start_in_their_bundles(local_ray: None) -> None:
    plan = plan_placement([rollout(2, cpus=0.25), trainer(2, cpus=0.25)], mode="colocated")
    placement = Placement.reserve(plan, timeout_s=30)
    try:
        options = [
            placement.actor_options(role, rank)
            for rank in range(2)
            for role in ("rollout", "trainer")
        ]
        assert [o["scheduling_strategy"].placement_group_bundle_index for o in options] == [
            0,
            0,
            1,
            1,
        ]
        assert all(o["num_cpus"] == 0.25 and o["num_gpus"] == 0 for o in options)
        probes = [Probe.options(**o).remote() for o in options]
        ids = ray.get([p.placement_group_id.remote() for p in probes], timeout=60)
        assert set(ids) == {placement._group.id.hex()}
        for probe in probes:
            ray.kill(probe)
    finally:
        placement.remove()
    wait_for_free_cpus(2.0)


def wait_for_free_cpus(cpus: float, within_s: float = 20.0) -> None:
    """Ray frees a removed group's resources asynchronously."""
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < cpus:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)
