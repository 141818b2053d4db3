"""Rewards of the crystals domain, on pymatgen ``Structure`` objects (None = undecodable sample).

Every reward gives a structure it cannot score (None, structurally invalid, exploded, or where
CHGNet's prediction is not finite) a defined floor value and counts it in ``info``:

| name | score | floor |
|---|---|---|
| crystal-structure | 1 if min periodic distance > 0.5 Å and volume > 0.1 Å^3, else 0 | 0 |
| crystal-smact | 1 if SMACT-valid (charge neutral + Pauling), else 0 | 0 |
| crystal-valid | 1 if both of the above, else 0 | 0 |
| crystal-energy | -CHGNet energy per atom, clipped to [-5, 10] | -5 |
| crystal-ehull | -proxy energy above hull (CHGNet, eV/atom), clipped to [-5, 1] | -5 |
| crystal-force | -max CHGNet force norm (eV/Å), clipped to [-5, 0] | -5 |
| crystal-stable | 1 if the proxy E_hull <= 0.1 eV/atom, else 0 | 0 |
| crystal-volume | 0 inside the composition's volume band, else -(distance of ln V to the band), clipped to [-5, 0] | -5 |
| crystal-volume-ref | -abs(ln V / V_ref): V_ref the volume of the training crystals of the same formula (else the fitted expectation), clipped to [-5, 0] | -5 |
| crystal-distance | 0 when no two atoms are closer than 1.1 Å, else -(1.1 - d_min) / 0.6 (so >= -1.83) | -2 |
| crystal-elements | 0 when the number of elements is one the training crystals have (2 or 3 here), else -1 | -1 |
| crystal-formula-duplicate | -(share of the other decodable samples of its group with the same reduced formula), 0 when unique | 0 |
| crystal-duplicate | -(share of the other valid samples of its group that StructureMatcher matches to it), 0 when unique | 0 |

crystal-volume is the guard against the hack seen in the first RL runs: a policy whose structures
are poor lowers CHGNet's E_hull by swelling its cells toward isolated atoms (valid by distance,
less bad in energy). Its band is composition-aware where the domain has set a
``physics.VolumeModel`` (per-element volumes fitted to the training crystals; the band holds 95% of
them): a fixed 8-50 Å^3/atom window (the training crystals' 1st-95th percentile) let a later run
swell its cells within it, density distance 0.22 -> 2.9 g/cm^3. Without a model the fixed window is used.

crystal-distance is the validity gate made smooth: the gate only says whether two atoms are closer
than 0.5 Å, so a sample at 0.6 Å and one at 2 Å score alike. No training crystal has two atoms closer
than 1.14 Å; the term is 0 from 1.1 Å on and -1 at the gate. It can be raised by swelling the cell as
well as by moving atoms apart, so it needs crystal-volume beside it (a scale-free variant, d_min over
(V/N)^(1/3), was tried and moved validity less: benchmarks/crystals/README.md).

crystal-elements holds de novo samples to the training set's support: a single element passes SMACT
and an elemental cell sits near its reference on the proxy hull, so Flow-GRPO on both de novo bases
turned to F2, Cl2, Te cells (none in the training set). Needs the domain's volume model, which knows the
training crystals.

crystal-duplicate is against a de novo group collapsing onto one crystal (Flow-GRPO on the first DNG
base: uniqueness 0.99 -> 0.26): the evaluator's matcher (DiffCSP's tolerances), within the group, which
shares a condition. An invalid sample scores 0 and matches nothing (validity has its own reward).
crystal-formula-duplicate is the same on compositions alone: a de novo group drifts to a few formulas
(F2, Cl2, chlorides) long before two of its cells match; in structure prediction a group shares its
formula, so every sample scores -1 and the group-relative advantage ignores it.

``atom_credit`` is not a reward term but the domain's per-atom rewards for ``--loss.element-weight``
(``CrystalsDomain.element_rewards``): an atom is blamed where it collides, or where the composition is not
charge-balanced and its element is one that a single atom too many or too few explains
(``blamed_elements``); the rest of the crystal's atoms are credited.

CHGNet is called once per structure per process (results are cached), however many of these rewards
are composed. The proxy hull is the domain's (its elemental references and training crystals).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.crystals import physics
from flowcoach.rewards.diversity import duplicate_share, group_ids_of

ENERGY_FLOOR, EHULL_FLOOR, FORCE_FLOOR = -5.0, -5.0, -5.0


def _binary(objects: list, test) -> tuple[torch.Tensor, dict]:
    ok = [s is not None and test(s) for s in objects]
    return torch.tensor(ok, dtype=torch.float32), {"invalid": sum(not v for v in ok),
                                                   "undecodable": sum(s is None for s in objects)}


def structure_validity(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    return _binary(objects, physics.structure_ok)


def composition_validity(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    return _binary(objects, physics.composition_ok)


def validity(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    return _binary(objects, lambda s: physics.structure_ok(s) and physics.composition_ok(s))


def _scored(objects: list, value, floor: float, low: float, high: float) -> tuple[torch.Tensor, dict]:
    """Apply value(structure, prediction) -> float | None to CHGNet's predictions, with the floor."""
    preds = physics.chgnet_predict(objects)
    scores, invalid = [], 0
    for s, p in zip(objects, preds):
        v = value(s, p) if p is not None else None
        if v is None or not np.isfinite(v):
            scores.append(floor)
            invalid += 1
        else:
            scores.append(float(np.clip(v, low, high)))
    exploded = sum(s is None or physics.exploded(s) for s in objects)
    return torch.tensor(scores, dtype=torch.float32), {"invalid": invalid, "exploded": exploded}


