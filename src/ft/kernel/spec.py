"""How a hook is declared: ``@spec(mode, returns=...)`` on each function of ``ft/hookspecs.py``.

A declaration says the hook's calling mode (how the results of the plugins combine), what a plugin
may return (checked on every call by :class:`ft.kernel.hooks.HookCaller`: anything else is an error
naming the plugin and its file:line) and, for registration hooks, the registry the plugins fill.
Nothing else restates it: the caller, ``docs/hooks.md`` and the test recorder read it from here.

Modes:

- ``first``: plugins are called in order until one returns something other than None.
- ``each``: every plugin is called; the caller acts on each ``(plugin, result)`` in turn.
- ``merge``: every plugin returns a dict or None; the dicts are merged, and a key two plugins set
  to different values is an error naming both.
- ``concat``: every plugin returns a list or None; the lists are concatenated.
- ``register``: every loaded plugin fills the hook's registry (a field of ``Registries``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

PROJECT = "ft"
_pluggy_spec = pluggy.HookspecMarker(PROJECT)

FIRST, EACH, MERGE, CONCAT, REGISTER = "first", "each", "merge", "concat", "register"
MODES = (FIRST, EACH, MERGE, CONCAT, REGISTER)
ACTIVE, LOADED = "active", "loaded"  # which plugins a hook reaches: the active ones, or every loaded one


@dataclass(frozen=True)
class Returns:
    """What a plugin may return from a hook besides None: ``what`` says it in words (for the error),
    ``ok`` checks a value. ``item`` names one key of a ``merge`` hook's dicts (for conflict messages)."""

    what: str
    ok: Callable[[Any], bool]
    item: str = "key"

    def accepts(self, value: Any) -> bool:
        return value is None or bool(self.ok(value))


NOTHING = Returns("None", lambda value: False)
ANYTHING = Returns("anything", lambda value: True)


def _resolve(kind: type | str) -> type:
    """A type, or ``"module:Name"`` imported when first checked (so declaring stays light)."""
    if isinstance(kind, str):
        module, _, name = kind.partition(":")
        return getattr(importlib.import_module(module), name)
    return kind


def list_of(kind: type | str, what: str) -> Returns:
    """A list (or tuple) whose items are all instances of ``kind``."""
    return Returns(what, lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, _resolve(kind)) for x in v))


def instance_of(kind: type | str, what: str) -> Returns:
    return Returns(what, lambda v: isinstance(v, _resolve(kind)))


def dict_of(item: str) -> Returns:
    """A dict, merged with the other plugins' (``merge`` mode); ``item`` names a key in messages."""
    return Returns(f"a dict of {item}s or None", lambda v: isinstance(v, dict), item=item)


CALLABLE = Returns("a callable", callable)


@dataclass(frozen=True)
class HookSpec:
    """One hook's declaration (see :func:`spec`)."""

    name: str
    mode: str
    returns: Returns = NOTHING
    required: str | None = None  # first mode: what must come back; None from every plugin is an error
    scope: str = ACTIVE
    registry: str | None = None  # register mode: "module:Class" of the registry the plugins fill
    into: str | None = None  # register mode: the Registries field holding it
    config_errors_join: bool = False  # a ConfigError a plugin raises joins the results (its problems)

    @property
    def firstresult(self) -> bool:
        return self.mode == FIRST

    def new_registry(self) -> Any:
        return _resolve(self.registry)()  # type: ignore[arg-type]


def spec(mode: str, returns: Returns = NOTHING, *, required: str | None = None, scope: str = ACTIVE,
         registry: str | None = None, into: str | None = None, config_errors_join: bool = False) -> Callable[[Any], Any]:
    """Declare the function below as a hook: its calling ``mode``, what a plugin may ``returns``, and
    for ``register`` hooks the ``registry`` class (``"module:Class"``) stored as ``Registries.<into>``."""
    if mode not in MODES:
        raise ValueError(f"unknown hook mode {mode!r}; modes: {', '.join(MODES)}")
    if (mode == REGISTER) != (registry is not None and into is not None):
        raise ValueError("a register hook names its registry and the field it goes into; other hooks do not")

    def declare(fn: Any) -> Any:
        fn = _pluggy_spec(firstresult=mode == FIRST)(fn)
        fn.ft_hook = HookSpec(fn.__name__, mode, returns, required, LOADED if mode == REGISTER else scope,
                              registry, into, config_errors_join)
        return fn

    return declare


def declared(module: Any) -> dict[str, HookSpec]:
    """name -> HookSpec of every hook declared in ``module`` (``ft.hookspecs``), in source order."""
    found = [getattr(module, n) for n in dir(module) if n.startswith("ft_")]
    specs = [fn.ft_hook for fn in found if isinstance(getattr(fn, "ft_hook", None), HookSpec)]
    return {s.name: s for s in sorted(specs, key=lambda s: getattr(module, s.name).__code__.co_firstlineno)}
