"""The trainer: one linear loop, run under accelerate.

step: rollout (groups of G per condition) -> rewards -> advantages -> inner epochs over
minibatches of (sample, trained step) pairs -> optimizer steps -> EMA -> log -> checkpoint.

Randomness of step k comes from generators seeded by (seed, k) and, for a group's noise, by the
group too, so a resumed run draws exactly what an uninterrupted one would, and the samples do not
depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from flowcoach.core.checkpoint import list_checkpoints, load_base, load_checkpoint, save_checkpoint
from flowcoach.core.config import TrainConfig, load_yaml, save_yaml
from flowcoach.core.domain import Domain, get_domain
from flowcoach.core.losses import clipped_ratio_loss, kl_to_reference
from flowcoach.core.policy import FlowPolicy, unwrap
from flowcoach.core.registry import ADVANTAGES, ALGORITHMS, NOISE_LAWS, FlowcoachError, normalize_name
from flowcoach.core.sampling.laws import law_mean_std
from flowcoach.core.sampling.rollout import Rollout, cond_to, index_cond
from flowcoach.core.sampling.sampler import pair_log_probs, sample, time_grid, window_mask


# ----------------------------------------------------------------------------- batch arithmetic
@dataclass
class BatchPlan:
    world_size: int
    groups_per_process: int
    samples_per_process: int
    trained_steps_per_sample: int
    pairs_per_process: int
    pairs_per_optimizer_step: int
    grad_accumulation: int
    optimizer_steps_per_rl_step: int
    chunks_per_sample: int = 1

    def table(self, cfg: TrainConfig) -> str:
        return "\n".join([
            "batch arithmetic:",
            f"  {cfg.groups_per_step} groups/step x G={cfg.group_size} = {cfg.groups_per_step * cfg.group_size} samples/step"
            f" over {self.world_size} process(es) -> {self.samples_per_process} samples/process",
            f"  {self.trained_steps_per_sample} trained denoising steps/sample -> {self.pairs_per_process} (sample, step) pairs/process"
            if self.chunks_per_sample == 1 else
            f"  {self.trained_steps_per_sample} trained denoising steps/chunk x up to {self.chunks_per_sample} chunks/episode"
            f" -> up to {self.pairs_per_process} (chunk, step) pairs/process",
            f"  {cfg.inner_epochs} inner epoch(s) x {cfg.optimizer_steps_per_epoch} optimizer step(s)/epoch"
            f" = {self.optimizer_steps_per_rl_step} optimizer steps per RL step",
            f"  {self.pairs_per_optimizer_step} pairs/optimizer step/process in micro-batches of {cfg.micro_batch}"
            f" -> gradient accumulation {self.grad_accumulation}",
        ])


def trained_steps_per_sample(cfg: TrainConfig) -> int:
    if cfg.sampler.law == "ode" or cfg.sampler.noise_level == 0:
        return 0
    if cfg.sampler.sde_window_size > 0:
        return cfg.sampler.sde_window_size
    return cfg.sampler.num_steps - (1 if cfg.sampler.deterministic_last_step else 0)


def plan_batches(cfg: TrainConfig, world_size: int, chunks_per_sample: int = 1) -> BatchPlan:
    """Derive per-process sizes from the global recipe; one-line errors when it does not fit.

    For interact domains a sample is an episode of up to ``chunks_per_sample`` chunks; the pair
    counts are then upper bounds (episodes may end early).
    """
    if cfg.group_size < 2:
        raise FlowcoachError(f"group_size must be >= 2 (a group is its own baseline), got {cfg.group_size}")
    if cfg.groups_per_step < 1:
        raise FlowcoachError(f"groups_per_step must be >= 1, got {cfg.groups_per_step}")
    if cfg.groups_per_step % world_size:
        raise FlowcoachError(
            f"groups_per_step={cfg.groups_per_step} does not split over {world_size} processes; use a multiple of {world_size}"
        )
    for name in ("inner_epochs", "optimizer_steps_per_epoch", "micro_batch", "steps"):
        if getattr(cfg, name) < 1:
            raise FlowcoachError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.sampler.noise_level < 0:
        raise FlowcoachError(f"sampler.noise_level must be >= 0, got {cfg.sampler.noise_level}")
    trained = trained_steps_per_sample(cfg)
    if trained < 1:
        raise FlowcoachError("no stochastic step to train: set sampler.noise_level > 0 and a law other than 'ode'")
    groups = cfg.groups_per_step // world_size
    samples = groups * cfg.group_size
    pairs = samples * trained * chunks_per_sample
    if cfg.optimizer_steps_per_epoch > pairs:
        raise FlowcoachError(
            f"optimizer_steps_per_epoch={cfg.optimizer_steps_per_epoch} exceeds the {pairs} (sample, step) pairs per process"
        )
    per_opt = math.ceil(pairs / cfg.optimizer_steps_per_epoch)
    return BatchPlan(world_size, groups, samples, trained, pairs, per_opt, math.ceil(per_opt / cfg.micro_batch),
                     cfg.inner_epochs * cfg.optimizer_steps_per_epoch, chunks_per_sample)


def validate(cfg: TrainConfig) -> None:
    """Check names before any work starts, listing the valid choices."""
    ALGORITHMS.get(cfg.algo)
    NOISE_LAWS.get(cfg.sampler.law)
    ADVANTAGES.get(cfg.loss.advantage)
    if cfg.sampler.num_steps < 1 or cfg.sampler.eval_num_steps < 1:
        raise FlowcoachError("sampler.num_steps and sampler.eval_num_steps must be >= 1")


def step_generator(seed: int, step: int, process: int = 0, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + process) * 7 + stream)


# ----------------------------------------------------------------------------- rollout + update
def repeat_cond(cond, times: int):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: repeat_cond(v, times) for k, v in cond.items()}
    return cond.repeat_interleave(times, dim=0)


def group_noise(cfg: TrainConfig, sample_shape: tuple[int, ...], groups: torch.Tensor, step: int):
    """Initial noise [B, ...] and step noise [B, T, ...] for the samples of ``groups`` (G each).

    Each group draws from its own generator, so a group's samples are the same whatever the number
    of processes it is spread over.
    """
    x1, noise = [], []
    for gid in groups.tolist():
        g = step_generator(cfg.seed, step, stream=10_000 + gid)
        n = 1 if cfg.sampler.same_noise_in_group else cfg.group_size
        x1.append(torch.randn(n, *sample_shape, generator=g).expand(cfg.group_size, *sample_shape))
        noise.append(torch.randn(cfg.group_size, cfg.sampler.num_steps, *sample_shape, generator=g))
    return torch.cat(x1), torch.cat(noise)


def collect_rollout(policy: FlowPolicy, domain: Domain, cfg: TrainConfig, step: int, device,
                    world_size: int = 1, rank: int = 0) -> Rollout:
    """This process's share of step ``step``'s groups: conditions, noise and window are drawn from
    generators of the step (and group), never of the process."""
    s = cfg.sampler
    g = step_generator(cfg.seed, step)
    all_cond = domain.train_conditions(cfg.groups_per_step, g)
    mask = window_mask(1, s.num_steps, s.sde_window_size, s.sde_window_range, s.deterministic_last_step, g)
    per_process = cfg.groups_per_step // world_size
    groups = torch.arange(rank * per_process, (rank + 1) * per_process)
    cond = repeat_cond(index_cond(all_cond, groups), cfg.group_size)
    group_ids = groups.repeat_interleave(cfg.group_size)
    x1, noise = group_noise(cfg, tuple(domain.sample_shape), groups, step)
    return sample(unwrap(policy.model), x1.to(device), time_grid(s.num_steps, s.shift), cond=cond_to(cond, device),
                  law=s.law, noise_level=s.noise_level, stochastic=mask.expand(len(group_ids), -1),
                  group_ids=group_ids, reduction=s.logprob_reduction, ode_solver=s.ode_solver, noise=noise)


def pair_losses(policy: FlowPolicy, rollout: Rollout, pairs: torch.Tensor, advantages: torch.Tensor,
                cfg: TrainConfig, old_log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-pair loss [N] (policy + beta KL) for (sample, step) pairs, with diagnostics.

    old_log_probs [B, T] defaults to the rollout's own.
    """
    i, j = pairs[:, 0], pairs[:, 1]
    log_prob, mean, std = pair_log_probs(policy.velocity, rollout, pairs)
    old = (rollout.log_probs if old_log_probs is None else old_log_probs)[i, j]
    clip_low, clip_high = cfg.resolved_clip()
    loss, info = clipped_ratio_loss(log_prob, old, advantages[i].to(log_prob.device), clip_low, clip_high)
    if cfg.loss.kl_beta > 0:
        x, t, t_next, cond = rollout.states[i, j], rollout.timesteps[j], rollout.timesteps[j + 1], index_cond(rollout.cond, i)
        ref_mean, _ = law_mean_std(rollout.law, x, policy.reference_velocity(x, t, cond).float(), t, t_next,
                                   rollout.noise_level)
        kl = kl_to_reference(mean, ref_mean, std, t_next - t, rollout.reduction, cfg.loss.kl_with_dt)
        loss = loss + cfg.loss.kl_beta * kl
        info["kl"] = kl.detach()
    return loss, info


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(model, domain: Domain, cond, num_steps: int, shift: float = 1.0, seed: int = 0,
             solver: str = "euler", device="cpu") -> torch.Tensor:
    """Deterministic ODE samples for the given conditions (the evaluation sampler)."""
    n = cond.shape[0] if isinstance(cond, torch.Tensor) else len(next(iter(cond.values())))
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn((n, *domain.sample_shape), generator=g).to(device)
    rollout = sample(unwrap(model), x1, time_grid(num_steps, shift), cond=cond_to(cond, device), law="ode",
                     noise_level=0.0, ode_solver=solver)
    return rollout.samples


