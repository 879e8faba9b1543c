"""Calling hooks: the one generic caller, reading each hook's declaration (``ft.kernel.spec``).

Every hook call goes through :class:`HookCaller` (the plugin manager's calling half), through
pluggy, one plugin at a time: tracing, ``ft.tools.testing.HookRecorder`` and ``@hookimpl(wrapper=True)``
see every call; each result is checked against the hook's declaration and attributed to its
plugin; an exception names the plugin and the hook.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pluggy

from ft import hookspecs
from ft.kernel.errors import (
    ConfigError,
    FtError,
    PluginError,
    PluginHookError,
    is_out_of_memory,
    plugin_frames,
)
from ft.kernel.spec import ACTIVE, ANYTHING, CONCAT, EACH, FIRST, MERGE, REGISTER, HookSpec, declared


class Merged(dict):
    """A ``merge`` hook's merged dict; ``owners[key]`` is the plugin that set ``key``."""

    owners: dict[str, str]


class HookCaller:
    """The plugin manager's calling half: every hook call goes through here, through pluggy, one plugin
    at a time (tracing, ``ft.tools.testing.HookRecorder`` and ``@hookimpl(wrapper=True)`` see every call), each
    result checked against the hook's declaration and attributed to its plugin."""

    pm: pluggy.PluginManager

    # -- declarations --------------------------------------------------------------------------

    def spec(self, hook: str) -> HookSpec:
        """The declaration of ``hook``; a hook a plugin added with plain ``ft.hookspec`` gets pluggy's
        own mode (first or each) and no result check."""
        caller = getattr(self.pm.hook, hook, None)
        if caller is None or caller.spec is None:
            raise FtError(f"unknown hook '{hook}'. Hooks: {', '.join(hook_names())}.")
        found = getattr(caller.spec.function, "ft_hook", None)
        if isinstance(found, HookSpec):
            return found
        return HookSpec(hook, FIRST if caller.spec.opts.get("firstresult") else EACH, ANYTHING)

    def implementers(self, hook: str, *, active_only: bool | None = None) -> list[str]:
        """Plugins implementing a hook (wrappers excluded), in the order they are called; by default those
        the hook reaches (its scope: the active plugins, or every loaded one)."""
        spec = self.spec(hook)
        if active_only is None:
            active_only = spec.scope == ACTIVE
        live = set(self.active_names()) if active_only else {n for n, i in self.infos.items() if i.status != "failed"}
        return [impl.plugin_name for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls())
                if not (impl.hookwrapper or impl.wrapper) and impl.plugin_name in live]

    # -- calling -------------------------------------------------------------------------------

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` the way its spec says and return the combined result: ``first`` the first
        result not None (an error naming the hook when ``required`` and none came), ``each`` the list of
        results not None, ``merge`` the merged dict (:class:`Merged`), ``concat`` the joined list."""
        spec = self.spec(hook)
        if spec.mode == FIRST:
            return self.first(hook, **kwargs)[1]
        if spec.mode == MERGE:
            return self._merge(spec, kwargs)
        if spec.mode == CONCAT:
            return [item for _plugin, result in self.each(hook, **kwargs) for item in result or ()]
        if spec.mode == EACH:
            return [result for _plugin, result in self.each(hook, **kwargs) if result is not None]
        raise FtError(f"{hook} is a registration hook; call PluginManager.register_all (ft collects registries).")

    def first(self, hook: str, **kwargs: Any) -> tuple[str | None, Any]:
        """``(plugin, result)`` of the first plugin that returns something not None (``(None, None)`` if none)."""
        spec = self.spec(hook)
        for plugin in self.implementers(hook):
            result = self._checked(spec, plugin, self._call_one(hook, plugin, kwargs))
            if result is not None:
                return plugin, result
        if spec.required:
            raise FtError(f"no active plugin returned {spec.required} from {hook}. Is the plugin that provides it "
                          "blocked or failed? See `ft plugins`.")
        return None, None

    def each(self, hook: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call every plugin the hook reaches, in order; yield ``(plugin, checked result)``.

        A generator: the caller acts on each result (registers an undo, say) before the next plugin
        runs. An exception escaping a plugin becomes a :class:`PluginHookError` naming the plugin and the
        hook (``FtError`` passes as it is; with ``config_errors_join`` a ConfigError's problems are the
        plugin's result)."""
        spec = self.spec(hook)
        for plugin in self.implementers(hook):
            try:
                result = self._call_one(hook, plugin, kwargs)
            except ConfigError as exc:
                if not spec.config_errors_join:
                    raise
                result = list(exc.problems)
            yield plugin, self._checked(spec, plugin, result)

    def register_all(self, registries: Any) -> None:
        """Every registration hook on every loaded plugin, each filling its registry (stamped with the plugin).

        A plugin whose registration raises is marked failed (``ft plugins`` lists the reason) and taken out
        of every hook; the other plugins work on. A name registered twice is an error naming both."""
        for spec in declared(hookspecs).values():
            if spec.mode != REGISTER:
                continue
            registry = getattr(registries, spec.into)
            arg = next(iter(inspect.signature(getattr(hookspecs, spec.name)).parameters))
            for plugin in self.implementers(spec.name):
                try:
                    self._checked(spec, plugin, self._call_one(spec.name, plugin, {arg: registry.scoped(plugin)}))
                except FtError as exc:
                    if "registered twice" in str(exc) or "declared twice" in str(exc):
                        raise
                    self.mark_failed(plugin, f"{spec.name} raised: {exc}")

    # -- plumbing ------------------------------------------------------------------------------

    def _checked(self, spec: HookSpec, plugin: str, value: Any) -> Any:
        if spec.returns.accepts(value):
            return value
        raise self.contract_error(spec.name, plugin, value, spec.returns.what)

    def _merge(self, spec: HookSpec, kwargs: dict[str, Any]) -> Merged:
        merged, owners = Merged(), {}
        for plugin, result in self.each(spec.name, **kwargs):
            for key, value in (result or {}).items():
                if key in merged and not _same(merged[key], value):
                    raise PluginError(
                        f"{spec.returns.item} '{key}' is set to {merged[key]!r} by plugin '{owners[key]}'"
                        f"{self.at(spec.name, owners[key])} and to {value!r} by plugin '{plugin}'"
                        f"{self.at(spec.name, plugin)}. Deselect one of them or align their config sections.")
                merged[key], owners[key] = value, plugin
        merged.owners = owners
        return merged

    def at(self, hook: str, plugin: str | None) -> str:
        """`` (file:line)`` of the plugin's implementation of ``hook``, for messages ('' if unknown)."""
        where = self.impl_location(hook, plugin)
        return f" ({where})" if where else ""

    def contract_error(self, hook: str, plugin: str | None, value: Any, expected: str) -> PluginError:
        shown = repr(value)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        return PluginError(f"plugin '{plugin}' returned {type(value).__name__} {shown} from {hook}"
                           f"{self.at(hook, plugin)}; the hook expects {expected} (see docs/hooks.md). Fix the "
                           f"plugin, or run without it (-p no:{plugin}).")

    def impl_location(self, hook: str, plugin: str | None) -> str | None:
        """``file:line`` of ``plugin``'s implementation of ``hook`` (None if it has none)."""
        caller = getattr(self.pm.hook, hook, None)
        for impl in caller.get_hookimpls() if caller is not None else []:
            if impl.plugin_name == plugin:
                return code_location(impl.function)
        return None

    def _call_one(self, hook: str, plugin: str, kwargs: dict[str, Any]) -> Any:
        caller = self._caller(hook, plugin)
        try:
            result = caller(**kwargs)
        except (FtError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            culprit = self._culprit(hook, plugin, exc)
            raise PluginHookError(culprit, hook, exc, plugin_frames(exc, self.pm.get_plugin(culprit))) from exc
        if not (caller.spec is not None and caller.spec.opts.get("firstresult")):
            return result[0] if result else None  # pluggy gives an "all" hook's results as a list
        return result

    def _caller(self, hook: str, plugin: str) -> Any:
        """A pluggy caller holding ``plugin``'s implementation of ``hook`` and every wrapper of it."""
        key = (hook, plugin)
        if key not in self._callers:
            caller = getattr(self.pm.hook, hook)
            wrappers = {i.plugin for i in caller.get_hookimpls() if i.hookwrapper or i.wrapper}
            keep = {self.pm.get_plugin(plugin), *wrappers}
            others = [obj for _name, obj in self.pm.list_name_plugin() if obj is not None and obj not in keep]
            self._callers[key] = self.pm.subset_hook_caller(hook, others)
        return self._callers[key]

    def _culprit(self, hook: str, plugin: str, exc: BaseException) -> str:
        """The plugin whose implementation raised: the called one, or a wrapper around it."""
        codes = {i.function.__code__: i.plugin_name for i in getattr(self.pm.hook, hook).get_hookimpls()
                 if hasattr(i.function, "__code__")}
        found = plugin
        tb = exc.__traceback__
        while tb is not None:
            found = codes.get(tb.tb_frame.f_code, found)
            tb = tb.tb_next
        return found

    # the plugin manager's: what a hook reaches, and taking a failed plugin out
    _callers: dict[tuple[str, str], Any]
    infos: dict[str, Any]
    active_names: Any
    mark_failed: Any


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def hook_names() -> list[str]:
    """Every hook ft declares (``ft/hookspecs.py``), in source order."""
    return list(declared(hookspecs))


def is_firstresult_hook(name: str) -> bool:
    """Whether ft declares ``name`` with mode ``first`` (read per traced or recorded call: one attribute lookup)."""
    found = getattr(getattr(hookspecs, name, None), "ft_hook", None)
    return isinstance(found, HookSpec) and found.mode == FIRST


def code_location(fn: Any) -> str | None:
    """``file:line`` where function ``fn`` is defined (None for what has no Python code)."""
    code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else None
