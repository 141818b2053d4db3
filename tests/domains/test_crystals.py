"""Crystals domain: torus math, periodic distance, rewards on valid/overlapping/absurd structures,
CIF round trip, the model's closed-form rows, check_domain, and a short pretraining run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pymatgen")
pytest.importorskip("smact")
pytest.importorskip("chgnet")
pytest.importorskip("pyxtal")

from pymatgen.core import Lattice, Structure  # noqa: E402

from flowcoach.domains.crystals import (  # noqa: E402
    CrystalsDNGDomain, CrystalsDNGVelocityDomain, CrystalsDomain, CrystalsVelocityDomain, physics, torus)
from flowcoach.domains.crystals.data import (  # noqa: E402
    FEATURES, N_MAX, GenConfig, crystal_from_structure, encode, from_bits, to_bits)
from flowcoach.domains.crystals.decode import decode, save_structures  # noqa: E402
from flowcoach.domains.crystals.model import CrystalVelocity  # noqa: E402

TINY = GenConfig(seed=3, perovskites=10, random_compositions=4, tries=2, relax_steps=1)


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    import os

    old = os.environ.get("FLOWCOACH_CACHE")
    os.environ["FLOWCOACH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    d = CrystalsDomain(gen=TINY, copies=2, width=16, depth=1, sevenn=False)
    d._load()
    yield d
    if old is None:
        os.environ.pop("FLOWCOACH_CACHE", None)
    else:
        os.environ["FLOWCOACH_CACHE"] = old


def rocksalt(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


# ------------------------------------------------------------------------------- torus math
def test_wrap_and_periodic_displacement_by_hand():
    f0 = np.array([0.9, 0.1, 0.5])
    f1 = np.array([0.1, 0.8, 0.5])
    assert np.allclose(torus.wrap(np.array([1.25, -0.25, 3.0])), [0.25, 0.75, 0.0])
    assert np.allclose(torus.periodic_displacement(f0, f1), [0.2, -0.3, 0.0])  # across the faces
    assert np.allclose(torus.periodic_displacement(torch.tensor(f0), torch.tensor(f1)).numpy(), [0.2, -0.3, 0.0])


def test_wrapped_interpolation_and_velocity_by_hand():
    f0, f1 = np.array([0.9, 0.1, 0.3]), np.array([0.1, 0.8, 0.6])
    # halfway: 0.9 + 0.1 = 1.0 -> 0.0; 0.1 - 0.15 = -0.05 -> 0.95; 0.3 + 0.15 = 0.45
    assert np.allclose(torus.wrapped_interpolation(f0, f1, 0.5), [0.0, 0.95, 0.45])
    assert np.allclose(torus.wrapped_interpolation(f0, f1, 0.0), f0)
    assert np.allclose(torus.wrapped_interpolation(f0, f1, 1.0), f1)
    h = 1e-6  # the velocity is the derivative of the path (on the torus)
    fd = torus.periodic_displacement(torus.wrapped_interpolation(f0, f1, 0.3),
                                     torus.wrapped_interpolation(f0, f1, 0.3 + h)) / h
    assert np.allclose(fd, torus.torus_velocity(f0, f1), atol=1e-4)
    assert np.allclose(torus.torus_velocity(f0, f1), [0.2, -0.3, 0.3])


def test_euclidean_path_from_the_nearest_image_is_the_torus_geodesic():
    rng = np.random.default_rng(0)
    f0, eps = rng.random((50, 3)), rng.normal(size=(50, 3))
    img = torus.nearest_image(f0, eps)
    assert np.allclose(torus.wrap(img), f0)
    assert np.allclose(eps - img, torus.periodic_displacement(f0, eps))  # Euclidean velocity = torus velocity
    for t in (0.0, 0.3, 0.7, 1.0):
        euclid = torus.wrap((1 - t) * img + t * eps)
        geo = torus.wrapped_interpolation(f0, torus.wrap(eps), t)
        assert np.allclose(torus.periodic_displacement(euclid, geo), 0.0, atol=1e-9)


def test_lift_wraps_back_and_weights_images_by_the_prior():
    rng = np.random.default_rng(1)
    f = np.full((20000, 3), 0.5)
    lifted = torus.lift(f, rng)
    assert np.allclose(torus.wrap(lifted), f)
    share = [(lifted == v).mean() for v in (-0.5, 0.5, 1.5)]
    assert abs(share[0] - share[1]) < 0.02  # phi(-0.5) = phi(0.5)
    expected = np.exp(-0.5 * 1.5**2) / sum(np.exp(-0.5 * (0.5 + k) ** 2) for k in range(-3, 4))
    assert abs(share[2] - expected) < 0.01


def test_fourier_features_are_periodic():
    d = torch.tensor([[0.2, -0.3, 0.45]])
    assert torch.allclose(torus.fourier_features(d, 3), torus.fourier_features(d + torch.tensor([1.0, -2.0, 3.0]), 3), atol=1e-5)


# ------------------------------------------------------------------------------- distances, encoding
def test_min_periodic_distance_across_faces_and_self_image():
    s = Structure(Lattice.cubic(10.0), ["Na", "Cl"], [[0.01, 0.5, 0.5], [0.99, 0.5, 0.5]])
    assert physics.min_periodic_distance(s) == pytest.approx(0.2, abs=1e-6)
    assert physics.min_periodic_distance(Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])) == pytest.approx(3.0)
    assert physics.min_periodic_distance(rocksalt()) == pytest.approx(5.64 / 2)


def test_bits_round_trip():
    idx = np.arange(0, 50)
    assert (from_bits(to_bits(idx)) == idx).all()
    assert (from_bits(to_bits(idx) * 0.7 + 0.1) == idx).all()  # the sign decides


def test_encode_decode_and_cif_round_trip(tmp_path):
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.cif import CifParser

    s = rocksalt().get_primitive_structure()
    x, comp = encode([crystal_from_structure(s, -3.0, "test")], copies=3, seed=0)
    assert x.shape == (3, N_MAX + 1, FEATURES) and comp.shape == (3, N_MAX)
    assert not torch.equal(x[0, :2, :3], x[1, :2, :3]) or not torch.equal(x[1, :2, :3], x[2, :2, :3])  # lifted
    objects = decode(x)
    matcher = StructureMatcher()
    assert all(o is not None and matcher.fit(o, s) for o in objects)
    assert objects[0].properties["rows"] == [0, 1]  # each site's sample row (per-atom credit)
    x[0, 0, 3:] = torch.tensor(to_bits(np.array(0)))  # row 0 now holds no atom
    assert decode(x[:1])[0].properties["rows"] == [1]
    files = save_structures(objects, torch.tensor([1.0, 0.5, 0.0]), tmp_path)
    back = CifParser(files[1]).parse_structures(primitive=False)[0]
    assert matcher.fit(back, s)
    assert json.loads(files[0].read_text())[0]["formula"] == "NaCl"


def test_decode_rejects_absurd_samples():
    x = torch.zeros(3, N_MAX + 1, FEATURES)
    x[:, :, 3:] = -1.0  # every row padding
    x[1, 0, 3:] = torch.tensor(to_bits(np.array(2)))
    x[1, N_MAX, 3:6] = 5.0  # angles of 190 degrees
    x[2, 0, 0] = float("nan")
    assert decode(x) == [None, None, None]


# ------------------------------------------------------------------------------- rewards
@pytest.fixture(scope="module")
def nacl_references():
    from flowcoach.domains.crystals.data import elemental_references

    return list(elemental_references({"Na", "Cl"}).items())


@pytest.fixture
def nacl_hull(nacl_references):
    old = list(physics._HULL)
    physics.use_hull(physics.ProxyHull(nacl_references))
    yield
    physics._HULL[:] = old


def _three():
    valid = rocksalt()
    overlap = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.04, 0, 0]])  # 0.2 Å apart
    absurd = Structure(Lattice.cubic(60.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # 1e5 Å^3 / atom
    return [valid, overlap, absurd, None]


@pytest.mark.parametrize("name,expected", [
    ("crystal-structure", [1, 0, 1, 0]), ("crystal-smact", [1, 1, 1, 0]), ("crystal-valid", [1, 0, 1, 0])])
def test_validity_rewards(name, expected):
    from flowcoach.rewards import build_reward

    scores, info = build_reward({name: 1.0})(_three(), None)
    assert scores.tolist() == expected
    assert info[f"{name}/invalid"] == expected.count(0)


def test_blamed_elements_are_the_ones_a_single_atom_change_makes_charge_balanced():
    from flowcoach.rewards.crystals import blamed_elements

    # NaCl2: Na+ and Cl- leave -1; one Cl less is NaCl, while Na -> Cl is Cl3, a single element (no fix)
    assert blamed_elements({"Na": 1, "Cl": 2}) == {"Cl"}
    # Mg2S3: one S less is MgS; Mg -> S gives MgS4, one Mg less MgS3, both unbalanced
    assert blamed_elements({"Mg": 2, "S": 3}) == {"S"}
    # CsBr4 (a 5-atom cell): CsBr3 and Cs2Br3 are unbalanced and Br5 is one element: no single fix
    assert blamed_elements({"Cs": 1, "Br": 4}) == set()


def test_atom_credit_blames_colliding_and_miscounted_atoms_per_row():
    from flowcoach.core.registry import FlowcoachError
    from flowcoach.rewards.crystals import atom_credit

    def crystal(species, frac, rows, a=5.64):
        return Structure(Lattice.cubic(a), species, frac, properties={"rows": rows})

    nacl = crystal(["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]], [0, 1])
    # four atoms asked for; row 1 decoded as no atom, the other three are NaCl2: the Cl rows are blamed
    nacl2 = crystal(["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]], [0, 2, 3])
    # Na and Cl 0.2 Å apart (both collide), and a third atom far from both; row 3 is past the condition
    overlap = crystal(["Na", "Cl", "Na", "Cl"], [[0, 0, 0], [0.04, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]],
                      [0, 1, 2, 3], a=5.0)
    cond = torch.zeros(4, N_MAX, dtype=torch.long)
    cond[0, :2] = cond[1, :4] = cond[2, :3] = cond[3, :3] = 7
    credit = atom_credit([nacl, nacl2, overlap, None], cond, N_MAX + 1)
    nan = float("nan")
    expected = torch.full((4, N_MAX + 1), nan)
    expected[0, :2] = torch.tensor([1.0, 1.0])
    expected[1, :4] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected[2, :3] = torch.tensor([0.0, 0.0, 1.0])
    expected[3, :3] = 0.0
    assert torch.equal(credit.isnan(), expected.isnan())
    assert torch.equal(credit.nan_to_num(-1), expected.nan_to_num(-1))
    with pytest.raises(FlowcoachError, match="decoded structures"):  # not from the domain's decoder
        atom_credit([rocksalt()], cond[:1], N_MAX + 1)


def test_smact_rejects_a_charged_composition():
    from flowcoach.rewards.crystals import composition_validity

    s = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])
    assert composition_validity([s], None)[0].tolist() == [0.0]


@pytest.mark.parametrize("name,floor", [("crystal-energy", -5.0), ("crystal-ehull", -5.0), ("crystal-force", -5.0),
                                        ("crystal-stable", 0.0)])
def test_potential_rewards_floor_and_count_bad_structures(name, floor, nacl_hull):
    from flowcoach.rewards import build_reward

    scores, info = build_reward({name: 1.0})(_three(), None)
    assert torch.isfinite(scores).all()
    assert scores[1:].tolist() == [floor] * 3  # overlapping, exploded, undecodable
    assert info[f"{name}/invalid"] == 3 and info[f"{name}/exploded"] == 3
    if name == "crystal-energy":
        assert -5.0 < -scores[0] < -2.0  # CHGNet: rocksalt NaCl about -3.4 eV/atom
    if name == "crystal-ehull":
        assert scores[0] > 0.5  # far below the elemental hull
    if name == "crystal-force":
        assert scores[0] > -0.05  # a symmetric minimum: no force
    if name == "crystal-stable":
        assert scores[0] == 1.0


def test_squeezed_crystal_has_higher_energy_and_forces(nacl_hull):
    from flowcoach.rewards.crystals import ehull, force

    squeezed = rocksalt(4.6)
    squeezed.perturb(0.05, min_distance=0.01)
    e, _ = ehull([rocksalt(), squeezed], None)
    f, _ = force([rocksalt(), squeezed], None)
    assert e[0] > e[1] and f[0] > f[1]


def test_relaxed_metrics_take_an_off_site_cell_to_a_nearby_minimum(nacl_hull):
    from flowcoach.domains.crystals.evaluate import relaxed_metrics

    # a CsCl-type NaCl cell, too large and with Cl off the body centre
    sample = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.55, 0.5, 0.5]])
    m = relaxed_metrics([sample])
    assert m["relaxed_count"] == 1.0 and m["mean_relax_energy_drop"] > 0.0  # relaxation lowers the energy
    final, _ = physics.relax(sample)
    before, after = physics.chgnet_predict([sample, final])
    assert after["fmax"] < 0.1 < before["fmax"]  # it ends at (near) a minimum of the potential
    assert m["relaxed_match_rate"] == 1.0 and m["median_rmsd_to_relaxed"] < 0.3  # the same structure type


# ------------------------------------------------------------------------------- model and domain
def two_compositions() -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, x): a 5-atom and a 2-atom composition, and a random state of each."""
    cond = torch.zeros(2, N_MAX, dtype=torch.long)
    cond[0, :5] = torch.tensor([1, 2, 42, 42, 42])
    cond[1, :2] = torch.tensor([3, 45])
    return cond, torch.randn(2, N_MAX + 1, FEATURES)


