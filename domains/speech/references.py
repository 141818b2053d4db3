"""The corpus renderings decoded like samples: target bands for the rewards, inputs for the classifier.

Every corpus mel goes through exactly the path a generated sample takes (``decode``: Griffin-Lim,
then re-analysis), so the bands and the classifier see the vocoder's artefacts too and a sample is
compared with references on equal terms. The analysis of all 4,440 utterances takes about 15 min
on one core; it is cached under ``runs/cache/speech/references-<corpus key>.npz``.

Bands: for each (voice, style), the 10th and 90th percentiles of each prosody feature over the
training split's renderings. The shipped copy (``shipped/bands.json``, 4 kB) lets
``flowcoach train speech`` start without the analysis; it serves every corpus with the same style
key (styles, voices, audio settings: ``CorpusConfig.style_key``), and is remade with

    python -m flowcoach.domains.speech.references

which also trains the evaluator's two style classifiers (``classifier``) and writes all to ``shipped/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.speech import audio
from flowcoach.domains.speech.corpus import STYLE_NAMES, VOICES, cache_dir, split_rows

SHIPPED = Path(__file__).parent / "shipped"
BAND_QUANTILES = (0.1, 0.9)


def analyse_references(domain, batch: int = 16, say=print) -> dict[str, np.ndarray]:
    """Decode every corpus mel and analyse it: features [N, K] (nan where undefined) and the
    classifier inputs [N, CHANNELS, L] (float16). Cached by the corpus key."""
    from flowcoach.domains.speech.classifier import classifier_inputs

    path = cache_dir() / f"references-{domain.corpus_config.key()}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    from flowcoach.domains.speech.decode import decode

    mels = domain.mels()
    n = mels.shape[0]
    say(f"analysing the {n} corpus renderings through the vocoder (about 15 min on one core; cached)")
    features = np.full((n, len(audio.FEATURES)), np.nan, dtype=np.float32)
    inputs = np.zeros((n, *classifier_inputs([], domain.max_frames).shape[1:]), dtype=np.float16)
    start = time.perf_counter()
    for lo in range(0, n, batch):
        utterances = decode(mels[lo: lo + batch])
        features[lo: lo + len(utterances)] = [[u.analysis.features[k] for k in audio.FEATURES] for u in utterances]
        inputs[lo: lo + len(utterances)] = classifier_inputs(utterances, domain.max_frames).numpy()
        if (lo // batch) % 25 == 0:
            say(f"  {lo + len(utterances)}/{n} ({time.perf_counter() - start:.0f} s)")
    data = {"features": features, "inputs": inputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    return data


def compute_bands(features: np.ndarray, meta: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[voices, styles, K, 2] (low, high) = the BAND_QUANTILES of each feature over ``rows``."""
    bands = np.zeros((len(VOICES), len(STYLE_NAMES), features.shape[1], 2), dtype=np.float32)
    for v in range(len(VOICES)):
        for s in range(len(STYLE_NAMES)):
            sel = rows[(meta[rows, 1] == s) & (meta[rows, 2] == v)]
            if len(sel) == 0:
                raise FlowcoachError(f"no training rendering of style {STYLE_NAMES[s]} by voice {VOICES[v]}")
            bands[v, s] = np.nanquantile(features[sel], BAND_QUANTILES, axis=0).T
    return bands


BANDS = SHIPPED / "bands.json"


def load_bands(domain) -> np.ndarray:
    """The shipped bands when they were made for this style key, else computed from this corpus'
    (cached) reference analysis."""
    if BANDS.exists():
        record = json.loads(BANDS.read_text())
        if record["style_key"] == domain.corpus_config.style_key():
            return np.array(record["bands"], dtype=np.float32)
    refs = analyse_references(domain)
    return compute_bands(refs["features"], domain.corpus["meta"], split_rows(domain.corpus, "train"))


def write_bands(domain, bands: np.ndarray, features: np.ndarray) -> Path:
    meta, rows = domain.corpus["meta"], split_rows(domain.corpus, "train")
    medians = {f"{VOICES[v]}/{STYLE_NAMES[s]}": dict(zip(audio.FEATURES, np.round(np.nanmedian(
        features[rows[(meta[rows, 1] == s) & (meta[rows, 2] == v)]], axis=0), 3).tolist()))
        for v in range(len(VOICES)) for s in range(len(STYLE_NAMES))}
    record = {"style_key": domain.corpus_config.style_key(), "corpus_key": domain.corpus_config.key(),
              "train_rows": int(len(rows)), "features": list(audio.FEATURES), "voices": list(VOICES),
              "styles": list(STYLE_NAMES), "quantiles": list(BAND_QUANTILES),
              "bands": np.round(bands, 4).tolist(), "medians": medians,
              "command": "python -m flowcoach.domains.speech.references"}
    SHIPPED.mkdir(exist_ok=True)
    BANDS.write_text(json.dumps(record, indent=1))
    return BANDS


def main(argv: list[str] | None = None) -> int:
    """Analyse the corpus, write the bands and train the style classifier (both into shipped/)."""
    from flowcoach.domains.speech import SpeechDomain
    from flowcoach.domains.speech.classifier import train_classifier

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    domain = SpeechDomain()
    start, cpu = time.perf_counter(), time.process_time()
    refs = analyse_references(domain)
    meta = domain.corpus["meta"]
    bands = compute_bands(refs["features"], meta, split_rows(domain.corpus, "train"))
    print(f"bands written to {write_bands(domain, bands, refs['features'])}")
    for intonation in (False, True):
        path, accuracy = train_classifier(domain, refs["inputs"], intonation=intonation)
        print(f"{path.stem} written to {path}: held-out accuracy {accuracy:.3f}")
    print(f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
