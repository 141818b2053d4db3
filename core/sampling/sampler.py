"""Samplers: ODE (Euler, Heun) and stochastic laws over a time grid, returning a Rollout.

A velocity function is ``fn(x_t, t, cond) -> v`` with t a [B] float tensor. Which steps are
stochastic is a [B, T] mask (Flow-GRPO-Fast windows and the like are masks); the other steps follow
the ODE solver. Noise comes from an explicit ``torch.Generator`` so a run is reproducible.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.laws import expand_like, gaussian_log_prob, law_mean_std, ode_step
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


def deterministic_step(velocity: VelocityFn, x, v, t, t_next, cond, solver: str, prev=None):
    """One ODE step from x (with v = velocity at x already known): Euler, Heun's 2nd order, or
    DPM-Solver++(2M) (``dpm2``, which needs ``prev`` = (x0 estimate, t) of the step before)."""
    x_euler = ode_step(x, v, t, t_next)
    if solver == "euler":
        return x_euler
    if solver == "heun":
        # the step that ends at t = 0 stays Euler (Karras et al. 2022, Alg. 1; k-diffusion's
        # sample_heun): off the data the velocity is singular there (eps = (x - x0) / t)
        last = heun_skips(t_next, x.shape[0])
        if last.all():
            return x_euler
        v_next = velocity(x_euler, t_next, cond).float()
        heun = ode_step(x, 0.5 * (v + v_next), t, t_next)
        return torch.where(last.reshape(-1, *([1] * (x.dim() - 1))), x_euler, heun)
    if solver == "dpm2":
        return dpm2_step(x, v, t, t_next, prev)
    raise FlowcoachError(f"unknown ODE solver '{solver}'; choose one of: {', '.join(ODE_SOLVERS)}")


def heun_skips(t_next, batch: int) -> torch.Tensor:
    """[B] bool: the rows whose Heun step ends at t = 0 and so takes no second evaluation."""
    return torch.as_tensor(t_next).reshape(-1).expand(batch) <= 0


ODE_SOLVERS = ("euler", "heun", "dpm2")


def _lam(t: torch.Tensor) -> torch.Tensor:
    """log-SNR lambda = log(alpha / sigma) of x_t = (1 - t) x0 + t eps."""
    return torch.log(1.0 - t) - torch.log(t)


def dpm2_step(x, v, t, t_next, prev):
    """DPM-Solver++(2M), midpoint form (diffusers' DPMSolverMultistepScheduler, solver_order 2), with
    alpha_t = 1 - t, sigma_t = t and the data prediction x0 = x - t v. ``prev`` = (x0, t) [B] of the
    step before, or None. It falls back to the first-order step (which is exactly Euler in this
    parametrisation) where no previous step exists, the previous step started at t = 1, or the step
    ends at t = 0 (diffusers' lower_order_final)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
    t_next = torch.as_tensor(t_next, dtype=torch.float32, device=x.device).expand(x.shape[0])
    euler = ode_step(x, v, t, t_next)
    if prev is None:
        return euler
    prev_x0, prev_t = prev
    second = (prev_t < 1.0) & (t < 1.0) & (t_next > 0.0) & (prev_t > t)
    if not second.any():
        return euler
    safe = lambda u: u.clamp(1e-6, 1 - 1e-6)  # noqa: E731 - the unused branch must stay finite
    tc, tn, tp = safe(t), safe(t_next), safe(prev_t)
    h = _lam(tn) - _lam(tc)
    r = (_lam(tc) - _lam(tp)) / h
    x0 = x - expand_like(t, x) * v
    d1 = (x0 - prev_x0) / expand_like(r, x)
    coef = expand_like((1.0 - tn) * (1.0 - torch.exp(-h)), x)
    out = expand_like(tn / tc, x) * x + coef * (x0 + 0.5 * d1)
    return torch.where(second.reshape(-1, *([1] * (x.dim() - 1))), out, euler)


def _first_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ids [N]: (index of the first row of each distinct id [U], position of each row's id [N])."""
    _, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), "amin")
    return first, inverse


def _children(nodes: torch.Tensor, keys: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """New node ids after a step: samples stay together when they were in one node, took the same
    kind of step to the same time, and (on a stochastic step) share the branch key."""
    table = torch.stack([nodes, keys, t_next.float().view(torch.int32).long()], dim=1)
    return torch.unique(table, dim=0, return_inverse=True)[1]


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
    ode_solver: str | Sequence[str] = "euler",
    record_means: bool = False,
    noise: torch.Tensor | None = None,
    node_ids: torch.Tensor | None = None,
    branch_keys: torch.Tensor | None = None,
    record_x0: bool = False,
) -> Rollout:
    """Integrate from x_init at timesteps[0] to timesteps[-1], with noise on the stochastic steps.

    ``timesteps`` is one grid [T+1] or one per sample [B, T+1] (steps of zero length are skipped).
    ``ode_solver`` names the solver of the deterministic steps, one for all or one per step. The
    step noise is drawn from ``generator``, or taken from ``noise`` [B, T, ...] when given.

    Shared work: ``node_ids`` [B] says which samples start from the same state (e.g. a group's
    shared initial noise); the velocity is then evaluated once per distinct state and step. On a
    stochastic step the samples of one node split by ``branch_keys`` [B, T] (default: each its
    own), each child taking the noise of its first sample; so a group's ODE prefix is computed once
    and a tree's branches are shared by their leaves (TreeGRPO, Flow-GRPO-Fast's shared prefix).
    """
    if noise_level < 0:
        raise FlowcoachError(f"noise level must be >= 0, got {noise_level}")
    batch = x_init.shape[0]
    per_sample_grid = timesteps.dim() == 2
    num_steps = timesteps.shape[-1] - 1
    device = x_init.device
    solvers = [ode_solver] * num_steps if isinstance(ode_solver, str) else list(ode_solver)
    if len(solvers) != num_steps:
        raise FlowcoachError(f"{len(solvers)} ODE solvers given for {num_steps} steps")
    if stochastic is None:
        stochastic = torch.ones(batch, num_steps, dtype=torch.bool)
    if law == "ode" or noise_level == 0:
        stochastic = torch.zeros_like(stochastic)
    stochastic = stochastic.to(device)
    if group_ids is None:
        group_ids = torch.arange(batch)
    timesteps = timesteps.to(device=device, dtype=torch.float32)
    sharing = node_ids is not None or per_sample_grid
    nodes = (torch.unique(node_ids, return_inverse=True)[1] if node_ids is not None else torch.arange(batch)).to(device)
    history = [nodes]

    def draw(j: int) -> torch.Tensor:
        if noise is not None:
            return noise[:, j].to(device=device, dtype=torch.float32)
        return torch.randn(x_init.shape, generator=generator).to(device)

    def rows_like(mask, x):
        return mask.reshape(-1, *([1] * (x.dim() - 1)))

    x = x_init.float()
    states = [x]
    log_probs = torch.zeros(batch, num_steps, device=device)
    stds = torch.zeros(batch, num_steps, device=device)
    means, x0_hats = [], []
    nfe = 0
    prev = None  # (x0 estimate, t) of the previous step, for multistep solvers
    for j in range(num_steps):
        if per_sample_grid:
            t, t_next = timesteps[:, j], timesteps[:, j + 1]
        else:
            t, t_next = timesteps[j].expand(batch), timesteps[j + 1].expand(batch)
        rows = stochastic[:, j]
        moving = t_next != t
        if not sharing:  # every sample is its own: evaluate the whole batch, as a plain sampler
            evaluate = lambda xs, ts, _cond=None: velocity(xs, ts, cond).float()  # noqa: E731
            evaluated = batch
        else:  # one evaluation per distinct moving state, broadcast to the samples in it
            first, inverse = _first_rows(torch.where(moving, nodes, -1))
            live = moving[first]
            reps = first[live]
            slot = torch.full((len(first),), -1, dtype=torch.long, device=device)
            slot[live] = torch.arange(len(reps), device=device)
            row_slot = slot[inverse]

            def evaluate(xs, ts, _cond=None, reps=reps, row_slot=row_slot):
                if len(reps) == 0:
                    return torch.zeros_like(xs)
                values = velocity(xs[reps], ts[reps], index_cond(cond, reps)).float()
                return torch.where(rows_like(row_slot >= 0, xs), values[row_slot.clamp(min=0)], 0.0)

            evaluated = len(reps)
        v = evaluate(x, t)
        nfe += evaluated
        if record_x0:
            x0_hats.append(x - rows_like(t, x) * v)

        def ode_next():
            nonlocal nfe
            out = deterministic_step(evaluate, x, v, t, t_next, cond, solvers[j], prev)
            if solvers[j] == "heun" and not heun_skips(t_next, batch).all():
                nfe += evaluated
            return out

        if rows.any():
            keys = torch.where(rows, branch_keys[:, j].to(device) if branch_keys is not None else
                               torch.arange(batch, device=device), -1)
            children = _children(nodes, keys, t_next) if sharing else torch.arange(batch, device=device)
            mean, std = law_mean_std(law, x, v, t, t_next, noise_level)
            z = draw(j)
            if sharing:
                first, which = _first_rows(children)
                z = z[first[which]]
            x_sde = mean + std.reshape(-1, *([1] * (x.dim() - 1))) * z
            if rows.all():
                x_next = x_sde
                log_probs[:, j] = gaussian_log_prob(x_next, mean, std, reduction)
                stds[:, j] = std
            else:
                x_ode = ode_next()
                sel = rows_like(rows, x)
                x_next = torch.where(sel, x_sde, x_ode)
                mean = torch.where(sel, mean, x_ode)
                log_probs[:, j] = torch.where(rows, gaussian_log_prob(x_sde, mean, std, reduction), 0.0)
                stds[:, j] = torch.where(rows, std, 0.0)
            nodes = children
        else:
            x_next = ode_next()
            mean = x_next
            if sharing:
                nodes = _children(nodes, torch.full_like(nodes, -1), t_next)
        if not moving.all():  # zero-length steps leave their samples where they are
            still = rows_like(~moving, x)
            x_next, mean = torch.where(still, x, x_next), torch.where(still, x, mean)
        if solvers[j] == "dpm2" or (j + 1 < num_steps and solvers[j + 1] == "dpm2"):
            x0 = x - rows_like(t, x) * v
            prev = (x0, t) if prev is None or moving.all() else (
                torch.where(rows_like(moving, x), x0, prev[0]), torch.where(moving, t, prev[1]))
            if rows.any():  # after noise the multistep history belongs to another path: restart at first order
                prev = (prev[0], torch.where(rows, torch.ones_like(prev[1]), prev[1]))
        if record_means:
            means.append(mean)
        states.append(x_next)
        history.append(nodes)
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
        nodes=torch.stack(history, dim=1) if node_ids is not None else None,
        law=law,
        noise_level=float(noise_level),
        reduction=reduction,
        nfe=int(nfe),
        x0_hats=torch.stack(x0_hats, dim=1) if record_x0 else None,
    )


