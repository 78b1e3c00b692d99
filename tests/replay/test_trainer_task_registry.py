"""replay.trainer.task_registry: ``task.name`` picks the task, a task registered by the user runs
through the loop's task interface (``step_requests``, ``step_rewards``) and the preflight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from replay.trainer.config import TaskConfig, config_from_dict, load_config
from replay.trainer.loop import step_requests, step_rewards
from replay.trainer.task_registry import TASKS, make_task
from replay.trainer.tasks import AdditionTask


@dataclass(frozen=True)
class Digits:
    digits: str

    @property
    def prompt(self) -> str:
        return f"{self.digits}="


class ReverseTask:
    """Write the prompt's digits backwards: 1 for exactly that with eos, else 0."""

    def __init__(self, max_digits: int) -> None:
        self.max_digits = max_digits

    def sample(self, n: int, rng: np.random.Generator) -> list[Digits]:
        lengths = rng.integers(1, self.max_digits + 1, size=n)
        return [Digits("".join(map(str, rng.integers(0, 10, size=k)))) for k in lengths]

    def rewards(
        self, problems: Sequence[Digits], completions: Sequence[str], finished: Sequence[bool]
    ) -> np.ndarray:
        return np.array(
            [
                float(done and text == p.digits[::-1])
                for p, text, done in zip(problems, completions, finished, strict=True)
            ]
        )

    def longest_prompt(self) -> tuple[str, str]:
        return "9" * self.max_digits + "=", f"max_digits {self.max_digits}"


@pytest.fixture
def reverse_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "reverse", lambda section: ReverseTask(section.max_digits))


def test_addition_is_the_default_task() -> None:
    config = config_from_dict({"model": "m", "task": {"max_digits": 2, "partial_credit": 0.5}})
    task = make_task(config.task)
    assert config.task.name == "addition" and isinstance(task, AdditionTask)
    assert (task.max_digits, task.partial_credit) == (2, 0.5)
    assert task.longest_prompt() == ("99+99=", "max_digits 2")


def test_unknown_task_names_the_field_the_known_names_and_the_value(reverse_task: None) -> None:
    with pytest.raises(
        ValueError, match=r"^task\.name: expected one of \['addition', 'reverse'\], got 'copy'$"
    ):
        config_from_dict({"model": "m", "task": {"name": "copy"}})
    section = TaskConfig(name="reverse")
    del TASKS["reverse"]  # unregistered after the config was built
    with pytest.raises(ValueError, match=r"task\.name: expected one of \['addition'\], got 'rev"):
        make_task(section)


def test_a_registered_task_runs_through_the_loops_task_interface(reverse_task: None) -> None:
    config = config_from_dict(
        {
            "model": "m",
            "task": {"name": "reverse", "max_digits": 4},
            "grpo": {"prompts_per_step": 3, "group_size": 2, "normalize_std": False},
            "rollout": {"max_tokens": 5},
        }
    )
    task = make_task(config.task)
    assert isinstance(task, ReverseTask) and task.max_digits == 4
    problems, sampling = step_requests(
        task, config.grpo, config.rollout, seed=0, step=0, rng=np.random.default_rng(1)
    )
    drawn = ReverseTask(4).sample(3, np.random.default_rng(1))
    assert problems == [p for p in drawn for _ in range(2)]  # each prompt group_size times
    assert [s.max_tokens for s in sampling] == [5] * 6 and len({s.seed for s in sampling}) == 6
    texts = [p.digits[::-1] for p in problems]
    texts[1] += "0"
    finished = [True] * 5 + [False]
    rewards, advantages = step_rewards(task, config.grpo, problems, texts, finished)
    assert rewards.dtype == np.float32 and rewards.tolist() == [1, 0, 1, 1, 1, 0]
    # Group-relative: the reward minus its group's mean.
    assert advantages.tolist() == [0.5, -0.5, 0, 0, 0.5, -0.5]


class _Miscounting(ReverseTask):
    def sample(self, n: int, rng: np.random.Generator) -> list[Digits]:
        return super().sample(n + 1, rng)

    def rewards(
        self, problems: Sequence[Digits], completions: Sequence[str], finished: Sequence[bool]
    ) -> np.ndarray:
        return super().rewards(problems, completions, finished)[:-1]


def test_a_task_giving_another_count_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "miscounting", lambda section: _Miscounting(2))
    config = config_from_dict({"model": "m", "task": {"name": "miscounting"}})
    task = make_task(config.task)
    with pytest.raises(ValueError, match=r"task\.sample: expected 16 problems .*, got 17"):
        step_requests(
            task, config.grpo, config.rollout, seed=0, step=0, rng=np.random.default_rng()
        )
    problems = ReverseTask(2).sample(2, np.random.default_rng())
    with pytest.raises(ValueError, match=r"task\.rewards: expected shape \(2,\) .*, got \(1,\)"):
        step_rewards(task, config.grpo, problems, ["1", "2"], [True, True])


def test_the_preflight_checks_a_registered_tasks_longest_prompt(
    reverse_task: None, tmp_path: Path
) -> None:
    # The random addition model's 64 positions: a prompt of 41 characters leaves 23 tokens.
    sets = [f"model={tmp_path / 'model'}", "model_init=random_addition", "task.name=reverse"]
    with pytest.raises(
        ValueError,
        match=r"rollout\.max_tokens: expected <= 23 .* the task's longest prompt '9{40}=' of 41 "
        r"tokens with task\.max_digits 40\), got 24",
    ):
        load_config(None, [*sets, "task.max_digits=40", "rollout.max_tokens=24"])
    assert load_config(None, [*sets, "task.max_digits=40", "rollout.max_tokens=23"])
