"""The speech domain: eSpeak determinism, the corpus, pitch against synthetic tones, prosody features
and MCD against hand values, the vocoder round trip, every reward on good and bad utterances, the
model's padding and inputs, check_domain, the shipped base and classifier, and a tiny pretrain + RL run.

A small corpus (the first 8 texts of the seeded text bank, 80 utterances, built in ~3 s and cached)
serves most tests; its held-out rows are the same renderings as the full corpus' first held-out rows.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("espeakng_loader")
pytest.importorskip("soundfile")

from flowcoach.core.domain import check_domain  # noqa: E402
from flowcoach.core.registry import REWARDS, FlowcoachError  # noqa: E402
from flowcoach.core.trainer import generate  # noqa: E402
from flowcoach.domains.speech import SpeechDomain, audio  # noqa: E402
from flowcoach.domains.speech.corpus import (STYLE_NAMES, CorpusConfig, build, frame_alignment,  # noqa: E402
                                             split_rows, style_markup)
from flowcoach.domains.speech.decode import decode, sample_frames, utterance_of  # noqa: E402
from flowcoach.domains.speech.espeak import synthesize  # noqa: E402
from flowcoach.rewards import build_reward  # noqa: E402
from flowcoach.rewards.speech import band_score  # noqa: E402

TINY = CorpusConfig(texts=8, heldout_texts=2)
SR = audio.SAMPLE_RATE


@pytest.fixture(scope="module")
def tiny():
    return SpeechDomain(corpus=TINY)


@pytest.fixture(scope="module")
def refs(tiny):
    """Decoded (vocoded, re-analysed) renderings of the tiny corpus' training rows, with their conditions."""
    rows = split_rows(tiny.corpus, "train")[:30]
    return decode(tiny.mels()[rows]), tiny.conditions(rows), rows


def tone(freq, seconds=1.5, harmonics=1, amplitude=0.3):
    t = torch.arange(int(seconds * SR)) / SR
    phase = 2 * math.pi * (freq * t if callable(freq) is False else freq(t))
    return amplitude * sum(torch.sin(k * phase) / k for k in range(1, harmonics + 1))


