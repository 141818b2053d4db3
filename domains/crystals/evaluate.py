"""The held-out evaluator of the crystals domain: validity, proxy stability, S.U.N., distribution
distances to the held-out crystals, structure-prediction match rate and a second-potential check.

None of these is a training reward as such: stability is re-measured on the same proxy hull but
reported with uniqueness, novelty, distribution distances and SevenNet's opinion, so a policy that
hacks CHGNet or collapses onto one structure shows.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import defaultdict

import numpy as np

from flowcoach.domains.crystals import physics

SEVENN_SAMPLES = 48  # structures re-scored with SevenNet per evaluation (CPU cost ~0.2 s each)


def _matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)  # DiffCSP/CDVAE tolerances


def unique_flags(structures: list) -> list[bool]:
    """True for the first of every set of StructureMatcher-equivalent structures (by formula first)."""
    matcher, seen, flags = _matcher(), defaultdict(list), []
    for s in structures:
        group = seen[s.composition.reduced_formula]
        dup = any(_fits(matcher, s, o) for o in group)
        flags.append(not dup)
        if not dup:
            group.append(s)
    return flags


def _fits(matcher, a, b) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(matcher.fit(a, b))
        except Exception:  # noqa: BLE001 - degenerate lattices: not a match
            return False


def novel_flags(structures: list, reference: dict[str, list]) -> list[bool]:
    """True where no reference structure of the same reduced formula matches."""
    matcher = _matcher()
    return [not any(_fits(matcher, s, r) for r in reference.get(s.composition.reduced_formula, [])) for s in structures]


def wasserstein(a, b) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def element_tv(a: list, b: list) -> float:
    """Total-variation distance between the element frequencies (per atom) of two sets of structures."""
    def freq(structs):
        counts = defaultdict(float)
        for s in structs:
            for el, n in s.composition.items():
                counts[el.symbol] += n
        total = sum(counts.values()) or 1.0
        return {k: v / total for k, v in counts.items()}
    fa, fb = freq(a), freq(b)
    return 0.5 * sum(abs(fa.get(k, 0.0) - fb.get(k, 0.0)) for k in set(fa) | set(fb))


@functools.lru_cache(maxsize=1)
def sevennet():
    """SevenNet-0 from the sevenn wheel (weights ship in it), or None when sevenn is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sevenn.calculator import SevenNetCalculator

            return SevenNetCalculator("7net-0", device="cpu")
    except Exception:  # noqa: BLE001 - optional second potential
        return None


def sevennet_energies(structures: list) -> list[float] | None:
    calc = sevennet()
    if calc is None:
        return None
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for s in structures:
        key = physics.structure_key(s)
        if key not in _SEVENN_CACHE:
            atoms = AseAtomsAdaptor.get_atoms(s)
            atoms.calc = calc
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _SEVENN_CACHE[key] = float(atoms.get_potential_energy()) / len(atoms)
        out.append(_SEVENN_CACHE[key])
    return out


_SEVENN_CACHE: dict[str, float] = {}


def evaluate_structures(objects: list, train: list, heldout: list, targets: list | None = None,
                        sevenn_reference: list | None = None, sevenn: bool = True,
                        relax_samples: int = 0, known_hull=None) -> dict[str, float]:
    """Metrics of generated ``objects`` (Structure or None) against training and held-out crystals.

    ``targets``: per sample the held-out structure of its composition (structure prediction), or None.
    ``sevenn_reference``: training structures whose CHGNet - SevenNet energy gap calibrates the check.
    ``relax_samples``: the first this many valid samples are relaxed with CHGNet (``relaxed_metrics``).
    ``known_hull``: a ``physics.ProxyHull`` of every known crystal, the held-out ones included, for
    ``known_stable_rate``. The proxy stable rate's hull (training crystals only) has no entry for a
    held-out composition, whose own crystals lie 0.5 eV/atom below it on average: there a sample far
    above the true crystal still counts as stable. On the known hull it must come within
    STABLE_EHULL of the best crystal known for its composition, as a training composition must.
    """
    n = max(1, len(objects))
    struct_ok = [s is not None and physics.structure_ok(s) for s in objects]
    comp_ok = [s is not None and physics.composition_ok(s) for s in objects]
    valid = [a and b for a, b in zip(struct_ok, comp_ok)]
    preds = physics.chgnet_predict(objects)
    hull = physics.reference_hull()
    ehull = [hull.e_above_hull(s.composition, p["e"]) if v and p is not None else None
             for s, p, v in zip(objects, preds, valid)]
    stable = [e is not None and e <= physics.STABLE_EHULL for e in ehull]
    known = [known_hull.e_above_hull(s.composition, p["e"]) if known_hull is not None and e is not None else None
             for s, p, e in zip(objects, preds, ehull)]
    valid_s = [s for s, v in zip(objects, valid) if v]
    uniq = unique_flags(valid_s)
    ref = defaultdict(list)
    for s in train:
        ref[s.composition.reduced_formula].append(s)
    nov = novel_flags(valid_s, ref)
    it = iter(zip(uniq, nov))
    un = [next(it) if v else (False, False) for v in valid]
    sun = [st and u and nv for st, (u, nv) in zip(stable, un)]
    found = [e for e in ehull if e is not None]
    metrics = {
        "num_samples": float(len(objects)),
        "undecodable_rate": sum(s is None for s in objects) / n,
        "struct_valid": sum(struct_ok) / n,
        "comp_valid": sum(comp_ok) / n,
        "valid": sum(valid) / n,
        "proxy_stable_rate": sum(stable) / n,
        "mean_proxy_ehull": float(np.mean(found)) if found else float("nan"),
        "mean_energy": float(np.mean([p["e"] for p in preds if p is not None])) if any(preds) else float("nan"),
        "unique_rate": sum(uniq) / max(1, len(uniq)),
        "novel_rate": sum(nov) / max(1, len(nov)),
        "sun_rate": sum(sun) / n,
        "density_wdist": wasserstein([s.density for s in valid_s], [s.density for s in heldout]),
        # the direction the distance does not show: swollen cells (RL's cheap way to lower the proxy
        # energy and lengthen the shortest distance) are lighter than the held-out crystals
        "density_mean": float(np.mean([s.density for s in valid_s])) if valid_s else float("nan"),
        "nelem_wdist": wasserstein([len(s.composition) for s in valid_s], [len(s.composition) for s in heldout]),
        "element_tv": element_tv(valid_s, heldout) if valid_s else float("nan"),
    }
    if known_hull is not None:
        found_known = [e for e in known if e is not None]
        metrics["known_stable_rate"] = sum(e is not None and e <= physics.STABLE_EHULL for e in known) / n
        metrics["mean_known_ehull"] = float(np.mean(found_known)) if found_known else float("nan")
    if targets is not None:
        matcher = _matcher()
        hits = [t is not None and s is not None and _fits(matcher, s, t) for s, t in zip(objects, targets)]
        metrics["csp_match_rate"] = sum(hits) / n
    if sevenn:
        metrics.update(sevenn_check([s for s, st in zip(objects, stable) if st], sevenn_reference))
    if relax_samples > 0:
        metrics.update(relaxed_metrics(valid_s[:relax_samples]))
    return {k: float(v) for k, v in metrics.items()}


