"""Errors a user sees. Each says what went wrong, where, and what to do."""

from __future__ import annotations

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


def load_or_explain(source: str, what: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)``; a missing or unreachable source becomes one clear error."""
    from pathlib import Path

    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if Path(source).exists() else (
            " It is not a local directory; as a hub id it could not be fetched (check the spelling, your "
            "network, HF_TOKEN for gated models)."
        )
        raise FtError(f"could not load the {what} from '{source}': {first}.{hint}") from exc
