"""Where the sampling / training overhead comes from, and what a leaner core would save.

Companion of ``bench_core_overhead.py``. Holds a *prototype* (not used by the library) of a change
to ``core/sampling/laws.py``, ``sampler.py`` and ``trainer.py`` and measures it next to the current
code:

* every noise law of core is affine in (x, v): mean = a(t, t') x + b(t, t') v, std = s(t, t'),
  with a, b, s functions of the times only. The prototype computes (a, b, s) once per call for the
  whole [T] grid -- in ``sample`` and in ``pair_losses`` alike, so both see the same float32
  coefficients -- instead of ~25 small tensor ops per step on [B] times plus 6 full-size ops for the
  mean;
* the Gaussian log-prob is reduced before dividing: -sum(d^2)/(2 s^2) - log s - log sqrt(2 pi) (3
  full-size ops instead of 6);
* the per-step ``if rows.all()`` (a host sync per step on a GPU) is decided once per call.

The stored log-probs of the prototype sampler are recomputed bit for bit by the prototype
``pair_log_probs`` (ratio exactly 1 on-policy), and its trajectories equal ``sample``'s up to
float32 rounding; both are checked here.

Part 1 times the sampler's bookkeeping with a free velocity (``v = x``), so the per-step overhead
shows in microseconds independent of any model. Part 2 repeats the two ratios of
``bench_core_overhead.py`` for the prototype.

    python benchmarks/overhead_breakdown.py --threads 2 --out benchmarks/results/overhead_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core_overhead import (CASES, COND_CLASSES, NOISE_LEVEL, bare_ode, interleaved, machine,  # noqa: E402
                                 minimal_sde, sde_coefficients, summarise)

from flowcoach.core.config import TrainConfig  # noqa: E402
from flowcoach.core.losses import clipped_ratio_loss  # noqa: E402
from flowcoach.core.policy import FlowPolicy  # noqa: E402
from flowcoach.core.sampling.laws import LOG_SQRT_2PI, expand_like, flow_sde_sigma, reduce_dims  # noqa: E402
from flowcoach.core.sampling.rollout import Rollout, index_cond  # noqa: E402
from flowcoach.core.sampling.sampler import pair_log_probs, sample, time_grid, window_mask  # noqa: E402
from flowcoach.core.trainer import pair_losses  # noqa: E402


# ----------------------------------------------------------------------------- the prototype
def _sde_coeffs(t, t_next, sigma):
    # x + [v + sigma^2/(2t) (x + (1-t) v)] dt  ==  (1 + c dt) x + (1 + c (1-t)) dt v,  c = sigma^2/(2t)
    dt = t_next - t
    c = sigma**2 / (2.0 * t)
    return 1.0 + c * dt, (1.0 + c * (1.0 - t)) * dt, sigma * torch.sqrt(t - t_next)


def law_coefficients(law: str, t: torch.Tensor, t_next: torch.Tensor, noise_level: float):
    """(a, b, std), each shaped like t, with mean = a x + b v: the affine form of core's laws."""
    if law == "flow-sde":
        return _sde_coeffs(t, t_next, flow_sde_sigma(t, t_next, noise_level))
    if law == "const-eta":
        return _sde_coeffs(t, t_next, torch.full_like(t, float(noise_level)))
    if law == "cps":
        import math

        s = t_next * math.sin(noise_level * math.pi / 2)
        r = torch.sqrt(torch.clamp(t_next**2 - s**2, min=0.0))
        return (1.0 - t_next) + r, -(1.0 - t_next) * t + r * (1.0 - t), s
    if law == "ode":
        return torch.ones_like(t), t_next - t, torch.zeros_like(t)
    raise ValueError(f"no affine form for law '{law}'")


def fast_log_prob(x_next, mean, std, reduction: str = "mean"):
    """log N(x_next; mean, std^2 I) reduced over dims: reduce first, then the [B] terms."""
    d = x_next - mean
    return -reduce_dims(d * d, reduction) / (2.0 * std**2) - torch.log(std) - LOG_SQRT_2PI


