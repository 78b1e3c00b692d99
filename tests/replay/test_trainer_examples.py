"""The trainer's example scripts run on CPU: supervised warm-up, the experiment, a custom loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], cwd: Path, timeout: int = 240) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_sft_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    stdout = run(
        [
            str(ROOT / "examples" / "sft_addition.py"),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--batch-size",
            "16",
            "--eval-size",
            "32",
        ],
        tmp_path,
    )
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and 0.0 <= summary["sampled_accuracy"] <= 1.0
    assert summary == json.loads((out / "sft_summary.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_experts == 8 and (out / "tokenizer.json").exists()


def run_experiment(out: Path, tmp_path: Path, *args: str) -> str:
    """``r3_experiment.py`` on the tiny CPU config into ``out`` (model under ``tmp_path``), quiet
    and without checkpoints; its stdout."""
    sets = ["log.progress=false", "log.checkpoint_every=0", "log.tensorboard=false"]
    return run(
        [
            str(ROOT / "examples" / "r3_experiment.py"),
            "--config",
            str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"),
            "--out",
            str(out),
            *args,
            "--set",
            f"model={tmp_path / 'model'}",
            *(arg for value in sets for arg in ("--set", value)),
        ],
        tmp_path,
        timeout=300,
    )


@pytest.mark.slow
def test_experiment_runs_every_mode_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "experiment"
    stdout = run_experiment(out, tmp_path)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert set(summary["modes"]) == {"none", "r3", "r2"}
    assert (out / "r3_experiment.png").stat().st_size > 10_000
    modes = summary["modes"]
    assert modes["r3"]["router_agreement_mean"] == 1.0
    # Step 1 of every mode: same weights, same problems, same sampling seeds.
    assert (
        modes["none"]["reward_first"] == modes["r3"]["reward_first"] == modes["r2"]["reward_first"]
    )
    assert "kl_k3_step1_ratio_r3_over_none" in summary


@pytest.mark.slow
def test_experiment_deterministic_modes_reproduce_the_rollout(tmp_path: Path) -> None:
    """The true on-policy mode through the Ray training loop: with a deterministic engine and
    the engine's policy, KL and F(2) are exactly 0 at every step, replayed or not (under
    ``none`` the second minibatch's forward, after an optimizer step, may route otherwise:
    ``router_agreement`` counts it, the pre-update ``router_agreement_native`` is 1)."""
    out = tmp_path / "experiment"
    stdout = run_experiment(out, tmp_path, "--modes", "r3-deterministic", "none-deterministic")
    modes = json.loads(stdout.strip().splitlines()[-1])["modes"]
    for mode in ("r3-deterministic", "none-deterministic"):
        assert modes[mode]["kl_k3_mean"] == 0.0, (mode, modes[mode])
        assert modes[mode]["extreme_token_fraction_mean"] == 0.0, mode
        # The pre-update policy routes natively exactly as the rollout did (equal logits).
        assert modes[mode]["router_agreement_native_mean"] == 1.0, mode
    assert modes["r3-deterministic"]["router_agreement_mean"] == 1.0


# Runs examples/custom_loop.py (argv[1]) up to its shutdown, then checks what its loop is for on
# one more rollout: the experts received the rollout's ids under replay, the weights changed,
# and the engine generates with the trained ones (its logprobs, read back with every token's
# experts replayed, are the trained model's, not the initial one's). Prints them as JSON.
CUSTOM_LOOP_CHECK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    source = Path(sys.argv[1]).read_text()
    loop, tail = source.rsplit("workers.shutdown()\\n", 1)
    assert tail == "ray.shutdown()\\n", tail
    exec(compile(loop, sys.argv[1], "exec"))

    from replay.expert_tap import ExpertsTap
    from replay.layout import BatchLayout

    def logprobs(policy, controller, t):
        with torch.no_grad(), controller.replay(batch.traces, attention_mask=t.attention_mask_BS):
            logits = policy(t.input_ids_BS, attention_mask=t.attention_mask_BS).logits
        return token_logprobs(logits, t.input_ids_BS)

    def engine_gap(logp_BS, t):
        return float((t.rollout_logp_BS - logp_BS)[t.answer_mask_BS].abs().max())

    initial = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    start = dict(initial.named_parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    batch = workers.generate(["The answer is"] * 8, sampling)
    t = batch.to_tensors()
    with ExpertsTap(ctl) as tap:
        trained = logprobs(model, ctl, t)
    used = tap.traces(BatchLayout.from_attention_mask(t.attention_mask_BS))
    print(json.dumps({
        "router_agreement": replay.router_agreement(batch.traces, used).overall,
        "changed": changed,
        "parameters": list(start),
        "engine_vs_trained": engine_gap(trained, t),
        "engine_vs_initial": engine_gap(logprobs(initial, replay.patch(initial), t), t),
        "weights_versions": workers.weights_versions(),
    }))
    workers.shutdown()
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_custom_loop_replays_trains_and_syncs_the_engine(tmp_path: Path) -> None:
    stdout = run(["-c", CUSTOM_LOOP_CHECK, str(ROOT / "examples" / "custom_loop.py")], tmp_path)
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 1", "step 2"]
    check = json.loads(stdout.strip().splitlines()[-1])
    assert check["router_agreement"] == 1.0
    routers = [n for n in check["parameters"] if n.endswith(".mlp.gate.weight")]
    assert routers and set(routers) <= set(check["changed"])  # the routers learn under replay
    assert "lm_head.weight" in check["changed"]
    assert check["weights_versions"] == [3]
    assert check["engine_vs_trained"] < 1e-4 < check["engine_vs_initial"]
