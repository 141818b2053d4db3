"""Which sampling steps decide a crystal model's collisions, and what noise on which steps undoes them.

    .venv/bin/python benchmarks/crystals/sde_window.py --label base_struct
    .venv/bin/python benchmarks/crystals/sde_window.py --label rl_s0_100 --checkpoint <run>/checkpoints/checkpoint-100

On the held-out compositions (each twice, with two draws of the initial noise; 10 steps, seed 12345),
structural validity (the evaluator's ``physics.structure_ok``; no CHGNet) of:
- the ODE, by the initial noise's closest atom pair (periodic, fractional, times the cube root of the
  atom count so a value of ~0.5 is a typical neighbour): whether the noise decides the collisions;
- the flow SDE (--noise-level, 0.3, on every step) from the same initial noise, three draws: how many of the ODE's
  collided samples a little noise on the way undoes;
- the flow SDE on one window of times (t_min, t_max], ODE elsewhere (the ``--sde-*`` flags of
  evaluate_models.py and `flowcoach eval`), for each window of --windows: where the noise must be;
- the ODE from initial noise redrawn until its closest pair is at least R, for each R of
  --hard-core (a hard-core prior): whether keeping the noise's atoms apart keeps the samples' apart.

Writes benchmarks/results/crystals_sde_window_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.checkpoint import load_trained
from flowcoach.core.sampling.sampler import sample, time_grid
from flowcoach.core.trainer import generate
from flowcoach.domains.crystals import CrystalsDomain, physics, torus
from flowcoach.domains.crystals.data import N_MAX

ROOT = Path(__file__).resolve().parents[2]
BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, float("inf"))
WINDOWS = ("0.85-1", "0.75-1", "0.35-0.75", "0.1-0.55", "0.1-0.35", "0-0.25", "0.1-1", "0-1")


def valid(domain, x: torch.Tensor) -> np.ndarray:
    return np.array([physics.structure_ok(s) for s in domain.decode(x)])


def closest_initial_pair(x1: torch.Tensor, cond: torch.Tensor) -> np.ndarray:
    """Each sample's closest pair of real atoms in its initial noise (wrapped fractional coordinates),
    scaled by the cube root of its atom count."""
    real = cond > 0
    f = torus.wrap(x1[:, :N_MAX, :3])
    dist = torus.periodic_displacement(f[:, :, None], f[:, None]).norm(dim=-1)
    pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(N_MAX, dtype=torch.bool)
    closest = torch.where(pairs, dist, torch.full_like(dist, float("inf"))).flatten(1).min(1).values
    return (closest * real.sum(1).float() ** (1 / 3)).numpy()


def hard_core_noise(x1: torch.Tensor, cond: torch.Tensor, r: float, generator: torch.Generator) -> torch.Tensor:
    """x1 with each sample whose closest initial pair (``closest_initial_pair``) is under r redrawn
    until it is not: the Gaussian prior conditioned on no two atoms closer than r."""
    x1 = x1.clone()
    while (close := torch.from_numpy(closest_initial_pair(x1, cond) < r)).any():
        x1[close] = torch.randn((int(close.sum()), *x1.shape[1:]), generator=generator)
    return x1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base' or a run or checkpoint folder")
    parser.add_argument("--base", default=None, help="the base folder behind --checkpoint base (default: the shipped one)")
    parser.add_argument("--num-conditions", type=int, default=500)
    parser.add_argument("--noise-level", type=float, default=0.3)
    parser.add_argument("--windows", nargs="+", default=list(WINDOWS), help="t_min-t_max of the SDE windows")
    parser.add_argument("--hard-core", nargs="+", type=float, default=[0.3, 0.4, 0.5],
                        help="closest-pair minima of the initial noise (the scale of the bins)")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    torch.set_num_threads(1)
    domain = CrystalsDomain(sevenn=False)
    model = load_trained(domain, args.checkpoint, args.base).eval()
    cond = domain.eval_conditions(args.num_conditions).repeat(2, 1)
    cpu = time.process_time()

    def run(noise=0.0, t_min=0.0, t_max=1.0):
        with torch.no_grad():
            return valid(domain, generate(model, domain, cond, 10, seed=args.seed, sde_noise_level=noise,
                                          sde_t_min=t_min, sde_t_max=t_max))

    ode = run()
    x1 = torch.randn((len(cond), *domain.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    closest = closest_initial_pair(x1, cond)  # generate draws its initial noise first from the same seed
    by_pair = {}
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (closest >= lo) & (closest < hi)
        by_pair[f"[{lo}, {hi})"] = {"samples": int(sel.sum()), "invalid": float(1 - ode[sel].mean()) if sel.any() else None}
    # the SDE on every step from the same initial noise, three draws of the steps' noise
    repeats = [valid(domain, _sde_from(model, domain, cond, x1, args.noise_level, k)) for k in range(3)]
    undone = float(np.mean([r[~ode].mean() for r in repeats])) if (~ode).any() else None
    windows = {}
    for w in args.windows:
        t_min, t_max = (float(v) for v in w.split("-"))
        windows[w] = float(run(args.noise_level, t_min, t_max).mean())
    hard_core = {}
    for r in args.hard_core:
        x1_apart = hard_core_noise(x1, cond, r, torch.Generator().manual_seed(args.seed + 1))
        with torch.no_grad():
            samples = sample(model, x1_apart, time_grid(10), cond, law="ode", noise_level=0.0).samples
        hard_core[str(r)] = float(valid(domain, samples).mean())
    record = {
        "label": args.label,
        "command": "python benchmarks/crystals/sde_window.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None),
        "samples": len(cond),
        "ode_struct_valid": float(ode.mean()),
        "ode_invalid_by_initial_closest_pair": by_pair,
        "sde_every_step_struct_valid": float(np.mean(repeats)),
        "ode_collided_valid_under_sde": undone,
        "ode_valid_invalid_under_sde": float(np.mean([1 - r[ode].mean() for r in repeats])),
        "sde_window_struct_valid": windows,
        "hard_core_ode_struct_valid": hard_core,
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    out = ROOT / "benchmarks" / "results" / f"crystals_sde_window_{args.label}.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def _sde_from(model, domain, cond, x1: torch.Tensor, noise_level: float, seed: int) -> torch.Tensor:
    """The flow SDE on every step from the given initial noise, step noise from ``seed``."""
    with torch.no_grad():
        return sample(model, x1, time_grid(10), cond, law="flow-sde", noise_level=noise_level,
                      generator=torch.Generator().manual_seed(seed)).samples


if __name__ == "__main__":
    main()
