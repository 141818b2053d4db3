"""Where a molecule model's instability comes from: per-element bonding errors, the C-H length spread,
the sampler, how many unstable atoms are near-misses (a few pm from a bond threshold), and the
denoising error per flow time.

    .venv/bin/python benchmarks/molecules/diagnose.py --label base18k \
        --samplers euler:40 euler:100 heun:20 sde:40:0.5 sde:100:1.0

Each sampler setting is ``euler:STEPS``, ``heun:STEPS`` (deterministic) or ``sde:STEPS:A`` (the flow
SDE with noise level A on every step but the last). Samples use the held-out conditions and seed of
evaluate_models.py; the data row decodes as many held-out molecules the same way. Writes
benchmarks/results/diagnose_molecules_<label>.json.
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
from flowcoach.domains.molecules import MoleculesDomain
from flowcoach.domains.molecules.chem import (ATOM_TYPES, VALENCE, atom_stability, bond_orders, bond_thresholds,
                                              pair_distances)

ROOT = Path(__file__).resolve().parents[2]
TIMES = (0.01, 0.03, 0.1, 0.2, 0.4, 0.6, 0.8)


def bonding_errors(molecules) -> dict:
    """Per element: atoms, and the fractions whose bond orders sum below / above the valence; the
    C-H bond lengths' mean and std (each H's nearest C within 1.5 A)."""
    count, under, over, ch = {}, {}, {}, []
    for m in molecules:
        symbols = np.array(m.symbols)
        valence = m.orders.sum(axis=1)
        for el, v in VALENCE.items():
            pick = symbols == el
            count[el] = count.get(el, 0) + int(pick.sum())
            under[el] = under.get(el, 0) + int((valence[pick] < v).sum())
            over[el] = over.get(el, 0) + int((valence[pick] > v).sum())
        carbons = symbols == "C"
        if carbons.any():
            for i in np.flatnonzero(symbols == "H"):
                d = np.linalg.norm(m.positions[carbons] - m.positions[i], axis=1).min()
                if d < 1.5:
                    ch.append(d)
    per_element = {el: {"atoms": count[el], "under_bonded": under[el] / max(count[el], 1),
                        "over_bonded": over[el] / max(count[el], 1)} for el in VALENCE if count[el]}
    ch = np.array(ch)
    return {"per_element": per_element, "ch_length_mean": float(ch.mean()) if ch.size else None,
            "ch_length_std": float(ch.std()) if ch.size else None}


def threshold_distance(types: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[n] per atom: how far (A) its nearest pair distance is from a bond-order threshold of EDM's rule
    (tabulated length + margin, for every order the pair has). Small = a few pm decide its bonds."""
    gap = np.abs(pair_distances(positions) - bond_thresholds(types))
    gap = np.where(np.isnan(gap), np.inf, gap).min(axis=0)
    np.fill_diagonal(gap, np.inf)
    return gap.min(axis=1) if len(types) > 1 else np.full(len(types), np.inf)


def near_misses(molecules, within: float = 0.05) -> dict:
    """Of the stable and of the unstable atoms: the share with a pair distance within ``within`` A of
    a bond threshold; of the unstable atoms: the share that another element would make stable with
    the geometry unchanged (bonds recomputed for its new type)."""
    near = {True: [0, 0], False: [0, 0]}
    swap = 0
    for m in molecules:
        types = np.array([ATOM_TYPES.index(s) for s in m.symbols], dtype=int)
        if not len(types):
            continue
        gap = threshold_distance(types, m.positions)
        for stable in (True, False):
            pick = m.stable_atoms == stable
            near[stable][0] += int(pick.sum())
            near[stable][1] += int((gap[pick] < within).sum())
        for i in np.flatnonzero(~m.stable_atoms):
            other = types.copy()
            for k in range(len(ATOM_TYPES)):
                other[i] = k
                if k != types[i] and atom_stability(other, bond_orders(other, m.positions))[i]:
                    swap += 1
                    break
    return {"stable_atoms_near_threshold": near[True][1] / max(near[True][0], 1),
            "unstable_atoms_near_threshold": near[False][1] / max(near[False][0], 1),
            "unstable_atoms_fixed_by_another_element": swap / max(near[False][0], 1)}


def draw(model, domain, cond, setting: str, seed: int) -> torch.Tensor:
    """Samples for one sampler setting (see the module docstring)."""
    kind, steps, *rest = setting.split(":")
    steps = int(steps)
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn((cond.shape[0], *domain.sample_shape), generator=g)
    if kind in ("euler", "heun"):
        return sample(model, x1, time_grid(steps), cond=cond, law="ode", noise_level=0.0, ode_solver=kind).samples
    if kind == "sde" and len(rest) == 1:
        stochastic = torch.ones(cond.shape[0], steps, dtype=torch.bool)
        stochastic[:, -1] = False
        return sample(model, x1, time_grid(steps), cond=cond, law="flow-sde", noise_level=float(rest[0]),
                      stochastic=stochastic, generator=g).samples
    raise SystemExit(f"error: sampler setting '{setting}' is not euler:STEPS, heun:STEPS or sde:STEPS:A")


@torch.no_grad()
def denoising_error(model, domain, n_per_size: int = 64, seed: int = 0) -> dict:
    """Mean |x0_hat - x0| of the atom positions (A) at each flow time on held-out molecules, with
    x0_hat = x_t - t v: how well the model undoes noise of each size."""
    x0, cond = domain.data("heldout")
    sizes = cond[:, 0].long()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in TIMES:
        errors = []
        for n in (15, 18, 19, 21):  # common QM9 sizes, one batch each
            idx = torch.nonzero(sizes == n).flatten()[:n_per_size]
            eps = torch.randn(x0[idx].shape, generator=g)
            x = domain.couple(x0[idx], eps, cond[idx])
            v = model((1 - t) * x + t * eps, torch.full((len(idx),), t), cond[idx])
            x0_hat = (1 - t) * x + t * eps - t * v
            errors.append((x0_hat - x)[:, :n, :3].norm(dim=-1).mean())
        out[str(t)] = float(torch.stack(errors).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base' or a run or checkpoint folder")
    parser.add_argument("--base", default=None, help="the base folder behind --checkpoint base (default: the shipped one)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--samplers", nargs="+", default=["euler:40"])
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    domain = MoleculesDomain(fcd=False)
    model = load_trained(domain, args.checkpoint, base=args.base).eval()
    cond = domain.eval_conditions(args.num_samples)
    x0, _ = domain.data("heldout")
    pick = torch.randperm(x0.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.num_samples]
    data = domain.decode(x0[pick])
    record = {"label": args.label, "checkpoint": args.checkpoint, "base": args.base, "num_samples": args.num_samples,
              "seed": args.seed, "data": {**bonding_errors(data), **near_misses(data)}, "samplers": {}}
    print("data", json.dumps(record["data"]), flush=True)
    for setting in args.samplers:
        cpu = time.process_time()
        molecules = domain.decode(draw(model, domain, cond, setting, args.seed))
        metrics = domain.evaluate(molecules, cond)
        record["samplers"][setting] = {
            **{k: float(metrics[k]) for k in ("atom_stability", "mol_stability", "validity", "uniqueness")},
            **bonding_errors(molecules), **near_misses(molecules), "cpu_s": round(time.process_time() - cpu, 1)}
        print(setting, json.dumps(record["samplers"][setting]), flush=True)
    record["denoising_error_A"] = denoising_error(model, domain)
    print("denoising error (A) per t:", json.dumps(record["denoising_error_A"]))
    out = ROOT / "benchmarks" / "results" / f"diagnose_molecules_{args.label}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
