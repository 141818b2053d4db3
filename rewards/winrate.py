"""Pairwise win-rate rewards (Pref-GRPO, arXiv 2508.20751).

Pointwise rewards give near-ties that group normalisation blows up into "illusory advantages";
Pref-GRPO compares the samples of a group in pairs and rewards each by its win rate,
R_i = 1/(G-1) sum_{j != i} P(i beats j). Here a pair is judged by a vote over the reward
components (each weighted by |weight|, its sign giving the direction), and a component whose
values differ by at most ``tol`` is a tie worth half: a pairwise preference that needs no extra
model. ``--loss.win-rate`` replaces the reward by this win rate before the advantages.
"""

from __future__ import annotations

import torch


def preference_matrix(components: torch.Tensor, weights: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """[G, G] P(i beats j) of one group from its [G, K] reward components."""
    signed = components.float() * torch.sign(weights.float())
    w = weights.float().abs() / weights.float().abs().sum().clamp(min=1e-12)
    diff = signed[:, None, :] - signed[None, :, :]
    votes = torch.where(diff > tol, 1.0, torch.where(diff < -tol, 0.0, 0.5))
    return (votes * w).sum(dim=2)


def win_rates(components: torch.Tensor, weights: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """[B] each sample's mean preference over the other members of its group."""
    if components.dim() == 1:
        components = components[:, None]
    out = torch.zeros(len(components))
    for g in torch.unique(group_ids).tolist():
        rows = torch.nonzero(group_ids == g).flatten()
        if len(rows) < 2:
            continue
        pref = preference_matrix(components[rows], weights, tol)
        out[rows] = (pref.sum(dim=1) - pref.diagonal()) / (len(rows) - 1)
    return out
