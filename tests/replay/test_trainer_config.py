"""replay.trainer.config: YAML loading, overrides, validation errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from replay.trainer.config import (
    GRPOConfig,
    TrainConfig,
    TrainerConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def write_yaml(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_sections_and_defaults(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        {
            "model": "ckpt",
            "routing": "r2",
            "trainer": {"lr": 3.0e-4, "device": "cpu", "num_gpus": 0, "micro_batch_size": 4},
            "grpo": {"group_size": 4, "ratio": "sequence", "tis_cap": 2},
        },
    )
    config = load_config(path, check_model=False)  # values only: no "ckpt" folder here
    assert config.model == "ckpt"
    assert config.routing == "r2"
    assert config.trainer.lr == 3.0e-4
    assert config.trainer.micro_batch_size == 4
    assert config.grpo.ratio == "sequence"
    # An int YAML value for a float field becomes a float.
    assert config.grpo.tis_cap == 2.0 and isinstance(config.grpo.tis_cap, float)
    # Untouched sections and fields keep the dataclass defaults.
    assert config.task == TrainConfig(model="x").task
    assert config.grpo.clip_low == GRPOConfig().clip_low


def test_overrides_apply_in_order_and_parse_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model": "ckpt", "trainer": {"lr": 1.0e-3}})
    config = load_config(
        path,
        [
            "trainer.lr=1e-5",  # YAML reads this as a string; float fields accept it
            "grpo.tis_cap=null",
            "rollout.max_model_len=128",
            "log.tensorboard=false",
            "seed=7",
            "seed=9",
        ],
        check_model=False,
    )
    assert config.trainer.lr == 1e-5
    assert config.grpo.tis_cap is None
    assert config.rollout.max_model_len == 128
    assert config.log.tensorboard is False
    assert config.seed == 9


def test_override_creates_missing_section(tmp_path: Path) -> None:
    config = load_config(
        write_yaml(tmp_path, {"model": "m"}), ["task.max_digits=5"], check_model=False
    )
    assert config.task.max_digits == 5


def test_parse_override_forms() -> None:
    assert parse_override("trainer.lr=0.5") == (("trainer", "lr"), 0.5)
    assert parse_override("routing=none") == (("routing",), "none")
    for bad in ("trainer.lr", "=3", "trainer..lr=1"):
        with pytest.raises(ValueError, match="override"):
            parse_override(bad)


@pytest.mark.parametrize(
    ("override", "error", "pattern"),
    [
        ("trainer.lr=-1.0", ValueError, r"trainer\.lr: expected a float > 0, got -1\.0"),
        ("trainer.lr=abc", TypeError, r"trainer\.lr: expected a float, got str 'abc'"),
        ("trainer.micro_batch_size=2.5", TypeError, r"trainer\.micro_batch_size: expected an int"),
        ("trainer.nonsense=1", ValueError, r"trainer\.nonsense: unknown field"),
        ("nonsense=1", ValueError, r"^nonsense: unknown field"),
        ("routing=r4", ValueError, r"routing: expected one of \['none', 'r3', 'r2'\], got 'r4'"),
        ("grpo.group_size=1", ValueError, r"grpo\.group_size: expected an int >= 2, got 1"),
        ("grpo.tis_cap=0.5", ValueError, r"grpo\.tis_cap: expected null or a float >= 1"),
        ("rollout.device=tpu", ValueError, r"rollout\.device: expected one of"),
        ("log.keep_checkpoints=0", ValueError, r"log\.keep_checkpoints"),
        ("task.max_digits=0", ValueError, r"task\.max_digits"),
        ("rollout.capture_routing=1", TypeError, r"rollout\.capture_routing: expected a bool"),
        ("trainer=3", TypeError, r"trainer: expected a mapping of fields"),
    ],
)
def test_bad_values_name_the_field(
    tmp_path: Path, override: str, error: type, pattern: str
) -> None:
    path = write_yaml(
        tmp_path, {"model": "ckpt", "rollout": {"device": "cpu", "num_gpus_per_worker": 0}}
    )
    with pytest.raises(error, match=pattern):
        load_config(path, [override])


def test_cross_field_rules() -> None:
    with pytest.raises(
        ValueError, match=r"rollout\.capture_routing: expected true with routing r3"
    ):
        config_from_dict({"model": "m", "routing": "r3", "rollout": {"capture_routing": False}})
    with pytest.raises(
        ValueError, match=r"trainer\.num_minibatches: expected a divisor of the batch"
    ):
        config_from_dict(
            {
                "model": "m",
                "grpo": {"prompts_per_step": 3, "group_size": 3},
                "trainer": {"num_minibatches": 2},
            }
        )
    with pytest.raises(ValueError, match=r"trainer\.num_gpus: expected 0 with device cpu"):
        config_from_dict({"model": "m", "trainer": {"device": "cpu"}})
    with pytest.raises(
        ValueError, match=r"rollout\.num_gpus_per_worker: expected > 0 with device cuda"
    ):
        config_from_dict({"model": "m", "rollout": {"num_gpus_per_worker": 0}})


def test_required_model_and_top_level_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model: expected a value \(required field\)"):
        config_from_dict({"routing": "none", "rollout": {"capture_routing": False}})
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping at the top level"):
        load_config(path)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match=r"lr: expected a float > 0"):
        TrainerConfig(lr=0.0)
    with pytest.raises(TypeError, match=r"micro_batch_size: expected an int, got str"):
        TrainerConfig(micro_batch_size="8")  # type: ignore[arg-type]
    assert TrainerConfig(lr=1).lr == 1.0


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(
        write_yaml(tmp_path, {"model": "m", "grpo": {"tis_cap": 3.0}, "routing": "none"}),
        check_model=False,
    )
    again = load_config(write_yaml(tmp_path, config_to_dict(config)), check_model=False)
    assert again == config


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.glob("*.yaml")))
def test_example_configs_load(name: str) -> None:
    # Their models are written by examples/sft_addition.py (or by the run itself):
    # tests/reliability/test_trainer_config_preflight.py checks them against such models.
    config = load_config(EXAMPLES / name, check_model=False)
    assert isinstance(config, TrainConfig)


def test_apply_overrides_refuses_to_descend_into_a_value() -> None:
    with pytest.raises(TypeError, match=r"seed: expected a section to set seed\.x in"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
