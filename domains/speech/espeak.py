"""eSpeak NG through ctypes, from the library and data that ship inside the ``espeakng-loader`` wheel.

No system espeak-ng is used. Synthesis goes into memory through the synth callback (22,050 Hz
int16) with phoneme events, whose sample positions give each phoneme's start: the durations the
model is conditioned on.

Determinism: libespeak-ng keeps state between utterances in static variables (the glottal wave's
phase, the flutter index, echo buffers, pitch slew), so the same call can give different samples
after different predecessors, and its noise generator is seeded from the clock at start-up.
Measured here: repeated calls in one process drift by a few samples per utterance. So each
utterance loads a fresh copy of the library (dlopen), seeds its noise generator, synthesises, and
unloads it (dlclose): every rendering is then a pure function of its text and settings, the same in
any process and any order (~7 ms per utterance).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

from flowcoach.core.registry import FlowcoachError

SAMPLE_RATE = 22_050  # what libespeak-ng produces

# espeak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_CHARS_UTF8, _SSML = 1, 0x10
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7
_EVENT_END_OF_LIST, _EVENT_WORD, _EVENT_PHONEME = 0, 1, 7
_NOISE_SEED = 1234


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_LOCK = threading.Lock()  # one synthesis at a time: the callback collects into module state


@dataclass
class Rendering:
    """One utterance: waveform int16 [n] at 22,050 Hz, phonemes with their start samples, word starts."""

    audio: np.ndarray
    phonemes: list[str]
    phoneme_starts: np.ndarray  # [P] sample index where each phoneme begins
    word_starts: np.ndarray  # [W]


def _paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as e:
        raise FlowcoachError("the speech domain needs espeak-ng: pip install -e '.[speech]' (espeakng-loader)") from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50,
               word_gap: int = 0, volume: int = 100, ssml: bool = False) -> Rendering:
    """Render ``text`` with eSpeak NG. rate in words per minute (80-450), pitch and pitch_range 0-99
    (eSpeak's scale, default 50), word_gap in units of 10 ms, volume 0-200; ``ssml`` to read SSML
    markup (<emphasis>, <prosody>, <break>)."""
    import _ctypes

    lib_path, data_path = _paths()
    chunks: list[np.ndarray] = []
    events: list[tuple[int, int, bytes]] = []

    @_CALLBACK
    def collect(wav, n, ev):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while ev[i].type != _EVENT_END_OF_LIST:
            events.append((ev[i].type, ev[i].sample, bytes(ev[i].id).split(b"\0")[0]))
            i += 1
        return 0

    with _LOCK:
        lib = ctypes.CDLL(lib_path)
        try:
            rate_hz = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_PHONEME_EVENTS)
            if rate_hz != SAMPLE_RATE:
                raise FlowcoachError(f"libespeak-ng did not initialise (returned {rate_hz}); reinstall espeakng-loader")
            lib.espeak_SetSynthCallback(collect)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise FlowcoachError(f"eSpeak NG has no voice '{voice}' (try en-us, en-gb, en-us+f4)")
            lib.espeak_ng_SetRandSeed(_NOISE_SEED)
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_WORDGAP, word_gap),
                                 (_VOLUME, volume)):
                lib.espeak_SetParameter(param, int(value), 0)
            data = text.encode() + b"\0"
            flags = _CHARS_UTF8 | (_SSML if ssml else 0)
            if lib.espeak_Synth(data, len(data), 0, 0, 0, flags, None, None) != 0:
                raise FlowcoachError(f"eSpeak NG could not synthesise {text!r}")
            lib.espeak_Synchronize()
            lib.espeak_Terminate()
        finally:
            _ctypes.dlclose(lib._handle)  # the next utterance starts from a freshly loaded library
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    phon = [(s, p.decode("utf-8", "replace")) for t, s, p in events if t == _EVENT_PHONEME]
    words = [s for t, s, _ in events if t == _EVENT_WORD]
    return Rendering(audio=audio, phonemes=[p for _, p in phon],
                     phoneme_starts=np.array([s for s, _ in phon], dtype=np.int64),
                     word_starts=np.array(words, dtype=np.int64))