RELAX_STEPS = 50


def relaxed_metrics(structures: list) -> dict[str, float]:
    """Relax valid samples with CHGNet (``physics.relax``) and report, over those relaxed: the share
    proxy-stable after relaxation, the mean relaxed proxy E_hull, the mean energy drop (eV/atom) and
    the RMSD from sample to relaxed structure (StructureMatcher, normalised by (V/N)^(1/3), DiffCSP's
    convention; a sample far from any minimum has a large one, or none when they no longer match).
    The unrelaxed figures stay the headline: these show how near the samples are to real minima."""
    if not structures:
        return {}
    from pymatgen.analysis.structure_matcher import StructureMatcher

    hull, matcher = physics.reference_hull(), StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    before = physics.chgnet_predict(structures)
    ehull, drops, rmsd, relaxed = [], [], [], 0
    for s, p in zip(structures, before):
        out = physics.relax(s, steps=RELAX_STEPS)
        if out is None or p is None:
            continue
        final, energy = out
        relaxed += 1
        e = hull.e_above_hull(final.composition, energy)
        if e is not None:
            ehull.append(e)
        drops.append(p["e"] - energy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                match = matcher.get_rms_dist(s, final)
            except Exception:  # noqa: BLE001 - degenerate lattice: no match
                match = None
        rmsd.append(match[0] if match is not None else float("nan"))
    rmsd_arr = np.array(rmsd, dtype=float)
    return {
        "relaxed_count": float(relaxed),
        "relaxed_stable_rate": float(np.mean([e <= physics.STABLE_EHULL for e in ehull])) if ehull else float("nan"),
        "mean_relaxed_ehull": float(np.mean(ehull)) if ehull else float("nan"),
        "mean_relax_energy_drop": float(np.mean(drops)) if drops else float("nan"),
        "relaxed_match_rate": float(np.isfinite(rmsd_arr).mean()) if len(rmsd_arr) else float("nan"),
        "median_rmsd_to_relaxed": float(np.nanmedian(rmsd_arr)) if np.isfinite(rmsd_arr).any() else float("nan"),
    }


def sevenn_check(stable: list, reference: list | None) -> dict[str, float]:
    """CHGNet - SevenNet energy gap on (up to SEVENN_SAMPLES) proxy-stable samples, beside the same
    gap on training crystals: a gap that moves away from the training one flags a hacked potential."""
    if not stable or sevennet() is None:
        return {}
    pick = stable[:SEVENN_SAMPLES]
    chg = [p["e"] for p in physics.chgnet_predict(pick)]
    sev = sevennet_energies(pick)
    gaps = np.array(chg) - np.array(sev)
    out = {"sevenn_mae": float(np.abs(gaps).mean()), "sevenn_gap": float(gaps.mean())}
    if reference:
        ref = reference[:SEVENN_SAMPLES]
        ref_gap = np.array([p["e"] for p in physics.chgnet_predict(ref)]) - np.array(sevennet_energies(ref))
        out["sevenn_gap_shift"] = float(gaps.mean() - ref_gap.mean())
    return out
