"""Held-out evaluator of generated speech (not the training reward, so reward hacking shows).

On the decoded utterances (vocoded, re-analysed) of held-out texts:

- ``style_accuracy`` (and per style): the share whose style the corpus-trained classifier
  (``classifier``, a CNN over the re-analysed frames, never a reward) recognises as the asked one;
  ``intonation_accuracy``: the same by a classifier of the timing-free F0 and energy contours (the
  durations come from the condition, so the first classifier can lean on timing; this one cannot);
- per style: median F0 level / range / final rise (semitones), energy std (dB), pause ratio, rate,
  voiced fraction, and ``in_band`` (per feature and overall): the share of utterances inside the
  style's target band, next to the same figures of the eSpeak references;
- ``mcd``: mel-cepstral distortion (dB, DTW) to the eSpeak rendering of the same text and style;
- ``cer``: character error rate of the recogniser trained here (``recognizer``) against the text;
- ``invalid_rate``, ``silent_rate``, ``clipped_rate`` (utterances with any clipped sample);
- ``rtf_vocoder``: Griffin-Lim seconds per second of audio (the model's share of the real-time
  factor depends on the sampler's steps and is measured in benchmarks/speech).
"""

from __future__ import annotations

import math

import numpy as np

from flowcoach.domains.speech import audio, recognizer
from flowcoach.domains.speech.corpus import STYLE_NAMES
from flowcoach.rewards.speech import PROSODY_FEATURES


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def evaluate_utterances(domain, objects: list, conditions: dict) -> dict[str, float]:
    from flowcoach.rewards.speech import mcd

    styles = conditions["style"].long()
    bands = conditions["bands"] if "bands" in conditions else domain.bands()[conditions["voice"], styles]
    ok = [not (u.invalid or u.silent) for u in objects]
    out = {"invalid_rate": float(np.mean([u.invalid for u in objects])),
           "silent_rate": float(np.mean([u.silent for u in objects])),
           "clipped_rate": float(np.mean([u.clipped > 0 for u in objects]))}
    key = domain.corpus_config.style_key()
    if domain.use_classifier:
        from flowcoach.domains.speech.classifier import INTONATION, available, predict_styles

        for name, intonation in (("style_accuracy", False), ("intonation_accuracy", True)):
            if intonation and not available(INTONATION, key):
                continue
            correct = (predict_styles(objects, domain.max_frames, key, intonation) == styles).float()
            out[name] = float(correct.mean())
            for s, style in enumerate(STYLE_NAMES):
                if (styles == s).any():
                    out[f"{name}/{style}"] = float(correct[styles == s].mean())
    if getattr(domain, "use_recognizer", False) and "text" in conditions and recognizer.available(key):
        heard = recognizer.recognise(objects, domain.max_frames, key)
        out["cer"] = recognizer.character_error_rate(heard, [recognizer.decode_codes(t) for t in conditions["text"]])
    scores, _ = mcd(objects, {**conditions, "bands": bands})
    mcds = [-10.0 * float(scores[i]) for i in range(len(objects)) if ok[i]]
    out["mcd"] = float(np.mean(mcds)) if mcds else float("nan")
    in_band = {k: [] for k in audio.FEATURES}
    for i, u in enumerate(objects):
        for k, name in enumerate(audio.FEATURES):
            low, high = (float(v) for v in bands[i, k])
            value = u.analysis.features[name]
            in_band[name].append(bool(ok[i] and math.isfinite(value) and low <= value <= high))
    out["in_band"] = float(np.mean([np.mean(in_band[k]) for k in PROSODY_FEATURES]))
    for name in audio.FEATURES:
        out[f"in_band/{name}"] = float(np.mean(in_band[name]))
    for s, style in enumerate(STYLE_NAMES):
        rows = [i for i in range(len(objects)) if int(styles[i]) == s and ok[i]]
        if not rows:
            continue
        for name in audio.FEATURES:
            out[f"{style}/{name}"] = _median([objects[i].analysis.features[name] for i in rows])
        out[f"{style}/in_band"] = float(np.mean([np.mean([in_band[k][i] for k in PROSODY_FEATURES]) for i in rows]))
    seconds = sum(u.seconds for u in objects)
    out["rtf_vocoder"] = sum(u.vocoder_seconds for u in objects) / seconds if seconds > 0 else float("nan")
    return out
