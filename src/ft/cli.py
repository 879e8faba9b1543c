"""The ``ft`` command line: run, preprocess, validate, plugins, schema; plugins add more (infer, merge ...).

Heavy libraries are imported inside commands, so ``ft --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ft import __version__
from ft.kernel.errors import ConfigError, FtError

plugin_option = click.option(
    "-p", "plugin_args", multiple=True, metavar="NAME",
    help="Select a feature plugin (repeatable); -p no:NAME blocks a plugin.",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value (YAML scalar)."
)
trace_option = click.option("--trace", is_flag=True, help="Print every hook call and the plugins it reaches.")


def _show_traceback(value: bool) -> None:
    if value:
        os.environ["FT_TRACEBACK"] = "1"


def _traceback_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    _show_traceback(value)
    return value


traceback_option = click.option(
    "--traceback", is_flag=True, expose_value=False, is_eager=True, callback=_traceback_callback,
    help="On an error, also print the whole Python traceback.",
)


def _fail(exc: FtError) -> None:
    if os.environ.get("FT_TRACEBACK"):
        import traceback

        traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(exc.exit_code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command ft's error handling: an FtError prints its message (the whole traceback with
    ``--traceback``) and exits with its code. Plugin commands use it too."""
    import functools

    @traceback_option
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FtError as exc:
            _fail(exc)
        except Exception as exc:
            error = _from_plugin(exc)
            if error is None:
                raise
            _fail(error)

    return wrapper


def _from_plugin(exc: Exception) -> FtError | None:
    """An exception raised in a plugin's code outside any hook call (a function it patched into torch or
    transformers at import, say), as an error naming the plugin and its frames; None when no plugin's code is in
    the traceback (then it is ft's own bug, and its traceback is shown)."""
    from ft.kernel.errors import is_out_of_memory, outside_hooks_error, plugin_in_traceback

    found = None if is_out_of_memory(exc) else plugin_in_traceback(exc)
    return None if found is None else outside_hooks_error(found[0], exc, found[1])


