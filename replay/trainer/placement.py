"""Where a run's actors go: the bundle layout of rollout workers and trainer ranks, checked
against the cluster before any actor starts and reserved as one Ray placement group.

Two layouts (``TrainConfig.placement``):

- ``separate``: one bundle per actor (each rollout worker, then each trainer rank), packed onto
  as few nodes as fit (strategy PACK).
- ``colocated``: one bundle per pair (rollout worker ``r``, trainer rank ``r``) holding both
  actors' resources, e.g. ``{GPU: 1}`` for a worker and a rank of 0.5 GPU each: Ray gives a
  bundle's GPU to every actor in it, so each pair shares one GPU, as in verl's and slime's
  colocated mode (one placement group, actors pinned to bundle indices).

A node pin (``rollout.node_resource`` / ``trainer.node_resource``: a custom resource that the
chosen nodes were started with, ``ray start --resources='{"rollout_node": 1}'``) adds
``NODE_RESOURCE_AMOUNT`` of it to each actor of that side, so its actors only go to those nodes.

Before the placement group is created, the request is checked (``check_placement``): every
resource summed over the bundles against the cluster's total (an autoscaling cluster: against
the most its node groups can grow to), and every bundle against the largest node (a bundle is
never split across nodes). What cannot fit raises ``PlacementError`` at once, naming the
request and the cluster, e.g. ``3 CPUs requested: 2 rollout workers x 1 + trainer 1; the
cluster has 2``. What fits the cluster but not its free resources (held by other jobs, or
nodes the autoscaler has yet to add) is logged as pending, and the group gets ``timeout_s`` to
be placed; past that, ``PlacementError`` with the same description.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ray
from ray._private.state import state as ray_state
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from replay.trainer.config import TrainConfig, TrainerConfig

__all__ = [
    "NODE_RESOURCE_AMOUNT",
    "ActorGroup",
    "Bundle",
    "ClusterView",
    "Placement",
    "PlacementError",
    "PlacementPlan",
    "check_placement",
    "plan_from_config",
    "plan_placement",
    "trainer_actor_group",
]

logger = logging.getLogger(__name__)

PlacementMode = Literal["separate", "colocated"]
Role = Literal["rollout", "trainer"]

# How much of a node-pinning custom resource each actor takes: a token amount, so a node
# started with 1 of it takes any number of actors (its CPUs and GPUs still limit them).
NODE_RESOURCE_AMOUNT = 0.001

# Room for float sums of fractions (Ray itself counts in units of 1e-4).
_EPS = 1e-6
_HINT = (
    " (ask for fewer workers, fractional num_cpus / num_gpus to share a device, or more "
    "nodes; node-pinning resources come from `ray start --resources`)"
)
_ROLE_NAMES = {
    "rollout": ("rollout worker", "rollout workers"),
    "trainer": ("trainer", "trainer ranks"),
}


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested actors (at once), or did not place them in time."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ActorGroup:
    """``count`` actors of one role, each asking for the same resources."""

    role: Role
    count: int
    num_cpus: float
    num_gpus: float
    node_resource: str | None = None

    def resources(self) -> dict[str, float]:
        """One actor's Ray resources, zeros left out."""
        out = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus)}
        if self.node_resource is not None:
            out[self.node_resource] = NODE_RESOURCE_AMOUNT
        return {name: amount for name, amount in out.items() if amount > 0}


@dataclass(frozen=True, kw_only=True, slots=True)
class Bundle:
    """One bundle of the placement group: its index and the actors ``(role, rank)`` in it."""

    index: int
    members: tuple[tuple[Role, int], ...]
    resources: Mapping[str, float]

    def describe(self) -> str:
        amounts = ", ".join(f"{name}: {amount:g}" for name, amount in self.resources.items())
        actors = " + ".join(f"{_ROLE_NAMES[role][0]} {rank}" for role, rank in self.members)
        return f"bundle {self.index} {{{amounts}}}: {actors}"


