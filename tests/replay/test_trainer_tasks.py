"""replay.trainer.tasks: the character tokenizer, addition problems, rewards, the toy model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
import transformers

import replay
from replay.trainer.tasks import (
    EOS_TOKEN,
    AdditionModelSpec,
    AdditionTask,
    Problem,
    char_tokenizer,
    make_addition_model,
)

TINY = AdditionModelSpec(
    num_layers=2,
    num_experts=8,
    top_k=2,
    hidden_size=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    moe_intermediate_size=16,
)


def test_char_tokenizer_one_token_per_character() -> None:
    tok = char_tokenizer()
    text = "907+15="
    encoding = tok.encode(text)
    assert encoding.tokens == list(text)
    assert len(set(tok.encode("0123456789+=").ids)) == 12
    assert tok.token_to_id(EOS_TOKEN) == 0
    # Decoding joins characters and drops eos.
    assert tok.decode(tok.encode("922").ids + [0]) == "922"
    assert tok.decode(encoding.ids) == text


def test_tokenizer_survives_save_and_load(tmp_path: Path) -> None:
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    loaded = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert loaded.encode("12+34=").ids == char_tokenizer().encode("12+34=").ids


def test_problems_and_digit_ranges() -> None:
    problem = Problem(a=12, b=34)
    assert (problem.prompt, problem.answer) == ("12+34=", "46")
    task = AdditionTask(min_digits=2, max_digits=3)
    problems = task.sample(500, np.random.default_rng(0))
    lengths = {len(str(x)) for p in problems for x in (p.a, p.b)}
    assert lengths == {2, 3}
    same = task.sample(5, np.random.default_rng(1)) == task.sample(5, np.random.default_rng(1))
    assert same


def test_reward_exact_unfinished_and_partial() -> None:
    problem = Problem(a=48, b=57)  # 105
    strict = AdditionTask()
    assert strict.reward(problem, "105", finished=True) == 1.0
    assert strict.reward(problem, "105", finished=False) == 0.0  # never wrote eos
    assert strict.reward(problem, "106", finished=True) == 0.0
    lenient = AdditionTask(partial_credit=0.5)
    assert lenient.reward(problem, "105", finished=True) == 1.0
    assert lenient.reward(problem, "106", finished=True) == pytest.approx(0.5 * 2 / 3)
    assert lenient.reward(problem, "1050", finished=True) == pytest.approx(0.5 * 3 / 4)
    assert lenient.reward(problem, "", finished=True) == 0.0
    rewards = lenient.rewards([problem, problem], ["105", "9"], [True, True])
    assert rewards.dtype == np.float32 and rewards.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="completions: expected 2"):
        lenient.rewards([problem, problem], ["105"], [True])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"min_digits": 0}, "min_digits"),
        ({"min_digits": 3, "max_digits": 2}, "max_digits"),
        ({"partial_credit": 1.0}, "partial_credit"),
    ],
)
def test_task_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        AdditionTask(**kwargs)


def test_spec_errors() -> None:
    with pytest.raises(ValueError, match="top_k: expected <= num_experts"):
        AdditionModelSpec(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="vocab_size: expected >= the tokenizer's 14"):
        AdditionModelSpec(vocab_size=8)
    with pytest.raises(ValueError, match="num_kv_heads: expected a divisor"):
        AdditionModelSpec(num_heads=4, num_kv_heads=3)


def test_model_is_an_hf_checkpoint_the_engine_and_replay_accept(tmp_path: Path) -> None:
    import rollout

    model = make_addition_model(tmp_path, TINY, seed=3)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "tokenizer.json"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    ctl = replay.patch(loaded)
    assert ctl.moe_layers == (0, 1) and ctl.num_experts == 8 and ctl.top_k == 2
    llm = rollout.LLM(tmp_path, device="cpu", max_num_seqs=4, max_model_len=32)
    try:
        assert llm.routing_spec.moe_layers == (0, 1)
        out = llm.generate(
            ["12+34="], rollout.SamplingParams(max_tokens=6, seed=0), use_tqdm=False
        )[0]
    finally:
        llm.shutdown()
    assert out.prompt_token_ids == char_tokenizer().encode("12+34=").ids
    # The engine decodes with the saved tokenizer: digits and operators only, eos dropped.
    assert out.text == char_tokenizer().decode(out.token_ids)
    assert out.finish_reason in ("stop", "length")
    same = make_addition_model(tmp_path / "again", TINY, seed=3)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters(), strict=True)
    )
