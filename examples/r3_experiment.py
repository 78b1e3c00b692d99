"""Run GRPO with routing ``none``, ``r3`` and ``r2`` from the same checkpoint and seeds, then
plot reward and KL(rollout || train) over steps and write a JSON summary.

A mode ``<routing>-deterministic`` (``none-deterministic``, ``r3-deterministic``) adds the true
on-policy mode: a deterministic rollout engine and the engine's own policy as the trainer
(``rollout.deterministic=true``, ``trainer.policy=engine``, ``trainer.compute_dtype=float32``:
the policy computes in the rollout's dtype over float32 master weights)::

    python examples/r3_experiment.py --config examples/configs/toy_addition.yaml \
        --out runs/addition/det --modes none r3 none-deterministic r3-deterministic

    python examples/sft_addition.py --out runs/addition/sft
    python examples/r3_experiment.py --config examples/configs/toy_addition.yaml \
        --out runs/addition/r3

Each mode runs ``examples/train_grpo.py``'s loop (``replay.trainer.train``) into
``<out>/<mode>/``. Step 1 of every mode samples the same problems with the same seeds from the
same weights, so its mismatch numbers compare the modes on identical rollouts; later steps
follow each mode's own policy. Writes ``<out>/r3_experiment.png`` (reward, k3 KL, the fraction
of tokens with p_train/p_rollout beyond [1/2, 2], router agreement) and
``<out>/summary.json``, and prints the summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import ray
from matplotlib.figure import Figure

from replay.trainer import load_config, read_metrics, train

MODES = ("none", "r3", "r2", "none-deterministic", "r3-deterministic")
DEFAULT_MODES = ("none", "r3", "r2")
COLORS = {
    "none": "tab:red",
    "r3": "tab:green",
    "r2": "tab:blue",
    "none-deterministic": "tab:orange",
    "r3-deterministic": "tab:olive",
}
# What a mode's "-deterministic" suffix sets on top of its routing.
DETERMINISTIC = (
    "rollout.deterministic=true",
    "trainer.policy=engine",
    "trainer.compute_dtype=float32",
)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-mode numbers: first/last reward, mean mismatch over all steps, step 1's mismatch."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in records if key in r]
        return float(np.mean(values)) if values else None

    tail = records[-max(1, len(records) // 5) :]
    return {
        "steps": len(records),
        "reward_first": records[0]["reward_mean"],
        "reward_last": records[-1]["reward_mean"],
        "reward_last_20pct": float(np.mean([r["reward_mean"] for r in tail])),
        "accuracy_last_20pct": float(np.mean([r["accuracy"] for r in tail])),
        "kl_k3_mean": mean("kl_k3"),
        "kl_k3_step1": records[0]["kl_k3"],
        "extreme_token_fraction_mean": mean("extreme_token_fraction"),
        "extreme_token_fraction_step1": records[0]["extreme_token_fraction"],
        "router_agreement_mean": mean("router_agreement"),
        "router_agreement_native_mean": mean("router_agreement_native"),
        "time_step_s_mean": mean("time_step_s"),
        "time_rollout_s_mean": mean("time_rollout_s"),
        "time_train_s_mean": mean("time_train_s"),
        "time_sync_s_mean": mean("time_sync_s"),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    figure = Figure(figsize=(12, 8), layout="constrained")
    axes = figure.subplots(2, 2)
    panels = [
        (axes[0, 0], "reward_mean", "reward (mean over answers)", False),
        (axes[0, 1], "kl_k3", "KL(rollout || train), k3", True),
        (axes[1, 0], "extreme_token_fraction", "F(2): tokens with max(r, 1/r) > 2", False),
        (axes[1, 1], "router_agreement", "router agreement: rollout vs experts used", False),
    ]
    for ax, key, title, log in panels:
        for mode, records in runs.items():
            steps = [r["step"] for r in records if key in r]
            values = [r[key] for r in records if key in r]
            if log:
                values = [max(v, 1e-12) for v in values]  # a zero is drawn at the axis floor
            ax.plot(steps, values, label=mode, color=COLORS[mode])
            if key == "router_agreement":
                native = [r.get("router_agreement_native") for r in records]
                if all(v is not None for v in native):
                    ax.plot(
                        steps, native, color=COLORS[mode], linestyle=":", label=f"{mode} (native)"
                    )
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.legend()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (examples/configs/*.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="experiment folder")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every mode (repeatable), e.g. --set steps=30",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    # Every mode's config is checked before Ray starts, not after the previous modes ran.
    configs = {}
    for mode in args.modes:
        routing, _, deterministic = mode.partition("-")
        overrides = [*args.overrides, f"routing={routing}", f"log.out_dir={args.out / mode}"]
        if deterministic:
            overrides.extend(DETERMINISTIC)
        if routing != "r3":
            # Capture stays on so that router agreement is measured in every mode.
            overrides.append("rollout.capture_routing=true")
        configs[mode] = load_config(args.config, overrides)

    address = args.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    ray.init(address=address, include_dashboard=False if address is None else None)
    runs = {}
    try:
        for mode, config in configs.items():
            train(config)
            runs[mode] = read_metrics(args.out / mode)
    finally:
        ray.shutdown()

    plot(runs, args.out / "r3_experiment.png")
    modes = {mode: summarize(records) for mode, records in runs.items()}
    summary: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "modes": modes}
    if "none" in modes and "r3" in modes:
        summary["kl_k3_mean_ratio_r3_over_none"] = ratio(
            modes["r3"]["kl_k3_mean"], modes["none"]["kl_k3_mean"]
        )
        summary["kl_k3_step1_ratio_r3_over_none"] = ratio(
            modes["r3"]["kl_k3_step1"], modes["none"]["kl_k3_step1"]
        )
        summary["extreme_fraction_step1_ratio_r3_over_none"] = ratio(
            modes["r3"]["extreme_token_fraction_step1"],
            modes["none"]["extreme_token_fraction_step1"],
        )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
