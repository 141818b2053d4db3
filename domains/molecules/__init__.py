"""The molecules domain: 3-D molecule generation on QM9 with explicit hydrogens (up to 29 atoms, H C N O F).

A sample is x [29, 3 + 6]: atom positions and scaled one-hot atom types (with an "absent" class for
padding), see ``data``. The condition a user asks for is [n atoms, n heavy atoms]; the model's
padding mask follows n, and the heavy-atom count is a conditioning input (and the target of the
optional ``mol-heavy-atoms`` reward). The base model (``model.MoleculeVelocity``) is an E(3)- and
permutation-equivariant transformer with geometric attention and EGNN position updates, in the
manner of EDM/EquiFM (see ``model``).

Decoding uses EDM's bond-length rules (``chem``), so atom/molecule stability and validity are
comparable with the EDM/EquiFM QM9 (with hydrogens) numbers. The evaluator (``evaluate``) reports
V/U/N, stability, QED/SA distributions, internal diversity, PAINS pass rate and FCD vs held-out QM9.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.domain import Domain
from flowcoach.core.losses import pair_distance_error
from flowcoach.domains.molecules.data import FEATURES, N_MAX, align_to_noise, build_split
from flowcoach.domains.molecules.decode import decode, save_molecules
from flowcoach.domains.molecules.evaluate import FCD_MIN_VALID, FCD_REFERENCE_SIZE, canonical, evaluate_molecules
from flowcoach.domains.molecules.model import MoleculeVelocity, atom_mask

EVAL_SEED = 2024


class MoleculesDomain(Domain):
    name = "molecules"
    kind = "generate"
    element_rows_match = False  # atoms are a set: a row is the same atom only across shared noise

    def __init__(self, limit: int | None = None, fcd: bool = True, width: int = 64, depth: int = 4):
        """``limit``: use only the first QM9 rows (a quick subset for tests); ``fcd``: report FCD
        when at least FCD_MIN_VALID molecules are valid; ``width``/``depth``: the base model's size."""
        self.limit = limit
        self.fcd = fcd
        self.width, self.depth = width, depth
        self._splits: dict = {}

    # ------------------------------------------------------------------ data and conditions
    def _split(self, split: str):
        if split not in self._splits:
            self._splits[split] = build_split(self.limit, split, rotate=split == "train")
        return self._splits[split]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (N_MAX, FEATURES)

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x0, cond, _ = self._split(split)
        return x0, cond

    def train_conditions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n atoms, n heavy atoms) pairs drawn from the training molecules (EDM samples n so)."""
        cond = self._split("train")[1]
        return cond[torch.randint(0, cond.shape[0], (n,), generator=generator)]

    def eval_conditions(self, n: int) -> torch.Tensor:
        cond = self._split("heldout")[1]
        g = torch.Generator().manual_seed(EVAL_SEED)
        return cond[torch.randint(0, cond.shape[0], (n,), generator=g)]

    # ------------------------------------------------------------------ model
    def model_config(self) -> dict:
        return {"width": self.width, "depth": self.depth, "heads": 4}

    def build_model(self, **config) -> MoleculeVelocity:
        return MoleculeVelocity(**config)

    def pretrain_batch(self, num_samples: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        # one atom count per batch: the model then runs on no padding (2.5x less pair compute on
        # QM9). A random molecule picks the count, so every molecule is still drawn with prob 1/M.
        sizes = self._split("train")[1][:, 0].long()
        if sizes.shape[0] != num_samples:
            return super().pretrain_batch(num_samples, batch_size, generator)
        size = sizes[torch.randint(0, num_samples, (1,), generator=generator)]
        same = torch.nonzero(sizes == size).flatten()
        return same[torch.randint(0, same.shape[0], (batch_size,), generator=generator)]

    def couple(self, x0: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # atoms are a set in free space: permute and rotate each molecule onto its noise
        return align_to_noise(x0, eps, cond[:, 0].round().long())

    def structure_loss(self, x0_hat: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # the squared error (Å^2) of every interatomic distance of the clean estimate, mean over the
        # molecule's ordered atom pairs: the bond lengths EDM's valence rules read, which the estimate
        # of flow matching alone spreads 9x wider than QM9's (benchmarks/molecules, "Where the
        # instability comes from"); distances do not change under the rotation the coupling picks
        dist = [torch.cdist(x[..., :3], x[..., :3]) for x in (x0_hat, x0)]
        return pair_distance_error(*dist, atom_mask(torch.as_tensor(cond).to(x0.device), x0.shape[1]))

    def base_checkpoint(self) -> Path | None:
        # base-18k: the 8,000-step base/ (pretrain_defaults) pretrained 10,000 steps further (its base.json)
        path = Path(__file__).parent / "base-18k"
        return path if (path / "model.safetensors").exists() else None

    # ------------------------------------------------------------------ objects
    def decode(self, x: torch.Tensor) -> list:
        return decode(x)

    def save(self, objects: list, rewards: torch.Tensor | None, directory: Path) -> list[Path]:
        return save_molecules(objects, rewards, directory)

    def pretrain_defaults(self) -> dict:
        # how domains/molecules/base was made from scratch (its base.json records the same); the
        # default base, base-18k, continued it with --init-from domains/molecules/base --steps 10000
        return {"steps": 8000, "batch_size": 128, "lr": 1e-3, "ema_decay": 0.999, "save_every": 1000,
                "eval_samples": 1000, "eval_num_steps": 40}

    def train_defaults(self) -> dict:
        # the flags of the recorded RL run (benchmarks/molecules/README.md). Rollouts: 20 steps, SDE
        # on a random 3-step window, ODE elsewhere: a 10-step SDE rollout of the base is never valid
        # (0 of 256), so the validity-gated terms gave no group signal. Data anchoring: without it the
        # windowed run drifted down (the untrained steps move with the shared network)
        return {"groups_per_step": 16, "group_size": 8, "optimizer_steps_per_epoch": 2, "micro_batch": 576,
                "optim.lr": 5e-4, "eval_samples": 256, "sampler.num_steps": 20, "sampler.sde_window_size": 3,
                "loss.anchor_weight": 0.1, "loss.anchor_batch": 64}

    def default_rewards(self) -> dict[str, float]:
        # stability and validity first (the base's weak point), QED for drug-likeness, and a
        # within-group duplicate penalty so the group does not collapse onto one molecule. The dense
        # term is stability within the largest piece: with EDM's atom stability as the dense term,
        # RL split molecules into small saturated pieces. Near-stability (halved per wrong atom) pays
        # for samples a few atoms from stable, which a group holds far more often than a stable one:
        # with it held-out validity rose 32 -> 50 % over three seeds, though molecule stability did
        # not move (benchmarks/molecules, "The near-stability term")
        return {"mol-valid": 1.0, "mol-connected-stability": 2.0, "mol-near-stability": 2.0, "mol-stability": 1.0,
                "mol-qed": 1.0, "mol-duplicate": 0.5}

    def element_rewards(self, objects: list, conditions) -> torch.Tensor:
        # per-atom credit: an atom's own valence (EDM), so the group's baseline credits the atoms a
        # sample got right rather than the whole molecule (two thirds of the base's unstable atoms
        # are a few pm from a bond threshold: local errors, benchmarks/molecules)
        from flowcoach.rewards.molecules import atom_credit

        return atom_credit(objects, conditions, N_MAX)

    # ------------------------------------------------------------------ evaluation
    def train_smiles(self) -> frozenset[str]:
        return _canonical_set(self.limit)

    def fcd_reference(self) -> list[str]:
        smiles = self._split("heldout")[2]
        rng = np.random.default_rng(EVAL_SEED)
        pick = rng.choice(len(smiles), size=min(FCD_REFERENCE_SIZE, len(smiles)), replace=False)
        return [s for s in (canonical(smiles[i]) for i in sorted(pick)) if s]

    def evaluate(self, objects: list, conditions) -> dict[str, float]:
        any_valid = any(m.valid for m in objects)
        train = self.train_smiles() if any_valid else frozenset()
        enough = self.fcd and sum(m.valid for m in objects) >= FCD_MIN_VALID
        return evaluate_molecules(objects, train, self.fcd_reference() if enough else None)


@functools.lru_cache(maxsize=2)
def _canonical_set(limit: int | None) -> frozenset[str]:
    """Canonical SMILES of the training split (the novelty reference), computed once per process."""
    smiles = build_split_smiles(limit, "train")
    return frozenset(s for s in map(canonical, smiles) if s)


def build_split_smiles(limit: int | None, split: str) -> list[str]:
    from flowcoach.domains.molecules.data import load_qm9, split_indices

    qm9 = load_qm9(limit)
    return [qm9["smiles"][i] for i in split_indices(len(qm9["smiles"]), split)]
