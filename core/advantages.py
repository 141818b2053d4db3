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


def _normalise(values: torch.Tensor, eps: float, zero_std_tol: float) -> tuple[torch.Tensor, bool]:
    """(values - mean) / (population std + eps) and whether the std carries signal."""
    std = values.std(unbiased=False) if len(values) > 1 else torch.tensor(0.0)
    if std <= zero_std_tol:
        return torch.zeros_like(values), False
    return (values - values.mean()) / (std + eps), True


@ADVANTAGES.register("tree")
def tree_advantages(
    rewards: torch.Tensor,
    nodes: torch.Tensor,
    stochastic: torch.Tensor,
    group_ids: torch.Tensor,
    log_probs: torch.Tensor | None = None,
    value: str = "mean",
    clip: float = 5.0,
    eps: float = 1e-4,
    zero_std_tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-edge advantages of sampling trees (TreeGRPO / BranchGRPO), [B, T] with keep [B, T].

    Each group is one tree whose leaves are its samples; ``nodes`` [B, T+1] are the node ids the
    sampler recorded and ``stochastic`` marks the branch steps. The value of a node is the mean
    reward of its leaves (``mean``), or the softmax(log-prob of each child edge)-weighted values of
    its children (``softmax``, BranchGRPO's path weighting). The edge into node c at depth d gets
    A(c) = (V(c) - mean_d) / (std_d + eps), the statistics taken over the nodes of depth d of the
    same tree. It sits at the first sample through c (the one ``Rollout.trained_pairs`` keeps).
    """
    rewards = rewards.float().cpu()
    nodes, stochastic, group_ids = nodes.cpu(), stochastic.cpu(), group_ids.cpu()
    B, T = stochastic.shape
    adv = torch.zeros(B, T)
    keep = torch.zeros(B, T, dtype=torch.bool)
    if value not in ("mean", "softmax"):
        raise FlowcoachError(f"tree value must be 'mean' or 'softmax', got '{value}'")
    if value == "softmax" and log_probs is None:
        raise FlowcoachError("softmax tree values need the edges' log-probs")
    depth_counts = []
    for g in torch.unique(group_ids).tolist():
        rows = torch.nonzero(group_ids == g).flatten()
        steps = torch.nonzero(stochastic[rows].any(dim=0)).flatten().tolist()
        if not steps:
            continue
        # value per row = value of the row's node after each branch step, from the leaves up
        row_value = rewards[rows].clone()
        values = {}
        for d in reversed(range(len(steps))):
            child = nodes[rows, steps[d] + 1]
            new_value = torch.zeros(len(rows))
            for c in torch.unique(child).tolist():
                inside = child == c
                if value == "mean" or d == len(steps) - 1:
                    new_value[inside] = rewards[rows][inside].mean()
                else:  # weight the children (nodes after the next branch) by softmax of their edge log-probs
                    grand = nodes[rows, steps[d + 1] + 1]
                    kids = torch.unique(grand[inside])
                    kid_rows = torch.stack([torch.nonzero(inside & (grand == k)).flatten()[0] for k in kids])
                    weights = torch.softmax(log_probs[rows[kid_rows], steps[d + 1]].float().cpu(), dim=0)
                    new_value[inside] = (weights * row_value[kid_rows]).sum()
            row_value = new_value
            values[d] = (child, row_value)
        for d, j in enumerate(steps):
            child, row_value = values[d]
            first = torch.stack([torch.nonzero(child == c).flatten()[0] for c in torch.unique(child)])
            a, signal = _normalise(row_value[first], eps, zero_std_tol)
            adv[rows[first], j] = a
            keep[rows[first], j] = signal and bool(stochastic[rows[first], j].all())
            depth_counts.append(len(first))
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    info = {"adv/abs_mean": adv[keep].abs().mean().item() if keep.any() else 0.0,
            "group/zero_std_ratio": 1.0 - keep.sum().item() / max(sum(depth_counts), 1)}
    return adv, keep, info


@ADVANTAGES.register("dense")
def dense_advantages(
    step_rewards: torch.Tensor,
    stochastic: torch.Tensor,
    group_ids: torch.Tensor,
    clip: float = 5.0,
    eps: float = 1e-4,
    zero_std_tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DenseGRPO's step-wise advantages [B, T] from the rewards of each state's clean estimate.

    ``step_rewards`` [B, T+1]: r_j = R(x0_hat(x_j)), with r_T the reward of the sample itself. The
    gain of step j is g_j = r_{j+1} - r_j (they telescope to r_T - r_0), normalised across the
    group at the same step: A_j = (g_j - mean_group g_j) / (std_group g_j + eps).
    """
    gains = (step_rewards[:, 1:] - step_rewards[:, :-1]).float().cpu()
    stochastic, group_ids = stochastic.cpu(), group_ids.cpu()
    adv = torch.zeros_like(gains)
    keep = torch.zeros_like(stochastic)
    for g in torch.unique(group_ids).tolist():
        rows = torch.nonzero(group_ids == g).flatten()
        for j in torch.nonzero(stochastic[rows].any(dim=0)).flatten().tolist():
            a, signal = _normalise(gains[rows, j], eps, zero_std_tol)
            adv[rows, j] = a
            keep[rows, j] = signal & stochastic[rows, j]
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    info = {"adv/abs_mean": adv[keep].abs().mean().item() if keep.any() else 0.0,
            "dense/gain_abs_mean": gains[stochastic].abs().mean().item() if stochastic.any() else 0.0,
            "group/zero_std_ratio": 1.0 - (keep.sum().item() / max(int(stochastic.sum()), 1))}
    return adv, keep, info


def element_advantages(
    sample_adv: torch.Tensor,
    element_rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weight: float,
    std_scope: str = "group",
    clip: float = 5.0,
    eps: float = 1e-4,
    zero_std_tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Per-element advantages [B, E]: the sample's own plus ``weight`` x its element reward against
    the same element (row) in the group's other samples, c = r - mean_row, over the std of c among
    the credited elements of the group or (``std_scope`` global) of the whole batch, clipped to +-clip.
    A group where a few elements of one sample differ has a tiny std of its own, which would blow
    those few up to the clip: the global scope keeps them at their size relative to the batch.

    ``element_rewards`` [B, E] is NaN where an element earns no credit (padding). The baseline is per
    row because elements of different kinds differ in reward whatever the sample does (a molecule's
    hydrogens are nearly always stable, its carbons often not): a pooled baseline credits the kind,
    not the action. Returns (advantages, credited mask [B, E], samples whose group has an element
    signal [B], info). An uncredited element takes the sample's own advantage, as in the per-sample
    loss: it has no reward of its own, but its share of the step (a crystal's lattice row, a molecule's
    padding rows) is still the sample's action.
    """
    r = element_rewards.float().cpu()
    credited = torch.isfinite(r)
    _, inverse = torch.unique(group_ids.cpu(), return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    values = torch.where(credited, r, torch.zeros_like(r))
    count = torch.zeros(n, r.shape[1]).index_add_(0, inverse, credited.float())
    row_mean = torch.zeros(n, r.shape[1]).index_add_(0, inverse, values) / count.clamp(min=1)
    centred = torch.where(credited, values - row_mean[inverse], torch.zeros_like(r))
    var = torch.zeros(n).index_add_(0, inverse, (centred**2).sum(dim=1)) / count.sum(dim=1).clamp(min=1)
    std = var.sqrt()
    signal = (std > zero_std_tol)[inverse]
    if std_scope == "global":
        scale = (centred**2).sum().div(credited.sum().clamp(min=1)).sqrt().expand(len(r))
    elif std_scope == "group":
        scale = std[inverse]
    else:
        raise FlowcoachError(f"std_scope must be 'group' or 'global', got '{std_scope}'")
    z = torch.where(signal[:, None], centred / (scale[:, None] + eps), torch.zeros_like(r))
    own = sample_adv.float().cpu()[:, None].expand_as(r)
    adv = torch.where(credited, own + weight * z, own)
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    moved = credited & (centred != 0)
    info = {"element/reward_mean": float(r[credited].mean()) if credited.any() else 0.0,
            "element/moved_ratio": float(moved.sum() / credited.sum().clamp(min=1)),
            "element/z_abs_mean": float(z[moved].abs().mean()) if moved.any() else 0.0,
            "element/zero_std_ratio": float(1.0 - (std > zero_std_tol).float().mean()) if n else 0.0}
    return adv, credited, signal, info


def best_of_n_keep(rewards: torch.Tensor, group_ids: torch.Tensor, n: int) -> torch.Tensor:
    """[B] mask of the n/2 highest and n/2 lowest rewards of each group (DanceGRPO's best-of-N).
    Ties are broken by sample order."""
    if n < 2 or n % 2:
        raise FlowcoachError(f"best_of_n must be an even number >= 2, got {n}")
    keep = torch.zeros(len(rewards), dtype=torch.bool)
    for g in torch.unique(group_ids).tolist():
        rows = torch.nonzero(group_ids == g).flatten()
        if n >= len(rows):
            keep[rows] = True
            continue
        order = rows[torch.argsort(rewards[rows], stable=True)]
        keep[order[: n // 2]] = True
        keep[order[-(n // 2):]] = True
    return keep


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value in the batch, 0 = lowest (ties by order)."""
    order = torch.argsort(values, stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(len(values))
    return out.float()


def kl_gate(components: torch.Tensor, fraction: float) -> torch.Tensor:
    """GARDO's gate [B]: the ``fraction`` of samples with the largest uncertainty
    u = rank(R_main) - mean_k rank(R_aux_k) (the first component is the main reward), i.e. those the
    main reward likes far more than the others do: the likeliest reward hacks get the KL."""
    if components.dim() != 2 or components.shape[1] < 2:
        raise FlowcoachError("a gated KL needs at least 2 reward components (the main reward first, then "
                             "the auxiliary ones): pass --rewards MAIN=1 AUX=0.1 ...")
    if not 0 < fraction <= 1:
        raise FlowcoachError(f"loss.kl_gate must be in (0, 1], got {fraction}")
    comp = components.float().cpu()
    u = ranks(comp[:, 0]) - torch.stack([ranks(comp[:, k]) for k in range(1, comp.shape[1])]).mean(dim=0)
    n = max(1, round(fraction * len(u)))
    gate = torch.zeros(len(u), dtype=torch.bool)
    gate[torch.argsort(u, descending=True, stable=True)[:n]] = True
    return gate
