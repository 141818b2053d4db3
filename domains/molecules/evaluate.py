"""Held-out evaluator of generated molecules (not the training reward, so reward hacking shows).

EDM/MOSES definitions: validity = valid / generated; uniqueness = unique valid SMILES / valid;
novelty = unique SMILES absent from the training set / unique; V x U and V.U.N are the products;
atom stability over all atoms, molecule stability over all samples (EDM). QED and SA are over the
valid molecules; internal diversity is 1 - mean pairwise Tanimoto of Morgan (r = 2, 2048 bits)
fingerprints of the unique valid ones (MOSES IntDiv1); PAINS pass rate over valid molecules
(RDKit's FilterCatalog, families A, B, C); FCD (ChemNet, ``fcd`` wheel) against held-out QM9 SMILES.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from flowcoach.rewards.molecules import qed_of, sa_of

FCD_REFERENCE_SIZE = 5000
FCD_MIN_VALID = 500  # FCD is strongly biased on small sets: below this, it is not reported


@functools.lru_cache(maxsize=1)
def _pains_catalog():
    from rdkit.Chem.FilterCatalog import FilterCatalog, FilterCatalogParams

    params = FilterCatalogParams()
    params.AddCatalog(FilterCatalogParams.FilterCatalogs.PAINS)
    return FilterCatalog(params)


def canonical(smiles: str) -> str | None:
    """Canonical heavy-atom SMILES of the largest fragment (as decode writes them), or None."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    frags = Chem.GetMolFrags(mol, asMols=True)
    return Chem.MolToSmiles(max(frags, key=lambda m: m.GetNumAtoms()))


def internal_diversity(fragments: list) -> float:
    """1 - mean Tanimoto over distinct pairs of Morgan fingerprints; nan with fewer than 2."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    if len(fragments) < 2:
        return float("nan")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(f) for f in fragments]
    total = 0.0
    for k in range(1, len(fps)):
        total += sum(DataStructs.BulkTanimotoSimilarity(fps[k], fps[:k]))
    pairs = len(fps) * (len(fps) - 1) / 2
    return 1.0 - total / pairs


def pains_pass_rate(fragments: list) -> float:
    if not fragments:
        return float("nan")
    catalog = _pains_catalog()
    return float(np.mean([not catalog.HasMatch(f) for f in fragments]))


@functools.lru_cache(maxsize=1)
def _chemnet():
    from fcd import load_ref_model

    return load_ref_model()  # ChemNet weights ship inside the fcd wheel: no download


def _activation_stats(smiles: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    from fcd import get_predictions

    act = get_predictions(_chemnet(), list(smiles), n_jobs=0, device="cpu")
    return act.mean(axis=0), np.cov(act.T)


_reference_stats = functools.lru_cache(maxsize=2)(_activation_stats)  # the reference is the same every eval


def fcd_score(smiles: list[str], reference: list[str]) -> float:
    """Frechet ChemNet Distance between two SMILES sets (lower = closer)."""
    from fcd.utils import calculate_frechet_distance

    mu1, sigma1 = _activation_stats(tuple(smiles))
    mu2, sigma2 = _reference_stats(tuple(reference))
    return float(calculate_frechet_distance(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2))


def _stats(values: list[float], name: str) -> dict[str, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {f"{name}_mean": float("nan"), f"{name}_std": float("nan"), f"{name}_median": float("nan")}
    return {f"{name}_mean": float(np.mean(values)), f"{name}_std": float(np.std(values)),
            f"{name}_median": float(np.median(values))}


def evaluate_molecules(objects: list, train_smiles: set[str] | frozenset[str] | None = None,
                       fcd_reference: list[str] | None = None, fcd_min_valid: int = FCD_MIN_VALID) -> dict[str, float]:
    """Evaluator metrics of decoded molecules; novelty needs ``train_smiles`` (canonical), FCD a reference."""
    total = len(objects)
    if total == 0:
        return {"validity": float("nan")}
    valid = [m for m in objects if m.valid]
    unique_smiles = sorted({m.smiles for m in valid})
    first = {}
    for m in valid:
        first.setdefault(m.smiles, m)
    unique = [first[s] for s in unique_smiles]
    atoms = sum(m.num_atoms for m in objects)
    metrics = {
        "validity": len(valid) / total,
        "uniqueness": len(unique_smiles) / len(valid) if valid else float("nan"),  # undefined, as qed_mean
        "atom_stability": sum(int(m.stable_atoms.sum()) for m in objects) / atoms if atoms else 0.0,
        "mol_stability": sum(m.stable for m in objects) / total,
        "empty_rate": sum(m.num_atoms == 0 for m in objects) / total,
        "mean_atoms": atoms / total,
    }
    metrics["v_x_u"] = len(unique_smiles) / total  # = validity x uniqueness, 0 when nothing is valid
    if train_smiles is not None:
        novel = [s for s in unique_smiles if s not in train_smiles]
        metrics["novelty"] = len(novel) / len(unique_smiles) if unique_smiles else float("nan")
        metrics["vun"] = len(novel) / total
    metrics.update(_stats([qed_of(m) for m in valid], "qed"))
    metrics.update(_stats([sa_of(m) for m in valid], "sa"))
    metrics["int_div"] = internal_diversity([m.fragment for m in unique])
    metrics["pains_pass"] = pains_pass_rate([m.fragment for m in valid])
    if fcd_reference is not None and len(valid) >= fcd_min_valid:
        metrics["fcd"] = fcd_score([m.smiles for m in valid], fcd_reference)
    return {k: float(v) for k, v in metrics.items()}
