"""The speech corpus: templated sentences rendered by eSpeak NG in five speaking styles, two voices.

Nothing is downloaded: every utterance is synthesised here (``espeak``), deterministically, and the
whole corpus is cached under ``runs/cache/speech`` (or ``$FLOWCOACH_CACHE/speech``) in a file named
by a hash of the generator's settings (``CorpusConfig.key``). Building it takes about a minute.

- Texts (``text_bank``): subject + verb + object sentences from fixed word lists (3-5 words), in a
  seeded order; the first ``heldout_texts`` are the held-out split, never seen in training.
- Styles (``STYLES``): eSpeak's rate (words/min), pitch and pitch range (0-99), word gap (10 ms
  units) and volume, each drawn per utterance from a style's interval (so a style is a region, not
  a point), plus punctuation and SSML: the question raises its last word
  (``<prosody pitch="+35%">``) and ends with "?", the emphatic stresses its verb
  (``<emphasis level="strong">``), the excited ends with "!".
- Voices (``VOICES``): eSpeak's en-us (male) and en-us+f4 (female); every text is spoken in every
  style by every voice.
- Per utterance: the 22,050 Hz rendering at -6 dB (``GAIN``) resampled to 16 kHz, its log-mel (``audio``), and the
  phoneme that each mel frame falls in, from eSpeak's phoneme events (the durations the model is
  conditioned on), with the frame's position inside its phoneme and the phoneme's length.

An utterance longer than ``max_frames`` (after trimming trailing silence to 80 ms) is dropped
together with its text, so every split keeps all 10 renderings of each of its texts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.speech import audio
from flowcoach.domains.speech.espeak import SAMPLE_RATE as ESPEAK_RATE, synthesize

VOICES = ("en-us", "en-us+f4")
STYLE_NAMES = ("neutral", "excited", "sad", "question", "emphatic")

# per style: (low, high) intervals of eSpeak's settings, drawn uniformly per utterance
STYLES = {
    "neutral": {"rate": (165, 185), "pitch": (45, 55), "pitch_range": (45, 60), "word_gap": (0, 0), "volume": (95, 105)},
    "excited": {"rate": (200, 225), "pitch": (70, 82), "pitch_range": (85, 99), "word_gap": (0, 0), "volume": (115, 130)},
    "sad": {"rate": (115, 135), "pitch": (28, 36), "pitch_range": (8, 20), "word_gap": (0, 1), "volume": (65, 80)},
    "question": {"rate": (165, 185), "pitch": (50, 60), "pitch_range": (60, 75), "word_gap": (0, 0), "volume": (95, 105)},
    "emphatic": {"rate": (135, 155), "pitch": (50, 58), "pitch_range": (75, 90), "word_gap": (2, 4), "volume": (115, 125)},
}

SUBJECTS = ("the man", "my sister", "the dog", "a teacher", "our neighbour", "the children", "his mother", "a girl",
            "the farmer", "my friend", "the doctor", "her brother", "the cat", "a woman", "the baker", "your uncle",
            "we", "they", "she", "he")
VERBS = ("found", "painted", "opened", "carried", "cleaned", "sold", "lost", "fixed", "watched", "moved",
         "wanted", "bought", "closed", "dropped", "kept", "washed", "liked", "visited", "followed", "called")
OBJECTS = ("the box", "a green door", "the letter", "the window", "a car", "the garden", "a ball", "the kitchen",
           "a chair", "the bird", "a coat", "the money", "a phone", "the bag", "the key", "a boat", "the bread",
           "the river", "a lamp", "the horse")

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
# eSpeak's phoneme mnemonics (with stress marks) met in renderings of the word lists above: a fixed
# table, so every corpus made from these words (a small test corpus too) shares the token ids
PHONEMES = ("'0", "'3:", "'A@", "'E", "'I", "'O2", "'O:", "'O@", "'U", "'V", "'a", "'aI", "'aU", "'e@",
            "'eI", "'i:", "'o@", "'oU", "'u:", ',0', ',3:', ',A@', ',E', ',I', ',U', ',V', ',a', ',aU',
            ',eI', ',i:', '3', '3:', ';', '@', '@2', '@L', 'D', 'I', 'I#', 'N', 'S', 'U@', '_', '_!', '_:',
            'a#', 'aI', 'b', 'd', 'eI', 'f', 'g', 'h', 'i', 'i:', 'j', 'k', 'l', 'm', 'n', 'oU', 'p', 'r',
            'r-', 's', 't', 't#', 'tS', 'v', 'w', 'z')
VOCAB = (PAD_TOKEN, UNK_TOKEN) + PHONEMES
GAIN = 0.5  # -6 dB of headroom: Griffin-Lim's peaks overshoot the original's (measured up to 0.2% clipped at 0 dB)


@dataclass(frozen=True)
class CorpusConfig:
    texts: int = 450
    """Distinct sentences (every one spoken in every style by every voice)."""
    heldout_texts: int = 50
    """The first texts of the seeded order are held out (evaluation only)."""
    max_frames: int = 160
    """Mel frames per sample (16 ms each: 2.56 s); longer renderings are dropped with their text."""
    seed: int = 7
    version: int = 2
    """Bump when the generator changes, so old caches are not reused."""

    def key(self) -> str:
        """Names the cached corpus: every setting the renderings depend on."""
        settings = {**asdict(self), "styles": STYLES, "voices": VOICES, "words": [SUBJECTS, VERBS, OBJECTS],
                    "audio": [audio.SAMPLE_RATE, audio.N_FFT, audio.HOP, audio.N_MELS, audio.MEL_FLOOR, GAIN]}
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]

    def style_key(self) -> str:
        """What a style's renderings depend on (not how many texts): the shipped target bands and
        style classifier serve every corpus with the same style key."""
        settings = {"styles": STYLES, "voices": VOICES, "version": self.version,
                    "audio": [audio.SAMPLE_RATE, audio.N_FFT, audio.HOP, audio.N_MELS, audio.MEL_FLOOR, GAIN]}
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def text_bank(n: int, seed: int) -> list[str]:
    """n distinct "subject verb object" sentences (no final punctuation), in a seeded order."""
    combos = len(SUBJECTS) * len(VERBS) * len(OBJECTS)
    if n > combos:
        raise FlowcoachError(f"the text bank has {combos} sentences; asked for {n}")
    order = np.random.default_rng(seed).permutation(combos)[:n]
    texts = []
    for k in order.tolist():
        s, rest = divmod(k, len(VERBS) * len(OBJECTS))
        v, o = divmod(rest, len(OBJECTS))
        sentence = f"{SUBJECTS[s]} {VERBS[v]} {OBJECTS[o]}"
        texts.append(sentence[0].upper() + sentence[1:])
    return texts


def style_markup(text: str, style: str) -> str:
    """The text as eSpeak reads it in a style (SSML for question and emphatic)."""
    words = text.split()
    if style == "question":
        return "<speak>" + " ".join(words[:-1]) + f' <prosody pitch="+35%">{words[-1]}</prosody>?</speak>'
    if style == "emphatic":
        verb = 1 if len(words) == 3 or words[0].lower() in ("we", "they", "she", "he") else 2
        words = words[:verb] + [f'<emphasis level="strong">{words[verb]}</emphasis>'] + words[verb + 1:]
        return "<speak>" + " ".join(words) + ".</speak>"
    return text + ("!" if style == "excited" else ".")


def style_settings(style: str, rng: np.random.Generator) -> dict:
    return {name: int(rng.integers(lo, hi + 1)) for name, (lo, hi) in STYLES[style].items()}


def frame_alignment(phoneme_starts: np.ndarray, frames: int):
    """Per mel frame: the index of the phoneme it falls in, its position inside it (0..1) and that
    phoneme's length in frames. Frame k is centred on sample k * HOP at 16 kHz."""
    centres = np.arange(frames) * audio.HOP * ESPEAK_RATE / audio.SAMPLE_RATE
    idx = np.clip(np.searchsorted(phoneme_starts, centres, side="right") - 1, 0, len(phoneme_starts) - 1)
    first = np.searchsorted(idx, idx, side="left")  # idx is non-decreasing
    last = np.searchsorted(idx, idx, side="right")
    length = last - first
    position = (np.arange(frames) - first + 0.5) / length
    return idx, position.astype(np.float32), length.astype(np.float32)


