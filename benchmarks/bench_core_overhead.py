"""Overhead of flowcoach's RL machinery over the bare model (the core issue's speed aims).

Two measurements per (model, batch size):

1. Sampling. ``flowcoach.core.sampling.sampler.sample`` (flow-sde, noise level 0.7, every step
   stochastic, Gaussian log-prob of every transition kept) against a bare Euler ODE loop
   ``x = x + model(x, t_j, cond) * dt_j`` of the same model over the same 10-step grid under
   ``torch.no_grad``. Aim: ratio <= 1.05. Also timed, to show where the difference comes from: a
   hand-written minimal SDE sampler with the same law and log-probs (per-step coefficients computed
   once, log-prob taken from the drawn noise) -- the cost of noise plus log-probs that no sampler
   can avoid -- and the check that it reproduces ``sample``'s states and log-probs.

2. Training update. What the trainer does for one optimizer step when one micro-batch holds every
   trained (sample, step) pair of a rollout: ``pair_losses`` (velocity, law mean, Gaussian
   log-prob, clipped ratio), ``loss.sum() / N``, the finite check, backward, gradient clipping
   (``max_grad_norm`` of the default config), AdamW step, zero_grad, plus the per-step stats the
   trainer pulls out -- against a plain forward + MSE + backward + AdamW step of the same model on
   the same number of rows (random inputs of the same shape, the same t and cond). Aim: ratio
   <= 1.15. The plain step is also timed with gradient clipping, to separate the clipping (a
   training choice) from the loss machinery.

Measurements are interleaved (A B, then B A, ...) after a warm-up and summarised by the median over
repeats, so slow drift or a busy neighbour hits both sides alike. Results: a markdown table on
stdout and a JSON file (``--out``).

    python benchmarks/bench_core_overhead.py --threads 2 --out benchmarks/results/core_overhead.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from flowcoach.core.config import TrainConfig
from flowcoach.core.nets.mlp import MLPVelocity
from flowcoach.core.nets.transformer import SetTransformerVelocity
from flowcoach.core.nets.unet1d import UNet1DVelocity
from flowcoach.core.policy import FlowPolicy
from flowcoach.core.sampling.laws import LOG_SQRT_2PI, flow_sde_sigma
from flowcoach.core.sampling.sampler import sample, time_grid, window_mask
from flowcoach.core.trainer import pair_losses

NOISE_LEVEL = 0.7
COND_CLASSES = 8


@dataclass
class Case:
    name: str
    shape: tuple[int, ...]
    build: Callable[[], torch.nn.Module]
    note: str


CASES = {
    "toy-mlp": Case("toy-mlp", (2,), lambda: MLPVelocity(2, width=64, depth=3, cond_classes=COND_CLASSES),
                    "MLPVelocity(2, width=64, depth=3): the toy domain's model"),
    "mlp-d64": Case("mlp-d64", (64,), lambda: MLPVelocity(64, width=256, depth=4, cond_classes=COND_CLASSES),
                    "MLPVelocity(64, width=256, depth=4)"),
    "unet1d": Case("unet1d", (8, 64), lambda: UNet1DVelocity(8, width=32, cond_classes=COND_CLASSES),
                   "UNet1DVelocity(8, width=32) on [B, 8, 64]"),
    "set-transformer": Case("set-transformer", (16, 8),
                            lambda: SetTransformerVelocity(8, width=64, depth=2, heads=4, cond_classes=COND_CLASSES),
                            "SetTransformerVelocity(8, width=64, depth=2, heads=4) on [B, 16, 8]"),
}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, budget_s: float) -> dict:
    """Run every fn ``warmup`` times, then ``repeats`` rounds (order reversed every other round).

    Stops early (after at least 3 rounds) when ``budget_s`` is spent. Returns per-fn lists of
    wall-clock seconds and of process CPU seconds (all threads).
    """
    names = list(fns)
    gc.collect()
    gc.disable()  # a collection inside one side's timing would land on that side only
    try:
        return _interleaved(fns, names, repeats, warmup, budget_s)
    finally:
        gc.enable()


def _interleaved(fns, names, repeats, warmup, budget_s):
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times, cpu


def summarise(measured: tuple[dict, dict], base: str) -> dict:
    """Medians and ratios to ``base``: wall-clock (the headline) and process CPU time (less hit by neighbours)."""
    times, cpu = measured
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    others = [k for k in times if k != base]
    return {
        "repeats": len(times[base]),
        "median_s": med,
        "ratio": {k: med[k] / med[base] for k in others},
        # the median of per-round ratios (each round times the sides back to back): a second estimate
        "paired_ratio": {k: statistics.median(a / b for a, b in zip(times[k], times[base])) for k in others},
        "cpu_median_s": cpu_med,
        "cpu_ratio": {k: cpu_med[k] / cpu_med[base] for k in others},
        "min_s": {k: min(v) for k, v in times.items()},
    }


# ----------------------------------------------------------------------------- 1. sampling
def bare_ode(model, x, ts, dts, cond):
    with torch.no_grad():
        for t, dt in zip(ts, dts):
            x = x + model(x, t, cond) * dt
    return x


def sde_coefficients(grid: torch.Tensor, noise_level: float):
    """Per-step scalars of flow-sde: mean = a x + b v, std s (the grid is shared by the batch)."""
    coeffs = []
    for j in range(len(grid) - 1):
        t, tn = grid[j], grid[j + 1]
        sigma = flow_sde_sigma(t, tn, noise_level)
        dt = tn - t
        c = sigma**2 / (2 * t)
        coeffs.append((float(1 + c * dt), float((1 + c * (1 - t)) * dt), float(sigma * torch.sqrt(t - tn))))
    return coeffs


def minimal_sde(model, x, ts, coeffs, cond, generator):
    """The floor: flow-sde steps with their log-probs, nothing else. Returns (x, log_probs [B, T])."""
    batch = x.shape[0]
    log_probs = torch.empty(batch, len(coeffs))
    dims = tuple(range(1, x.dim()))
    with torch.no_grad():
        for j, (t, (a, b, s)) in enumerate(zip(ts, coeffs)):
            v = model(x, t, cond)
            noise = torch.randn(x.shape, generator=generator)
            x = torch.add(x * a, v, alpha=b).add_(noise, alpha=s)
            # (x_next - mean) / std is the drawn noise: log N = -noise^2 / 2 - log std - log sqrt(2 pi)
            log_probs[:, j] = noise.square().mean(dims).mul_(-0.5).sub_(math.log(s) + LOG_SQRT_2PI)
    return x, log_probs


def bench_sampling(case: Case, batch: int, steps: int, repeats: int, warmup: int, budget_s: float) -> dict:
    torch.manual_seed(0)
    model = case.build().eval()
    x1 = torch.randn(batch, *case.shape)
    cond = torch.randint(0, COND_CLASSES, (batch,))
    grid = time_grid(steps)
    ts = [grid[j].expand(batch) for j in range(steps)]
    dts = [grid[j + 1] - grid[j] for j in range(steps)]
    coeffs = sde_coefficients(grid, NOISE_LEVEL)

    # correctness of the floor: same generator seed -> same trajectory and log-probs as sample()
    ref = sample(model, x1, grid, cond=cond, law="flow-sde", noise_level=NOISE_LEVEL,
                 generator=torch.Generator().manual_seed(1))
    x_min, lp_min = minimal_sde(model, x1, ts, coeffs, cond, torch.Generator().manual_seed(1))
    check = {"max_abs_diff_sample": float((ref.samples - x_min).abs().max()),
             "max_abs_diff_log_prob": float((ref.log_probs - lp_min).abs().max())}

    g = torch.Generator().manual_seed(2)
    fns = {
        "bare_ode": lambda: bare_ode(model, x1, ts, dts, cond),
        "sample": lambda: sample(model, x1, grid, cond=cond, law="flow-sde", noise_level=NOISE_LEVEL, generator=g),
        "minimal_sde": lambda: minimal_sde(model, x1, ts, coeffs, cond, g),
    }
    res = summarise(interleaved(fns, repeats, warmup, budget_s), "bare_ode")
    res["floor_check"] = check
    return res


# ----------------------------------------------------------------------------- 2. training update
def bench_training(case: Case, batch: int, steps: int, repeats: int, warmup: int, budget_s: float) -> dict:
    torch.manual_seed(0)
    cfg = TrainConfig()
    cfg.sampler.num_steps = steps
    model = case.build()
    policy = FlowPolicy(model, need_reference=cfg.loss.kl_beta > 0, ema_decay=cfg.optim.ema_decay)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)

    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch, *case.shape, generator=g)
    group_size = cfg.group_size
    group_ids = torch.arange(batch) // group_size
    cond = torch.randint(0, COND_CLASSES, (batch // group_size,), generator=g).repeat_interleave(group_size)
    mask = window_mask(batch, steps, cfg.sampler.sde_window_size, cfg.sampler.sde_window_range,
                       cfg.sampler.deterministic_last_step, g)
    rollout = sample(model, x1, time_grid(steps, cfg.sampler.shift), cond=cond, law=cfg.sampler.law,
                     noise_level=cfg.sampler.noise_level, stochastic=mask, group_ids=group_ids, generator=g,
                     reduction=cfg.sampler.logprob_reduction)
    pairs = rollout.trained_pairs()
    pairs = pairs[torch.randperm(len(pairs), generator=g)]  # the trainer shuffles the pairs
    advantages = torch.randn(batch, generator=g).clamp(-cfg.loss.adv_clip, cfg.loss.adv_clip)
    rows = len(pairs)

    # the plain step sees inputs of the same shape, the same t and the same cond
    plain_x = torch.randn(rows, *case.shape, generator=g)
    plain_target = torch.randn(rows, *case.shape, generator=g)
    plain_t = rollout.timesteps[pairs[:, 1]]
    plain_cond = cond[pairs[:, 0]]

    def rl_update():
        loss, info = pair_losses(policy, rollout, pairs, advantages, cfg)
        total = loss.sum() / rows
        if not torch.isfinite(total):
            raise RuntimeError("non-finite loss")
        total.backward()
        stats = [float(total.detach())] + [info[k].detach().cpu() for k in ("ratio", "clipped", "approx_kl") if k in info]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)  # the default config clips
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            raise RuntimeError("non-finite gradient")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        policy.ema_step()
        return stats, float(grad_norm)

    def plain_update(clip: bool):
        def run():
            v = model(plain_x, plain_t, plain_cond)
            loss = ((v.float() - plain_target) ** 2).mean()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    fns = {"plain": plain_update(False), "rl_update": rl_update, "plain_clip": plain_update(True)}
    res = summarise(interleaved(fns, repeats, warmup, budget_s), "plain")
    res["rows"] = rows
    return res


# ----------------------------------------------------------------------------- main
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": "cpu",
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=25, help="timed rounds per measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of the time grid")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="rollout batch sizes (samples)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--budget", type=float, default=15.0,
                   help="seconds of timed rounds per measurement; stops early (>= 3 rounds) past it")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine()
    results = []
    for name in args.cases:
        case = CASES[name]
        for batch in args.batches:
            s = bench_sampling(case, batch, args.steps, args.repeats, args.warmup, args.budget)
            t = bench_training(case, batch, args.steps, args.repeats, args.warmup, args.budget)
            row = {"case": name, "model": case.note, "params": num_params(case.build()), "shape": [batch, *case.shape],
                   "sampling": s, "training": t}
            results.append(row)
            print(f"# {name} B={batch}: sample/bare {s['ratio']['sample']:.3f} ({s['repeats']} rounds), "
                  f"rl/plain {t['ratio']['rl_update']:.3f} ({t['repeats']} rounds)", file=sys.stderr, flush=True)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    wall = time.perf_counter() - started

    lines = [
        f"torch {info['torch']}, {info['threads']} thread(s), {info['cpu']}, {args.steps} steps, "
        f"flow-sde a={NOISE_LEVEL}, load average {info['loadavg'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, {wall:.0f} s",
        "",
        "| model | x shape | bare ODE ms | sample ms | **sample / bare** (aim <= 1.05) | minimal SDE / bare |"
        " train rows | plain step ms | RL step ms | **RL / plain** (aim <= 1.15) | RL / plain+clip |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, t = r["sampling"], r["training"]
        lines.append(
            f"| {r['case']} | {r['shape']} | {fmt_ms(s['median_s']['bare_ode'])} | {fmt_ms(s['median_s']['sample'])} | "
            f"**{s['ratio']['sample']:.3f}** | {s['ratio']['minimal_sde']:.3f} | {t['rows']} | "
            f"{fmt_ms(t['median_s']['plain'])} | {fmt_ms(t['median_s']['rl_update'])} | **{t['ratio']['rl_update']:.3f}** | "
            f"{t['median_s']['rl_update'] / t['median_s']['plain_clip']:.3f} |")
    table = "\n".join(lines)
    print(table)

    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args), "machine": info,
           "wall_s": wall, "results": results, "table": table}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
