"""Per-element credit (--loss.element-weight) against one advantage per sample, on the toy domain.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/element_credit/run.py            # 3 seeds x weights 0, 1

The toy's reward is a product over its two coordinates (``rewards.toy.mode_reward_factors``), so each
coordinate's factor is an exact per-element credit. Every run is `flowcoach train toy` with the given
element weight; held-out reward and target hit rate every --eval-every steps. Writes
benchmarks/results/element_credit_toy.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from flowcoach.core.algorithms import train_config
from flowcoach.core.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def run_one(weight: float, seed: int, args, out: Path) -> dict:
    cfg = train_config("toy", "flow-grpo")
    cfg.seed, cfg.steps, cfg.eval_every, cfg.eval_samples = seed, args.steps, args.eval_every, args.eval_samples
    cfg.loss.element_weight = weight
    cfg.output_dir, cfg.tensorboard, cfg.sample_every, cfg.checkpoint_every = str(out), False, 0, 10_000
    cpu = time.process_time()
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/reward_mean" in r]
    return {"weight": weight, "seed": seed, "cpu_s": time.process_time() - cpu,
            "eval_steps": [r["step"] for r in evals],
            "eval_reward": [r["eval/reward_mean"] for r in evals],
            "eval_target_hit_rate": [r["eval/target_hit_rate"] for r in evals],
            "eval_modes_covered": [r["eval/modes_covered"] for r in evals]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--output", default="/tmp/element_credit_runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [run_one(w, s, args, Path(args.output)) for w in args.weights for s in args.seeds]
    record = {"command": "python " + " ".join(sys.argv), "runs": runs, "torch": torch.__version__,
              "machine": f"{platform.machine()}, 1 thread"}
    path = ROOT / "benchmarks" / "results" / "element_credit_toy.json"
    path.write_text(json.dumps(record, indent=2))
    steps = runs[0]["eval_steps"]
    print("| element weight | " + " | ".join(f"reward @ {s}" for s in steps) + " | hit rate @ end | modes |")
    print("|---|" + "---|" * (len(steps) + 2))
    for w in args.weights:
        mine = [r for r in runs if r["weight"] == w]
        cells = [f"{statistics.mean(r['eval_reward'][k] for r in mine):.3f}" for k in range(len(steps))]
        hit = statistics.mean(r["eval_target_hit_rate"][-1] for r in mine)
        modes = statistics.mean(r["eval_modes_covered"][-1] for r in mine)
        print(f"| {w:g} | " + " | ".join(cells) + f" | {hit:.3f} | {modes:.1f} |")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
