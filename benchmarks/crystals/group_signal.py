"""Where a group's spread in energy comes from: the initial noise, or the SDE window RL can train.

    .venv/bin/python benchmarks/crystals/group_signal.py --label base_struct

A GRPO advantage is a sample's reward against its group's. It can teach the window's steps only as
much of the spread as those steps made: the part made by each sample's own initial noise, fed
through the deterministic steps before the window, has no log-prob to credit. On training
compositions (their crystal is on the hull, so E_hull is the distance to the known crystal), groups of
--group-size samples per composition, 10 steps, flow SDE at --noise-level on the window's steps:
- each sample its own initial noise, ODE: the spread the initial noise alone makes;
- the same initial noise for the group (``--sampler.same-noise-in-group``), SDE on one window of times
  (t_min, t_max]: the spread that window's noise makes, for each window of --windows;
- own initial noise with the SDE on the mid window (the sampler of "RL on the mid window").
For each: the mean within-group std of the E_hull reward (crystal-ehull, clipped to [-5, 1]), the
share of groups whose samples are not all proxy-stable or all unstable (a stability signal), the
proxy stable rate, and of the compositions none of whose ODE samples is stable, the share where this
sampler finds a stable one (what exploration could teach the ODE). And of the ODE samples, the share
that match their composition's training crystal (StructureMatcher, DiffCSP's tolerances) and their
median E_hull, in the groups the ODE fails and in the rest (a wrong structure or a right one placed
imprecisely), with their mean atom count and share of 5-atom cells (every ABX3 perovskite has 5).

Writes benchmarks/results/crystals_group_signal_<label>.json.
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
from flowcoach.core.trainer import sde_steps
from flowcoach.domains.crystals import CrystalsDomain, composition_key, physics
from flowcoach.domains.crystals.data import composition_tensor
from flowcoach.domains.crystals.evaluate import _fits, _matcher
from flowcoach.rewards.crystals import ehull

ROOT = Path(__file__).resolve().parents[2]
WINDOWS = ("0.55-1", "0.1-0.55", "0-1")


def group_spread(rewards: np.ndarray, stable: np.ndarray, ode_stable: np.ndarray) -> dict[str, float]:
    """rewards, stable [groups, G] -> mean within-group std, share of mixed groups, stable rate, and
    the share of the groups with no stable sample in ode_stable [groups, G] that have one here."""
    mixed = stable.any(1) & ~stable.all(1)
    failed = ~ode_stable.any(1)
    return {"within_group_std": float(rewards.std(1).mean()), "mixed_stability_groups": float(mixed.mean()),
            "proxy_stable_rate": float(stable.mean()),
            "ode_failed_groups_found_stable": float(stable[failed].any(1).mean()) if failed.any() else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base' or a run or checkpoint folder")
    parser.add_argument("--base", default=None, help="the base folder behind --checkpoint base (default: the shipped one)")
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--noise-level", type=float, default=0.3)
    parser.add_argument("--windows", nargs="+", default=list(WINDOWS), help="t_min-t_max of the SDE windows")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    torch.set_num_threads(1)
    domain = CrystalsDomain(sevenn=False)
    model = load_trained(domain, args.checkpoint, args.base).eval()
    G = args.group_size
    cond = domain.validation_conditions(args.groups).repeat_interleave(G, dim=0)
    g = torch.Generator().manual_seed(args.seed)
    own = torch.randn((len(cond), *domain.sample_shape), generator=g)
    shared = torch.randn((args.groups, *domain.sample_shape), generator=g).repeat_interleave(G, dim=0)
    grid = time_grid(10)
    cpu = time.process_time()

    def run(x1, t_min=0.0, t_max=0.0):
        stochastic = sde_steps(grid, t_min, t_max)[None].expand(len(cond), -1)
        with torch.no_grad():
            x = sample(model, x1, grid, cond, law="flow-sde", noise_level=args.noise_level, stochastic=stochastic,
                       generator=torch.Generator().manual_seed(args.seed + 1)).samples
        structures = domain.decode(x)
        rewards, _ = ehull(structures)
        ok = np.array([s is not None and physics.structure_ok(s) for s in structures])
        stable = ok & (rewards.numpy() >= -physics.STABLE_EHULL)
        return rewards.numpy().reshape(-1, G), stable.reshape(-1, G), structures

    ode = run(own)
    settings = {"own noise, ODE": group_spread(*ode[:2], ode[1])}
    known = {composition_key(c): s for c, s in zip(composition_tensor(domain._load()["train"]), domain._load()["train_structures"])}
    matcher = _matcher()
    match = np.array([s is not None and _fits(matcher, s, known[composition_key(c)]) for s, c in zip(ode[2], cond)]).reshape(-1, G)
    failed = ~ode[1].any(1)
    atoms = (cond[::G] > 0).sum(1).numpy()
    ode_groups = {name: {"groups": int(sel.sum()), "match_known_crystal": float(match[sel].mean()),
                         "median_ehull": float(np.median(-ode[0][sel])), "mean_atoms": float(atoms[sel].mean()),
                         "five_atom_share": float((atoms[sel] == 5).mean())}
                  for name, sel in (("failed", failed), ("rest", ~failed)) if sel.any()}
    for w in args.windows:
        t_min, t_max = (float(v) for v in w.split("-"))
        settings[f"shared noise, SDE on ({t_min}, {t_max}]"] = group_spread(*run(shared, t_min, t_max)[:2], ode[1])
    settings["own noise, SDE on (0.1, 0.55]"] = group_spread(*run(own, 0.1, 0.55)[:2], ode[1])
    record = {
        "label": args.label,
        "command": "python benchmarks/crystals/group_signal.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None),
        "samples": len(cond),
        "settings": settings,
        "ode_groups": ode_groups,
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    out = ROOT / "benchmarks" / "results" / f"crystals_group_signal_{args.label}.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
