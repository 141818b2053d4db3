"""Where a crystal model puts its atoms: how well it denoises the training perovskites, what its
samples' collisions are, and how validity moves with the ODE step count.

    .venv/bin/python benchmarks/crystals/diagnose.py --label shipped_base --base domains/crystals/base
    .venv/bin/python benchmarks/crystals/diagnose.py --label geodesic_x0_4k --base runs/s22/GeodesicX0_4k --coupling geodesic

- Denoising: the 366 training perovskites all sit on the same five sites (A at (1/2, 1/2, 1/2), B at
  0, X on the face centres), so a model that has learnt them puts its clean estimate
  x0_hat = x_t - t v on those sites at any t. Reported per row (A, B and the three X) as the mean
  shortest periodic distance, in fractional units, between x0_hat and the crystal paired with the
  noise by the coupling the base was pretrained with (--coupling; the error is measured on the torus,
  so for the independent lift, whose pair is one of many images, too). A uniform guess is ~0.48 away.
- Collisions: of the samples on the held-out compositions (20 Euler steps, seed 12345, as
  evaluate_models.py), those with two atoms closer than 0.5 Å, split by whether the two are of one
  element, and counted per atom count.
- Steps: structural validity (the evaluator's, ``physics.structure_ok``) and the median shortest
  periodic distance at each Euler step count of --steps.

Writes benchmarks/results/diagnose_crystals_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.checkpoint import load_trained
from flowcoach.core.sampling.sampler import sample, time_grid
from flowcoach.domains.crystals import COUPLINGS, CrystalsDomain, physics, torus
from flowcoach.domains.crystals.data import N_MAX
from flowcoach.domains.crystals.decode import decode

ROOT = Path(__file__).resolve().parents[2]
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def denoising_errors(model, domain, seed: int = 0) -> dict:
    """Per perovskite row, the mean torus distance of x0_hat from the paired training crystal at each t."""
    x0, cond = domain.data("train")
    perovskite = (cond > 0).sum(1) == 5
    x0, cond = x0[perovskite][:400], cond[perovskite][:400]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in TIMES:
        eps = torch.randn(x0.shape, generator=g)
        paired = domain.couple(x0, eps, cond)
        x_t = (1 - t) * paired + t * eps
        with torch.no_grad():
            x0_hat = x_t - t * model(x_t, torch.full((len(x0),), t), cond)
        err = torus.periodic_displacement(torus.wrap(x0_hat[:, :5, :3]), torus.wrap(paired[:, :5, :3]))
        rows = err.norm(dim=-1).mean(0).tolist()
        out[str(t)] = {"A": rows[0], "B": rows[1], "X": float(np.mean(rows[2:])),
                       "lattice_rmse": float(((x0_hat - paired)[:, N_MAX, :6] ** 2).mean().sqrt())}
    return out


def samples(model, domain, n: int, steps: int, seed: int) -> list:
    cond = domain.eval_conditions(n)
    x1 = torch.randn((n, *domain.sample_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        rollout = sample(model, x1, time_grid(steps), cond, law="ode")
    return decode(rollout.states[:, -1])


def collisions(structures) -> dict:
    same, other, by_size, total = 0, 0, Counter(), Counter()
    for s in structures:
        total[len(s)] += 1
        d = s.distance_matrix + np.eye(len(s)) * 1e9
        i, j = np.unravel_index(d.argmin(), d.shape)
        if len(s) > 1 and d[i, j] < 0.5:
            by_size[len(s)] += 1
            same, other = (same + 1, other) if s[i].specie == s[j].specie else (same, other + 1)
    return {"same_element": same, "different_elements": other,
            "by_atom_count": {str(k): f"{by_size[k]} of {total[k]}" for k in sorted(total)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--base", required=True, help="a base folder (model.json, model.safetensors, base.json)")
    parser.add_argument("--coupling", choices=COUPLINGS, default="independent",
                        help="the coupling the base was pretrained with (its domain's)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = Path(args.base)
    domain = CrystalsDomain(sevenn=False, coupling=args.coupling)
    model = load_trained(domain, "base", str(base)).eval()
    domain.coupling = args.coupling  # over the model.json's: run folders from before it named one lack it
    cpu = time.process_time()
    by_steps = {}
    for steps in args.steps:
        structures = samples(model, domain, args.num_samples, steps, args.seed)
        d = np.array([0.0 if s is None else physics.min_periodic_distance(s) for s in structures])
        by_steps[str(steps)] = {"struct_valid": float(np.mean([physics.structure_ok(s) for s in structures])),
                                "median_shortest_distance": float(np.median(d))}
        if steps == 20:
            collided = collisions([s for s in structures if s is not None])
    record = {
        "label": args.label,
        "command": f"python benchmarks/crystals/diagnose.py --label {args.label} --base {args.base} "
                   f"--coupling {args.coupling} --num-samples {args.num_samples} --steps {' '.join(map(str, args.steps))} --seed {args.seed}",
        "coupling": domain.coupling,
        "denoising_error_per_row": denoising_errors(model, domain),
        "collisions_at_20_steps": collided if 20 in args.steps else None,
        "validity_by_euler_steps": by_steps,
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    out = ROOT / "benchmarks" / "results" / f"diagnose_crystals_{args.label}.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
