"""Typed call sites of every hook: what the pipeline (``ft.run``) and the CLI call.

Each method calls one hook through :class:`ft.plugins.PluginManager` (so through pluggy,
plugin by plugin: tracing, the test recorder and wrappers see every call), checks what each
plugin returned against the hook's contract (``ft/hookspecs.py``) and combines the results. A
value that breaks the contract is an error naming the plugin and the hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ft.errors import ConfigError, FtError, PluginError

if TYPE_CHECKING:
    from ft.config import Config
    from ft.context import Registries
    from ft.methods import Method
    from ft.plugins import PluginManager


class HookCalls:
    """One method per hook, in pipeline order."""

    def __init__(self, pm: PluginManager) -> None:
        self.pm = pm

    # -- registration (every loaded plugin) ------------------------------------------------------

    def register_all(self, regs: Registries) -> None:
        """Config sections, formats, methods, optimizers, schedulers and rewards of every loaded plugin.

        A plugin whose registration raises is marked failed (``ft plugins`` lists the reason) and
        taken out of every hook; the other plugins work on.
        """
        hooks = (
            ("ft_add_config", regs.sections, "registry"),
            ("ft_register_formats", regs.formats, "register"),
            ("ft_register_methods", regs.methods, "register"),
            ("ft_register_optimizers", regs.optimizers, "register"),
            ("ft_register_schedulers", regs.schedulers, "register"),
            ("ft_register_key_hints", regs.key_hints, "register"),
            ("ft_register_rewards", regs.rewards, "register"),
        )
        for hook, registry, arg in hooks:
            for plugin in self.pm.implementers(hook, active_only=False):
                try:
                    self._expect_none(hook, plugin, self.pm._call_one(hook, plugin, {arg: registry.scoped(plugin)}))
                except FtError as exc:
                    if "registered twice" in str(exc) or "declared twice" in str(exc):
                        raise
                    self.pm.mark_failed(plugin, f"{hook} raised: {exc}")

    def add_commands(self, cli: Any) -> None:
        for plugin, result in self.pm.call_each("ft_add_commands", active_only=False, cli=cli):
            self._expect_none("ft_add_commands", plugin, result)

    def load_trained(self, run_dir: Any, dtype: Any) -> tuple[Any, Any] | None:
        plugin, result = self.pm.call_first("ft_load_trained", active_only=False, run_dir=run_dir, dtype=dtype)
        if result is not None and not (isinstance(result, tuple) and len(result) == 2):
            raise self._contract("ft_load_trained", plugin, result, "a (model, tokenizer) tuple or None")
        return result

    # -- config --------------------------------------------------------------------------------

    def validate_config(self, cfg: Config) -> list[str]:
        """Every plugin's problems; a ConfigError a plugin raises joins the list (file:line kept)."""
        problems: list[str] = []
        for plugin in self.pm.implementers("ft_validate_config"):
            try:
                found = self.pm._call_one("ft_validate_config", plugin, {"cfg": cfg})
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            if found is None:
                continue
            if isinstance(found, str) or not isinstance(found, (list, tuple)) or \
                    not all(isinstance(p, str) for p in found):
                raise self._contract("ft_validate_config", plugin, found, "a list of problem strings or None")
            problems.extend(found)
        return problems

    # -- data ----------------------------------------------------------------------------------

    def load_tokenizer(self, cfg: Config) -> Any:
        return self._required("ft_load_tokenizer", "a tokenizer", cfg=cfg)

    def load_dataset(self, cfg: Config, entry: Any) -> Any:
        return self.pm.call_first("ft_load_dataset", cfg=cfg, entry=entry)[1]

    def data_fingerprints(self, cfg: Config, entry: Any) -> dict[str, str]:
        out = {}
        for plugin, fp in self.pm.call_each("ft_data_fingerprint", cfg=cfg, entry=entry):
            if fp is None:
                continue
            if not isinstance(fp, str):
                raise self._contract("ft_data_fingerprint", plugin, fp, "a string or None")
            out[plugin] = fp
        return out

    def packers(self) -> list[str]:
        """Active plugins that pack (``ft_pack``): packing is on when this is not empty."""
        return self.pm.implementers("ft_pack")

    def pack(self, cfg: Config, dataset: Any, method: Method) -> Any:
        return self.pm.call_first("ft_pack", cfg=cfg, dataset=dataset, method=method)[1]

    # -- model ---------------------------------------------------------------------------------

    def model_kwargs(self, cfg: Config) -> dict[str, Any]:
        return self._merged("ft_model_kwargs", "model keyword argument", cfg=cfg)

    def load_model(self, cfg: Config, kwargs: dict[str, Any], tokenizer: Any) -> Any:
        return self._required("ft_load_model", "a model", cfg=cfg, kwargs=kwargs, tokenizer=tokenizer)

    def patch_model(self, cfg: Config, model: Any) -> Iterator[tuple[str, list[Any]]]:
        """``(plugin, its patch records)`` for each plugin, yielded before the next plugin patches (so
        the caller can register every undo, and see what each plugin changed, even if a later one raises)."""
        from ft.patching import PatchRecord

        for plugin, records in self.pm.call_each("ft_patch_model", cfg=cfg, model=model):
            if records is None:
                records = []
            if not isinstance(records, (list, tuple)) or not all(isinstance(r, PatchRecord) for r in records):
                raise self._contract("ft_patch_model", plugin, records, "a list of ft.api.PatchRecord or None")
            yield plugin, list(records)

    def apply_adapter(self, cfg: Config, model: Any) -> Any:
        return self.pm.call_first("ft_apply_adapter", cfg=cfg, model=model)[1] or model

    # -- training ------------------------------------------------------------------------------

    def collator(self, cfg: Config, tokenizer: Any, method: Method, method_plugin: str | None = None) -> Any:
        """A feature plugin's collator (packing), else the method's own (``method_plugin`` registered it; an
        exception it raises names that plugin, like a callback's)."""
        plugin, collator = self.pm.call_first("ft_collator", cfg=cfg, tokenizer=tokenizer, method=method)
        if collator is None:
            plugin = method_plugin or f"method {method.name}"
            place = f"method '{method.name}': its collator"
            collator = attributed(method.collator, plugin, "ft_register_methods", f"{place} factory")(cfg, tokenizer)
            if callable(collator):
                collator = attributed(collator, plugin, "ft_register_methods", place)
        if not callable(collator):
            raise self._contract("ft_collator", plugin, collator, "a callable list[row] -> dict of tensors")
        return collator

    def trainer_args(self, cfg: Config, known: set[str]) -> dict[str, Any]:
        return self._merged("ft_trainer_args", "TrainingArguments field", known=known, cfg=cfg)

    def callbacks(self, cfg: Config) -> list[Any]:
        from transformers import TrainerCallback

        out = []
        for plugin, result in self.pm.call_each("ft_callbacks", cfg=cfg):
            if result is None:
                continue
            if not isinstance(result, (list, tuple)) or not all(isinstance(c, TrainerCallback) for c in result):
                raise self._contract("ft_callbacks", plugin, result, "a list of transformers.TrainerCallback or None")
            out.extend(_attributed_callback(c, plugin) for c in result)
        return out

    def before_train(self, cfg: Config, trainer: Any, model: Any) -> None:
        for plugin, result in self.pm.call_each("ft_before_train", cfg=cfg, trainer=trainer, model=model):
            self._expect_none("ft_before_train", plugin, result)

    def save_weights(self, cfg: Config, trainer: Any, model: Any, output_dir: str) -> list[str]:
        plugin, files = self.pm.call_first("ft_save_weights", cfg=cfg, trainer=trainer, model=model,
                                           output_dir=output_dir)
        if files is not None and not isinstance(files, (list, tuple)):
            raise self._contract("ft_save_weights", plugin, files, "a list of the files written, or None")
        return [str(f) for f in files or []]

    def after_train(self, cfg: Config, trainer: Any, metrics: dict[str, Any]) -> None:
        for plugin, result in self.pm.call_each("ft_after_train", cfg=cfg, trainer=trainer, metrics=metrics):
            self._expect_none("ft_after_train", plugin, result)

    # -- helpers -------------------------------------------------------------------------------

    def _required(self, hook: str, what: str, **kwargs: Any) -> Any:
        plugin, value = self.pm.call_first(hook, **kwargs)
        if value is None:
            raise FtError(f"no active plugin returned {what} from {hook}. Is the plugin that provides it blocked "
                          f"or failed? See `ft plugins`.")
        return value

    def _merged(self, hook: str, what: str, known: set[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Merge the dicts of an "all" hook; a key two plugins set differently is an error naming both."""
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for plugin, result in self.pm.call_each(hook, **kwargs):
            if result is None:
                continue
            if not isinstance(result, dict):
                raise self._contract(hook, plugin, result, "a dict or None")
            for key, value in result.items():
                if known is not None and key not in known:
                    raise PluginError(f"plugin '{plugin}' sets {what} '{key}' in {hook}{self._at(hook, plugin)}, "
                                      "which this transformers version does not have.")
                if key in merged and not _same(merged[key], value):
                    raise PluginError(
                        f"{what} '{key}' is set to {merged[key]!r} by plugin '{owner[key]}'{self._at(hook, owner[key])} "
                        f"and to {value!r} by plugin '{plugin}'{self._at(hook, plugin)}. Deselect one of them or align "
                        "their config sections."
                    )
                merged[key], owner[key] = value, plugin
        return merged

    def _expect_none(self, hook: str, plugin: str, result: Any) -> None:
        if result is not None:
            raise self._contract(hook, plugin, result, "None")

    def _at(self, hook: str, plugin: str | None) -> str:
        """`` (file:line)`` of the plugin's implementation of ``hook``, for messages ('' if unknown)."""
        where = self.pm.impl_location(hook, plugin)
        return f" ({where})" if where else ""

    def _contract(self, hook: str, plugin: str | None, value: Any, expected: str) -> PluginError:
        shown = repr(value)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        return PluginError(f"plugin '{plugin}' returned {type(value).__name__} {shown} from {hook}"
                           f"{self._at(hook, plugin)}; the hook expects {expected} (see docs/hooks.md). Fix the "
                           f"plugin, or run without it (-p no:{plugin}).")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


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
        from ft.errors import (
            PluginHookError,
            is_out_of_memory,
            outside_hooks_error,
            plugin_frames,
            plugin_in_traceback,
        )

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


def _attributed_callback(callback: Any, plugin: str) -> Any:
    """The callback, with each event method raising a PluginHookError that names its plugin."""
    for event in dir(callback):
        if event.startswith("on_"):
            setattr(callback, event, attributed(getattr(callback, event), plugin, "ft_callbacks",
                                                f"its callback {type(callback).__name__}.{event}"))
    return callback
