"""diffusers flow-matching transformers (SD3, Flux, Wan) behind ``forward(x_t, t, cond)``, with LoRA from peft.

Convention check (diffusers 0.42): the training examples (train_dreambooth_lora_sd3.py, ..._flux.py)
noise as ``(1 - sigma) * x0 + sigma * noise`` and regress ``noise - x0``, and the pipelines step
``x + (sigma_next - sigma) * v`` (FlowMatchEulerDiscreteScheduler.step; Wan's UniPC in flow mode takes
``x0 = x - sigma * v``). So these transformers predict ``eps - x0`` with t = sigma, as our core does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# What each family's forward expects as `timestep` for our t in [0, 1]. SD3 and Wan take the
# scheduler's timesteps, sigma * 1000; Flux multiplies by 1000 inside its forward, so its pipeline
# passes timestep / 1000 and we pass t unchanged.
TIMESTEP_SCALE = {
    "SD3Transformer2DModel": 1000.0,
    "WanTransformer3DModel": 1000.0,
    "FluxTransformer2DModel": 1.0,
}

# Flow-GRPO's LoRA targets: attention projections of the image stream, and of the text stream
# (the joint-attention "add_*" projections) where the model has one.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class DiffusersVelocity(nn.Module):
    """v(x_t, t, cond) from a diffusers transformer; ``cond`` is a dict of keyword arguments.

    x_t has the layout the transformer takes: [B, C, H, W] for SD3 (cond: ``encoder_hidden_states``,
    ``pooled_projections``), [B, C, T, H, W] for Wan (cond: ``encoder_hidden_states``). For Flux
    only the transformer call is handled: x_t must already be packed latents [B, seq, C] and cond
    must carry ``encoder_hidden_states``, ``pooled_projections``, ``img_ids``, ``txt_ids`` (and
    ``guidance`` for guidance-distilled models, as FluxPipeline passes it); packing, unpacking and
    the ids are the caller's (FluxPipeline._pack_latents, _prepare_latent_image_ids).

    ``timestep_scale`` maps t in [0, 1] to the transformer's timestep; it is looked up by class
    (``TIMESTEP_SCALE``) and must be given for any other class.
    """

    def __init__(self, transformer: nn.Module, timestep_scale: float | None = None):
        super().__init__()
        self.transformer = transformer
        if timestep_scale is None:
            names = [cls.__name__ for cls in type(transformer).__mro__]
            known = [TIMESTEP_SCALE[n] for n in names if n in TIMESTEP_SCALE]
            if not known:
                raise ValueError(
                    f"no known timestep scale for {type(transformer).__name__}; pass timestep_scale "
                    f"(known: {sorted(TIMESTEP_SCALE)})"
                )
            timestep_scale = known[0]
        self.timestep_scale = float(timestep_scale)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).float().expand(x_t.shape[0])
        out = self.transformer(hidden_states=x_t, timestep=t * self.timestep_scale, return_dict=False, **(cond or {}))
        return out[0]

    @property
    def has_adapter(self) -> bool:
        """True once a LoRA adapter was added (see ``add_lora``)."""
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[DiffusersVelocity]:
        """Within the block the model is the base (reference) policy: every adapter is off.

        peft turns requires_grad off on disabled adapters and on again on enabling; the flags in
        force before the block are restored after it.
        """
        flags = [(p, p.requires_grad) for p in self.parameters()]
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()
            for p, flag in flags:
                p.requires_grad_(flag)


def _inner(model: nn.Module) -> nn.Module:
    return model.transformer if isinstance(model, DiffusersVelocity) else model


def present_targets(model: nn.Module, candidates: Sequence[str] = DEFAULT_LORA_TARGETS) -> list[str]:
    """The candidate module names (matched as peft does, on a name's dotted suffix) that occur in model."""
    names = [name for name, _ in _inner(model).named_modules()]
    return [c for c in candidates if any(n == c or n.endswith("." + c) for n in names)]


def add_lora(
    model: nn.Module,
    rank: int = 32,
    alpha: float = 64.0,
    target_modules: Sequence[str] | None = None,
    init: str | bool = "gaussian",
    adapter_name: str = "default",
) -> nn.Module:
    """Adds a LoRA adapter to a DiffusersVelocity (or a bare diffusers transformer) and freezes the rest.

    Defaults follow Flow-GRPO's SD3 recipe (rank 32, alpha 64, gaussian init of A with B = 0, so the
    model starts exactly at the base). ``init`` is peft's ``init_lora_weights``. Returns ``model``.
    """
    from peft import LoraConfig

    inner = _inner(model)
    targets = list(target_modules) if target_modules is not None else present_targets(inner)
    if not targets:
        raise ValueError(f"none of the LoRA targets {list(target_modules or DEFAULT_LORA_TARGETS)} occur in the model")
    inner.requires_grad_(False)  # peft freezes the base too; stated here so the contract does not rest on it
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=init)
    inner.add_adapter(config, adapter_name=adapter_name)  # makes the new adapter trainable
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Only the adapter's weights, keyed without the adapter name (peft's saved format)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(_inner(model), adapter_name=adapter_name)


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Loads adapter weights saved by ``lora_state_dict`` into an existing adapter; every key must match."""
    from peft import set_peft_model_state_dict

    inner = _inner(model)
    result = set_peft_model_state_dict(inner, state_dict, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise KeyError(f"LoRA state dict mismatch: unexpected {result.unexpected_keys[:5]}, missing {missing[:5]}")