@pytest.mark.parametrize("config", [{}, {"predict": "x0"}, {"predict": "x0", "heads": 4}])
def test_model_closed_form_rows_and_permutation_equivariance(config):
    torch.manual_seed(0)
    model = CrystalVelocity(width=16, depth=2, **config)
    cond, x = two_compositions()
    t = torch.tensor([0.5, 0.25])
    v = model(x, t, cond)
    assert v.shape == x.shape
    # padding row -> sentinel (0, 0, 0, bits(0)), type bits -> the composition's: (x - c) / t
    assert torch.allclose(v[1, 5], (x[1, 5] - torch.tensor([0, 0, 0, *to_bits(np.array(0))])) / 0.25)
    assert torch.allclose(v[0, 2, 3:], (x[0, 2, 3:] - torch.tensor(to_bits(np.array(42)))) / 0.5)
    assert torch.allclose(v[0, N_MAX, 6:], x[0, N_MAX, 6:] / 0.5)
    perm = torch.tensor([2, 0, 4, 1, 3])
    xp, cp = x.clone(), cond.clone()
    xp[0, :5], cp[0, :5] = x[0, perm], cond[0, perm]
    vp = model(xp, t, cp)
    assert torch.allclose(vp[0, :5], v[0, perm], atol=1e-5)
    assert torch.allclose(vp[0, N_MAX], v[0, N_MAX], atol=1e-5)


