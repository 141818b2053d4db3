"""Noise laws: one stochastic transition x_t -> x_{t_next} of a flow sampler, with exact log-prob and KL.

Conventions (DESIGN.md §2): x_t = (1 - t) x0 + t eps, t = 1 is noise, a step goes from t to
t_next < t (dt < 0), the velocity is v = eps - x0. Every law maps (x, v, t, t_next, noise_level)
to the Gaussian mean and std of x_{t_next}; std does not depend on the model, so two policies at
the same state share the variance and their KL is closed-form in the means. All math is float32.

Laws (../shared/research/algorithms.md §0-§2):
- ``ode``:       mean = x + v dt, std = 0.
- ``flow-sde``:  Flow-GRPO's marginal-preserving SDE, sigma_t = a sqrt(t / (1 - t)),
                 mean = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt, std = sigma_t sqrt|dt|.
                 At t = 1 the 1 - t in sigma_t is replaced by 1 - t_next (flow_grpo's sigma_max).
- ``const-eta``: DanceGRPO, the same SDE with sigma_t = eta constant.
- ``cps``:       Coefficients-Preserving Sampling, s = t_next sin(a pi / 2),
                 mean = (1 - t_next) x0_hat + sqrt(t_next^2 - s^2) eps_hat, std = s.
At noise level 0 every law is the Euler ODE step; the sampler then takes the ODE path itself so the
result is bit-for-bit the ODE's.
"""

from __future__ import annotations

import math

import torch

from flowcoach.core.registry import NOISE_LAWS, FlowcoachError

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample [B] (or scalar) time against x of shape [B, ...]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def ode_step(x, v, t, t_next):
    dt = expand_like(t_next, x) - expand_like(t, x)
    return x + v * dt


def flow_sde_sigma(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's sigma_t = a sqrt(t / (1 - t)); at t = 1, 1 - t_next replaces 1 - t."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t_next = torch.as_tensor(t_next, dtype=torch.float32, device=t.device)
    one_minus = torch.where(t >= 1.0, 1.0 - t_next, 1.0 - t)
    return noise_level * torch.sqrt(t / one_minus)


def _sde_mean_std(x, v, t, t_next, sigma):
    """Euler-Maruyama step of dx = [v + sigma^2/(2t) (x + (1-t) v)] dt + sigma dw."""
    tb, tnb, sb = expand_like(t, x), expand_like(t_next, x), expand_like(sigma, x)
    dt = tnb - tb
    eps_hat = x + (1.0 - tb) * v
    mean = x + (v + sb**2 / (2.0 * tb) * eps_hat) * dt
    std = sigma * torch.sqrt(torch.as_tensor(t, dtype=torch.float32) - torch.as_tensor(t_next, dtype=torch.float32))
    return mean, std


@NOISE_LAWS.register("flow-sde")
def flow_sde(x, v, t, t_next, noise_level):
    return _sde_mean_std(x, v, t, t_next, flow_sde_sigma(t, t_next, noise_level))


@NOISE_LAWS.register("const-eta")
def const_eta(x, v, t, t_next, noise_level):
    sigma = torch.full_like(torch.as_tensor(t, dtype=torch.float32), float(noise_level))
    return _sde_mean_std(x, v, t, t_next, sigma)


@NOISE_LAWS.register("cps")
def cps(x, v, t, t_next, noise_level):
    tb, tnb = expand_like(t, x), expand_like(t_next, x)
    x0_hat = x - tb * v
    eps_hat = x + (1.0 - tb) * v
    s = torch.as_tensor(t_next, dtype=torch.float32) * math.sin(noise_level * math.pi / 2)
    sb = expand_like(s, x)
    mean = (1.0 - tnb) * x0_hat + torch.sqrt(torch.clamp(tnb**2 - sb**2, min=0.0)) * eps_hat
    return mean, s


@NOISE_LAWS.register("ode")
def ode(x, v, t, t_next, noise_level):
    return ode_step(x, v, t, t_next), torch.zeros_like(torch.as_tensor(t, dtype=torch.float32))


def law_mean_std(law: str, x, v, t, t_next, noise_level: float):
    """Gaussian mean [B, ...] and std ([B] or scalar) of x_{t_next} under ``law``, in float32."""
    if noise_level < 0:
        raise FlowcoachError(f"noise level must be >= 0, got {noise_level}")
    fn = NOISE_LAWS.get(law)
    return fn(x.float(), v.float(), t, t_next, noise_level)


def reduce_dims(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce [B, ...] to [B] by mean or sum over every non-batch dimension."""
    flat = values.reshape(values.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "sum":
        return flat.sum(dim=1)
    raise FlowcoachError(f"log-prob reduction must be 'mean' or 'sum', got '{reduction}'")


def gaussian_log_density(x_next, mean, std) -> torch.Tensor:
    """log N(x_next; mean, std^2) of every dimension [B, ...], std per sample [B] or scalar."""
    stdb = expand_like(std, mean)
    return -((x_next.float() - mean.float()) ** 2) / (2 * stdb**2) - torch.log(stdb) - LOG_SQRT_2PI


def gaussian_log_prob(x_next, mean, std, reduction: str = "mean") -> torch.Tensor:
    """Exact log N(x_next; mean, std^2 I) per sample, reduced over dimensions -> [B]."""
    return reduce_dims(gaussian_log_density(x_next, mean, std), reduction)


def gaussian_log_prob_elements(x_next, mean, std, reduction: str = "mean") -> torch.Tensor:
    """Each element's share [B, E] of ``gaussian_log_prob``, elements being the first sample axis
    (a molecule's atoms): the Gaussian factorises over them, so the shares sum to the joint log-prob
    under either reduction (mean: each share is its dimensions' sum over all the sample's dimensions)."""
    per_dim = gaussian_log_density(x_next, mean, std)
    shares = per_dim.reshape(per_dim.shape[0], per_dim.shape[1], -1).sum(dim=2)
    if reduction == "mean":
        return shares / per_dim[0].numel()
    if reduction == "sum":
        return shares
    raise FlowcoachError(f"log-prob reduction must be 'mean' or 'sum', got '{reduction}'")


def gaussian_kl_same_std(mean_p, mean_q, std, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) = ||mean_p - mean_q||^2 / (2 std^2), reduced -> [B]."""
    stdb = expand_like(std, mean_p)
    return reduce_dims((mean_p.float() - mean_q.float()) ** 2 / (2 * stdb**2), reduction)
