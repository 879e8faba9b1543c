"""Records of what kernel plugins changed, and scoped global patches that are undone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class PatchRecord:
    """One change a plugin made: what was replaced, by what, and how to undo it if global."""

    plugin: str
    target: str  # e.g. "model.layers.0.mlp (LlamaMLP)" or "transformers...apply_rotary_pos_emb"
    replacement: str
    count: int = 1
    undo: Callable[[], None] | None = None  # set for global (module-level) patches

    def __str__(self) -> str:
        scope = "global, undone at end of run" if self.undo else "instance"
        times = f" x{self.count}" if self.count != 1 else ""
        return f"[{self.plugin}] {self.target}{times} -> {self.replacement} ({scope})"


def patch_attribute(owner: Any, name: str, new: Any, *, plugin: str, replacement: str | None = None) -> PatchRecord:
    """Replace ``owner.name`` with ``new`` and return a record whose ``undo`` restores it."""
    missing = object()
    old = owner.__dict__.get(name, missing) if hasattr(owner, "__dict__") else getattr(owner, name, missing)
    setattr(owner, name, new)

    def undo() -> None:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)

    owner_name = getattr(owner, "__name__", type(owner).__name__)
    return PatchRecord(plugin, f"{owner_name}.{name}", replacement or getattr(new, "__qualname__", repr(new)), undo=undo)