def test_x0_model_heads_along_the_geodesic_to_its_predicted_crystal():
    from flowcoach.domains.crystals.model import X0_BLEND_T

    torch.manual_seed(0)
    model = CrystalVelocity(width=16, depth=2, predict="x0")
    cond, x = two_compositions()
    t = torch.tensor([0.7, 0.05])
    v = model(x, t, cond)
    # the torus sees no image: moving an atom by whole cells leaves every velocity as it was
    shifted = x.clone()
    shifted[0, 1, :3] += torch.tensor([1.0, -2.0, 3.0])
    torch.testing.assert_close(model(shifted, t, cond), v)
    # pin the outputs: every atom predicts site f0 (cos, sin per axis) and w, the lattice L0 and w_lat
    f0, w = np.array([0.5, 0.0, 0.25]), np.array([0.3, -0.1, 0.2])
    L0, w_lat = np.linspace(-1, 1, 6), np.full(6, 0.4)
    with torch.no_grad():
        model.coord_out.weight.zero_()
        model.coord_out.bias.copy_(torch.tensor(np.concatenate([np.cos(2 * np.pi * f0), np.sin(2 * np.pi * f0), w])))
        model.lattice_out[-1].weight.zero_()
        model.lattice_out[-1].bias.copy_(torch.tensor(np.concatenate([L0, w_lat])))
    v = model(x, t, cond).detach().double().numpy()
    xn, s = x.double().numpy(), X0_BLEND_T
    for b, n in ((0, 5), (1, 2)):
        tb = float(t[b])
        frac = xn[b, :n, :3] - np.floor(xn[b, :n, :3])
        d = (frac - f0 + 0.5) % 1.0 - 0.5  # the shortest displacement from the predicted site
        np.testing.assert_allclose(v[b, :n, :3], (d + s * w) / (tb + s), atol=1e-5)
        np.testing.assert_allclose(v[b, N_MAX, :6], (xn[b, N_MAX, :6] - L0 + s * w_lat) / (tb + s), atol=1e-5)
        assert np.abs(v[b, :n, :3] * (tb + s) - s * w).max() <= 0.5 + 1e-6  # never the long way round


def test_dng_model_predicts_types():
    model = CrystalVelocity(width=16, depth=1, generate_types=True)
    cond = torch.zeros(1, N_MAX, dtype=torch.long)
    cond[0, :2] = 1
    x = torch.randn(1, N_MAX + 1, FEATURES)
    v = model(x, torch.tensor([0.5]), cond)
    assert not torch.allclose(v[0, 0, 3:], (x[0, 0, 3:] - torch.tensor(to_bits(np.array(1)))) / 0.5)


def test_check_domain(domain):
    from flowcoach.core.domain import check_domain

    passed = check_domain(domain)
    assert "reward is finite on random samples" in passed and "save writes files" in passed


def test_check_domain_dng(domain):
    from flowcoach.core.domain import check_domain

    dng = CrystalsDNGDomain(gen=TINY, copies=1, width=16, depth=1, sevenn=False)
    assert "model output has the input's shape" in check_domain(dng)