def setup_logging(verbose: bool = False) -> None:
    """Log lines on stderr; when stderr is no terminal (a file, a pipe, CI) no progress bars at all,
    so the log stays clean lines (the training progress is then one line per logged step)."""
    import logging

    from ft.engine.launch import is_main_process

    level = logging.DEBUG if verbose else logging.INFO
    if not verbose and not is_main_process():
        level = logging.WARNING  # in a multi-process run only rank 0 reports progress
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        os.environ.setdefault("FT_NO_PROGRESS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' weight loading and shard writing bars


def _context(config: str, plugin_args, overrides, trace: bool = False):
    from ft.kernel.context import load_context
    from ft.kernel.plugins import add_hook_monitor

    stop = None
    if trace:  # the manager made here traces every hook call, from the first registration hook on
        from ft.kernel.plugins import trace_after

        stop = add_hook_monitor(lambda *a: None, trace_after(lambda msg: click.echo(msg, err=True)))
    try:
        ctx = load_context(config, plugin_args, overrides)
    finally:
        if stop is not None:
            stop()
    _warn_failed(ctx.pm)
    return ctx


def _warn_failed(pm) -> None:
    for info in pm.failed():
        click.secho(f"warning: plugin '{info.name}' ({info.distribution} {info.version}) is installed but could "
                    f"not be loaded: {str(info.error).rstrip('.')}. Its features are unavailable; `ft plugins` lists it.",
                    fg="yellow", err=True)


class FtGroup(click.Group):
    """Adds plugin commands lazily, and survives broken plugins.

    ``ft --help`` lists the plugin commands from ``ft.commands_cache`` while it is current, so it
    imports no plugin; running a plugin command (or a cache that may be stale) loads the plugins."""

    _plugins_added = False
    _listing: dict[str, click.Command] | None = None  # while format_commands shows cached commands

    def _add_plugin_commands(self) -> None:
        if self._plugins_added:
            return
        self._plugins_added = True
        from ft import commands_cache

        before, at = dict(self.commands), commands_cache.where()
        try:
            from ft.kernel.context import make_plugin_manager

            pm = make_plugin_manager()
            pm.call("ft_add_commands", cli=self)
        except FtError as exc:  # never let a plugin break `ft --help`
            click.secho(f"warning: plugin commands unavailable: {exc}", fg="yellow", err=True)
            return
        if not pm.failed() and not _process_plugins():  # only what every later run would see
            from ft.kernel.plugins import AUTOLOAD_ENV

            added = {n: c for n, c in self.commands.items() if before.get(n) is not c}
            commands_cache.save(added, (AUTOLOAD_ENV,), at)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if not self._plugins_added:
            cached = None if _process_plugins() else _cached_commands()
            if cached is not None:
                self._listing = {**self.commands, **cached}
                try:
                    return super().format_commands(ctx, formatter)
                finally:
                    self._listing = None
        return super().format_commands(ctx, formatter)

    def list_commands(self, ctx: click.Context) -> list[str]:
        if self._listing is not None:
            return sorted(self._listing)
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if self._listing is not None:
            return self._listing.get(name)
        cmd = super().get_command(ctx, name)
        if cmd is None:
            self._add_plugin_commands()
            cmd = super().get_command(ctx, name)
        return cmd


def _process_plugins() -> list[str]:
    """Plugins registered for this process only (``ft.tools.testing``); none unless ft.kernel.plugins was imported."""
    plugins = sys.modules.get("ft.kernel.plugins")
    return plugins.process_plugin_names() if plugins is not None else []


def _cached_commands() -> dict[str, click.Command] | None:
    from ft import commands_cache

    entries = commands_cache.load()
    return None if entries is None else {n: commands_cache.stub(n, e) for n, e in entries.items()}


@click.group(cls=FtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ft")
def cli() -> None:
    """ft: fine-tune language models from a YAML config, with plugins for every feature."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@plugin_option
@set_option
@trace_option
@click.option("--nproc", type=int, default=None, help="Launch N processes (torch.distributed) on this node.")
@click.option("--nnodes", type=str, default=None, help="Nodes for a multi-node run (torchrun --nnodes).")
@click.option("--node-rank", type=int, default=None, help="This node's rank (torchrun --node-rank).")
@click.option("--rdzv-endpoint", type=str, default=None, help="Rendezvous HOST:PORT (torchrun --rdzv-endpoint).")
@click.option("--rdzv-id", type=str, default=None, help="Rendezvous job id (torchrun --rdzv-id).")
@click.option("--fresh", is_flag=True, help="Start over from step 0, deleting the checkpoints the output dir holds.")
@click.option("--overwrite", is_flag=True,
              help="Train a finished run again from step 0: deletes its checkpoints, replaces its weights.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@handle_errors
def run(config, plugin_args, overrides, trace, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id, fresh, overwrite, verbose):
    """Train with CONFIG: load, prepare data, fine-tune, save."""
    setup_logging(verbose)
    if nproc or nnodes:
        from ft.engine.launch import launch

        code = launch(sys.argv[1:], nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                      rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
        if code is not None:  # None: already under a launcher, so this process trains
            sys.exit(code)
    from ft.engine.launch import close_process_group, is_main_process
    from ft.run import train

    ctx = _context(config, plugin_args, overrides, trace)
    result = train(ctx, fresh=fresh, overwrite=overwrite)
    close_process_group()  # every rank ends here together, its collectives done
    if is_main_process():
        click.echo(f"done: {result.output_dir}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@plugin_option
@set_option
@trace_option
@click.option("--debug", "debug_n", type=int, default=0, metavar="N",
              help="Print N prepared samples with trained tokens highlighted.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@handle_errors
def preprocess(config, plugin_args, overrides, trace, debug_n, verbose):
    """Tokenize (and pack) the datasets of CONFIG into the cache."""
    setup_logging(verbose)
    from ft.run import preprocess as do_preprocess

    ctx = _context(config, plugin_args, overrides, trace)
    data, tokenizer = do_preprocess(ctx)
    if debug_n:
        from ft.tools.debug import show_samples

        show_samples(data.train, tokenizer, debug_n, where=data.where)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@plugin_option
@set_option
@trace_option
@click.option("--nproc", type=int, default=None, help="Processes the run will use (for the effective batch).")
@handle_errors
def validate(config, plugin_args, overrides, trace, nproc):
    """Check CONFIG and show the plugins it selects; loads no model."""
    from ft.kernel.config_checks import batch_problems, config_warnings, missing_local_paths

    ctx = _context(config, plugin_args, overrides, trace)
    cfg = ctx.cfg
    missing = missing_local_paths(cfg)  # what `ft run` would open first
    if missing:
        raise ConfigError(missing, cfg.source)
    world = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if batch_problems(cfg, world):  # --nproc multiplies the batch the config was checked with
        raise ConfigError(batch_problems(cfg, world), cfg.source)
    click.echo(f"{cfg.source}: valid")
    for warning in config_warnings(cfg):
        click.secho(f"  warning: {warning}", fg="yellow")
    click.echo(f"  base_model: {cfg.base_model}")
    click.echo(f"  method: {cfg.method} ({ctx.method.description or 'from plugin ' + ctx.registries.methods.get(cfg.method).plugin})")
    click.echo(f"  datasets: {', '.join(f'{d.path} ({d.type})' for d in cfg.datasets)}")
    click.echo(f"  selected features: {', '.join(cfg.plugins) or 'none'}")
    click.echo(f"  active plugins: {', '.join(ctx.pm.active_names())}")
    click.echo(
        f"  effective batch size: {cfg.effective_batch_size(world)} "
        f"(micro_batch_size {cfg.micro_batch_size} x gradient_accumulation_steps "
        f"{cfg.gradient_accumulation_steps} x {world} process(es))"
    )


@cli.command()
@plugin_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--hook", "hook_name", default=None, help="Show the call order of one hook.")
@handle_errors
def plugins(plugin_args, as_json, hook_name):
    """List installed plugins: name, distribution, version, status, hooks."""
    from ft.kernel.context import collect_registries, make_plugin_manager
    from ft.kernel.plugins import plugin_origin

    pm = make_plugin_manager(plugin_args)
    registers = registrations(collect_registries(pm), pm)  # a plugin whose registration hook raises is listed as failed
    if hook_name:
        order = pm.call_order(hook_name)
        if as_json:
            click.echo(json.dumps({"hook": hook_name, "order": order}))
        else:
            click.echo(f"{hook_name} calls, in order:")
            for i, name in enumerate(order, 1):
                info = pm.infos[name]
                click.echo(f"  {i}. {name} ({info.status})")
        return
    infos = list(pm.infos.values())
    if as_json:
        click.echo(json.dumps([{**i.as_dict(), "registers": registers.get(i.name, {})} for i in infos], indent=2))
        return
    width = max([len(i.name) for i in infos] + [4])
    dists = {i.name: plugin_origin(i) for i in infos}
    dwidth = max([len(d) for d in dists.values()] + [12])
    click.echo(f"{'name':<{width}}  {'status':<9}  {'distribution':<{dwidth}}  hooks")
    for i in sorted(infos, key=lambda i: i.name):
        kind = " (feature)" if i.feature else ""
        click.echo(f"{i.name:<{width}}  {i.status:<9}  {dists[i.name]:<{dwidth}}  {', '.join(i.hooks)}{kind}")
        if i.error:
            click.echo(f"{'':<{width}}  -> {i.status}: {i.error}")
        if registers.get(i.name):
            click.echo(f"{'':<{width}}  registers " + "; ".join(f"{kind_} {', '.join(names)}"
                                                               for kind_, names in registers[i.name].items()))


def registrations(regs: Any, pm: Any) -> dict[str, dict[str, list[str]]]:
    """plugin -> what it registered: ``{"sections": [...], "formats": [...], "methods": [...], ..., "commands": [...]}``."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, (_model, plugin) in regs.sections.sections.items():
        out.setdefault(plugin, {}).setdefault("sections", []).append(name)
    for kind in ("formats", "methods", "optimizers", "schedulers", "rewards"):
        for entry in getattr(regs, kind):
            out.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
    for plugin in pm.implementers("ft_add_commands", active_only=False):
        group = click.Group()
        try:
            pm._call_one("ft_add_commands", plugin, {"cli": group})
        except FtError as exc:
            out.setdefault(plugin, {})["commands"] = [f"(failed: {exc})"]
            continue
        if group.commands:
            out.setdefault(plugin, {})["commands"] = sorted(group.commands)
    return out


@cli.command()
@plugin_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@handle_errors
def schema(plugin_args, output):
    """Print the JSON Schema of the config (core keys and every plugin's section)."""
    from ft.kernel.schema import generate_schema

    text = generate_schema(plugin_args)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        click.echo(text, nl=False)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
