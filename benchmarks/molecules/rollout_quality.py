"""How valid are the RL rollouts of the molecules base, per sampler setting? (CPU, no training)

    .venv/bin/python benchmarks/molecules/rollout_quality.py --base domains/molecules/base-18k \
        --settings num_steps=10,noise_level=0.7 num_steps=20,noise_level=0.7,sde_window_size=3

Each setting is `field=value,...` over `flowcoach train molecules`'s sampler fields. For each it
collects the rollouts of RL steps 0..K-1 (16 groups of 8, as training does) from the base and scores
their final samples with the training rewards. The gated terms (QED, duplicates) give group signal
only where rollouts are valid, so this shows which sampler gives RL something to learn from.
Writes benchmarks/results/rollout_quality_molecules.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowcoach.core.algorithms import train_config
from flowcoach.core.checkpoint import load_base
from flowcoach.core.config import set_fields
from flowcoach.core.policy import FlowPolicy
from flowcoach.core.trainer import collect_rollout
from flowcoach.domains.molecules import MoleculesDomain
from flowcoach.rewards import build_reward

ROOT = Path(__file__).resolve().parents[2]


def parse_setting(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[f"sampler.{key}"] = float(value) if "." in value else int(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base folder (default: the shipped one)")
    parser.add_argument("--settings", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=2, help="RL steps of rollouts per setting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    domain = MoleculesDomain()
    model, _ = load_base(domain, args.base)
    policy = FlowPolicy(model.eval())
    reward_fn = build_reward(domain.default_rewards())
    rows = []
    for text in args.settings:
        cfg = train_config("molecules")
        set_fields(cfg, parse_setting(text))
        cpu = time.process_time()
        parts = []
        for step in range(args.steps):
            with torch.no_grad():
                rollout = collect_rollout(policy, domain, cfg, step, "cpu")
            _, info = reward_fn(domain.decode(rollout.samples), rollout.cond)
            parts.append(info["components"])
        comp = torch.cat(parts)
        row = {"setting": text, "samples": len(comp), "sampling_cpu_s": round(time.process_time() - cpu, 1)}
        row.update({name: round(float(comp[:, k].mean()), 4) for k, name in enumerate(reward_fn.names)})
        rows.append(row)
        print(json.dumps(row))
    out = ROOT / "benchmarks" / "results" / "rollout_quality_molecules.json"
    out.write_text(json.dumps({"command": "python benchmarks/molecules/rollout_quality.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if v is not None),  # a re-runnable command: --base None would not run
        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