def test_data_is_deterministic_and_valid(domain):
    x0, cond = domain.data("train")
    again = CrystalsDomain(gen=TINY, copies=2).data("train")
    assert torch.equal(x0, again[0]) and torch.equal(cond, again[1])
    objects = decode(x0)
    assert all(o is not None and physics.structure_ok(o) and physics.composition_ok(o) for o in objects)
    assert (cond > 0).sum(1).max() <= N_MAX


def test_generation_is_deterministic_from_its_seed(domain):
    from flowcoach.domains.crystals.data import generate, load_dataset

    assert generate(TINY, say=lambda *_: None) == load_dataset(TINY)  # made again == the fixture's cached set


def test_extra_compositions_only_add_training_crystals_of_new_compositions(domain):
    from dataclasses import replace

    from flowcoach.domains.crystals.data import load_dataset, split

    first = load_dataset(TINY)  # the fixture's cached set: not regenerated below
    more = load_dataset(replace(TINY, extra_compositions=8))
    assert more["crystals"] == first["crystals"] and len(more["extra"]) >= 1
    assert split(more, "heldout") == split(first, "heldout")
    assert split(more, "train")[: len(split(first, "train"))] == split(first, "train")
    assert len(split(more, "train")) == len(split(first, "train")) + len(more["extra"])
    old = {tuple(sorted(c["species"])) for c in first["crystals"]}
    assert all(tuple(sorted(c["species"])) not in old for c in more["extra"])
    assert all(c["source"] == "pyxtal" and len(set(c["species"])) == 2 for c in more["extra"])
    assert load_dataset(replace(TINY, extra_compositions=8)) == more  # read back from the cache


def test_validation_conditions_are_training_compositions_fixed_and_never_held_out(domain):
    from flowcoach.domains.crystals import composition_key

    train = {composition_key(r) for r in domain.data("train")[1]}
    held = {composition_key(r) for r in domain.eval_conditions(64)}
    val = domain.validation_conditions(64)
    keys = [composition_key(r) for r in val]
    assert set(keys) <= train and not set(keys) & held
    assert torch.equal(val, domain.validation_conditions(64))
    assert len(set(keys[:len(train)])) == min(len(train), 64)  # a permutation before it cycles


def test_coupling_keeps_each_crystal_and_pairs_it_along_the_torus_geodesic(domain):
    x0, cond = domain.data("train")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    first = CrystalsVelocityDomain(gen=TINY, copies=2, width=16, depth=1, sevenn=False)
    assert first.couple(x0, eps, cond) is x0  # independent pairs, as the first bases
    y = CrystalsDomain(gen=TINY, copies=2, width=16, depth=1, sevenn=False, coupling="geodesic").couple(x0, eps, cond)
    from pymatgen.analysis.structure_matcher import StructureMatcher

    same = StructureMatcher(ltol=1e-3, stol=1e-3, angle_tol=1e-2, primitive_cell=False, scale=False)
    for a, b in zip(decode(x0), decode(y)):
        assert same.fit(a, b)  # the same crystal: a permutation of same-element sites and other images
    real = cond > 0
    step = (eps - y)[:, :N_MAX, :3][real]
    assert float(step.abs().max()) <= 0.5 + 1e-6  # every atom's path is the shortest periodic displacement
    torch.testing.assert_close(y[:, N_MAX], x0[:, N_MAX])  # the lattice row is left alone
    for b in range(len(x0)):  # and the pairing is no longer than the lift it replaces
        n = int(real[b].sum())
        assert float(((y[b, :n, :3] - eps[b, :n, :3]) ** 2).sum()) <= float(((x0[b, :n, :3] - eps[b, :n, :3]) ** 2).sum()) + 1e-6


