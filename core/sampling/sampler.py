"""Samplers: ODE (Euler, Heun) and stochastic laws over a time grid, returning a Rollout.

A velocity function is ``fn(x_t, t, cond) -> v`` with t a [B] float tensor. Which steps are
stochastic is a [B, T] mask (Flow-GRPO-Fast windows and the like are masks); the other steps follow
the ODE solver. Noise comes from an explicit ``torch.Generator`` so a run is reproducible.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.laws import gaussian_log_prob, law_mean_std, ode_step
from flowcoach.core.sampling.rollout import Rollout, index_cond

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """[T+1] float32 times from 1 to 0, from diffusers' FlowMatchEulerDiscreteScheduler (with its shift).

    The scheduler's own grid starts at 1 and ends at 1/num_train_timesteps before its terminal 0;
    we use ``num_train_timesteps=1`` semantics by setting sigmas directly: linspace(1, 0) shifted.
    """
    if num_steps < 1:
        raise FlowcoachError(f"number of sampling steps must be >= 1, got {num_steps}")
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)[:-1].numpy()
    scheduler.set_timesteps(sigmas=sigmas)  # applies the shift and appends the terminal 0
    return scheduler.sigmas.to(torch.float32).clone()


def window_mask(
    batch_size: int,
    num_steps: int,
    window_size: int = 0,
    window_range: tuple[int, int] | None = None,
    deterministic_last_step: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, T] stochastic-step mask. window_size 0: every step (but maybe the last) is stochastic.

    Otherwise one window of ``window_size`` consecutive SDE steps starts at a random step in
    ``window_range`` = [lo, hi) (Flow-GRPO-Fast); the start is shared by the whole batch so groups
    are comparable, and every other step is ODE.
    """
    mask = torch.zeros(batch_size, num_steps, dtype=torch.bool)
    last = num_steps - 1 if deterministic_last_step else num_steps
    if window_size <= 0:
        mask[:, :last] = True
        return mask
    lo, hi = window_range if window_range is not None else (0, last)
    hi = min(hi, last - window_size + 1)
    if hi <= lo:
        raise FlowcoachError(
            f"an SDE window of {window_size} steps does not fit in steps [{lo}, {hi}) of {num_steps}; "
            "lower sde_window_size or widen sde_window_range"
        )
    start = int(torch.randint(lo, hi, (1,), generator=generator))
    mask[:, start : start + window_size] = True
    return mask


def deterministic_step(velocity: VelocityFn, x, v, t, t_next, cond, solver: str):
    """One ODE step from x (with v = velocity at x already known): Euler, or Heun's 2nd order."""
    x_euler = ode_step(x, v, t, t_next)
    if solver == "euler":
        return x_euler
    if solver == "heun":
        v_next = velocity(x_euler, t_next, cond).float()
        return ode_step(x, 0.5 * (v + v_next), t, t_next)
    raise FlowcoachError(f"unknown ODE solver '{solver}'; choose one of: euler, heun")


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    x_init: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Any = None,
    law: str = "flow-sde",
    noise_level: float = 0.7,
    stochastic: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    ode_solver: str = "euler",
    record_means: bool = False,
    noise: torch.Tensor | None = None,
) -> Rollout:
    """Integrate from x_init at timesteps[0] to timesteps[-1], with noise on the stochastic steps.

    The step noise is drawn from ``generator``, or taken from ``noise`` [B, T, ...] when given.
    """
    if noise_level < 0:
        raise FlowcoachError(f"noise level must be >= 0, got {noise_level}")
    batch = x_init.shape[0]
    num_steps = timesteps.shape[0] - 1
    device = x_init.device
    if stochastic is None:
        stochastic = torch.ones(batch, num_steps, dtype=torch.bool)
    if law == "ode" or noise_level == 0:
        stochastic = torch.zeros_like(stochastic)
    stochastic = stochastic.to(device)
    if group_ids is None:
        group_ids = torch.arange(batch)
    timesteps = timesteps.to(device=device, dtype=torch.float32)

    def draw(j: int) -> torch.Tensor:
        if noise is not None:
            return noise[:, j].to(device=device, dtype=torch.float32)
        return torch.randn(x_init.shape, generator=generator).to(device)

    x = x_init.float()
    states = [x]
    log_probs = torch.zeros(batch, num_steps, device=device)
    stds = torch.zeros(batch, num_steps, device=device)
    means = []
    for j in range(num_steps):
        t = timesteps[j].expand(batch)
        t_next = timesteps[j + 1].expand(batch)
        v = velocity(x, t, cond).float()
        rows = stochastic[:, j]
        if rows.all():  # the common case: the whole batch is stochastic at this step
            mean, std = law_mean_std(law, x, v, t, t_next, noise_level)
            z = draw(j)
            x_next = mean + std.reshape(-1, *([1] * (x.dim() - 1))) * z
            log_probs[:, j] = gaussian_log_prob(x_next, mean, std, reduction)
            stds[:, j] = std
        elif rows.any():
            mean, std = law_mean_std(law, x, v, t, t_next, noise_level)
            z = draw(j)
            x_sde = mean + std.reshape(-1, *([1] * (x.dim() - 1))) * z
            x_ode = deterministic_step(velocity, x, v, t, t_next, cond, ode_solver)
            sel = rows.reshape(-1, *([1] * (x.dim() - 1)))
            x_next = torch.where(sel, x_sde, x_ode)
            mean = torch.where(sel, mean, x_ode)
            log_probs[:, j] = torch.where(rows, gaussian_log_prob(x_sde, mean, std, reduction), 0.0)
            stds[:, j] = torch.where(rows, std, 0.0)
        else:
            x_next = deterministic_step(velocity, x, v, t, t_next, cond, ode_solver)
            mean = x_next
        if record_means:
            means.append(mean)
        states.append(x_next)
        x = x_next
    return Rollout(
        states=torch.stack(states, dim=1),
        log_probs=log_probs,
        stds=stds,
        timesteps=timesteps,
        stochastic=stochastic,
        group_ids=group_ids.to(device),
        cond=cond,
        means=torch.stack(means, dim=1) if record_means else None,
        law=law,
        noise_level=float(noise_level),
        reduction=reduction,
    )


def pair_log_probs(velocity: VelocityFn, rollout: Rollout, pairs: torch.Tensor):
    """Log-probs [N] of the stored transitions of (sample, step) ``pairs`` [N, 2] under ``velocity``
    (e.g. an updated model), with the transition means and stds."""
    i, j = pairs[:, 0], pairs[:, 1]
    x, x_next = rollout.states[i, j], rollout.states[i, j + 1]
    t, t_next = rollout.timesteps[j], rollout.timesteps[j + 1]
    v = velocity(x, t, index_cond(rollout.cond, i)).float()
    mean, std = law_mean_std(rollout.law, x, v, t, t_next, rollout.noise_level)
    return gaussian_log_prob(x_next, mean, std, rollout.reduction), mean, std
