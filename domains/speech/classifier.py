"""The evaluator's style classifier: a small 1-D CNN over the re-analysed frames of a waveform.

It is a held-out judge, not a training reward (the rewards are target bands on summary statistics;
this network sees whole frame sequences), so a policy that games the bands shows up as a style the
classifier does not recognise. Input per frame (``classifier_inputs``): the log-mel re-computed from
the vocoded waveform (80 bins, normalised), F0 in octaves re 100 Hz on voiced frames, the voicing
flag and the frame energy; trained on the training split's vocoded renderings (``references``) and
scored on the held-out texts' renderings. The shipped weights (``shipped/style_classifier.*``,
~0.3 MB, with the style key, corpus key and accuracies in its JSON) are made by
``python -m flowcoach.domains.speech.references``: 10 epochs of AdamW, seed 0. They serve any
corpus with the same style key (styles, voices, audio settings).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.speech import audio
from flowcoach.domains.speech.corpus import STYLE_NAMES, split_rows

CHANNELS = audio.N_MELS + 3
SHIPPED = Path(__file__).parent / "shipped"


def classifier_inputs(utterances: list, frames: int) -> torch.Tensor:
    """[B, CHANNELS, frames]: normalised log-mel (silence-padded), F0 / octave, voiced, energy; the
    voiced channel is 0 and the energy channel -1 on padding."""
    x = torch.zeros(len(utterances), CHANNELS, frames)
    x[:, : audio.N_MELS] = audio.SILENCE
    x[:, -1] = -1.0
    for i, u in enumerate(utterances):
        a = u.analysis
        n = min(frames, u.logmel.shape[1], len(a.f0))
        x[i, : audio.N_MELS, :n] = audio.normalize(u.logmel[:, :n])
        voiced = a.voiced[:n]
        x[i, audio.N_MELS, :n] = torch.where(voiced, torch.log2(a.f0[:n].clamp_min(1.0) / 100.0), torch.zeros(n))
        x[i, audio.N_MELS + 1, :n] = voiced.float()
        x[i, -1, :n] = ((a.energy[:n] + 40.0) / 20.0).clamp(-1.0, 3.0)
    return x


def input_mask(x: torch.Tensor) -> torch.Tensor:
    """[B, L] True on frames that are not padding (some mel bin above silence)."""
    return ((x[:, : audio.N_MELS] - audio.SILENCE).abs() > 1e-3).any(dim=1)


class StyleClassifier(nn.Module):
    def __init__(self, channels: int = CHANNELS, width: int = 64, styles: int = len(STYLE_NAMES)):
        super().__init__()
        self.inp = nn.Conv1d(channels, width, 5, padding=2)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 5, padding=2 * d, dilation=d) for d in (2, 4, 8))
        self.norms = nn.ModuleList(nn.GroupNorm(8, width) for _ in range(3))
        self.head = nn.Linear(2 * width, styles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = input_mask(x)[:, None].float()
        h = self.inp(x)
        for conv, norm in zip(self.convs, self.norms):
            h = h + conv(F.gelu(norm(h)))
        h = F.gelu(h)
        mean = (h * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        peak = h.masked_fill(mask == 0, -1e4).amax(-1)
        return self.head(torch.cat([mean, peak], dim=-1))


CLASSIFIER = SHIPPED / "style_classifier.safetensors"  # beside it, style_classifier.json: how it was made
INTONATION = SHIPPED / "intonation_classifier.safetensors"
CONTOUR_POINTS = 48


def contour_inputs(frames: torch.Tensor) -> torch.Tensor:
    """[B, 2, CONTOUR_POINTS] timing-free contours from classifier inputs [B, CHANNELS, L]: the F0 of
    the voiced frames in order (octaves re 100 Hz) and the energy of the frames from the first to
    the last active one, each resampled to CONTOUR_POINTS. Durations, pauses' lengths and rate are
    gone; what is left is the shape and level of the melody and the loudness."""
    f0, voiced, energy = frames[:, audio.N_MELS], frames[:, audio.N_MELS + 1] > 0.5, frames[:, -1]
    out = torch.zeros(frames.shape[0], 2, CONTOUR_POINTS)
    for i in range(frames.shape[0]):
        v = f0[i][voiced[i]]
        if len(v) >= 2:
            out[i, 0] = F.interpolate(v[None, None], CONTOUR_POINTS, mode="linear", align_corners=True)[0, 0]
        active = torch.nonzero(energy[i] > energy[i].max() - ACTIVE_RANGE).flatten()
        if len(active) >= 2:
            e = energy[i, int(active[0]): int(active[-1]) + 1]
            out[i, 1] = F.interpolate(e[None, None], CONTOUR_POINTS, mode="linear", align_corners=True)[0, 0]
    return out


ACTIVE_RANGE = audio.ACTIVE_DB / 20.0  # the energy channel is (dB + 40) / 20


class IntonationClassifier(nn.Module):
    """Style from the timing-free F0 and energy contours (``contour_inputs``): a small 1-D CNN."""

    def __init__(self, width: int = 32, styles: int = len(STYLE_NAMES)):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(2, width, 5, padding=2), nn.GELU(), nn.Conv1d(width, width, 5, padding=2),
                                 nn.GELU(), nn.Conv1d(width, width, 5, padding=4, dilation=2), nn.GELU())
        self.head = nn.Linear(2 * width + 2 * CONTOUR_POINTS, styles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return self.head(torch.cat([h.mean(-1), h.amax(-1), x.flatten(1)], dim=-1))


def fit(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, train: np.ndarray, epochs: int, batch: int,
        lr: float, seed: int, say=print, name: str = "classifier") -> nn.Module:
    """Cross-entropy with AdamW and a one-cycle schedule on the ``train`` rows."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(train) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(train)[torch.randint(0, len(train), (batch,), generator=g)]
        loss = F.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % max(1, steps // 8) == 0:
            say(f"  {name} step {step + 1}/{steps}: loss {loss.item():.3f}")
    return model.eval()


def train_classifier(domain, inputs: np.ndarray, epochs: int = 10, batch: int = 64, lr: float = 2e-3,
                     seed: int = 0, say=print, intonation: bool = False) -> tuple[Path, float]:
    """Train on the training split's renderings, report accuracy on the held-out split, ship it.
    ``intonation``: the timing-free contour classifier instead of the full one."""
    from safetensors.torch import save_file

    corpus = domain.corpus
    labels = torch.from_numpy(corpus["meta"][:, 1].astype(np.int64))
    train, held = split_rows(corpus, "train"), split_rows(corpus, "heldout")
    x = torch.from_numpy(inputs.astype(np.float32))
    if intonation:
        x, model, path, epochs = contour_inputs(x), IntonationClassifier(), INTONATION, epochs * 4
    else:
        model, path = StyleClassifier(), CLASSIFIER
    start = time.perf_counter()
    model = fit(model, x, labels, train, epochs, batch, lr, seed, say, path.stem)
    accuracy = accuracy_of(model, x[held], labels[held])
    SHIPPED.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    per_style = {STYLE_NAMES[s]: accuracy_of(model, x[held][labels[held] == s], labels[held][labels[held] == s])
                 for s in range(len(STYLE_NAMES))}
    path.with_suffix(".json").write_text(json.dumps({
        "style_key": domain.corpus_config.style_key(), "corpus_key": domain.corpus_config.key(), "epochs": epochs,
        "batch": batch, "lr": lr, "seed": seed, "train_rows": int(len(train)), "heldout_rows": int(len(held)),
        "train_accuracy": accuracy_of(model, x[train], labels[train]), "heldout_accuracy": accuracy,
        "heldout_accuracy_per_style": per_style, "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python -m flowcoach.domains.speech.references"}, indent=2))
    return path, accuracy


@torch.no_grad()
def accuracy_of(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    pred = torch.cat([model(chunk).argmax(-1) for chunk in x.split(256)])
    return float((pred == labels).float().mean())


def available(path: Path, style_key: str) -> bool:
    made = json.loads(path.with_suffix(".json").read_text()) if path.exists() else {}
    return made.get("style_key") == style_key


@functools.lru_cache(maxsize=2)
def load_classifier(style_key: str, intonation: bool = False) -> nn.Module:
    from safetensors.torch import load_file

    path = INTONATION if intonation else CLASSIFIER
    if not available(path, style_key):
        raise FlowcoachError(f"no classifier for style key {style_key} at {path}; make it with "
                             "`python -m flowcoach.domains.speech.references`")
    model = IntonationClassifier() if intonation else StyleClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.no_grad()
def predict_styles(utterances: list, frames: int, style_key: str, intonation: bool = False) -> torch.Tensor:
    """[B] predicted style ids of decoded utterances (by the full or the intonation classifier)."""
    if not utterances:
        return torch.zeros(0, dtype=torch.long)
    x = classifier_inputs(utterances, frames)
    return load_classifier(style_key, intonation)(contour_inputs(x) if intonation else x).argmax(-1)
