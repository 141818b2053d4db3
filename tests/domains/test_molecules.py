"""The molecules domain: bond rules, decoding, the model's invariances, every reward on valid / invalid /
empty molecules, the evaluator on hand-checked molecules, check_domain, and a tiny pretrain + RL run.

Everything runs on a 2,000-molecule QM9 subset and tiny models built here; the full-size checks
(the shipped base reproduces its recorded figures) are marked slow.
"""

import math
import json

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import QED  # noqa: E402

from flowcoach.core.domain import check_domain  # noqa: E402
from flowcoach.core.registry import REWARDS, FlowcoachError  # noqa: E402
from flowcoach.core.trainer import generate  # noqa: E402
from flowcoach.domains.molecules import MoleculesDomain  # noqa: E402
from flowcoach.domains.molecules.chem import ATOM_TYPES, atom_stability, bond_orders  # noqa: E402
from flowcoach.domains.molecules.data import ABSENT, FEATURES, N_MAX, TYPE_SCALE, encode  # noqa: E402
from flowcoach.domains.molecules.decode import decode, decode_sample, from_rdkit, from_smiles  # noqa: E402
from flowcoach.domains.molecules.evaluate import evaluate_molecules, fcd_score, internal_diversity  # noqa: E402
from flowcoach.domains.molecules.model import MoleculeVelocity, sentinel  # noqa: E402
from flowcoach.rewards import build_reward  # noqa: E402

C, H, N, O = (ATOM_TYPES.index(a) for a in "CHNO")
MOL_REWARDS = [n for n in REWARDS.names() if n.startswith("mol-")]


@pytest.fixture(scope="module")
def domain():
    return MoleculesDomain(limit=2000, fcd=False, width=32, depth=2)


def smiles_mol(s):
    return from_rdkit(Chem.MolFromSmiles(s))


def invalid_molecule():
    # a carbon with five hydrogens 1.09 A away: five single bonds, RDKit refuses the valence
    d = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]]) * 1.09
    return decode_sample(np.concatenate([_rows([C], [[0, 0, 0]]), _rows([H] * 5, d), _padding(N_MAX - 6)]))


def empty_molecule():
    return decode_sample(_padding(N_MAX))


def _rows(types, positions):
    x = np.zeros((len(types), FEATURES), dtype=np.float32)
    x[:, :3] = positions
    x[np.arange(len(types)), 3 + np.array(types)] = TYPE_SCALE
    return x


def _padding(n):
    return np.tile(sentinel(torch.zeros(1)).numpy(), (n, 1))


def test_structure_loss_is_the_distance_error_and_blind_to_rigid_motions(domain):
    # water: O-H 0.96 A, H-O-H 104.5 degrees; padding rows count for nothing
    pos = np.array([[0, 0, 0], [0.96, 0, 0], [0.96 * math.cos(1.824), 0.96 * math.sin(1.824), 0]])
    x0 = torch.from_numpy(encode(np.array([O, H, H]), pos))[None]
    cond = torch.tensor([[3.0, 1.0]])
    c, s_ = math.cos(0.7), math.sin(0.7)
    moved = x0.clone()
    moved[0, :3, :3] = x0[0, :3, :3] @ torch.tensor([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]]) + torch.tensor([1.0, -2.0, 0.5])
    moved[0, 3:, :3] += 5.0  # padding anywhere
    assert float(domain.structure_loss(moved, x0, cond)[0]) < 1e-10
    stretched = x0.clone()
    stretched[0, 1, :3] += torch.tensor([0.2, 0.0, 0.0])  # one O-H bond 0.96 -> 1.16 A
    h_h = float(np.linalg.norm(pos[2] - pos[1]))
    h_h_new = float(np.linalg.norm(pos[2] - pos[1] - [0.2, 0, 0]))
    expected = 2 * (0.2**2 + (h_h_new - h_h) ** 2) / 6  # the 6 ordered pairs: O-H1 and H1-H2 changed
    assert abs(float(domain.structure_loss(stretched, x0, cond)[0]) - expected) < 1e-6


