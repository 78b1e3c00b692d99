"""load_config checks the config against the model folder before Ray starts (issue 13, 7).

Before: ``rollout.max_tokens`` + the task's prompt length beyond ``rollout.max_model_len``, or a
``model`` folder that does not exist, were accepted and failed 20+ s later inside a Ray worker.
The checkpoint folders here hold what the checks read: config.json and tokenizer.json.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from replay.trainer.config import RolloutConfig, load_config
from replay.trainer.tasks import TINY_ADDITION_SPEC, AdditionModelSpec, char_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"
CPU = [
    "rollout.device=cpu",
    "rollout.num_gpus_per_worker=0",
    "trainer.device=cpu",
    "trainer.num_gpus=0",
]


def checkpoint(folder: Path, spec: AdditionModelSpec, *, tokenizer: bool = True) -> Path:
    """config.json (architecture and context length of ``spec``) and the char tokenizer."""
    config = spec.hf_config()
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.save_pretrained(folder)
    if tokenizer:
        char_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """An addition checkpoint of context length 40."""
    return checkpoint(tmp_path / "model", AdditionModelSpec(max_position_embeddings=40))


def load(model: Path, *overrides: str):
    return load_config(None, [f"model={model}", *CPU, *overrides])


# ---------------------------------------------------------------------- the reproductions


def test_max_tokens_beyond_the_context_length_is_refused(model: Path) -> None:
    # task.max_digits 3: the longest prompt "999+999=" is 8 tokens; 8 + 25 > 32.
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rollout.max_tokens: expected <= 24 (context length 32 (rollout.max_model_len) - "
            "the task's longest prompt '999+999=' of 8 tokens with task.max_digits 3), got 25"
        ),
    ):
        load(model, "rollout.max_model_len=32", "rollout.max_tokens=25", "task.max_digits=3")
    config = load(model, "rollout.max_model_len=32", "rollout.max_tokens=24", "task.max_digits=3")
    assert config.rollout.max_tokens == 24  # exactly full: accepted


def test_the_models_own_context_length_applies_without_max_model_len(model: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"rollout\.max_tokens: expected <= 34 \(context length 40 \(.*config\.json: "
        r"max_position_embeddings 40\) - the task's longest prompt '99\+99=' of 6 tokens",
    ):
        load(model, "rollout.max_tokens=35", "task.max_digits=2")
    assert load(model, "rollout.max_tokens=34", "task.max_digits=2").rollout.max_tokens == 34


@pytest.mark.parametrize("init", ["existing", None])
def test_a_model_folder_that_does_not_exist_is_refused(tmp_path: Path, init: str | None) -> None:
    missing = tmp_path / "no" / "such" / "model"
    extra = [] if init is None else [f"model_init={init}"]
    with pytest.raises(
        ValueError,
        match=r"^model: expected a checkpoint folder with config\.json, got "
        rf"'{re.escape(str(missing))}' \(no such folder; model_init: random_addition writes",
    ):
        load(missing, *extra)


def test_a_folder_without_config_or_tokenizer_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"^model: .*\(no config\.json in it;"):
        load(empty)
    no_tokenizer = checkpoint(tmp_path / "bare", AdditionModelSpec(), tokenizer=False)
    with pytest.raises(ValueError, match=r"^model: expected tokenizer\.json in .*bare"):
        load(no_tokenizer)
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"^model: expected a checkpoint folder, got .* \(a file\)"
    ):
        load(a_file, "model_init=random_addition")


def test_an_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "dense", AdditionModelSpec())
    text = (folder / "config.json").read_text().replace("Qwen3MoeForCausalLM", "LlamaForCausalLM")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"architectures: expected one of .*LlamaForCausalLM"):
        load(folder)


def test_max_model_len_beyond_the_model_is_refused(model: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"rollout\.max_model_len: expected <= the model's max_position_embeddings 40 "
        r"\(.*config\.json: max_position_embeddings 40\), got 41",
    ):
        load(model, "rollout.max_model_len=41")


def test_a_kv_cache_too_small_for_one_request_is_refused(model: Path) -> None:
    # Prompt 8 + max_tokens 9 - 1 = 16 tokens: 2 blocks of 8 (the engine's own count).
    fixed = ["task.max_digits=3", "rollout.max_tokens=9", "rollout.block_size=8"]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rollout.kv_cache_blocks: expected >= 2 (blocks of rollout.block_size 8 for the "
            "longest request: prompt 8 + max_tokens 9 - 1 tokens), got 1"
        ),
    ):
        load(model, *fixed, "rollout.kv_cache_blocks=1")
    assert load(model, *fixed, "rollout.kv_cache_blocks=2").rollout.kv_cache_blocks == 2


def test_random_addition_is_checked_against_the_model_it_will_write(tmp_path: Path) -> None:
    target = tmp_path / "to_be_written"
    limit = TINY_ADDITION_SPEC.max_position_embeddings
    with pytest.raises(
        ValueError, match=rf"rollout\.max_model_len: expected <= .* {limit} .*random addition"
    ):
        load(target, "model_init=random_addition", f"rollout.max_model_len={limit + 1}")
    config = load(target, "model_init=random_addition", "rollout.max_tokens=8")
    assert config.model == str(target) and not target.exists()  # checked, never written


def test_check_model_false_validates_the_values_alone(tmp_path: Path) -> None:
    config = load_config(None, ["model=elsewhere", *CPU], check_model=False)
    assert config.model == "elsewhere"


def test_a_constructed_rollout_config_bounds_max_tokens_by_max_model_len() -> None:
    with pytest.raises(
        ValueError, match=r"max_tokens: expected an int < max_model_len \(32; prompts take"
    ):
        RolloutConfig(max_model_len=32, max_tokens=32)
    assert RolloutConfig(max_model_len=32, max_tokens=31).max_tokens == 31


def test_cuda_ipc_needs_the_workers_and_the_trainer_on_one_gpu() -> None:
    """Before: accepted; the first weight sync failed in a worker that cannot see the GPU."""
    ipc = ["model=m", "trainer.weight_sync=cuda_ipc", "trainer.num_gpus=0.5"]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "trainer.weight_sync: expected 'object_store' when the trainer and the rollout "
            "workers cannot share one GPU (trainer.num_gpus 0.5 + rollout.num_workers 2 x "
            "rollout.num_gpus_per_worker 0.5 = 1.5 > 1;"
        ),
    ):
        load_config(None, [*ipc, "rollout.num_workers=2", "rollout.num_gpus_per_worker=0.5"])
    for workers, share in ((1, 0.5), (5, 0.1)):
        config = load_config(
            None,
            [*ipc, f"rollout.num_workers={workers}", f"rollout.num_gpus_per_worker={share}"],
            check_model=False,
        )
        assert config.trainer.weight_sync == "cuda_ipc"


# ---------------------------------------------------------------------- the examples


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.glob("*.yaml")))
def test_example_configs_fit_the_models_they_are_written_for(tmp_path: Path, name: str) -> None:
    """Each example config against the model its comments say to make (sft_addition.py's GPU
    preset for the toy configs; the random model ``model_init`` writes for tiny_cpu)."""
    text = (EXAMPLES / name).read_text()
    if "random_addition" in text:
        config = load_config(EXAMPLES / name, [f"model={tmp_path / 'written_by_the_run'}"])
    else:
        folder = checkpoint(tmp_path / "sft", AdditionModelSpec())
        config = load_config(EXAMPLES / name, [f"model={folder}"])
    assert config.rollout.max_tokens >= 1
