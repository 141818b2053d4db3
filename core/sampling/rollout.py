"""The Rollout: plain tensors describing sampled trajectories, enough to recompute every log-prob."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch


def index_cond(cond: Any, idx) -> Any:
    """Select rows of a condition batch: a tensor or array, a list, a dict of those, or None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    if isinstance(cond, list):
        return [cond[int(i)] for i in idx]
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
    to timesteps[j + 1]. log_probs and stds are 0 on deterministic (ODE) steps. timesteps is one
    grid [T+1] shared by the batch, or one grid per sample [B, T+1] (E-GRPO's merged steps: a merged
    step i goes from t_i to t_{i+m}, and the m - 1 steps after it have zero length).

    Samplers that share work between samples (a group's common prefix, tree branches) record
    ``nodes`` [B, T+1]: samples with the same node id at time index j have the same state there, and
    the state was computed once. A (sample, step) pair is then trained once per distinct edge
    (node at j -> node at j + 1), see ``trained_pairs``.
    """

    states: torch.Tensor  # [B, T+1, ...] float32
    log_probs: torch.Tensor  # [B, T]
    stds: torch.Tensor  # [B, T]
    timesteps: torch.Tensor  # [T+1], from 1 (noise) to 0 (data)
    stochastic: torch.Tensor  # [B, T] bool: which steps were sampled with noise (and can be trained)
    group_ids: torch.Tensor  # [B] long: samples with the same id share a condition
    cond: Any = None  # [B, ...] tensor, dict of tensors, or None
    means: torch.Tensor | None = None  # [B, T, ...] when recorded
    nodes: torch.Tensor | None = None  # [B, T+1] long, samplers that share states (prefixes, trees)
    law: str = "flow-sde"
    noise_level: float = 0.7
    reduction: str = "mean"
    nfe: int = 0  # rows evaluated by the velocity model while sampling (shared states count once)
    x0_hats: torch.Tensor | None = None  # [B, T, ...] one-step (Tweedie) estimates x_j - t_j v_j, when recorded
    adv_groups: torch.Tensor | None = None  # [B] long: normalisation subgroups (E-GRPO), else the groups
    fwd_t: torch.Tensor | None = None  # [B, K] times of the forward-process draws (NFT, AWM, FPO)
    fwd_noise: torch.Tensor | None = None  # [B, K, ...] their noise

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

    def step_times(self, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, t_next) [N] of step j of sample i, for a shared or a per-sample grid."""
        if self.timesteps.dim() == 1:
            return self.timesteps[j], self.timesteps[j + 1]
        return self.timesteps[i, j], self.timesteps[i, j + 1]

    def trained_pairs(self) -> torch.Tensor:
        """[N, 2] (sample, step) indices of the stochastic steps: the units of a training minibatch.

        Where samples share an edge of a tree (the same child node after the step), only the first
        sample of that edge is listed, so every distinct transition is trained once.
        """
        pairs = torch.nonzero(self.stochastic, as_tuple=False)
        if self.nodes is None or len(pairs) == 0:
            return pairs
        child = self.nodes[pairs[:, 0], pairs[:, 1] + 1]
        key = pairs[:, 1] * (int(self.nodes.max()) + 1) + child
        _, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(pairs), dtype=torch.long, device=pairs.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(pairs), device=pairs.device), "amin")
        return pairs[first.sort().values]


def cat_cond(conds: list) -> Any:
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: cat_cond([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def cat_rollouts(rollouts: list[Rollout]) -> Rollout:
    """Stack rollouts over the same time grid and law along the batch (e.g. the chunks of episodes)."""
    first = rollouts[0]
    per_sample_grid = first.timesteps.dim() == 2
    for r in rollouts[1:]:
        same_grid = r.timesteps.dim() == 2 if per_sample_grid else torch.equal(r.timesteps, first.timesteps)
        if not same_grid or (r.law, r.noise_level, r.reduction) != (first.law, first.noise_level, first.reduction):
            raise ValueError("only rollouts over the same time grid and noise law can be stacked")
    if any(r.nodes is not None for r in rollouts):
        raise ValueError("rollouts with shared states (nodes) cannot be stacked")

    def cat(name):
        values = [getattr(r, name) for r in rollouts]
        return None if values[0] is None else torch.cat(values)

    return Rollout(states=cat("states"), log_probs=cat("log_probs"), stds=cat("stds"),
                   timesteps=cat("timesteps") if per_sample_grid else first.timesteps,
                   stochastic=cat("stochastic"), group_ids=cat("group_ids"),
                   cond=cat_cond([r.cond for r in rollouts]), means=cat("means"),
                   law=first.law, noise_level=first.noise_level, reduction=first.reduction,
                   nfe=sum(r.nfe for r in rollouts), x0_hats=cat("x0_hats"), adv_groups=cat("adv_groups"),
                   fwd_t=cat("fwd_t"), fwd_noise=cat("fwd_noise"))