# ----------------------------------------------------------------------------- bonds and decoding
def test_bond_orders_follow_the_distance_tables():
    types = np.array([C, C])
    for d, order in [(1.53, 1), (1.33, 2), (1.20, 3), (1.70, 0)]:
        assert bond_orders(types, np.array([[0, 0, 0], [d, 0, 0]]))[0, 1] == order
    # water: O-H 0.96 A -> O has valence 2 and each H 1: all stable; drop an H and O is not
    pos = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    types = np.array([O, H, H])
    assert atom_stability(types, bond_orders(types, pos)).all()
    assert not atom_stability(types[:2], bond_orders(types[:2], pos[:2]))[0]


def test_qm9_molecules_survive_encode_decode(domain):
    x0, cond = domain.data("heldout")
    smiles = domain._split("heldout")[2]
    mols = decode(x0)
    assert [m.num_atoms for m in mols] == cond[:, 0].long().tolist()  # padding dropped, atoms kept
    same = np.mean([m.smiles == Chem.CanonSmiles(s) for m, s in zip(mols, smiles)])
    assert same > 0.9, same  # EDM's rule misses a few aromatic rings, as in EDM's own data figures
    assert np.mean([m.stable for m in mols]) > 0.9


def test_decode_from_geometry_recovers_an_embedded_molecule():
    m = from_smiles("OC(=O)CC#N")
    assert m.valid and m.smiles == Chem.CanonSmiles("OC(=O)CC#N") and m.stable


def test_decode_never_raises_on_bad_input():
    assert empty_molecule().num_atoms == 0 and not empty_molecule().valid
    assert not invalid_molecule().valid and invalid_molecule().num_atoms == 6
    bad = torch.full((2, N_MAX, FEATURES), float("nan"))
    bad[1] = torch.randn(N_MAX, FEATURES) * 1e6
    assert len(decode(bad)) == 2


def test_a_diverged_sample_decodes_invalid_even_when_its_atoms_would_bond():
    m = from_smiles("CCO")
    types = [ATOM_TYPES.index(s) for s in m.symbols]
    x = torch.from_numpy(encode(types, m.positions)).float()
    assert decode(x[None])[0].valid  # the clean sample is ethanol
    x[0, 0] = float("nan")  # one diverged coordinate
    bad = decode(x[None])[0]
    assert not bad.valid and bad.num_atoms == len(types) and not bad.stable_atoms.any()
    assert bad.orders.sum() == 0


def test_save_writes_sdf_smiles_and_png(tmp_path):
    objects = [smiles_mol("CCO"), invalid_molecule(), empty_molecule(), from_smiles("CC#N")]
    files = MoleculesDomain(limit=2000).save(objects, torch.tensor([1.0, 0.0, 0.0, 0.5]), tmp_path)
    names = {f.name for f in files}
    assert {"molecules.sdf", "molecules.smi", "grid.png", "rewards.json"} <= names
    assert len(Chem.SDMolSupplier(str(tmp_path / "molecules.sdf"), removeHs=False)) == 2
    assert (tmp_path / "molecules.smi").read_text().splitlines()[1].startswith("INVALID")


