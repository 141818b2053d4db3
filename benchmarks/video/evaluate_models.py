"""Evaluator metrics of video models (and of the simulator's own clips) on held-out conditions, with CPU time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video/evaluate_models.py --label base --checkpoint base
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video/evaluate_models.py --label rl --checkpoint runs/video__flow-grpo__0__...
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video/evaluate_models.py --label simulator --checkpoint data

Writes benchmarks/results/video_<label>.json and the evaluated clips (GIF, MP4) under
runs/video__bench/<label>/. Held-out conditions: ``VideoDomain.eval_conditions`` (distinct initial
states, scenes in turn, 4 clips each); deterministic Euler ODE sampler. ``data`` renders those
conditions with the simulator (the ceiling of every metric, and a check of the evaluator).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.checkpoint import load_trained
from flowcoach.core.trainer import evaluate_model
from flowcoach.domains.video import VideoDomain, decode_clips, physics, to_pixels
from flowcoach.rewards import build_reward

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base', a run or checkpoint folder, or 'data'")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    domain = VideoDomain()
    wall, cpu = time.perf_counter(), time.process_time()
    if args.checkpoint == "data":
        cond = domain.eval_conditions(args.num_samples)
        objects = decode_clips(to_pixels(physics.render_batch(cond.numpy())))
        metrics = domain.evaluate(objects, cond)
        scores, _ = build_reward(domain.default_rewards())(objects, cond)
        metrics["reward_mean"] = float(scores.mean())
    else:
        model = load_trained(domain, args.checkpoint).eval()
        metrics, objects, scores = evaluate_model(model, domain, args.num_samples, args.num_steps, seed=args.seed)
    out_dir = ROOT / "runs" / "video__bench" / args.label
    domain.save(objects, scores, out_dir)
    record = {
        "label": args.label,
        "command": "python benchmarks/video/evaluate_models.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "checkpoint": args.checkpoint,
        "num_samples": args.num_samples,
        "distinct_conditions": len({tuple(c) for c in domain.eval_conditions(args.num_samples).tolist()}),
        "ode_steps": args.num_steps,
        "seed": args.seed,
        "metrics": metrics,
        "eval_wall_s": round(time.perf_counter() - wall, 1),
        "eval_cpu_s": round(time.process_time() - cpu, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, shared 2-core CPU",
    }
    out = ROOT / "benchmarks" / "results" / f"video_{args.label}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
