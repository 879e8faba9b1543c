"""The plugin manager: entry-point discovery, blocking, selection, listing, tracing.

Every plugin -- first-party or not -- is an entry point in the group ``ft``. A plugin is:

- *blocked* by ``-p no:NAME`` (never imported), or by ``FT_DISABLE_PLUGIN_AUTOLOAD=1`` for
  third-party plugins not named with ``-p NAME``;
- *failed* if importing or validating it raised (listed with the reason; other commands work);
- *loaded* otherwise. Registration hooks (formats, optimizers, config sections, commands) reach
  every loaded plugin.
- *active* if loaded and either not a feature (``FT_FEATURE = False`` or absent in its module),
  or a feature that is selected (``plugins: [...]`` in the config or ``-p NAME``). Pipeline
  hooks reach only active plugins.

A few first-party plugins are essential and cannot be blocked.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata as md
import inspect
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ft import PROJECT, hookspecs
from ft.errors import FtError, PluginError, PluginHookError

ENTRY_POINT_GROUP = "ft"
AUTOLOAD_ENV = "FT_DISABLE_PLUGIN_AUTOLOAD"
FIRST_PARTY_DIST = "ft"
# Features the pipeline cannot work without; blocking one is refused.
ESSENTIAL = frozenset({"hf", "sources", "chat_template", "alpaca", "completion", "input_output", "optimizers", "infer"})


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    target: str  # "module" or "module:attr" from the entry point
    status: str = "available"  # essential | available | active | blocked | failed
    feature: bool = False
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "feature": self.feature,
            "hooks": self.hooks,
            "error": self.error,
            "description": self.description,
        }


def parse_plugin_args(args: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split ``-p`` values into (selected, blocked); ``no:NAME`` blocks NAME."""
    select, block = [], []
    for raw in args:
        for name in (s.strip() for s in str(raw).split(",")):
            if not name:
                continue
            if name.startswith("no:"):
                block.append(name[3:])
            else:
                select.append(name)
    return select, block


# Plugin objects registered for the current process only (``ft.testing``, notebooks): every
# PluginManager created while they are here registers them after the entry points.
_PROCESS_PLUGINS: list[tuple[str, object]] = []


def add_process_plugin(name: str, obj: object) -> None:
    """Register ``obj`` as plugin ``name`` in every plugin manager made from now on."""
    _PROCESS_PLUGINS.append((name, obj))


def remove_process_plugin(name: str) -> None:
    _PROCESS_PLUGINS[:] = [(n, o) for n, o in _PROCESS_PLUGINS if n != name]


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    seen: dict[str, md.EntryPoint] = {}
    for ep in eps:
        seen.setdefault(ep.name, ep)  # the same dist found twice on sys.path: keep the first
    return list(seen.values())