@torch.no_grad()
def sample_proposed(velocity, x_init, timesteps, cond=None, law="flow-sde", noise_level=0.7, stochastic=None,
                    group_ids=None, generator=None, reduction="mean") -> Rollout:
    """``sample`` with per-call coefficients (Euler ODE on non-stochastic steps; no per-row mixing)."""
    batch, num_steps, device = x_init.shape[0], timesteps.shape[0] - 1, x_init.device
    if stochastic is None:
        stochastic = torch.ones(batch, num_steps, dtype=torch.bool)
    stochastic = stochastic.to(device)
    col_all = stochastic.all(dim=0).tolist()  # decided once: no host sync inside the loop
    col_any = stochastic.any(dim=0).tolist()
    if any(a != b for a, b in zip(col_all, col_any)):
        raise NotImplementedError("prototype: per-row masks are left to the current code path")
    ts = timesteps.to(device=device, dtype=torch.float32)
    a, b, s = law_coefficients(law, ts[:-1], ts[1:], noise_level)
    a_ode, b_ode, _ = law_coefficients("ode", ts[:-1], ts[1:], 0.0)
    x = x_init.float()
    states = [x]
    log_probs = torch.zeros(batch, num_steps, device=device)
    stds = torch.where(stochastic, s, 0.0)
    for j in range(num_steps):
        v = velocity(x, ts[j].expand(batch), cond).float()
        if col_all[j]:
            mean = x * a[j] + v * b[j]
            noise = torch.randn(x.shape, generator=generator).to(device)
            x_next = mean + s[j] * noise
            log_probs[:, j] = fast_log_prob(x_next, mean, s[j], reduction)
        else:
            x_next = x * a_ode[j] + v * b_ode[j]
        states.append(x_next)
        x = x_next
    return Rollout(states=torch.stack(states, dim=1), log_probs=log_probs, stds=stds, timesteps=ts,
                   stochastic=stochastic, group_ids=(group_ids if group_ids is not None else torch.arange(batch)).to(device),
                   cond=cond, law=law, noise_level=float(noise_level), reduction=reduction)


def pair_log_probs_proposed(velocity, rollout: Rollout, pairs: torch.Tensor):
    i, j = pairs[:, 0], pairs[:, 1]
    x, x_next = rollout.states[i, j], rollout.states[i, j + 1]
    ts = rollout.timesteps
    a, b, s = law_coefficients(rollout.law, ts[:-1], ts[1:], rollout.noise_level)  # [T], as in the sampler
    a, b, s = a[j], b[j], s[j]
    v = velocity(x, ts[j], index_cond(rollout.cond, i)).float()
    mean = x * expand_like(a, x) + v * expand_like(b, x)
    return fast_log_prob(x_next, mean, s, rollout.reduction), mean, s


def pair_losses_proposed(policy, rollout, pairs, advantages, cfg):
    i, j = pairs[:, 0], pairs[:, 1]
    log_prob, mean, std = pair_log_probs_proposed(policy.velocity, rollout, pairs)
    clip_low, clip_high = cfg.resolved_clip()
    return clipped_ratio_loss(log_prob, rollout.log_probs[i, j], advantages[i], clip_low, clip_high)


