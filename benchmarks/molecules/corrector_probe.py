"""A renoise-and-denoise corrector after sampling: does it tighten a molecule model's geometry?

The base's commonest defect is a bond a few pm off (README, "Shared noise in a group"; pieces.py). Each
corrector round takes the finished sample x to (1 - t) x + t eps and integrates the ODE back to 0 (a
predictor-corrector sampler's idea). 500 held-out conditions, 40 Euler steps first (evaluate_models.py's).

    .venv/bin/python benchmarks/molecules/corrector_probe.py CHECKPOINT [BASE]     # 'base' and a base folder
"""
import sys
import time

import torch
torch.set_num_threads(1)
from flowcoach.core.checkpoint import load_trained
from flowcoach.core.trainer import generate
from flowcoach.core.sampling.sampler import sample
from flowcoach.core.policy import unwrap
from flowcoach.domains.molecules import MoleculesDomain
dom = MoleculesDomain()
ck = sys.argv[1]; base = sys.argv[2] if len(sys.argv) > 2 else None
model = load_trained(dom, ck, base=base).eval()
cond = dom.eval_conditions(500)
t0 = time.process_time()
x = generate(model, dom, cond, 40, seed=12345)
def report(name, x):
    m = dom.evaluate(dom.decode(x), cond)
    print(name, {k: round(m[k], 3) for k in ("atom_stability", "mol_stability", "validity", "uniqueness", "qed_mean")}, flush=True)
report("plain", x)
g = torch.Generator().manual_seed(7)
for t_c, k, m_steps in [(0.05, 1, 4), (0.05, 3, 4), (0.1, 1, 8), (0.02, 3, 2)]:
    y = x.clone()
    for _ in range(k):
        eps = torch.randn(y.shape, generator=g)
        y_t = (1 - t_c) * y + t_c * eps
        grid = torch.linspace(t_c, 0.0, m_steps + 1)
        with torch.no_grad():
            y = sample(unwrap(model), y_t, grid, cond=cond, law="ode").samples
    report(f"t={t_c} x{k} ({m_steps} steps)", y)
print("cpu", time.process_time() - t0)
