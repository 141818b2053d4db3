"""The toy domain: a 2-D mixture of 8 Gaussians on a circle; the reward peaks at one (target) mode.

The base model is pretrained on the whole mixture, so about 1/8 of its samples land on the target
mode; the optimum puts every sample there. The condition is the target mode id, so the same model
can be asked for any mode (``targets`` below lists the ones trained on). Small and fast enough for
the tests and the quickstart; the evaluator reports target hit rate, on-manifold rate and mode
coverage so a policy that leaves the data shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.domain import Domain
from flowcoach.core.nets.mlp import MLPVelocity
from flowcoach.rewards.toy import MODE_STD, NUM_MODES, mode_centres, mode_reward_factors

DATA_SEED = 1234


def mixture_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points from the equal-weight mixture of NUM_MODES isotropic Gaussians (std MODE_STD)."""
    modes = torch.randint(0, NUM_MODES, (n,), generator=generator)
    return mode_centres()[modes] + MODE_STD * torch.randn(n, 2, generator=generator)


class ToyDomain(Domain):
    name = "toy"
    kind = "generate"

    def __init__(self, targets: tuple[int, ...] = (0,)):
        self.targets = torch.tensor(targets, dtype=torch.long)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (2,)

    def train_conditions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.targets[torch.randint(0, len(self.targets), (n,), generator=generator)]

    def eval_conditions(self, n: int) -> torch.Tensor:
        return self.targets[torch.arange(n) % len(self.targets)]

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        seed = {"train": DATA_SEED, "heldout": DATA_SEED + 1}[split]
        g = torch.Generator().manual_seed(seed)
        x0 = mixture_samples(20_000 if split == "train" else 4_000, g)
        # The data does not depend on the condition: pretraining sees random target ids.
        cond = torch.randint(0, NUM_MODES, (x0.shape[0],), generator=g)
        return x0, cond

    def model_config(self) -> dict:
        return {"dim": 2, "width": 64, "depth": 3, "cond_classes": NUM_MODES}

    def build_model(self, **config) -> MLPVelocity:
        return MLPVelocity(**config)

    def base_checkpoint(self) -> Path | None:
        return Path(__file__).parent / "base"

    def decode(self, x: torch.Tensor) -> list:
        return [row for row in x.detach().float().cpu().numpy()]

    def save(self, objects: list, rewards: torch.Tensor | None, directory: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        points = np.stack(objects)
        np.save(directory / "samples.npy", points)
        files = [directory / "samples.npy", directory / "samples.png"]
        fig, ax = plt.subplots(figsize=(4, 4))
        centres = mode_centres().numpy()
        ax.scatter(centres[:, 0], centres[:, 1], marker="x", c="k", label="modes")
        colour = None if rewards is None else rewards.cpu().numpy()
        ax.scatter(points[:, 0], points[:, 1], s=6, c=colour, cmap="viridis")
        ax.set_xlim(-3, 3), ax.set_ylim(-3, 3), ax.set_aspect("equal")
        fig.savefig(files[1], dpi=80), plt.close(fig)
        if rewards is not None:
            (directory / "rewards.json").write_text(json.dumps([float(r) for r in rewards]))
            files.append(directory / "rewards.json")
        return files

    def default_rewards(self) -> dict[str, float]:
        return {"toy-mode": 1.0}

    def element_rewards(self, objects: list, conditions) -> torch.Tensor:
        # the mode reward is a product over the two coordinates: each one's factor is its own credit
        return mode_reward_factors(objects, conditions)

    def evaluate(self, objects: list, conditions) -> dict[str, float]:
        x = torch.as_tensor(np.stack(objects)).float()
        finite = torch.isfinite(x).all(dim=1)
        x = torch.nan_to_num(x, nan=1e3, posinf=1e3, neginf=-1e3)
        dists = torch.cdist(x, mode_centres())
        nearest = dists.argmin(dim=1)
        on_manifold = (dists.min(dim=1).values < 3 * MODE_STD) & finite
        target = torch.as_tensor(conditions).long().reshape(-1)
        counts = torch.bincount(nearest[on_manifold], minlength=NUM_MODES)
        return {
            "target_hit_rate": float(((nearest == target) & on_manifold).float().mean()),
            "on_manifold_rate": float(on_manifold.float().mean()),
            "modes_covered": float((counts >= max(1, 0.01 * len(objects))).sum()),
            "mean_distance_to_target": float((x - mode_centres()[target]).norm(dim=1).mean()),
            "invalid_rate": float((~finite).float().mean()),
        }
