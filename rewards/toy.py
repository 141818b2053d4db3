"""Rewards of the toy domain: a 2-D Gaussian mixture whose modes sit on a circle.

Objects are points (numpy arrays of shape [2]); conditions are target mode ids [B].
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_MODES = 8
RADIUS = 2.0
MODE_STD = 0.2


def mode_centres(num_modes: int = NUM_MODES, radius: float = RADIUS) -> torch.Tensor:
    """[K, 2] mode centres, mode k at angle 2 pi k / K."""
    angles = torch.arange(num_modes, dtype=torch.float32) * (2 * math.pi / num_modes)
    return radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def _points(objects: list) -> torch.Tensor:
    return torch.as_tensor(np.stack([np.asarray(o, dtype=np.float32) for o in objects]))


def mode_reward(objects: list, conditions, width: float = 0.5) -> tuple[torch.Tensor, dict]:
    """exp(-||x - m_target||^2 / (2 width^2)): 1 at the target mode's centre, < 0.01 at its neighbours.

    A non-finite point scores 0 and is counted as invalid.
    """
    x = _points(objects)
    finite = torch.isfinite(x).all(dim=1)
    target = mode_centres()[torch.as_tensor(conditions).long().reshape(-1)]
    d2 = ((torch.nan_to_num(x) - target) ** 2).sum(dim=1)
    scores = torch.where(finite, torch.exp(-d2 / (2 * width**2)), torch.zeros_like(d2))
    return scores, {"invalid": int((~finite).sum())}


def mode_reward_factors(objects: list, conditions, width: float = 0.5) -> torch.Tensor:
    """[B, 2] the per-coordinate factors exp(-(x_k - m_k)^2 / (2 width^2)) of ``mode_reward`` (their
    product is it): the toy's per-element rewards. A non-finite coordinate scores 0."""
    x = _points(objects)
    target = mode_centres()[torch.as_tensor(conditions).long().reshape(-1)]
    factors = torch.exp(-((torch.nan_to_num(x) - target) ** 2) / (2 * width**2))
    return torch.where(torch.isfinite(x), factors, torch.zeros_like(factors))


def on_manifold_reward(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    """exp(-d^2 / (2 (3 std)^2)), d the distance to the nearest mode: rewards staying on the data."""
    x = torch.nan_to_num(_points(objects), nan=1e3, posinf=1e3, neginf=-1e3)
    d2 = torch.cdist(x, mode_centres()).min(dim=1).values ** 2
    return torch.exp(-d2 / (2 * (3 * MODE_STD) ** 2)), {}
