"""Losses as pure functions of tensors: the clipped ratio objective, KL to a reference, flow matching."""

from __future__ import annotations

import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.laws import expand_like, gaussian_kl_same_std, reduce_dims

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
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO per-pair loss max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(lp - lp_old).

    Symmetric when clip_low == clip_high (asymmetric otherwise, e.g. DAPO's clip-higher). A given
    ``log_ratio`` replaces lp - lp_old (RatioNorm). Returns the [N] loss and diagnostics.
    """
    if log_ratio is None:
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


def element_credit_loss(
    shares: torch.Tensor,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict]:
    """Per-pair loss [N] with one advantage per element, A [N, E], on the elements' log-prob shares
    [N, E] (they sum to the step's log-prob) and the step's own log-ratio [N].

    The step was sampled jointly, so its importance weight is the joint ratio r: the gradient is
    -r sum_e A_e grad(share_e), which is the per-sample PPO gradient when every A_e = A. An element's
    term is dropped where r is past the clip in its advantage's direction (PPO's pessimistic bound).
    The value is the per-sample clipped loss averaged over the elements (for logging).
    """
    ratio = torch.exp(log_ratio)[:, None]
    past = ((advantages > 0) & (ratio > 1.0 + clip_high)) | ((advantages < 0) & (ratio < 1.0 - clip_low))
    r = ratio.detach()
    grad_part = (-advantages * r * (shares - shares.detach()) * ~past).sum(dim=1)
    value = torch.maximum(-advantages * r, -advantages * r.clamp(1.0 - clip_low, 1.0 + clip_high)).mean(dim=1)
    with torch.no_grad():
        approx_kl = (ratio.squeeze(1) - 1.0) - log_ratio
    return grad_part + value.detach(), {"ratio": ratio.squeeze(1).detach(), "clipped": past.flatten().float(),
                                        "approx_kl": approx_kl}


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


def flow_times(n: int, generator: torch.Generator | None = None, scheme: str = "uniform",
               logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """[n] flow times (t = 0 is the data, 1 the noise): uniform, or logit-normal, t = sigmoid(u) with
    u ~ N(logit_mean, logit_std) (SD3's scheme, diffusers' compute_density_for_timestep_sampling)."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    if scheme != "logit-normal":
        raise FlowcoachError(f"unknown flow-time sampling '{scheme}'; choose uniform or logit-normal")
    if logit_std <= 0:
        raise FlowcoachError(f"the logit-normal std must be > 0, got {logit_std}")
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling("logit_normal", n, logit_mean, logit_std, generator=generator)


def flow_matching_loss(velocity, x0: torch.Tensor, cond, generator: torch.Generator | None = None,
                       t: torch.Tensor | None = None, couple=None, structure=None,
                       structure_weight: float = 0.0) -> torch.Tensor:
    """Conditional flow matching: x_t = (1 - t) x0 + t eps, target eps - x0, mean squared error.

    t ~ U(0, 1) per sample unless given. ``couple(x0, eps, cond) -> x0`` pairs each data sample with
    its noise (``Domain.couple``: e.g. atoms permuted and rotated onto the noise); default independent.
    ``structure(x0_hat, x0, cond) -> [B]`` (``Domain.structure_loss``) adds ``structure_weight`` times
    its mean on the implied clean sample x0_hat = x_t - t v.
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
    loss = ((v.float() - (eps - x0).float()) ** 2).mean()
    if structure is not None and structure_weight:
        loss = loss + structure_weight * structure(x_t - tb * v, x0, cond).float().mean()
    return loss


def pair_distance_error(dist_hat: torch.Tensor, dist: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error of the distances [B, N, N] over the ordered pairs of real atoms (real [B, N]):
    the structure loss of the atom domains (``Domain.structure_loss``)."""
    pairs = (real[:, :, None] & real[:, None]).float() * (1 - torch.eye(real.shape[1], device=real.device))
    return ((dist_hat - dist) ** 2 * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1.0)


def ratio_norm_log_ratio(log_prob, old_log_prob, mean, old_mean, std, reduction: str = "mean") -> torch.Tensor:
    """GRPO-Guard's RatioNorm (arXiv 2510.22319, as verl-omni's GRPOGuardLoss writes it):
    (log r + KL(old || new)) * std.

    The raw log-ratio of a Gaussian step is reduce((mu - mu_old) z) / std - KL, with z the old
    step's unit noise: its mean is -KL < 0 (the left shift) and its spread ~1/std differs per step.
    Adding the closed-form KL centres it on 0 (ratio on 1) and the std factor leaves
    reduce((mu - mu_old) z), whose spread does not depend on the step's noise level.
    """
    return (log_prob - old_log_prob + gaussian_kl_same_std(mean, old_mean, std, reduction)) * std


def fm_log_likelihood(v: torch.Tensor, target: torch.Tensor, t: torch.Tensor, reduction: str = "mean",
                      weighting: str = "mse", p: float = 0.25, c: float = 1e-3) -> torch.Tensor:
    """The forward-process stand-in for a log-likelihood: minus the flow-matching error [N].

    ``mse``: -reduce(||v - (eps - x0)||^2) (FPO's and AWM's plain form; the ELBO up to a constant
    and weighting). ``ghuber``: AWM's generalised-Huber form -((e + c)^p - c^p) t / p, which grows
    slower than the error for large errors.
    """
    err = reduce_dims((v.float() - target.float()) ** 2, reduction)
    if weighting == "mse":
        return -err
    if weighting == "ghuber":
        return -((err + c) ** p - c**p) * t.float() / p
    raise FlowcoachError(f"unknown AWM weighting '{weighting}'; choose mse or ghuber")


def nft_optimality(advantages: torch.Tensor, adv_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability r = clip(1/2 + A / (2 A_max), 0, 1)."""
    return (0.5 + advantages / (2 * adv_max)).clamp(0.0, 1.0)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, adv_max: float) -> torch.Tensor:
    """DiffusionNFT (arXiv 2509.16117) per-draw loss [N] on re-noised samples x_t = (1 - t) x0 + t eps.

    Implicit positive and negative policies v+ = (1 - beta) v_old + beta v, v- = (1 + beta) v_old - beta v;
    with x0_hat(u) = x_t - t u and adaptive weights w = stopgrad(mean |x0_hat - x0|):
    A_max / beta (r ||x0_hat(v+) - x0||^2 / w+ + (1 - r) ||x0_hat(v-) - x0||^2 / w-), means over dimensions.
    A positive sample (r = 1) pulls x0_hat(v) toward it, a negative one (r = 0) pushes it away.
    """
    v, v_old, x_t, x0 = v.float(), v_old.float(), x_t.float(), x0.float()
    tb = expand_like(t, x_t)
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v
    x0_pos, x0_neg = x_t - tb * pos, x_t - tb * neg
    with torch.no_grad():
        w_pos = reduce_dims((x0_pos - x0).abs(), "mean").clamp(min=1e-5)
        w_neg = reduce_dims((x0_neg - x0).abs(), "mean").clamp(min=1e-5)
    pos_loss = reduce_dims((x0_pos - x0) ** 2, "mean") / w_pos
    neg_loss = reduce_dims((x0_neg - x0) ** 2, "mean") / w_neg
    return adv_max * (r * pos_loss + (1 - r) * neg_loss) / beta


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """||v - v_ref||^2 reduced over dimensions [N]: the KL surrogate of forward-process losses."""
    return reduce_dims((v.float() - v_ref.float()) ** 2, reduction)
