"""Pretraining by flow matching on a domain's data: makes the base model that RL starts from."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from flowcoach.core.checkpoint import PRETRAIN_STATE, load_base, save_base
from flowcoach.core.domain import Domain, get_domain, structure_loss_of
from flowcoach.core.losses import flow_matching_loss, flow_times
from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.rollout import index_cond


@dataclass
class PretrainConfig:
    domain: str = "toy"
    """Domain name or module:attr."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 256
    lr: float = 2e-3
    """AdamW learning rate (cosine-decayed to 0)."""
    seed: int = 0
    output: str | None = None
    """Base model folder to write (default: runs/<domain>__pretrain__<seed>/base)."""
    eval_samples: int = 2000
    """Samples for the evaluator figures recorded in base.json."""
    eval_num_steps: int = 40
    """ODE steps of the recorded evaluation."""
    ema_decay: float = 0.0
    """EMA of the weights (diffusers' EMAModel); the base is the EMA weights when > 0. 0: off."""
    save_every: int = 0
    """Also write the base (model and a base.json marked partial, with the optimizer, EMA and RNG
    state) every this many steps, so a long pretraining that is stopped keeps its progress and
    `--resume` continues it. 0: only at the end."""
    resume: bool = False
    """Continue the stopped pretraining whose partial base is at --output (same flags), exactly
    where its last save left it."""
    init_from: str | None = None
    """Start from this base folder's weights (a fresh optimizer and learning-rate schedule): to
    pretrain a finished base further."""
    time_sampling: Literal["uniform", "logit-normal"] = "uniform"
    """How the flow time t of each sample is drawn: uniform, or logit-normal (SD3's scheme,
    diffusers' compute_density_for_timestep_sampling) with --logit-mean and --logit-std. t = 0 is
    the data, so a negative mean trains more on the last, fine steps of sampling."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    structure_weight: float = 0.0
    """Weight of the domain's structure loss (``Domain.structure_loss``: e.g. crystals' interatomic
    distances of the clean sample x_t - t v against the data's) added to flow matching. 0: off."""

# the flags a resumed pretraining must share with the stopped one (the rest do not change the run)
RESUME_FIELDS = ("domain", "steps", "batch_size", "lr", "seed", "ema_decay", "init_from", "time_sampling",
                 "logit_mean", "logit_std", "structure_weight")


