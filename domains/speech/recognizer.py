"""A small character recogniser trained here, for the evaluator's character error rate (CER).

No speech recogniser with weights can run offline here (pocketsphinx's en-us model is useless on
eSpeak speech: WER 0.75-1.12, measured in the research notes), so this one is trained on the
corpus: CTC over characters (blank, space, a-z) from the log-mel re-computed from the vocoded
waveform (the same path samples take), with six dilated convolutions (0.3 M parameters; a GRU
was 5x slower per step on one CPU core). It learns from the training texts' renderings and is scored on the held-out
texts (new combinations of the same words), so its CER on generated speech says whether the words
are still recognisable, not only whether the spectra are close (MCD). Greedy CTC decoding; CER =
Levenshtein distance / reference length, pooled over utterances.

The shipped weights (``shipped/recognizer.*``, with the held-out CER of the eSpeak renderings in
its JSON) are made by ``python -m flowcoach.domains.speech.recognizer`` from the reference analysis
that ``python -m flowcoach.domains.speech.references`` caches.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.speech import audio
from flowcoach.domains.speech.corpus import split_rows

ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # index + 1 (0 is CTC's blank)
SHIPPED = Path(__file__).parent / "shipped"
RECOGNIZER = SHIPPED / "recognizer.safetensors"
MAX_CHARS = 48


def encode_text(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in text.lower() if c in ALPHABET]


def text_codes(texts: list[str]) -> torch.Tensor:
    """[B, MAX_CHARS] character ids (0 = padding): the form texts take in the condition dict."""
    out = torch.zeros(len(texts), MAX_CHARS, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = encode_text(t)[:MAX_CHARS]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def decode_codes(codes: torch.Tensor) -> str:
    return "".join(ALPHABET[int(c) - 1] for c in codes if int(c) > 0)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def character_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Pooled CER: total edits / total reference characters."""
    total = sum(len(r) for r in references)
    return sum(edit_distance(h, r) for h, r in zip(hypotheses, references)) / max(total, 1)


class Recognizer(nn.Module):
    """Dilated residual convolutions over frames (receptive field ~0.9 s), characters out."""

    def __init__(self, n_mels: int = audio.N_MELS, width: int = 96, dilations: tuple[int, ...] = (1, 2, 4, 8, 1)):
        super().__init__()
        self.inp = nn.Conv1d(n_mels, width, 5, padding=2)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 5, padding=2 * d, dilation=d) for d in dilations)
        self.norms = nn.ModuleList(nn.GroupNorm(8, width) for _ in dilations)
        self.out = nn.Conv1d(width, len(ALPHABET) + 1, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, N_MELS, L] normalised log-mel -> [B, L, classes] log-probabilities."""
        h = self.inp(mel)
        for conv, norm in zip(self.convs, self.norms):
            h = h + conv(F.gelu(norm(h)))
        return F.log_softmax(self.out(F.gelu(h)), dim=1).transpose(1, 2)


def mel_frames(mel: torch.Tensor) -> torch.Tensor:
    """[B] frames up to the last non-silent one (the rest is padding)."""
    content = ((mel - audio.SILENCE).abs() > 1e-3).any(dim=1)
    return torch.where(content.any(dim=1), content.shape[1] - content.flip(1).float().argmax(dim=1),
                       torch.ones(mel.shape[0], dtype=torch.long))


@torch.no_grad()
def greedy(model: Recognizer, mel: torch.Tensor) -> list[str]:
    frames = mel_frames(mel)
    best = model(mel).argmax(-1)
    texts = []
    for row, n in zip(best, frames):
        ids = torch.unique_consecutive(row[: int(n)])
        texts.append(decode_codes(ids[ids > 0]))
    return texts


def utterance_mels(utterances: list, frames: int) -> torch.Tensor:
    """[B, N_MELS, frames] normalised re-computed log-mels of decoded utterances, silence-padded."""
    x = torch.full((len(utterances), audio.N_MELS, frames), audio.SILENCE)
    for i, u in enumerate(utterances):
        n = min(frames, u.logmel.shape[1])
        x[i, :, :n] = audio.normalize(u.logmel[:, :n])
    return x


def train_recognizer(domain, inputs: np.ndarray, epochs: int = 15, batch: int = 32, lr: float = 3e-3,
                     seed: int = 0, say=print) -> tuple[Path, float]:
    from safetensors.torch import save_file

    corpus = domain.corpus
    texts = [str(corpus["texts"][t]) for t in corpus["meta"][:, 0]]
    targets = text_codes(texts)
    target_lengths = (targets > 0).sum(dim=1)
    mels = torch.from_numpy(inputs[:, : audio.N_MELS].astype(np.float32))
    frames = mel_frames(mels)
    train, held = split_rows(corpus, "train"), split_rows(corpus, "heldout")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Recognizer()
    steps = epochs * (len(train) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.from_numpy(train)[torch.randint(0, len(train), (batch,), generator=g)]
        logp = model(mels[idx])
        loss = ctc(logp.transpose(0, 1), targets[idx], frames[idx], target_lengths[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        schedule.step()
        if (step + 1) % (steps // 10) == 0:
            say(f"  recogniser step {step + 1}/{steps}: CTC loss {loss.item():.3f}")
    model.eval()
    cer = {name: character_error_rate(greedy(model, mels[rows]), [texts[i] for i in rows])
           for name, rows in (("heldout", held), ("train", train[:500]))}
    SHIPPED.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, RECOGNIZER)
    RECOGNIZER.with_suffix(".json").write_text(json.dumps({
        "style_key": domain.corpus_config.style_key(), "corpus_key": domain.corpus_config.key(), "epochs": epochs,
        "batch": batch, "lr": lr, "seed": seed, "train_rows": int(len(train)), "heldout_rows": int(len(held)),
        "heldout_cer": cer["heldout"], "train_cer_first_500": cer["train"],
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - start, 1),
        "command": "python -m flowcoach.domains.speech.recognizer"}, indent=2))
    return RECOGNIZER, cer["heldout"]


def available(style_key: str) -> bool:
    """Whether a shipped recogniser was made for this style key (the evaluator reports CER only then)."""
    made = json.loads(RECOGNIZER.with_suffix(".json").read_text()) if RECOGNIZER.exists() else {}
    return made.get("style_key") == style_key


@functools.lru_cache(maxsize=1)
def load_recognizer(style_key: str) -> Recognizer:
    from safetensors.torch import load_file

    made = json.loads(RECOGNIZER.with_suffix(".json").read_text()) if RECOGNIZER.exists() else {}
    if made.get("style_key") != style_key:
        raise FlowcoachError(f"no recogniser for style key {style_key} at {RECOGNIZER}; make it with "
                             "`python -m flowcoach.domains.speech.recognizer`")
    model = Recognizer()
    model.load_state_dict(load_file(RECOGNIZER))
    return model.eval()


def recognise(utterances: list, frames: int, style_key: str) -> list[str]:
    if not utterances:
        return []
    return greedy(load_recognizer(style_key), utterance_mels(utterances, frames))


def main() -> int:
    from flowcoach.domains.speech import SpeechDomain
    from flowcoach.domains.speech.references import analyse_references

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    domain = SpeechDomain()
    start, cpu = time.perf_counter(), time.process_time()
    refs = analyse_references(domain)
    path, cer = train_recognizer(domain, refs["inputs"])
    print(f"recogniser written to {path}: held-out CER {cer:.3f} on the eSpeak renderings")
    print(f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