# ----------------------------------------------------------------------------- model
def test_model_is_e3_and_permutation_equivariant_and_ends_padding_at_the_sentinel(domain):
    torch.manual_seed(0)
    model = MoleculeVelocity(width=32, depth=2).eval()
    cond = torch.tensor([[6.0, 2.0], [9.0, 3.0]])
    x = torch.randn(2, N_MAX, FEATURES)
    t = torch.tensor([0.4, 0.7])
    v = model(x, t, cond)
    shifted = x.clone()
    shifted[:, :, :3] += torch.tensor([1.0, -2.0, 0.5])
    shifted[:, 6:, :3] = x[:, 6:, :3]  # shift real atoms only (row 0 has 6)
    v_shift = model(shifted, t, cond)
    com = (shifted[0, :6, :3] - x[0, :6, :3]).mean(0)
    # the network part is unchanged; the closed-form mean term moves by shift / t
    torch.testing.assert_close(v_shift[0, :6, :3], v[0, :6, :3] + com / t[0], atol=1e-4, rtol=1e-4)
    from flowcoach.domains.molecules.data import random_rotations

    rot = torch.as_tensor(random_rotations(1, np.random.default_rng(0))[0], dtype=torch.float32)
    x_rot = torch.cat([x[..., :3] @ rot.T, x[..., 3:]], dim=-1)
    v_rot = model(x_rot, t, cond)
    torch.testing.assert_close(v_rot[0, :6, :3], v[0, :6, :3] @ rot.T, atol=1e-4, rtol=1e-4)  # equivariant
    torch.testing.assert_close(v_rot[0, :6, 3:], v[0, :6, 3:], atol=1e-4, rtol=1e-4)  # types invariant
    perm = torch.tensor([3, 1, 0, 5, 2, 4] + list(range(6, N_MAX)))
    torch.testing.assert_close(model(x[:, perm], t, cond)[0, :6], v[0, perm][:6], atol=1e-5, rtol=1e-5)
    samples = generate(model, domain, cond, num_steps=5)
    torch.testing.assert_close(samples[0, 6:], sentinel(x).expand(N_MAX - 6, -1))
    assert samples[0, :6, :3].mean(0).abs().max() < 1e-4  # samples end centred
    assert decode(samples)[1].num_atoms <= 9


def test_coupling_keeps_each_molecule_and_never_lengthens_its_path(domain):
    x0, cond = domain.data("train")
    x0, cond = x0[:32], cond[:32]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    y = domain.couple(x0, eps, cond)
    assert [m.smiles for m in decode(y)] == [m.smiles for m in decode(x0)]
    for b in range(32):
        n = int(cond[b, 0])
        d0 = torch.cdist(x0[b, :n, :3].double(), x0[b, :n, :3].double())
        d1 = torch.cdist(y[b, :n, :3].double(), y[b, :n, :3].double())
        # the same multiset of rows up to a rigid motion: sorted distances and types agree
        torch.testing.assert_close(d1.flatten().sort().values, d0.flatten().sort().values, atol=1e-4, rtol=0)
        assert sorted(y[b, :n, 3:].argmax(-1).tolist()) == sorted(x0[b, :n, 3:].argmax(-1).tolist())
        # the identity is one of the permutations and rotations searched: the coupled path is no longer
        assert float(((y[b] - eps[b]) ** 2).sum()) <= float(((x0[b] - eps[b]) ** 2).sum()) + 1e-4
    torch.testing.assert_close(y[:, :, :3].sum(1), torch.zeros(32, 3), atol=1e-4, rtol=0)  # still centred


def test_pretrain_batches_hold_one_atom_count_drawn_in_the_data_s_proportions(domain):
    _, cond = domain.data("train")
    sizes = cond[:, 0].long()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(N_MAX + 1)
    for _ in range(3000):
        idx = domain.pretrain_batch(len(sizes), 16, g)
        assert len(set(sizes[idx].tolist())) == 1
        counts[sizes[idx[0]]] += 1
    expected = torch.bincount(sizes, minlength=N_MAX + 1).float() / len(sizes)
    assert (counts / 3000 - expected).abs().max() < 0.03


# ----------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("name", MOL_REWARDS)
def test_every_reward_scores_valid_invalid_and_empty_molecules(name):
    objects = [smiles_mol("CC(=O)Oc1ccccc1C(=O)O"), invalid_molecule(), empty_molecule()]
    cond = torch.tensor([[21.0, 13.0], [6.0, 1.0], [1.0, 1.0]])
    scores, info = REWARDS.get(name)(objects, cond)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert info["invalid"] == 2
    if name != "mol-duplicate":
        assert scores[1] <= scores[0] or name in ("mol-logp-window", "mol-mw-window", "mol-stability")
        assert scores[2] == 0.0 and scores[1] == 0.0 or name in ("mol-atom-stability", "mol-connected-stability",
                                                                  "mol-near-stability")