def pair_log_probs(velocity: VelocityFn, rollout: Rollout, pairs: torch.Tensor):
    """Log-probs [N] of the stored transitions of (sample, step) ``pairs`` [N, 2] under ``velocity``
    (e.g. an updated model), with the transition means and stds."""
    i, j = pairs[:, 0], pairs[:, 1]
    x, x_next = rollout.states[i, j], rollout.states[i, j + 1]
    t, t_next = rollout.step_times(i, j)
    v = velocity(x, t, index_cond(rollout.cond, i)).float()
    mean, std = law_mean_std(rollout.law, x, v, t, t_next, rollout.noise_level)
    return gaussian_log_prob(x_next, mean, std, rollout.reduction), mean, std


@torch.no_grad()
def ode_completions(velocity: VelocityFn, rollout: Rollout, starts: Sequence[int],
                    ode_solver: str = "euler") -> dict[int, torch.Tensor]:
    """The clean sample the deterministic ODE reaches from each state x_j of the rollout, j in
    ``starts``: {j: [B, ...]} (DenseGRPO's x0^ODE(x_j)). All completions run as one batch on per-row
    grids that sit still (zero-length steps, not evaluated) until their start time."""
    B, T = rollout.stochastic.shape
    starts = list(starts)
    if not starts:
        return {}
    grid = rollout.timesteps if rollout.timesteps.dim() == 2 else rollout.timesteps.expand(B, -1)
    x, grids, rows = [], [], []
    for j in starts:
        g = grid.clone()
        g[:, :j] = grid[:, j:j + 1]
        x.append(rollout.states[:, j])
        grids.append(g)
        rows.append(torch.arange(B, device=rollout.states.device))
    rows = torch.cat(rows)
    out = sample(velocity, torch.cat(x), torch.cat(grids), cond=index_cond(rollout.cond, rows), law="ode",
                 noise_level=0.0, ode_solver=ode_solver)
    finals = out.samples.split(B)
    return {j: f for j, f in zip(starts, finals)}
