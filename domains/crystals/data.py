"""Crystal data, generated offline (no crystal database ships in any wheel) and cached.

Two families, both deterministic from a seed:
- cubic ABX3 perovskites (Pm-3m, 5 atoms) whose oxidation states are charge-neutral and SMACT-valid,
  Goldschmidt tolerance in [0.8, 1.05], lattice constant a = 2 (r_B + r_X) from Shannon radii;
- random symmetric crystals from ``pyxtal`` for charge-neutral binary compositions (<= N_MAX atoms),
  several space groups tried per composition, the lowest CHGNet energy kept and relaxed a few
  batched steepest-descent steps on CHGNet forces (positions only).
Every crystal carries its CHGNet energy per atom; elemental references (the best of ASE's bulk
phase, fcc/bcc/sc cells and a dimer in a box) complete the proxy hull. The whole set is written
as JSON under ``runs/cache/crystals`` (or $FLOWCOACH_CACHE/crystals) keyed by its parameters; the
default set also ships gzipped in ``shipped/``: it was made before pyxtal was given its own random
state (``random_crystal``), so ``generate(GenConfig())`` makes a set like it, not the same one.

A sample x is a tensor [N_MAX + 1, FEATURES]:
- rows 0..N_MAX-1: fractional coordinates lifted to R^3 (``torus.lift``) and the element index in
  analog bits (+-1 per bit, index 0 = no atom); padding rows are the sentinel (0, 0, 0, bits(0));
- row N_MAX: the lattice, (ln a, ln b, ln c) standardised and the angles (deg - 90) / 20, then 0s.
The condition is the composition: element indices [N_MAX] (0 = padding).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.crystals import torus
from flowcoach.domains.crystals.physics import composition_valid

N_MAX = 12
BITS = 6
FEATURES = 3 + BITS
LN_LEN_MEAN, LN_LEN_STD = 1.6, 0.35
ANGLE_SCALE = 20.0

# 40 cations and 9 anions; the index in this tuple (+1) is what the model sees
CATIONS = ("Li", "Na", "K", "Rb", "Cs", "Be", "Mg", "Ca", "Sr", "Ba", "Sc", "Y", "La", "Ti", "Zr", "Hf", "V", "Nb",
           "Ta", "Cr", "Mo", "W", "Mn", "Fe", "Co", "Ni", "Cu", "Ag", "Zn", "Cd", "Al", "Ga", "In", "Tl", "Ge", "Sn",
           "Pb", "Sb", "Bi", "Si")
ANIONS = ("N", "O", "S", "Se", "Te", "F", "Cl", "Br", "I")
VOCAB = CATIONS + ANIONS
assert len(VOCAB) < 2**BITS


def element_index(symbol: str) -> int:
    try:
        return VOCAB.index(symbol) + 1
    except ValueError:
        raise FlowcoachError(f"element '{symbol}' is not in the crystals vocabulary ({len(VOCAB)} elements)") from None


def to_bits(index: np.ndarray) -> np.ndarray:
    """Element indices [...] -> analog bits [..., BITS] in {-1, +1} (least significant first)."""
    index = np.asarray(index, dtype=np.int64)
    return (((index[..., None] >> np.arange(BITS)) & 1) * 2 - 1).astype(np.float32)


def from_bits(bits: np.ndarray) -> np.ndarray:
    """Analog bits [..., BITS] (any real values; the sign decides) -> element indices [...]."""
    return ((np.asarray(bits) > 0).astype(np.int64) << np.arange(BITS)).sum(-1)


@dataclass
class Crystal:
    species: list[str]
    frac: list[list[float]]
    lattice: list[float]  # a, b, c (Å), alpha, beta, gamma (deg)
    energy: float  # CHGNet eV/atom
    source: str

    def structure(self):
        from pymatgen.core import Lattice, Structure

        return Structure(Lattice.from_parameters(*self.lattice), self.species, self.frac)


def crystal_from_structure(structure, energy: float, source: str) -> Crystal:
    lat = structure.lattice
    return Crystal([s.symbol for s in structure.species], np.round(structure.frac_coords % 1.0, 6).tolist(),
                   [float(v) for v in (*lat.abc, *lat.angles)], float(energy), source)


# ----------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GenConfig:
    seed: int = 0
    perovskites: int = 2000  # at most this many (all that pass when fewer)
    random_compositions: int = 700  # pyxtal compositions
    tries: int = 3  # space groups tried per composition
    relax_steps: int = 3
    max_formation: float = 0.2  # eV/atom above the elemental references: screened out beyond
    version: int = 1
    # binary compositions beyond the first random_compositions, generated after them and all used for
    # training: the held-out split is that of the set without them, so its crystals do not change
    extra_compositions: int = 0

    def key(self) -> str:
        fields = asdict(self)
        if not self.extra_compositions:  # the sets made before the field existed keep their key
            del fields["extra_compositions"]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def _oxidation_states(symbol: str) -> tuple[int, ...]:
    from pymatgen.core import Element

    return tuple(q for q in Element(symbol).common_oxidation_states if q != 0)


def _radius(symbol: str, q: int) -> float | None:
    from pymatgen.core import Species

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            r = Species(symbol, q).ionic_radius
        except Exception:  # noqa: BLE001 - pymatgen has no radius for this ion
            return None
    return float(r) if r else None


def perovskite_candidates() -> list[tuple[str, str, str, float]]:
    """(A, B, X, a in Å) of every charge-neutral, SMACT-valid cubic ABX3 with tolerance in [0.8, 1.05]."""
    from pymatgen.core import Composition

    out = []
    for x in ("O", "S", "F", "Cl", "Br", "I"):
        qx = -2 if x in ("O", "S") else -1
        rx = _radius(x, qx)
        for a in CATIONS:
            for qa in _oxidation_states(a):
                ra = _radius(a, qa)
                for b in CATIONS:
                    if b == a or ra is None:
                        continue
                    qb = -3 * qx - qa
                    if qb <= 0 or qb not in _oxidation_states(b):
                        continue
                    rb = _radius(b, qb)
                    if rb is None or rb >= ra:
                        continue
                    tol = (ra + rx) / (np.sqrt(2) * (rb + rx))
                    if 0.8 <= tol <= 1.05:
                        out.append((a, b, x, round(2 * (rb + rx), 4)))
    seen, unique = set(), []
    for a, b, x, lat in out:
        if (a, b, x) not in seen:
            seen.add((a, b, x))
            unique.append((a, b, x, lat))
    return [c for c in unique if composition_valid(Composition(f"{c[0]}{c[1]}{c[2]}3"))]


def perovskite(a: str, b: str, x: str, lattice: float):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.cubic(lattice), [a, b, x, x, x],
                     [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])


def binary_compositions(rng: np.random.Generator, n: int) -> list[tuple[list[str], list[int]]]:
    """n charge-neutral binary compositions (cation, anion, counts) with <= N_MAX atoms, drawn by rng."""
    options = binary_options()
    pick = rng.choice(len(options), size=min(n, len(options)), replace=False)
    return [options[i] for i in sorted(pick)]


def binary_options() -> list[tuple[list[str], list[int]]]:
    """Every charge-neutral binary composition (cation, anion, counts) with <= N_MAX atoms."""
    from math import gcd

    options = []
    for c in CATIONS:
        for qc in _oxidation_states(c):
            if qc <= 0:
                continue
            for x in ANIONS:
                qx = min(_oxidation_states(x))
                if qx >= 0:
                    continue
                g = gcd(qc, -qx)
                nc, nx = -qx // g, qc // g
                for z in (1, 2, 3, 4):
                    if z * (nc + nx) <= N_MAX:
                        options.append(([c, x], [z * nc, z * nx]))
    return options


def random_crystal(species: list[str], counts: list[int], rng: np.random.Generator):
    """A random symmetric crystal from pyxtal in a space group drawn by rng, or None if none fits."""
    from pyxtal import pyxtal

    for _ in range(8):
        group = int(rng.integers(2, 231))
        crystal = pyxtal()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # random_state, not seed: pyxtal 1.1 draws from its global state despite a seed, so
                # the set made before this fix (the shipped v1 file) cannot be regenerated bit for bit
                crystal.from_random(3, group, species, counts, random_state=np.random.default_rng(int(rng.integers(2**31))))
            if crystal.valid:
                return crystal.to_pymatgen()
        except Exception:  # noqa: BLE001 - pyxtal raises when the composition does not fit the group
            continue
    return None


def relax_positions(structures: list, steps: int, max_step: float = 0.1) -> list:
    """A few batched steepest-descent steps on CHGNet forces (positions only, step capped at 0.1 Å)."""
    from flowcoach.domains.crystals.physics import chgnet

    structures = [s.copy() for s in structures]
    for _ in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preds = chgnet().predict_structure(structures, task="ef", batch_size=16)
        for s, p in zip(structures, preds if isinstance(preds, list) else [preds]):
            f = np.asarray(p["f"])
            norm = np.linalg.norm(f, axis=1, keepdims=True)
            move = 0.05 * f * np.minimum(1.0, max_step / np.maximum(0.05 * norm, 1e-12))
            for i, d in enumerate(move):
                s.translate_sites([i], d, frac_coords=False, to_unit_cell=True)
    return structures


def energies(structures: list) -> list[float]:
    from flowcoach.domains.crystals.physics import chgnet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preds = chgnet().predict_structure(structures, task="e", batch_size=16)
    return [float(p["e"]) for p in (preds if isinstance(preds, list) else [preds])]


def elemental_candidates(symbol: str) -> list:
    """Cells for an element's reference energy: ASE's bulk phase where it has one, fcc/bcc/sc at
    three nearest-neighbour distances around twice the covalent radius, and a dimer in a 10 Å box."""
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii, reference_states
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    cells = []
    try:
        cells.append(AseAtomsAdaptor.get_structure(bulk(symbol)))
    except Exception:  # noqa: BLE001 - ASE has no bulk reference for gases and complex phases
        pass
    r = float(covalent_radii[atomic_numbers[symbol]])
    for s in (0.95, 1.05, 1.15):
        d = 2 * r * s
        cells.append(Structure(Lattice.cubic(d * np.sqrt(2)), [symbol] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]))
        cells.append(Structure(Lattice.cubic(d * 2 / np.sqrt(3)), [symbol] * 2, [[0, 0, 0], [0.5, 0.5, 0.5]]))
        cells.append(Structure(Lattice.cubic(d), [symbol], [[0, 0, 0]]))
    ref = reference_states[atomic_numbers[symbol]] or {}
    d = float(ref.get("d", 2 * r)) if ref.get("symmetry") == "diatom" else 2 * r
    cells.append(Structure(Lattice.cubic(10.0), [symbol] * 2, [[0, 0, 0], [d / 10.0, 0, 0]]))
    return cells


def elemental_references(elements) -> dict[str, float]:
    """Lowest CHGNet energy per atom of each element's candidate cells."""
    cells, owners = [], []
    for el in sorted(elements):
        for c in elemental_candidates(el):
            cells.append(c)
            owners.append(el)
    best: dict[str, float] = {}
    for el, e in zip(owners, energies(cells)):
        best[el] = min(best.get(el, np.inf), e)
    return best


