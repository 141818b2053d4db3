"""Evaluator metrics of crystal models (and of the held-out crystals themselves) on N samples, with CPU time.

    .venv/bin/python benchmarks/crystals/evaluate_models.py --label base --checkpoint base
    .venv/bin/python benchmarks/crystals/evaluate_models.py --label rl --checkpoint runs/benchmarks/crystals/crystals__flow-grpo__0__...
    .venv/bin/python benchmarks/crystals/evaluate_models.py --label heldout --checkpoint data
    .venv/bin/python benchmarks/crystals/evaluate_models.py --mode dng --label dng_base --checkpoint base
    .venv/bin/python benchmarks/crystals/evaluate_models.py --conditions validation --label val_rl --checkpoint <run>

Writes benchmarks/results/crystals_<label>.json. Samples use the held-out compositions (cycled) and
the deterministic Euler ODE sampler; ``--conditions validation`` uses a fixed pick of training
compositions instead, for choosing among checkpoints without looking at the held-out set (it leaves
out the metrics that compare to the held-out crystals, HELDOUT_REFERENCED). Stability
is the proxy (CHGNet energies on a hull of CHGNet energies of elemental references and the training
crystals), not the Materials Project hull.
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
from flowcoach.domains.crystals import CrystalsDNGDomain, CrystalsDomain

# metrics measured against the held-out crystals (their distributions, the structure of each held-out
# composition): a validation evaluation, on training compositions, drops them
HELDOUT_REFERENCED = ("density_wdist", "nelem_wdist", "element_tv", "csp_match_rate")
ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base', a run or checkpoint folder, or 'data'")
    parser.add_argument("--base", default=None, help="the base folder behind --checkpoint base (default: the shipped one)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sde-noise-level", type=float, default=None,
                        help="sample with the flow SDE at this level on the steps that start at t in "
                             "(--sde-t-min, --sde-t-max] (default: the deterministic ODE)")
    parser.add_argument("--sde-t-max", type=float, default=None)
    parser.add_argument("--sde-t-min", type=float, default=None)
    parser.add_argument("--mode", choices=("csp", "dng"), default="csp",
                        help="csp: structure prediction (types given); dng: de novo (types generated)")
    parser.add_argument("--conditions", choices=("heldout", "validation"), default="heldout",
                        help="heldout: the reported compositions; validation: training compositions, for "
                             "choosing a checkpoint without looking at the held-out ones")
    args = parser.parse_args()
    if args.checkpoint == "data" and args.conditions == "validation":
        parser.error("--checkpoint data evaluates the held-out crystals; --conditions validation needs a model")
    torch.set_num_threads(args.threads)
    sde = None if args.sde_noise_level is None else (
        args.sde_noise_level, 1.0 if args.sde_t_max is None else args.sde_t_max, args.sde_t_min or 0.0)
    domain = CrystalsDomain() if args.mode == "csp" else CrystalsDNGDomain()
    wall, cpu = time.perf_counter(), time.process_time()
    if args.checkpoint == "data":  # the held-out crystals themselves, decoded like samples
        x0, cond = domain.data("heldout")
        idx = torch.arange(args.num_samples) % x0.shape[0]
        metrics = domain.evaluate(domain.decode(x0[idx]), cond[idx])
    else:
        model = load_trained(domain, args.checkpoint, args.base).eval()
        cond = domain.validation_conditions(args.num_samples) if args.conditions == "validation" else None
        metrics, _, _ = evaluate_model(model, domain, args.num_samples, args.num_steps, seed=args.seed, cond=cond, sde=sde)
        if args.conditions == "validation":  # these compare to the held-out crystals: meaningless here
            metrics = {k: v for k, v in metrics.items() if k not in HELDOUT_REFERENCED}
    record = {
        "label": args.label,
        "command": "python benchmarks/crystals/evaluate_models.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),  # a re-runnable command
        "checkpoint": args.checkpoint,
        "conditions": args.conditions,
        "num_samples": args.num_samples,
        "ode_steps": args.num_steps,
        "sde": None if sde is None else dict(zip(("noise_level", "t_max", "t_min"), sde)),  # as sampled
        "seed": args.seed,
        "metrics": metrics,
        "eval_wall_s": round(time.perf_counter() - wall, 1),
        "eval_cpu_s": round(time.process_time() - cpu, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    out = ROOT / "benchmarks" / "results" / f"crystals_{args.label}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
