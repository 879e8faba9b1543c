"""Setting up a run: choose plugins, collect their registrations, validate the config."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.config import (
    CoreConfig,
    RawConfig,
    SectionRegistry,
    apply_overrides,
    build_config_model,
    format_loc,
    read_yaml,
    validate_config,
)
from ft.errors import ConfigError
from ft.plugins import PluginManager, parse_plugin_args
from ft.registry import FormatRegistry, OptimizerRegistry, SchedulerRegistry


@dataclass
class Registries:
    sections: SectionRegistry
    formats: FormatRegistry
    optimizers: OptimizerRegistry
    schedulers: SchedulerRegistry


@dataclass
class Context:
    """Everything the pipeline needs before it touches a model: plugins, registries, config."""

    pm: PluginManager
    registries: Registries
    cfg: CoreConfig

    @property
    def formats(self) -> FormatRegistry:
        return self.registries.formats


def collect_registries(pm: PluginManager) -> Registries:
    """Call every registration hook on every loaded plugin, stamping owners."""
    regs = Registries(SectionRegistry(), FormatRegistry(), OptimizerRegistry(), SchedulerRegistry())
    for hook, registry, arg in (
        ("ft_add_config", regs.sections, "registry"),
        ("ft_register_formats", regs.formats, "register"),
        ("ft_register_optimizers", regs.optimizers, "register"),
        ("ft_register_schedulers", regs.schedulers, "register"),
    ):
        for impl in reversed(getattr(pm.all_hooks, hook).get_hookimpls()):
            kwargs = {arg: registry.scoped(impl.plugin_name)}
            impl.function(*[kwargs[a] for a in impl.argnames])
    return regs


def config_model(regs: Registries) -> type[CoreConfig]:
    return build_config_model(regs.sections.sections, {e.name: e.value.options for e in regs.formats})


def make_plugin_manager(plugin_args: Sequence[str] = (), config_plugins: Sequence[str] = (), **kw: Any) -> PluginManager:
    cli_select, cli_block = parse_plugin_args(plugin_args)
    cfg_select, cfg_block = parse_plugin_args(config_plugins)
    return PluginManager(select=[*cfg_select, *cli_select], block=[*cfg_block, *cli_block], **kw)


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
    if not isinstance(config_plugins, list):
        raise ConfigError([f"{raw.source or '<config>'}: plugins: must be a list of plugin names"], raw.source)
    pm = make_plugin_manager(plugin_args, config_plugins, **pm_kwargs)
    regs = collect_registries(pm)
    model = config_model(regs)
    cfg = validate_config(
        raw,
        model,
        feature_plugins=pm.features(),
        active=pm.active_names(),
        format_names=regs.formats.names(),
    )
    cfg.plugins = [n for n in pm.active_names() if pm.infos[n].feature]  # -p too, for ft_validate_config
    problems = []
    for key, registry in (("optimizer", regs.optimizers), ("lr_scheduler", regs.schedulers)):
        name = getattr(cfg, key)
        if name not in registry:
            problems.append(f"{cfg.where(key)}: {registry.unknown_message(name)}")
    for _plugin, found in pm.call_each("ft_validate_config", cfg=cfg):
        problems.extend(found or [])
    if problems:
        raise ConfigError(problems, raw.source)
    return Context(pm, regs, cfg)


def resolve_path(cfg: CoreConfig, value: str) -> str:
    """A relative local path is taken from the working directory, else next to the config file."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or cfg.source is None:
        return str(p)
    beside = Path(cfg.source).parent / p
    return str(beside) if beside.exists() else str(p)


__all__ = ["Context", "Registries", "collect_registries", "format_loc", "load_context", "resolve_path"]
