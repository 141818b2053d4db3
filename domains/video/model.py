"""The video domain's velocity model: a diffusers ``WanTransformer3DModel`` in pixel space, conditioned
on the scene and its initial state through ``encoder_hidden_states``.

The condition vector [COND_DIM] becomes COND_DIM tokens: each number through the same Fourier
features and linear map, plus a learned embedding of its slot, so the transformer's cross-attention
reads "which scene" and "which initial state" from separate tokens (Wan's text path, with a
9-token "prompt" of numbers instead of UMT5 embeddings). The transformer itself is Wan's as
diffusers ships it, behind the core's ``DiffusersVelocity``.

The transformer's output is an estimate of x0 / t, and the model returns the velocity
v = x_t / max(t, T_MIN) - out (= (x_t - x0_hat) / t with x0_hat = t * out). Two measured failures
chose this form. Predicting v (or eps) directly needs the noise of every pixel in the output, and a
patch of 2 x 4 x 4 x 3 = 96 pixels goes through a 64-wide token: after 300 pretraining steps the
samples were still pure noise. Predicting x0 itself (JiT, Li and He 2025) removes the noise from the
target, but under the core's v-loss with t ~ U(0, 1) the network's error is then weighted by 1/t^2,
so the high-noise steps that place the objects get ~2% of the gradient: a 640-step base sampled
speckles and no object (physics pass 0.000, trajectory RMSE 7.9 px). Predicting x0 / t keeps the
target noise-free and weights the network's error evenly over t, as v-prediction does.

LoRA: with ``lora_rank > 0`` the model becomes an RL policy when its base weights are loaded
(``load_state_dict``, which is how ``load_base`` and ``load_trained`` load a base): a peft adapter is
added to the transformer's attention projections (the core's ``add_lora``: A gaussian, B = 0, so it
starts at the base), everything else is frozen, and the reference policy is the disabled adapter.
Pretraining builds the model and trains every weight, without an adapter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from flowcoach.core.nets.diffusers_wrapper import DiffusersVelocity, add_lora

T_MIN = 0.05  # floor of t in x_t / t (JiT's clamp); a 20-step grid never goes below it


class StateTokens(nn.Module):
    """[B, D] numbers in about [-1, 1] -> [B, D, dim] tokens (Fourier features + slot embedding)."""

    def __init__(self, cond_dim: int, dim: int, frequencies: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32) / 2, persistent=False)
        self.value = nn.Linear(2 * frequencies + 1, dim)
        self.slot = nn.Parameter(torch.randn(cond_dim, dim) * 0.02)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        v = cond.float()[..., None]
        features = torch.cat([v, torch.sin(v * self.freqs), torch.cos(v * self.freqs)], dim=-1)
        return self.value(features) + self.slot


def position_channels(frames: int, height: int, width: int, frequencies: tuple[int, int, int] = (3, 4, 4)) -> torch.Tensor:
    """Fourier features of each pixel's (frame, y, x): [C, frames, height, width], C = 2 * sum(frequencies).

    Wan has no absolute position embedding (RoPE in self-attention is relative; the patch embedding
    and cross-attention see none), so from pure noise it cannot tell where in the frame a token is,
    and the condition cannot say where to draw an object. These channels, concatenated to x_t, give
    the patch embedding every pixel's place: per axis sin / cos of pi * 2^k * u, u in [-1, 1],
    periods from the whole axis down to 1 / 2^(k-1) of it.
    """
    axes = []
    for size, k in zip((frames, height, width), frequencies):
        u = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
        f = math.pi * 2.0 ** torch.arange(k, dtype=torch.float32)
        axes.append(torch.cat([torch.sin(u[:, None] * f), torch.cos(u[:, None] * f)], dim=1))  # [size, 2k]
    t_, h_, w_ = axes
    grids = [t_[:, None, None, :].expand(frames, height, width, -1), h_[None, :, None, :].expand(frames, height, width, -1),
             w_[None, None, :, :].expand(frames, height, width, -1)]
    return torch.cat(grids, dim=-1).permute(3, 0, 1, 2).contiguous()


class VideoVelocity(nn.Module):
    """v(x_t, t, cond) for clips x [B, 3, frames, H, W] (pixel values in [-1, 1]); cond [B, COND_DIM]."""

    def __init__(self, cond_dim: int, channels: int = 3, patch: tuple[int, int, int] = (2, 4, 4), heads: int = 4,
                 head_dim: int = 16, layers: int = 4, ffn: int = 256, text_dim: int = 32, freq_dim: int = 64,
                 lora_rank: int = 0, lora_alpha: float | None = None, position_frequencies: tuple[int, int, int] = (3, 4, 4)):
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.state_tokens = StateTokens(cond_dim, text_dim)
        self.position_frequencies = tuple(int(k) for k in position_frequencies)
        extra = 2 * sum(self.position_frequencies)
        self.net = DiffusersVelocity(WanTransformer3DModel(
            patch_size=tuple(patch), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels + extra,
            out_channels=channels, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn, num_layers=layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64))
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * self.lora_rank

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        tb = torch.as_tensor(t, device=x_t.device).float().expand(x_t.shape[0]).reshape(-1, *([1] * (x_t.dim() - 1)))
        pos = position_channels(*x_t.shape[2:], self.position_frequencies).to(x_t)
        inputs = torch.cat([x_t, pos.expand(x_t.shape[0], *pos.shape)], dim=1) if pos.shape[0] else x_t
        out = self.net(inputs, t, {"encoder_hidden_states": self.state_tokens(cond)})
        return x_t / tb.clamp_min(T_MIN) - out  # out estimates x0 / t: the clean clip is t * out

    # ------------------------------------------------------------------ LoRA
    @property
    def has_adapter(self) -> bool:
        return self.net.has_adapter

    @contextmanager
    def disable_adapter(self) -> Iterator["VideoVelocity"]:
        with self.net.disable_adapter():
            yield self

    def add_adapter(self) -> None:
        """Add the LoRA adapter (rank ``lora_rank``) and freeze every other weight."""
        add_lora(self.net, rank=self.lora_rank, alpha=self.lora_alpha)
        self.state_tokens.requires_grad_(False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads base weights (saved without an adapter); with ``lora_rank > 0`` the adapter is added
        afterwards, so a loaded base is a LoRA policy that starts exactly at the base."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.lora_rank > 0 and not self.has_adapter:
            self.add_adapter()
        return result
