"""Base models and training checkpoints on disk.

A base model folder holds ``model.safetensors`` (all weights), ``model.json`` (domain and
build_model config) and ``base.json`` (how it was made: command, seed, data, evaluator figures).

A training checkpoint ``checkpoints/checkpoint-<step>/`` holds the trained weights
(``trainable.safetensors``: only parameters that train, so a LoRA checkpoint is the adapter),
the optimizer, the EMA and ``state.json``. It is written to ``.tmp-checkpoint-<step>/``, every
file flushed to disk, and renamed into place in one ``os.replace``; ``state.json`` is written last
and records every file's size and sha256. So a kill during a save never leaves a half checkpoint
that resume would pick, nor costs the previous one (older checkpoints are pruned only after the
new one is in place). A checkpoint is *complete* when its state.json parses and every file it lists
has its recorded size (checked on listing; the sha256 is checked on loading). Stale temporary
folders of a killed save are removed at the next save or resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowcoach.core.registry import FlowcoachError


PRETRAIN_STATE = "pretrain_state.pt"


def save_base(model: nn.Module, domain_name: str, model_config: dict, record: dict, directory: Path,
              pretrain_state: dict | None = None) -> None:
    """Write a base folder in one step (a folder beside it, then renamed over it). A partial base
    also holds the pretraining state (optimizer, EMA, RNG) that `pretrain --resume` continues from;
    the finished base does not."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    (tmp / "model.json").write_text(json.dumps({"domain": domain_name, "model_config": model_config}, indent=2))
    (tmp / "base.json").write_text(json.dumps(record, indent=2))
    if pretrain_state is not None:
        torch.save(pretrain_state, tmp / PRETRAIN_STATE)
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


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}} of the files in a checkpoint folder (state.json excluded)."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(Path(directory).iterdir()) if f.is_file() and f.name != "state.json"}


def _write_files(tmp: Path, model: nn.Module, optimizer, ema, old_state) -> None:
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), tmp / "ema.pt")
    if old_state is not None:  # DiffusionNFT's soft-updated old policy
        save_file(old_state, tmp / "old.safetensors")


def _write_state(tmp: Path, state: dict) -> None:
    """state.json, last: the step, the caller's state and the manifest of the files beside it."""
    for f in tmp.iterdir():
        _fsync(f)
    (tmp / "state.json").write_text(json.dumps({**state, "files": file_manifest(tmp)}, indent=2))
    _fsync(tmp / "state.json")
    _fsync(tmp)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place (a same-step checkpoint is moved aside first and
    removed after; ``clean_stale`` puts it back if a kill comes in between)."""
    aside = final.with_name(".old-" + final.name)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove what a killed save left under checkpoints/ (``.tmp-checkpoint-*``), and restore a
    same-step checkpoint that was moved aside (``.old-checkpoint-*``) when nothing replaced it.
    Returns the folders removed. Only the process that writes checkpoints may call it."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if not root.exists():
        return removed
    for path in sorted(root.iterdir()):
        if path.name.startswith(".old-checkpoint-"):
            final = root / path.name[len(".old-"):]
            if not final.exists() and checkpoint_problem(path) is None:
                os.replace(path, final)
                continue
        if path.name.startswith((".tmp-checkpoint-", ".old-checkpoint-")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, ema, state: dict, keep: int,
                    old_state: dict[str, torch.Tensor] | None = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(run_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    tmp.mkdir()
    _write_files(tmp, model, optimizer, ema, old_state)
    _write_state(tmp, {**state, "step": step})
    _commit(tmp, final)
    _prune(run_dir, keep)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """None for a complete checkpoint folder, else why it is not (cheap: sizes, not hashes)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "it has no state.json"
    except (OSError, ValueError) as e:
        return f"its state.json is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "its state.json has no step"
    for name, entry in (state.get("files") or {}).items():  # checkpoints older than the manifest have none
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, {entry.get('bytes')} were written"
    return None


