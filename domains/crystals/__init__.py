"""The crystals domain: periodic crystal generation (DiffCSP/FlowMM-style flow), fine-tuned for
validity and (proxy) stability.

Data are generated offline (``data``: SMACT-valid cubic perovskites and CHGNet-screened pyxtal
crystals, cached); a sample is fractional coordinates lifted to R^3, the element bits and the
lattice (``data``, ``torus`` explains why the core's Gaussian transitions stay exact); the model is a
small periodic message-passing network (``model``). The condition is a composition: element indices
[N_MAX] (0 = padding). Two modes: structure prediction (``CrystalsDomain``, atom types given) and
de novo generation for a given atom count (``CrystalsDNGDomain``, types generated as analog bits);
``CrystalsVelocityDomain`` and ``CrystalsDNGVelocityDomain`` are both with the first kind of model and recipe.
Decoding gives pymatgen ``Structure`` objects, saved as CIF; rewards are in
``flowcoach.rewards.crystals``; the evaluator (``evaluate``) is held out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowcoach.core.domain import Domain
from flowcoach.core.losses import pair_distance_error
from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.crystals import physics, torus
from flowcoach.domains.crystals.data import (FEATURES, N_MAX, GenConfig, composition_tensor, encode, from_bits,
                                             load_dataset, split)
from flowcoach.domains.crystals.decode import decode, save_structures
from flowcoach.domains.crystals.evaluate import evaluate_structures
from flowcoach.domains.crystals.model import CrystalVelocity, displacement_lengths


COUPLINGS = ("independent", "nearest", "geodesic")


def composition_key(row) -> tuple[int, ...]:
    return tuple(sorted(int(i) for i in row if int(i) > 0))


class CrystalsDomain(Domain):
    name = "crystals"
    kind = "generate"
    generate_types = False
    element_rows_match = False  # atoms are a set: a row is the same atom only across shared noise
    # the default model, that of the shipped base-wide: the clean crystal (predict="x0") on the torus
    # geodesic, which learns where atoms sit where the velocity model on the independent lift (the
    # first base, domains/crystals/base) never did (benchmarks/crystals/README.md, "Where the atoms go"),
    # with attention-weighted messages (4 heads), which collide fewer atoms of one element than their
    # mean (base-x0): 66 -> 79 % valid, proxy stable 31 -> 52 %; 6 layers (base-deep: 87 % valid); the
    # distance loss (structure_loss, --structure-weight 0.2) from the first step, not in a third cycle
    # (base-struct: 96 % valid, 70 % stable), and width 96: 98.8 % valid, 71 % stable in 3,000 steps
    coupling, predict, heads, depth, width, base_folder = "geodesic", "x0", 4, 6, 96, "base-wide"

    def __init__(self, gen: GenConfig | None = None, copies: int = 4, width: int | None = None,
                 depth: int | None = None, sevenn: bool = True, distance_rbf: int = 0, relax_samples: int = 0,
                 coupling: str | None = None, predict: str | None = None, heads: int | None = None):
        """``gen``: the data set to generate (default: the shipped base's); ``copies``: lifts per
        training crystal; ``width``/``depth``/``distance_rbf``: the model; ``sevenn``: run the SevenNet cross-check;
        ``relax_samples``: relax this many valid samples with CHGNet in ``evaluate`` (slow: ~4 s each);
        ``coupling``: how pretraining (and data anchoring) pairs a crystal with its noise, "independent"
        (the lift's image), "nearest" (each atom's image nearest its noise) or "geodesic" (also
        same-element atoms permuted onto their noise) (``couple``); ``predict``: the model's output,
        "velocity" or "x0" (the clean crystal, ``CrystalVelocity``); ``heads``: attention heads over the
        atom pairs (0: mean messages). None: the class's (above, also for ``width`` and ``depth``); loading a model sets
        coupling and output to the ones it was made with (``build_model``)."""
        coupling, predict = coupling or self.coupling, predict or self.predict
        if coupling not in COUPLINGS:
            raise FlowcoachError(f"unknown crystals coupling '{coupling}'; choose one of {', '.join(COUPLINGS)}")
        if predict not in ("velocity", "x0"):
            raise FlowcoachError(f"unknown crystals model output '{predict}'; choose velocity or x0")
        self.gen = gen or GenConfig()
        self.copies, self.sevenn = copies, sevenn
        self.width, self.depth = self.width if width is None else width, self.depth if depth is None else depth
        self.distance_rbf, self.relax_samples, self.coupling = distance_rbf, relax_samples, coupling
        self.predict, self.heads = predict, self.heads if heads is None else heads
        self._cache: dict = {}

    # ------------------------------------------------------------------ data and conditions
    def _load(self) -> dict:
        if not self._cache:
            data = load_dataset(self.gen)
            train, held = split(data, "train"), split(data, "heldout")
            self._cache.update(data=data, train=train, heldout=held,
                               train_structures=[c.structure() for c in train],
                               heldout_structures=[c.structure() for c in held])
            physics.use_hull(physics.hull_from_data(data, train))
            # the evaluator's stricter stability: on the hull of every known crystal (evaluate_structures)
            self._cache["known_hull"] = physics.hull_from_data(data, train + held)
            physics.use_volume_model(physics.VolumeModel(self._cache["train_structures"]))
        return self._cache

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (N_MAX + 1, FEATURES)

    def data(self, split_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split_name not in ("train", "heldout"):
            raise FlowcoachError(f"unknown split '{split_name}'; choose train or heldout")
        crystals = self._load()[split_name]
        copies = self.copies if split_name == "train" else 1  # fresh periodic images per copy
        return encode(crystals, copies=copies, seed=self.gen.seed + (split_name == "heldout"))

    def train_conditions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        comp = composition_tensor(self._load()["train"])
        return comp[torch.randint(0, comp.shape[0], (n,), generator=generator)]

    def eval_conditions(self, n: int) -> torch.Tensor:
        comp = composition_tensor(self._load()["heldout"])
        return comp[torch.arange(n) % comp.shape[0]]

    def validation_conditions(self, n: int, seed: int = 7) -> torch.Tensor:
        """n training compositions, a fixed random pick (cycled): for choosing an RL checkpoint
        without looking at the held-out compositions the benchmark reports."""
        comp = composition_tensor(self._load()["train"])
        order = torch.randperm(comp.shape[0], generator=torch.Generator().manual_seed(seed))
        return comp[order[torch.arange(n) % comp.shape[0]]]

    # ------------------------------------------------------------------ model
    def model_config(self) -> dict:
        return {"width": self.width, "depth": self.depth, "harmonics": 4, "generate_types": self.generate_types,
                "distance_rbf": self.distance_rbf, "predict": self.predict, "heads": self.heads, "coupling": self.coupling}

    def build_model(self, coupling: str = "independent", predict: str = "velocity", **config) -> CrystalVelocity:
        # a model.json names how its model pairs data with noise, which data anchoring must repeat (the
        # first bases' files, from before there was a choice, name neither: the independent lift, velocity)
        self.coupling, self.predict = coupling, predict
        return CrystalVelocity(predict=predict, **config)

    def couple(self, x0: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.coupling == "independent":
            return x0
        if self.coupling == "nearest":  # each atom's image nearest its noise: the torus geodesic per atom
            real = (torch.as_tensor(cond) > 0).to(x0.device)[..., None]
            out = x0.clone()
            out[:, :N_MAX, :3] = torch.where(real, torus.nearest_image(torus.wrap(x0[:, :N_MAX, :3]), eps[:, :N_MAX, :3]),
                                             x0[:, :N_MAX, :3])
            return out
        # a crystal is the same for any periodic image of an atom and any order of same-element atoms:
        # pair each with its noise along the torus geodesic (DiffCSP/FlowMM's path). De novo, the
        # condition only marks the atoms: their elements are the data's type bits
        out = x0.clone()
        for b in range(x0.shape[0]):
            species = (from_bits(x0[b, :N_MAX, 3:].cpu().numpy()) if self.generate_types
                       else torch.as_tensor(cond[b]).cpu().numpy())
            n = int((species > 0).sum())
            chart = torus.align_to_noise(x0[b, :n, :3].double().cpu().numpy(), eps[b, :n, :3].double().cpu().numpy(),
                                         species[:n])
            out[b, :n, :3] = torch.from_numpy(chart).to(x0)
        return out

    def structure_loss(self, x0_hat: torch.Tensor, x0: torch.Tensor, cond) -> torch.Tensor:
        # the squared error (Å^2) of every interatomic distance of the clean estimate, mean over the
        # crystal's ordered atom pairs, both under the data's lattice. Where flow matching cannot tell
        # which of two like atoms takes which site, its posterior mean puts both between the two; their
        # distance is the same either way, and this loss asks for it (two like atoms on one site are
        # over half of base-deep's collisions)
        dist = [displacement_lengths(torus.periodic_displacement(f[:, :, None], f[:, None]), x0[:, N_MAX, :6])
                for f in (torus.wrap(x0_hat[:, :N_MAX, :3]), torus.wrap(x0[:, :N_MAX, :3]))]
        return pair_distance_error(*dist, (torch.as_tensor(cond) > 0).to(x0.device))

    def base_checkpoint(self) -> Path | None:
        path = Path(__file__).parent / self.base_folder
        return path if (path / "model.safetensors").exists() else None

    def pretrain_defaults(self) -> dict:
        # how domains/crystals/base-wide was made (its base.json records the same): one 3,000-step cosine
        # cycle with the distance loss from the first step. The bases before it: base-attn (4 layers,
        # width 64) was 8,000 steps with eval_num_steps 20 and no distance loss; base-deep those at 6
        # layers, twice; base-struct base-deep and a third cycle with --structure-weight 0.2
        return {"steps": 3000, "batch_size": 128, "lr": 1e-3, "ema_decay": 0.999, "save_every": 1000,
                "eval_samples": 500, "eval_num_steps": 10, "structure_weight": 0.2}

    def train_defaults(self) -> dict:
        # the anchored recipe of benchmarks/crystals/README.md (tuned on base-x0; from base-attn it reaches
        # 84-88 % valid, proxy stable 52-56 %, from base-deep 87-89 % and 59-60 %, two seeds each): a
        # third of the first recipe's learning rate and the flow-matching loss on training crystals (weight 0.1), which keep the sites
        # the base learnt (without them RL swells the cells and the stable rate falls 29 -> 7 %); SDE at
        # noise 0.3 on a 3-step window of 10 (0.7 left more of the rollouts valid than the ODE, so fewer
        # collisions to learn from: 80 against 83-85 % valid after RL), sum-reduced log-probs with PPO's
        # 0.2 clip, 2 optimizer steps per rollout, evaluated on the same 10-step grid
        return {"groups_per_step": 16, "group_size": 8, "sampler.num_steps": 10, "sampler.eval_num_steps": 10,
                "sampler.noise_level": 0.3, "sampler.sde_window_size": 3, "sampler.logprob_reduction": "sum",
                "optim.lr": 1e-4, "loss.anchor_weight": 0.1, "optimizer_steps_per_epoch": 2, "eval_samples": 128,
                # e-grpo's entropy threshold is absolute and a step's entropy is log(noise) + const, so at
                # noise 0.3 its 0.3 merged all 10 steps into one; 0.3 + log(0.3 / 0.7) merges the steps as
                # 0.3 did at noise 0.7 (blocks 1,1,1,1,2,3)
                "sampler.merge_entropy": -0.55,
                # anchoring as base-wide was pretrained: flow matching plus 0.2 x the distance loss
                "loss.anchor_structure_weight": 0.2,
                # from base-wide the cells swell, then come back by step 150 (README, "The distance loss
                # from the first step"): stop there
                "steps": 150}

    # ------------------------------------------------------------------ objects
    def decode(self, x: torch.Tensor) -> list:
        return decode(x)

    def save(self, objects: list, rewards: torch.Tensor | None, directory: Path) -> list[Path]:
        return save_structures(objects, rewards, directory)

    def default_rewards(self) -> dict[str, float]:
        # a validity gate (weighted 3x: E_hull spans 6 units and drowned it), the proxy hull for stability,
        # a small force penalty (near a minimum) and the volume window, without which RL swells cells to
        # dodge CHGNet (rewards/crystals.py; benchmarks/crystals/README.md). No distance term: like the
        # energy it pays for swelling, and base-x0's collisions are of whole sites, not near misses. The
        # volume band lets every cell swell 10 %, which lowers CHGNet's unrelaxed energy; crystal-volume-ref
        # (against the formula's own training crystals) sees it: from base-wide, known stable 64 -> 69 %
        return {"crystal-valid": 3.0, "crystal-ehull": 1.0, "crystal-force": 0.05, "crystal-volume": 1.0,
                "crystal-volume-ref": 5.0}

    def element_rewards(self, objects: list, conditions) -> torch.Tensor:
        # per-atom credit: an atom that collides, or (de novo) of an element one atom of which is too
        # many or too few for charge balance, is blamed, not the whole crystal (a de novo base's
        # invalid compositions are nearly all one atom off a valid one: benchmarks/crystals)
        from flowcoach.rewards.crystals import atom_credit

        return atom_credit(objects, conditions, N_MAX + 1)

    def evaluate(self, objects: list, conditions) -> dict[str, float]:
        cache = self._load()
        targets = None
        if not self.generate_types and conditions is not None:
            by_comp = {}
            for c, s in zip(composition_tensor(cache["heldout"]), cache["heldout_structures"]):
                by_comp.setdefault(composition_key(c), s)
            targets = [by_comp.get(composition_key(row)) for row in torch.as_tensor(conditions)]
        return evaluate_structures(objects, cache["train_structures"], cache["heldout_structures"], targets,
                                   cache["train_structures"][:48], sevenn=self.sevenn,
                                   relax_samples=self.relax_samples, known_hull=cache["known_hull"])


class CrystalsVelocityDomain(CrystalsDomain):
    """The domain's defaults until 2026-12-06: a velocity model on the independent lift (the first
    shipped base, domains/crystals/base, which never learnt where atoms sit) and the RL recipe tuned on
    it; kept so the rows of benchmarks/crystals/README.md from before then remake."""

    coupling, predict, heads, depth, width, base_folder = "independent", "velocity", 0, 4, 64, "base"

    def pretrain_defaults(self) -> dict:
        return {"steps": 1500, "batch_size": 128, "lr": 1e-3, "eval_samples": 500, "eval_num_steps": 20}

    def train_defaults(self) -> dict:
        return {**super().train_defaults(), "sampler.noise_level": 0.7, "optim.lr": 3e-4, "loss.anchor_weight": 0.0,
                "loss.anchor_structure_weight": 0.0, "sampler.merge_entropy": 0.3, "steps": 100}

    def default_rewards(self) -> dict[str, float]:
        # the volume band without crystal-volume-ref, and a smooth shortest-distance term: a base that
        # never found sites has near misses to push apart
        return {"crystal-valid": 3.0, "crystal-ehull": 1.0, "crystal-force": 0.05, "crystal-volume": 1.0,
                "crystal-distance": 2.0}


class CrystalsDNGDomain(CrystalsDomain):
    """De novo generation: the condition fixes the atom count only; the elements are generated. Its base
    (base-dng-wide) is base-wide's model and pretraining with the element bits generated, its RL the
    structure-prediction recipe with two guards on the compositions."""

    generate_types = True
    base_folder = "base-dng-wide"

    def default_rewards(self) -> dict[str, float]:
        # a single element passes SMACT and sits near its own reference on the proxy hull, and a group
        # drifts to a few formulas long before its cells match: without these two terms Flow-GRPO turned
        # to F2, Cl2 and chlorides (uniqueness 0.99 -> 0.44-0.63); with them 0.88-0.94 (three seeds)
        return {**super().default_rewards(), "crystal-elements": 3.0, "crystal-formula-duplicate": 3.0}


class CrystalsDNGVelocityDomain(CrystalsVelocityDomain):
    """De novo with the first kind of model and recipe (base-dng), the de novo default until the afternoon
    of 2026-12-07; kept so the rows of benchmarks/crystals/README.md made with it remake."""

    generate_types = True
    base_folder = "base-dng"
