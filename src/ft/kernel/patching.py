"""What a kernel plugin returns from ``ft_patch_model``: a :class:`PatchRecord` per change, and
:func:`patch_attribute` for a global patch that is undone when the run ends. Whether each patch is
still in effect after the first training step is checked by ``ft.engine.patch_watch.PatchWatch``
(see docs/writing-a-kernel-plugin.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PatchRecord:
    """One change a plugin made: what was replaced, by what, and how to undo it if global.

    ``check``, when given, is called after the first training step: it returns None while the
    patch is in effect, else one sentence saying what is wrong (the core then stops the run and
    names the plugin). Changes to the model instance itself (a bound ``forward``, a swapped
    module) are checked by the core without it.
    """

    plugin: str
    target: str  # e.g. "model.layers.0.mlp (LlamaMLP)" or "transformers...apply_rotary_pos_emb"
    replacement: str
    count: int = 1
    undo: Callable[[], None] | None = None  # set for global (module-level) patches
    check: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        scope = "global, undone at end of run" if self.undo else "instance"
        times = f" x{self.count}" if self.count != 1 else ""
        return f"[{self.plugin}] {self.target}{times} -> {self.replacement} ({scope})"


_MISSING = object()


def _current(owner: Any, name: str) -> Any:
    return owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else getattr(owner, name, _MISSING)


def patch_attribute(owner: Any, name: str, new: Any, *, plugin: str, replacement: str | None = None) -> PatchRecord:
    """Replace ``owner.name`` with ``new`` and return a record whose ``undo`` restores it and whose
    ``check`` says whether ``new`` is still in place."""
    old = _current(owner, name)
    setattr(owner, name, new)

    def undo() -> None:
        if old is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, old)

    owner_name = getattr(owner, "__name__", type(owner).__name__)
    target = f"{owner_name}.{name}"

    def check() -> str | None:
        return None if _current(owner, name) is new else f"{target} was replaced again after the plugin set it"

    return PatchRecord(plugin, target, replacement or getattr(new, "__qualname__", repr(new)), undo=undo, check=check)


# -- watching the model instance ---------------------------------------------------------------