def test_de_novo_geodesic_coupling_permutes_atoms_by_their_data_elements(domain):
    """De novo the condition marks atoms only (all alike): the pairing must read each atom's element from
    the data's type bits, or it would swap sites between elements and the type bits would no longer
    say which atom sits where."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    x0, cond = domain.data("train")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    dng = CrystalsDNGDomain(gen=TINY, copies=2, width=16, depth=1, sevenn=False, coupling="geodesic", predict="x0")
    marks = (cond > 0).long()  # what a de novo condition holds
    y = dng.couple(x0, eps, marks)
    same = StructureMatcher(ltol=1e-3, stol=1e-3, angle_tol=1e-2, primitive_cell=False, scale=False)
    for a, b in zip(decode(x0), decode(y)):
        assert same.fit(a, b)
    torch.testing.assert_close(y[:, :, 3:], x0[:, :, 3:])  # bits stay: only same-element rows trade places
    assert float((eps - y)[:, :N_MAX, :3][marks > 0].abs().max()) <= 0.5 + 1e-6
    # the structure-prediction coupling with the composition as condition pairs the same way
    csp = CrystalsDomain(gen=TINY, copies=2, width=16, depth=1, sevenn=False, coupling="geodesic")
    torch.testing.assert_close(y, csp.couple(x0, eps, cond))


def test_structure_loss_is_the_distance_error_on_the_torus(domain):
    s = rocksalt()  # the cubic 8-atom cell: fractional shortest displacements are the shortest distances
    x0, cond = encode([crystal_from_structure(s, -3.0, "test")], seed=0)
    assert float(domain.structure_loss(x0, x0, cond)[0]) < 1e-6
    same = x0.clone()
    same[0, 2, 0] += 1.0  # another periodic image of one atom: the same crystal
    assert float(domain.structure_loss(same, x0, cond)[0]) < 1e-6
    # the second Na on the first one's site: the mean over the 56 ordered pairs of the squared change of
    # each distance, the distances from pymatgen's own shortest-image distance matrix
    hat = x0.clone()
    hat[0, 1, :3] = x0[0, 0, :3]
    collapsed = Structure(s.lattice, s.species, [s.frac_coords[0], *s.frac_coords[[0]], *s.frac_coords[2:]])
    expected = ((collapsed.distance_matrix - s.distance_matrix) ** 2).sum() / 56
    assert abs(float(domain.structure_loss(hat, x0, cond)[0]) - expected) < 1e-3
    assert expected > 2 * (5.64 / 2**0.5) ** 2 / 56  # at least the pair's own 3.99 A, lost both ways
    hat.requires_grad_(True)
    domain.structure_loss(hat, x0, cond).sum().backward()
    assert torch.isfinite(hat.grad).all()  # through the collided pair's zero distance too


def test_nearest_coupling_moves_each_atom_to_its_image_nearest_the_noise(domain):
    x0, cond = domain.data("train")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    y = CrystalsDomain(gen=TINY, copies=2, width=16, depth=1, sevenn=False, coupling="nearest").couple(x0, eps, cond)
    real = cond > 0
    # the same atoms on the same rows (no permutation), each at another image of its site
    shift = (y - x0)[:, :N_MAX, :3][real]
    torch.testing.assert_close(shift, shift.round(), atol=1e-5, rtol=0)
    assert float((eps - y)[:, :N_MAX, :3][real].abs().max()) <= 0.5 + 1e-6  # the shortest way to the noise
    torch.testing.assert_close(y[:, :N_MAX][~real], x0[:, :N_MAX][~real])  # padding and lattice left alone
    torch.testing.assert_close(y[:, N_MAX], x0[:, N_MAX])


def test_a_base_brings_its_coupling_so_anchoring_pairs_as_it_was_pretrained():
    from flowcoach.core.checkpoint import load_base

    d = CrystalsDomain(sevenn=False)
    assert (d.coupling, d.predict) == ("geodesic", "x0") and d.model_config()["coupling"] == "geodesic"
    load_base(d, d.base_checkpoint().parent / "base")  # the first base's model.json names neither
    assert (d.coupling, d.predict) == ("independent", "velocity")  # what data anchoring (couple) now uses
    load_base(d, d.base_checkpoint())
    assert (d.coupling, d.predict) == ("geodesic", "x0")


def test_default_model_is_the_shipped_bases_so_pretrain_remakes_them():
    import inspect

    from flowcoach.core.algorithms import train_config
    from flowcoach.core.registry import FlowcoachError

    defaults = {k: p.default for k, p in inspect.signature(CrystalVelocity).parameters.items()}
    defaults["coupling"] = "independent"  # a model.json from before couplings were recorded
    for d, folder in ((CrystalsDomain(sevenn=False), "base-wide"), (CrystalsVelocityDomain(sevenn=False), "base"),
                      (CrystalsDNGDomain(sevenn=False), "base-dng-wide"),
                      (CrystalsDNGVelocityDomain(sevenn=False), "base-dng")):
        assert d.base_checkpoint().name == folder
        shipped = json.loads((d.base_checkpoint() / "model.json").read_text())["model_config"]
        assert {k: shipped.get(k, defaults[k]) for k in d.model_config()} == d.model_config()
        made = json.loads((d.base_checkpoint() / "base.json").read_text())
        for key, value in d.pretrain_defaults().items():
            # how often a partial base is written does not change the weights (base-dng-wide: none)
            assert made["config"].get(key) == value or key == "save_every", (folder, key)
    # base-wide was made as variants:GeodesicX0AttentionDeepWide, now the domain's own model
    wide = json.loads((CrystalsDomain().base_checkpoint() / "base.json").read_text())
    assert wide["config"]["init_from"] is None and wide["command"].startswith(
        "flowcoach pretrain variants:GeodesicX0AttentionDeepWide ")
    # the previous default, base-struct, is base-deep's flags three times: from scratch, then --init-from
    # that base with the same flags (base-deep), then --init-from base-deep with the distance loss at the
    # weight RL's anchoring repeats
    shipped = CrystalsDomain().base_checkpoint().parent / "base-struct"
    struct = json.loads((shipped / "base.json").read_text())
    deep = struct["init_from_record"]
    assert deep == json.loads((shipped.parent / "base-deep" / "base.json").read_text())
    again = deep["init_from_record"]["command"].replace(" --steps", f" --init-from {deep['config']['init_from']} --steps")
    assert again.split(" --output ")[0] == deep["command"].split(" --output ")[0]
    third = struct["command"].split(" --output ")[0]
    assert third == (deep["command"].split(" --output ")[0].replace("variants:GeodesicX0AttentionDeep", "crystals")
                     .replace(f"--init-from {deep['config']['init_from']}", "--init-from domains/crystals/base-deep")
                     + " --structure-weight 0.2")
    assert wide["config"]["structure_weight"] == train_config("crystals").loss.anchor_structure_weight == 0.2
    with pytest.raises(FlowcoachError, match="choose one of independent, nearest, geodesic"):
        CrystalsDomain(coupling="ot")
    with pytest.raises(FlowcoachError, match="choose velocity or x0"):
        CrystalsDomain(predict="eps")


def test_rl_recipes_are_the_benchmarked_ones():
    """`flowcoach train` starts from the anchored recipe for the x0 bases with crystal-volume-ref beside
    the rewards (benchmarks/crystals/README.md), de novo with two guards on its compositions too, and
    from the first recipe for the velocity bases (structure prediction and de novo of the first kind)."""
    from flowcoach.core.algorithms import train_config

    x0 = train_config("crystals")
    assert (x0.optim.lr, x0.loss.anchor_weight, x0.sampler.noise_level, x0.sampler.sde_window_size) == (1e-4, 0.1, 0.3, 3)
    assert x0.loss.anchor_structure_weight == 0.2 and x0.steps == 150
    rewards = CrystalsDomain(sevenn=False).default_rewards()
    assert "crystal-distance" not in rewards and rewards["crystal-volume-ref"] == 5.0  # against swelling
    del rewards["crystal-volume-ref"]
    dng = train_config("flowcoach.domains.crystals:CrystalsDNGDomain")
    assert (dng.optim.lr, dng.loss.anchor_weight, dng.sampler.noise_level, dng.steps) == (1e-4, 0.1, 0.3, 150)
    assert CrystalsDNGDomain(sevenn=False).default_rewards() == {  # de novo: the composition guards too
        **rewards, "crystal-volume-ref": 5.0, "crystal-elements": 3.0, "crystal-formula-duplicate": 3.0}
    for cls in (CrystalsVelocityDomain, CrystalsDNGVelocityDomain):
        first = train_config(f"flowcoach.domains.crystals:{cls.__name__}")
        assert (first.optim.lr, first.loss.anchor_weight, first.sampler.noise_level, first.steps) == (3e-4, 0.0, 0.7, 100)
        assert first.loss.anchor_structure_weight == 0.0  # no anchoring, so no term of it
        assert cls(sevenn=False).default_rewards() == {**rewards, "crystal-distance": 2.0}


def test_e_grpo_merges_the_default_grid_as_at_its_recipes_noise_level():
    """A step's entropy is log(noise) + const, so e-grpo's absolute threshold (0.3) merged every step
    of the noise-0.3 grid into one (nothing to branch at); the domain's threshold, shifted by
    log(0.3 / 0.7), must give the blocks that 0.3 gives at noise 0.7, counted here by hand."""
    from flowcoach.core.algorithms import train_config
    from flowcoach.core.sampling.structures import STRUCTURES

    merged = STRUCTURES.get("merged")()
    blocks = merged.blocks(train_config("crystals", "e-grpo"))
    # at noise 0.7 the per-step entropies are 1.06, 1.01, 0.60, 0.33, 0.11, -0.09, ...: the first four
    # steps clear 0.3 alone, steps 4-5 merged do, and 6-8 run out (the last step is deterministic)
    assert blocks == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (6, 3)]
    first = train_config("flowcoach.domains.crystals:CrystalsVelocityDomain", "e-grpo")
    assert merged.blocks(first) == blocks


def test_pretrain_and_evaluate_run_on_cpu(domain, tmp_path):
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.pretrain import PretrainConfig, pretrain

    out = pretrain(PretrainConfig(domain="crystals", steps=30, batch_size=16, output=str(tmp_path / "base"),
                                  eval_samples=8, eval_num_steps=4), domain=domain)
    record = json.loads((out / "base.json").read_text())
    assert np.isfinite(record["final_loss"])
    metrics = record["eval"]["metrics"]
    for key in ("struct_valid", "comp_valid", "proxy_stable_rate", "unique_rate", "sun_rate", "csp_match_rate"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["comp_valid"] == 1.0  # structure prediction keeps the (valid) composition
    load_base(domain, out)


@pytest.mark.slow
@pytest.mark.parametrize("folder,figures", [("base", ("struct_valid",)),
                                            ("base-x0", ("struct_valid", "proxy_stable_rate", "csp_match_rate")),
                                            ("base-attn", ("struct_valid", "proxy_stable_rate", "csp_match_rate")),
                                            ("base-deep", ("struct_valid", "proxy_stable_rate", "csp_match_rate")),
                                            ("base-struct", ("struct_valid", "proxy_stable_rate", "csp_match_rate")),
                                            ("base-scratch", ("struct_valid", "proxy_stable_rate", "csp_match_rate")),
                                            ("base-wide", ("struct_valid", "proxy_stable_rate", "csp_match_rate")),
                                            ("base-dng-wide", ("struct_valid", "comp_valid", "proxy_stable_rate"))])
def test_shipped_base_meets_its_recorded_figures(folder, figures):
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.trainer import evaluate_model

    d = (CrystalsDNGDomain if "dng" in folder else CrystalsDomain)(sevenn=False)
    path = d.base_checkpoint().parent / folder
    model, record = load_base(d, path)
    ev = record["eval"]
    metrics, _, _ = evaluate_model(model, d, min(ev["num_samples"], 200), ev["num_steps"])
    for key in figures:
        assert metrics[key] >= ev["metrics"][key] - 0.08, key


def test_shipped_x0_base_puts_training_perovskites_on_their_sites():
    """The clean-crystal bases' claim (benchmarks/crystals/README.md, "Where the atoms go"): from x_t at
    t = 0.3 the clean estimate x_t - t v of base-x0 and base-attn is on the sites of the 366 identical
    training perovskites, while the first (velocity) base's is as far off as a uniform guess (~0.48);
    each on its own coupling."""
    from flowcoach.core.checkpoint import load_base

    shipped = CrystalsDomain(sevenn=False).base_checkpoint().parent
    errors = {}
    for folder, coupling in (("base", "independent"), ("base-x0", "geodesic"), ("base-attn", "geodesic")):
        d = CrystalsDomain(sevenn=False, coupling=coupling)
        x0, cond = d.data("train")
        perovskite = (cond > 0).sum(1) == 5
        x0, cond = x0[perovskite][:64], cond[perovskite][:64]
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        paired = d.couple(x0, eps, cond)
        x_t = 0.7 * paired + 0.3 * eps
        model, _ = load_base(d, shipped / folder)
        with torch.no_grad():
            x0_hat = x_t - 0.3 * model(x_t, torch.full((64,), 0.3), cond)
        off = torus.periodic_displacement(torus.wrap(x0_hat[:, :5, :3]), torus.wrap(paired[:, :5, :3]))
        errors[folder] = float(off.norm(dim=-1).mean())
    assert errors["base-x0"] < 0.06 and errors["base-attn"] < 0.06 and errors["base"] > 0.3, errors


def test_attention_base_collides_fewer_atoms_than_mean_messages():
    """base-attn's claim over base-x0 (benchmarks/crystals/README.md): the same flow and data with
    attention-weighted messages put fewer atoms on top of each other on the 10-step ODE; base-deep's
    over base-attn (6 layers, twice the pretraining): fewer still; base-struct's over base-deep (a
    third cycle with the distance loss): fewer again; and base-scratch's and base-wide's (the distance
    loss from the first step, 3,000 steps, width 64 and 96) over base-struct's."""
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.trainer import generate

    d = CrystalsDomain(sevenn=False)
    cond = d.eval_conditions(200)
    valid = {}
    for folder in ("base-x0", "base-attn", "base-deep", "base-struct", "base-scratch", "base-wide"):
        model, _ = load_base(d, d.base_checkpoint().parent / folder)
        structures = d.decode(generate(model.eval(), d, cond, num_steps=10, seed=3))
        valid[folder] = np.mean([s is not None and physics.structure_ok(s) for s in structures])
    assert valid["base-attn"] > valid["base-x0"] + 0.05, valid
    assert valid["base-deep"] > valid["base-attn"] + 0.03, valid
    assert valid["base-struct"] > valid["base-deep"] + 0.04, valid
    assert valid["base-scratch"] > valid["base-struct"] + 0.02, valid
    assert valid["base-wide"] > valid["base-struct"] + 0.02, valid


