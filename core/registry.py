"""One small generic registry for domains, rewards, algorithms, samplers and advantage estimators.

Names are snake or kebab case (``flow_grpo`` and ``flow-grpo`` are the same name), duplicates are
refused, a miss lists what exists, and ``"module:attr"`` is accepted wherever a name is. Entries
may be registered lazily as ``"module:attr"`` strings so that listing a registry never imports a
domain's heavy libraries; installed plugins announce themselves through an entry-point group that
is read only on a miss or a listing.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable


class FlowcoachError(Exception):
    """An error whose message is a one-line explanation for the user (printed without traceback)."""


def normalize_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def import_attr(spec: str) -> Any:
    """Import ``"package.module:attr"`` (attr may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise FlowcoachError(f"'{spec}' is not of the form 'module:attr'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise FlowcoachError(f"cannot import '{module_name}' for '{spec}': {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FlowcoachError(f"'{module_name}' has no attribute '{attr}' (from '{spec}')")
        obj = getattr(obj, part)
    return obj


class Registry:
    """Maps names to objects (or to lazy ``"module:attr"`` strings resolved on first use)."""

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Any] = {}
        self._entry_points_loaded = False

    def register(self, name: str, obj: Any = None) -> Any:
        """``registry.register("name", obj)``, or ``@registry.register("name")`` as a decorator."""
        key = normalize_name(name)
        if obj is None:
            def decorator(o: Callable) -> Callable:
                self.register(name, o)
                return o
            return decorator
        if key in self._entries:
            raise FlowcoachError(f"{self.kind} '{key}' is already registered; pick another name")
        self._entries[key] = obj
        return obj

    def unregister(self, name: str) -> None:
        self._entries.pop(normalize_name(name), None)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.entry_point_group is None:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            key = normalize_name(ep.name)
            if key not in self._entries:
                self._entries[key] = ep.value  # lazy "module:attr"

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._entries or normalize_name(name) in self.names()

    def get(self, name: str) -> Any:
        if ":" in name:
            return import_attr(name)
        key = normalize_name(name)
        if key not in self._entries:
            self._load_entry_points()
        if key not in self._entries:
            raise FlowcoachError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())} "
                f"(or give 'module:attr')"
            )
        obj = self._entries[key]
        if isinstance(obj, str):
            try:
                obj = import_attr(obj)
            except FlowcoachError as e:
                if self.entry_point_group is not None:
                    warnings.warn(f"{self.kind} plugin '{key}' failed to load: {e}")
                raise
            self._entries[key] = obj
        return obj


DOMAINS = Registry("domain", entry_point_group="flowcoach.domains")
REWARDS = Registry("reward", entry_point_group="flowcoach.rewards")
ALGORITHMS = Registry("algorithm")
NOISE_LAWS = Registry("noise law")
ADVANTAGES = Registry("advantage estimator")
LOSSES = Registry("loss")
STRUCTURES = Registry("rollout structure")