def test_reward_values_on_known_molecules():
    aspirin = smiles_mol("CC(=O)Oc1ccccc1C(=O)O")
    assert abs(float(REWARDS.get("mol-qed")([aspirin])[0][0]) - 0.550) < 0.01
    assert abs(float(REWARDS.get("mol-sa")([aspirin])[0][0]) - (10 - 1.58) / 9) < 0.01
    assert float(REWARDS.get("mol-stability")([aspirin])[0][0]) == 1.0
    assert float(REWARDS.get("mol-smarts")([aspirin, smiles_mol("CCO")])[0].sum()) == 1.0
    # atom stability of the invalid CH5: the 5 H are stable, the carbon is not
    assert abs(float(REWARDS.get("mol-atom-stability")([invalid_molecule()])[0][0]) - 5 / 6) < 1e-6


def test_splitting_a_molecule_into_saturated_pieces_raises_no_stability_reward():
    # methane + water (+ H2): every atom is stable (EDM), so EDM's atom and molecule stability are 1
    pieces, whole = smiles_mol("C.O.[H][H]"), smiles_mol("CO")
    assert pieces.stable_atoms.all() and pieces.num_atoms == 10 and pieces.valid
    assert float(REWARDS.get("mol-atom-stability")([pieces])[0][0]) == 1.0
    # only methane's 5 atoms form the largest piece: 5 of 10 atoms count
    assert float(REWARDS.get("mol-connected-stability")([pieces])[0][0]) == 0.5
    assert float(REWARDS.get("mol-stability")([pieces])[0][0]) == 0.0
    assert float(REWARDS.get("mol-connected-stability")([whole])[0][0]) == 1.0
    assert float(REWARDS.get("mol-stability")([whole])[0][0]) == 1.0
    # the invalid CH5: its 5 H are stable and bonded to the carbon, the carbon is not stable
    assert abs(float(REWARDS.get("mol-connected-stability")([invalid_molecule()])[0][0]) - 5 / 6) < 1e-6
    # near stability halves per wrong atom: methane's 5 atoms are the piece, the other 5 count as wrong
    assert float(REWARDS.get("mol-near-stability")([pieces])[0][0]) == 0.5 ** 5
    assert float(REWARDS.get("mol-near-stability")([whole])[0][0]) == 1.0
    assert float(REWARDS.get("mol-near-stability")([invalid_molecule()])[0][0]) == 0.5  # only the carbon


def test_atom_credit_lands_on_the_rows_the_atoms_came_from(domain):
    # methane with a row the model left without an atom between its carbon and hydrogens, and the
    # same with one H missing (CH3: the carbon is unstable); the condition asks for 6 atoms
    hydrogens = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) * 1.09 / math.sqrt(3)
    missing = _padding(1)
    full = np.concatenate([_rows([C], [[0, 0, 0]]), missing, _rows([H] * 4, hydrogens), _padding(N_MAX - 6)])
    ch3 = np.concatenate([_rows([C], [[0, 0, 0]]), missing, _rows([H] * 3, hydrogens[:3]), _padding(N_MAX - 5)])
    objects = decode(torch.tensor(np.stack([full, ch3])))
    credit = domain.element_rewards(objects, torch.tensor([[6.0, 1.0], [6.0, 1.0]]))
    assert credit.shape == (2, N_MAX) and torch.isnan(credit[:, 6:]).all()
    assert credit[0, :6].tolist() == [1, 0, 1, 1, 1, 1]
    assert credit[1, :6].tolist() == [0, 0, 1, 1, 1, 0]


def test_duplicate_penalty_is_per_group():
    objects = [smiles_mol(s) for s in ["CCO", "CCO", "CCN", "CCC", "CCO", "CCO"]] + [invalid_molecule()] * 2
    cond = torch.tensor([[9.0, 3.0]] * 4 + [[8.0, 3.0]] * 4)  # two groups of 4
    scores, info = REWARDS.get("mol-duplicate")(objects, cond)
    torch.testing.assert_close(scores, torch.tensor([-1 / 3, -1 / 3, 0, 0, -1 / 3, -1 / 3, 0, 0]))
    assert info["duplicates"] == 4 and info["invalid"] == 2


