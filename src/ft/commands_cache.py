"""What ``ft --help`` lists of the commands plugins add, without importing the plugins.

Listing plugin commands means loading every plugin (their config sections build pydantic models at
import), which costs most of a second. So the names and help texts of the commands plugins add
(``ft_add_commands``) are kept in a small JSON file, written each time the plugins are loaded for
real, and ``ft --help`` uses it only while nothing it was made from has changed:

- every directory on ``sys.path`` (installing or removing a distribution adds or removes its
  ``*.dist-info`` there, which changes the directory's modification time);
- every distribution's metadata (``entry_points.txt``, ``METADATA``), so an entry point edited in
  place counts too;
- every Python file that was loaded when it was written: the plugins, what they import, ft itself;
- the interpreter, ``sys.path`` and ``FT_DISABLE_PLUGIN_AUTOLOAD``.

Each is compared by size and modification time (``os.stat``), so checking costs no import and no
metadata scan. The cache is never written when a plugin failed to load or its ``ft_add_commands``
raised (``ft --help`` then loads the plugins every time and reports the failure as before), nor
while plugins are registered for the process (``ft.tools.testing``). Running a plugin command always
loads the plugins: the cache only feeds the list ``ft --help`` prints.

The files live in ``$FT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ft``, else ``~/.cache/ft``), one per
interpreter and ``sys.path`` (``ft`` and ``python -m ft.cli`` differ, so does a ``PYTHONPATH``), the
most recently written few kept; an unreadable or unwritable cache is ignored.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

FORMAT = 2
CACHE_DIR_ENV = "FT_CACHE_DIR"
KEEP = 16  # cache files kept, the most recently written


def cache_dir() -> str:
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ft")


def where() -> list[Any]:
    """The interpreter and ``sys.path`` (take it before loading plugins: an import may change the path)."""
    return [FORMAT, sys.version, sys.executable, sys.prefix, list(sys.path)]


def cache_file(at: list[Any] | None = None) -> str:
    """The file for ``at`` (default: this process now): one per interpreter and ``sys.path``."""
    import zlib  # built in; hashlib would cost more than the rest of the check

    key = json.dumps(at or where()).encode()
    return os.path.join(cache_dir(), f"commands-{zlib.crc32(key):08x}.json")


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def load() -> dict[str, dict[str, Any]] | None:
    """``{name: {"help", "short_help", "hidden", "deprecated"}}`` of the plugin commands, or None when
    there is no cache or it may be stale."""
    try:
        with open(cache_file(), encoding="utf-8") as fh:
            data = json.load(fh)
        if data["where"] != where() or any(os.environ.get(k) != v for k, v in data["env"].items()):
            return None
        if any(_stamp(path) != stamp for path, stamp in data["files"].items()):
            return None
        return data["commands"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save(commands: dict[str, Any], env: tuple[str, ...] = (), at: list[Any] | None = None) -> None:
    """Record ``commands`` (name -> click command, as the plugins added them) for what is installed
    now; ``env`` names the environment variables plugin loading depended on, ``at`` is ``where()``
    taken before the plugins were loaded."""
    import importlib.metadata as md

    at = at or where()
    listed = {name: {"help": cmd.help, "short_help": cmd.short_help, "hidden": bool(cmd.hidden),
                     "deprecated": cmd.deprecated} for name, cmd in commands.items()}
    paths = {os.path.abspath(p or os.curdir) for p in [*at[-1], *sys.path]}
    for dist in md.distributions():
        info = getattr(dist, "_path", None)  # a PathDistribution's *.dist-info / *.egg-info
        if info is None:
            return  # metadata not in files: no way to tell when it changes, so no cache
        meta = "PKG-INFO" if str(info).endswith(".egg-info") else "METADATA"
        paths.update(os.path.join(str(info), name) for name in ("entry_points.txt", meta))
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and os.path.isabs(file):
            paths.add(file)
    data = {"where": at, "env": {k: os.environ.get(k) for k in env},
            "files": {p: _stamp(p) for p in sorted(paths)}, "commands": listed}
    path = cache_file(at)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
        _prune(os.path.dirname(path))
    except (OSError, TypeError, ValueError):  # a read-only home, a help text json cannot hold: no cache
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _prune(root: str) -> None:
    """Keep the KEEP most recently written cache files (each PYTHONPATH a test sets makes one)."""
    entries = []
    for entry in os.scandir(root):
        if entry.name.startswith("commands-") and entry.name.endswith(".json"):
            try:
                entries.append((entry.stat().st_mtime_ns, entry.path))
            except OSError:
                continue
    for _mtime, old in sorted(entries)[:-KEEP]:
        try:
            os.unlink(old)
        except OSError:
            pass


def stub(name: str, entry: dict[str, Any]) -> Any:
    """A click command that only shows in the list: the real one comes from the plugin when it runs."""
    import click

    return click.Command(name, help=entry.get("help"), short_help=entry.get("short_help"),
                         hidden=bool(entry.get("hidden")), deprecated=entry.get("deprecated") or False)
