"""The tasks a GRPO run can train on, by the name its config gives (``task.name``).

A task draws problems, each with a text ``prompt``, and rewards the answers the rollout wrote
for them (``Task``). ``TASKS`` maps a name to a factory that builds the task from the config's
``task`` section; ``addition`` (``replay.trainer.tasks.AdditionTask``) is the entry every
config gets by default. A task of your own is one more entry, added in the process that runs
the training loop (the driver: the loop samples and rewards there, never in a Ray worker)::

    TASKS["copy"] = lambda section: CopyTask()
    train(load_config("run.yaml", ["task.name=copy"]))

``make_task(section)`` builds the named task; an unknown name raises naming ``task.name``, the
known names and the given one (the config raises the same when it is built).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from replay.trainer.tasks import AdditionTask

if TYPE_CHECKING:
    from replay.trainer.config import TaskConfig

__all__ = ["TASKS", "Task", "TaskProblem", "make_task"]


class TaskProblem(Protocol):
    """One problem of a task: what the policy is prompted with."""

    @property
    def prompt(self) -> str: ...


class Task(Protocol):
    """What the training loop asks of a task."""

    def sample(self, n: int, rng: np.random.Generator) -> Sequence[TaskProblem]:
        """``n`` problems drawn with ``rng`` (the same ``rng`` state, the same problems)."""
        ...

    def rewards(
        self,
        problems: Sequence[Any],
        completions: Sequence[str],
        finished: Sequence[bool],
    ) -> np.ndarray:
        """One float reward per answer: ``completions[i]`` answers ``problems[i]``;
        ``finished[i]`` says whether it ended with the end-of-sequence token."""
        ...

    def longest_prompt(self) -> tuple[str, str]:
        """The prompt of the most tokens this task can draw and the ``task`` setting that bounds
        it, e.g. ``("999+999=", "max_digits 3")``: checked against the model's context length
        before a run starts."""
        ...


def _addition(section: TaskConfig) -> AdditionTask:
    return AdditionTask(
        min_digits=section.min_digits,
        max_digits=section.max_digits,
        partial_credit=section.partial_credit,
    )


TASKS: dict[str, Callable[[TaskConfig], Task]] = {"addition": _addition}


def make_task(section: TaskConfig) -> Task:
    """The task ``section.name`` names, built from ``section``.

    Raises:
        ValueError: no task of that name in ``TASKS``.
    """
    if section.name not in TASKS:
        raise ValueError(f"task.name: expected one of {sorted(TASKS)}, got {section.name!r}")
    return TASKS[section.name](section)
