"""The plugin manager: entry-point discovery, blocking, selection, listing, tracing.

Every plugin -- first-party or not -- is an entry point in the group ``ft``. A plugin is:

- *blocked* by ``-p no:NAME`` (never imported), or by ``FT_DISABLE_PLUGIN_AUTOLOAD=1`` for
  third-party plugins not named with ``-p NAME``;
- *failed* if importing or validating it raised (listed with the reason; other commands work);
- *loaded* otherwise. Registration hooks (formats, optimizers, config sections, commands) reach
  every loaded plugin.
- *active* if loaded and either not a feature, or a feature that is selected (``plugins: [...]``
  in the config or ``-p NAME``). Pipeline hooks reach only active plugins.

What a plugin is -- a feature or always on, essential, the capabilities it provides, the method
feature it needs, the library loggers it owns -- it declares once, as ``PLUGIN =
ft.api.Plugin(...)`` in its module (:class:`Plugin`). A first-party plugin declared essential
cannot be blocked.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import inspect
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ft import PROJECT, hookspecs
from ft.kernel.errors import LOADED_PLUGINS, PluginError
from ft.kernel.hooks import HookCaller, code_location, hook_names, is_firstresult_hook

ENTRY_POINT_GROUP = "ft"
AUTOLOAD_ENV = "FT_DISABLE_PLUGIN_AUTOLOAD"
FIRST_PARTY_DIST = "ft"
DECLARATION = "PLUGIN"  # the module attribute holding a plugin's Plugin(...)


class Plugin:
    """What a plugin declares about itself, once, as ``PLUGIN = ft.api.Plugin(...)`` in its module.

    - ``feature``: True if the plugin acts only when selected (``-p NAME``, ``plugins: [NAME]``);
      False (the default) if it is always active once installed (formats, methods, essentials).
    - ``essential``: the pipeline cannot work without it; ``-p no:NAME`` is refused (first-party only).
    - ``provides``: capabilities other plugins and methods can ask for (``cfg.provides("adapter")``).
    - ``method_feature``: the method feature it needs (``"packing"``); a method without it refuses
      the plugin at validation.
    - ``loggers``: loggers of libraries it owns, kept to errors unless the plugin is selected.

    A misspelt field is an error naming the field, the closest valid one and (through the import
    failure) the plugin.
    """

    FIELDS = ("feature", "essential", "provides", "method_feature", "loggers")

    def __init__(self, **fields: Any) -> None:
        unknown = [k for k in fields if k not in self.FIELDS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.FIELDS, n=1)
            raise PluginError(f"Plugin(...) has no field '{unknown[0]}'.{f' Did you mean {close[0]!r}?' if close else ''} "
                              f"Fields: {', '.join(self.FIELDS)}.")
        self.feature = _typed(fields, "feature", bool, False)
        self.essential = _typed(fields, "essential", bool, False)
        self.provides = tuple(_names(fields, "provides"))
        self.method_feature = _typed(fields, "method_feature", str, None)
        self.loggers = tuple(_names(fields, "loggers"))
        if self.feature and self.essential:
            raise PluginError("Plugin(feature=True, essential=True): an essential plugin is always active; drop one.")

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS if getattr(self, k) not in (False, None, ()))
        return f"Plugin({shown})"


def _typed(fields: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = fields.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise PluginError(f"Plugin({key}={value!r}): {key} must be a {kind.__name__}.")
    return value


def _names(fields: dict[str, Any], key: str) -> list[str]:
    value = fields.get(key, ())
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise PluginError(f"Plugin({key}={value!r}): {key} must be a list of names, e.g. {key}=[{value!r}].")
    return list(value)


def declaration(obj: object) -> Plugin:
    """The plugin's ``PLUGIN = Plugin(...)`` (a default Plugin() if it declares none). A leftover or misspelt
    ``FT_*`` global, a near-miss of ``PLUGIN`` or a ``PLUGIN`` that is no Plugin is an error: it would
    otherwise be ignored without a word."""
    found = getattr(obj, DECLARATION, None)
    if found is not None and not isinstance(found, Plugin):
        raise PluginError(f"{DECLARATION} = {found!r} is not a declaration; write {DECLARATION} = ft.api.Plugin(...).")
    names = [a for a in dir(obj) if a.isupper() and not a.startswith("__")]
    old = {"FT_FEATURE": "feature", "FT_PROVIDES": "provides", "FT_METHOD_FEATURE": "method_feature",
           "FT_LOGGERS": "loggers"}
    for attr in names:
        if attr.startswith("FT_"):
            field = old.get(attr) or (difflib.get_close_matches(attr[3:].lower(), Plugin.FIELDS, n=1) or [None])[0]
            hint = f"{DECLARATION} = ft.api.Plugin({field}=...)" if field else f"{DECLARATION} = ft.api.Plugin(...)"
            raise PluginError(f"module global {attr} is not read by ft; declare the plugin once with {hint}.")
        if attr != DECLARATION and difflib.get_close_matches(attr, [DECLARATION], n=1, cutoff=0.8):
            raise PluginError(f"{attr} looks like a misspelt {DECLARATION}; ft reads only {DECLARATION} = ft.api.Plugin(...).")
    return found if found is not None else Plugin()


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
    provides: frozenset[str] = frozenset()  # capabilities (Plugin.provides), e.g. "varlen_attention"
    method_feature: str | None = None  # the method feature it needs (Plugin.method_feature), e.g. "packing"
    loggers: tuple[str, ...] = ()  # library loggers it owns (Plugin.loggers)

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


# Plugin objects registered for the current process only (``ft.tools.testing``, notebooks): every
# PluginManager created while they are here registers them after the entry points.
_PROCESS_PLUGINS: list[tuple[str, object]] = []


def add_process_plugin(name: str, obj: object) -> None:
    """Register ``obj`` as plugin ``name`` in every plugin manager made from now on."""
    _PROCESS_PLUGINS.append((name, obj))


def process_plugin_names() -> list[str]:
    """Names of the plugins registered for this process (``add_process_plugin``)."""
    return [n for n, _o in _PROCESS_PLUGINS]


def remove_process_plugin(name: str) -> None:
    _PROCESS_PLUGINS[:] = [(n, o) for n, o in _PROCESS_PLUGINS if n != name]


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    seen: dict[str, md.EntryPoint] = {}
    for ep in eps:
        seen.setdefault(ep.name, ep)  # the same dist found twice on sys.path: keep the first
    return list(seen.values())


class PluginManager(HookCaller):
    """ft's view of pluggy: discovery, selection, listing; hooks are called through :class:`HookCaller`
    (``pm.call``, ``pm.first``, ``pm.each``), which reads each hook's declaration."""

    def __init__(
        self,
        select: Sequence[str] = (),
        block: Sequence[str] = (),
        *,
        autoload: bool | None = None,
        entry_points: Sequence[md.EntryPoint] | None = None,
        extra_plugins: Sequence[tuple[str, object]] = (),
        plugin_files: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.selected: list[str] = list(dict.fromkeys(select))
        self.blocked: list[str] = list(dict.fromkeys(block))
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
        self.autoload = autoload
        self.infos: dict[str, PluginInfo] = {}
        self._callers: dict[tuple[str, str], Any] = {}
        for before, after in list(_MONITORS):
            self.pm.add_hookcall_monitoring(before, after)
        self._load(entry_points if entry_points is not None else _entry_points())
        for name, obj in [*_PROCESS_PLUGINS, *extra_plugins]:
            if name in self.blocked:
                self.infos[name] = PluginInfo(name, "<local>", "", getattr(obj, "__name__", type(obj).__name__),
                                              status="blocked")
                continue
            self.register(name, obj, distribution="<test>", version="")
        for name, module in plugin_files:  # -p ./file.py: listed with its path
            self.register(name, module, distribution=PLUGIN_FILE, target=getattr(module, "__file__", None))
        self._check_selection()

    # -- loading ---------------------------------------------------------------------------

    def _refuse_blocking_essentials(self, eps: Sequence[md.EntryPoint]) -> None:
        """``-p no:NAME`` of a first-party plugin that declares ``essential=True`` is refused (its module is
        imported to read the declaration; other blocked plugins are never imported)."""
        bad = []
        for ep in eps:
            if ep.name in self.blocked and ep.dist is not None and ep.dist.name == FIRST_PARTY_DIST:
                try:
                    if declaration(ep.load()).essential:
                        bad.append(ep.name)
                except Exception:  # noqa: S112 - a broken first-party plugin is reported when it loads
                    continue
        if bad:
            raise PluginError(
                f"plugin(s) {', '.join(sorted(bad))} are essential and cannot be blocked "
                "(ft cannot load models or data without them). Remove the `-p no:...` option."
            )

    def _load(self, eps: Sequence[md.EntryPoint]) -> None:
        self._refuse_blocking_essentials(eps)
        names: dict[int, tuple[str, str]] = {}  # parse each distribution's METADATA once, not twice per entry point
        for ep in eps:
            if ep.dist is not None and id(ep.dist) not in names:
                meta = ep.dist.metadata
                names[id(ep.dist)] = (meta["Name"], meta["Version"])
            dist, version = names[id(ep.dist)] if ep.dist is not None else ("?", "")
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
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a broken plugin must not break the CLI, nor sys.exit() end it silently
                info.status = "failed"
                info.error = import_failure(exc)
                continue
            self._register_checked(ep.name, obj, info)

    def register(self, name: str, obj: object, *, distribution: str = "<local>", version: str = "",
                 target: str | None = None) -> None:
        """Register a plugin object directly (tests, ``ft.tools.testing``)."""
        info = PluginInfo(name, distribution, version, target or getattr(obj, "__name__", type(obj).__name__))
        self.infos[name] = info
        self._register_checked(name, obj, info)
        if info.status == "failed":
            origin = f" ({info.target})" if distribution == PLUGIN_FILE else ""
            raise PluginError(f"plugin '{name}'{origin} is invalid: {info.error}")

    def _register_checked(self, name: str, obj: object, info: PluginInfo) -> None:
        try:
            declared = declaration(obj)
        except PluginError as exc:
            info.status, info.error = "failed", f"{exc}{_module_at(obj)}"
            return
        problem = _misnamed_hooks(obj, self.pm)
        if problem:
            info.status, info.error = "failed", problem
            return
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            info.status = "failed"
            text = str(exc).replace("\n", "; ")
            at = next((where for attr in dir(obj) if attr.startswith("ft_") and (where := code_location(getattr(obj, attr)))
                       and f"'{attr}'" in text), None)
            info.error = f"invalid hook implementation{f' ({at})' if at else ''}: {text}"
            return
        except ValueError as exc:  # duplicate name
            info.status = "failed"
            info.error = str(exc)
            return
        self._callers.clear()
        LOADED_PLUGINS[name] = obj
        info.feature, info.provides = declared.feature, frozenset(declared.provides)
        info.method_feature, info.loggers = declared.method_feature, declared.loggers
        info.description = (inspect.getdoc(obj) or "").split("\n", 1)[0] if inspect.ismodule(obj) else ""
        info.hooks = sorted(c.name for c in self.pm.get_hookcallers(obj) or [])
        info.status = "essential" if declared.essential and info.distribution == FIRST_PARTY_DIST else "available"

    def check_selected_loaded(self) -> None:
        """Raise when a selected plugin (``-p NAME``, ``-p ./file.py``, ``plugins:``) failed after selection: its
        registration hook raised or broke the contract. It was asked for, so going on without it is wrong."""
        failed = [self.infos[n] for n in self.selected if n in self.infos and self.infos[n].status == "failed"]
        if failed:
            raise PluginError("\n".join(f"plugin '{i.name}' ({plugin_origin(i)}) is selected but failed to load: {i.error}"
                                         for i in failed))

    def mark_failed(self, name: str, error: str) -> None:
        """Take a plugin out of every hook (its registration hook raised, say); list it as failed."""
        obj = self.pm.get_plugin(name)
        if obj is not None:
            self.pm.unregister(obj)
        self._callers.clear()
        info = self.infos[name]
        info.status, info.error = "failed", error

    def _check_selection(self) -> None:
        problems = []
        for name in self.blocked:
            if name not in self.infos:
                close = difflib.get_close_matches(name, list(self.infos), n=1)
                hint = f" Did you mean 'no:{close[0]}'?" if close else ""
                problems.append(f"-p no:{name}: no plugin named '{name}' is installed, so there is nothing to "
                                f"block.{hint} Installed: {', '.join(sorted(self.infos))}.")
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

    def active_names(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.status in ("active", "essential")]

    def features(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.feature]

    def failed(self) -> list[PluginInfo]:
        """Installed plugins that could not be loaded (import, hook validation or registration failed)."""
        return [i for i in self.infos.values() if i.status == "failed"]

    def provided(self) -> dict[str, tuple[str, ...]]:
        """Capability -> the active plugins that declare it (``Plugin(provides=...)``)."""
        out: dict[str, tuple[str, ...]] = {}
        for name in self.active_names():
            for capability in self.infos[name].provides:
                out[capability] = (*out.get(capability, ()), name)
        return out

    def call_order(self, hook_name: str) -> list[str]:
        """Plugin names in the order a hook calls them (``ft plugins --hook NAME``)."""
        return self.implementers(hook_name, active_only=False)

    def manifest(self) -> list[dict[str, Any]]:
        """What was loaded and selected, with versions (saved next to the weights)."""
        return [i.as_dict() for i in self.infos.values()]

    def enable_tracing(self, write=None) -> None:
        """Print every hook call: the hook, the plugin called (wrappers in brackets) and its result."""
        write = write or (lambda msg: print(msg, file=sys.stderr))
        self.pm.add_hookcall_monitoring(lambda *a: None, trace_after(write))


# Hook-call monitors applied to every plugin manager made while they are registered (ft.tools.testing's
# recorder): ``before(hook_name, hook_impls, kwargs)`` and ``after(outcome, hook_name, hook_impls, kwargs)``,
# as pluggy's ``add_hookcall_monitoring`` takes them.
_MONITORS: list[tuple[Any, Any]] = []


def add_hook_monitor(before: Any, after: Any) -> Any:
    """Monitor every hook call of plugin managers made from now on; returns a function that stops it."""
    pair = (before, after)
    _MONITORS.append(pair)
    return lambda: _MONITORS.remove(pair) if pair in _MONITORS else None


def trace_after(write: Any) -> Any:
    """A pluggy ``after`` monitor that writes one line per hook call (``--trace``)."""

    def after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        names = [i.plugin_name if not (i.hookwrapper or i.wrapper) else f"[{i.plugin_name}]"
                 for i in reversed(hook_impls)]
        if outcome.exception is not None:
            shown = f"raised {type(outcome.exception).__name__}"
        else:
            result = outcome.get_result()
            if not is_firstresult_hook(hook_name):  # an "all" hook called for one plugin: [] or [value]
                result = result[0] if result else None
            shown = _short(result)
        write(f"[ft trace] {hook_name} {' '.join(names)} -> {shown}")

    return after


def _short(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (dict, list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value) if isinstance(value, (str, int, float, bool)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def import_failure(exc: BaseException) -> str:
    """Why importing a plugin failed, with the file:line that raised (``sys.exit()`` at import included)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    ft_dir = os.path.dirname(os.path.abspath(hookspecs.__file__)) + os.sep
    frames = [f for f in frames if not os.path.abspath(f.filename).startswith(ft_dir)] or frames  # the plugin's line
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SystemExit):
        return f"import failed: it called sys.exit({exc.code!r}) while being imported{at}"
    return f"import failed: {type(exc).__name__}: {exc}{at}"


def plugin_origin(info: PluginInfo) -> str:
    """Where a plugin comes from: its distribution and version, or the path of its file (``-p ./file.py``)."""
    return info.target if info.distribution == PLUGIN_FILE else f"{info.distribution} {info.version}".strip()


PLUGIN_FILE = "<file>"  # the distribution of a plugin loaded from a .py file (``-p ./file.py``); target is the path


def _misnamed_hooks(obj: object, pm: pluggy.PluginManager) -> str | None:
    """A hookimpl whose name is no hook, or an ``ft_*`` hook function without ``@hookimpl``."""
    known = hook_names()
    problems = []
    for attr in dir(obj):
        if not attr.startswith("ft_"):
            continue
        value = getattr(obj, attr, None)
        if not callable(value) or inspect.isclass(value):
            continue
        at = code_location(value)
        attr_at = f"'{attr}' ({at})" if at else f"'{attr}'"
        marked = pm.parse_hookimpl_opts(obj, attr) is not None
        if marked and attr not in known:
            close = difflib.get_close_matches(attr, known, n=1, cutoff=0.7)
            hint = f" Did you mean '{close[0]}'?" if close else f" Hooks: {', '.join(known)}."
            problems.append(f"{attr_at} is marked @hookimpl but there is no such hook.{hint}")
        elif not marked and attr in known:
            problems.append(f"{attr_at} is a hook name but lacks @hookimpl, so it would never be called; "
                            "decorate it with @ft.hookimpl.")
        elif not marked and inspect.isfunction(value) and getattr(value, "__module__", None) == getattr(obj, "__name__", 0):
            close = difflib.get_close_matches(attr, known, n=1, cutoff=0.85)
            if close:
                problems.append(f"{attr_at} looks like hook '{close[0]}' misspelled and without @hookimpl; "
                                "rename and decorate it, or rename it away from the ft_ prefix.")
    return "; ".join(problems) or None


def _module_at(obj: object) -> str:
    """`` (in FILE)`` of a plugin module, for a declaration error."""
    file = getattr(obj, "__file__", None) or getattr(inspect.getmodule(type(obj)), "__file__", None)
    return f" (in {file})" if file else ""
