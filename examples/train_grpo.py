"""Train a policy with GRPO and rollout routing replay on Ray, as a YAML config says.

    python examples/train_grpo.py --config examples/configs/tiny_cpu.yaml
    python examples/train_grpo.py --config examples/configs/toy_addition.yaml --set routing=none
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python examples/train_grpo.py \
        --config <yaml> --set log.out_dir=$PWD/runs/<name>

Without a cluster address this starts a local Ray; under ``ray job submit`` (which sets
RAY_ADDRESS) or with ``--address`` it joins that cluster. ``--set section.field=value``
overrides one config value (repeatable; the value is YAML: ``--set trainer.lr=1.0e-5``).
The last line printed is a JSON summary of the run, with the absolute paths of its outputs
(a relative ``log.out_dir`` is taken against the directory this script runs in, which under
``ray job submit`` is Ray's unpacked copy of the working directory: give an absolute one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import ray

from replay.trainer import load_config, train
from replay.trainer.checkpoint import latest_checkpoint
from replay.trainer.metrics_log import METRICS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (examples/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set trainer.lr=1.0e-5 (repeatable)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS if set, else a new local Ray)",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config(args.config, args.overrides)

    address = args.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    ray.init(address=address, include_dashboard=False if address is None else None)
    try:
        records = train(config)
    finally:
        ray.shutdown()
    last = records[-1] if records else {}
    out_dir = config.log.out_path()
    checkpoint = latest_checkpoint(out_dir)
    summary = {
        "out_dir": str(out_dir),
        "metrics": str(out_dir / METRICS_FILE),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "routing": config.routing,
        "steps_run": len(records),
        "step": last.get("step"),
        "reward_mean": last.get("reward_mean"),
        "kl_k3": last.get("kl_k3"),
        "kl_k3_max": max((r["kl_k3"] for r in records), default=None),
        "router_agreement": last.get("router_agreement"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