def test_a_structure_chgnet_refuses_scores_the_floor_and_is_counted(nacl_hull):
    from flowcoach.rewards.crystals import energy

    # valid by distance and volume (197 Å^3/atom), but one atom has no neighbour (nor image) within CHGNet's 6 Å
    isolated = Structure(Lattice.orthorhombic(6.5, 6.5, 14), ["Na", "Cl", "Na"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]])
    assert physics.structure_ok(isolated) and not physics.exploded(isolated)
    assert physics.has_isolated_atom(isolated) and not physics.has_isolated_atom(rocksalt())
    scores, info = energy([rocksalt(), isolated], None)
    assert scores[1] == -5.0 and info == {"invalid": 1, "exploded": 0}


def test_evaluator_counts_by_hand_on_rocksalt_a_duplicate_an_overlap_and_an_undecodable(nacl_hull):
    from flowcoach.domains.crystals.evaluate import evaluate_structures

    overlap = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.04, 0, 0]])  # 0.2 Å apart
    swollen = rocksalt(5.64 * 1.25)  # the same crystal, cell edges x1.25
    m = evaluate_structures([rocksalt(), rocksalt(), swollen, overlap, None], train=[swollen], heldout=[rocksalt()],
                            sevenn=False)
    assert m["undecodable_rate"] == 0.2 and m["struct_valid"] == 0.6 and m["valid"] == 0.6
    assert m["unique_rate"] == pytest.approx(1 / 3)  # the copy repeats, and StructureMatcher scales volume away
    assert m["novel_rate"] == pytest.approx(0.0)  # every valid one matches the (scaled) training crystal
    # 4 NaCl per conventional cell: rho = 4 (22.98977 + 35.453) g/mol / N_A / a^3
    rho = 4 * (22.98977 + 35.453) / 6.02214076e23 / (5.64e-8) ** 3
    assert m["density_mean"] == pytest.approx((2 * rho + rho / 1.25 ** 3) / 3, rel=1e-3)
    assert m["density_wdist"] == pytest.approx((rho - rho / 1.25 ** 3) / 3, rel=1e-3)  # one third moved
    assert m["nelem_wdist"] == 0.0 and m["element_tv"] == pytest.approx(0.0)


