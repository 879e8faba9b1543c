"""Errors a user sees. Each says what went wrong, where, and what to do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FtError(Exception):
    """Base class of every error ft reports to the user without a traceback."""

    exit_code = 2


class ConfigError(FtError):
    """The configuration is invalid. ``problems`` holds every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration{where}:\n{lines}")


class PluginError(FtError):
    """A plugin could not be loaded, selected or validated."""


class PluginHookError(FtError):
    """An exception escaped from a plugin's hook; names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, exc: BaseException, frames: list[str] | None = None,
                 place: str | None = None):
        self.plugin, self.hook, self.original = plugin, hook, exc
        self.frames = list(frames or [])  # "file:line in function: code" of the plugin's own frames
        where = "".join(f"\n    at {f}" for f in self.frames[-5:])
        super().__init__(f"plugin '{plugin}' failed in {place or 'hook ' + hook}: {type(exc).__name__}: {exc}{where}\n"
                         f"  (--traceback shows the whole traceback; `-p no:{plugin}` runs without the plugin "
                         "if it is an optional feature)")


# Every plugin object registered in this process, by name: to attribute an exception that its code raised outside
# any hook call (a function it patched into torch at import, say) -- see ``plugin_in_traceback``.
LOADED_PLUGINS: dict[str, object] = {}


def plugin_in_traceback(exc: BaseException) -> tuple[str, list[str]] | None:
    """``(plugin, its frames)`` of the loaded plugin whose code is innermost in ``exc``'s traceback, or None."""
    import traceback

    order = {(f.filename, f.lineno, f.name): i for i, f in enumerate(traceback.extract_tb(exc.__traceback__))}
    best: tuple[int, str, list[str]] | None = None
    for name, obj in list(LOADED_PLUGINS.items()):
        frames = plugin_frames(exc, obj)
        if not frames:
            continue
        last = frames[-1].split(" in ", 1)[0]
        depth = max((i for (file, line, _fn), i in order.items() if f"{file}:{line}" == last), default=-1)
        if best is None or depth > best[0]:
            best = (depth, name, frames)
    return (best[1], best[2]) if best else None


def outside_hooks_error(plugin: str, exc: BaseException, frames: list[str]) -> PluginHookError:
    """``exc``, raised in a plugin's code that ran outside any hook call of that plugin (a function it replaced in
    torch or transformers when it was imported, say), as an error naming that plugin and its frames."""
    error = PluginHookError(plugin, "", exc, frames, place="code it runs outside its hooks (for example a function "
                            "it replaced in torch or transformers when it was imported)")
    error.__cause__ = exc
    return error


class DataError(FtError):
    """A dataset could not be read or prepared."""


class MissingDependencyError(FtError):
    """An optional dependency of a plugin is not installed."""


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (plugins check before use)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a sys.modules entry without a spec (a blocked import)
        return False


def is_out_of_memory(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 5:  # accelerate and plugins may wrap it
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def plugin_frames(exc: BaseException, plugin: object) -> list[str]:
    """``file:line in function`` of each traceback frame inside the plugin's own module or package."""
    import inspect
    import os
    import traceback

    module = inspect.getmodule(plugin) if not inspect.ismodule(plugin) else plugin
    path = getattr(module, "__file__", None)
    if not path:
        return []
    root = os.path.dirname(path) if os.path.basename(path) == "__init__.py" else path
    frames = []
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == path or (root != path and frame.filename.startswith(root + os.sep)):
            frames.append(f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line or ''}".rstrip(": "))
    return frames


def defined_at(fn: Any) -> str:
    """``function NAME at FILE:LINE`` where ``fn`` (a function, method, class or callable object) is defined."""
    import inspect

    target = inspect.unwrap(fn) if callable(fn) else fn
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isclass(target)):
        target = type(target)  # a callable object: its class
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    try:
        path = inspect.getsourcefile(target) or inspect.getfile(target)
        line = inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        return f"function {name}"
    return f"{'class' if inspect.isclass(target) else 'function'} {name} at {path}:{line}"


def attributed(fn: Callable[..., Any], plugin: str, hook: str, place: str, origin: Any = None) -> Callable[..., Any]:
    """``fn``, raising a :class:`PluginHookError` that names ``plugin``, ``place`` (what of the plugin's failed: a
    callback's event, a method's collator or loss) and the file:line of the plugin's frames: those in the module of
    ``origin`` (default: ``fn``'s), else the innermost frame.
    FtError, KeyboardInterrupt and running out of memory pass as they are (they are handled above)."""
    return _Attributed(fn, plugin, hook, place, origin)


class _Attributed:
    """What :func:`attributed` returns: a callable object rather than a closure, so that a collator stays
    picklable (DataLoader workers under the spawn start method)."""

    def __init__(self, fn: Callable[..., Any], plugin: str, hook: str, place: str, origin: Any) -> None:
        self._ft_fn, self._ft_plugin, self._ft_hook, self._ft_place, self._ft_origin = fn, plugin, hook, place, origin
        self.__wrapped__ = fn
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, name):
                try:
                    setattr(self, name, getattr(fn, name))
                except (AttributeError, TypeError):
                    pass

    def __getattr__(self, name: str) -> Any:  # what callers read of a collator (its tokenizer, pad id) is fn's
        if name.startswith("_ft_") or name == "__setstate__":
            raise AttributeError(name)
        return getattr(self._ft_fn, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._ft_fn(*args, **kwargs)
        except (FtError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            origin = self._ft_fn if self._ft_origin is None else self._ft_origin
            own = plugin_frames(exc, origin)
            found = plugin_in_traceback(exc)
            if found is not None and found[1][-1] not in own:  # raised in another plugin's code that this one
                raise outside_hooks_error(found[0], exc, found[1]) from exc  # called (a function it patched in)
            frames = own or _innermost(exc)
            raise PluginHookError(self._ft_plugin, self._ft_hook, exc, frames, place=self._ft_place) from exc


def _innermost(exc: BaseException) -> list[str]:
    """The frame an exception came from, unless it is ft's own (then the plugin's call was refused, e.g. an
    unexpected keyword argument, and the place says enough)."""
    import os
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)[-1:]
    ft_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return [f"{f.filename}:{f.lineno} in {f.name}: {f.line or ''}".rstrip(": ") for f in frames
            if not os.path.abspath(f.filename).startswith(ft_dir)]
