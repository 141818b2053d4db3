"""A renoise-and-denoise corrector after sampling: does it tighten a molecule model's geometry?

The base's commonest defect is a bond a few pm off (README, "Shared noise in a group"; pieces.py). Each
corrector round takes the finished sample x to (1 - t) x + t eps and integrates the ODE back to 0 (a
predictor-corrector sampler's idea). 500 held-out conditions, 40 Euler steps first (evaluate_models.py's).

    .venv/bin/python benchmarks/molecules/corrector_probe.py CHECKPOINT [BASE]     # 'base' and a base folder
"""
import sys
import time

import torch

from flowcoach.core.checkpoint import load_trained
from flowcoach.core.policy import unwrap
from flowcoach.core.sampling.sampler import sample
from flowcoach.core.trainer import generate
from flowcoach.domains.molecules import MoleculesDomain

ROUNDS = [(0.05, 1, 4), (0.05, 3, 4), (0.1, 1, 8), (0.02, 3, 2)]  # (renoise time t, rounds, Euler steps back)


def main(checkpoint: str, base: str | None) -> None:
    torch.set_num_threads(1)
    domain = MoleculesDomain()
    model = load_trained(domain, checkpoint, base=base).eval()
    cond = domain.eval_conditions(500)
    start = time.process_time()
    x = generate(model, domain, cond, 40, seed=12345)

    def report(name, samples):
        m = domain.evaluate(domain.decode(samples), cond)
        print(name, {k: round(m[k], 3) for k in ("atom_stability", "mol_stability", "validity", "uniqueness", "qed_mean")},
              flush=True)

    report("plain", x)
    g = torch.Generator().manual_seed(7)
    for t, rounds, steps in ROUNDS:
        y = x.clone()
        for _ in range(rounds):
            y_t = (1 - t) * y + t * torch.randn(y.shape, generator=g)
            with torch.no_grad():
                y = sample(unwrap(model), y_t, torch.linspace(t, 0.0, steps + 1), cond=cond, law="ode").samples
        report(f"t={t} x{rounds} ({steps} steps)", y)
    print("cpu s", round(time.process_time() - start, 1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