def pretrain(cfg: PretrainConfig, domain: Domain | None = None, console=None) -> Path:
    from flowcoach.core.trainer import evaluate_model

    domain = domain or get_domain(cfg.domain)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise FlowcoachError("pretrain needs steps >= 1 and batch_size >= 1")
    if cfg.logit_std <= 0:
        raise FlowcoachError(f"--logit-std must be > 0, got {cfg.logit_std}")
    out = Path(cfg.output) if cfg.output else Path("runs") / f"{domain.name}__pretrain__{cfg.seed}" / "base"
    # the output folder is checked before the data and the model are built: a refusal costs nothing
    state = _resume_state(cfg, out) if cfg.resume else None
    if state is None and (out / PRETRAIN_STATE).exists():
        raise FlowcoachError(f"'{out}' holds a stopped pretraining; pass --resume to continue it, "
                             "or give another --output")
    if state is None and (out / "model.safetensors").exists():  # never write over a finished base (a shipped one)
        raise FlowcoachError(f"'{out}' already holds a base; give another --output (or delete it to remake it there)")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x0, cond = domain.data("train")
    structure = structure_loss_of(domain, "--structure-weight") if cfg.structure_weight else None
    if cfg.ema_decay < 0 or cfg.ema_decay >= 1 or cfg.save_every < 0:
        raise FlowcoachError("pretrain needs 0 <= ema_decay < 1 and save_every >= 0")
    if cfg.init_from:  # the base's weights and its model config
        model, _ = load_base(domain, cfg.init_from)
        model_config = json.loads((Path(cfg.init_from) / "model.json").read_text())["model_config"]
    else:
        model_config = domain.model_config()
        model = domain.build_model(**model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = None
    if cfg.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    say = console.print if console is not None else print
    first, losses, cpu_before, wall_before = 0, [], 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first, losses = state["step"], state["losses"]
        cpu_before, wall_before = state["cpu_seconds"], state["wall_seconds"]
        say(f"resuming the pretraining in {out} at step {first}")
    say(f"pretraining {domain.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{x0.shape[0]:,} training samples, {cfg.steps} steps of {cfg.batch_size}")
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(first, cfg.steps):
        idx = domain.pretrain_batch(x0.shape[0], cfg.batch_size, g)
        loss = flow_matching_loss(model, x0[idx], index_cond(cond, idx), generator=g, couple=domain.couple,
                                  t=None if cfg.time_sampling == "uniform" else  # uniform: drawn in the loss, as before
                                  flow_times(len(idx), g, cfg.time_sampling, cfg.logit_mean, cfg.logit_std),
                                  structure=structure, structure_weight=cfg.structure_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(model.parameters())
        losses = [*losses[-99:], loss.item()]  # the last 100, for the reported loss
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            what = "flow-matching loss" if not cfg.structure_weight else f"flow-matching + {cfg.structure_weight} x structure loss"
            say(f"  step {step + 1}/{cfg.steps}  {what} {sum(losses) / len(losses):.4f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            wall, cpu = wall_before + time.perf_counter() - start, cpu_before + time.process_time() - cpu_start
            partial = {"partial": True, "step": step + 1, "config": asdict(cfg),
                       "loss": sum(losses) / len(losses), "wall_seconds": round(wall, 1)}
            resumable = {"step": step + 1, "config": asdict(cfg), "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                         "ema": ema.state_dict() if ema is not None else None, "generator": g.get_state(),
                         "torch_rng": torch.get_rng_state(), "losses": losses,
                         "cpu_seconds": cpu, "wall_seconds": wall}
            save_base(_weights(model, ema), domain.name, model_config, partial, out, pretrain_state=resumable)
    seconds = wall_before + time.perf_counter() - start
    cpu_seconds = cpu_before + time.process_time() - cpu_start
    model = _weights(model, ema)
    model.eval()
    metrics, _, _ = evaluate_model(model, domain, cfg.eval_samples, cfg.eval_num_steps)
    record = {
        "command": "flowcoach pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["pretrain"] else None,
        "config": asdict(cfg),
        "data": f"{domain.name} data('train'): {x0.shape[0]} samples",
        "final_loss": sum(losses) / len(losses),
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "eval": {"num_samples": cfg.eval_samples, "num_steps": cfg.eval_num_steps, "seed": 12345, "metrics": metrics},
    }
    save_base(model, domain.name, model_config, record, out)
    say(f"base model written to {out}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return out


def _resume_state(cfg: PretrainConfig, out: Path) -> dict:
    """The state a stopped pretraining saved in its partial base, checked against the flags."""
    path = out / PRETRAIN_STATE
    if not path.exists():
        raise FlowcoachError(f"nothing to resume in '{out}': a pretraining writes its state there every "
                             "--save-every steps; run without --resume to start one")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["config"]
    before = {k: saved.get(k, getattr(PretrainConfig(), k)) for k in RESUME_FIELDS}  # fields added later: their default
    changed = [f"--{k.replace('_', '-')} {before[k]} (now {getattr(cfg, k)})"
               for k in RESUME_FIELDS if before[k] != getattr(cfg, k)]
    if changed:
        raise FlowcoachError(f"the pretraining in '{out}' was started with " + ", ".join(changed) +
                             "; resume it with the same flags, or pretrain further with --init-from")
    return state


def _weights(model, ema):
    """The model to save: a copy holding the EMA weights when there is an EMA, else the model."""
    if ema is None:
        return model
    import copy

    averaged = copy.deepcopy(model)
    ema.copy_to(averaged.parameters())
    return averaged
