"""Typed registries that plugins fill through registration hooks.

Each entry is stamped with the plugin that registered it; registering a name twice is an
error naming both plugins.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ft.kernel.errors import FtError, PluginError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    plugin: str


class Registry(Generic[T]):
    """Names -> values, each stamped with its owning plugin."""

    kind = "entry"

    def __init__(self) -> None:
        self._entries: dict[str, Entry[T]] = {}
        self._plugin = "<core>"

    def scoped(self, plugin: str) -> Registry[T]:
        """A view of this registry that stamps ``plugin`` on what it adds."""
        view = object.__new__(type(self))
        view.__dict__ = {**self.__dict__, "_plugin": plugin}
        view._entries = self._entries  # shared storage
        return view

    def _add(self, name: str, value: T) -> None:
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by plugin '{other}' and by plugin "
                f"'{self._plugin}'. Disable one of them with `-p no:NAME`."
            )
        self._entries[name] = Entry(name, value, self._plugin)

    def get(self, name: str, key_path: str | None = None) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise FtError(self.unknown_message(name, key_path)) from None

    def unknown_message(self, name: str, key_path: str | None = None) -> str:
        where = f"{key_path}: " if key_path else ""
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        known = ", ".join(sorted(self._entries)) or "none"
        return f"{where}unknown {self.kind} '{name}'.{hint} Known: {known}."

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)


@dataclass(frozen=True)
class Format:
    """A dataset format: its entry-options model, a builder of its tokenize function, and the
    row columns its samples carry (checked against the method's at validation)."""

    options: type  # subclass of ft.kernel.formats.DatasetOptions
    build: Callable[..., Any]  # (cfg, entry, tokenizer) -> ft.kernel.formats.Tokenize
    columns: tuple[str, ...] = ("input_ids", "labels")


class FormatRegistry(Registry[Format]):
    kind = "dataset format"

    def add(self, name: str, options: type, build: Callable[..., Any],
            columns: tuple[str, ...] = ("input_ids", "labels")) -> None:
        """Register dataset ``type: name`` with its options model, tokenize builder and the
        columns its samples carry (default: SFT's ``input_ids``/``labels``)."""
        self._add(name, Format(options, build, tuple(columns)))


class MethodRegistry(Registry[Any]):
    kind = "training method"

    def add(self, method: Any) -> None:
        """Register a :class:`ft.kernel.methods.Method` under its ``name``."""
        from ft.kernel.methods import Method

        if not isinstance(method, Method):
            raise PluginError(f"plugin '{self._plugin}' registered {method!r} as a training method; "
                              "register an ft.api.Method instance.")
        self._add(method.name, method)


@dataclass(frozen=True)
class Reward:
    """A reward for online RL methods (GRPO): a reward function, or with ``options`` a factory of one."""

    fn: Callable[..., Any]
    options: type | None = None  # a pydantic model of the reward's options in the config
    description: str = ""


class RewardRegistry(Registry[Reward]):
    kind = "reward"

    def add(self, name: str, fn: Callable[..., Any], options: type | None = None, description: str = "") -> None:
        """Register reward ``name`` (``grpo.rewards[].name`` in the config).

        Without ``options``, ``fn(prompts, completions, completion_ids, **columns)`` is the reward
        function: one float (or None: not applicable) per completion. With ``options`` (a pydantic
        model of the keys its config entry accepts besides ``name`` and ``weight``), ``fn(options, cfg)``
        builds that reward function once per run.
        """
        if not callable(fn):
            raise PluginError(f"plugin '{self._plugin}' registered reward '{name}' with {fn!r}, which is not "
                              "callable; register a function.")
        self._add(name, Reward(fn, options, description))


class OptimizerRegistry(Registry[Any]):
    kind = "optimizer"

    def add(self, name: str, factory: str | Callable[..., Any]) -> None:
        """Register an optimizer: a transformers ``optim`` name or ``(cfg, model) -> Optimizer``."""
        self._add(name, factory)


class SchedulerRegistry(Registry[Any]):
    kind = "lr scheduler"

    def add(self, name: str, factory: str | Callable[..., Any]) -> None:
        """Register a scheduler: a transformers ``SchedulerType`` name or
        ``(cfg, optimizer, num_training_steps) -> LRScheduler``."""
        self._add(name, factory)


class KeyHintRegistry(Registry[Any]):
    """What to write instead of a key ft does not know (another tool's spelling of a setting).

    Keys are paths: a top-level key (``adapter``) or a dataset-entry key (``datasets[].field_human``,
    which also covers ``test_datasets``). The hint is a sentence, or a callable of the key's value
    that returns one (``adapter: qlora`` -> ``plugins: [lora, qlora]``).
    """

    kind = "key hint"

    def add(self, key: str, hint: str | Callable[[Any], str]) -> None:
        """Register ``hint`` for the unknown key ``key`` (``name`` or ``datasets[].name``)."""
        self._add(key, hint)

    def hint_for(self, key: str, value: Any) -> str | None:
        """The hint for ``key`` (with the plugin that gave it), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        text = entry.value(value) if callable(entry.value) else entry.value
        return f"{text} (hint from plugin '{entry.plugin}')" if text else None
