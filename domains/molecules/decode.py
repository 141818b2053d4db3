"""Samples -> molecules: atoms from the type channels, bonds from distances (EDM's rule), RDKit molecules.

Validity follows EDM: the molecule built from those bonds must pass ``Chem.SanitizeMol``; its
SMILES is that of the largest fragment. Nothing here raises on a bad sample: an empty or
unsanitizable molecule is a ``GeneratedMolecule`` with ``mol = None``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowcoach.domains.molecules.chem import ATOM_TYPES, atom_stability, bond_orders, largest_fragment_mask
from flowcoach.domains.molecules.data import ABSENT


@dataclass
class GeneratedMolecule:
    """One decoded sample. ``mol`` is the sanitized RDKit molecule (explicit H, 3-D conformer) or None;
    ``fragment`` its largest fragment without hydrogens (what QED, SA, SMILES and fingerprints see)."""

    symbols: list[str]
    positions: np.ndarray  # [n, 3] Angstrom
    orders: np.ndarray  # [n, n] bond orders
    stable_atoms: np.ndarray  # [n] bool
    mol: object | None = None
    fragment: object | None = None
    smiles: str | None = None
    props: dict = field(default_factory=dict)  # cached per-molecule values (QED, SA, ...)
    rows: np.ndarray | None = None  # [n] the sample rows the atoms were decoded from (per-atom credit)

    @property
    def num_atoms(self) -> int:
        return len(self.symbols)

    @property
    def valid(self) -> bool:
        return self.smiles is not None

    @functools.cached_property
    def largest_piece(self) -> np.ndarray:
        """[n] bool: the atoms of the largest bonded piece (computed once; every reward asks)."""
        return largest_fragment_mask(self.orders)

    @property
    def connected(self) -> bool:
        """Valid and in one piece (EDM's validity keeps only the largest fragment). The RDKit
        molecule has exactly the bonds of ``orders``, so its pieces are the bond graph's."""
        return self.mol is not None and bool(self.largest_piece.all())

    @property
    def stable(self) -> bool:
        return self.num_atoms > 0 and bool(self.stable_atoms.all())


def _quiet_rdkit() -> None:
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")  # invalid samples are expected and counted, not logged one by one


def to_rdkit(symbols: list[str], positions: np.ndarray, orders: np.ndarray):
    """Sanitized RDKit molecule with a conformer, or None when RDKit refuses it (EDM's validity)."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    if not symbols:
        return None
    _quiet_rdkit()
    bond_type = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    rw = Chem.RWMol()
    for s in symbols:
        rw.AddAtom(Chem.Atom(s))
    for i, j in zip(*np.nonzero(np.triu(orders, 1))):
        rw.AddBond(int(i), int(j), bond_type[int(orders[i, j])])
    conf = Chem.Conformer(len(symbols))
    for k, p in enumerate(positions):
        conf.SetAtomPosition(k, Point3D(*map(float, p)))
    rw.AddConformer(conf, assignId=True)
    mol = rw.GetMol()
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # noqa: BLE001 - RDKit raises several types for a bad valence or ring
        return None
    return mol


def largest_fragment(mol):
    """Largest fragment (by atom count) without explicit hydrogens, and its canonical SMILES."""
    from rdkit import Chem

    try:
        frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=True)
        frag = Chem.RemoveHs(max(frags, key=lambda m: m.GetNumAtoms()))
        smiles = Chem.MolToSmiles(frag)
        return (frag, smiles) if smiles else (None, None)
    except Exception:  # noqa: BLE001
        return None, None


def molecule_from_atoms(types: np.ndarray, positions: np.ndarray) -> GeneratedMolecule:
    """Atoms (type indices over chem.ATOM_TYPES, positions) -> GeneratedMolecule."""
    types = np.asarray(types, dtype=int)
    positions = np.asarray(positions, dtype=np.float64).reshape(len(types), 3)
    orders = bond_orders(types, positions)
    symbols = [ATOM_TYPES[t] for t in types]
    stable = atom_stability(types, orders) if len(types) else np.zeros(0, dtype=bool)
    mol = to_rdkit(symbols, positions, orders) if np.isfinite(positions).all() else None
    frag, smiles = largest_fragment(mol) if mol is not None else (None, None)
    return GeneratedMolecule(symbols, positions, orders, stable, mol, frag, smiles)


def decode_sample(x: np.ndarray) -> GeneratedMolecule:
    """x [N_MAX, FEATURES] -> molecule: rows whose type argmax is "absent" (padding) are dropped.

    A sample with a non-finite value is a diverged one: it decodes to its atoms with no bonds, no
    stable atom and no RDKit molecule (invalid). Zeroing the NaNs instead would stack its atoms at
    the origin, where the distance rule bonds them into a molecule that can look valid.
    """
    x = np.asarray(x, dtype=np.float64)
    finite = bool(np.isfinite(x).all())
    x = np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)
    kind = x[:, 3:].argmax(axis=1)
    rows = np.flatnonzero(kind != ABSENT)
    if not finite:
        n = len(rows)
        return GeneratedMolecule([ATOM_TYPES[t] for t in kind[rows]], x[rows, :3], np.zeros((n, n), dtype=int),
                                 np.zeros(n, dtype=bool), rows=rows)
    m = molecule_from_atoms(kind[rows], x[rows, :3])
    m.rows = rows
    return m


def decode(x: torch.Tensor) -> list[GeneratedMolecule]:
    return [decode_sample(row) for row in x.detach().float().cpu().numpy()]


def from_rdkit(mol) -> GeneratedMolecule:
    """A molecule with the bonds of an RDKit molecule (hydrogens made explicit, no geometry needed):
    for hand-checked evaluator inputs and reference sets."""
    from rdkit import Chem

    mol = Chem.AddHs(mol)
    Chem.Kekulize(mol, clearAromaticFlags=False)
    types = np.array([ATOM_TYPES.index(a.GetSymbol()) for a in mol.GetAtoms()])
    orders = np.zeros((len(types), len(types)), dtype=int)
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        orders[i, j] = orders[j, i] = int(b.GetBondTypeAsDouble())
    positions = mol.GetConformer().GetPositions() if mol.GetNumConformers() else np.zeros((len(types), 3))
    frag, smiles = largest_fragment(mol)
    return GeneratedMolecule([ATOM_TYPES[t] for t in types], positions, orders, atom_stability(types, orders),
                             mol, frag, smiles)


def from_smiles(smiles: str, seed: int = 0) -> GeneratedMolecule:
    """A molecule from SMILES through an RDKit 3-D embedding (ETKDG + MMFF), decoded from its geometry
    like a sample: for tests and for hand-checked evaluator inputs."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    AllChem.MMFFOptimizeMolecule(mol)
    types = np.array([ATOM_TYPES.index(a.GetSymbol()) for a in mol.GetAtoms()])
    return molecule_from_atoms(types, mol.GetConformer().GetPositions())


def save_molecules(objects: list[GeneratedMolecule], rewards: torch.Tensor | None, directory: Path) -> list[Path]:
    """SDF (3-D, every sanitized molecule), SMILES with rewards, XYZ of every sample, and a PNG grid."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scores = [None] * len(objects) if rewards is None else [float(r) for r in rewards]
    sdf, smi, xyz = directory / "molecules.sdf", directory / "molecules.smi", directory / "molecules.xyz"
    with Chem.SDWriter(str(sdf)) as writer:
        for k, (m, r) in enumerate(zip(objects, scores)):
            if m.mol is not None:
                m.mol.SetProp("_Name", f"sample_{k}")
                m.mol.SetProp("smiles", m.smiles or "")
                if r is not None:
                    m.mol.SetProp("reward", f"{r:.4f}")
                writer.write(m.mol)
    smi.write_text("".join(f"{m.smiles or 'INVALID'}\tsample_{k}\t{'' if r is None else f'{r:.4f}'}\n"
                           for k, (m, r) in enumerate(zip(objects, scores))))
    xyz.write_text("".join(f"{m.num_atoms}\tsample_{k}\n" + "".join(
        f"{s} {p[0]:.4f} {p[1]:.4f} {p[2]:.4f}\n" for s, p in zip(m.symbols, m.positions)) for k, m in enumerate(objects)))
    files = [sdf, smi, xyz]
    shown = [(m, r) for m, r in zip(objects, scores) if m.fragment is not None][:48]
    png = directory / "grid.png"
    if shown:
        legends = [m.smiles if r is None else f"{r:.2f} {m.smiles}"[:30] for m, r in shown]
        Draw.MolsToGridImage([m.fragment for m, _ in shown], molsPerRow=8, subImgSize=(200, 200), legends=legends).save(png)
    else:  # nothing valid to draw: still write a (blank) grid so every step has one
        from PIL import Image

        Image.new("RGB", (200, 200), "white").save(png)
    files.append(png)
    if rewards is not None:
        (directory / "rewards.json").write_text(json.dumps(scores))
        files.append(directory / "rewards.json")
    return files
