"""Bonds from 3-D geometry and EDM's stability rules, written from the published tables.

EDM (Hoogeboom et al. 2022, arXiv:2203.17003, appendix) decides bonds from interatomic distances:
a pair is bonded with order 1 when its distance is below the tabulated single-bond length plus a
margin, order 2 when also below the double-bond length plus a smaller margin, order 3 likewise.
The lengths are standard covalent bond lengths (in picometres); the QM9 margins are 10, 5 and 3 pm.
An atom is *stable* when the orders of its bonds sum to its allowed valence; a molecule is stable
when every atom is. Only the elements of QM9 (H, C, N, O, F) are tabulated: that is all the model
can produce.
"""

from __future__ import annotations

import numpy as np

ATOM_TYPES = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
# allowed valence (sum of bond orders) of a neutral atom, as EDM's stability check uses
VALENCE = {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}
MARGINS_PM = (10.0, 5.0, 3.0)  # single, double, triple (EDM's QM9 margins)

# Standard covalent bond lengths in pm, per unordered element pair.
_SINGLE = {
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136,
    ("O", "O"): 148, ("O", "F"): 142,
    ("F", "F"): 142,
}
_DOUBLE = {("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("N", "N"): 125, ("N", "O"): 121, ("O", "O"): 121}
_TRIPLE = {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110}


def _table(lengths: dict) -> np.ndarray:
    """[K, K] symmetric table in Angstrom over ATOM_TYPES; 0 where the bond order does not exist."""
    table = np.zeros((len(ATOM_TYPES), len(ATOM_TYPES)))
    for (a, b), pm in lengths.items():
        i, j = ATOM_TYPES.index(a), ATOM_TYPES.index(b)
        table[i, j] = table[j, i] = pm / 100.0
    return table


SINGLE, DOUBLE, TRIPLE = _table(_SINGLE), _table(_DOUBLE), _table(_TRIPLE)


def bond_thresholds(types: np.ndarray) -> np.ndarray:
    """[3, n, n] per bond order 1-3, the distance (A) under which a pair of these types has that order
    (EDM: tabulated length + margin); NaN where the order does not exist for the pair."""
    types = np.asarray(types, dtype=int)
    out = []
    for table, margin in zip((SINGLE, DOUBLE, TRIPLE), MARGINS_PM):
        length = table[types[:, None], types[None, :]]
        out.append(np.where(length > 0, length + margin / 100.0, np.nan))
    return np.stack(out)


def pair_distances(positions: np.ndarray) -> np.ndarray:
    """[n, n] interatomic distances (A)."""
    return np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)


def bond_orders(types: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[n, n] int bond orders (0-3) from type indices [n] and positions [n, 3] in Angstrom (EDM's rule)."""
    types = np.asarray(types, dtype=int)
    n = len(types)
    if n == 0:
        return np.zeros((0, 0), dtype=int)
    d = pair_distances(positions)
    orders = np.zeros((n, n), dtype=int)
    # each order needs its length to exist for the pair (NaN compares False) and the distance under it
    for order, threshold in enumerate(bond_thresholds(types), start=1):
        hit = d < threshold
        if order == 1:
            orders = hit.astype(int)
        else:
            orders = np.where(hit & (orders == order - 1), order, orders)
    np.fill_diagonal(orders, 0)
    return orders


def atom_stability(types: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """[n] bool: the atom's bond orders sum to its allowed valence (EDM's atom stability)."""
    valence = np.array([VALENCE[ATOM_TYPES[t]] for t in np.asarray(types, dtype=int)], dtype=int)
    return orders.sum(axis=1) == valence


def largest_fragment_mask(orders: np.ndarray) -> np.ndarray:
    """[n] bool: the atoms of the largest bonded piece (connected component of orders > 0; ties: the
    piece with the lowest atom index). Empty for n = 0."""
    from scipy.sparse.csgraph import connected_components

    n = orders.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    _, label = connected_components(orders > 0, directed=False)
    return label == np.bincount(label).argmax()