def list_checkpoints(run_dir: Path, incomplete: list | None = None) -> list[Path]:
    """Complete checkpoints of a run, oldest first. ``incomplete``, a list, receives (path, reason)
    of the checkpoint folders that are not complete (corrupt or cut short)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not match:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            found.append((int(match.group(1)), path))
        elif incomplete is not None:
            incomplete.append((path, problem))
    return [p for _, p in sorted(found)]


def read_state(path: Path, domain_name: str | None = None, verify: bool = True) -> dict:
    """A checkpoint's state.json, checked: complete, files matching their recorded sha256 (``verify``),
    and made for ``domain_name`` when given. One-line FlowcoachErrors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FlowcoachError(f"checkpoint '{path}' does not exist")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FlowcoachError(f"checkpoint '{path}' is incomplete or corrupt: {problem}; resume from an older one")
    state = json.loads((path / "state.json").read_text())
    if domain_name is not None and state.get("domain") not in (None, domain_name):
        raise FlowcoachError(f"checkpoint '{path}' was trained on domain '{state['domain']}', not '{domain_name}'")
    for name, entry in (state.get("files") or {}).items() if verify else ():
        if entry.get("sha256") and _sha256(path / name) != entry["sha256"]:
            raise FlowcoachError(f"checkpoint '{path}' is corrupt: {name} does not match its recorded sha256; "
                                 "resume from an older one")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer=None, ema=None, domain_name: str | None = None) -> dict:
    path = Path(path)
    state = read_state(path, domain_name)
    try:
        weights = load_file(path / "trainable.safetensors")
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise FlowcoachError(f"checkpoint '{path}' is unreadable ({type(e).__name__}); resume from an older one") from e
    own = dict(model.named_parameters())
    missing = [n for n in weights if n not in own]
    if missing or len(weights) != sum(p.requires_grad for p in own.values()):
        raise FlowcoachError(f"checkpoint '{path}' does not fit this model (was it made for another domain or model?)")
    with torch.no_grad():
        for name, value in weights.items():
            if own[name].shape != value.shape:
                raise FlowcoachError(f"checkpoint '{path}' does not fit this model: '{name}' is {tuple(value.shape)} "
                                     f"there, {tuple(own[name].shape)} here (another domain or model config?)")
            own[name].copy_(value)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        if ema is not None and (path / "ema.pt").exists():
            ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=False))
    except Exception as e:  # noqa: BLE001
        raise FlowcoachError(f"checkpoint '{path}': optimizer or EMA state is unreadable or does not fit "
                             f"({type(e).__name__}); resume from an older one") from e
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
    if not re.fullmatch(r"checkpoint-\d+", path.name) and not (path / "state.json").exists():
        incomplete: list = []
        found = list_checkpoints(path, incomplete)
        if not found:
            raise FlowcoachError(f"'{path}' holds no complete checkpoint"
                                 + (f" ({incomplete[0][0].name}: {incomplete[0][1]})" if incomplete else ""))
        for bad, problem in incomplete:
            if int(bad.name.split("-")[1]) > int(found[-1].name.split("-")[1]):
                print(f"warning: skipping {bad.name} ({problem}); using {found[-1].name}")
        path = found[-1]
    read_state(path, domain.name, verify=False)  # complete and of this domain, before building anything
    run_config = path.parent.parent / "config.yaml"
    if base is None and run_config.exists():
        import yaml

        base = (yaml.safe_load(run_config.read_text()) or {}).get("base")
    model, _ = load_base(domain, base)
    # the trainable set of a checkpoint is what trained; make the same set trainable to load it
    load_checkpoint(path, model, domain_name=domain.name)
    if use_ema and (path / "ema.pt").exists():
        from diffusers.training_utils import EMAModel

        params = [p for p in model.parameters() if p.requires_grad]
        ema = EMAModel(params)
        try:
            ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=False))
        except Exception as e:  # noqa: BLE001
            raise FlowcoachError(f"checkpoint '{path}': ema.pt is unreadable or does not fit ({type(e).__name__})") from e
        ema.copy_to(params)
    return model
