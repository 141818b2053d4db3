"""Scripted expert, BC base and RL-tuned policy on the same held-out reset seeds (and OOD placements).

    .venv/bin/python benchmarks/grasping/evaluate.py --run runs/<grasping RL run> --out benchmarks/results/grasping.json

Seeds are the domain's eval conditions (1_000_000 + k, k < --seeds); the policies run the
deterministic ODE sampler with --num-steps denoising steps per chunk, as `flowcoach train` evaluates.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.checkpoint import load_base, load_trained
from flowcoach.core.interact import wilson_interval
from flowcoach.core.trainer import evaluate_model
from flowcoach.domains.grasping import GraspingDomain
from flowcoach.domains.grasping.env import GraspEnv
from flowcoach.domains.grasping.expert import GraspExpert, evaluate_expert, run_episode


def summary(successes: list[bool], steps_to_success: list[int]) -> dict:
    """Success rate with its 95% Wilson interval and mean steps of the successes."""
    low, high = wilson_interval(int(sum(successes)), len(successes))
    return {"success_rate": float(np.mean(successes)), "success_ci_low": low, "success_ci_high": high,
            "mean_steps_to_success": float(np.mean(steps_to_success)) if steps_to_success else float("nan"),
            "episodes": len(successes)}


def expert_on(seeds: list[int], options: dict | None) -> dict:
    """The noise-free scripted expert on given reset seeds (its mode drawn from a per-seed rng)."""
    env, expert = GraspEnv(), GraspExpert()
    runs = [run_episode(env, expert, s, np.random.default_rng(s), options=options) for s in seeds]
    env.close()
    return summary([r["success"] for r in runs], [len(r["actions"]) for r in runs if r["success"]])


def policy_figures(model, domain, n: int, num_steps: int) -> dict:
    start = time.process_time()
    metrics, _, _ = evaluate_model(model.eval(), domain, n, num_steps)
    keys = ("success_rate", "success_ci_low", "success_ci_high", "mean_steps_to_success")
    return {"eval": {k: metrics[k] for k in keys} | {"episodes": n},
            "ood": {k: metrics[f"ood/{k}"] for k in keys} | {"episodes": n},
            "denoising_steps_per_action": metrics["denoising_steps_per_action"],
            "eval_cpu_seconds": round(time.process_time() - start, 1)}


def run_cpu_seconds(run: Path) -> dict:
    """Wall seconds the RL run spent sampling, scoring and training (metrics.jsonl), and its config."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    spent = sum(r.get("time/sample_s", 0) + r.get("time/reward_s", 0) + r.get("time/train_s", 0) for r in rows)
    return {"steps": rows[-1]["step"], "rl_loop_seconds": round(spent, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="RL run folder (its newest checkpoint); omit for expert + base only")
    p.add_argument("--base", type=Path, default=None, help="base folder (default: the shipped one)")
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--wall-seconds", type=float, default=None, help="measured wall time of the RL command")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/grasping.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    domain = GraspingDomain()
    seeds = domain.eval_conditions(args.seeds).tolist()
    base_model, base_record = load_base(domain, args.base)
    result = {
        "held_out_seeds": f"{seeds[0]}..{seeds[-1]} ({len(seeds)})",
        "expert": {"eval": expert_on(seeds, None), "ood": expert_on(seeds, {"ood": True}),
                   "noisy_0.3_own_seeds": evaluate_expert(200, seed=0, noise_std=0.3)["success_rate"]},
        "bc_base": policy_figures(base_model, domain, args.seeds, args.num_steps)
        | {"pretrain_command": base_record.get("command"), "pretrain_cpu_seconds": base_record.get("cpu_seconds"),
           "demos": f"{domain.num_demo_episodes} episodes, action noise {domain.demo_noise}, stride {domain.stride}"},
        "torch": torch.__version__, "machine": platform.machine(),
    }
    if args.run is not None:
        tuned = load_trained(domain, args.run, args.base)
        config = (args.run / "config.yaml").read_text()
        result["rl_tuned"] = policy_figures(tuned, domain, args.seeds, args.num_steps) | run_cpu_seconds(args.run) | {
            "run": args.run.name, "config_yaml": config, "wall_seconds": args.wall_seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name in ("expert", "bc_base", "rl_tuned"):
        if name in result:
            e, o = result[name]["eval"], result[name]["ood"]
            print(f"{name:9s} held-out {e['success_rate']:.3f} [{e['success_ci_low']:.3f}, {e['success_ci_high']:.3f}]"
                  f"  OOD {o['success_rate']:.3f}  steps to success {e['mean_steps_to_success']:.1f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
