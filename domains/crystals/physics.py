"""Physics of a crystal: periodic distances, validity checks, CHGNet energies and a proxy hull.

CHGNet's weights ship in its wheel (v0.3.0); it is loaded once per process, offline. The proxy
energy above hull is measured against a ``PhaseDiagram`` of CHGNet energies of reference entries
(elemental references made here, plus the training crystals): a proxy, not the Materials Project
hull, and it says so in every report.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings

import numpy as np

MIN_DISTANCE = 0.5  # Å, CDVAE/DiffCSP structural validity
MIN_VOLUME = 0.1  # Å^3
MAX_VOLUME_PER_ATOM = 200.0  # Å^3: beyond, a structure has "exploded"; no potential is asked about it
STABLE_EHULL = 0.1  # eV/atom: proxy-stable (MatterGen's metastability window)


def self_image_distance(structure) -> float:
    """Distance between a site and its own nearest periodic image (Å): the shortest lattice vector."""
    lattice = structure.lattice.get_lll_reduced_lattice()
    shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)])
    return float(np.linalg.norm(shifts @ lattice.matrix, axis=1).min())


def site_min_distances(structure) -> np.ndarray:
    """Per site, the shortest distance to another site or to its own periodic image (Å)."""
    d = structure.distance_matrix + np.eye(len(structure)) * 1e9
    return np.minimum(d.min(axis=1), self_image_distance(structure))


def min_periodic_distance(structure) -> float:
    """Shortest distance between two sites, or between a site and its own periodic image (Å)."""
    return float(site_min_distances(structure).min())


def has_cell(structure) -> bool:
    """Sites in a cell of finite volume over 0.1 Å^3: what distances can be measured in."""
    if structure is None or len(structure) == 0:
        return False
    volume = float(structure.volume)
    return bool(np.isfinite(volume) and volume > MIN_VOLUME)


def structure_ok(structure) -> bool:
    """CDVAE/DiffCSP structural validity: min periodic distance > 0.5 Å and volume > 0.1 Å^3."""
    return has_cell(structure) and min_periodic_distance(structure) > MIN_DISTANCE


def composition_ok(structure) -> bool:
    """SMACT charge neutrality + Pauling test (single elements and alloys pass), on the composition."""
    return structure is not None and len(structure) > 0 and composition_valid(structure.composition)


def composition_valid(composition) -> bool:
    from smact.screening import smact_validity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(smact_validity(composition, use_pauling_test=True, include_alloys=True))


def exploded(structure) -> bool:
    """Structurally invalid or absurdly dilute: no potential is evaluated on it."""
    return not structure_ok(structure) or structure.volume / len(structure) > MAX_VOLUME_PER_ATOM


CHGNET_CUTOFF = 6.0  # Å: CHGNet's atom-graph radius


def has_isolated_atom(structure, cutoff: float = CHGNET_CUTOFF) -> bool:
    """True where some atom has no neighbour (nor periodic image) within ``cutoff``: CHGNet's graph
    then has a lone node and its prediction is meaningless (some versions raise, others only warn)."""
    centers = structure.get_neighbor_list(cutoff)[0]
    return len(set(centers.tolist())) < len(structure)


def structure_key(structure) -> str:
    """A hash of species, lattice and coordinates (to 1e-5): the key of the energy cache."""
    parts = [structure.lattice.matrix.round(5).tobytes(), structure.frac_coords.round(5).tobytes(),
             " ".join(s.symbol for s in structure.species).encode()]
    return hashlib.sha1(b"|".join(parts)).hexdigest()


@functools.lru_cache(maxsize=1)
def chgnet():
    """CHGNet 0.3.0 from the wheel, on CPU (no download: the weights ship in the package)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from chgnet.model import CHGNet

        return CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)


_ENERGY_CACHE: dict[str, dict] = {}