def generate(cfg: GenConfig, say=print) -> dict:
    """The whole data set (crystals and elemental references) for ``cfg``; minutes of CPU."""
    rng = np.random.default_rng(cfg.seed)
    say(f"crystals data: perovskites (up to {cfg.perovskites})")
    cands = perovskite_candidates()
    if len(cands) > cfg.perovskites:
        cands = [cands[i] for i in sorted(rng.choice(len(cands), cfg.perovskites, replace=False))]
    per = [perovskite(*c) for c in cands]
    crystals = [crystal_from_structure(s, e, "perovskite") for s, e in zip(per, energies(per))]
    say(f"  {len(crystals)} perovskites; pyxtal random crystals for {cfg.random_compositions} compositions")
    crystals += random_crystals(binary_compositions(rng, cfg.random_compositions), cfg, rng)
    say(f"  {len(crystals)} crystals; elemental references")
    elements = elemental_references({el for c in crystals for el in c.species})
    kept = [c for c in crystals if formation_energy(c, elements) <= cfg.max_formation]
    say(f"  kept {len(kept)} of {len(crystals)} crystals within {cfg.max_formation} eV/atom of the elements")
    return {"config": asdict(cfg), "crystals": [asdict(c) for c in kept], "elements": elements}


def random_crystals(compositions: list, cfg: GenConfig, rng: np.random.Generator) -> list[Crystal]:
    """For each composition the lowest-energy of cfg.tries pyxtal crystals, relaxed cfg.relax_steps."""
    kept = []
    for species, counts in compositions:
        tried = [s for s in (random_crystal(species, counts, rng) for _ in range(cfg.tries)) if s is not None]
        if tried:
            es = energies(tried)
            kept.append(tried[int(np.argmin(es))])
    relaxed = relax_positions(kept, cfg.relax_steps) if cfg.relax_steps > 0 else kept
    return [crystal_from_structure(s, e, "pyxtal") for s, e in zip(relaxed, energies(relaxed))]