# ----------------------------------------------------------------------------- checks
def check_prototype(case, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = case.build().eval()
    x1 = torch.randn(batch, *case.shape)
    cond = torch.randint(0, COND_CLASSES, (batch,))
    grid = time_grid(steps)
    mask = window_mask(batch, steps, 0, None, True)
    kw = dict(cond=cond, law="flow-sde", noise_level=NOISE_LEVEL, stochastic=mask)
    ref = sample(model, x1, grid, generator=torch.Generator().manual_seed(3), **kw)
    new = sample_proposed(model, x1, grid, generator=torch.Generator().manual_seed(3), **kw)
    pairs = new.trained_pairs()
    with torch.no_grad():
        lp_new = pair_log_probs_proposed(model, new, pairs)[0]
        lp_cur = pair_log_probs(model, ref, pairs)[0]
    i, j = pairs[:, 0], pairs[:, 1]
    return {
        "max_abs_diff_states_vs_sample": float((ref.states - new.states).abs().max()),
        "max_abs_diff_log_probs_vs_sample": float((ref.log_probs - new.log_probs).abs().max()),
        "proposed_on_policy_ratio_exactly_1": bool(torch.equal(lp_new, new.log_probs[i, j])),
        "current_on_policy_ratio_exactly_1": bool(torch.equal(lp_cur, ref.log_probs[i, j])),
    }


# ----------------------------------------------------------------------------- measurements
def per_step_overhead(shape, batch: int, steps: int, repeats: int, budget: float) -> dict:
    """Microseconds per step spent outside the velocity (v = x costs nothing)."""
    free = lambda x, t, c: x  # noqa: E731
    x1 = torch.randn(batch, *shape)
    grid = time_grid(steps)
    ts = [grid[j].expand(batch) for j in range(steps)]
    dts = [grid[j + 1] - grid[j] for j in range(steps)]
    coeffs = sde_coefficients(grid, NOISE_LEVEL)
    g = torch.Generator().manual_seed(0)
    fns = {
        "bare_ode": lambda: bare_ode(free, x1, ts, dts, None),
        "sample": lambda: sample(free, x1, grid, law="flow-sde", noise_level=NOISE_LEVEL, generator=g),
        "sample_proposed": lambda: sample_proposed(free, x1, grid, law="flow-sde", noise_level=NOISE_LEVEL, generator=g),
        "minimal_sde": lambda: minimal_sde(free, x1, ts, coeffs, None, g),
        "randn_only": lambda: [torch.randn(x1.shape, generator=g) for _ in range(steps)],
    }
    times, _ = interleaved(fns, repeats, 5, budget)
    return {k: statistics.median(v) / steps * 1e6 for k, v in times.items()}


def model_ratios(case, batch: int, steps: int, repeats: int, budget: float) -> dict:
    torch.manual_seed(0)
    model = case.build().eval()
    x1 = torch.randn(batch, *case.shape)
    cond = torch.randint(0, COND_CLASSES, (batch,))
    grid = time_grid(steps)
    ts = [grid[j].expand(batch) for j in range(steps)]
    dts = [grid[j + 1] - grid[j] for j in range(steps)]
    g = torch.Generator().manual_seed(2)
    kw = dict(cond=cond, law="flow-sde", noise_level=NOISE_LEVEL, generator=g)
    sampling = summarise(interleaved({
        "bare_ode": lambda: bare_ode(model, x1, ts, dts, cond),
        "sample": lambda: sample(model, x1, grid, **kw),
        "sample_proposed": lambda: sample_proposed(model, x1, grid, **kw),
    }, repeats, 2, budget), "bare_ode")

    cfg = TrainConfig()
    model.train()
    policy = FlowPolicy(model)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    mask = window_mask(batch, steps, 0, None, True)
    rollout = sample_proposed(model, x1, grid, cond=cond, law="flow-sde", noise_level=NOISE_LEVEL, stochastic=mask,
                              generator=torch.Generator().manual_seed(4))
    pairs = rollout.trained_pairs()
    pairs = pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(5))]
    adv = torch.randn(batch)
    rows = len(pairs)
    px, pt, pc = torch.randn(rows, *case.shape), rollout.timesteps[pairs[:, 1]], cond[pairs[:, 0]]
    target = torch.randn(rows, *case.shape)

    def update(loss_fn):
        def run():
            loss, info = loss_fn(policy, rollout, pairs, adv, cfg)
            total = loss.sum() / rows
            if not torch.isfinite(total):
                raise RuntimeError("non-finite loss")
            total.backward()
            _ = [float(total.detach())] + [info[k].detach().cpu() for k in ("ratio", "clipped", "approx_kl")]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise RuntimeError("non-finite gradient")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def plain():
        loss = ((model(px, pt, pc).float() - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    training = summarise(interleaved({"plain": plain, "rl_update": update(pair_losses),
                                      "rl_update_proposed": update(pair_losses_proposed)}, repeats, 2, budget), "plain")
    training["rows"] = rows
    return {"sampling": sampling, "training": training}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--cases", nargs="+", default=["toy-mlp", "mlp-d64"], choices=list(CASES))
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per measurement")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine()

    checks = {f"{c}/B={b}": check_prototype(CASES[c], b, args.steps) for c in args.cases for b in args.batches}
    overhead = []
    for name in CASES:
        for b in args.batches:
            us = per_step_overhead(CASES[name].shape, b, args.steps, max(args.repeats, 50), args.budget / 2)
            overhead.append({"shape": [b, *CASES[name].shape], "us_per_step": us})
    ratios = []
    for name in args.cases:
        for b in args.batches:
            ratios.append({"case": name, "shape": [b, *CASES[name].shape],
                           **model_ratios(CASES[name], b, args.steps, args.repeats, args.budget)})
    info["loadavg_end"] = os.getloadavg()

    lines = ["Per-step time outside the velocity (v = x), microseconds:", "",
             "| x shape | bare ODE | sample (current) | sample (prototype) | minimal SDE + log-prob | randn alone |",
             "|---|---:|---:|---:|---:|---:|"]
    for o in overhead:
        u = o["us_per_step"]
        lines.append(f"| {o['shape']} | {u['bare_ode']:.0f} | {u['sample']:.0f} | {u['sample_proposed']:.0f} | "
                     f"{u['minimal_sde']:.0f} | {u['randn_only']:.0f} |")
    lines += ["", "Ratios with a model (current vs prototype):", "",
              "| model | x shape | sample / bare | prototype / bare | RL / plain | prototype RL / plain |",
              "|---|---|---:|---:|---:|---:|"]
    for r in ratios:
        s, t = r["sampling"]["ratio"], r["training"]["ratio"]
        lines.append(f"| {r['case']} | {r['shape']} | {s['sample']:.3f} | {s['sample_proposed']:.3f} | "
                     f"{t['rl_update']:.3f} | {t['rl_update_proposed']:.3f} |")
    lines += ["", "Checks: " + json.dumps(checks)]
    table = "\n".join(lines)
    print(table)
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args), "machine": info,
           "wall_s": time.perf_counter() - started, "checks": checks, "per_step_overhead": overhead,
           "ratios": ratios, "table": table}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
