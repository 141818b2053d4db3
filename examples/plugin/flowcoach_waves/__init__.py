"""flowcoach-waves: a complete domain plugin for flowcoach, in one module.

The domain "waves": 1-D signals of LENGTH samples, x_n = A sin(2 pi f_c n / LENGTH + phi) + noise,
with the class c (the condition) setting the frequency f_c, and amplitudes A in [0.5, 1] in the
data. The reward "waves-amplitude" asks for a louder wave (A near TARGET_AMPLITUDE = 1.5, beyond
the data) at the class's frequency. The evaluator reports what the reward does not see: whether the
wave is still at its class's frequency (frequency_accuracy) and how pure it is (purity: the share of
its energy at f_c), so a policy that gets loud by adding other frequencies shows.

Both are announced through entry points (see pyproject.toml), so after `pip install` flowcoach
finds them by name: `flowcoach domains`, `flowcoach check-domain waves`, `flowcoach train waves`.
The base model in base/ was made by `flowcoach pretrain waves` (its command and figures are in
base/base.json); `pretrain_defaults` below are that command's settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.domain import Domain
from flowcoach.core.nets.mlp import MLPVelocity

LENGTH = 16
"""Samples per wave."""
FREQUENCIES = (1, 2, 3)
"""f_c: cycles per wave of class c."""
TARGET_AMPLITUDE = 1.5
"""The reward's optimum (the data's amplitudes lie in [0.5, 1])."""
NOISE = 0.05


def make_waves(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, LENGTH], classes [n]) drawn from the data distribution."""
    classes = torch.randint(0, len(FREQUENCIES), (n,), generator=generator)
    amplitude = 0.5 + 0.5 * torch.rand(n, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    f = torch.tensor(FREQUENCIES, dtype=torch.float32)[classes][:, None]
    t = torch.arange(LENGTH, dtype=torch.float32)[None]
    x = amplitude * torch.sin(2 * math.pi * f * t / LENGTH + phase)
    return x + NOISE * torch.randn(n, LENGTH, generator=generator), classes


def spectrum(objects: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(amplitude per frequency bin [B, LENGTH // 2 + 1], finite [B]) of waves; non-finite waves as zeros."""
    x = torch.as_tensor(np.stack([np.asarray(o, dtype=np.float64) for o in objects])) if objects else \
        torch.zeros(0, LENGTH, dtype=torch.float64)
    finite = torch.isfinite(x).all(dim=1)
    x = torch.where(finite[:, None], x, torch.zeros_like(x)).clamp(-1e6, 1e6)
    return 2.0 * torch.fft.rfft(x, dim=1).abs() / LENGTH, finite


def amplitude_reward(objects: list, conditions, width: float = 0.25) -> tuple[torch.Tensor, dict]:
    """exp(-(A_c - 1.5)^2 / (2 width^2)) with A_c the wave's amplitude at its class's frequency.
    A non-finite wave scores 0 and is counted in ``invalid``."""
    amp, finite = spectrum(objects)
    classes = torch.as_tensor(conditions).long().reshape(-1)
    bins = torch.tensor(FREQUENCIES)[classes]
    a = amp[torch.arange(len(amp)), bins]
    scores = torch.where(finite, torch.exp(-((a - TARGET_AMPLITUDE) ** 2) / (2 * width**2)), torch.zeros_like(a))
    return scores.float(), {"invalid": int((~finite).sum())}


amplitude_reward.floor = 0.0  # what flowcoach's --reward-errors floor gives a sample this reward fails on


class WavesDomain(Domain):
    name = "waves"
    kind = "generate"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (LENGTH,)

    def train_conditions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(FREQUENCIES), (n,), generator=generator)

    def eval_conditions(self, n: int) -> torch.Tensor:
        return torch.arange(n) % len(FREQUENCIES)  # fixed: the same every call

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        seed = {"train": 11, "heldout": 12}[split]
        return make_waves(8_000 if split == "train" else 1_000, torch.Generator().manual_seed(seed))

    def model_config(self) -> dict:
        return {"dim": LENGTH, "width": 64, "depth": 2, "cond_classes": len(FREQUENCIES)}

    def build_model(self, **config) -> MLPVelocity:
        return MLPVelocity(**config)

    def base_checkpoint(self) -> Path | None:
        path = Path(__file__).parent / "base"
        return path if (path / "model.safetensors").exists() else None

    def pretrain_defaults(self) -> dict:
        return {"steps": 1500, "batch_size": 256, "lr": 3e-3, "eval_samples": 600, "eval_num_steps": 20}

    def train_defaults(self) -> dict:
        return {"sampler.eval_num_steps": 20, "optim.lr": 1e-3}

    def decode(self, x: torch.Tensor) -> list:
        return [row for row in x.detach().float().cpu().numpy()]  # one [LENGTH] array per sample

    def save(self, objects: list, rewards: torch.Tensor | None, directory: Path) -> list[Path]:
        """waves.csv (one wave a row) and rewards.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        csv = directory / "waves.csv"
        np.savetxt(csv, np.stack(objects) if objects else np.zeros((0, LENGTH)), delimiter=",", fmt="%.5f")
        files = [csv]
        if rewards is not None:
            (directory / "rewards.json").write_text(json.dumps([float(r) for r in rewards]))
            files.append(directory / "rewards.json")
        return files

    def default_rewards(self) -> dict[str, float]:
        return {"waves-amplitude": 1.0}

    def evaluate(self, objects: list, conditions) -> dict[str, float]:
        amp, finite = spectrum(objects)
        classes = torch.as_tensor(conditions).long().reshape(-1)
        bins = torch.tensor(FREQUENCIES)[classes]
        at_f = amp[torch.arange(len(amp)), bins]
        energy = (amp[:, 1:] ** 2).sum(dim=1).clamp_min(1e-12)
        ok = finite.float()
        return {
            "frequency_accuracy": float(((amp[:, 1:].argmax(dim=1) + 1 == bins) & finite).float().mean()),
            "purity": float((at_f**2 / energy * ok).mean()),
            "mean_amplitude": float((at_f * ok).sum() / ok.sum().clamp_min(1)),
            "invalid_rate": float((~finite).float().mean()),
        }