class PluginManager:
    """ft's view of pluggy: discovery, selection, and hook calls restricted to active plugins."""

    def __init__(
        self,
        select: Sequence[str] = (),
        block: Sequence[str] = (),
        *,
        autoload: bool | None = None,
        entry_points: Sequence[md.EntryPoint] | None = None,
        extra_plugins: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.selected: list[str] = list(dict.fromkeys(select))
        self.blocked: list[str] = list(dict.fromkeys(block))
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
        self.autoload = autoload
        self.infos: dict[str, PluginInfo] = {}
        self._subset_cache: dict[str, Any] = {}
        self._refuse_blocking_essentials()
        self._load(entry_points if entry_points is not None else _entry_points())
        for name, obj in [*_PROCESS_PLUGINS, *extra_plugins]:
            if name in self.blocked:
                continue
            self.register(name, obj, distribution="<test>", version="")
        self._check_selection()

    # -- loading ---------------------------------------------------------------------------

    def _refuse_blocking_essentials(self) -> None:
        bad = sorted(set(self.blocked) & ESSENTIAL)
        if bad:
            raise PluginError(
                f"plugin(s) {', '.join(bad)} are essential and cannot be blocked "
                "(ft cannot load models or data without them). Remove the `-p no:...` option."
            )

    def _load(self, eps: Sequence[md.EntryPoint]) -> None:
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else ""
            info = PluginInfo(ep.name, dist, version, ep.value)
            self.infos[ep.name] = info
            first_party = dist == FIRST_PARTY_DIST
            if ep.name in self.blocked:
                info.status = "blocked"
                continue
            if not self.autoload and not first_party and ep.name not in self.selected:
                info.status = "blocked"
                info.error = f"auto-loading disabled by {AUTOLOAD_ENV}; select it with -p {ep.name}"
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break the CLI
                info.status = "failed"
                info.error = f"import failed: {type(exc).__name__}: {exc}"
                continue
            self._register_checked(ep.name, obj, info)

    def register(self, name: str, obj: object, *, distribution: str = "<local>", version: str = "") -> None:
        """Register a plugin object directly (tests, ``ft.testing``)."""
        target = getattr(obj, "__name__", type(obj).__name__)
        info = PluginInfo(name, distribution, version, target)
        self.infos[name] = info
        self._register_checked(name, obj, info)
        self._subset_cache.clear()
        if info.status == "failed":
            raise PluginError(f"plugin '{name}' is invalid: {info.error}")

    def _register_checked(self, name: str, obj: object, info: PluginInfo) -> None:
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._unregister_quietly(obj)
            info.status = "failed"
            info.error = f"invalid hook implementation: {exc}"
            return
        except ValueError as exc:  # duplicate name
            info.status = "failed"
            info.error = str(exc)
            return
        info.feature = bool(getattr(obj, "FT_FEATURE", False))
        info.description = (inspect.getdoc(obj) or "").split("\n", 1)[0] if inspect.ismodule(obj) else ""
        info.hooks = sorted(impl_name for impl_name in dir(obj) if impl_name.startswith("ft_") and hasattr(self.pm.hook, impl_name) and callable(getattr(obj, impl_name)))
        info.status = "essential" if name in ESSENTIAL and info.distribution == FIRST_PARTY_DIST else "available"
        self._wrap_hookimpls(name, obj)

    def _unregister_quietly(self, obj: object) -> None:
        try:
            self.pm.unregister(obj)
        except Exception:
            pass
        # pluggy leaves unknown hook callers behind; drop this plugin from them.
        for caller in self.pm.hook.__dict__.values():
            if isinstance(caller, pluggy.HookCaller):
                for impl in list(caller.get_hookimpls()):
                    if impl.plugin is obj:
                        caller._remove_plugin(obj)

    def _wrap_hookimpls(self, name: str, obj: object) -> None:
        """Re-raise exceptions from hooks with the plugin and the hook named."""
        for caller in self.pm.get_hookcallers(obj) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is obj and not (impl.hookwrapper or impl.wrapper):
                    impl.function = _named_errors(impl.function, name, caller.name)

    def _check_selection(self) -> None:
        problems = []
        for name in self.selected:
            info = self.infos.get(name)
            if info is None:
                close = difflib.get_close_matches(name, list(self.infos), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                problems.append(f"unknown plugin '{name}'.{hint} Installed: {', '.join(sorted(self.infos))}.")
            elif info.status == "failed":
                problems.append(
                    f"plugin '{name}' (distribution '{info.distribution}' {info.version}) is selected but failed "
                    f"to load: {info.error}. Fix or reinstall it (`pip install --force-reinstall {info.distribution}`)."
                )
            elif info.status == "blocked":
                problems.append(f"plugin '{name}' is both selected and blocked (-p no:{name}); choose one.")
        if problems:
            raise PluginError("\n".join(problems))
        for name in self.selected:
            self.infos[name].status = "active"
        for info in self.infos.values():
            if info.status in ("available", "essential") and not info.feature:
                info.status = "essential" if info.status == "essential" else "active"

    # -- queries -----------------------------------------------------------------------------

    def is_active(self, name: str) -> bool:
        info = self.infos.get(name)
        return info is not None and info.status in ("active", "essential")

    def active_names(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.status in ("active", "essential")]

    def features(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.feature]

    def _inactive_objects(self) -> list[object]:
        return [self.pm.get_plugin(n) for n, i in self.infos.items() if i.status == "available" and self.pm.get_plugin(n) is not None]

    @property
    def hook(self) -> _ActiveHooks:
        """Pipeline hooks, called on active plugins only: ``pm.hook.ft_load_model(cfg=..., ...)``."""
        return _ActiveHooks(self)

    @property
    def all_hooks(self) -> Any:
        """Registration hooks, called on every loaded plugin."""
        return self.pm.hook

    def active_caller(self, hook_name: str) -> Any:
        if hook_name not in self._subset_cache:
            self._subset_cache[hook_name] = self.pm.subset_hook_caller(hook_name, self._inactive_objects())
        return self._subset_cache[hook_name]

    def call_each(self, hook_name: str, *, active_only: bool = True, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation in call order; return ``(plugin_name, result)`` pairs.

        Used where the core must know who returned what (merging dicts, stamping registries).
        """
        return list(self.iter_each(hook_name, active_only=active_only, **kwargs))

    def iter_each(self, hook_name: str, *, active_only: bool = True, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Like :meth:`call_each`, but yields each result before calling the next plugin, so the
        caller can act on it (e.g. register an undo) even if a later plugin raises."""
        caller = self.active_caller(hook_name) if active_only else getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last registered first
            args = [kwargs[a] for a in impl.argnames]
            yield impl.plugin_name, impl.function(*args)

    def call_order(self, hook_name: str) -> list[str]:
        """Plugin names in the order a hook calls them (``ft plugins --hook NAME``)."""
        if not hasattr(self.pm.hook, hook_name):
            raise FtError(f"unknown hook '{hook_name}'. Hooks: {', '.join(hook_names())}.")
        return [impl.plugin_name for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls())]

    def merge_dicts(self, hook_name: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """Merge the dicts returned by an ``all`` hook; a key set differently by two plugins is an error."""
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for plugin, result in self.call_each(hook_name, **kwargs):
            for key, value in (result or {}).items():
                if key in merged and not _same(merged[key], value):
                    raise PluginError(
                        f"{what} '{key}' is set to {merged[key]!r} by plugin '{owner[key]}' and to {value!r} by "
                        f"plugin '{plugin}'. Deselect one of them or align their config sections."
                    )
                merged[key], owner[key] = value, plugin
        return merged

    def collect_lists(self, hook_name: str, **kwargs: Any) -> list[Any]:
        return [item for _, result in self.call_each(hook_name, **kwargs) for item in (result or [])]

    def manifest(self) -> list[dict[str, Any]]:
        """What was loaded and selected, with versions (saved next to the weights)."""
        return [i.as_dict() for i in self.infos.values()]

    def enable_tracing(self, write=None) -> None:
        write = write or (lambda msg: print(msg, file=sys.stderr))

        def before(hook_name, hook_impls, kwargs):
            write(f"[ft trace] {hook_name} -> {[i.plugin_name for i in reversed(hook_impls)]}")

        def after(outcome, hook_name, hook_impls, kwargs):
            pass

        self.pm.add_hookcall_monitoring(before, after)


class _ActiveHooks:
    def __init__(self, manager: PluginManager) -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Any:
        return self._manager.active_caller(name)


def _named_errors(fn, plugin: str, hook: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FtError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if _is_oom(exc):
                raise
            raise PluginHookError(plugin, hook, exc) from exc

    return wrapper


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("ft_")]
