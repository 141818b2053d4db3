"""Rewards of interact domains, on episode summaries (dicts from flowcoach.core.interact.play_episodes)."""

from __future__ import annotations

import torch


def episode_return(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    """The environment's own undiscounted return of each episode."""
    return torch.tensor([float(e["return"]) for e in objects]), {}


def episode_success(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    """1 if the episode reached success (info["is_success"]) at any step, else 0."""
    wins = torch.tensor([float(e["success"]) for e in objects])
    return wins, {"success_rate": float(wins.mean()) if len(wins) else 0.0}


def episode_speed(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    """1 - (steps to success) / (episode steps) for a success, 0 otherwise: rewards succeeding early."""
    scores = [1.0 - e["steps_to_success"] / max(e["steps"], 1) if e["success"] else 0.0 for e in objects]
    return torch.tensor(scores), {}