def test_known_stable_rate_asks_for_the_known_crystal_of_the_samples_own_composition(nacl_hull, nacl_references):
    """The proxy hull (elements only here, like a held-out composition's) lets a rock salt count as
    stable; on a hull that also holds a NaCl crystal 0.2 eV/atom below it, it is 0.2 above, by hand."""
    from flowcoach.domains.crystals.evaluate import evaluate_structures

    e = physics.chgnet_predict([rocksalt()])[0]["e"]
    below = physics.ProxyHull(nacl_references + [("NaCl", e - 0.2)])
    m = evaluate_structures([rocksalt(), None], train=[rocksalt()], heldout=[rocksalt()], sevenn=False, known_hull=below)
    assert m["proxy_stable_rate"] == 0.5 and m["mean_proxy_ehull"] < 0.0
    assert m["known_stable_rate"] == 0.0 and m["mean_known_ehull"] == pytest.approx(0.2, abs=1e-6)
    near = physics.ProxyHull(nacl_references + [("NaCl", e - 0.05)])
    m = evaluate_structures([rocksalt(), None], train=[rocksalt()], heldout=[rocksalt()], sevenn=False, known_hull=near)
    assert m["known_stable_rate"] == 0.5 and m["mean_known_ehull"] == pytest.approx(0.05, abs=1e-6)
    assert "known_stable_rate" not in evaluate_structures([rocksalt()], [rocksalt()], [rocksalt()], sevenn=False)


def test_element_count_reward_holds_samples_to_the_training_crystals_numbers_of_elements():
    from flowcoach.core.registry import FlowcoachError
    from flowcoach.rewards.crystals import element_count

    binaries = [rocksalt(), Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])]
    sodium = Structure(Lattice.cubic(4.2), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    ternary = Structure(Lattice.cubic(4.0), ["Sr", "Ti", "O", "O", "O"],
                        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    try:
        physics.use_volume_model(physics.VolumeModel(binaries))
        scores, info = element_count([rocksalt(), sodium, ternary, None], None)
        assert scores.tolist() == [0.0, -1.0, -1.0, -1.0] and info["invalid"] == 3
        physics.use_volume_model(physics.VolumeModel(binaries + [ternary]))
        assert element_count([ternary, sodium], None)[0].tolist() == [0.0, -1.0]
        physics.use_volume_model(None)
        with pytest.raises(FlowcoachError, match="volume model"):
            element_count([rocksalt()], None)
    finally:
        physics.use_volume_model(None)


def test_duplicate_reward_counts_matching_crystals_within_each_group_only():
    from flowcoach.rewards import REWARDS

    duplicate = REWARDS.get("crystal-duplicate")
    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    overlap = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.04, 0, 0]])  # invalid: matches nothing
    # group 0: two rock salts (one in a 1 % larger cell: the same crystal to StructureMatcher), a CsCl,
    # the overlap; group 1: one rock salt, a CsCl, None, a CsCl shifted by a lattice vector (the same)
    shifted = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0.25, 0, 0], [0.75, 0.5, 0.5]])
    objects = [rocksalt(), rocksalt(5.64 * 1.01), cscl, overlap, rocksalt(), cscl, None, shifted]
    cond = torch.tensor([[1, 2]] * 4 + [[3, 4]] * 4)
    scores, info = duplicate(objects, cond)
    torch.testing.assert_close(scores, torch.tensor([-1 / 3, -1 / 3, 0, 0, 0, -1 / 3, 0, -1 / 3]))
    assert info == {"invalid": 2, "duplicates": 4}
    scores, _ = duplicate(objects, None)  # one group of 8: each rock salt matches the other two of 7
    assert float(scores[0]) == pytest.approx(-2 / 7) and float(scores[2]) == pytest.approx(-2 / 7)
    # on formulas alone the overlap (NaCl, invalid) counts too: group 0 has three NaCl
    formula = REWARDS.get("crystal-formula-duplicate")
    scores, info = formula(objects, cond)
    torch.testing.assert_close(scores, torch.tensor([-2 / 3, -2 / 3, 0, -2 / 3, 0, -1 / 3, 0, -1 / 3]))
    assert info == {"invalid": 1, "duplicates": 5}