# ----------------------------------------------------------------------------- eSpeak and the corpus
def test_espeak_rendering_is_a_pure_function_of_its_settings():
    a = synthesize("The dog found the key.", voice="en-us+f4", rate=150, pitch=40, pitch_range=70)
    synthesize("Where is it?", rate=220, pitch=80, pitch_range=99, word_gap=3)  # a different predecessor
    b = synthesize("The dog found the key.", voice="en-us+f4", rate=150, pitch=40, pitch_range=70)
    assert len(a.audio) > 10_000 and np.array_equal(a.audio, b.audio)
    assert a.phonemes == b.phonemes and np.array_equal(a.phoneme_starts, b.phoneme_starts)
    assert np.all(np.diff(a.phoneme_starts) >= 0) and a.phoneme_starts[-1] <= len(a.audio)
    code = ("import hashlib; from flowcoach.domains.speech.espeak import synthesize; "
            "r = synthesize('The dog found the key.', voice='en-us+f4', rate=150, pitch=40, pitch_range=70); "
            "print(hashlib.sha1(r.audio.tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    assert other == hashlib.sha1(a.audio.tobytes()).hexdigest()  # the same in a fresh process


def test_bad_voice_is_a_one_line_error():
    with pytest.raises(FlowcoachError, match="no voice"):
        synthesize("Hello.", voice="xx-nonexistent")


def test_corpus_generator_is_deterministic():
    cfg = CorpusConfig(texts=2, heldout_texts=1)
    first = build(cfg, say=lambda *a: None)
    synthesize("Something else in between.", pitch=90)
    second = build(cfg, say=lambda *a: None)
    assert first.keys() == second.keys()
    for k in first:
        assert np.array_equal(first[k], second[k]), k
    meta = first["meta"]
    assert len(meta) == 2 * len(STYLE_NAMES) * 2 and set(meta[:, 1]) == set(range(len(STYLE_NAMES)))
    assert CorpusConfig(texts=2).key() != CorpusConfig(texts=3).key()


def test_styles_are_rendered_with_their_markup():
    assert style_markup("The dog found the key", "question").endswith('<prosody pitch="+35%">key</prosody>?</speak>')
    assert '<emphasis level="strong">found</emphasis>' in style_markup("The dog found the key", "emphatic")
    assert '<emphasis level="strong">found</emphasis>' in style_markup("We found the key", "emphatic")
    assert style_markup("The dog found the key", "excited") == "The dog found the key!"


def test_frame_alignment_by_hand():
    # phonemes start at 0, 500, 1200 (22,050 Hz); frame k is centred on k * 256 * 22050 / 16000 = k * 352.8
    idx, pos, length = frame_alignment(np.array([0, 500, 1200]), 5)
    assert idx.tolist() == [0, 0, 1, 1, 2]
    assert length.tolist() == [2, 2, 2, 2, 1]
    np.testing.assert_allclose(pos, [0.25, 0.75, 0.25, 0.75, 0.5])


def test_tiny_corpus_splits_and_conditions(tiny):
    train, held = split_rows(tiny.corpus, "train"), split_rows(tiny.corpus, "heldout")
    meta = tiny.corpus["meta"]
    assert set(meta[held, 0]) <= {0, 1} and not set(meta[train, 0]) & set(meta[held, 0])
    x0, cond = tiny.data("train")
    assert x0.shape == (len(train), audio.N_MELS, tiny.max_frames)
    for i in range(3):  # padding is exactly silence, the length is where it starts
        n = int(cond["length"][i])
        assert torch.all(x0[i, :, n:] == audio.SILENCE) and n == meta[train[i], 3]
        assert torch.all(cond["tokens"][i, :n] > 1) and torch.all(cond["tokens"][i, n:] == 0)
    with pytest.raises(FlowcoachError, match="unknown split"):
        tiny.data("test")


# ----------------------------------------------------------------------------- pitch and prosody
@pytest.mark.parametrize("freq", [75.0, 110.0, 180.0, 260.0, 400.0])
def test_pitch_recovers_a_synthetic_tone_within_2_percent(freq):
    for wave in (tone(freq), tone(freq, harmonics=8)):
        a = audio.analyse(wave)
        inner = a.voiced[3:-3]
        assert inner.float().mean() > 0.95
        err = (a.f0[3:-3][inner] - freq).abs() / freq
        assert err.max() < 0.02, (freq, float(err.max()))


def test_pitch_follows_a_glide_and_rejects_noise_and_silence():
    seconds, f_start, f_end = 2.0, 100.0, 200.0
    wave = tone(lambda t: f_start * t + (f_end - f_start) * t ** 2 / (2 * seconds), seconds, harmonics=4)
    a = audio.analyse(wave)
    t = torch.arange(len(a.f0)) * audio.HOP / SR  # frame k is centred on sample k * HOP
    truth = f_start + (f_end - f_start) * t / seconds
    inner = a.voiced.clone()
    inner[:4] = inner[-4:] = False
    assert inner.float().mean() > 0.9
    assert ((a.f0[inner] - truth[inner]).abs() / truth[inner]).max() < 0.02
    noise = audio.analyse(0.3 * torch.randn(SR, generator=torch.Generator().manual_seed(0)))
    assert noise.voiced.float().mean() < 0.1
    silence = audio.analyse(torch.zeros(SR))
    assert not silence.voiced.any() and all(math.isnan(v) for v in silence.features.values())


def test_prosody_features_by_hand():
    frames = 100
    f0 = torch.zeros(frames)
    voiced = torch.zeros(frames, dtype=torch.bool)
    voiced[10:90] = True  # 80 voiced frames: 60 at 100 Hz then 20 at 200 Hz (one octave up)
    voiced[40:43] = False  # ... with a 3-frame gap: two voiced runs
    f0[10:70], f0[70:90] = 100.0, 200.0
    f0[40:43] = 0.0
    energy = torch.full((frames,), -100.0)
    energy[10:90] = torch.tensor([-20.0, -30.0]).repeat(40)
    active = energy > -60
    feats = audio.prosody(f0, voiced, energy, active)
    # voiced semitones: 57 frames at 0 and 20 at 12 -> median 0, p90 12, p10 0; last quarter all at 12
    assert feats["f0_level"] == 0.0 and feats["f0_range"] == pytest.approx(12.0)
    assert feats["final_rise"] == pytest.approx(12.0)
    assert feats["energy_std"] == pytest.approx(float(torch.tensor([-20.0, -30.0]).repeat(40).std()))
    assert feats["pause_ratio"] == 0.0 and feats["voiced_fraction"] == pytest.approx(77 / 80)
    assert feats["rate"] == pytest.approx(2 / (80 * audio.HOP / SR))


# ----------------------------------------------------------------------------- vocoder and MCD
def test_mel_waveform_mel_round_trip_error_is_bounded(refs):
    r = synthesize("The farmer sold the horse.")
    wave = audio.resample(r.audio / 32768.0 * 0.5, 22_050)
    mel = audio.log_mel(wave)
    back = audio.vocode(mel)
    assert back.shape[-1] == (mel.shape[-1] - 1) * audio.HOP
    mel2 = audio.log_mel(back)
    active = mel > math.log(audio.MEL_FLOOR) + 3.0  # bins well above the floor
    err = (mel2[:, : mel.shape[1]] - mel)[active].abs().mean()
    assert err < 0.2, float(err)  # measured 0.12 (nats of mel amplitude) with 32 iterations
    assert audio.mel_cepstral_distortion(mel, mel) == 0.0
    assert audio.mel_cepstral_distortion(mel2, mel) < 12.0  # the vocoder's own floor, measured 8-11 dB
    torch.testing.assert_close(audio.vocode(mel), back)  # zero initial phase: deterministic


def test_dtw_against_brute_force():
    import itertools

    rng = np.random.default_rng(0)
    cost = rng.random((3, 4))

    def paths(i, j):
        if (i, j) == (0, 0):
            yield [(0, 0)]
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i - di >= 0 and j - dj >= 0:
                for p in paths(i - di, j - dj):
                    yield p + [(i, j)]

    best = min(paths(2, 3), key=lambda p: sum(cost[a] for a in p))
    total, steps = audio.dtw_cost(cost)
    assert total == pytest.approx(sum(cost[a] for a in best)) and steps == len(best)
    assert list(itertools.islice(paths(1, 1), 5))  # the enumerator itself works


def test_mcd_of_a_known_cepstral_shift():
    torch.manual_seed(0)
    base = torch.full((audio.N_MELS, 30), -2.0) + 0.1 * torch.randn(audio.N_MELS, 30)
    basis = audio._dct()[:, 3]  # orthonormal DCT-II basis of c3
    delta = 0.05
    shifted = base + delta * basis[:, None]
    expected = 10 / math.log(10) * math.sqrt(2) * delta  # only c3 moves, by delta, on every frame
    assert audio.mel_cepstral_distortion(shifted, base) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose((audio.cepstra(shifted) - audio.cepstra(base))[:, 2], delta, rtol=1e-4)


# ----------------------------------------------------------------------------- decode
def test_decode_reads_the_length_and_survives_bad_samples(tiny):
    x = tiny.mels()[:3].clone()
    n = tiny.conditions(np.arange(3))["length"]
    assert torch.all(sample_frames(x) <= n) and torch.all(sample_frames(x) >= n - 8)  # trailing silence
    x[1] = float("nan")
    x[2] = audio.SILENCE
    out = decode(x)
    assert not out[0].invalid and not out[0].silent and out[0].frames == int(sample_frames(x[:1])[0])
    assert out[1].invalid and out[2].silent
    loud = decode(tiny.mels()[:1] + 4.0 / audio.MEL_SCALE)[0]  # e^4 = 55 times louder: clips
    assert loud.clipped > 0.001


def test_save_writes_wavs_contours_and_features(refs, tmp_path):
    import soundfile as sf

    objects = refs[0][:3]
    files = SpeechDomain(corpus=TINY).save(objects, torch.tensor([0.5, 0.1, -1.0]), tmp_path)
    names = {f.name for f in files}
    assert {"000.wav", "002.wav", "f0_contours.png", "samples.json"} <= names
    wave, sr = sf.read(tmp_path / "000.wav")
    assert sr == SR and len(wave) == len(objects[0].wave)
    record = json.loads((tmp_path / "samples.json").read_text())[0]
    assert record["reward"] == 0.5 and record["f0_level"] == pytest.approx(objects[0].analysis.features["f0_level"], abs=1e-3)


# ----------------------------------------------------------------------------- rewards
def test_band_score_is_a_bounded_bump_not_more_is_better():
    assert band_score(1.0, 0.0, 2.0, 0.5) == 1.0 == band_score(2.0, 0.0, 2.0, 0.5)
    below, above, far = band_score(-0.5, 0.0, 2.0, 0.5), band_score(2.5, 0.0, 2.0, 0.5), band_score(4.0, 0.0, 2.0, 0.5)
    assert below == pytest.approx(math.exp(-0.5)) == pytest.approx(above) and far < above
    assert band_score(float("nan"), 0.0, 2.0, 0.5) == 0.0


def _other_style(cond, tiny):
    """The same conditions asking for the most different style: sad <-> excited, the rest -> sad."""
    swap = {0: 2, 1: 2, 2: 1, 3: 2, 4: 2}
    other = dict(cond)
    other["style"] = torch.tensor([swap[int(s)] for s in cond["style"]])
    other["bands"] = tiny.bands()[cond["voice"], other["style"]]
    return other


def test_prosody_reward_prefers_the_asked_style(refs, tiny):
    objects, cond, _ = refs
    own, info = REWARDS.get("speech-prosody")(objects, cond)
    other, _ = REWARDS.get("speech-prosody")(objects, _other_style(cond, tiny))
    assert ((own >= 0) & (own <= 1)).all() and info["invalid"] == 0
    assert own.mean() > 0.75 and own.mean() > other.mean() + 0.2
    assert (own > other).float().mean() > 0.8


def test_mcd_reward_prefers_the_same_text(refs):
    objects, cond, _ = refs
    own, info = REWARDS.get("speech-mcd")(objects, cond)
    shuffled = dict(cond)
    perm = torch.roll(torch.arange(len(objects)), 10)  # another text (10 renderings per text, in order)
    shuffled["ref"], shuffled["length"] = cond["ref"][perm], cond["length"][perm]
    theirs, _ = REWARDS.get("speech-mcd")(objects, shuffled)
    assert (own > theirs).float().mean() > 0.9 and info["mcd_mean"] < 13.0


def test_voicing_and_clipping_penalties(refs):
    objects, cond, _ = refs
    voiced, _ = REWARDS.get("speech-voicing")(objects[:6], {k: v[:6] for k, v in cond.items()})
    assert (voiced > -0.1).all()
    whisper = [utterance_of(torch.randn(len(u.wave), generator=torch.Generator().manual_seed(i)) * 0.05
                            * torch.from_numpy(np.abs(u.wave) > 0.01).float(), u.frames) for i, u in enumerate(objects[:6])]
    collapsed, info = REWARDS.get("speech-voicing")(whisper, {k: v[:6] for k, v in cond.items()})
    assert collapsed.mean() < -0.5 and info["collapsed"] >= 5
    clean, _ = REWARDS.get("speech-clipping")(objects[:6])
    loud = [utterance_of(torch.from_numpy(u.wave) * 20, u.frames) for u in objects[:6]]
    clipped, info = REWARDS.get("speech-clipping")(loud)
    assert (clean == 0).all() and (clipped < -0.5).all() and info["clipped"] == 6


def test_every_reward_scores_invalid_and_silent_utterances(tiny):
    x = tiny.mels()[:3].clone()
    x[0] = float("nan")
    x[1] = audio.SILENCE
    objects = decode(x)
    cond = tiny.conditions(np.arange(3))
    for name in ("speech-prosody", "speech-mcd", "speech-voicing", "speech-clipping"):
        scores, info = REWARDS.get(name)(objects, cond)
        assert scores.shape == (3,) and torch.isfinite(scores).all() and info["invalid"] >= 1, name
        assert scores[0] <= scores[2] and (name == "speech-clipping" or scores[1] <= scores[2]), name
    with pytest.raises(FlowcoachError, match="speech domain's conditions"):
        REWARDS.get("speech-prosody")(objects, torch.zeros(3))


def test_default_reward_ranks_a_rendering_above_noise(refs, tiny):
    objects, cond, _ = refs
    noise = [utterance_of(0.1 * torch.randn(len(u.wave), generator=torch.Generator().manual_seed(i)), u.frames)
             for i, u in enumerate(objects[:8])]
    reward = build_reward(tiny.default_rewards())
    good, _ = reward(objects[:8], {k: v[:8] for k, v in cond.items()})
    bad, _ = reward(noise, {k: v[:8] for k, v in cond.items()})
    assert (good > bad).all()


# ----------------------------------------------------------------------------- model
def test_model_pads_with_silence_and_never_reads_reward_keys(tiny):
    torch.manual_seed(0)
    model = tiny.build_model(**{**tiny.model_config(), "width": 32, "text_width": 32}).eval()
    cond = tiny.conditions(np.arange(4))
    x = torch.randn(4, audio.N_MELS, tiny.max_frames)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    v = model(x, t, cond)
    n = cond["length"]
    for i in range(4):  # the exact flow to silence on padding
        torch.testing.assert_close(v[i, :, n[i]:], (x[i, :, n[i]:] - audio.SILENCE) / t[i])
    tampered = {**cond, "ref": torch.randn_like(cond["ref"]), "bands": torch.randn_like(cond["bands"]),
                "text": torch.zeros_like(cond["text"])}
    torch.testing.assert_close(model(x, t, tampered), v)
    x2 = x.clone()
    x2[0, :, n[0]:] = torch.randn_like(x2[0, :, n[0]:])  # other noise in the padding only
    torch.testing.assert_close(model(x2, t, cond)[0, :, : n[0]], v[0, :, : n[0]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x, t, {**cond, "style": (cond["style"] + 1) % 5}), v)
    samples = generate(model, tiny, cond, num_steps=4)
    for i in range(4):
        assert torch.all(samples[i, :, n[i]:] == audio.SILENCE)


# ----------------------------------------------------------------------------- contract, base, classifier
def test_check_domain_on_the_tiny_corpus_with_the_shipped_base(tiny):
    passed = check_domain(tiny)
    assert len(passed) >= 11 and ("base checkpoint loads" in passed or tiny.base_checkpoint() is None)


def test_shipped_classifier_recognises_held_out_renderings(tiny):
    from flowcoach.domains.speech.classifier import CLASSIFIER, predict_styles

    record = json.loads(CLASSIFIER.with_suffix(".json").read_text())
    assert record["heldout_accuracy"] >= 0.9 and record["corpus_key"] == CorpusConfig().key()
    assert record["style_key"] == TINY.style_key() == CorpusConfig().style_key()
    rows = split_rows(tiny.corpus, "heldout")  # the full corpus' first held-out renderings
    pred = predict_styles(decode(tiny.mels()[rows]), tiny.max_frames, TINY.style_key())
    assert (pred == torch.from_numpy(tiny.corpus["meta"][rows, 1])).float().mean() >= 0.8


def test_intonation_contours_ignore_timing_and_its_classifier_is_shipped(refs):
    from flowcoach.domains.speech.classifier import INTONATION, classifier_inputs, contour_inputs

    objects = refs[0][:4]
    x = classifier_inputs(objects, 160)
    stretched = torch.full((4, x.shape[1], 320), 0.0)
    stretched[:, :, :] = x.repeat_interleave(2, dim=-1)  # every frame twice: the same speech, half as fast
    a, b = contour_inputs(x), contour_inputs(stretched)
    assert (a - b).abs().mean() < 0.02 and a[:, 0].abs().sum() > 0
    record = json.loads(INTONATION.with_suffix(".json").read_text())
    assert record["heldout_accuracy"] >= 0.9 and record["style_key"] == TINY.style_key()


def test_cer_by_hand_and_the_shipped_recogniser_on_held_out_renderings(tiny):
    from flowcoach.domains.speech.recognizer import (RECOGNIZER, character_error_rate, decode_codes, edit_distance,
                                                     recognise, text_codes)

    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert character_error_rate(["the dog", "a cat"], ["the dog", "a bat"]) == pytest.approx(1 / 12)
    assert decode_codes(text_codes(["The dog found the key"])[0]) == "the dog found the key"
    if not RECOGNIZER.exists():
        pytest.skip("no shipped recogniser yet")
    record = json.loads(RECOGNIZER.with_suffix(".json").read_text())
    assert record["heldout_cer"] < 0.15 and record["style_key"] == TINY.style_key()
    rows = split_rows(tiny.corpus, "heldout")
    objects = decode(tiny.mels()[rows])
    texts = [decode_codes(t) for t in tiny.conditions(rows)["text"]]
    assert character_error_rate(recognise(objects, tiny.max_frames, TINY.style_key()), texts) < 0.2
    noise = [utterance_of(0.1 * torch.randn(len(u.wave), generator=torch.Generator().manual_seed(i)), u.frames)
             for i, u in enumerate(objects[:5])]
    assert character_error_rate(recognise(noise, tiny.max_frames, TINY.style_key()), texts[:5]) > 0.6


def test_shipped_base_meets_its_recorded_figures_on_a_held_out_subset(tiny):
    from flowcoach.core.checkpoint import load_base

    if tiny.base_checkpoint() is None:
        pytest.skip("no shipped base yet")
    model, record = load_base(tiny)
    recorded = record["eval"]["metrics"]
    cond = tiny.eval_conditions(20)  # texts 0-1 of the held-out split: all styles and voices
    objects = tiny.decode(generate(model.eval(), tiny, cond, record["eval"]["num_steps"], seed=12345))
    metrics = tiny.evaluate(objects, cond)
    assert metrics["invalid_rate"] == 0.0 and metrics["silent_rate"] == 0.0
    assert metrics["style_accuracy"] >= recorded["style_accuracy"] - 0.25
    assert metrics["mcd"] <= recorded["mcd"] + 1.5
    torch.manual_seed(0)
    untrained = tiny.build_model(**tiny.model_config()).eval()
    worse = tiny.evaluate(tiny.decode(generate(untrained, tiny, cond, 10, seed=12345)), cond)
    assert worse["mcd"] > metrics["mcd"] + 3.0


def test_tiny_pretrain_then_flow_grpo_run(tiny, tmp_path):
    from flowcoach.core.config import TrainConfig
    from flowcoach.core.pretrain import PretrainConfig, pretrain
    from flowcoach.core.trainer import train

    small = SpeechDomain(corpus=TINY, width=16, text_width=16, attention_blocks=0)
    base = pretrain(PretrainConfig(domain="speech", steps=3, batch_size=4, eval_samples=4, eval_num_steps=2,
                                   output=str(tmp_path / "base")), domain=small)
    assert "style_accuracy" in json.loads((base / "base.json").read_text())["eval"]["metrics"]
    cfg = TrainConfig(domain="speech", steps=2, base=str(base), output_dir=str(tmp_path / "runs"),
                      groups_per_step=2, group_size=2, eval_samples=4, sample_every=1, tensorboard=False)
    cfg.sampler.num_steps = 3
    cfg.sampler.eval_num_steps = 2
    run = train(cfg, domain=small)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and "reward/speech-prosody" in lines[0] and "eval/style_accuracy" in lines[-1]
    assert (run / "samples" / "step-1" / "f0_contours.png").exists()
    assert (run / "eval" / "samples" / "000.wav").exists()


@pytest.mark.slow
def test_shipped_base_reproduces_its_recorded_figures():
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.trainer import evaluate_model

    d = SpeechDomain()
    model, record = load_base(d)
    ev = record["eval"]
    metrics, _, _ = evaluate_model(model.eval(), d, ev["num_samples"], ev["num_steps"], seed=ev["seed"])
    for key in ("style_accuracy", "mcd", "in_band", "reward_mean"):
        assert abs(metrics[key] - ev["metrics"][key]) < 1e-4, key
