"""Setting up a run: choose plugins, collect their registrations, validate the config."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft import hookspecs
from ft.kernel.config import CoreConfig, build_config_model, validate_config
from ft.kernel.config_checks import batch_problems, cadence_problems, reporter_problems, streaming_problems
from ft.kernel.config_file import RawConfig, apply_overrides, format_loc, read_yaml
from ft.kernel.errors import ConfigError, PluginError
from ft.kernel.methods import EVAL, Method
from ft.kernel.plugins import PluginManager, import_failure, parse_plugin_args
from ft.kernel.registry import FormatRegistry
from ft.kernel.spec import REGISTER, declared


class Registries:
    """One registry per registration hook, as ``ft/hookspecs.py`` declares them (``into=`` names the field:
    ``sections``, ``formats``, ``methods``, ``optimizers``, ``schedulers``, ``rewards``, ``key_hints``)."""

    def __init__(self) -> None:
        for declared_spec in declared(hookspecs).values():
            if declared_spec.mode == REGISTER:
                setattr(self, declared_spec.into, declared_spec.new_registry())

    def __getattr__(self, name: str) -> Any:  # only reached for a field no registration hook declares
        raise AttributeError(f"no registration hook fills a registry named '{name}' (see ft/hookspecs.py)")


@dataclass
class Context:
    """Everything the pipeline needs before it touches a model: plugins, registries, config, method."""

    pm: PluginManager
    registries: Registries
    cfg: CoreConfig

    @property
    def formats(self) -> FormatRegistry:
        return self.registries.formats

    @property
    def method(self) -> Method:
        """The training method the config chose (``method:``, default ``sft``)."""
        return self.registries.methods.get(self.cfg.method, self.cfg.where("method")).value


def collect_registries(pm: PluginManager) -> Registries:
    """Call every registration hook on every loaded plugin, stamping owners."""
    regs = Registries()
    pm.register_all(regs)
    return regs


def config_model(regs: Registries) -> type[CoreConfig]:
    return build_config_model(regs.sections.sections, {e.name: e.value.options for e in regs.formats})


def make_plugin_manager(plugin_args: Sequence[str] = (), config_plugins: Sequence[str] = (),
                        plugin_paths: Sequence[str] = (), **kw: Any) -> PluginManager:
    """The plugin manager for ``-p`` options and the config's ``plugins:``/``plugin_paths:``.

    As in pytest, the command line wins: ``-p no:X`` blocks X even when the config selects it.
    ``-p ./file.py`` (or a ``plugin_paths:`` entry) loads that one file as a plugin and selects it.
    """
    cli_select, cli_block = parse_plugin_args(plugin_args)
    cfg_select, cfg_block = parse_plugin_args(config_plugins)
    files = [*plugin_paths, *(s for s in cli_select if _is_path(s))]
    select = [s for s in [*cfg_select, *cli_select] if not _is_path(s) and s not in cli_block]
    from_files = [_load_plugin_file(f) for f in files]
    select += [name for name, _obj in from_files if name not in select and name not in cli_block]
    return PluginManager(select=select, block=[*cfg_block, *cli_block], plugin_files=from_files, **kw)


def _is_path(value: str) -> bool:
    return value.endswith(".py") or "/" in value or "\\" in value


def _load_plugin_file(path: str) -> tuple[str, object]:
    """Import one .py file as a plugin module named after the file (for a quick loop while writing one)."""
    import importlib.util
    import sys

    file = Path(path).expanduser()
    if not file.is_file():
        raise PluginError(f"-p {path}: no such plugin file. Give the path of a .py file that defines @hookimpl "
                          "functions (or a plugin name from `ft plugins`).")
    name = file.stem
    spec = importlib.util.spec_from_file_location(f"ft_local_plugin_{name}", file)
    if spec is None or spec.loader is None:
        raise PluginError(f"-p {path}: cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: sys.exit() in a plugin file must not end ft without a word
        sys.modules.pop(spec.name, None)
        raise PluginError(f"-p {path}: importing the plugin file failed: {import_failure(exc).removeprefix('import failed: ')}"
                          ) from (exc if isinstance(exc, Exception) else None)
    return name, module


def load_context(
    config: str | os.PathLike | dict[str, Any],
    plugin_args: Sequence[str] = (),
    overrides: Sequence[str] = (),
    **pm_kwargs: Any,
) -> Context:
    """Read the config, select plugins, and validate everything (no torch imported)."""
    if isinstance(config, dict):
        raw = RawConfig(dict(config), {}, None)
    else:
        raw = read_yaml(config)
    if overrides:
        raw = RawConfig(apply_overrides(raw.data, overrides), raw.lines, raw.source)
    config_plugins = raw.data.get("plugins") or []
    paths = raw.data.get("plugin_paths") or []
    for key, value in (("plugins", config_plugins), ("plugin_paths", paths)):
        if not isinstance(value, list):
            line = raw.lines.get((key,))
            where = f"{raw.source or '<config>'}:{line}" if line else (raw.source or "<config>")
            raise ConfigError([f"{where}: {key}: must be a list (e.g. {key}: [{'lora' if key == 'plugins' else './my_plugin.py'}])"],
                              raw.source)
    paths = [_beside(raw.source, p) for p in paths]
    pm = make_plugin_manager(plugin_args, config_plugins, paths, **pm_kwargs)
    quiet_unselected(pm)
    turned_off = [n for n in pm.infos if n in pm.blocked and isinstance(raw.data.get(n), dict)]  # not autoload-off ones
    if turned_off:  # `-p no:vllm` on a config with a vllm: section runs without the plugin, its section unread
        logging.getLogger("ft.plugins").info("section(s) %s not read: their plugin is turned off (-p no:NAME)",
                                             ", ".join(turned_off))
        raw = RawConfig({k: v for k, v in raw.data.items() if k not in turned_off}, raw.lines, raw.source)
    regs = collect_registries(pm)
    pm.check_selected_loaded()  # a selected plugin whose registration failed is an error, not a warning
    model = config_model(regs)
    cfg = validate_config(
        raw,
        model,
        feature_plugins=pm.features(),
        active=pm.active_names(),
        format_names=regs.formats.names(),
        extra_problems=_method_problems(raw, regs, pm),
        unavailable=[_unavailable(i) for i in pm.infos.values() if i.status in ("failed", "blocked")],
        key_hints=regs.key_hints.hint_for,
        context={"registries": regs},
    )
    cfg.plugins = [n for n in pm.active_names() if pm.infos[n].feature]  # -p too, for ft_validate_config
    cfg._capabilities = pm.provided()
    if cfg.method in regs.methods:
        cfg._method_features = frozenset(regs.methods.get(cfg.method).value.features)
    cfg._registries = regs  # plugins resolve names the config gives (a GRPO run's rewards)
    cfg._known_names = frozenset([*pm.infos, *regs.methods.names(), *(m.value.section_name for m in regs.methods)])
    problems = []
    for key, registry in (("optimizer", regs.optimizers), ("lr_scheduler", regs.schedulers)):
        name = getattr(cfg, key)
        if name not in registry:
            problems.append(f"{cfg.where(key)}: {registry.unknown_message(name)}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    problems.extend([*reporter_problems(cfg), *cadence_problems(cfg), *batch_problems(cfg, world),
                     *streaming_problems(cfg)])
    problems.extend(pm.call("ft_validate_config", cfg=cfg))
    if problems:
        raise ConfigError(problems, raw.source)
    return Context(pm, regs, cfg)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_unselected(pm: PluginManager) -> None:
    """Unselected features leave no trace: the loggers of the libraries a feature plugin owns
    (``Plugin(loggers=...)``: bitsandbytes for qlora, DeepSpeed for deepspeed) show only
    errors unless the feature is selected. Libraries that transformers imports whenever they are
    installed would otherwise print warnings into every run."""
    active = set(pm.active_names())
    for name, info in pm.infos.items():
        if not info.feature or name in active:
            continue
        for logger_name in info.loggers:
            logger = logging.getLogger(logger_name)
            logger.setLevel(logging.ERROR)
            if not any(isinstance(f, _BelowError) for f in logger.filters):
                logger.addFilter(_BelowError())  # survives a library that resets its logger's level


def _unavailable(info: Any) -> str:
    dist = f"{info.distribution} {info.version}".strip()
    why = info.error or ("blocked with -p no:" + info.name if info.status == "blocked" else info.status)
    return f"'{info.name}' ({dist}): {why}"


def _beside(source: str | None, path: str) -> str:
    p = Path(str(path)).expanduser()
    if p.is_absolute() or source is None or p.exists():
        return str(p)
    return str(Path(source).parent / p)


def _method_problems(raw: RawConfig, regs: Registries, pm: PluginManager) -> list[tuple[tuple, str]]:
    """What the chosen method rules out, before any model loads: formats that do not produce its
    columns, features it does not support, eval data it cannot use, other methods' sections."""
    data = raw.data
    name = data.get("method", "sft")
    if not isinstance(name, str):
        return []  # the model validation reports the type
    if name not in regs.methods:
        return [(("method",), regs.methods.unknown_message(name) + " Methods come from plugins; see `ft plugins`.")]
    method: Method = regs.methods.get(name).value
    problems: list[tuple[tuple, str]] = []
    for other in regs.methods:
        section = other.value.section_name
        if other.name != name and section != method.section_name and section in data:
            problems.append(((section,), f"section '{section}' configures method '{other.name}', but the method is "
                                         f"'{name}'. Set `method: {other.name}`, or remove the section."))
    for group in ("datasets", "test_datasets"):
        entries = data.get(group)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            fmt_name = entry.get("type") if isinstance(entry, dict) else None
            if not isinstance(fmt_name, str) or fmt_name not in regs.formats:
                continue
            missing = [c for c in method.columns if c not in regs.formats.get(fmt_name).value.columns]
            if missing:
                fits = [f.name for f in regs.formats if all(c in f.value.columns for c in method.columns)]
                problems.append(((group, i, "type"), (
                    f"dataset type '{fmt_name}' gives {', '.join(regs.formats.get(fmt_name).value.columns)}, but "
                    f"method '{name}' needs {', '.join(method.columns)} (missing: {', '.join(missing)}). "
                    f"Types for this method: {', '.join(fits) or 'none installed'}.")))
    selected = set(parse_plugin_args(data.get("plugins") or [])[0]) | set(pm.selected)
    for plugin in sorted(selected):
        info = pm.infos.get(plugin)
        needs = info.method_feature if info else None
        if needs and not method.supports(needs):
            loc = ("plugins",) if plugin in (data.get("plugins") or []) else ()
            problems.append((loc, f"plugin '{plugin}' needs {needs}, which method '{name}' does not support (its "
                                  f"Method.features do not list '{needs}'); remove it (or pass -p no:{plugin})."))
    if not method.supports(EVAL):
        for key in ("val_set_size", "test_datasets"):
            if data.get(key):
                problems.append(((key,), f"method '{name}' has no evaluation; remove {key}."))
    return problems


def resolve_path(cfg: CoreConfig, value: str) -> str:
    """A relative local path is taken from the working directory, else next to the config file."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or cfg.source is None:
        return str(p)
    beside = Path(cfg.source).parent / p
    return str(beside) if beside.exists() else str(p)


__all__ = ["Context", "Registries", "collect_registries", "format_loc", "load_context", "resolve_path"]