@dataclass(frozen=True, kw_only=True, slots=True)
class PlacementPlan:
    """The bundles of a run (see the module docstring); ``bundle_of`` maps an actor to its
    bundle (None: an actor that asks for no resources stays outside the group)."""

    mode: PlacementMode
    groups: tuple[ActorGroup, ...]
    bundles: tuple[Bundle, ...]

    def bundle_of(self, role: Role, rank: int) -> int | None:
        for bundle in self.bundles:
            if (role, rank) in bundle.members:
                return bundle.index
        return None

    def group(self, role: Role) -> ActorGroup:
        """The plan's actor group of ``role`` (ValueError naming the roles it has)."""
        for group in self.groups:
            if group.role == role:
                return group
        raise ValueError(
            f"role: expected one of the plan's {[g.role for g in self.groups]}, got {role!r}"
        )

    def totals(self) -> dict[str, float]:
        """Every resource summed over the bundles."""
        totals: dict[str, float] = {}
        for bundle in self.bundles:
            for name, amount in bundle.resources.items():
                totals[name] = totals.get(name, 0.0) + amount
        return totals

    def describe(self) -> str:
        """The layout, one bundle a line (logged at start)."""
        lines = [f"placement {self.mode}: {len(self.bundles)} bundles (strategy PACK)"]
        lines += [f"  {bundle.describe()}" for bundle in self.bundles]
        return "\n".join(lines)

    def request_text(self, resource: str) -> str:
        """``3 CPUs requested: 2 rollout workers x 1 + trainer 1``."""
        terms = []
        for group in self.groups:
            amount = group.resources().get(resource, 0.0)
            if amount:
                one, many = _ROLE_NAMES[group.role]
                terms.append(
                    f"{one} {amount:g}"
                    if group.count == 1
                    else f"{group.count} {many} x {amount:g}"
                )
        return f"{_amount_text(resource, self.totals()[resource])} requested: {' + '.join(terms)}"


def plan_placement(groups: Sequence[ActorGroup], mode: PlacementMode = "separate") -> PlacementPlan:
    """The bundles of ``groups`` (a rollout group, optionally a trainer group) in ``mode``.

    Raises:
        ValueError: ``colocated`` without exactly one rollout and one trainer group of equal
            count.
    """
    groups = tuple(groups)
    members: list[list[tuple[Role, int]]]
    if mode == "separate":
        members = [[(g.role, rank)] for g in groups for rank in range(g.count)]
    elif mode == "colocated":
        counts = {g.role: g.count for g in groups}
        if sorted(counts) != ["rollout", "trainer"] or len(groups) != 2:
            raise ValueError(
                f"placement: expected a rollout and a trainer group for 'colocated', got "
                f"{[g.role for g in groups]}"
            )
        if counts["rollout"] != counts["trainer"]:
            raise ValueError(
                f"placement: expected as many rollout workers as trainer ranks for 'colocated' "
                f"(one pair per bundle), got {counts['rollout']} and {counts['trainer']}"
            )
        members = [[("rollout", r), ("trainer", r)] for r in range(counts["rollout"])]
    else:
        raise ValueError(f"placement: expected 'separate' or 'colocated', got {mode!r}")
    by_role = {g.role: g.resources() for g in groups}
    bundles = []
    for actors in members:
        resources: dict[str, float] = {}
        for role, _ in actors:
            for name, amount in by_role[role].items():
                resources[name] = resources.get(name, 0.0) + amount
        if resources:  # Ray refuses empty bundles; such actors need no reservation
            bundles.append(Bundle(index=len(bundles), members=tuple(actors), resources=resources))
    return PlacementPlan(mode=mode, groups=groups, bundles=tuple(bundles))


def plan_from_config(config: TrainConfig) -> PlacementPlan:
    """The plan of a GRPO run: its rollout workers and trainer ranks in ``config.placement``."""
    rollout = config.rollout
    workers = ActorGroup(
        role="rollout",
        count=rollout.num_workers,
        num_cpus=rollout.num_cpus_per_worker,
        num_gpus=rollout.num_gpus_per_worker,
        node_resource=rollout.node_resource,
    )
    return plan_placement([workers, trainer_actor_group(config.trainer)], config.placement)


