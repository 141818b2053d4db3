"""The domain contract (DESIGN.md §4) and ``check_domain``, its conformance checker."""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowcoach.core.registry import DOMAINS, FlowcoachError

# Built-in domains load lazily: importing flowcoach.core never imports a domain's libraries.
DOMAINS.register("toy", "flowcoach.domains.toy:ToyDomain")
DOMAINS.register("grasping", "flowcoach.domains.grasping:GraspingDomain")
DOMAINS.register("molecules", "flowcoach.domains.molecules:MoleculesDomain")
DOMAINS.register("crystals", "flowcoach.domains.crystals:CrystalsDomain")
DOMAINS.register("speech", "flowcoach.domains.speech:SpeechDomain")
DOMAINS.register("video", "flowcoach.domains.video:VideoDomain")


class Domain(ABC):
    """What the core needs from a science: data, a model, decoding, rewards and an evaluator.

    ``kind`` is "generate" (one denoising trajectory per sample) or "interact" (a gymnasium env).
    Conditions are a batch: a tensor [B, ...] (or a dict of tensors) whose rows the trainer repeats
    G times to form groups.
    """

    name: str = ""
    kind: str = "generate"
    element_rows_match: bool = True
    """Whether row e of the sample is the same element in every sample of a condition (a crystal's
    given composition, a signal's channels). False for a set generated in any order (a molecule's
    atoms): per-element credit then needs a group that shares its initial noise."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample x0 (without the batch dimension)."""

    @abstractmethod
    def train_conditions(self, n: int, generator: torch.Generator) -> Any:
        """n conditions to train on (a group is G samples of one condition)."""

    @abstractmethod
    def eval_conditions(self, n: int) -> Any:
        """n held-out conditions, the same every call."""

    @abstractmethod
    def data(self, split: str) -> tuple[torch.Tensor, Any]:
        """(x0 [N, *sample_shape], conditions [N, ...]) for "train" or "heldout": pretraining and anchoring."""

    @abstractmethod
    def model_config(self) -> dict:
        """Keyword arguments of ``build_model`` for the base model."""

    @abstractmethod
    def build_model(self, **config) -> nn.Module:
        """A velocity model ``forward(x_t, t, cond) -> v``."""

    def base_checkpoint(self) -> Path | None:
        """Folder of the shipped base model (made by ``flowcoach pretrain``), or None."""
        return None

    @abstractmethod
    def decode(self, x: torch.Tensor) -> list:
        """Samples [B, ...] -> the domain's objects (molecules, structures, frames, waveforms, ...)."""

    @abstractmethod
    def save(self, objects: list, rewards: torch.Tensor | None, directory: Path) -> list[Path]:
        """Write objects in native formats (with their rewards) under directory; return the files."""

    @abstractmethod
    def default_rewards(self) -> dict[str, float]:
        """Reward names (in flowcoach's reward registry) and their weights."""

    @abstractmethod
    def evaluate(self, objects: list, conditions: Any) -> dict[str, float]:
        """Held-out metrics that are not the training reward, so reward hacking shows."""

    def couple(self, x0: torch.Tensor, eps: torch.Tensor, cond: Any) -> torch.Tensor:
        """Pair each data sample with its noise for flow matching (pretraining, data anchoring).

        Returns x0 re-expressed, sample by sample, as the representation of the same object nearest
        to its noise eps (atoms permuted or rotated, a periodic image chosen). Every x0 still decodes
        to the same object, so the flow's marginals are unchanged, while its paths straighten and the
        velocity gets easier to learn (equivariant OT coupling; the torus geodesic of DiffCSP).
        Default: the independent coupling, x0 unchanged.
        """
        return x0

    def structure_loss(self, x0_hat: torch.Tensor, x0: torch.Tensor, cond: Any) -> torch.Tensor | None:
        """Per-sample loss [B] on the clean sample a velocity implies, x0_hat = x_t - t v (where an Euler
        step to t = 0 lands), against its data sample x0: the pretraining's ``--structure-weight`` term.

        Flow matching's squared error is minimised by the posterior mean, which averages the objects a
        noisy state may become; a loss on what the samples must satisfy (e.g. interatomic distances:
        two like atoms' distance does not depend on which takes which site, while their average puts
        both on one) asks the model to commit to one. Default: None, the domain has none.
        """
        return None

    def element_rewards(self, objects: list, conditions: Any) -> torch.Tensor | None:
        """Per-element rewards [B, E] of decoded objects, E = sample_shape[0] (a molecule's atom rows),
        NaN where an element earns no credit (padding); used by --loss.element-weight. None: the
        domain has no per-element reward."""
        return None

    def pretrain_batch(self, num_samples: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Indices [batch_size] of the next pretraining batch among the ``num_samples`` of data("train").

        Default: uniform with replacement. A domain whose objects vary in size may draw batches of
        one size (each sample still drawn with probability 1 / num_samples) so no compute goes to
        padding.
        """
        return torch.randint(0, num_samples, (batch_size,), generator=generator)

    def pretrain_defaults(self) -> dict[str, Any]:
        """PretrainConfig fields this domain's base was made with (the CLI's defaults for it)."""
        return {}

    def train_defaults(self) -> dict[str, Any]:
        """TrainConfig fields (dotted: "sampler.noise_level") tuned for this domain; applied after the
        algorithm's recipe and before the user's flags."""
        return {}


def structure_loss_of(domain: Domain, flag: str):
    """The domain's ``structure_loss`` for a run that sets ``flag``; refused where it has none (it does
    not override ``Domain.structure_loss``)."""
    if type(domain).structure_loss is Domain.structure_loss:
        raise FlowcoachError(f"the {domain.name} domain has no structure loss; drop {flag}")
    return domain.structure_loss


def get_domain(name: str) -> Domain:
    cls = DOMAINS.get(name)
    domain = cls() if isinstance(cls, type) else cls
    if not isinstance(domain, Domain):
        raise FlowcoachError(f"'{name}' is not a flowcoach Domain (got {type(domain).__name__})")
    return domain


def check_domain(domain: Domain, batch: int = 4) -> list[str]:
    """Run the contract end to end on a few random samples; raise FlowcoachError on the first breach.

    Returns the list of checks that passed, for the CLI to print.
    """
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.sampling.rollout import index_cond
    from flowcoach.rewards import build_reward

    passed = []

    def ok(cond: bool, what: str) -> None:
        if not cond:
            raise FlowcoachError(f"domain '{domain.name}' fails check: {what}")
        passed.append(what)

    ok(bool(domain.name) and domain.name == domain.name.lower(), "has a lower-case name")
    ok(domain.kind in ("generate", "interact"), "kind is 'generate' or 'interact'")
    g = torch.Generator().manual_seed(0)
    cond = domain.train_conditions(batch, g)
    x0, data_cond = domain.data("train")
    ok(tuple(x0.shape[1:]) == tuple(domain.sample_shape), "data has sample_shape")
    ok(bool(torch.isfinite(x0).all()), "data is finite")
    model = domain.build_model(**domain.model_config())
    x = torch.randn(batch, *domain.sample_shape, generator=g)
    model_cond = index_cond(data_cond, torch.arange(batch))  # what the model is conditioned on
    v = model(x, torch.full((batch,), 0.5), model_cond)
    ok(tuple(v.shape) == tuple(x.shape), "model output has the input's shape")
    objects = domain.decode(x)
    ok(len(objects) == batch, "decode returns one object per sample")
    if domain.kind == "interact":  # its rewards and evaluator take episodes: play two short ones
        from flowcoach.core.interact import evaluate_episodes

        cond = domain.eval_conditions(2)
        objects = evaluate_episodes(model, domain, cond, num_steps=2)
        batch = 2
        ok(len(objects) == 2 and all(e["steps"] > 0 for e in objects), "episodes run in the environment")
    reward = build_reward(domain.default_rewards())
    scores, _ = reward(objects, cond)
    ok(tuple(scores.shape) == (batch,), "reward returns one score per sample")
    ok(bool(torch.isfinite(scores).all()), "reward is finite on random samples")
    if domain.kind == "generate" and type(domain).element_rewards is not Domain.element_rewards:
        per_element = domain.element_rewards(objects, cond)
        ok(isinstance(per_element, torch.Tensor) and tuple(per_element.shape) == (batch, domain.sample_shape[0]),
           "element_rewards returns one reward per sample row")
        ok(not bool(torch.isinf(per_element).any()), "element rewards are finite or NaN (no credit)")
    metrics = domain.evaluate(objects, cond)
    ok(isinstance(metrics, dict) and all(isinstance(v, float) for v in metrics.values()),
       "evaluate returns a dict of floats")
    with tempfile.TemporaryDirectory() as tmp:
        files = domain.save(objects, scores, Path(tmp))
        ok(len(files) > 0 and all(Path(f).exists() for f in files), "save writes files")
    eval_cond = domain.eval_conditions(batch)
    eval_again = domain.eval_conditions(batch)
    ok(json.dumps(_tolist(eval_cond)) == json.dumps(_tolist(eval_again)), "eval conditions are fixed")
    base = domain.base_checkpoint()
    if base is not None:
        model, _ = load_base(domain, base)
        ok(tuple(model(x, torch.full((len(x),), 0.5), model_cond).shape) == tuple(x.shape), "base checkpoint loads")
    return passed


def _tolist(cond: Any) -> Any:
    if isinstance(cond, dict):
        return {k: _tolist(v) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor):
        return cond.tolist()
    return cond
