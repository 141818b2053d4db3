"""The speech velocity model: a Matcha-TTS-style conditional flow-matching decoder over mel frames.

Matcha-TTS (arXiv 2309.03199) encodes the phonemes, upsamples them to frames by their durations,
and decodes mel frames with a flow-matching 1-D U-Net whose input is the noisy mel concatenated
with the encoded text. Here, at CPU size:

- Text: each frame carries the eSpeak phoneme it falls in (durations from eSpeak's phoneme events,
  ``corpus``), its position inside that phoneme and the phoneme's length. A frame-level encoder
  (token embedding + style + voice, then dilated residual convolutions) gives the text features.
- Decoder: the core's 1-D U-Net (``flowcoach.core.nets.unet1d``) over [noisy mel, text features],
  with FiLM from the time, style and voice embedding, and self-attention over the bottleneck
  frames (the core's adaLN transformer block) so the pitch contour can be planned over the whole
  utterance.
- Frames past the asked length get the exact flow toward silence: with x_t = (1 - t) s + t eps the
  velocity is (x_t - s) / t, so every sampler ends them at ``audio.SILENCE`` and ``decode`` reads
  the length off the sample. The network never sees those frames (they are set to silence at its
  input), so a sample does not depend on the noise in its padding.

The model reads only the condition keys ``tokens``, ``position``, ``phone_frames``, ``style``,
``voice`` and ``length``; what rewards and the evaluator use (``ref``, ``bands``, ``text``) is never
an input (tests check it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowcoach.core.nets.transformer import AdaLNBlock
from flowcoach.core.nets.unet1d import UNet1DVelocity, _norm
from flowcoach.domains.speech.audio import N_MELS, SILENCE

T_MIN = 1e-4  # the padding velocity divides by t; Heun evaluates at t = 0
MODEL_KEYS = ("tokens", "position", "phone_frames", "style", "voice", "length")


def frame_mask(length: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, frames] bool, True for the first ``length`` frames of each row."""
    return torch.arange(frames, device=length.device)[None, :] < length.long()[:, None]


class TextEncoder(nn.Module):
    """Per-frame text features [B, width, L] from phoneme tokens, position features, style and voice."""

    def __init__(self, vocab: int, styles: int, voices: int, width: int, layers: int = 3, kernel: int = 5):
        super().__init__()
        self.token = nn.Embedding(vocab, width, padding_idx=0)
        self.frame = nn.Linear(2, width)
        self.style = nn.Embedding(styles, width)
        self.voice = nn.Embedding(voices, width)
        self.convs = nn.ModuleList(
            nn.Conv1d(width, width, kernel, padding=(kernel // 2) * 3 ** k, dilation=3 ** k) for k in range(layers))
        self.norms = nn.ModuleList(_norm(width, 8) for _ in range(layers))

    def forward(self, cond: dict, mask: torch.Tensor) -> torch.Tensor:
        frame_feats = torch.stack([cond["position"].float(), cond["phone_frames"].float() / 10.0], dim=-1)
        h = self.token(cond["tokens"].long()) + self.frame(frame_feats)
        h = h + (self.style(cond["style"].long()) + self.voice(cond["voice"].long()))[:, None]
        m = mask[:, None].to(h.dtype)
        h = h.transpose(1, 2) * m
        for conv, norm in zip(self.convs, self.norms):
            h = (h + conv(F.gelu(norm(h)))) * m
        return h


class SpeechUNet(UNet1DVelocity):
    """The core's 1-D U-Net over [mel, text] channels, mel channels out, attention at the bottleneck."""

    def __init__(self, mel_channels: int, text_channels: int, width: int, mults: tuple[int, int], cond_dim: int,
                 attention_blocks: int, heads: int):
        super().__init__(mel_channels + text_channels, width=width, mults=mults, cond_dim=cond_dim)
        c = width * mults[0]
        self.out[-1] = nn.Conv1d(c, mel_channels, 3, padding=1)  # predict the mel's velocity only
        bottleneck = width * mults[-1]
        self.emb_to_mid = nn.Linear(width, bottleneck)
        self.attention = nn.ModuleList(AdaLNBlock(bottleneck, heads) for _ in range(attention_blocks))

    def forward(self, h_in: torch.Tensor, t: torch.Tensor, cond_vector: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t, cond_vector)
        length = h_in.shape[-1]
        h = self.inp(F.pad(h_in, (0, -length % 2 ** self.levels)))
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid[0](h, emb)
        if len(self.attention):
            keep = F.max_pool1d(F.pad(mask.float(), (0, -length % 2 ** self.levels))[:, None],
                                2 ** self.levels)[:, 0] > 0  # bottleneck frames with any real frame
            seq, e = h.transpose(1, 2), self.emb_to_mid(emb)
            for block in self.attention:
                seq = block(seq, e, keep[:, None, None, :])
            h = seq.transpose(1, 2)
        h = self.mid[1](h, emb)
        for up, block in zip(self.ups, self.up_blocks):
            h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)[..., :length]


class SpeechVelocity(nn.Module):
    """v(x_t, t, cond) for normalised log-mels x [B, N_MELS, L]; cond is the domain's condition dict."""

    def __init__(self, vocab: int, styles: int = 5, voices: int = 2, n_mels: int = N_MELS, width: int = 96,
                 mults: tuple[int, int] = (1, 2), text_width: int = 96, text_layers: int = 3,
                 attention_blocks: int = 1, heads: int = 4):
        super().__init__()
        self.styles, self.voices = styles, voices
        self.text = TextEncoder(vocab, styles, voices, text_width, text_layers)
        self.unet = SpeechUNet(n_mels, text_width, width, tuple(mults), styles + voices, attention_blocks, heads)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        B, _, L = x_t.shape
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1).expand(B)
        mask = frame_mask(cond["length"].to(x_t.device), L)
        m = mask[:, None].to(x_t.dtype)
        x_in = x_t * m + SILENCE * (1 - m)  # the network never sees the padding's noise
        text = self.text(cond, mask)
        cond_vector = torch.cat([F.one_hot(cond["style"].long(), self.styles),
                                 F.one_hot(cond["voice"].long(), self.voices)], dim=-1).to(x_t.dtype)
        v = self.unet(torch.cat([x_in, text], dim=1), t, cond_vector, mask)
        v_pad = (x_t - SILENCE) / t.clamp_min(T_MIN)[:, None, None]
        return torch.where(mask[:, None], v, v_pad)
