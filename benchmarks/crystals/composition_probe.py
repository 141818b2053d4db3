"""Would a composition model ahead of structure prediction make de novo crystals valid and new?

A probe, not a domain: a small autoregressive model of the training compositions (one element per
atom, in element order, for the atom count asked) is fitted in seconds, and 500 compositions for the
held-out atom counts are scored at a few sampling temperatures: SMACT validity, share not among the
training compositions, share distinct. Structure prediction (CSP) then places the atoms of a valid
composition 99 % of the time (benchmarks/crystals/README.md), so these shares bound such a pipeline.

    .venv/bin/python benchmarks/crystals/composition_probe.py [--temperatures 1 1.5 2] [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowcoach.domains.crystals import CrystalsDomain, physics
from flowcoach.domains.crystals.data import N_MAX, VOCAB

RESULTS = Path(__file__).resolve().parents[1] / "results"
V = len(VOCAB)


def features(n_atoms: int, counts: torch.Tensor, position: int) -> torch.Tensor:
    """Atom count (one-hot), element counts so far, position (one-hot): the next atom's context."""
    f = torch.zeros(N_MAX + V + N_MAX)
    f[n_atoms - 1] = 1
    f[N_MAX:N_MAX + V] = counts
    f[N_MAX + V + position] = 1
    return f


def training_rows(sequences: list[list[int]]):
    xs, ys, masks = [], [], []
    for seq in sequences:
        counts = torch.zeros(V)
        for p, tok in enumerate(seq):
            xs.append(features(len(seq), counts.clone(), p))
            ys.append(tok)
            mask = torch.zeros(V, dtype=torch.bool)
            mask[: seq[p - 1] if p else 0] = True  # element order: never before the previous atom's
            masks.append(mask)
            counts[tok] += 1
    return torch.stack(xs), torch.tensor(ys), torch.stack(masks)


def fit(sequences: list[list[int]], steps: int, width: int = 128, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x, y, mask = training_rows(sequences)
    net = nn.Sequential(nn.Linear(x.shape[1], width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, V))
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    for _ in range(steps):
        b = torch.randint(0, len(x), (256,))
        loss = nn.functional.cross_entropy(net(x[b]).masked_fill(mask[b], -1e9), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def sample(net: nn.Module, n_atoms: int, temperature: float, generator: torch.Generator) -> list[int]:
    counts, seq = torch.zeros(V), []
    for p in range(n_atoms):
        logits = net(features(n_atoms, counts, p)[None])[0]
        if seq:
            logits[: seq[-1]] = -1e9
        tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        seq.append(tok)
        counts[tok] += 1
    return seq


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=500)
    args = ap.parse_args(argv)
    from pymatgen.core import Composition

    data = CrystalsDomain()._load()
    order = {s: i for i, s in enumerate(VOCAB)}
    train = [sorted(order[s] for s in c.species) for c in data["train"]]
    known = {tuple(s) for s in train}
    heldout_counts = [len(c.species) for c in data["heldout"]]
    start = time.process_time()
    net = fit(train, args.steps)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "fit_cpu_s": time.process_time() - start,
              "train_compositions": len(known), "rows": []}
    for temperature in args.temperatures:
        gen = torch.Generator().manual_seed(12345)
        seqs = [sample(net, heldout_counts[i % len(heldout_counts)], temperature, gen) for i in range(args.samples)]
        valid = np.array([physics.composition_valid(Composition(" ".join(VOCAB[t] for t in s))) for s in seqs])
        novel = np.array([tuple(s) not in known for s in seqs])
        row = {"temperature": temperature, "smact_valid": float(valid.mean()), "novel": float(novel.mean()),
               "distinct": len({tuple(s) for s in seqs}) / len(seqs), "valid_and_novel": float((valid & novel).mean())}
        record["rows"].append(row)
        print(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crystals_composition_probe.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
