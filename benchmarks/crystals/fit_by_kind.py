"""How well a crystals base fits each kind of crystal: the denoising error of its clean estimate.

    .venv/bin/python benchmarks/crystals/fit_by_kind.py --label base_struct
    .venv/bin/python benchmarks/crystals/fit_by_kind.py --label w96 --base runs/.../base

For perovskites (three elements, five atoms) and binaries (two elements), training and held-out, and
flow times t: the mean periodic distance (fractional) between the model's clean estimate
x0_hat = x_t - t v and the crystal's sites, from x_t on the domain's own coupling, 256 crystals per
kind at most. A model that has learnt a training crystal puts x0_hat on its sites at small and middle t;
the gap between training and held-out is what it memorised rather than generalised. (diagnose.py's
``denoising_errors`` is the same measure per site of the training perovskites, with the lattice.)

Writes benchmarks/results/crystals_fit_by_kind_<label>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowcoach.core.checkpoint import load_base
from flowcoach.domains.crystals import CrystalsDomain, torus
from flowcoach.domains.crystals.data import N_MAX

ROOT = Path(__file__).resolve().parents[2]
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def kinds(cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks of the perovskites (three elements, five atoms) and binaries among compositions [B, N_MAX]."""
    atoms = (cond > 0).sum(1)
    elements = torch.tensor([len(set(row[row > 0].tolist())) for row in cond])
    return {"perovskites": (elements == 3) & (atoms == 5), "binaries": elements == 2}


def site_error(model, domain, x0: torch.Tensor, cond: torch.Tensor, t: float, generator: torch.Generator) -> float:
    """Mean periodic distance between x0_hat at time t and the coupled crystal's sites, over real atoms."""
    eps = torch.randn(x0.shape, generator=generator)
    paired = domain.couple(x0, eps, cond)
    x_t = (1 - t) * paired + t * eps
    with torch.no_grad():
        x0_hat = x_t - t * model(x_t, torch.full((len(x0),), t), cond)
    off = torus.periodic_displacement(torus.wrap(x0_hat[:, :N_MAX, :3]), torus.wrap(paired[:, :N_MAX, :3]))
    return float(off.norm(dim=-1)[cond > 0].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--base", default=None, help="a base folder (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    domain = CrystalsDomain(sevenn=False)
    model, _ = load_base(domain, args.base)
    model.eval()
    errors = {}
    for split in ("train", "heldout"):
        x0, cond = domain.data(split)
        for kind, mask in kinds(cond).items():
            g = torch.Generator().manual_seed(args.seed)
            xs, cs = x0[mask][:256], cond[mask][:256]
            errors[f"{split} {kind} ({len(xs)})"] = {str(t): round(site_error(model, domain, xs, cs, t, g), 4) for t in TIMES}
    record = {
        "label": args.label,
        "command": "python benchmarks/crystals/fit_by_kind.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "site_error_by_t": errors,
    }
    out = ROOT / "benchmarks" / "results" / f"crystals_fit_by_kind_{args.label}.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
