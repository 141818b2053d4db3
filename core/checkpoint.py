"""Base models and training checkpoints on disk.

A base model folder holds ``model.safetensors`` (all weights), ``model.json`` (domain and
build_model config) and ``base.json`` (how it was made: command, seed, data, evaluator figures).

A training checkpoint ``checkpoints/checkpoint-<step>/`` holds the trained weights
(``trainable.safetensors``: only parameters that train, so a LoRA checkpoint is the adapter),
the optimizer, the EMA and ``state.json``. It is written to a temporary folder and renamed into
place, and ``state.json`` is written last, so a crash mid-save never leaves a half checkpoint
that resume would pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowcoach.core.registry import FlowcoachError


def save_base(model: nn.Module, domain_name: str, model_config: dict, record: dict, directory: Path) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    (tmp / "model.json").write_text(json.dumps({"domain": domain_name, "model_config": model_config}, indent=2))
    (tmp / "base.json").write_text(json.dumps(record, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def load_base(domain, directory: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Build the domain's model and load a base folder into it; returns (model, base record)."""
    directory = Path(directory) if directory is not None else domain.base_checkpoint()
    if directory is None or not (directory / "model.safetensors").exists():
        raise FlowcoachError(
            f"no base model at '{directory}'; make one with `flowcoach pretrain {domain.name}` "
            "or pass --base FOLDER"
        )
    meta = json.loads((directory / "model.json").read_text())
    if meta.get("domain") != domain.name:
        raise FlowcoachError(f"base model at '{directory}' is for domain '{meta.get('domain')}', not '{domain.name}'")
    model = domain.build_model(**meta["model_config"])
    try:
        model.load_state_dict(load_file(directory / "model.safetensors"))
    except (RuntimeError, Exception) as e:
        raise FlowcoachError(f"base model at '{directory}' does not fit the domain's model: {str(e).splitlines()[0]}") from e
    record = json.loads((directory / "base.json").read_text()) if (directory / "base.json").exists() else {}
    return model, record


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, ema, state: dict, keep: int,
                    old_state: dict[str, torch.Tensor] | None = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), tmp / "ema.pt")
    if old_state is not None:  # DiffusionNFT's soft-updated old policy
        save_file(old_state, tmp / "old.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "state.json").exists():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: nn.Module, optimizer=None, ema=None) -> dict:
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(path / "trainable.safetensors")
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise FlowcoachError(f"checkpoint '{path}' is unreadable ({type(e).__name__}); resume from an older one") from e
    own = dict(model.named_parameters())
    missing = [n for n in weights if n not in own]
    if missing or len(weights) != sum(p.requires_grad for p in own.values()):
        raise FlowcoachError(f"checkpoint '{path}' does not fit this model (was it made for another domain or model?)")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if ema is not None and (path / "ema.pt").exists():
        ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=False))
    return state


def load_old_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The old policy's trained weights stored in a checkpoint, or None."""
    file = Path(path) / "old.safetensors"
    return load_file(file) if file.exists() else None


def load_trained(domain, checkpoint: str | Path | None, base: str | Path | None = None, use_ema: bool = True) -> nn.Module:
    """The model of a checkpoint (EMA weights when it has them), or the base when checkpoint is None/'base'.

    ``checkpoint`` may be a checkpoint folder or a run folder (its newest checkpoint is used).
    """
    if checkpoint is None or str(checkpoint) == "base":
        return load_base(domain, base)[0]
    path = Path(checkpoint)
    if not path.exists():
        raise FlowcoachError(f"checkpoint '{path}' does not exist; give a run folder, a checkpoint folder or 'base'")
    if not (path / "state.json").exists():
        found = list_checkpoints(path)
        if not found:
            raise FlowcoachError(f"'{path}' holds no complete checkpoint")
        path = found[-1]
    state = json.loads((path / "state.json").read_text())
    if state.get("domain") not in (None, domain.name):
        raise FlowcoachError(f"checkpoint '{path}' was trained on domain '{state['domain']}', not '{domain.name}'")
    run_config = path.parent.parent / "config.yaml"
    if base is None and run_config.exists():
        import yaml

        base = (yaml.safe_load(run_config.read_text()) or {}).get("base")
    model, _ = load_base(domain, base)
    # the trainable set of a checkpoint is what trained; make the same set trainable to load it
    load_checkpoint(path, model)
    if use_ema and (path / "ema.pt").exists():
        from diffusers.training_utils import EMAModel

        params = [p for p in model.parameters() if p.requires_grad]
        ema = EMAModel(params)
        ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=False))
        ema.copy_to(params)
    return model
