"""Samples -> utterances: vocode the model's mel with Griffin-Lim and re-analyse the waveform.

A sample x is a normalised log-mel [N_MELS, max_frames]. The model ends every frame past the asked
length exactly at ``audio.SILENCE`` (``model``), so the length is read off x itself. Rewards and
the evaluator only look at what ``decode`` returns: the waveform and what ``audio.analyse``
measures on it (F0, voicing, energy, prosody) plus its re-computed log-mel, so they cannot be gamed
through features that do not survive vocoding.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowcoach.domains.speech import audio

PAD_TOLERANCE = 1e-3  # a frame is padding when every bin is within this of SILENCE
MIN_FRAMES = 5


@dataclass
class Utterance:
    """One decoded sample: its 16 kHz waveform (not clipped: clipping is counted, not hidden) and
    the analysis of that waveform."""

    wave: np.ndarray
    frames: int  # model frames up to the last non-padding frame
    logmel: torch.Tensor  # [N_MELS, frames'] log-mel re-computed from the waveform
    analysis: audio.Analysis
    clipped: float  # share of samples with |x| >= 1
    invalid: bool  # the model produced non-finite values (they were replaced by silence)
    vocoder_seconds: float = 0.0

    @property
    def silent(self) -> bool:
        return not bool(self.analysis.active.any()) or self.frames < MIN_FRAMES

    @property
    def seconds(self) -> float:
        return len(self.wave) / audio.SAMPLE_RATE


def sample_frames(x: torch.Tensor) -> torch.Tensor:
    """[B] frames up to the last one that is not padding (at least 1)."""
    content = ((x - audio.SILENCE).abs() > PAD_TOLERANCE).any(dim=1)  # [B, L]
    last = torch.where(content.any(dim=1), content.shape[1] - 1 - content.flip(1).float().argmax(dim=1),
                       torch.zeros(x.shape[0], dtype=torch.long))
    return last + 1


def decode(x: torch.Tensor) -> list[Utterance]:
    """[B, N_MELS, L] normalised log-mels -> Utterances (vocoded and re-analysed)."""
    x = x.detach().float().cpu()
    invalid = ~torch.isfinite(x).flatten(1).all(dim=1)
    x = torch.nan_to_num(x, nan=audio.SILENCE, posinf=audio.SILENCE, neginf=audio.SILENCE)
    frames = sample_frames(x)
    out = []
    for i in range(x.shape[0]):
        start = time.perf_counter()
        n = int(frames[i])
        if n < MIN_FRAMES:  # nothing to vocode (Griffin-Lim needs a few frames): silence
            wave = torch.zeros(max(n - 1, 4) * audio.HOP)
        else:
            wave = audio.vocode(audio.denormalize(x[i, :, :n]))
        seconds = time.perf_counter() - start
        out.append(utterance_of(wave, int(frames[i]), bool(invalid[i]), seconds))
    return out


def utterance_of(wave: torch.Tensor, frames: int, invalid: bool = False, vocoder_seconds: float = 0.0) -> Utterance:
    wave = torch.as_tensor(wave, dtype=torch.float32)
    clipped = float((wave.abs() >= 1.0).float().mean()) if len(wave) else 0.0
    return Utterance(wave=wave.numpy(), frames=frames, logmel=audio.log_mel(wave.clamp(-1.0, 1.0)),
                     analysis=audio.analyse(wave.clamp(-1.0, 1.0)), clipped=clipped, invalid=invalid,
                     vocoder_seconds=vocoder_seconds)


def save_utterances(objects: list[Utterance], rewards: torch.Tensor | None, directory: Path,
                    labels: list[str] | None = None, plots: int = 8) -> list[Path]:
    """WAV files (16 kHz, 16-bit), F0-contour plots (PNG) of the first ``plots``, and a JSON of
    each sample's rewards and prosody features."""
    import soundfile as sf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files, records = [], []
    for i, u in enumerate(objects):
        name = f"{i:03d}" + (f"_{labels[i]}" if labels else "")
        path = directory / f"{name}.wav"
        sf.write(path, np.clip(u.wave, -1.0, 1.0), audio.SAMPLE_RATE, subtype="PCM_16")
        files.append(path)
        records.append({"file": path.name, "reward": None if rewards is None else float(rewards[i]),
                        "seconds": round(u.seconds, 3), "clipped": u.clipped, "invalid": u.invalid,
                        **{k: (None if np.isnan(v) else round(v, 3)) for k, v in u.analysis.features.items()}})
    if plots:
        files.append(plot_contours(objects[:plots], directory / "f0_contours.png",
                                   labels[:plots] if labels else None))
    (directory / "samples.json").write_text(json.dumps(records, indent=2))
    files.append(directory / "samples.json")
    return files


def plot_contours(objects: list[Utterance], path: Path, labels: list[str] | None = None) -> Path:
    """F0 contours (voiced frames) over the log-mel of each utterance, one panel per utterance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(objects)
    fig, axes = plt.subplots(rows, 1, figsize=(7, 1.8 * rows), squeeze=False)
    hop_s = audio.HOP / audio.SAMPLE_RATE
    for k, (ax, u) in enumerate(zip(axes[:, 0], objects)):
        a = u.analysis
        t = np.arange(len(a.f0)) * hop_s
        f0 = np.where(a.voiced.numpy(), a.f0.numpy(), np.nan)
        ax.plot(t, f0, ".-", ms=2, lw=1, color="tab:red")
        ax.set_ylabel("F0 (Hz)")
        ax.set_xlim(0, max(t[-1] if len(t) else 0, 0.1))
        title = labels[k] if labels else f"sample {k}"
        feats = a.features
        ax.set_title(f"{title}: level {feats['f0_level']:.1f} st, range {feats['f0_range']:.1f} st, "
                     f"final rise {feats['final_rise']:.1f} st", fontsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