def trainer_actor_group(trainer: TrainerConfig) -> ActorGroup:
    """The trainer's ranks as ``trainer`` (a ``TrainConfig.trainer`` section) describes."""
    return ActorGroup(
        role="trainer",
        count=trainer.world_size,
        num_cpus=trainer.num_cpus,
        num_gpus=trainer.num_gpus,
        node_resource=trainer.node_resource,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterView:
    """What the cluster offers: ``total`` and ``available`` resources, each alive node's total,
    and on an autoscaling cluster ``max_total``, the most its node groups can grow to (None on
    a fixed cluster)."""

    total: Mapping[str, float]
    available: Mapping[str, float]
    nodes: tuple[Mapping[str, float], ...]
    max_total: Mapping[str, float] | None = None

    @classmethod
    def from_ray(cls) -> ClusterView:
        """The connected cluster, now (``ray.init`` first)."""
        # The autoscaler's node-group limits; Ray Train reads them the same way (no public API).
        max_total = ray_state.get_max_resources_from_cluster_config()
        return cls(
            total=ray.cluster_resources(),
            available=ray.available_resources(),
            nodes=tuple(node["Resources"] for node in ray.nodes() if node["Alive"]),
            max_total=max_total or None,
        )


def check_placement(plan: PlacementPlan, cluster: ClusterView) -> str | None:
    """Raise ``PlacementError`` if ``cluster`` can never hold ``plan``; return a note on what
    is pending (resources in use by others, nodes the autoscaler has yet to add), or None when
    everything is free now."""
    ceiling = cluster.total if cluster.max_total is None else cluster.max_total
    short = [name for name, amount in plan.totals().items() if amount > _get(ceiling, name) + _EPS]
    if short:
        grows = "" if cluster.max_total is None else " at most (autoscaler limit)"
        raise PlacementError(
            f"placement {plan.mode}: "
            + "; ".join(
                f"{plan.request_text(name)}; the cluster has{grows} {_get(ceiling, name):g}"
                for name in short
            )
            + _HINT
        )
    if cluster.max_total is None:
        for bundle in plan.bundles:
            if not any(_fits(bundle.resources, node) for node in cluster.nodes):
                largest = ", ".join(
                    f"{name} {max((_get(n, name) for n in cluster.nodes), default=0):g}"
                    for name in bundle.resources
                )
                raise PlacementError(
                    f"placement {plan.mode}: {bundle.describe()} must sit on one node; no node has that much (the "
                    f"largest: {largest})" + _HINT
                )
    pending = [
        n for n, amount in plan.totals().items() if amount > _get(cluster.available, n) + _EPS
    ]
    if not pending:
        return None
    why = (
        "waiting for the autoscaler"
        if any(plan.totals()[n] > _get(cluster.total, n) + _EPS for n in pending)
        else "waiting for resources in use"
    )
    return f"{why}: " + "; ".join(
        f"{plan.request_text(name)}; the cluster has {_get(cluster.total, name):g}, "
        f"{_get(cluster.available, name):g} available"
        for name in pending
    )


class Placement:
    """A reserved plan: its placement group, and the Ray options pinning each actor to its
    bundle. Build with ``Placement.reserve``; ``remove`` releases the group (idempotent)."""

    def __init__(self, plan: PlacementPlan, group: PlacementGroup | None) -> None:
        self.plan = plan
        self._group = group

    @classmethod
    def reserve(cls, plan: PlacementPlan, *, timeout_s: float) -> Placement:
        """Check ``plan`` against the cluster (``PlacementError`` at once if it can never fit),
        create its placement group and wait up to ``timeout_s`` for it to be placed
        (``PlacementError`` past that, the group removed)."""
        logger.info("%s", plan.describe())
        note = check_placement(plan, ClusterView.from_ray())
        if not plan.bundles:
            return cls(plan, None)
        if note is not None:
            logger.warning("placement %s: %s (up to %g s)", plan.mode, note, timeout_s)
        group = placement_group([dict(b.resources) for b in plan.bundles], strategy="PACK")
        start = time.monotonic()
        try:
            ray.get(group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            cluster = ClusterView.from_ray()
            remove_placement_group(group)
            still = check_placement(plan, cluster) or (
                "no node can take the remaining bundles: " + plan.describe()
            )
            raise PlacementError(
                f"placement {plan.mode}: not placed within {timeout_s:g} s: {still}" + _HINT
            ) from None
        logger.info("placement %s: placed in %.1f s", plan.mode, time.monotonic() - start)
        return cls(plan, group)

    @classmethod
    def for_group(
        cls, group: ActorGroup, placement: Placement | None, *, timeout_s: float
    ) -> Placement:
        """``placement`` when its plan holds ``group`` exactly as configured (ValueError naming
        ``placement`` otherwise); without one, a placement of ``group``'s own (``reserve``)."""
        if placement is None:
            return cls.reserve(plan_placement([group]), timeout_s=timeout_s)
        planned = placement.plan.group(group.role)
        if planned != group:
            raise ValueError(f"placement: expected a plan for {group}, got {planned}")
        return placement

    def actor_options(self, role: Role, rank: int) -> dict[str, Any]:
        """``ray.remote(...).options(**these)`` for actor ``rank`` of ``role``."""
        group = self.plan.group(role)
        options: dict[str, Any] = {"num_cpus": group.num_cpus, "num_gpus": group.num_gpus}
        if group.node_resource is not None:
            options["resources"] = {group.node_resource: NODE_RESOURCE_AMOUNT}
        index = self.plan.bundle_of(role, rank)
        if index is not None:
            assert self._group is not None
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._group, placement_group_bundle_index=index
            )
        return options

    def remove(self) -> None:
        """Release the placement group (after the actors are gone; idempotent)."""
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None


def _get(resources: Mapping[str, float], name: str) -> float:
    return float(resources.get(name, 0.0))


def _fits(need: Mapping[str, float], have: Mapping[str, float]) -> bool:
    return all(amount <= _get(have, name) + _EPS for name, amount in need.items())


def _amount_text(resource: str, amount: float) -> str:
    if resource in ("CPU", "GPU"):
        return f"{amount:g} {resource}{'' if amount == 1 else 's'}"
    return f"{amount:g} of the custom resource {resource!r}"