def test_qed_in_group_is_qed_against_the_valid_members_of_its_group():
    drugs = ["CC(=O)Oc1ccccc1C(=O)O", "CC(=O)Nc1ccc(O)cc1", "CCO"]  # aspirin, paracetamol, ethanol
    objects = [smiles_mol(s) for s in drugs] + [invalid_molecule()] + [smiles_mol("CCN"), invalid_molecule()] * 2
    cond = torch.tensor([[9.0, 3.0]] * 4 + [[8.0, 3.0]] * 2 + [[7.0, 3.0]] * 2)  # groups of 4, 2, 2
    scores, info = REWARDS.get("mol-qed-in-group")(objects, cond)
    q = [QED.qed(Chem.MolFromSmiles(s)) for s in drugs]
    mean = sum(q) / 3
    # the first group: QED minus its three valid members' mean, the invalid one 0; the others hold
    # one valid molecule each, so nothing to compare: 0
    torch.testing.assert_close(scores, torch.tensor([q[0] - mean, q[1] - mean, q[2] - mean, 0, 0, 0, 0, 0]))
    assert info["invalid"] == 3


def test_composite_default_reward_prefers_a_stable_drug_like_molecule(domain):
    reward = build_reward(domain.default_rewards())
    scores, info = reward([smiles_mol("CC(=O)Oc1ccccc1C(=O)O"), invalid_molecule(), empty_molecule()],
                          torch.tensor([[21.0, 13.0], [6.0, 1.0], [1.0, 1.0]]))
    assert scores[0] > scores[1] > scores[2] == 0.0
    assert info["components"].shape == (3, len(domain.default_rewards()))


def test_bad_smarts_is_a_one_line_error():
    from flowcoach.rewards.molecules import smarts_match

    with pytest.raises(FlowcoachError, match="does not parse"):
        smarts_match("C((")


# ----------------------------------------------------------------------------- evaluator
def test_evaluator_on_hand_checked_molecules():
    drugs = {"CC(=O)Oc1ccccc1C(=O)O": (0.550, 1.58), "Cn1c(=O)c2c(ncn2C)n(C)c1=O": (0.538, 2.30),
             "CC(C)Cc1ccc(cc1)C(C)C(=O)O": (0.822, 2.19), "CC(=O)Nc1ccc(O)cc1": (0.595, 1.41)}
    for smiles, (qed, sa) in drugs.items():
        m = evaluate_molecules([smiles_mol(smiles)])
        assert abs(m["qed_mean"] - qed) < 0.01 and abs(m["sa_mean"] - sa) < 0.01, smiles
    objects = [smiles_mol("CCO"), smiles_mol("OCC"), smiles_mol("c1ccccc1"), invalid_molecule()]
    m = evaluate_molecules(objects, train_smiles=frozenset({"CCO"}))
    assert m["validity"] == 0.75 and abs(m["uniqueness"] - 2 / 3) < 1e-9 and m["novelty"] == 0.5
    assert m["vun"] == 0.25 and m["mol_stability"] == 0.75
    assert m["atom_stability"] == (9 + 9 + 12 + 5) / (9 + 9 + 12 + 6)
    assert internal_diversity([smiles_mol("CCO").fragment] * 3) == 0.0
    pains = evaluate_molecules([smiles_mol("Oc1ccccc1O"), smiles_mol("c1ccccc1")])  # catechol is a PAINS hit
    assert pains["pains_pass"] == 0.5


def test_evaluator_of_nothing_valid_is_defined():
    m = evaluate_molecules([invalid_molecule(), empty_molecule()], train_smiles=frozenset())
    assert m["validity"] == 0.0 and m["v_x_u"] == 0.0 and m["vun"] == 0.0
    # of no valid molecule, uniqueness and novelty are undefined, not 0 (which would read as a collapse)
    assert math.isnan(m["uniqueness"]) and math.isnan(m["novelty"]) and math.isnan(m["qed_mean"])
    assert all(isinstance(v, float) for v in m.values())