def test_volume_window_penalises_swollen_and_crushed_cells():
    from flowcoach.rewards.crystals import volume

    physics.use_volume_model(None)  # the fixed window (a domain sets a fitted model)
    swollen = Structure(Lattice.cubic(10.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # 500 Å^3/atom
    crushed = Structure(Lattice.cubic(2.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # 4 Å^3/atom
    scores, info = volume([rocksalt(), swollen, crushed, None], None)
    assert scores[0] == 0.0 and scores[3] == -5.0 and info["invalid"] == 3
    assert scores[1] == pytest.approx(-np.log(10.0)) and scores[2] == pytest.approx(-np.log(2.0))


def test_volume_reference_reward_sees_a_ten_percent_swelling_against_the_formulas_own_crystals():
    from flowcoach.core.registry import FlowcoachError
    from flowcoach.rewards.crystals import volume, volume_reference

    # two NaCl polymorphs (40 and 50 Å^3 per atom: the reference is their mean, 45) and a KBr cell
    def cell(species, v_per_atom, sites=((0, 0, 0), (0.5, 0.5, 0.5))):
        return Structure(Lattice.cubic((v_per_atom * len(species)) ** (1 / 3)), species, [list(p) for p in sites])

    refs = [cell(["Na", "Cl"], 40.0), cell(["Na", "Cl"], 50.0), cell(["K", "Br"], 60.0),
            cell(["Na", "Br"], 50.0), cell(["K", "Cl"], 50.0)]
    with pytest.raises(FlowcoachError, match="volume model"):
        physics.use_volume_model(None)
        volume_reference([refs[0]], None)
    model = physics.VolumeModel(refs)
    assert model.known["NaCl"] == pytest.approx(45.0) and model.known["KBr"] == pytest.approx(60.0)
    physics.use_volume_model(model)
    try:
        doubled = cell(["Na", "Na", "Cl", "Cl"], 45.0 * 1.1, ((0, 0, 0), (0.5, 0.5, 0), (0.5, 0.5, 0.5), (0, 0, 0.5)))
        unseen = cell(["K", "Na", "Cl", "Cl"], 50.0, ((0, 0, 0), (0.5, 0.5, 0), (0.5, 0.5, 0.5), (0, 0, 0.5)))
        scores, info = volume_reference([cell(["Na", "Cl"], 45.0), doubled, cell(["K", "Br"], 30.0), unseen, None], None)
        # the formula's mean volume per atom times the atom count, whatever the cell's size
        assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[1] == pytest.approx(-np.log(1.1), abs=1e-6)
        assert scores[2] == pytest.approx(-np.log(2.0), abs=1e-6)
        # a formula with no reference crystal: the fitted per-element volumes' expectation
        assert scores[3] == pytest.approx(-abs(np.log(unseen.volume / model.expected(unseen.composition))), abs=1e-6)
        assert scores[4] == -5.0 and info == {"invalid": 1}
        # crystal-volume's band, fitted on the same crystals, lets the 10 % swelling through
        assert volume([doubled], None)[0][0] == 0.0
    finally:
        physics.use_volume_model(None)


def test_distance_reward_is_zero_past_the_target_minus_one_at_the_gate_and_floored():
    from flowcoach.rewards.crystals import distance

    def pair(d):  # two atoms d Å apart along x in a cell large enough that no image is closer
        return Structure(Lattice.cubic(8.0), ["Na", "Cl"], [[0, 0, 0], [d / 8.0, 0, 0]])

    scores, info = distance([rocksalt(), pair(1.1), pair(0.8), pair(0.5), pair(0.02), None], None)
    # rocksalt's shortest distance is a/2 = 2.82 Å; (1.1 - d) / (1.1 - 0.5) below 1.1 Å
    assert scores.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.8, -2.0])
    assert info == {"invalid": 4}


def test_volume_model_fits_element_volumes_and_bands_each_composition():
    from flowcoach.rewards.crystals import volume

    # rock salts whose volume is exactly the sum of made-up element volumes: the fit recovers them
    # (two stoichiometries, so the four volumes are identifiable)
    true = {"Na": 20.0, "K": 35.0, "Cl": 25.0, "Br": 30.0}
    cells = []
    for species in (["Na", "Cl"], ["K", "Cl"], ["Na", "Br"], ["K", "Br"], ["Na", "Na", "Cl"], ["K", "Br", "Br"]):
        v = sum(true[e] for e in species)
        sites = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]][: len(species)]
        cells.append(Structure(Lattice.cubic(v ** (1 / 3)), species, sites))
    model = physics.VolumeModel(cells)
    for el, v in true.items():
        assert model.volumes[el] == pytest.approx(v, rel=1e-6)
    assert model.band[0] == pytest.approx(0.0, abs=1e-9) and model.band[1] == pytest.approx(0.0, abs=1e-9)
    physics.use_volume_model(model)
    try:
        nacl = cells[0]
        swollen = Structure(Lattice.cubic((2 * 45.0) ** (1 / 3)), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        crushed = Structure(Lattice.cubic((0.5 * 45.0) ** (1 / 3)), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        unseen = Structure(Lattice.cubic(4.2), ["Cs", "I"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # the fixed window
        scores, info = volume([nacl, swollen, crushed, unseen], None)
        assert scores[0] == 0.0 and scores[3] == 0.0 and info["invalid"] == 2
        assert scores[1] == pytest.approx(-np.log(2.0), abs=1e-6) and scores[2] == pytest.approx(-np.log(2.0), abs=1e-6)
    finally:
        physics.use_volume_model(None)

