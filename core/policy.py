"""FlowPolicy: a velocity model plus what RL needs around it (reference policy, EMA)."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP/FSDP/compile wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def has_adapter(model: nn.Module) -> bool:
    """LoRA models (peft's PeftModel, our DiffusersVelocity) expose a ``disable_adapter()`` context;
    a model that could carry one says whether it does through a boolean ``has_adapter``."""
    inner = unwrap(model)
    flag = getattr(inner, "has_adapter", None)
    return flag if isinstance(flag, bool) else hasattr(inner, "disable_adapter")


class FlowPolicy:
    """The trained velocity model, its reference and its EMA.

    The reference is the LoRA-disabled model when the model has an adapter (no second copy in
    memory), otherwise a frozen copy made at construction, i.e. of the base weights. It is only
    built when needed (KL weight > 0). EMA is diffusers' ``EMAModel`` over the trainable parameters.
    """

    def __init__(self, model: nn.Module, need_reference: bool = False, ema_decay: float = 0.0):
        self.model = model
        self.ref_model = None
        if need_reference and not has_adapter(model):
            self.ref_model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.ema = None
        if ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable_parameters(), decay=ema_decay)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def velocity(self, x_t, t, cond):
        return self.model(x_t, t, cond)

    @torch.no_grad()
    def reference_velocity(self, x_t, t, cond):
        if self.ref_model is not None:
            return self.ref_model(x_t, t, cond)
        inner = unwrap(self.model)
        ctx = inner.disable_adapter() if has_adapter(inner) else nullcontext()
        with ctx:
            return inner(x_t, t, cond)

    def ema_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.trainable_parameters())

    @contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights in (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)