def write_eval_report(out: Path, metrics: dict, title: str, details: str) -> None:
    """eval/metrics.json and a Markdown report.md of the held-out metrics."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = [f"# {title}", "", details, "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def evaluate_model(model, domain: Domain, num_samples: int, num_steps: int, shift: float = 1.0,
                   rewards: dict | None = None, seed: int = 12345, device="cpu",
                   render: int = 0) -> tuple[dict, list, torch.Tensor]:
    """Held-out evaluator metrics plus the training reward on eval conditions, with ODE samples.

    Interact domains: ``render`` episodes are replayed with frames for the saved video.
    """
    from flowcoach.rewards import build_reward

    cond = domain.eval_conditions(num_samples)
    reward_fn = build_reward(rewards or domain.default_rewards())
    extra = {}
    if domain.kind == "interact":
        from flowcoach.core.interact import evaluate_episodes

        objects = evaluate_episodes(unwrap(model), domain, cond, num_steps, shift, split=domain.eval_splits[0], device=device)
        for split in domain.eval_splits[1:]:  # e.g. out-of-distribution placements
            episodes = evaluate_episodes(unwrap(model), domain, cond, num_steps, shift, split=split, device=device)
            extra.update({f"{split}/{k}": float(v) for k, v in domain.evaluate(episodes, cond).items()})
        extra["denoising_steps_per_action"] = num_steps / domain.chunk_size
        if render:  # a few deterministic episodes again, with frames, for the saved video
            try:
                shown = evaluate_episodes(unwrap(model), domain, cond[:render], num_steps, shift,
                                          split=domain.eval_splits[0], render=True, device=device)
                objects = shown + objects[render:]
            except Exception as e:  # noqa: BLE001 - no renderer (no EGL/OSMesa) must not end a run
                print(f"warning: rendering failed ({type(e).__name__}: {e}); no rollout video")
    else:
        x = generate(model, domain, cond, num_steps, shift, seed, device=device)
        objects = domain.decode(x.cpu())
    metrics = {k: float(v) for k, v in domain.evaluate(objects, cond).items()}
    metrics.update(extra)
    scores, _ = reward_fn(objects, cond)
    metrics["reward_mean"] = float(scores[torch.isfinite(scores)].mean()) if torch.isfinite(scores).any() else float("nan")
    return metrics, objects, scores


# ----------------------------------------------------------------------------- run directory
def run_root_name(cfg: TrainConfig, domain_name: str) -> str:
    return f"{domain_name}__{normalize_name(cfg.algo)}__{cfg.seed}"


def find_resume_dir(cfg: TrainConfig, domain_name: str) -> Path:
    if cfg.resume == "latest":
        candidates = sorted(p for p in Path(cfg.output_dir).glob(run_root_name(cfg, domain_name) + "__*")
                            if list_checkpoints(p))
        if not candidates:
            raise FlowcoachError(
                f"--resume latest: no run of {run_root_name(cfg, domain_name)} with a checkpoint under '{cfg.output_dir}'"
            )
        return candidates[-1]
    path = Path(cfg.resume)
    if (path / "state.json").exists():  # a checkpoint folder
        return path.parent.parent
    if not (path / "config.yaml").exists():
        raise FlowcoachError(f"--resume '{cfg.resume}' is neither 'latest', a run folder nor a checkpoint folder")
    return path


class MetricsLog:
    """metrics.jsonl (one object per step) and TensorBoard, on the main process."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop steps logged after the checkpoint: they are redone
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, domain: Domain | None = None, console=None) -> Path:
    """Run RL on a domain; returns the run folder."""
    from accelerate import Accelerator

    from flowcoach.rewards import build_reward, parse_reward_spec

    domain = domain or get_domain(cfg.domain)
    validate(cfg)
    resume_dir = find_resume_dir(cfg, domain.name) if cfg.resume else None
    if resume_dir is not None:  # the run's own config wins, except for how long to run
        steps, resume = cfg.steps, cfg.resume
        cfg = load_yaml(TrainConfig, resume_dir / "config.yaml")
        cfg.steps, cfg.resume = steps, resume

    accelerator = Accelerator(cpu=cfg.device == "cpu")
    plan = plan_batches(cfg, accelerator.num_processes, getattr(domain, "max_chunks", 1) if domain.kind == "interact" else 1)
    reward_spec = parse_reward_spec(cfg.rewards) if cfg.rewards else domain.default_rewards()
    reward_fn = build_reward(reward_spec)
    say = (console.print if console is not None else print) if accelerator.is_main_process else (lambda *a, **k: None)

    model, base_record = load_base(domain, cfg.base)
    policy = FlowPolicy(model, need_reference=cfg.loss.kl_beta > 0, ema_decay=cfg.optim.ema_decay)
    params = policy.trainable_parameters()
    if not params:
        raise FlowcoachError("the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    policy.model, optimizer = accelerator.prepare(model, optimizer)
    if policy.ref_model is not None:
        policy.ref_model.to(accelerator.device)

    start = 0
    if resume_dir is not None:
        run_dir = resume_dir
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise FlowcoachError(f"run '{run_dir}' has no complete checkpoint to resume from")
        ckpt = Path(cfg.resume) if (Path(cfg.resume) / "state.json").exists() else checkpoints[-1]
        start = load_checkpoint(ckpt, unwrap(policy.model), optimizer, policy.ema)["step"]
        say(f"resuming {run_dir} from {ckpt.name} (step {start})")
        if accelerator.is_main_process:  # the run's config now says how far it is meant to go
            save_yaml(cfg, run_dir / "config.yaml")
    else:
        from accelerate.utils import broadcast_object_list

        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every process must name the same folder
        run_dir = Path(cfg.output_dir) / f"{run_root_name(cfg, domain.name)}__{stamp[0]}"
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=False)
            save_yaml(cfg, run_dir / "config.yaml")
    say(plan.table(cfg))
    say(f"run folder: {run_dir}")
    log = MetricsLog(run_dir, accelerator.is_main_process, cfg.tensorboard, start)
    rank = accelerator.process_index

    progress = _progress(console, accelerator.is_main_process)
    task = progress.add_task(f"{domain.name} {cfg.algo}", total=cfg.steps, completed=start) if progress else None
    if progress:
        progress.start()
    try:
        for step in range(start, cfg.steps):
            metrics = rl_step(policy, optimizer, accelerator, domain, cfg, plan, reward_fn, step, rank, run_dir)
            last = step + 1 == cfg.steps
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0) and not last:
                metrics.update(_evaluate(policy, domain, cfg, reward_spec, accelerator, run_dir, step + 1, save=False))
            if last:
                metrics.update(_evaluate(policy, domain, cfg, reward_spec, accelerator, run_dir, step + 1, save=True))
            log.log(step + 1, metrics)
            if accelerator.is_main_process and (last or (step + 1) % cfg.checkpoint_every == 0):
                save_checkpoint(run_dir, step + 1, unwrap(policy.model), optimizer, policy.ema,
                                {"seed": cfg.seed, "domain": domain.name, "algo": cfg.algo}, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
            if progress:
                progress.update(task, advance=1, description=f"{domain.name} {cfg.algo} reward {metrics['reward/mean']:.3f}")
    finally:
        if progress:
            progress.stop()
        log.close()
    return run_dir


def _progress(console, main: bool):
    if not main:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def rl_step(policy, optimizer, accelerator, domain, cfg: TrainConfig, plan: BatchPlan, reward_fn, step: int,
            rank: int, run_dir: Path) -> dict:
    """One RL step; returns its metrics."""
    device = accelerator.device
    t0 = time.perf_counter()
    if domain.kind == "interact":  # objects are episodes; each chunk of an episode is a sample
        from flowcoach.core.interact import collect_episodes

        rollout, sample_owner, objects, cond_cpu = collect_episodes(policy, domain, cfg, step, device,
                                                                    plan.world_size, rank)
        rollout = rollout.to(device)
        object_groups = torch.arange(rank * plan.groups_per_process,
                                     (rank + 1) * plan.groups_per_process).repeat_interleave(cfg.group_size)
    else:
        rollout = collect_rollout(policy, domain, cfg, step, device, plan.world_size, rank)
        sample_owner, object_groups = None, rollout.group_ids.cpu()
        cond_cpu = cond_to(rollout.cond, "cpu")
        objects = domain.decode(rollout.samples.cpu())
    t1 = time.perf_counter()
    rewards, reward_info = reward_fn(objects, cond_cpu)
    components = reward_info.pop("components")
    t2 = time.perf_counter()

    all_rewards = accelerator.gather(rewards.to(device)).cpu()
    all_groups = accelerator.gather(object_groups.to(device)).cpu()
    all_components = accelerator.gather(components.to(device)).cpu()
    metrics = {"reward/mean": float(all_rewards[torch.isfinite(all_rewards)].mean()) if torch.isfinite(all_rewards).any() else float("nan"),
               "reward/std": float(all_rewards[torch.isfinite(all_rewards)].std()) if torch.isfinite(all_rewards).sum() > 1 else 0.0}
    for k, name in enumerate(reward_fn.names):
        metrics[f"reward/{name}"] = float(all_components[:, k].nanmean())
    for k, v in reward_info.items():
        if isinstance(v, (int, float)):
            metrics[f"reward/{k}"] = float(v)

    if cfg.sample_every and accelerator.is_main_process and (step + 1) % cfg.sample_every == 0:
        domain.save(objects, rewards, run_dir / "samples" / f"step-{step + 1}")

    bad = ~torch.isfinite(all_rewards)
    if bad.any():
        bad_idx = torch.nonzero(bad).flatten().tolist()
        print(f"warning: step {step + 1}: non-finite reward for samples {bad_idx[:10]}; step skipped")
        metrics.update({"skipped/nonfinite_reward": int(bad.sum()), "skipped/nonfinite_loss": 0,
                        "time/sample_s": t1 - t0, "time/reward_s": t2 - t1})
        return metrics

    adv_fn = ADVANTAGES.get(cfg.loss.advantage)
    if normalize_name(cfg.loss.advantage) == "per-reward":
        adv_all, keep_all, adv_info = adv_fn(all_components, reward_fn.weights, all_groups, cfg.loss.std_scope, cfg.loss.adv_clip)
    else:
        adv_all, keep_all, adv_info = adv_fn(all_rewards, all_groups, cfg.loss.std_scope, cfg.loss.adv_clip)
    metrics.update(adv_info)
    mine = slice(rank * plan.samples_per_process, (rank + 1) * plan.samples_per_process)
    advantages, keep = adv_all[mine], keep_all[mine]
    if sample_owner is not None:  # an episode's advantage goes to each of its chunks
        advantages, keep = advantages[sample_owner], keep[sample_owner]

    all_pairs = rollout.trained_pairs().cpu()
    pairs = all_pairs[keep[all_pairs[:, 0]]]
    stats = {"ratio": [], "clipped": [], "approx_kl": [], "kl": [], "grad_norm": [], "loss": []}
    skipped_nonfinite = 0
    old_log_probs = rollout.log_probs
    for epoch in range(cfg.inner_epochs):
        order = pairs[torch.randperm(len(pairs), generator=step_generator(cfg.seed, step, rank, stream=1 + epoch))]
        chunks = order.tensor_split(cfg.optimizer_steps_per_epoch)  # always the same count on every process
        if epoch == 0 and cfg.recompute_old_log_probs and len(order):
            old_log_probs = recompute_log_probs(policy, rollout, chunks, cfg.micro_batch, device)
        for chunk in chunks:
            grad_norm = optimizer_step_on(chunk, all_pairs[:1], policy, optimizer, accelerator, rollout, advantages,
                                          old_log_probs, cfg, stats)
            if grad_norm is None:
                continue
            if not math.isfinite(grad_norm):
                skipped_nonfinite += 1
                continue
            stats["grad_norm"].append(grad_norm)
    t3 = time.perf_counter()

    def cat_mean(values):
        return float(torch.cat(values).float().mean()) if values else 0.0

    metrics.update({
        "policy/ratio_mean": cat_mean(stats["ratio"]),
        "policy/ratio_std": float(torch.cat(stats["ratio"]).std()) if stats["ratio"] and len(torch.cat(stats["ratio"])) > 1 else 0.0,
        "policy/clipfrac": cat_mean(stats["clipped"]),
        "policy/approx_kl": cat_mean(stats["approx_kl"]),
        "policy/loss": sum(stats["loss"]) / max(len(stats["loss"]), 1),
        "grad_norm": sum(stats["grad_norm"]) / max(len(stats["grad_norm"]), 1),
        "train/pairs": len(pairs),
        "skipped/nonfinite_loss": skipped_nonfinite,
        "skipped/nonfinite_reward": 0,
        "time/sample_s": t1 - t0, "time/reward_s": t2 - t1, "time/train_s": t3 - t2,
    })
    if stats["kl"]:
        metrics["kl/ref"] = cat_mean(stats["kl"])
    return metrics


def optimizer_step_on(chunk, filler, policy, optimizer, accelerator, rollout, advantages, old_log_probs,
                      cfg: TrainConfig, stats: dict) -> float | None:
    """One optimizer step over the pairs of ``chunk`` (micro-batched, gradients accumulated).

    The loss is the mean over the chunk's pairs on all processes together, so the update is the
    same for any number of processes. A process with no pair still runs one zero-weighted forward
    (of ``filler``) so DDP's collectives stay in step. Returns the gradient norm, nan when a
    non-finite loss or gradient made every process skip the step, or None when no process had a pair.
    """
    device = accelerator.device
    n_global = int(accelerator.reduce(torch.tensor([len(chunk)], device=device), "sum").item())
    if n_global == 0:
        return None
    scale = accelerator.num_processes / n_global  # DDP averages over processes
    micro_batches = list(chunk.split(cfg.micro_batch)) if len(chunk) else [filler]
    finite = True
    for m, micro in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        with _null() if last else accelerator.no_sync(policy.model):
            loss, info = pair_losses(policy, rollout, micro.to(device), advantages, cfg, old_log_probs)
            weight = 0.0 if len(chunk) == 0 else scale
            total = loss.sum() * weight
            if not torch.isfinite(total):
                finite = False
                total = loss.nan_to_num(0.0).sum() * 0.0  # keep the collectives in step, add nothing
            accelerator.backward(total)
        if len(chunk):
            stats["loss"].append(float(loss.detach().mean()))
            for k in ("ratio", "clipped", "approx_kl", "kl"):
                if k in info:
                    stats[k].append(info[k].detach().cpu())
    all_finite = accelerator.reduce(torch.tensor([float(finite)], device=device), "sum").item() == accelerator.num_processes
    params = policy.trainable_parameters()
    if all_finite and cfg.optim.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm))
    elif all_finite:
        grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
    else:
        grad_norm = float("nan")
    if math.isfinite(grad_norm):
        optimizer.step()
        policy.ema_step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def recompute_log_probs(policy, rollout: Rollout, chunks, micro_batch: int, device) -> torch.Tensor:
    """Old log-probs [B, T] computed in the training's own micro-batches, so the first update's ratio
    is exactly 1 even where the model is not batch-invariant (the rollout evaluated other batches)."""
    old = rollout.log_probs.clone()
    for chunk in chunks:
        for micro in chunk.split(micro_batch):
            micro = micro.to(device)
            old[micro[:, 0], micro[:, 1]] = pair_log_probs(policy.velocity, rollout, micro)[0]
    return old


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _evaluate(policy, domain, cfg, reward_spec, accelerator, run_dir: Path, step: int, save: bool) -> dict:
    if not accelerator.is_main_process:
        return {}
    with policy.ema_weights():
        metrics, objects, scores = evaluate_model(
            unwrap(policy.model), domain, cfg.eval_samples, cfg.sampler.eval_num_steps, cfg.sampler.shift,
            reward_spec, device=accelerator.device, render=4 if save and domain.kind == "interact" else 0)
    if save:
        out = run_dir / "eval"
        write_eval_report(out, {"step": step, **metrics}, f"{domain.name} evaluation at step {step}",
                          f"run `{run_dir.name}`, {cfg.eval_samples} samples, {cfg.sampler.eval_num_steps} ODE steps"
                          f"{', EMA weights' if policy.ema is not None else ''}")
        domain.save(objects, scores, out / "samples")
    return {f"eval/{k}": v for k, v in metrics.items()}