def render(text: str, style: str, voice: str, rng: np.random.Generator) -> dict:
    """One utterance: settings, 16 kHz waveform (float32) and its phonemes with frame alignment."""
    settings = style_settings(style, rng)
    r = synthesize(style_markup(text, style), voice=voice, ssml=style in ("question", "emphatic"), **settings)
    wave = r.audio.astype(np.float32) / 32768.0 * GAIN
    loud = np.flatnonzero(np.abs(wave) > 1e-3)
    end = min(len(wave), (int(loud[-1]) if len(loud) else 0) + int(0.08 * ESPEAK_RATE))
    wave16 = audio.resample(wave[:end], ESPEAK_RATE).numpy()
    frames = audio.num_frames(len(wave16))
    idx, position, length = frame_alignment(r.phoneme_starts, frames)
    return {"settings": settings, "wave": wave16, "phonemes": r.phonemes, "frame_phoneme": idx,
            "position": position, "phone_frames": length, "frames": frames}


def cache_dir() -> Path:
    return Path(os.environ.get("FLOWCOACH_CACHE", "runs/cache")) / "speech"


def build(cfg: CorpusConfig, say=print) -> dict[str, np.ndarray]:
    """Synthesise the corpus; returns plain arrays (what the cache file holds)."""
    texts = text_bank(cfg.texts, cfg.seed)
    say(f"building the speech corpus: {len(texts)} texts x {len(STYLE_NAMES)} styles x {len(VOICES)} voices "
        f"with eSpeak NG (about a minute)")
    start = time.perf_counter()
    utterances, kept_texts = [], []
    for t, text in enumerate(texts):
        rng = np.random.default_rng([cfg.seed, t])  # each text's settings depend on it alone
        rendered = [(s, v, render(text, style, voice, rng)) for s, style in enumerate(STYLE_NAMES)
                    for v, voice in enumerate(VOICES)]
        if max(u["frames"] for _, _, u in rendered) > cfg.max_frames:
            continue
        kept_texts.append(t)
        utterances += [(t, s, v, u) for s, v, u in rendered]
    vocab = list(VOCAB)
    token_of = {p: i for i, p in enumerate(vocab)}
    n, L = len(utterances), cfg.max_frames
    mel = np.full((n, audio.N_MELS, L), np.log(audio.MEL_FLOOR), dtype=np.float32)
    tokens = np.zeros((n, L), dtype=np.int16)
    position = np.zeros((n, L), dtype=np.float32)
    phone_frames = np.zeros((n, L), dtype=np.float32)
    settings = np.zeros((n, len(STYLES["neutral"])), dtype=np.int16)
    meta = np.zeros((n, 4), dtype=np.int32)  # text index, style, voice, frames
    lengths = []
    for i, (t, s, v, u) in enumerate(utterances):
        f = u["frames"]
        mel[i, :, :f] = audio.log_mel(torch.from_numpy(u["wave"])).numpy()[:, :f]
        tokens[i, :f] = [token_of.get(u["phonemes"][k], 1) for k in u["frame_phoneme"]]  # 1: unknown
        position[i, :f], phone_frames[i, :f] = u["position"], u["phone_frames"]
        settings[i] = list(u["settings"].values())
        meta[i] = (t, s, v, f)
        lengths.append(len(u["wave"]))
    lengths = np.array(lengths)
    say(f"  {n} utterances of {len(kept_texts)} texts ({len(texts) - len(kept_texts)} dropped as longer than "
        f"{L} frames), {len({p for *_, u in utterances for p in u['phonemes']} - set(vocab))} unknown phonemes, {lengths.sum() / audio.SAMPLE_RATE / 60:.1f} min of audio, "
        f"{time.perf_counter() - start:.0f} s")
    return {"mel": mel.astype(np.float16), "tokens": tokens, "position": position.astype(np.float16),
            "phone_frames": phone_frames.astype(np.float16), "settings": settings, "meta": meta,
            "texts": np.array(texts), "vocab": np.array(vocab), "heldout_texts": np.array(cfg.heldout_texts)}


def load(cfg: CorpusConfig = CorpusConfig(), say=print) -> dict[str, np.ndarray]:
    """The corpus for cfg, from the cache or built (and cached) now."""
    path = cache_dir() / f"corpus-{cfg.key()}.npz"
    if not path.exists():
        data = build(cfg, say)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def split_rows(corpus: dict, split: str) -> np.ndarray:
    """Row indices of the "train" or "heldout" utterances (held out = the first heldout_texts texts)."""
    if split not in ("train", "heldout"):
        raise FlowcoachError(f"unknown split '{split}'; choose train or heldout")
    held = corpus["meta"][:, 0] < int(corpus["heldout_texts"])
    return np.flatnonzero(held if split == "heldout" else ~held)

