"""The Rollout: plain tensors describing sampled trajectories, enough to recompute every log-prob."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch


def index_cond(cond: Any, idx: torch.Tensor) -> Any:
    """Select rows of a condition batch: a tensor, a dict of tensors, or None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    return cond[idx]


def cond_to(cond: Any, device) -> Any:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: cond_to(v, device) for k, v in cond.items()}
    return cond.to(device)


@dataclass
class Rollout:
    """B trajectories over a time grid of T steps.

    states[:, j] is x at timesteps[j]; states[:, -1] is the sample. Step j goes from timesteps[j]
    to timesteps[j + 1]. log_probs and stds are 0 on deterministic (ODE) steps.
    """

    states: torch.Tensor  # [B, T+1, ...] float32
    log_probs: torch.Tensor  # [B, T]
    stds: torch.Tensor  # [B, T]
    timesteps: torch.Tensor  # [T+1], from 1 (noise) to 0 (data)
    stochastic: torch.Tensor  # [B, T] bool: which steps were sampled with noise (and can be trained)
    group_ids: torch.Tensor  # [B] long: samples with the same id share a condition
    cond: Any = None  # [B, ...] tensor, dict of tensors, or None
    means: torch.Tensor | None = None  # [B, T, ...] when recorded
    parents: torch.Tensor | None = None  # [B] long, tree samplers only
    law: str = "flow-sde"
    noise_level: float = 0.7
    reduction: str = "mean"

    @property
    def samples(self) -> torch.Tensor:
        return self.states[:, -1]

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0] - 1

    def to(self, device) -> "Rollout":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif f.name == "cond":
                value = cond_to(value, device)
            moved[f.name] = value
        return Rollout(**moved)

    def save(self, path: str | Path) -> None:
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: str | Path) -> "Rollout":
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    def trained_pairs(self) -> torch.Tensor:
        """[N, 2] (sample, step) indices of every stochastic step: the units of a training minibatch."""
        return torch.nonzero(self.stochastic, as_tuple=False)


def cat_cond(conds: list) -> Any:
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: cat_cond([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def cat_rollouts(rollouts: list[Rollout]) -> Rollout:
    """Stack rollouts over the same time grid and law along the batch (e.g. the chunks of episodes)."""
    first = rollouts[0]
    for r in rollouts[1:]:
        if not torch.equal(r.timesteps, first.timesteps) or (r.law, r.noise_level, r.reduction) != (
                first.law, first.noise_level, first.reduction):
            raise ValueError("only rollouts over the same time grid and noise law can be stacked")

    def cat(name):
        values = [getattr(r, name) for r in rollouts]
        return None if values[0] is None else torch.cat(values)

    return Rollout(states=cat("states"), log_probs=cat("log_probs"), stds=cat("stds"), timesteps=first.timesteps,
                   stochastic=cat("stochastic"), group_ids=cat("group_ids"),
                   cond=cat_cond([r.cond for r in rollouts]), means=cat("means"), parents=cat("parents"),
                   law=first.law, noise_level=first.noise_level, reduction=first.reduction)