def add_extra(data: dict, cfg: GenConfig, say=print) -> dict:
    """data (the set of cfg without extras) plus, under "extra", crystals for cfg.extra_compositions
    binary compositions that no crystal of data has (so none is a held-out one), screened alike."""
    have = {tuple(sorted(c["species"])) for c in data["crystals"]}
    options = [o for o in binary_options()
               if tuple(sorted(s for s, n in zip(*o) for _ in range(n))) not in have]
    rng = np.random.default_rng([cfg.seed, 1])  # its own stream: the first set is not regenerated
    pick = rng.choice(len(options), size=min(cfg.extra_compositions, len(options)), replace=False)
    say(f"crystals data: pyxtal random crystals for {len(pick)} more compositions (training only)")
    crystals = random_crystals([options[i] for i in sorted(pick)], cfg, rng)
    elements = dict(data["elements"])
    elements.update(elemental_references({el for c in crystals for el in c.species} - set(elements)))
    kept = [c for c in crystals if formation_energy(c, elements) <= cfg.max_formation]
    say(f"  kept {len(kept)} of {len(crystals)} within {cfg.max_formation} eV/atom of the elements")
    return {**data, "config": asdict(cfg), "elements": elements, "extra": [asdict(c) for c in kept]}


def formation_energy(crystal: Crystal, elements: dict[str, float]) -> float:
    """CHGNet energy per atom minus the composition-weighted elemental references (eV/atom)."""
    return crystal.energy - float(np.mean([elements[s] for s in crystal.species]))


