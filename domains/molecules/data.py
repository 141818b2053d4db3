"""QM9 from the ``qm9pack`` wheel (130,831 molecules, DFT geometries, explicit hydrogens).

A sample is a fixed-size array x [N_MAX, 3 + K + 1] per molecule: positions in Angstrom (centred
on the mean of the real atoms, as EDM does) then the one-hot atom type over H, C, N, O, F and an
"absent" class, scaled by TYPE_SCALE. Rows past the molecule's n atoms are padding and hold the
sentinel: position 0, type "absent". The condition of a molecule is [n atoms, n heavy atoms].

The split is fixed: a seeded permutation puts HELDOUT_SIZE molecules in "heldout" (FCD reference,
held-out conditions) and the rest in "train" (pretraining, novelty reference).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.molecules.chem import ATOM_TYPES

N_MAX = 29  # largest QM9 molecule, hydrogens included
NUM_TYPES = len(ATOM_TYPES)
ABSENT = NUM_TYPES  # index of the "absent" class in the type channels
FEATURES = 3 + NUM_TYPES + 1
# EDM scales the one-hot types by 0.25 so that, against unit noise, types settle late in sampling
# after the geometry: the type then follows the geometry rather than the reverse.
TYPE_SCALE = 0.25
HELDOUT_SIZE = 13_000
SPLIT_SEED = 0
COLUMNS = ["Index", "SMILES", "Elements", "XYZ_Ang"]


def _data_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("qm9pack")  # not imported: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise FlowcoachError("the molecules domain needs QM9: pip install 'flowcoach[molecules]' (qm9pack)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _parse_numbers(text: str) -> np.ndarray:
    # qm9pack writes Mathematica-style exponents ("1.2*^-6") and bare "0." that JSON refuses
    return np.array(text.replace("[", "").replace("]", "").replace("*^", "e").split(","), dtype=np.float32)


def _parse_elements(text: str) -> list[str]:
    return text.replace("[", "").replace("]", "").replace("'", "").replace(" ", "").split(",")


@functools.lru_cache(maxsize=4)
def load_qm9(limit: int | None = None) -> dict:
    """QM9 as {"types": list of int arrays, "positions": list of [n, 3] arrays, "smiles": list[str]}.

    ``limit`` reads only the first rows (a quick subset for tests); None reads all 130,831.
    """
    import pandas as pd

    folder = _data_folder()
    frames, left = [], limit
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        if left is not None and left <= 0:
            break
        frame = pd.read_csv(folder / part, usecols=COLUMNS, nrows=left)
        frames.append(frame)
        left = None if left is None else left - len(frame)
    df = pd.concat(frames, ignore_index=True)
    index = {a: i for i, a in enumerate(ATOM_TYPES)}
    types = [np.array([index[a] for a in _parse_elements(e)], dtype=np.int64) for e in df["Elements"]]
    positions = [_parse_numbers(p).reshape(-1, 3) for p in df["XYZ_Ang"]]
    return {"types": types, "positions": positions, "smiles": df["SMILES"].tolist()}


def split_indices(count: int, split: str) -> np.ndarray:
    """Indices of a split; the held-out share is HELDOUT_SIZE, or a tenth of a small subset."""
    if split not in ("train", "heldout"):
        raise FlowcoachError(f"unknown split '{split}'; choose 'train' or 'heldout'")
    perm = np.random.default_rng(SPLIT_SEED).permutation(count)
    held = min(HELDOUT_SIZE, max(1, count // 10))
    return np.sort(perm[:held] if split == "heldout" else perm[held:])


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n uniformly random 3-D rotation matrices (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    det = np.linalg.det(q)
    q[:, :, 0] *= det[:, None]  # make det +1 (a rotation, not a reflection)
    return q


def encode(types: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One molecule -> x [N_MAX, FEATURES] (centred positions, scaled one-hot, sentinel padding)."""
    n = len(types)
    if n > N_MAX:
        raise FlowcoachError(f"molecule has {n} atoms; the model holds at most {N_MAX}")
    x = np.zeros((N_MAX, FEATURES), dtype=np.float32)
    x[:n, :3] = positions - positions.mean(axis=0, keepdims=True)
    x[np.arange(n), 3 + np.asarray(types)] = TYPE_SCALE
    x[n:, 3 + ABSENT] = TYPE_SCALE
    return x


def condition_of(types: np.ndarray) -> list[float]:
    """[n atoms, n heavy atoms] of a molecule."""
    types = np.asarray(types)
    return [float(len(types)), float((types != ATOM_TYPES.index("H")).sum())]


def build_split(limit: int | None, split: str, rotate: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(x0 [M, N_MAX, FEATURES], cond [M, 2], SMILES) of a split.

    ``rotate`` gives every molecule one fixed random rotation, so the data carry no preferred
    orientation (QM9's frames are not random); the base model is rotation-equivariant, so this only
    matters to models that are not.
    """
    qm9 = load_qm9(limit)
    idx = split_indices(len(qm9["types"]), split)
    rots = random_rotations(len(idx), np.random.default_rng(SPLIT_SEED + 1)) if rotate else None
    xs, conds = np.zeros((len(idx), N_MAX, FEATURES), dtype=np.float32), []
    for k, i in enumerate(idx):
        pos = qm9["positions"][i] @ rots[k].T if rotate else qm9["positions"][i]
        xs[k] = encode(qm9["types"][i], pos)
        conds.append(condition_of(qm9["types"][i]))
    return torch.from_numpy(xs), torch.tensor(conds, dtype=torch.float32), [qm9["smiles"][i] for i in idx]


def align_to_noise(x0: torch.Tensor, eps: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
    """Each molecule of x0 [B, N_MAX, FEATURES] re-expressed nearest to its noise eps (equivariant OT).

    Its n real atoms are permuted to the noise rows (Hungarian assignment on the squared distance of
    the whole feature rows, so the path of every row is as short as a permutation makes it), then its
    positions rotated about their centre onto the centred noise positions (Kabsch). A permuted and
    rotated molecule is the same molecule, so the flow's data marginal does not change; its paths
    straighten (Klein et al. 2023; SemlaFlow). Padding rows are left alone.
    """
    from scipy.optimize import linear_sum_assignment

    out = x0.clone()
    for b in range(x0.shape[0]):
        n = int(n_atoms[b])
        data, noise = x0[b, :n].double().numpy(), eps[b, :n].double().numpy()
        noise_pos = noise[:, :3] - noise[:, :3].mean(axis=0)
        target = np.concatenate([noise_pos, noise[:, 3:]], axis=1)
        _, order = linear_sum_assignment(((target[:, None] - data[None]) ** 2).sum(-1))
        rows = data[order]
        u, _, vt = np.linalg.svd(rows[:, :3].T @ noise_pos)  # Kabsch: R maps data onto noise
        flip = np.sign(np.linalg.det(vt.T @ u.T))
        rotation = vt.T @ np.diag([1.0, 1.0, flip]) @ u.T
        rows[:, :3] = rows[:, :3] @ rotation.T
        out[b, :n] = torch.from_numpy(rows).to(x0.dtype)
    return out

