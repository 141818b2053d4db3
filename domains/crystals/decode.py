"""Samples -> pymatgen ``Structure`` (wrapping the chart back onto the torus), and CIF output."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from flowcoach.domains.crystals import torus
from flowcoach.domains.crystals.data import N_MAX, VOCAB, from_bits, lattice_from_features

MIN_ANGLE, MAX_ANGLE = 10.0, 170.0


def decode_one(x: np.ndarray):
    """One sample [N_MAX + 1, FEATURES] -> Structure, or None when it is not a crystal: no atoms,
    an unknown element index, or a lattice that is not finite or has no volume."""
    from pymatgen.core import Lattice, Structure

    if not np.isfinite(x).all():
        return None
    index = from_bits(x[:N_MAX, 3:])
    rows = np.nonzero(index > 0)[0]
    if len(rows) == 0 or (index[rows] > len(VOCAB)).any():
        return None
    params = lattice_from_features(x[N_MAX, :6])
    if not np.isfinite(params).all() or params[:3].max() > 1e3 or not (
            (params[3:] > MIN_ANGLE) & (params[3:] < MAX_ANGLE)).all():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lattice = Lattice.from_parameters(*params)
        if not np.isfinite(lattice.volume) or lattice.volume <= 0 or not np.isfinite(lattice.matrix).all():
            return None
        # properties["rows"]: the sample row of each site, for per-atom credit (rewards.crystals.atom_credit)
        return Structure(lattice, [VOCAB[i - 1] for i in index[rows]], torus.wrap(x[rows, :3].astype(np.float64)),
                         properties={"rows": rows.tolist()})


def decode(x: torch.Tensor) -> list:
    return [decode_one(row) for row in x.detach().float().cpu().numpy()]


def save_structures(objects: list, rewards: torch.Tensor | None, directory: Path) -> list[Path]:
    """One CIF per decodable sample (sample-<i>.cif) and an index.json with formulas and rewards."""
    from pymatgen.io.cif import CifWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files, index = [], []
    for i, s in enumerate(objects):
        entry = {"sample": i, "reward": None if rewards is None else float(rewards[i])}
        if s is None:
            entry["formula"] = None
        else:
            path = directory / f"sample-{i:04d}.cif"
            CifWriter(s).write_file(path)
            files.append(path)
            entry.update(formula=s.composition.reduced_formula, cif=path.name)
        index.append(entry)
    (directory / "index.json").write_text(json.dumps(index, indent=1))
    return [directory / "index.json", *files]