def cache_dir() -> Path:
    return Path(os.environ.get("FLOWCOACH_CACHE", "runs/cache")) / "crystals"


SHIPPED = Path(__file__).parent / "shipped"  # the default set, so a fresh install starts at once


def load_dataset(cfg: GenConfig = GenConfig(), say=print) -> dict:
    """The data set for cfg: from the cache, else the copy shipped in the package (the default set,
    37 kB), else generated (minutes) and written to the cache."""
    path = cache_dir() / f"data-{cfg.key()}.json"
    if path.exists():
        return json.loads(path.read_text())
    shipped = SHIPPED / f"data-{cfg.key()}.json.gz"
    if shipped.exists():
        return json.loads(gzip.decompress(shipped.read_bytes()))
    if cfg.extra_compositions:
        data = add_extra(load_dataset(replace(cfg, extra_compositions=0), say), cfg, say)
    else:
        data = generate(cfg, say)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return data


def split(data: dict, name: str, heldout_fraction: float = 0.1, seed: int = 0) -> list[Crystal]:
    """Deterministic train / heldout split of the crystals; the "extra" crystals, if any, are all train."""
    if name not in ("train", "heldout"):
        raise FlowcoachError(f"unknown split '{name}'; choose train or heldout")
    crystals = [Crystal(**c) for c in data["crystals"]]
    order = np.random.default_rng(seed).permutation(len(crystals))
    n_held = max(1, int(round(heldout_fraction * len(crystals))))
    if name == "heldout":
        return [crystals[i] for i in sorted(order[:n_held])]
    return [crystals[i] for i in sorted(order[n_held:])] + [Crystal(**c) for c in data.get("extra", [])]


# ----------------------------------------------------------------------------------- tensors
def composition_tensor(crystals: list[Crystal]) -> torch.Tensor:
    """[B, N_MAX] element indices (0 = padding)."""
    out = torch.zeros(len(crystals), N_MAX, dtype=torch.long)
    for i, c in enumerate(crystals):
        if len(c.species) > N_MAX:
            raise FlowcoachError(f"crystal with {len(c.species)} atoms exceeds N_MAX = {N_MAX}")
        out[i, : len(c.species)] = torch.tensor([element_index(s) for s in c.species])
    return out


def lattice_features(lattice) -> np.ndarray:
    """(a, b, c, alpha, beta, gamma) -> the 6 standardised lattice channels."""
    lat = np.asarray(lattice, dtype=np.float64)
    return np.concatenate([(np.log(lat[:3]) - LN_LEN_MEAN) / LN_LEN_STD, (lat[3:] - 90.0) / ANGLE_SCALE])


def lattice_from_features(feat: np.ndarray) -> np.ndarray:
    feat = np.asarray(feat, dtype=np.float64)
    return np.concatenate([np.exp(feat[:3] * LN_LEN_STD + LN_LEN_MEAN), 90.0 + ANGLE_SCALE * feat[3:6]])


def encode(crystals: list[Crystal], copies: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 [copies * B, N_MAX + 1, FEATURES], composition [copies * B, N_MAX]); each copy lifts the
    coordinates to freshly drawn periodic images (``torus.lift``)."""
    rng = np.random.default_rng(seed)
    xs = np.zeros((copies * len(crystals), N_MAX + 1, FEATURES), dtype=np.float32)
    xs[:, :N_MAX, 3:] = to_bits(np.zeros(N_MAX))  # padding sentinel
    comp = composition_tensor(crystals).repeat(copies, 1)
    for r in range(copies):
        for i, c in enumerate(crystals):
            row, n = r * len(crystals) + i, len(c.species)
            xs[row, :n, :3] = torus.lift(np.asarray(c.frac, dtype=np.float64), rng)
            xs[row, :n, 3:] = to_bits(comp[i, :n].numpy())
            xs[row, N_MAX, :6] = lattice_features(c.lattice)
    return torch.from_numpy(xs), comp
