"""ft: a plugin-first framework for fine-tuning large language models.

The public API for plugin authors is small: ``hookimpl`` marks hook implementations,
``hookspec`` marks specifications (for plugins that add their own hooks), and the errors
below are what a plugin raises to tell the user something went wrong.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import pluggy

from ft.kernel.errors import (
    ConfigError,
    DataError,
    FtError,
    MissingDependencyError,
    PluginError,
    PluginHookError,
)

__version__ = "0.1.0"
version = __version__

PROJECT = "ft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "ConfigError",
    "DataError",
    "FtError",
    "MissingDependencyError",
    "PluginError",
    "PluginHookError",
    "__version__",
    "hookimpl",
    "hookspec",
    "version",
]
