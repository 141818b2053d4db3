"""What the evaluator's valid molecules leave outside their largest piece.

EDM's validity (the evaluator's) sanitizes the largest bonded fragment; the training rewards ask for one
connected molecule. This counts, over N held-out samples (40 Euler steps, the seed of
evaluate_models.py), the valid samples, those in one piece, and the atoms of the other pieces.

    .venv/bin/python benchmarks/molecules/pieces.py --label NAME --checkpoint base|RUN [--base DIR]

Writes benchmarks/results/molecules_pieces_<label>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.checkpoint import load_trained
from flowcoach.core.trainer import evaluate_model
from flowcoach.domains.molecules import MoleculesDomain

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base' or a run or checkpoint folder")
    parser.add_argument("--base", default=None, help="the base folder behind --checkpoint base")
    parser.add_argument("--num-samples", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    domain = MoleculesDomain()
    model = load_trained(domain, args.checkpoint, base=args.base).eval()
    _, objects, _ = evaluate_model(model, domain, args.num_samples, 40, seed=12345)
    valid = [m for m in objects if m.valid]
    off = collections.Counter("".join(sorted(np.array(m.symbols)[~m.largest_piece])) for m in valid if not m.connected)
    hydrogens_only = sum(n for atoms, n in off.items() if set(atoms) == {"H"})
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "samples": len(objects),
              "valid": len(valid), "connected": sum(m.connected for m in valid),
              "off_hydrogens_only": hydrogens_only, "off_pieces": dict(off.most_common())}
    print(json.dumps({k: v for k, v in record.items() if k != "off_pieces"}), off.most_common(8))
    (ROOT / "benchmarks" / "results" / f"molecules_pieces_{args.label}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
