"""Advantage estimators: pure functions of rewards and group ids, registered by name.

Each returns (advantages [B] float32, keep [B] bool, info dict). ``keep`` is False for samples whose
group carries no signal (all rewards equal): they are dropped from the loss, never divided by zero.
"""

from __future__ import annotations

import torch

from flowcoach.core.registry import ADVANTAGES, FlowcoachError


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and (population) std of its group's values, as [B] tensors."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    n = len(unique)
    counts = torch.zeros(n, dtype=values.dtype).index_add_(0, inverse, torch.ones_like(values))
    means = torch.zeros(n, dtype=values.dtype).index_add_(0, inverse, values) / counts
    centred = values - means[inverse]
    var = torch.zeros(n, dtype=values.dtype).index_add_(0, inverse, centred**2) / counts
    return means[inverse], var.sqrt()[inverse]


def _check_groups(group_ids: torch.Tensor) -> None:
    _, counts = torch.unique(group_ids, return_counts=True)
    if (counts < 2).any():
        raise FlowcoachError("every group needs at least 2 samples for a group-relative advantage; raise group_size")


@ADVANTAGES.register("group")
def group_normalized(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_scope: str = "group",
    clip: float = 5.0,
    eps: float = 1e-4,
    zero_std_tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A_i = (R_i - mean_group) / (std + eps), std over the group or the whole batch; clipped to ±clip."""
    rewards = rewards.float().cpu()
    group_ids = group_ids.cpu()
    _check_groups(group_ids)
    mean, group_std = group_stats(rewards, group_ids)
    if std_scope == "group":
        std = group_std
    elif std_scope == "global":
        std = rewards.std(unbiased=False).expand_as(rewards)
    else:
        raise FlowcoachError(f"std_scope must be 'group' or 'global', got '{std_scope}'")
    keep = group_std > zero_std_tol
    adv = torch.where(keep, (rewards - mean) / (std + eps), torch.zeros_like(rewards))
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    n_groups = len(torch.unique(group_ids))
    zero_groups = len(torch.unique(group_ids[~keep]))
    info = {"group/zero_std_ratio": zero_groups / n_groups, "group/reward_std_mean": group_std.mean().item(),
            "adv/abs_mean": adv.abs().mean().item()}
    return adv, keep, info


@ADVANTAGES.register("per-reward")
def per_reward_normalized(
    components: torch.Tensor,
    weights: torch.Tensor,
    group_ids: torch.Tensor,
    std_scope: str = "group",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Several rewards [B, K]: normalise each within its group, then take the weighted sum.

    So a reward with a large scale cannot drown the others (GDPO-style aggregation).
    """
    components = components.float().cpu()
    if components.dim() != 2 or components.shape[1] != len(weights):
        raise FlowcoachError(f"per-reward advantages need [B, K] components for K={len(weights)} weights")
    parts, keeps = [], []
    for k in range(components.shape[1]):
        adv_k, keep_k, _ = group_normalized(components[:, k], group_ids, std_scope, clip=0.0, eps=eps)
        parts.append(adv_k * float(weights[k]))
        keeps.append(keep_k)
    adv = torch.stack(parts, dim=1).sum(dim=1)
    keep = torch.stack(keeps, dim=1).any(dim=1)
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    n_groups = len(torch.unique(group_ids))
    info = {"group/zero_std_ratio": len(torch.unique(group_ids[~keep])) / n_groups,
            "adv/abs_mean": adv.abs().mean().item()}
    return adv, keep, info
