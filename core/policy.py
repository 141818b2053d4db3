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
    """The trained velocity model, its reference, its EMA, and (DiffusionNFT) a soft-updated old policy.

    The reference is the LoRA-disabled model when the model has an adapter (no second copy in
    memory), otherwise a frozen copy made at construction, i.e. of the base weights. It is only
    built when needed (KL weight > 0). EMA is diffusers' ``EMAModel`` over the trainable parameters.
    The old policy (``need_old``) is a frozen copy that follows the trained weights slowly
    (``update_old``); DiffusionNFT samples with it and builds its implicit policies around it.
    """

    def __init__(self, model: nn.Module, need_reference: bool = False, ema_decay: float = 0.0,
                 need_old: bool = False):
        self.model = model
        self.ref_model = None
        if need_reference and not has_adapter(model):
            self.ref_model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.old_model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False) if need_old else None
        self.counter = None  # a ForwardCounter of model evaluations, set by the trainer
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

    @torch.no_grad()
    def old_velocity(self, x_t, t, cond):
        return self.old_model(x_t, t, cond)

    def sampling_model(self) -> nn.Module:
        """The model rollouts are drawn from: the old policy where there is one, else the trained model."""
        return self.old_model if self.old_model is not None else unwrap(self.model)

    @torch.no_grad()
    def update_old(self, eta: float) -> None:
        """old <- eta old + (1 - eta) trained, on the trainable parameters."""
        own = dict(unwrap(self.model).named_parameters())
        for name, p in self.old_model.named_parameters():
            if own[name].requires_grad:
                p.mul_(eta).add_(own[name].detach().to(p.dtype), alpha=1.0 - eta)

    def old_state(self) -> dict[str, torch.Tensor]:
        own = dict(unwrap(self.model).named_parameters())
        return {n: p.detach().cpu().contiguous() for n, p in self.old_model.named_parameters() if own[n].requires_grad}

    @torch.no_grad()
    def load_old_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.old_model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)

    def modules(self) -> list[nn.Module]:
        """Every distinct module that evaluates a velocity (for counting model evaluations)."""
        return [m for m in (unwrap(self.model), self.ref_model, self.old_model) if m is not None]

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


class ForwardCounter:
    """Counts rows through velocity models (model evaluations, 'NFE'): a forward pre-hook on each
    module adds the batch size of its first argument. ``phase`` names the bucket counted into."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.phase: str | None = None
        self.handles = []

    def attach(self, modules: list[nn.Module]) -> "ForwardCounter":
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._hook))
        return self

    def _hook(self, module, args):
        if self.phase is not None and args and isinstance(args[0], torch.Tensor):
            self.counts[self.phase] = self.counts.get(self.phase, 0) + int(args[0].shape[0])

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @contextmanager
    def counting(self, phase: str | None):
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before