def chgnet_predict(structures: list, batch_size: int = 16) -> list[dict | None]:
    """Per structure {"e": eV/atom, "fmax": eV/Å, "frms": eV/Å}, or None where it exploded, has an
    isolated atom (``has_isolated_atom``) or the prediction is not finite. Cached by ``structure_key`` so composed rewards call CHGNet once."""
    out: list[dict | None] = [None] * len(structures)
    todo = []
    for i, s in enumerate(structures):
        if s is None or exploded(s):
            continue
        key = structure_key(s)
        if key in _ENERGY_CACHE:  # only predictions of structures that passed the checks are cached
            out[i] = _ENERGY_CACHE[key]
        elif not has_isolated_atom(s):
            todo.append((i, key))
    if todo:
        preds = _predict_guarded([structures[i] for i, _ in todo], batch_size)
        for (i, key), p in zip(todo, preds):
            if p is None:  # CHGNet refused it: counted as invalid
                continue
            forces = np.asarray(p["f"], dtype=float)
            norms = np.linalg.norm(forces, axis=1)
            result = {"e": float(p["e"]), "fmax": float(norms.max()), "frms": float(np.sqrt((norms**2).mean()))}
            if all(np.isfinite(v) for v in result.values()):
                _ENERGY_CACHE[key] = result
                out[i] = result
    if len(_ENERGY_CACHE) > 200_000:
        _ENERGY_CACHE.clear()
    return out


def _predict_guarded(structures: list, batch_size: int) -> list:
    """CHGNet on a batch; where the batch fails, one by one, with None for each that fails."""
    model = chgnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preds = model.predict_structure(structures, task="ef", batch_size=batch_size)
            return preds if isinstance(preds, list) else [preds]
        except Exception:  # noqa: BLE001 - CHGNet raises on isolated atoms and similar; find which
            out = []
            for s in structures:
                try:
                    out.append(model.predict_structure(s, task="ef"))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out


class ProxyHull:
    """Energy above a convex hull of CHGNet energies, one ``PhaseDiagram`` per chemical system.

    ``entries`` are (reduced formula or Composition, energy per atom) of the references: elemental
    references for every element (so every system has its corners) plus known crystals.
    """

    def __init__(self, entries: list[tuple[str, float]]):
        from pymatgen.core import Composition

        self._by_elements: dict[frozenset, list] = {}
        for formula, e in entries:
            comp = Composition(formula)
            self._by_elements.setdefault(frozenset(el.symbol for el in comp.elements), []).append((comp, e))
        self._diagrams: dict[frozenset, object] = {}

    def _diagram(self, elements: frozenset):
        if elements not in self._diagrams:
            from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

            entries = [PDEntry(c, e * c.num_atoms) for key, group in self._by_elements.items() if key <= elements
                       for c, e in group]
            try:
                self._diagrams[elements] = PhaseDiagram(entries)
            except Exception:  # noqa: BLE001 - a missing elemental corner: no hull for this system
                self._diagrams[elements] = None
        return self._diagrams[elements]

    def e_above_hull(self, composition, energy_per_atom: float) -> float | None:
        """Proxy E_hull in eV/atom (negative = below the reference hull), or None without a hull."""
        from pymatgen.analysis.phase_diagram import PDEntry

        elements = frozenset(el.symbol for el in composition.elements)
        pd = self._diagram(elements)
        if pd is None:
            return None
        entry = PDEntry(composition, energy_per_atom * composition.num_atoms)
        _, e = pd.get_decomp_and_e_above_hull(entry, allow_negative=True, check_stable=False)
        return float(e)


_HULL: list = []


def use_hull(hull: ProxyHull) -> None:
    """Make ``hull`` the reference of the E_hull rewards and the evaluator in this process."""
    _HULL[:] = [hull]


def reference_hull() -> ProxyHull:
    """The reference hull in use; by default the one of the default crystals data set (its
    elemental references and training crystals), generated on first use if not cached."""
    if not _HULL:
        from flowcoach.domains.crystals.data import GenConfig, load_dataset, split

        data = load_dataset(GenConfig())
        use_hull(hull_from_data(data, split(data, "train")))
    return _HULL[0]


