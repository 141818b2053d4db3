"""Losses as pure functions of tensors: the clipped ratio objective, KL to a reference, flow matching."""

from __future__ import annotations

import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.laws import gaussian_kl_same_std

# The clip range must match the log-prob reduction (DESIGN.md §2): with a mean over dimensions the
# log-ratio is a per-dimension average and the anchors clip at 1e-4; with a sum it is PPO's ratio.
DEFAULT_CLIP = {"mean": 1e-4, "sum": 0.2}


def default_clip(reduction: str) -> float:
    if reduction not in DEFAULT_CLIP:
        raise FlowcoachError(f"log-prob reduction must be 'mean' or 'sum', got '{reduction}'")
    return DEFAULT_CLIP[reduction]


def clipped_ratio_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO per-pair loss max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(lp - lp_old).

    Symmetric when clip_low == clip_high. Returns the [N] loss and diagnostics (ratio, clipped).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        was_clipped = (clipped > unclipped).float()
        # k3 estimator of KL(old || new), always >= 0 (Schulman's approx_kl)
        approx_kl = (ratio - 1.0) - log_ratio
    return loss, {"ratio": ratio.detach(), "clipped": was_clipped, "approx_kl": approx_kl}


def kl_to_reference(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor,
    reduction: str = "mean",
    with_dt: bool = True,
) -> torch.Tensor:
    """Closed-form KL of one transition to the reference policy (same std), per pair [N].

    with_dt=True is the exact KL ||mu - mu_ref||^2 / (2 sigma_t^2 |dt|). with_dt=False drops the
    1/|dt| so late, large-|dt| steps are not under-weighted (flow_grpo's code; beta ~10x larger).
    """
    kl = gaussian_kl_same_std(mean, ref_mean, std, reduction)
    return kl if with_dt else kl * dt.abs().float()


def flow_matching_loss(velocity, x0: torch.Tensor, cond, generator: torch.Generator | None = None,
                       t: torch.Tensor | None = None, couple=None) -> torch.Tensor:
    """Conditional flow matching: x_t = (1 - t) x0 + t eps, target eps - x0, mean squared error.

    t ~ U(0, 1) per sample unless given. ``couple(x0, eps, cond) -> x0`` pairs each data sample with
    its noise (``Domain.couple``: e.g. atoms permuted and rotated onto the noise); default independent.
    Used for pretraining and for data anchoring in RL.
    """
    batch = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    if couple is not None:
        x0 = couple(x0, eps, cond)
    if t is None:
        t = torch.rand(batch, generator=generator).to(x0.device)
    tb = t.reshape(batch, *([1] * (x0.dim() - 1)))
    x_t = (1 - tb) * x0 + tb * eps
    v = velocity(x_t, t, cond)
    return ((v.float() - (eps - x0).float()) ** 2).mean()