def energy(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    return _scored(objects, lambda s, p: -p["e"], ENERGY_FLOOR, ENERGY_FLOOR, 10.0)


def _ehull(s, p):
    e = physics.reference_hull().e_above_hull(s.composition, p["e"])
    return None if e is None else e


def ehull(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    def value(s, p):
        e = _ehull(s, p)
        return None if e is None else -e
    return _scored(objects, value, EHULL_FLOOR, EHULL_FLOOR, 1.0)


def stable(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    def value(s, p):
        e = _ehull(s, p)
        return None if e is None else float(e <= physics.STABLE_EHULL)
    return _scored(objects, value, 0.0, 0.0, 1.0)


VOLUME_WINDOW = (8.0, 50.0)  # Å^3 per atom


def volume(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    scores, outside = [], 0
    model = physics.volume_model()
    for s in objects:
        v = s.volume / len(s) if s is not None and len(s) else float("nan")
        if not np.isfinite(v) or v <= 0:
            scores.append(-5.0)
            outside += 1
            continue
        expected = model.expected(s.composition) if model is not None else None
        if expected is not None:  # ln(V / V_expected) against the band of the training crystals
            r, (lo, hi) = np.log(s.volume / expected), model.band
            gap = lo - r if r < lo else r - hi if r > hi else 0.0
        else:
            lo, hi = VOLUME_WINDOW
            gap = np.log(lo / v) if v < lo else np.log(v / hi) if v > hi else 0.0
        gap = gap if gap > 1e-9 else 0.0  # on the band's edge (float noise) is inside
        outside += gap > 0
        scores.append(float(max(-gap, -5.0)))
    return torch.tensor(scores, dtype=torch.float32), {"invalid": outside}


def volume_reference(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    """-|ln(V / V_ref)|: crystal-volume's band holds 95 % of the training crystals, so a policy may swell
    every cell by 10 % inside it (RL on a mid-trajectory SDE window did, benchmarks/crystals); this term
    sees any swelling, against the training crystals of the sample's own formula where there are some.
    Needs the domain's volume model (refused without one)."""
    model = physics.volume_model()
    if model is None:
        raise FlowcoachError("crystal-volume-ref needs the crystals domain's volume model; use it with the crystals domain")
    scores, off = [], 0
    for s in objects:
        ref = model.reference(s.composition) if s is not None and len(s) else None
        if ref is None or not np.isfinite(s.volume) or s.volume <= 0:
            scores.append(-5.0)
            off += 1
            continue
        scores.append(float(max(-abs(np.log(s.volume / ref)), -5.0)))
    return torch.tensor(scores, dtype=torch.float32), {"invalid": off}


@functools.lru_cache(maxsize=1 << 16)
def _smact_valid(counts: tuple[tuple[str, int], ...]) -> bool:
    from pymatgen.core import Composition

    return physics.composition_valid(Composition(dict(counts)))


def _counts_valid(counts: dict[str, int]) -> bool:
    """SMACT validity of element counts (zero counts dropped), cached: the same few compositions recur."""
    return _smact_valid(tuple(sorted((e, n) for e, n in counts.items() if n > 0)))


def blamed_elements(counts: dict[str, int]) -> set[str]:
    """The elements of a composition that is not SMACT-valid one of whose atoms, changed to another
    element of the composition or left out, would make it valid (with two elements or more left: a
    single element passes SMACT and is no fix). Empty when no single such change does. De novo, most
    invalid compositions are one atom off a valid one (CsBr4 in a 5-atom cell: one Br too many). Changes
    to elements absent from the crystal are not tried: with every cation (anion) of the vocabulary as a
    candidate, 125 of base-dng-wide's 133 invalid samples in 500 blamed every atom (no credit to give);
    with this rule 70 blame some atoms and credit the rest."""
    blamed = set()
    for element in counts:
        for other in [e for e in counts if e != element] + [None]:
            changed = dict(counts)
            changed[element] -= 1
            if other is not None:
                changed[other] += 1
            if sum(n > 0 for n in changed.values()) >= 2 and _counts_valid(changed):
                blamed.add(element)
                break
    return blamed


def atom_credit(objects: list, conditions, n_rows: int) -> torch.Tensor:
    """Per-atom rewards [B, n_rows] on the sample's rows, for per-element credit (--loss.element-weight):
    1 for an atom that is no closer than 0.5 Å to another site or its own image and, where the
    composition is not SMACT-valid, not of a blamed element (``blamed_elements``; every element when
    none is); 0 for the other atoms, for every atom row of an undecodable sample and for a row the
    condition marks as an atom that decoded as none; NaN for the rest (padding, the lattice row)."""
    atoms = torch.as_tensor(conditions) > 0
    out = torch.full((len(objects), n_rows), float("nan"))
    out[:, :atoms.shape[1]][atoms] = 0.0
    for b, s in enumerate(objects):
        if not physics.has_cell(s):
            continue
        good = physics.site_min_distances(s) > physics.MIN_DISTANCE
        counts = {e.symbol: int(round(n)) for e, n in s.composition.items()}
        if not _counts_valid(counts):
            blamed = blamed_elements(counts) or set(counts)
            good &= np.array([site.specie.symbol not in blamed for site in s])
        if "rows" not in s.properties:
            raise FlowcoachError("per-atom credit needs the crystals domain's decoded structures (their "
                                 "properties['rows'] map sites to sample rows); decode samples with its decode()")
        rows = np.asarray(s.properties["rows"])
        inside = atoms[b, rows].numpy()  # a padding row decoded as an atom is not the model's to credit
        out[b, rows[inside]] = torch.from_numpy(good[inside].astype(np.float32))
    return out


DISTANCE_TARGET = 1.1  # Å: below every training crystal's shortest distance (1.14 Å)
DISTANCE_FLOOR = -2.0  # below the worst decodable score, -(1.1 - 0) / 0.6


def distance(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    scores, short = [], 0
    for s in objects:
        d = physics.min_periodic_distance(s) if s is not None and len(s) else float("nan")
        if not np.isfinite(d):
            scores.append(DISTANCE_FLOOR)
            short += 1
            continue
        gap = max(DISTANCE_TARGET - d, 0.0) / (DISTANCE_TARGET - physics.MIN_DISTANCE)
        short += gap > 0
        scores.append(-gap)
    return torch.tensor(scores, dtype=torch.float32), {"invalid": short}


def force(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    return _scored(objects, lambda s, p: -p["fmax"], FORCE_FLOOR, FORCE_FLOOR, 0.0)


def element_count(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    model = physics.volume_model()
    if model is None:
        raise FlowcoachError("crystal-elements needs the crystals domain's volume model; use it with the crystals domain")
    ok = [s is not None and len(s) > 0 and len(s.composition.elements) in model.element_counts for s in objects]
    return torch.tensor([0.0 if v else -1.0 for v in ok]), {"invalid": sum(not v for v in ok)}


def formula_duplicate(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    formulas = [s.composition.reduced_formula if s is not None and len(s) else None for s in objects]
    scores = duplicate_share(group_ids_of(conditions, len(objects)),
                             lambda i, j: formulas[i] is not None and formulas[i] == formulas[j])
    return torch.from_numpy(scores), {"invalid": formulas.count(None), "duplicates": int((scores < 0).sum())}


def duplicate(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    from flowcoach.domains.crystals.evaluate import _fits, _matcher

    matcher = _matcher()
    ok = [s is not None and len(s) > 0 and physics.structure_ok(s) for s in objects]

    def same(i: int, j: int) -> bool:
        a, b = objects[i], objects[j]
        return (ok[i] and ok[j] and a.composition.reduced_formula == b.composition.reduced_formula
                and _fits(matcher, a, b))

    scores = duplicate_share(group_ids_of(conditions, len(objects)), same)
    return torch.from_numpy(scores), {"invalid": len(objects) - sum(ok), "duplicates": int((scores < 0).sum())}
