"""Train a flow policy on one of gymnasium's own MuJoCo environments (Reacher-v5), generic path.

Any registered gymnasium id trains the same way: a scripted expert (or a demonstration .npz) gives
noisy demonstrations, `pretrain` behaviour-clones a flow policy over action chunks from them, and
`train` fine-tunes it with Flow-GRPO on episodes (G episodes per reset seed, one denoising chain
per action chunk, the episode's reward shared by its chunks).

    .venv/bin/pip install -e ".[grasping]"     # gymnasium[mujoco]
    .venv/bin/python examples/gym_reacher.py   # ~2-3 minutes on 2 cores; writes under runs/examples/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.algorithms import algorithm_defaults
from flowcoach.core.checkpoint import load_base
from flowcoach.core.interact import GymDomain
from flowcoach.core.pretrain import PretrainConfig, pretrain
from flowcoach.core.trainer import evaluate_model, train

LINKS = (0.1, 0.11)  # Reacher's two link lengths (reacher.xml)


def reacher_expert(env, rng):
    """Jacobian-transpose controller; each episode picks a stiff or a soft gain (two styles)."""
    kp, kd = (1500.0, 1.0) if rng.random() < 0.5 else (800.0, 0.6)

    def act(obs):
        q0, q1 = np.arctan2(obs[2], obs[0]), np.arctan2(obs[3], obs[1])
        (l1, l2), q01 = LINKS, q0 + q1
        jacobian = np.array([[-l1 * np.sin(q0) - l2 * np.sin(q01), -l2 * np.sin(q01)],
                             [l1 * np.cos(q0) + l2 * np.cos(q01), l2 * np.cos(q01)]])
        to_target = -obs[8:10]  # obs ends with fingertip - target
        return np.clip(kp * jacobian.T @ to_target - kd * obs[6:8], -1.0, 1.0)

    return act


def reached(info: dict) -> bool:
    return -info["reward_dist"] < 0.02  # fingertip within 2 cm of the target


def main(out: Path) -> None:
    torch.set_num_threads(1)
    domain = GymDomain("Reacher-v5", expert=reacher_expert, name="reacher", chunk_size=5, max_chunks=10,
                       num_demo_episodes=150, demo_noise=0.3, success_fn=reached, model_width=128, model_depth=3,
                       rewards={"episode-success": 1.0, "episode-return": 0.05}, cache_dir=str(out / "cache"))
    expert_rate = domain.demonstrations()["success"].mean()
    base = pretrain(PretrainConfig(steps=1500, batch_size=256, lr=2e-3, eval_samples=100, eval_num_steps=10,
                                   output=str(out / "reacher_base")), domain=domain)
    domain.base_dir = str(base)
    before, _, _ = evaluate_model(load_base(domain)[0], domain, 100, 10)

    cfg = algorithm_defaults("flow-grpo")
    cfg.steps, cfg.groups_per_step, cfg.group_size = 30, 8, 8
    cfg.sampler.eval_num_steps, cfg.eval_samples = 10, 100
    cfg.sampler.noise_level, cfg.sampler.logprob_reduction = 0.7, "sum"
    cfg.optim.lr, cfg.tensorboard, cfg.output_dir = 1e-4, False, str(out)
    run = train(cfg, domain=domain)
    after = json.loads((run / "eval" / "metrics.json").read_text())
    print(f"noisy expert demos: {expert_rate:.0%} success")
    for name, m in (("BC base", before), ("Flow-GRPO", after)):
        print(f"{name:10s} success {m['success_rate']:.2f} [{m['success_ci_low']:.2f}, {m['success_ci_high']:.2f}]"
              f"  return {m['mean_return']:.2f}  reward {m['reward_mean']:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/examples"))