def test_fcd_is_zero_on_the_same_set_and_positive_on_another():
    a = ["CCO", "CCN", "CCC", "CC(=O)O", "c1ccccc1", "CC#N", "OCCO", "CCOC", "C1CC1", "NCC=O"] * 3
    b = ["c1ccncc1", "Oc1ccccc1", "CC(C)(C)O", "FC(F)F", "C1CCOC1", "N#CC#N", "CC=CC", "OC1CC1", "CNC", "O=CO"] * 3
    assert abs(fcd_score(a, a)) < 1e-3
    assert fcd_score(a, b) > 1.0


# ----------------------------------------------------------------------------- contract and runs
def test_check_domain_on_the_subset(domain):
    assert len(check_domain(domain)) >= 11


def test_tiny_pretrain_then_flow_grpo_run(domain, tmp_path):
    from flowcoach.core.config import TrainConfig
    from flowcoach.core.pretrain import PretrainConfig, pretrain
    from flowcoach.core.trainer import train

    base = pretrain(PretrainConfig(domain="molecules", steps=4, batch_size=16, eval_samples=8, eval_num_steps=3,
                                   output=str(tmp_path / "base")), domain=domain)
    assert json.loads((base / "base.json").read_text())["eval"]["metrics"]["validity"] >= 0.0
    cfg = TrainConfig(domain="molecules", steps=2, base=str(base), output_dir=str(tmp_path / "runs"),
                      groups_per_step=2, group_size=4, eval_samples=8, sample_every=1, tensorboard=False)
    cfg.sampler.num_steps = 4
    cfg.sampler.eval_num_steps = 3
    run = train(cfg, domain=domain)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and "reward/mol-qed" in lines[0] and "eval/validity" in lines[-1]
    assert (run / "samples" / "step-1" / "grid.png").exists() and (run / "eval" / "samples" / "molecules.sdf").exists()


def test_shipped_base_loads_and_beats_an_untrained_model():
    from flowcoach.core.checkpoint import load_base

    d = MoleculesDomain(limit=2000, fcd=False)  # the subset only supplies the (smaller) conditions
    if d.base_checkpoint() is None:
        pytest.skip("no shipped base yet")
    model, record = load_base(d)
    torch.manual_seed(0)
    untrained = d.build_model(**json.loads((d.base_checkpoint() / "model.json").read_text())["model_config"])
    cond = d.eval_conditions(32)

    def atom_stability_of(m):
        mols = d.decode(generate(m.eval(), d, cond, num_steps=10, seed=1))
        return sum(int(q.stable_atoms.sum()) for q in mols) / max(1, sum(q.num_atoms for q in mols))

    assert atom_stability_of(model) > atom_stability_of(untrained) + 0.03
    assert record["eval"]["metrics"]["atom_stability"] > 0.0 and record["command"].startswith("flowcoach pretrain molecules")
    assert not record.get("partial")  # a finished pretraining, not a stopped one
    # the default base continues base/ (which the defaults remake) for 10,000 more steps, same flags
    assert d.base_checkpoint().name == "base-18k" and record["config"]["init_from"] == "domains/molecules/base"
    first = json.loads((d.base_checkpoint().parent / "base" / "base.json").read_text())
    for key, value in d.pretrain_defaults().items():
        assert first["config"][key] == value, key
        assert record["config"][key] == (10000 if key == "steps" else value), key


@pytest.mark.slow
def test_shipped_base_reproduces_its_recorded_figures():
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.trainer import evaluate_model

    d = MoleculesDomain()
    model, record = load_base(d)
    ev = record["eval"]
    metrics, _, _ = evaluate_model(model.eval(), d, ev["num_samples"], ev["num_steps"], seed=ev["seed"])
    for key in ("validity", "atom_stability", "mol_stability", "uniqueness", "qed_mean"):
        assert abs(metrics[key] - ev["metrics"][key]) < 1e-6, key
