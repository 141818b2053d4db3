"""Evaluator metrics of molecule models (and of held-out QM9 itself) on N samples, with CPU time.

    .venv/bin/python benchmarks/molecules/evaluate_models.py --label base --checkpoint base   # --base DIR: another base
    .venv/bin/python benchmarks/molecules/evaluate_models.py --label rl --checkpoint runs/molecules__flow-grpo__0__...
    .venv/bin/python benchmarks/molecules/evaluate_models.py --label qm9-heldout --checkpoint data

Writes benchmarks/results/molecules_<label>.json. Samples use the held-out conditions
(atom and heavy-atom counts drawn from held-out QM9) and the deterministic Euler ODE sampler.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from flowcoach.core.checkpoint import load_trained
from flowcoach.core.trainer import evaluate_model
from flowcoach.domains.molecules import MoleculesDomain

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base', a run or checkpoint folder, or 'data'")
    parser.add_argument("--base", default=None, help="the base folder behind --checkpoint base (default: the shipped one)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    domain = MoleculesDomain()
    wall, cpu = time.perf_counter(), time.process_time()
    if args.checkpoint == "data":  # the held-out molecules themselves, decoded like samples
        x0, cond = domain.data("heldout")
        pick = torch.randperm(x0.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.num_samples]
        objects = domain.decode(x0[pick])  # a random subset: the split is sorted by QM9 index (by size)
        metrics = domain.evaluate(objects, cond[pick])
    else:
        model = load_trained(domain, args.checkpoint, base=args.base).eval()
        metrics, _, _ = evaluate_model(model, domain, args.num_samples, args.num_steps, seed=args.seed)
    record = {
        "label": args.label,
        "command": "python benchmarks/molecules/evaluate_models.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),  # a re-runnable command
        "checkpoint": args.checkpoint,
        "num_samples": args.num_samples,
        "ode_steps": args.num_steps,
        "seed": args.seed,
        "metrics": metrics,
        "eval_wall_s": round(time.perf_counter() - wall, 1),
        "eval_cpu_s": round(time.process_time() - cpu, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    out = ROOT / "benchmarks" / "results" / f"molecules_{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
