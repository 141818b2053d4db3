"""Flow-GRPO on a real diffusers text-to-video pipeline (Wan 2.1): the path a GPU user takes.

``PipelineVideoDomain`` puts a ``diffusers.WanPipeline`` behind the domain contract, so the same
trainer (``flowcoach.core.trainer.train``), rewards and evaluator run on it:

- the model is the pipeline's ``WanTransformer3DModel`` behind the core's ``DiffusersVelocity``,
  with a peft LoRA adapter on its attention projections; the reference policy is the disabled
  adapter (no second copy of the weights);
- a sample is a latent of the pipeline's VAE, [z_dim, 1 + (frames - 1) / 4, H / 8, W / 8];
  ``decode`` un-normalises it as ``WanPipeline`` does (latents_mean / latents_std) and decodes
  frames with the VAE; the rewards see uint8 frames at the pipeline's resolution (they measure in
  units of the 32 px physics world, so any size works);
- a condition is a dict: ``state`` (the physics scene and initial state, for the rewards and the
  evaluator) and ``encoder_hidden_states`` (the pipeline's text encoder on a prompt written from
  that state, ``prompt_for``);
- ``data`` renders physics clips at the pipeline's size and encodes them with the VAE (for data
  anchoring or a short supervised warm-up).

The base "checkpoint" is the pipeline itself: ``base_checkpoint`` writes a small folder whose
``model.json`` names the domain and whose ``model.safetensors`` holds no tensor (weights that
override the pipeline's would go there); ``PipelineVelocity.load_state_dict`` loads such a partial
state dict over the pipeline's weights and then adds the adapter.

On a GPU machine, with a local copy of Wan 2.1 T2V 1.3B in diffusers format (nothing is
downloaded at run time)::

    from flowcoach.core.algorithms import algorithm_defaults
    from flowcoach.core.trainer import train
    from flowcoach.domains.video.pipeline import PipelineVideoDomain

    domain = PipelineVideoDomain(path="/models/Wan2.1-T2V-1.3B-Diffusers", height=256, width=256,
                                 num_frames=17, dtype="bfloat16", device="cuda")
    cfg = algorithm_defaults("flow-grpo")
    cfg.groups_per_step, cfg.group_size, cfg.micro_batch = 4, 4, 4
    train(cfg, domain)

Tests build a tiny random pipeline in code (``tiny_wan_pipeline``, the diffusers test pattern).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowcoach.core.domain import Domain
from flowcoach.core.nets.diffusers_wrapper import DiffusersVelocity, add_lora
from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.video import decode_clips, physics


def prompt_for(cond) -> str:
    """A prompt describing a physics condition: positions as fractions of the frame, speeds in pixels
    (of a 32 px frame) per frame."""
    scene = physics.decode_condition(cond)
    q = scene.params
    p = {k: v / physics.SIZE for k, v in q.items()}
    if scene.name == "bounce":
        side = "right" if q["vx"] > 0 else "left"
        return (f"a red ball on a black background is dropped from x {p['x0']:.2f} y {p['y0']:.2f} with a push to "
                f"the {side} of {abs(q['vx']):.1f} pixels per frame, falls and bounces on a grey floor")
    if scene.name == "pendulum":
        return (f"a red pendulum bob on a grey rod of length {p['length']:.2f} swings under gravity, released at "
                f"{q['theta0']:.0f} degrees, black background")
    if scene.name == "collision":
        return (f"a red ball at x {p['x1']:.2f} and a blue ball at x {p['x2']:.2f} at height {p['y']:.2f} roll "
                f"towards each other at {q['v1']:.1f} and {-q['v2']:.1f} pixels per frame and collide, black background")
    return (f"a green block slides on a grey floor from x {p['x0']:.2f} at {q['v0']:.1f} pixels per frame until "
            f"friction stops it, black background")


class PipelineVelocity(nn.Module):
    """v(x_t, t, cond) of a pipeline's transformer; cond is a dict with ``encoder_hidden_states``
    (``state`` is carried for the rewards and ignored here)."""

    def __init__(self, transformer: nn.Module, lora_rank: int = 32, lora_alpha: float | None = None):
        super().__init__()
        self.net = DiffusersVelocity(transformer)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * self.lora_rank

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        ehs = cond["encoder_hidden_states"].to(dtype)
        return self.net(x_t.to(dtype), t, {"encoder_hidden_states": ehs}).float()

    @property
    def has_adapter(self) -> bool:
        return self.net.has_adapter

    @contextmanager
    def disable_adapter(self):
        with self.net.disable_adapter():
            yield self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads weights over the pipeline's (keys it lacks keep the pipeline's values; a key the model
        does not have is an error), then adds the LoRA adapter when ``lora_rank > 0``."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if result.unexpected_keys:
            raise RuntimeError(f"unexpected keys in the pipeline base: {result.unexpected_keys[:5]}")
        if self.lora_rank > 0 and not self.has_adapter:
            add_lora(self.net, rank=self.lora_rank, alpha=self.lora_alpha)
        return result


class PipelineVideoDomain(Domain):
    name = "video-pipeline"
    kind = "generate"

    def __init__(self, pipeline=None, path: str | None = None, height: int = 32, width: int = 32,
                 num_frames: int = 9, lora_rank: int = 32, data_size: int = 16, max_sequence_length: int = 64,
                 dtype: str = "float32", device: str = "cpu", base_dir: str | None = None):
        """``pipeline``: a ``WanPipeline`` object, or ``path``: a local WanPipeline folder (loaded with
        ``local_files_only=True``); frames are ``num_frames`` (1 + 4k) of ``height`` x ``width``
        (multiples of 8 x the patch); ``data_size`` clips are encoded for ``data``; ``base_dir``: where
        ``base_checkpoint`` writes its folder (default runs/video-pipeline__base)."""
        if (pipeline is None) == (path is None):
            raise FlowcoachError("give PipelineVideoDomain a WanPipeline object or a local path to one, not both")
        if (num_frames - 1) % 4:
            raise FlowcoachError(f"num_frames must be 1 + a multiple of 4 (Wan's VAE), got {num_frames}")
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        if pipeline is None:
            from diffusers import WanPipeline

            pipeline = WanPipeline.from_pretrained(path, torch_dtype=self.dtype, local_files_only=True)
        self.pipe = pipeline
        self.path = path
        self.height, self.width, self.num_frames = height, width, num_frames
        self.lora_rank, self.data_size, self.max_sequence_length = lora_rank, data_size, max_sequence_length
        self.base_dir = Path(base_dir) if base_dir else Path("runs") / "video-pipeline__base"
        self.pipe.vae.to(self.device)
        self.pipe.text_encoder.to(self.device)
        vae = self.pipe.vae.config
        self._mean = torch.tensor(vae.latents_mean, dtype=torch.float32).view(1, vae.z_dim, 1, 1, 1)
        self._std = torch.tensor(vae.latents_std, dtype=torch.float32).view(1, vae.z_dim, 1, 1, 1)
        self._data: dict = {}

    @property
    def sample_shape(self) -> tuple[int, ...]:
        s, t = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (self.pipe.vae.config.z_dim, (self.num_frames - 1) // t + 1, self.height // s, self.width // s)

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def conditions(self, states: np.ndarray) -> dict:
        prompts = [prompt_for(s) for s in states]
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"state": torch.from_numpy(np.asarray(states, dtype=np.float32)),
                "encoder_hidden_states": embeds.float().cpu()}

    def train_conditions(self, n: int, generator: torch.Generator) -> dict:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return self.conditions(physics.random_conditions(n, np.random.default_rng(seed)))

    def eval_conditions(self, n: int) -> dict:
        from flowcoach.domains.video import EVAL_GROUP, EVAL_SEED

        distinct = physics.random_conditions(-(-n // EVAL_GROUP), np.random.default_rng(EVAL_SEED))
        return self.conditions(np.repeat(distinct, EVAL_GROUP, axis=0)[:n])

    # ------------------------------------------------------------------ latents <-> frames
    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> torch.Tensor:
        """float [N, frames, H, W, 3] in [0, 1] -> normalised latents [N, *sample_shape]."""
        vae = self.pipe.vae
        x = torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3))) * 2.0 - 1.0
        out = []
        for chunk in x.split(4):
            mu = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist.mode().float().cpu()
            out.append((mu - self._mean) / self._std)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list:
        vae = self.pipe.vae
        x = x.detach().float().cpu()
        latents = torch.nan_to_num(x) * self._std + self._mean
        frames = torch.cat([vae.decode(chunk.to(self.device, vae.dtype), return_dict=False)[0].float().cpu()
                            for chunk in latents.split(4)])
        frames[~torch.isfinite(x).flatten(1).all(1)] = float("nan")  # a diverged latent: decode_clips gives None
        return decode_clips(frames)

    def data(self, split: str) -> tuple[torch.Tensor, dict]:
        if split not in self._data:
            seed = 7 + (split == "heldout")
            states = physics.random_conditions(self.data_size, np.random.default_rng(seed))
            clips = physics.render_batch(states, size=self.height, frames=self.num_frames)
            self._data[split] = (self.encode(clips), self.conditions(states))
        return self._data[split]

    # ------------------------------------------------------------------ model and base
    def model_config(self) -> dict:
        return {}

    def build_model(self, **config) -> PipelineVelocity:
        if self.path is not None:
            from diffusers import WanTransformer3DModel

            transformer = WanTransformer3DModel.from_pretrained(self.path, subfolder="transformer", torch_dtype=self.dtype,
                                                                local_files_only=True)
        else:
            transformer = copy.deepcopy(self.pipe.transformer)
        return PipelineVelocity(transformer.to(self.device), lora_rank=self.lora_rank)

    def base_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        if not (self.base_dir / "model.safetensors").exists():
            self.base_dir.mkdir(parents=True, exist_ok=True)
            save_file({}, self.base_dir / "model.safetensors")  # the pipeline's own weights are the base
            (self.base_dir / "model.json").write_text(json.dumps({"domain": self.name, "model_config": {}}, indent=2))
            (self.base_dir / "base.json").write_text(json.dumps({"pipeline": self.path or "in-memory WanPipeline"}, indent=2))
        return self.base_dir

    # ------------------------------------------------------------------ objects, rewards, evaluation
    def save(self, objects: list, rewards, directory: Path) -> list[Path]:
        from flowcoach.domains.video.media import save_clips

        return save_clips(objects, rewards, Path(directory))

    def default_rewards(self) -> dict[str, float]:
        return {"video-physics": 1.0, "video-persistence": 0.3, "video-flicker": 0.3, "video-warp": 0.3}

    def evaluate(self, objects: list, conditions) -> dict[str, float]:
        from flowcoach.domains.video.evaluate import evaluate_clips

        return evaluate_clips(objects, conditions)


def tiny_wan_pipeline(seed: int = 0):
    """A tiny random ``WanPipeline`` built in code (no download): 2-layer transformer, 1-level VAE,
    1-layer UMT5 text encoder with a word-level tokenizer made here. For tests and smoke runs."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = sorted({w for s in ("bounce", "pendulum", "collision", "slide") for w in _vocabulary(s)})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: k + 3 for k, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))


def _vocabulary(scene: str) -> set[str]:
    """Every word ``prompt_for`` writes for a scene (numbers become <unk>, which is fine for a test model)."""
    cond = physics.random_conditions(1, np.random.default_rng(0), scenes=(scene,))[0]
    words = set(prompt_for(cond).split())
    return words | {"left", "right"}