def hull_from_data(data: dict, crystals: list) -> ProxyHull:
    entries = [(el, e) for el, e in data["elements"].items()]
    from collections import Counter

    from pymatgen.core import Composition

    entries += [(Composition(Counter(c.species)), c.energy) for c in crystals]
    return ProxyHull(entries)


class VolumeModel:
    """Expected cell volume of a composition, V = sum_e n_e v_e, with per-element volumes fitted by
    non-negative least squares to reference crystals, and ``band``: the range of ln(V / V_expected)
    that holds the middle ``coverage`` of those crystals. A composition-aware guard against cells
    that swell (or crush) to dodge the potential, tighter than one window for every chemistry."""

    def __init__(self, structures: list, coverage: float = 0.95):
        from scipy.optimize import nnls

        elements = sorted({el.symbol for s in structures for el in s.composition.elements})
        counts = np.array([[s.composition[el] for el in elements] for s in structures], dtype=float)
        volumes = np.array([s.volume for s in structures], dtype=float)
        per_element, _ = nnls(counts, volumes)
        self.volumes = dict(zip(elements, per_element.tolist()))
        ratio = np.log(volumes / np.maximum(counts @ per_element, 1e-9))
        tail = (1.0 - coverage) / 2
        self.band = (float(np.quantile(ratio, tail)), float(np.quantile(ratio, 1.0 - tail)))
        # the reference crystals' own volume per atom, by reduced formula (mean over its polymorphs)
        per_atom: dict[str, list] = {}
        for s in structures:
            per_atom.setdefault(s.composition.reduced_formula, []).append(s.volume / len(s))
        self.known = {f: float(np.mean(v)) for f, v in per_atom.items()}
        # how many elements a reference crystal has (the support crystal-elements holds samples to)
        self.element_counts = sorted({len(s.composition.elements) for s in structures})

    def expected(self, composition) -> float | None:
        """Expected volume (Å^3) of a cell of this composition, or None for an element never seen."""
        if any(el.symbol not in self.volumes for el in composition.elements):
            return None
        v = sum(n * self.volumes[el.symbol] for el, n in composition.items())
        return float(v) if v > 0 else None

    def reference(self, composition) -> float | None:
        """Volume (Å^3) of a cell of this composition as the reference crystals of its formula have it
        (their mean volume per atom), else the fitted expectation (None for an element never seen)."""
        known = self.known.get(composition.reduced_formula)
        return known * composition.num_atoms if known is not None else self.expected(composition)


_VOLUME_MODEL: list = []


def use_volume_model(model: VolumeModel | None) -> None:
    """Make ``model`` the reference of the crystal-volume reward in this process (None: the fixed window)."""
    _VOLUME_MODEL[:] = [model] if model is not None else []


def volume_model() -> VolumeModel | None:
    return _VOLUME_MODEL[0] if _VOLUME_MODEL else None


def relax(structure, steps: int = 50, fmax: float = 0.05):
    """CHGNet relaxation (FIRE, positions and cell) of one structure: (relaxed Structure, eV/atom),
    or None where it is exploded or the optimiser fails. The evaluator's relaxed metrics use it: how
    far a sample is from a local minimum of the potential, and how stable it is once there."""
    if structure is None or exploded(structure):
        return None
    from chgnet.model import StructOptimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = StructOptimizer(model=chgnet(), optimizer_class="FIRE", use_device="cpu").relax(
                structure, fmax=fmax, steps=steps, relax_cell=True, verbose=False)
        except Exception:  # noqa: BLE001 - a structure the optimiser cannot handle counts as not relaxed
            return None
    final = result["final_structure"]
    energy = float(result["trajectory"].energies[-1]) / len(final)
    return (final, energy) if np.isfinite(energy) and not exploded(final) else None

