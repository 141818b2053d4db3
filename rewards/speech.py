"""Speech rewards on decoded utterances (``flowcoach.domains.speech.decode.Utterance``).

Each utterance is the model's mel vocoded by Griffin-Lim and re-analysed (F0 by YIN, energy,
log-mel of the waveform), so a reward cannot be gamed through features that do not survive the
vocoder. The conditions are the speech domain's condition dict: ``bands`` [B, K, 2] holds the
(low, high) target band of each prosody feature (``audio.FEATURES``) for the asked voice and style,
from the corpus' own renderings (``references``); ``ref`` [B, 80, L] and ``length`` [B] give the
eSpeak rendering of the same text for the mel-cepstral distortion.

- ``speech-prosody`` in [0, 1]: the mean over the prosody features (F0 level, F0 range, final
  rise, energy std, pause ratio, rate) of a bounded bump: 1 inside the band, exp(-d^2 / 2w^2)
  at distance d outside it (w = half the band's width, at least ``MIN_WIDTH``). Overshooting a band
  costs as much as falling short: it rewards prosody that fits the style, not "more".
- ``speech-mcd``: -MCD / 10 (MCD in dB, DTW-aligned, vs the reference rendering), floored at
  -MCD_CAP / 10: intelligibility and timbre kept.
- ``speech-voicing`` in [-1, 0]: voicing collapse: 0 while the voiced share of speech frames is at
  least half of the band's low end, falling linearly to -1 at no voicing.
- ``speech-clipping`` in [-1, 0]: -(share of clipped samples) / 1%, floored at -1.

Invalid (non-finite model output) and silent utterances score each reward's worst value and are
counted in ``info`` (``invalid``, ``silent``).
"""

from __future__ import annotations

import math

import torch

from flowcoach.core.registry import FlowcoachError

PROSODY_FEATURES = ("f0_level", "f0_range", "final_rise", "energy_std", "pause_ratio", "rate")
MIN_WIDTH = {"f0_level": 0.5, "f0_range": 0.5, "final_rise": 0.5, "energy_std": 0.3, "pause_ratio": 0.01,
             "rate": 0.3}
MCD_CAP = 40.0
VOICING_FLOOR = 0.5
CLIP_SCALE = 0.01


def band_score(value: float, low: float, high: float, width: float) -> float:
    """1 inside [low, high], a Gaussian fall-off of scale ``width`` outside; 0 for nan."""
    if not math.isfinite(value):
        return 0.0
    if low <= value <= high:
        return 1.0
    distance = low - value if value < low else value - high
    return math.exp(-0.5 * (distance / width) ** 2)


def _need(conditions, *keys):
    if not isinstance(conditions, dict) or any(k not in conditions for k in keys):
        raise FlowcoachError(f"speech rewards need the speech domain's conditions (keys {', '.join(keys)})")


def _feature_index(name: str) -> int:
    from flowcoach.domains.speech.audio import FEATURES

    return FEATURES.index(name)


def _bad(u) -> bool:
    return u.invalid or u.silent


def prosody(objects: list, conditions) -> tuple[torch.Tensor, dict]:
    _need(conditions, "bands")
    bands = torch.as_tensor(conditions["bands"], dtype=torch.float64)
    scores = torch.zeros(len(objects))
    hits = {k: 0 for k in PROSODY_FEATURES}
    bad = 0
    for i, u in enumerate(objects):
        if _bad(u):
            bad += 1
            continue
        parts = []
        for name in PROSODY_FEATURES:
            low, high = (float(v) for v in bands[i, _feature_index(name)])
            value = u.analysis.features[name]
            parts.append(band_score(value, low, high, max(0.5 * (high - low), MIN_WIDTH[name])))
            hits[name] += int(parts[-1] == 1.0)
        scores[i] = sum(parts) / len(parts)
    n = max(1, len(objects))
    info = {"invalid": bad, "in_band": sum(hits.values()) / (n * len(PROSODY_FEATURES))}
    info.update({f"in_band/{k}": v / n for k, v in hits.items()})
    return scores, info


def mcd(objects: list, conditions) -> tuple[torch.Tensor, dict]:
    from flowcoach.domains.speech.audio import denormalize, mel_cepstral_distortion

    _need(conditions, "ref", "length")
    scores = torch.full((len(objects),), -MCD_CAP / 10.0)
    values, bad = [], 0
    for i, u in enumerate(objects):
        if _bad(u):
            bad += 1
            continue
        n = int(conditions["length"][i])
        d = mel_cepstral_distortion(u.logmel, denormalize(conditions["ref"][i, :, :n].float()))
        if not math.isfinite(d):
            bad += 1
            continue
        values.append(d)
        scores[i] = -min(d, MCD_CAP) / 10.0
    return scores, {"invalid": bad, "mcd_mean": sum(values) / len(values) if values else float("nan")}


def voicing(objects: list, conditions) -> tuple[torch.Tensor, dict]:
    _need(conditions, "bands")
    k = _feature_index("voiced_fraction")
    scores = torch.full((len(objects),), -1.0)
    bad = collapsed = 0
    for i, u in enumerate(objects):
        if _bad(u):
            bad += 1
            continue
        floor = VOICING_FLOOR * float(conditions["bands"][i, k, 0])
        value = u.analysis.features["voiced_fraction"]
        value = value if math.isfinite(value) else 0.0
        scores[i] = -min(1.0, max(0.0, (floor - value) / max(floor, 1e-6)))
        collapsed += int(scores[i] < 0)
    return scores, {"invalid": bad, "collapsed": collapsed}


def clipping(objects: list, conditions=None) -> tuple[torch.Tensor, dict]:
    scores = torch.zeros(len(objects))
    bad = clipped = 0
    for i, u in enumerate(objects):
        if u.invalid:
            scores[i] = -1.0
            bad += 1
            continue
        scores[i] = -min(1.0, u.clipped / CLIP_SCALE)
        clipped += int(u.clipped > 0)
    return scores, {"invalid": bad, "clipped": clipped}
